//! The engine benchmark behind `troupe bench engine`: the same workload as the peers in
//! `shared/peers` (end to end, tokenise to normalised vector, one repeated sentence of an
//! exact token count), plus a GEMM probe of the backend's raw matrix speed.

use std::time::{Duration, Instant};

use burn::tensor::{Distribution, Tensor};
use serde::Serialize;

use crate::embedder::Embedder;
use crate::error::ModelError;
use crate::kernels::EncoderBackend;
use crate::tokenizer::SentenceTokenizer;

const WORDS: &str = "the quick brown fox jumps over the lazy dog while a small bird sings \
                     in the old tree near the river bank and children play happily outside";

/// A plain English sentence that tokenises to exactly `tokens` ids ([CLS]/[SEP] included),
/// built as the peers build theirs.
pub fn sentence_with_tokens(
    tokenizer: &SentenceTokenizer,
    tokens: usize,
) -> Result<String, ModelError> {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut sentence: Vec<&str> = Vec::new();
    for index in 0.. {
        let mut candidate = sentence.clone();
        candidate.push(words[index % words.len()]);
        let count = tokenizer.encode(&[candidate.join(" ")])?[0].len();
        if count > tokens || count >= tokenizer.max_seq_length() && count < tokens {
            break;
        }
        sentence = candidate;
        if count == tokens {
            break;
        }
    }
    let text = sentence.join(" ");
    let count = tokenizer.encode(&[text.as_str()])?[0].len();
    if count != tokens {
        return Err(ModelError::Tokenize {
            index: 0,
            reason: format!("cannot build a {tokens}-token sentence (got {count})"),
        });
    }
    Ok(text)
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub tokens: usize,
    pub batch: usize,
    pub reps: usize,
    pub ms_per_batch: f64,
    pub sentences_per_sec: f64,
    pub gflops: f64,
}

/// Times `embed` on `batch` copies of a `tokens`-token sentence for at least `min_time`.
pub fn bench_engine<B: EncoderBackend>(
    embedder: &Embedder<B>,
    tokens: usize,
    batch: usize,
    min_time: Duration,
    max_reps: usize,
) -> Result<EngineResult, ModelError> {
    let sentence = sentence_with_tokens(embedder.tokenizer(), tokens)?;
    let texts = vec![sentence; batch];
    embedder.embed(&texts, batch)?; // warm-up
    let start = Instant::now();
    let mut reps = 0;
    loop {
        embedder.embed(&texts, batch)?;
        reps += 1;
        if start.elapsed() >= min_time || reps >= max_reps {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let sentences_per_sec = (reps * batch) as f64 / seconds;
    Ok(EngineResult {
        tokens,
        batch,
        reps,
        ms_per_batch: 1000.0 * seconds / reps as f64,
        sentences_per_sec,
        gflops: sentences_per_sec * embedder.config().forward_flops(tokens) / 1e9,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmResult {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub reps: usize,
    pub gflops: f64,
}

/// `[m, k] x [k, n]` matmuls on backend `B` for at least `min_time`.
pub fn bench_gemm<B: EncoderBackend>(
    device: &B::Device,
    (m, k, n): (usize, usize, usize),
    min_time: Duration,
) -> GemmResult {
    let lhs = Tensor::<B, 2>::random([m, k], Distribution::Uniform(-1.0, 1.0), device);
    let rhs = Tensor::<B, 2>::random([k, n], Distribution::Uniform(-1.0, 1.0), device);
    let _ = lhs.clone().matmul(rhs.clone()).into_data();
    let start = Instant::now();
    let mut reps = 0;
    while start.elapsed() < min_time {
        let _ = lhs.clone().matmul(rhs.clone()).into_data();
        reps += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    GemmResult {
        m,
        k,
        n,
        reps,
        gflops: 2.0 * (m * k * n) as f64 * reps as f64 / seconds / 1e9,
    }
}
