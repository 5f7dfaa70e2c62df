//! The int8 encoder against the fp32 one on the real all-MiniLM-L6-v2 weights: cosine
//! ≥ 0.999 on every golden sentence and every sentence the repository's tests and docs
//! embed, at the serving batch size and one by one. Prints the worst case.
//!
//! Needs the real weights (TROUPE_MODEL_DIR, or the `troupe models fetch` cache); without
//! them the tests print SKIPPED, unless TROUPE_REQUIRE_MODEL is set.

use std::path::PathBuf;

use troupe_models::bench::sentence_with_tokens;
use troupe_models::kernels::int8_tiles::Int8Kernel;
use troupe_models::{cpu_device, CpuBackend, Embedder, Precision};

const MIN_COSINE: f32 = 0.999;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("TROUPE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            troupe_models::fetch::model_dir(
                &troupe_models::fetch::troupe_home(),
                "all-MiniLM-L6-v2",
            )
        });
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
        "TROUPE_REQUIRE_MODEL is set but {} holds no model: run `troupe models fetch all-MiniLM-L6-v2` or set TROUPE_MODEL_DIR",
        dir.display()
    );
    eprintln!("SKIPPED: no all-MiniLM-L6-v2 in {}", dir.display());
    None
}

fn lines(path: PathBuf) -> Vec<String> {
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
        .collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// Every sentence the repository embeds in its tests and docs, with where it comes from.
fn sentences(embedder: &Embedder<CpuBackend>) -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    for (index, line) in lines(root.join("tests/data/golden/sentences.txt"))
        .into_iter()
        .enumerate()
    {
        all.push((format!("golden {index}"), line));
    }
    for (index, line) in lines(root.join("../docs/sample.txt"))
        .into_iter()
        .enumerate()
    {
        all.push((format!("docs/sample.txt {index}"), line));
    }
    // node/tests (serving.rs, cli.rs, openai.rs and the tiny-model requests).
    for text in [
        "A man is eating food.",
        "The new movie is awesome",
        "",
        "naïve café — déjà vu, 東京 and emoji 🙂",
        "a much longer sentence that goes on and on so that this batch needs padding for the shorter rows beside it",
        "first text",
        "b",
        "a much longer third text, with punctuation!",
        "tab\there",
        "  spaced  ",
        "last",
        "A cat sat on the mat.",
        "a",
        "hi",
        "after",
        "during the switch",
        "forward me",
        "keep serving",
        "the next batch is fine",
        "where does this go",
        "this batch panics",
        "still fine",
    ] {
        all.push(("node tests".to_owned(), text.to_owned()));
    }
    // The benchmark's sentences (models/src/bench.rs), 16, 128 and 256 tokens.
    for tokens in [16, 128, 256] {
        all.push((
            format!("bench {tokens} tokens"),
            sentence_with_tokens(embedder.tokenizer(), tokens).unwrap(),
        ));
    }
    all
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn int8_embeddings_stay_within_cosine_0_999_of_fp32() {
    let Some(dir) = model_dir() else { return };
    let device = cpu_device();
    let fp32 = Embedder::<CpuBackend>::load(&dir, &device).unwrap();
    let int8 = Embedder::<CpuBackend>::load_with_precision(&dir, &device, Precision::Int8).unwrap();
    assert_eq!(int8.precision(), Precision::Int8);
    eprintln!("int8 kernel: {}", Int8Kernel::best().name());
    let sentences = sentences(&fp32);
    let texts: Vec<&str> = sentences.iter().map(|(_, text)| text.as_str()).collect();
    let expected = fp32.embed(&texts, 32).unwrap();
    let mut worst = (f32::INFINITY, String::new(), 0);
    for batch_size in [32, 1] {
        let got = int8.embed(&texts, batch_size).unwrap();
        let mut cosines = Vec::new();
        for ((origin, text), (a, b)) in sentences.iter().zip(expected.iter().zip(&got)) {
            let similarity = cosine(a, b);
            cosines.push(similarity);
            if similarity < worst.0 {
                worst = (similarity, format!("{origin}: {text:?}"), batch_size);
            }
            assert!(
                similarity >= MIN_COSINE,
                "{origin} {text:?} at batch {batch_size}: cosine {similarity}"
            );
        }
        cosines.sort_by(f32::total_cmp);
        eprintln!(
            "batch {batch_size}: {} sentences, cosine min {:.6} median {:.6}",
            cosines.len(),
            cosines[0],
            cosines[cosines.len() / 2]
        );
    }
    eprintln!(
        "worst int8/fp32 cosine {:.6} on {} (batch {})",
        worst.0, worst.1, worst.2
    );
}

#[test]
fn int8_differs_from_fp32_and_is_deterministic() {
    let Some(dir) = model_dir() else { return };
    let device = cpu_device();
    let fp32 = Embedder::<CpuBackend>::load(&dir, &device).unwrap();
    let int8 = Embedder::<CpuBackend>::load_with_precision(&dir, &device, Precision::Int8).unwrap();
    let texts = ["A man is eating food.", "The new movie is awesome"];
    let first = int8.embed(&texts, 32).unwrap();
    assert_eq!(first, int8.embed(&texts, 32).unwrap());
    // The integer path really runs: quantisation moves the vector, if only a little.
    assert_ne!(first, fp32.embed(&texts, 32).unwrap());
    for vector in &first {
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not normalised: {norm}");
    }
}
