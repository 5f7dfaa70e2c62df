//! The Llama decoder (SmolLM2) from a GGUF file, in plain burn tensor ops, so every burn
//! backend runs it.
//!
//! Per layer: RMSNorm, then Q, K and V; rotary position embedding in llama.cpp's "normal"
//! mode (the pairs (2i, 2i+1) of each head, angle `pos * base^(-2i/head_dim)`); grouped-query
//! attention, causal over the sequence's cache; the output projection and the residual;
//! RMSNorm, SwiGLU (`down(silu(gate(x)) * up(x))`) and the residual. Then a final RMSNorm, and
//! the logits against the token embeddings (tied) or `output.weight`.
//!
//! This is the reference path: weights dequantised to f32 at load, f32 throughout. The fused
//! kernels that keep the weights quantised are hooks over it, as the encoder's are.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, Bool, Int, Tensor, TensorData};

use crate::gguf::{GgufError, GgufFile};

/// The shape of a Llama model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub bos: Option<u32>,
    pub eos: u32,
}

impl LlamaConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, GgufError> {
        let architecture = file.get_str("general.architecture")?;
        let bad = |reason: String| GgufError::Unsupported {
            path: file.path().to_owned(),
            reason,
        };
        if architecture != "llama" {
            return Err(bad(format!(
                "general.architecture is {architecture:?}; troupe's decoder runs \"llama\""
            )));
        }
        let int = |key: &str| file.get_u64(key).map(|v| v as usize);
        let (d_model, heads) = (
            int("llama.embedding_length")?,
            int("llama.attention.head_count")?,
        );
        let kv_heads = match file.metadata().get("llama.attention.head_count_kv") {
            Some(_) => int("llama.attention.head_count_kv")?,
            None => heads,
        };
        if heads == 0 || kv_heads == 0 || d_model % heads != 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} attention heads over {kv_heads} KV heads and a width of {d_model} do not divide"
            )));
        }
        let head_dim = d_model / heads;
        let rope_dims = match file.metadata().get("llama.rope.dimension_count") {
            Some(_) => int("llama.rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dims != head_dim || head_dim % 2 != 0 {
            return Err(bad(format!(
                "rotary embedding over {rope_dims} of {head_dim} head dimensions; troupe rotates whole, even heads"
            )));
        }
        let vocab = file.get_strings("tokenizer.ggml.tokens")?.len();
        let bos = match file.metadata().get("tokenizer.ggml.bos_token_id") {
            Some(_) => Some(file.get_u64("tokenizer.ggml.bos_token_id")? as u32),
            None => None,
        };
        Ok(Self {
            layers: int("llama.block_count")?,
            d_model,
            heads,
            kv_heads,
            head_dim,
            ffn: int("llama.feed_forward_length")?,
            vocab,
            context: int("llama.context_length")?,
            rope_base: match file.metadata().get("llama.rope.freq_base") {
                Some(_) => file.get_f64("llama.rope.freq_base")?,
                None => 10_000.0,
            },
            rms_eps: file.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            bos,
            eos: file.get_u64("tokenizer.ggml.eos_token_id")? as u32,
        })
    }
}

/// One layer's weights; matrices are `[in, out]` so that `x.matmul(w)` projects.
#[derive(Debug, Clone)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 1>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
}

/// The decoder, its weights dequantised to f32.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    config: LlamaConfig,
    /// `[vocab, d_model]`.
    embeddings: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    output_norm: Tensor<B, 1>,
    /// `[d_model, vocab]`.
    output: Tensor<B, 2>,
    device: B::Device,
}

