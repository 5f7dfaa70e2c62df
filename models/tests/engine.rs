//! Engine behaviour on a tiny seeded model (no download): loading, batching, ordering,
//! the fused CPU kernels against the generic burn path, and every bad input's error.

use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use troupe_models::kernels::packed::PackedWeight;
use troupe_models::kernels::{cpu, generic, Activation, HostWeight};
use troupe_models::{cpu_device, write_tiny_model_dir, CpuBackend, Embedder, ModelError};

type B = CpuBackend;

fn tiny(dir: &Path, seed: u64) -> Embedder<B> {
    write_tiny_model_dir(dir, seed).unwrap();
    Embedder::load(dir, &cpu_device()).unwrap()
}

const TEXTS: [&str; 7] = [
    "hello world",
    "a",
    "the quick brown fox jumps over the lazy dog, twice!",
    "",
    "zebra 42",
    "what's this? it's a test.",
    "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo pppp",
];

fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn embeddings_are_unit_vectors_in_input_order_at_any_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let embedder = tiny(dir.path(), 7);
    let reference: Vec<Vec<f32>> = TEXTS
        .iter()
        .map(|t| embedder.embed(&[*t], 1).unwrap().remove(0))
        .collect();
    for row in &reference {
        assert_eq!(row.len(), 32);
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    // Distinct texts give distinct vectors, so a mix-up of the order would show.
    assert!(max_difference(&reference[..1], &reference[1..2]) > 1e-2);
    for batch_size in [1, 2, 3, 7, 64] {
        let batched = embedder.embed(&TEXTS, batch_size).unwrap();
        let difference = max_difference(&batched, &reference);
        assert!(difference < 1e-5, "batch size {batch_size}: {difference}");
    }
}

#[test]
fn seeds_are_deterministic_and_distinct() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = tiny(a.path(), 1).embed(&TEXTS, 8).unwrap();
    let again = tiny(b.path(), 1).embed(&TEXTS, 8).unwrap();
    let other = tiny(c.path(), 2).embed(&TEXTS, 8).unwrap();
    assert_eq!(first, again);
    assert!(max_difference(&first, &other) > 1e-2);
}

#[test]
fn long_texts_are_truncated_to_max_seq_length_ending_in_sep() {
    let dir = tempfile::tempdir().unwrap();
    let embedder = tiny(dir.path(), 3);
    let long = "word ".repeat(100);
    let ids = embedder
        .tokenizer()
        .encode(&[long.as_str()])
        .unwrap()
        .remove(0);
    assert_eq!(ids.len(), embedder.config().max_seq_length);
    assert_eq!(ids[0], 2, "[CLS]");
    assert_eq!(*ids.last().unwrap(), 3, "[SEP]");
    assert_eq!(embedder.embed(&[long.as_str()], 4).unwrap().len(), 1);
}

fn random(shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-2.0, 2.0), &cpu_device())
}

fn random1(len: usize) -> Tensor<B, 1> {
    Tensor::random([len], Distribution::Uniform(-1.0, 1.0), &cpu_device())
}

/// `w` (`[k, n]`) packed the way the encoder packs its weights at load.
fn packed(w: &Tensor<B, 2>) -> PackedWeight {
    let [k, n] = w.dims();
    PackedWeight::pack(&w.clone().into_data().to_vec::<f32>().unwrap(), k, n)
}

