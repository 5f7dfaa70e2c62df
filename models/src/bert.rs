//! The BERT encoder: a burn `Module` laid out like Hugging Face's `BertModel` (so
//! safetensors load by name), and [`Encoder`], the inference form built from it with the
//! Q, K and V projections fused into one matrix, and its linear layers in fp32 or int8.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::BertConfig;
use crate::error::ModelError;
use crate::kernels::int8::QuantizedWeight;
use crate::kernels::packed::PackedWeight;
use crate::kernels::{generic, Activation, EncoderBackend, HostWeight};
use crate::precision::Precision;

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

/// A linear layer's weight `[in, out]`, in the precision and form the encoder runs it in.
#[derive(Debug, Clone)]
enum LinearWeight<B: EncoderBackend> {
    /// fp32 as a backend tensor (backends that do not pack, such as CUDA).
    Tensor(Tensor<B, 2>),
    /// fp32 packed for the host GEMM ([`EncoderBackend::PACKS_WEIGHTS`]).
    Packed(Arc<PackedWeight>),
    Int8(Arc<QuantizedWeight>),
}

/// A weight tensor's values on the host, for packing or quantising it.
fn host_values<B: EncoderBackend>(
    weight: Tensor<B, 2>,
    name: &str,
) -> Result<Vec<f32>, ModelError> {
    weight
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|error| ModelError::Backend {
            reason: format!("cannot read weight {name}: {error:?}"),
        })
}

impl<B: EncoderBackend> LinearWeight<B> {
    fn new(weight: Tensor<B, 2>, precision: Precision, name: &str) -> Result<Self, ModelError> {
        let [inner, outer] = weight.dims();
        match precision {
            Precision::Fp32 if !B::PACKS_WEIGHTS => Ok(Self::Tensor(weight)),
            Precision::Fp32 => Ok(Self::Packed(Arc::new(PackedWeight::pack(
                &host_values(weight, name)?,
                inner,
                outer,
            )))),
            Precision::Int8 => {
                let values = host_values(weight, name)?;
                let quantized =
                    QuantizedWeight::quantize(&values, inner, outer).map_err(|error| {
                        ModelError::Backend {
                            reason: format!("cannot quantise weight {name} to int8: {error}"),
                        }
                    })?;
                Ok(Self::Int8(Arc::new(quantized)))
            }
        }
    }

    /// The weight for the host kernels, unless it is a backend tensor.
    fn host(&self) -> Option<HostWeight<'_>> {
        match self {
            Self::Tensor(_) => None,
            Self::Packed(weight) => Some(HostWeight::Packed(weight)),
            Self::Int8(weight) => Some(HostWeight::Int8(weight)),
        }
    }

    /// `activation(x @ W + bias)`.
    fn linear(&self, x: Tensor<B, 2>, bias: Tensor<B, 1>, activation: Activation) -> Tensor<B, 2> {
        match (self, self.host()) {
            (_, Some(weight)) => B::host_linear(x, weight, bias, activation),
            (Self::Tensor(weight), None) => B::fused_linear(x, weight.clone(), bias, activation),
            (_, None) => unreachable!("only a tensor weight has no host form"),
        }
    }
}

/// One layer's parameters in the shapes the kernels want.
#[derive(Debug, Clone)]
struct LayerWeights<B: EncoderBackend> {
    qkv_weight: LinearWeight<B>,
    qkv_bias: Tensor<B, 1>,
    attention_out: OutputWeights<B>,
    intermediate_weight: LinearWeight<B>,
    intermediate_bias: Tensor<B, 1>,
    output: OutputWeights<B>,
}

#[derive(Debug, Clone)]
struct OutputWeights<B: EncoderBackend> {
    weight: LinearWeight<B>,
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
    fn from_module(
        output: &BertOutput<B>,
        precision: Precision,
        name: &str,
    ) -> Result<Self, ModelError> {
        let (weight, bias) = linear_parts(&output.dense);
        let (gamma, beta) = norm_parts(&output.layer_norm);
        Ok(Self {
            weight: LinearWeight::new(weight, precision, name)?,
            bias,
            gamma,
            beta,
        })
    }

    /// `layer_norm(x @ W + bias + residual)`.
    fn apply(&self, x: Tensor<B, 2>, residual: Tensor<B, 2>, epsilon: f64) -> Tensor<B, 2> {
        let (bias, gamma, beta) = (self.bias.clone(), self.gamma.clone(), self.beta.clone());
        match (&self.weight, self.weight.host()) {
            (_, Some(weight)) => {
                B::host_linear_residual_norm(x, weight, bias, residual, gamma, beta, epsilon)
            }
            (LinearWeight::Tensor(weight), None) => B::fused_linear_residual_norm(
                x,
                weight.clone(),
                bias,
                residual,
                gamma,
                beta,
                epsilon,
            ),
            (_, None) => unreachable!("only a tensor weight has no host form"),
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
    precision: Precision,
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
    /// The encoder with its linear layers in `precision`; int8 quantises every projection
    /// here, once.
    pub fn from_model_with_precision(
        config: &BertConfig,
        model: &BertModel<B>,
        device: &B::Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let embeddings = &model.embeddings;
        let layers = model
            .encoder
            .layer
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                let attention = &layer.attention.self_attention;
                let (wq, bq) = linear_parts(&attention.query);
                let (wk, bk) = linear_parts(&attention.key);
                let (wv, bv) = linear_parts(&attention.value);
                let (intermediate_weight, intermediate_bias) =
                    linear_parts(&layer.intermediate.dense);
                let name = |part: &str| format!("encoder.layer.{index}.{part}");
                Ok(LayerWeights {
                    qkv_weight: LinearWeight::new(
                        Tensor::cat(vec![wq, wk, wv], 1),
                        precision,
                        &name("attention.self.qkv"),
                    )?,
                    qkv_bias: Tensor::cat(vec![bq, bk, bv], 0),
                    attention_out: OutputWeights::from_module(
                        &layer.attention.output,
                        precision,
                        &name("attention.output.dense"),
                    )?,
                    intermediate_weight: LinearWeight::new(
                        intermediate_weight,
                        precision,
                        &name("intermediate.dense"),
                    )?,
                    intermediate_bias,
                    output: OutputWeights::from_module(
                        &layer.output,
                        precision,
                        &name("output.dense"),
                    )?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let token_types = embeddings.token_type_embeddings.weight.val();
        let hidden = config.hidden_size;
        Ok(Self {
            config: config.clone(),
            word_embeddings: embeddings.word_embeddings.weight.val(),
            position_embeddings: embeddings.position_embeddings.weight.val(),
            token_type_embedding: token_types.slice([0..1, 0..hidden]).reshape([hidden]),
            embedding_norm: norm_parts(&embeddings.layer_norm),
            layers,
            precision,
            device: device.clone(),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
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
            let qkv = layer
                .qkv_weight
                .linear(x.clone(), layer.qkv_bias.clone(), Activation::None);
            let context = B::fused_self_attention(
                qkv.reshape([rows, seq, 3 * hidden]),
                &batch.lengths,
                heads,
            )
            .reshape([rows * seq, hidden]);
            x = layer.attention_out.apply(context, x, epsilon);
            let intermediate = layer.intermediate_weight.linear(
                x.clone(),
                layer.intermediate_bias.clone(),
                Activation::Gelu,
            );
            x = layer.output.apply(intermediate, x, epsilon);
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
