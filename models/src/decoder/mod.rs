//! The serving decoder: SmolLM2 (Llama) with its weights kept quantised, stepping many
//! sequences at once over a paged KV cache.
//!
//! One [`QuantLlama::step`] runs a ragged batch: each sequence brings its new tokens (a chunk
//! of its prompt, or the one token it sampled last) and its block table. The projections run
//! once for all the step's tokens, so the weights are read once per step however many
//! sequences share it; attention runs per sequence over its own cached positions.
//!
//! The math is [`crate::llama`]'s (the burn reference path): RMSNorm, RoPE in llama.cpp's
//! "normal" pair order, grouped-query attention, SwiGLU, tied output. Here the projections
//! are [`QMatrix`] kernels that dequantise inside the product and accumulate in f32.

pub mod paged;
pub mod qmatrix;

use std::path::Path;

use rayon::prelude::*;

use crate::bpe::Bpe;
use crate::chat::{ChatTemplate, Message};
use crate::generate::{Decoding, Generation, SamplingParams};
use crate::gguf::{GgufError, GgufFile};
use crate::llama::LlamaConfig;
pub use paged::KvPool;
pub use qmatrix::{QKind, QMatrix};

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The new tokens: positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Tokens already in the cache.
    pub start: usize,
    /// The sequence's blocks, covering at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Return the logits of the last new token.
    pub logits: bool,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked: `[d + 2 * kv, d]`.
    qkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked: `[2 * ffn, d]`.
    gate_up: QMatrix,
    down: QMatrix,
}