fn max_abs(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn packed_linear_matches_the_generic_path() {
    for (rows, k, n) in [(1, 8, 8), (37, 48, 96), (300, 64, 200)] {
        let (x, w, b) = (random([rows, k]), random([k, n]), random1(n));
        for activation in [Activation::None, Activation::Gelu] {
            let fused = cpu::host_linear(
                x.clone(),
                HostWeight::Packed(&packed(&w)),
                b.clone(),
                activation,
            );
            let plain = generic::linear(x.clone(), w.clone(), b.clone(), activation);
            let difference = max_abs(fused, plain);
            assert!(
                difference < 1e-4,
                "{rows}x{k}x{n} {activation:?}: {difference}"
            );
        }
    }
}

#[test]
fn packed_residual_layer_norm_matches_the_generic_path() {
    let (rows, k, n) = (53, 40, 72);
    let (x, w, b) = (random([rows, k]), random([k, n]), random1(n));
    let (residual, gamma, beta) = (random([rows, n]), random1(n), random1(n));
    let fused = cpu::host_linear_residual_norm(
        x.clone(),
        HostWeight::Packed(&packed(&w)),
        b.clone(),
        residual.clone(),
        gamma.clone(),
        beta.clone(),
        1e-12,
    );
    let plain = generic::linear_residual_layer_norm(x, w, b, residual, gamma, beta, 1e-12);
    let difference = max_abs(fused, plain);
    assert!(difference < 1e-4, "{difference}");
}

#[test]
fn fused_attention_matches_the_generic_path_on_real_rows() {
    let (batch, seq, heads, head_dim) = (3, 9, 4, 8);
    let hidden = heads * head_dim;
    let lengths = [9, 4, 1];
    let qkv: Tensor<B, 3> = Tensor::random(
        [batch, seq, 3 * hidden],
        Distribution::Uniform(-2.0, 2.0),
        &cpu_device(),
    );
    let fused = cpu::self_attention(qkv.clone(), &lengths, heads);
    let plain = generic::self_attention(qkv, &lengths, heads);
    for (b, &length) in lengths.iter().enumerate() {
        let f = fused.clone().slice([b..b + 1, 0..length, 0..hidden]);
        let p = plain.clone().slice([b..b + 1, 0..length, 0..hidden]);
        let difference: f32 = (f - p).abs().max().into_scalar();
        assert!(difference < 1e-5, "sequence {b}: {difference}");
    }
}

fn load_error(dir: &Path) -> ModelError {
    Embedder::<B>::load(dir, &cpu_device()).unwrap_err()
}

#[test]
fn a_missing_or_incomplete_model_dir_names_the_missing_piece() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert!(matches!(
        load_error(&missing),
        ModelError::ModelDirMissing { .. }
    ));
    write_tiny_model_dir(dir.path(), 1).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let error = load_error(dir.path());
    assert!(
        matches!(error, ModelError::ModelFileMissing { ref path } if path.ends_with("tokenizer.json")),
        "{error}"
    );
}

#[test]
fn a_truncated_or_corrupt_safetensors_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(dir.path(), 1).unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let error = load_error(dir.path());
    assert!(matches!(error, ModelError::Weights { .. }), "{error}");
    assert!(error.to_string().contains("model.safetensors"), "{error}");
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    assert!(matches!(load_error(dir.path()), ModelError::Weights { .. }));
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(load_error(dir.path()), ModelError::Weights { .. }));
}

#[test]
fn weights_that_do_not_fit_the_config_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(dir.path(), 1).unwrap();
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_hidden_layers"] = 3.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let error = load_error(dir.path());
    assert!(
        matches!(
            error,
            ModelError::WeightsMismatch { .. } | ModelError::Weights { .. }
        ),
        "{error}"
    );
    config["num_hidden_layers"] = 1.into();
    std::fs::write(&path, config.to_string()).unwrap();
    assert!(matches!(
        load_error(dir.path()),
        ModelError::WeightsMismatch { .. }
    ));
    config["num_hidden_layers"] = 2.into();
    config["hidden_size"] = 48.into();
    config["num_attention_heads"] = 4.into();
    std::fs::write(&path, config.to_string()).unwrap();
    assert!(matches!(
        load_error(dir.path()),
        ModelError::WeightsMismatch { .. }
    ));
}

#[test]
fn a_bad_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(dir.path(), 1).unwrap();
    let path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "{ this is not json").unwrap();
    assert!(matches!(
        load_error(dir.path()),
        ModelError::InvalidConfig { .. }
    ));
    let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
    config["num_attention_heads"] = 5.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let error = load_error(dir.path());
    assert!(error.to_string().contains("num_attention_heads"), "{error}");
    config["num_attention_heads"] = 4.into();
    config["hidden_act"] = "relu".into();
    std::fs::write(&path, config.to_string()).unwrap();
    let error = load_error(dir.path());
    assert!(
        matches!(
            error,
            ModelError::UnsupportedConfig {
                field: "hidden_act",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn empty_input_absurd_batches_and_foreign_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let embedder = tiny(dir.path(), 1);
    let none: [&str; 0] = [];
    assert!(matches!(
        embedder.embed(&none, 8),
        Err(ModelError::EmptyInput)
    ));
    assert!(matches!(
        embedder.embed(&["a"], 0),
        Err(ModelError::BatchSize { requested: 0, .. })
    ));
    assert!(matches!(
        embedder.embed(&["a"], 1_000_000),
        Err(ModelError::BatchSize {
            requested: 1_000_000,
            ..
        })
    ));
    assert!(matches!(
        embedder.embed_token_ids(&[vec![2, 9999, 3]], 8),
        Err(ModelError::TokenOutOfVocabulary { id: 9999, .. })
    ));
    assert!(matches!(
        embedder.embed_token_ids(&[vec![]], 8),
        Err(ModelError::Tokenize { index: 0, .. })
    ));
    assert!(matches!(
        embedder.embed_token_ids(&[vec![2; 33]], 8),
        Err(ModelError::Tokenize { index: 0, .. })
    ));
}
