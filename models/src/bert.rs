//! The BERT encoder: a burn `Module` laid out like Hugging Face's `BertModel` (so
//! safetensors load by name), and [`Encoder`], the inference form built from it with the
//! Q, K and V projections fused into one matrix.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::BertConfig;
use crate::error::ModelError;
use crate::kernels::{generic, Activation, EncoderBackend};

#[derive(Module, Debug)]
pub struct BertModel<B: burn::tensor::backend::Backend> {
    pub embeddings: BertEmbeddings<B>,
    pub encoder: BertEncoder<B>,
}

#[derive(Module, Debug)]
pub struct BertEmbeddings<B: burn::tensor::backend::Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub token_type_embeddings: Embedding<B>,
    pub layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertEncoder<B: burn::tensor::backend::Backend> {
    pub layer: Vec<BertLayer<B>>,
}

#[derive(Module, Debug)]
pub struct BertLayer<B: burn::tensor::backend::Backend> {
    pub attention: BertAttention<B>,
    pub intermediate: BertIntermediate<B>,
    pub output: BertOutput<B>,
}

#[derive(Module, Debug)]
pub struct BertAttention<B: burn::tensor::backend::Backend> {
    /// `attention.self` in the checkpoint (`self` is a Rust keyword).
    pub self_attention: BertSelfAttention<B>,
    pub output: BertOutput<B>,
}

#[derive(Module, Debug)]
pub struct BertSelfAttention<B: burn::tensor::backend::Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
}

#[derive(Module, Debug)]
pub struct BertIntermediate<B: burn::tensor::backend::Backend> {
    pub dense: Linear<B>,
}

/// A projection followed by residual add and layer norm.
#[derive(Module, Debug)]
pub struct BertOutput<B: burn::tensor::backend::Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
}

impl<B: burn::tensor::backend::Backend> BertModel<B> {
    /// An untrained model of this shape; the loader overwrites every parameter.
    pub fn init(config: &BertConfig, device: &B::Device) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let linear = |d_in: usize, d_out: usize| LinearConfig::new(d_in, d_out).init(device);
        let norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let output = |d_in: usize| BertOutput {
            dense: linear(d_in, h),
            layer_norm: norm(),
        };
        let layer = (0..config.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    self_attention: BertSelfAttention {
                        query: linear(h, h),
                        key: linear(h, h),
                        value: linear(h, h),
                    },
                    output: output(h),
                },
                intermediate: BertIntermediate {
                    dense: linear(h, i),
                },
                output: output(i),
            })
            .collect();
        Self {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h).init(device),
                layer_norm: norm(),
            },
            encoder: BertEncoder { layer },
        }
    }
}

/// One layer's parameters in the shapes the kernels want.
#[derive(Debug, Clone)]
struct LayerWeights<B: EncoderBackend> {
    qkv_weight: Tensor<B, 2>,
    qkv_bias: Tensor<B, 1>,
    attention_out: OutputWeights<B>,
    intermediate_weight: Tensor<B, 2>,
    intermediate_bias: Tensor<B, 1>,
    output: OutputWeights<B>,
}

#[derive(Debug, Clone)]
struct OutputWeights<B: EncoderBackend> {
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
}

fn linear_parts<B: EncoderBackend>(linear: &Linear<B>) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let weight = linear.weight.val();
    let bias = match &linear.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([weight.dims()[1]], &weight.device()),
    };
    (weight, bias)
}

fn norm_parts<B: EncoderBackend>(norm: &LayerNorm<B>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let gamma = norm.gamma.val();
    let beta = match &norm.beta {
        Some(beta) => beta.val(),
        None => Tensor::zeros(gamma.dims(), &gamma.device()),
    };
    (gamma, beta)
}

impl<B: EncoderBackend> OutputWeights<B> {
    fn from_module(output: &BertOutput<B>) -> Self {
        let (weight, bias) = linear_parts(&output.dense);
        let (gamma, beta) = norm_parts(&output.layer_norm);
        Self {
            weight,
            bias,
            gamma,
            beta,
        }
    }
}

/// The encoder ready for inference: the loaded weights, with Q/K/V fused.
#[derive(Debug, Clone)]
pub struct Encoder<B: EncoderBackend> {
    config: BertConfig,
    word_embeddings: Tensor<B, 2>,
    position_embeddings: Tensor<B, 2>,
    token_type_embedding: Tensor<B, 1>,
    embedding_norm: (Tensor<B, 1>, Tensor<B, 1>),
    layers: Vec<LayerWeights<B>>,
    device: B::Device,
}

/// A padded batch of token ids.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[batch * seq]`, row-major, padded with 0.
    pub ids: Vec<i64>,
    pub lengths: Vec<usize>,
    pub seq: usize,
}

impl PaddedBatch {
    pub fn new(sequences: &[&[u32]]) -> Self {
        let seq = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; sequences.len() * seq];
        for (row, sequence) in ids.chunks_exact_mut(seq.max(1)).zip(sequences) {
            for (slot, &id) in row.iter_mut().zip(sequence.iter()) {
                *slot = i64::from(id);
            }
        }
        Self {
            ids,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            seq,
        }
    }

    pub fn batch(&self) -> usize {
        self.lengths.len()
    }
}