/// The decoder's weights, quantised as the GGUF stores them.
pub struct QuantLlama {
    config: LlamaConfig,
    embeddings: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `output.weight`, or the token embeddings when they are tied.
    output: Option<QMatrix>,
    /// cos and sin of `position * base^(-2i / head_dim)`, `[context, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

impl std::fmt::Debug for QuantLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantLlama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QuantLlama {
    pub fn load(file: &GgufFile) -> Result<Self, GgufError> {
        let config = LlamaConfig::from_gguf(file)?;
        let c = &config;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix, GgufError> {
            let info = file.tensor(name).ok_or_else(|| GgufError::Tensor {
                path: file.path().to_owned(),
                name: name.to_owned(),
                problem: "missing".into(),
            })?;
            if info.shape() != [rows, cols] {
                return Err(GgufError::Tensor {
                    path: file.path().to_owned(),
                    name: name.to_owned(),
                    problem: format!("{:?}, the config wants {:?}", info.shape(), [rows, cols]),
                });
            }
            Ok(QMatrix::from_ggml(
                info.ggml_type,
                file.data(info),
                rows,
                cols,
            ))
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, GgufError> {
            let info = file.tensor(name).ok_or_else(|| GgufError::Tensor {
                path: file.path().to_owned(),
                name: name.to_owned(),
                problem: "missing".into(),
            })?;
            if info.shape() != [n] {
                return Err(GgufError::Tensor {
                    path: file.path().to_owned(),
                    name: name.to_owned(),
                    problem: format!("{:?}, the config wants [{n}]", info.shape()),
                });
            }
            Ok(file.dequantize(info))
        };
        let stacked = |parts: Vec<QMatrix>, what: &str| {
            QMatrix::stack(&parts).ok_or_else(|| GgufError::Unsupported {
                path: file.path().to_owned(),
                reason: format!("the {what} projections are stored in different types"),
            })
        };
        let kv = c.kv_heads * c.head_dim;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"), c.d_model)?,
                qkv: stacked(
                    vec![
                        matrix(&p("attn_q"), c.d_model, c.d_model)?,
                        matrix(&p("attn_k"), kv, c.d_model)?,
                        matrix(&p("attn_v"), kv, c.d_model)?,
                    ],
                    "Q, K and V",
                )?,
                wo: matrix(&p("attn_output"), c.d_model, c.d_model)?,
                ffn_norm: vector(&p("ffn_norm"), c.d_model)?,
                gate_up: stacked(
                    vec![
                        matrix(&p("ffn_gate"), c.ffn, c.d_model)?,
                        matrix(&p("ffn_up"), c.ffn, c.d_model)?,
                    ],
                    "gate and up",
                )?,
                down: matrix(&p("ffn_down"), c.d_model, c.ffn)?,
            });
        }
        let embeddings = matrix("token_embd.weight", c.vocab, c.d_model)?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(matrix("output.weight", c.vocab, c.d_model)?),
            None => None,
        };
        let half = c.head_dim / 2;
        let (mut rope_cos, mut rope_sin) = (
            Vec::with_capacity(c.context * half),
            Vec::with_capacity(c.context * half),
        );
        for position in 0..c.context {
            for i in 0..half {
                let angle = position as f64 * c.rope_base.powf(-2.0 * i as f64 / c.head_dim as f64);
                rope_cos.push(angle.cos() as f32);
                rope_sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            output_norm: vector("output_norm.weight", c.d_model)?,
            config,
            embeddings,
            layers,
            output,
            rope_cos,
            rope_sin,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Floats of keys (and as many of values) per token per layer.
    pub fn kv_width(&self) -> usize {
        self.config.kv_heads * self.config.head_dim
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes()
                    + l.wo.bytes()
                    + l.gate_up.bytes()
                    + l.down.bytes()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        layers + self.embeddings.bytes() + self.output.as_ref().map_or(0, QMatrix::bytes)
    }

    /// A KV pool for this model: `blocks` blocks of `block_size` tokens.
    pub fn new_pool(&self, block_size: usize, blocks: usize) -> KvPool {
        KvPool::new(self.config.layers, self.kv_width(), block_size, blocks)
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], out: &mut [f32]) {
        let d = weight.len();
        for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (mean_square + self.config.rms_eps as f32).sqrt();
            for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
                *o = v * inv * w;
            }
        }
    }

    /// Rotates each head of `x` (`heads × head_dim` floats) for `position`.
    fn rope(&self, x: &mut [f32], position: usize) {
        let half = self.config.head_dim / 2;
        let cos = &self.rope_cos[position * half..][..half];
        let sin = &self.rope_sin[position * half..][..half];
        for head in x.chunks_exact_mut(self.config.head_dim) {
            for i in 0..half {
                let (even, odd) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = even * cos[i] - odd * sin[i];
                head[2 * i + 1] = even * sin[i] + odd * cos[i];
            }
        }
    }

    /// Runs one step: appends every sequence's new tokens to its cache in `pool` and returns,
    /// for each sequence that asked, the logits of its last new token (in `steps` order).
    ///
    /// # Panics
    /// If a sequence's positions run past the model's context or its block table (the
    /// scheduler sizes both), or a token id is outside the vocabulary.
    pub fn step(&self, pool: &mut KvPool, steps: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (d, kv) = (c.d_model, self.kv_width());
        // Each new token: its sequence and its position.
        let mut owner = Vec::new();
        for (s, step) in steps.iter().enumerate() {
            assert!(
                step.start + step.tokens.len() <= c.context,
                "positions past the context"
            );
            for i in 0..step.tokens.len() {
                owner.push((s, step.start + i));
            }
        }
        let n = owner.len();
        if n == 0 {
            return Vec::new();
        }
        let mut x = vec![0f32; n * d];
        for (row, &id) in x
            .chunks_exact_mut(d)
            .zip(steps.iter().flat_map(|s| s.tokens.iter()))
        {
            assert!(
                (id as usize) < c.vocab,
                "token id {id} is outside the vocabulary"
            );
            self.embeddings.row(id as usize, row);
        }
        let qkv_width = d + 2 * kv;
        let (mut h, mut qkv, mut context, mut proj) = (
            vec![0f32; n * d],
            vec![0f32; n * qkv_width],
            vec![0f32; n * d],
            vec![0f32; n * d],
        );
        let mut gate_up = vec![0f32; n * 2 * c.ffn];
        let mut act = vec![0f32; n * c.ffn];
        for (l, layer) in self.layers.iter().enumerate() {
            self.rms_norm(&x, &layer.attn_norm, &mut h);
            layer.qkv.matmul(&h, n, &mut qkv);
            for (row, &(s, position)) in qkv.chunks_exact_mut(qkv_width).zip(&owner) {
                let (q, rest) = row.split_at_mut(d);
                let (k, v) = rest.split_at_mut(kv);
                self.rope(q, position);
                self.rope(k, position);
                pool.store(l, steps[s].blocks, position, k, v);
            }
            self.attention(pool, l, steps, &owner, &qkv, &mut context);
            layer.wo.matmul(&context, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            self.rms_norm(&x, &layer.ffn_norm, &mut h);
            layer.gate_up.matmul(&h, n, &mut gate_up);
            for (row, out) in gate_up
                .chunks_exact(2 * c.ffn)
                .zip(act.chunks_exact_mut(c.ffn))
            {
                let (gate, up) = row.split_at(c.ffn);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
            layer.down.matmul(&act, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        // The last new token of each sequence that wants logits.
        let mut wanted = Vec::new();
        let mut end = 0;
        for step in steps {
            end += step.tokens.len();
            if step.logits && !step.tokens.is_empty() {
                wanted.push(end - 1);
            }
        }
        let mut last = vec![0f32; wanted.len() * d];
        for (dst, &row) in last.chunks_exact_mut(d).zip(&wanted) {
            self.rms_norm(&x[row * d..][..d], &self.output_norm, dst);
        }
        let output = self.output.as_ref().unwrap_or(&self.embeddings);
        let mut logits = vec![0f32; wanted.len() * c.vocab];
        output.matmul(&last, wanted.len(), &mut logits);
        logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect()
    }

    /// Causal grouped-query attention of every new token over its sequence's cache.
    fn attention(
        &self,
        pool: &KvPool,
        layer: usize,
        steps: &[SeqStep<'_>],
        owner: &[(usize, usize)],
        qkv: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (d, hd) = (c.d_model, c.head_dim);
        let qkv_width = d + 2 * self.kv_width();
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let work = |(index, out): (usize, &mut [f32])| {
            let (t, head) = (index / c.heads, index % c.heads);
            let (s, position) = owner[t];
            let table = steps[s].blocks;
            let q = &qkv[t * qkv_width + head * hd..][..hd];
            let kv_head = head / group;
            let mut scores = Vec::with_capacity(position + 1);
            let mut max = f32::NEG_INFINITY;
            for p in 0..=position {
                let (k, _) = pool.read(layer, table, p);
                let score = dot(q, &k[kv_head * hd..][..hd]) * scale;
                max = max.max(score);
                scores.push(score);
            }
            let mut total = 0.0;
            for score in &mut scores {
                *score = (*score - max).exp();
                total += *score;
            }
            out.fill(0.0);
            for (p, weight) in scores.iter().enumerate() {
                let (_, v) = pool.read(layer, table, p);
                let weight = weight / total;
                for (o, v) in out.iter_mut().zip(&v[kv_head * hd..][..hd]) {
                    *o += weight * v;
                }
            }
        };
        let heads = out.chunks_exact_mut(hd).enumerate();
        let cost: usize = owner.iter().map(|&(_, p)| p + 1).sum::<usize>() * c.heads * hd;
        if cost < 1 << 15 {
            heads.for_each(work);
        } else {
            out.par_chunks_exact_mut(hd)
                .enumerate()
                .with_min_len(4)
                .for_each(work);
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            lanes[j] += ca[j] * cb[j];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// A decoder model as a node serves it: the weights, the tokenizer and the chat template,
/// from one GGUF file.
pub struct Decoder {
    pub model: QuantLlama,
    pub tokenizer: Bpe,
    pub chat: Option<ChatTemplate>,
    /// The file's name (the model of record).
    pub file_name: String,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("file_name", &self.file_name)
            .field("config", self.model.config())
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// Loads `path`: a GGUF file, or a directory holding exactly one.
    pub fn load(path: &Path) -> Result<Self, GgufError> {
        let path = crate::generate::gguf_in(path)?;
        let file = GgufFile::open(&path)?;
        let tokenizer = Bpe::from_gguf(&file)?;
        let token_text = |key: &str| {
            file.get_u64(key)
                .ok()
                .and_then(|id| tokenizer.token(id as u32))
                .unwrap_or_default()
                .to_owned()
        };
        let chat = match file
            .metadata()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
        {
            Some(source) => Some(
                ChatTemplate::new(
                    source,
                    &token_text("tokenizer.ggml.bos_token_id"),
                    &token_text("tokenizer.ggml.eos_token_id"),
                )
                .map_err(|reason| GgufError::Unsupported {
                    path: path.clone(),
                    reason,
                })?,
            ),
            None => None,
        };
        Ok(Self {
            model: QuantLlama::load(&file)?,
            tokenizer,
            chat,
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }

    /// The prompt text for a conversation, through the model's chat template.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, String> {
        match &self.chat {
            Some(template) => template.render(messages, true),
            None => Err(format!(
                "{} carries no chat template (tokenizer.chat_template): send a raw prompt instead",
                self.file_name
            )),
        }
    }
}

impl Decoder {
    /// Generates from `prompt_ids` alone (no batching): for the command line and warm-up.
    /// `on_token` sees each token as it is made.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation, String> {
        let context = self.model.config().context;
        let total = prompt_ids.len() + params.max_tokens;
        if prompt_ids.is_empty() || total > context {
            return Err(format!(
                "a prompt of {} tokens plus max_tokens {} must be 1..={context} tokens (the model's context)",
                prompt_ids.len(),
                params.max_tokens
            ));
        }
        let mut pool = self
            .model
            .new_pool(BLOCK_TOKENS, total.div_ceil(BLOCK_TOKENS));
        let blocks = pool
            .allocate(pool.total_blocks())
            .expect("a pool sized for the sequence");
        let mut decoding = Decoding::new(params.clone(), self.model.config().eos);
        let (mut input, mut start) = (prompt_ids.to_vec(), 0);
        loop {
            let logits = self.model.step(
                &mut pool,
                &[SeqStep {
                    tokens: &input,
                    start,
                    blocks: &blocks,
                    logits: true,
                }],
            );
            start += input.len();
            let emitted = decoding.next(&logits[0], &self.tokenizer);
            if let Some(token) = emitted.token {
                on_token(token);
                input = vec![token];
            }
            if emitted.finish.is_some() {
                break;
            }
        }
        Ok(decoding.into_generation(&self.tokenizer))
    }
}

/// Tokens per KV block.
pub const BLOCK_TOKENS: usize = 16;
