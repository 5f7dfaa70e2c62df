//! Correctness against the golden all-MiniLM-L6-v2 outputs (tests/data/golden, copied from
//! shared/golden/minilm): token ids must be equal and every embedding component within
//! 1e-5. Needs the real weights: scripts/test.sh fetches them into the cache first, or set
//! TROUPE_MODEL_DIR.

use std::path::PathBuf;

use serde::Deserialize;
use troupe_models::{cpu_device, CpuBackend, Embedder};

const TOLERANCE: f32 = 1e-5;

#[derive(Deserialize)]
struct GoldenTokens {
    index: usize,
    n_tokens: usize,
    input_ids: Vec<u32>,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TROUPE_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let dir =
        troupe_models::fetch::model_dir(&troupe_models::fetch::troupe_home(), "all-MiniLM-L6-v2");
    assert!(
        troupe_models::fetch::known_model("all-MiniLM-L6-v2")
            .unwrap()
            .is_complete(&dir),
        "the real model is not in {}: run `troupe models fetch all-MiniLM-L6-v2` (scripts/test.sh does) or set TROUPE_MODEL_DIR",
        dir.display()
    );
    dir
}

/// The file's lines as the golden README defines them: split on '\n' only, a final newline
/// adds no sentence, a trailing '\r' is dropped, nothing else is stripped.
fn sentences() -> Vec<String> {
    let text = std::fs::read_to_string(golden_dir().join("sentences.txt")).unwrap();
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
        .into_iter()
        .map(|l| l.strip_suffix('\r').map(str::to_owned).unwrap_or(l))
        .collect()
}

fn golden_embeddings() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(golden_dir().join("embeddings.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn embedder() -> Embedder<CpuBackend> {
    Embedder::load(&model_dir(), &cpu_device()).unwrap()
}

#[test]
fn token_ids_equal_the_golden_tokens() {
    let embedder = embedder();
    let sentences = sentences();
    let golden: Vec<GoldenTokens> =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("tokens.json")).unwrap())
            .unwrap();
    assert_eq!(sentences.len(), golden.len());
    let ids = embedder.tokenizer().encode(&sentences).unwrap();
    for (row, expected) in golden.iter().enumerate() {
        assert_eq!(expected.index, row);
        assert_eq!(
            ids[row].len(),
            expected.n_tokens,
            "sentence {row}: token count"
        );
        assert_eq!(ids[row], expected.input_ids, "sentence {row}: token ids");
    }
    // The long sentences are the ones that catch a tokenizer left at its file's
    // truncation of 128.
    assert!(ids.iter().any(|s| s.len() == 256));
    assert!(ids.iter().any(|s| s.len() > 128 && s.len() < 256));
}

fn max_abs_difference(actual: &[Vec<f32>], expected: &[Vec<f32>]) -> (f32, usize, usize) {
    let mut worst = (0.0f32, 0, 0);
    for (row, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), e.len(), "sentence {row}: dimension");
        for (column, (x, y)) in a.iter().zip(e).enumerate() {
            let difference = (x - y).abs();
            if difference.is_nan() || difference > worst.0 {
                worst = (
                    if difference.is_nan() {
                        f32::INFINITY
                    } else {
                        difference
                    },
                    row,
                    column,
                );
            }
        }
    }
    worst
}

#[test]
fn embeddings_match_the_golden_vectors_at_every_batch_size() {
    let embedder = embedder();
    let sentences = sentences();
    let golden = golden_embeddings();
    assert_eq!(golden.len(), sentences.len());
    // 32: one padded batch of all 30; 7: several sorted batches; 1: no padding at all.
    for batch_size in [32, 7, 1] {
        let embeddings = embedder.embed(&sentences, batch_size).unwrap();
        assert_eq!(embeddings.len(), sentences.len());
        let (worst, row, column) = max_abs_difference(&embeddings, &golden);
        eprintln!("batch size {batch_size}: max |difference| {worst:.3e} (sentence {row}, component {column})");
        assert!(
            worst <= TOLERANCE,
            "batch size {batch_size}: sentence {row} component {column} differs by {worst:e} (> {TOLERANCE:e})"
        );
    }
}

#[test]
fn the_published_example_reproduces() {
    let embedder = embedder();
    let embedding = &embedder
        .embed(&["This is an example sentence"], 32)
        .unwrap()[0];
    let published = [0.0676569f32, 0.0634959, 0.0487131, 0.0793050, 0.0374480];
    for (value, expected) in embedding.iter().zip(published) {
        assert!((value - expected).abs() < 1e-6, "{value} vs {expected}");
    }
    let pair = embedder
        .embed(
            &[
                "The weather is lovely today.",
                "It's so sunny outside!",
                "He drove to the stadium.",
            ],
            32,
        )
        .unwrap();
    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((cosine(&pair[0], &pair[1]) - 0.6660).abs() < 1e-4);
    assert!((cosine(&pair[0], &pair[2]) - 0.1046).abs() < 1e-4);
    assert!((cosine(&pair[1], &pair[2]) - 0.1411).abs() < 1e-4);
}