impl<B: EncoderBackend> Encoder<B> {
    pub fn from_model(config: &BertConfig, model: &BertModel<B>, device: &B::Device) -> Self {
        let embeddings = &model.embeddings;
        let layers = model
            .encoder
            .layer
            .iter()
            .map(|layer| {
                let attention = &layer.attention.self_attention;
                let (wq, bq) = linear_parts(&attention.query);
                let (wk, bk) = linear_parts(&attention.key);
                let (wv, bv) = linear_parts(&attention.value);
                let (intermediate_weight, intermediate_bias) =
                    linear_parts(&layer.intermediate.dense);
                LayerWeights {
                    qkv_weight: Tensor::cat(vec![wq, wk, wv], 1),
                    qkv_bias: Tensor::cat(vec![bq, bk, bv], 0),
                    attention_out: OutputWeights::from_module(&layer.attention.output),
                    intermediate_weight,
                    intermediate_bias,
                    output: OutputWeights::from_module(&layer.output),
                }
            })
            .collect();
        let token_types = embeddings.token_type_embeddings.weight.val();
        let hidden = config.hidden_size;
        Self {
            config: config.clone(),
            word_embeddings: embeddings.word_embeddings.weight.val(),
            position_embeddings: embeddings.position_embeddings.weight.val(),
            token_type_embedding: token_types.slice([0..1, 0..hidden]).reshape([hidden]),
            embedding_norm: norm_parts(&embeddings.layer_norm),
            layers,
            device: device.clone(),
        }
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Mean-pooled, L2-normalised sentence embeddings `[batch, hidden]`, row-major.
    ///
    /// The caller guarantees every id is inside the vocabulary and every sequence fits
    /// `max_seq_length`; the embedder checks both.
    pub fn embed(&self, batch: &PaddedBatch) -> Result<Vec<f32>, ModelError> {
        let hidden_states = self.forward(batch);
        self.pool(hidden_states, &batch.lengths, batch.seq)
    }

    /// The last hidden states `[batch * seq, hidden]`.
    pub fn forward(&self, batch: &PaddedBatch) -> Tensor<B, 2> {
        let (rows, seq, hidden) = (batch.batch(), batch.seq, self.config.hidden_size);
        let heads = self.config.num_attention_heads;
        let epsilon = self.config.layer_norm_eps;
        let ids = Tensor::<B, 1, Int>::from_data(
            TensorData::new(batch.ids.clone(), [rows * seq]),
            &self.device,
        );
        let words = self.word_embeddings.clone().select(0, ids);
        let positions = self
            .position_embeddings
            .clone()
            .slice([0..seq, 0..hidden])
            .add(self.token_type_embedding.clone().unsqueeze::<2>())
            .unsqueeze::<3>()
            .expand([rows, seq, hidden])
            .reshape([rows * seq, hidden]);
        let (gamma, beta) = self.embedding_norm.clone();
        let mut x = generic::layer_norm(words + positions, gamma, beta, epsilon);

        for layer in &self.layers {
            let qkv = B::fused_linear(
                x.clone(),
                layer.qkv_weight.clone(),
                layer.qkv_bias.clone(),
                Activation::None,
            );
            let context = B::fused_self_attention(
                qkv.reshape([rows, seq, 3 * hidden]),
                &batch.lengths,
                heads,
            )
            .reshape([rows * seq, hidden]);
            let out = &layer.attention_out;
            x = B::fused_linear_residual_norm(
                context,
                out.weight.clone(),
                out.bias.clone(),
                x,
                out.gamma.clone(),
                out.beta.clone(),
                epsilon,
            );
            let intermediate = B::fused_linear(
                x.clone(),
                layer.intermediate_weight.clone(),
                layer.intermediate_bias.clone(),
                Activation::Gelu,
            );
            let out = &layer.output;
            x = B::fused_linear_residual_norm(
                intermediate,
                out.weight.clone(),
                out.bias.clone(),
                x,
                out.gamma.clone(),
                out.beta.clone(),
                epsilon,
            );
        }
        x
    }

    /// Mean over real tokens (padding excluded, `[CLS]`/`[SEP]` included), then
    /// `v / max(|v|, 1e-12)`, exactly as sentence-transformers' Pooling + Normalize.
    fn pool(
        &self,
        hidden_states: Tensor<B, 2>,
        lengths: &[usize],
        seq: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let rows = lengths.len();
        let hidden = self.config.hidden_size;
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&length| (0..seq).map(move |p| if p < length { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [rows, seq, 1]), &self.device);
        let counts: Vec<f32> = lengths.iter().map(|&l| (l as f32).max(1e-9)).collect();
        let counts = Tensor::<B, 2>::from_data(TensorData::new(counts, [rows, 1]), &self.device);
        let summed = (hidden_states.reshape([rows, seq, hidden]) * mask)
            .sum_dim(1)
            .reshape([rows, hidden]);
        let mean = summed / counts;
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        let normalised = mean / norm;
        normalised
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|error| ModelError::Backend {
                reason: format!("cannot read embeddings back: {error:?}"),
            })
    }
}