/// One sequence's keys and values so far: per layer `[1, kv_heads, tokens, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    keys: Vec<Option<Tensor<B, 4>>>,
    values: Vec<Option<Tensor<B, 4>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<B: Backend> Llama<B> {
    /// Loads the decoder from `file`.
    pub fn load(file: &GgufFile, device: &B::Device) -> Result<Self, GgufError> {
        let config = LlamaConfig::from_gguf(file)?;
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, GgufError> {
            let info = file.tensor(name).ok_or_else(|| GgufError::Tensor {
                path: file.path().to_owned(),
                name: name.to_owned(),
                problem: "missing".into(),
            })?;
            if info.shape() != shape {
                return Err(GgufError::Tensor {
                    path: file.path().to_owned(),
                    name: name.to_owned(),
                    problem: format!("{:?}, the config wants {shape:?}", info.shape()),
                });
            }
            Ok(file.dequantize(info))
        };
        let vector = |name: &str, n: usize| -> Result<Tensor<B, 1>, GgufError> {
            Ok(Tensor::from_data(
                TensorData::new(tensor(name, &[n])?, [n]),
                device,
            ))
        };
        // GGUF stores a projection as [out, in] (outermost first); transposed once here.
        let matrix = |name: &str, out: usize, inp: usize| -> Result<Tensor<B, 2>, GgufError> {
            let data = tensor(name, &[out, inp])?;
            Ok(Tensor::<B, 2>::from_data(TensorData::new(data, [out, inp]), device).transpose())
        };
        let c = &config;
        let kv = c.kv_heads * c.head_dim;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"), c.d_model)?,
                wq: matrix(&p("attn_q"), c.d_model, c.d_model)?,
                wk: matrix(&p("attn_k"), kv, c.d_model)?,
                wv: matrix(&p("attn_v"), kv, c.d_model)?,
                wo: matrix(&p("attn_output"), c.d_model, c.d_model)?,
                ffn_norm: vector(&p("ffn_norm"), c.d_model)?,
                gate: matrix(&p("ffn_gate"), c.ffn, c.d_model)?,
                up: matrix(&p("ffn_up"), c.ffn, c.d_model)?,
                down: matrix(&p("ffn_down"), c.d_model, c.ffn)?,
            });
        }
        let embeddings = Tensor::<B, 2>::from_data(
            TensorData::new(
                tensor("token_embd.weight", &[c.vocab, c.d_model])?,
                [c.vocab, c.d_model],
            ),
            device,
        );
        let output = match file.tensor("output.weight") {
            Some(_) => matrix("output.weight", c.vocab, c.d_model)?,
            None => embeddings.clone().transpose(),
        };
        Ok(Self {
            output_norm: vector("output_norm.weight", c.d_model)?,
            config,
            embeddings,
            layers,
            output,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache {
            keys: vec![None; self.config.layers],
            values: vec![None; self.config.layers],
            len: 0,
        }
    }

    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 1>) -> Tensor<B, 2> {
        let mean_square = x.clone().powf_scalar(2.0).mean_dim(1);
        x * (mean_square + self.config.rms_eps).sqrt().recip() * weight.clone().unsqueeze::<2>()
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`) for positions `start..start + tokens`.
    fn rope(&self, x: Tensor<B, 3>, start: usize) -> Tensor<B, 3> {
        let [tokens, heads, head_dim] = x.dims();
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for t in 0..tokens {
            let position = (start + t) as f64;
            for i in 0..half {
                let angle = position
                    * self
                        .config
                        .rope_base
                        .powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 3>::from_data(TensorData::new(v, [tokens, 1, half]), &self.device)
                .expand([tokens, heads, half])
        };
        let (cos, sin) = (table(cos), table(sin));
        let pairs = x.reshape([tokens, heads, half, 2]);
        let even = pairs
            .clone()
            .slice([0..tokens, 0..heads, 0..half, 0..1])
            .reshape([tokens, heads, half]);
        let odd = pairs
            .slice([0..tokens, 0..heads, 0..half, 1..2])
            .reshape([tokens, heads, half]);
        let rotated_even = even.clone() * cos.clone() - odd.clone() * sin.clone();
        let rotated_odd = even * sin + odd * cos;
        Tensor::stack::<4>(vec![rotated_even, rotated_odd], 3).reshape([tokens, heads, head_dim])
    }

    /// Runs `ids` after what `cache` holds, appends their keys and values to it, and returns
    /// the logits of every new position, `[ids.len(), vocab]`.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let c = &self.config;
        let (tokens, start) = (ids.len(), cache.len);
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [tokens]),
            &self.device,
        );
        let mut x = self.embeddings.clone().select(0, index);
        let group = c.heads / c.kv_heads;
        let total = start + tokens;
        // A query at position start + i sees keys 0..=start + i: true marks what it may not see.
        let hidden: Vec<bool> = (0..tokens)
            .flat_map(|i| (0..total).map(move |j| j > start + i))
            .collect();
        let mask =
            Tensor::<B, 2, Bool>::from_data(TensorData::new(hidden, [tokens, total]), &self.device)
                .reshape([1, 1, tokens, total])
                .expand([1, c.heads, tokens, total]);
        let options = AttentionModuleOptions {
            scale: Some(1.0 / (c.head_dim as f64).sqrt()),
            softcap: None,
            is_causal: false,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &layer.attn_norm);
            let q = h
                .clone()
                .matmul(layer.wq.clone())
                .reshape([tokens, c.heads, c.head_dim]);
            let k = h
                .clone()
                .matmul(layer.wk.clone())
                .reshape([tokens, c.kv_heads, c.head_dim]);
            let v = h
                .matmul(layer.wv.clone())
                .reshape([tokens, c.kv_heads, c.head_dim]);
            let q = self.rope(q, start).swap_dims(0, 1).unsqueeze::<4>();
            let k = self.rope(k, start).swap_dims(0, 1).unsqueeze::<4>();
            let v = v.swap_dims(0, 1).unsqueeze::<4>();
            let k = match cache.keys[l].take() {
                Some(past) => Tensor::cat(vec![past, k], 2),
                None => k,
            };
            let v = match cache.values[l].take() {
                Some(past) => Tensor::cat(vec![past, v], 2),
                None => v,
            };
            cache.keys[l] = Some(k.clone());
            cache.values[l] = Some(v.clone());
            // Each KV head serves `group` query heads: query head h reads KV head h / group.
            let widen = |t: Tensor<B, 4>| {
                t.reshape([1, c.kv_heads, 1, total, c.head_dim])
                    .expand([1, c.kv_heads, group, total, c.head_dim])
                    .reshape([1, c.heads, total, c.head_dim])
            };
            let context = attention(q, widen(k), widen(v), Some(mask.clone()), None, options)
                .reshape([c.heads, tokens, c.head_dim])
                .swap_dims(0, 1)
                .reshape([tokens, c.d_model]);
            x = x + context.matmul(layer.wo.clone());
            let h = self.rms_norm(x.clone(), &layer.ffn_norm);
            let gated =
                activation::silu(h.clone().matmul(layer.gate.clone())) * h.matmul(layer.up.clone());
            x = x + gated.matmul(layer.down.clone());
        }
        cache.len = total;
        self.rms_norm(x, &self.output_norm)
            .matmul(self.output.clone())
    }
}
