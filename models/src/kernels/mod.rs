//! The encoder's hot operations as backend hooks.
//!
//! [`EncoderBackend`] lists the few fused operations a BERT layer needs. Every method has a
//! default written with plain burn tensor ops ([`generic`]), which is what GPU backends use.
//! The CPU backend (`Flex`) overrides them with fused, vectorised, multi-threaded kernels
//! ([`cpu`]): a GEMM with its bias and GELU applied in the same pass, residual add fused
//! into layer norm, and attention that reads Q, K and V straight out of the QKV projection
//! and never computes a padded key.
//!
//! The int8 linear layers ([`int8`], [`int8_tiles`]) run on the host CPU whatever the
//! backend: the default hooks copy the activations to host memory and back, which `Flex`
//! skips.

pub mod cpu;
pub mod generic;
pub mod int8;
pub mod int8_tiles;
pub mod math;
pub mod packed;
pub mod pool;

use int8::QuantizedWeight;
use packed::PackedWeight;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// What to apply to a linear layer's output in the same pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Gelu,
}

/// What a GEMM driver runs on finished output rows while they are in cache.
pub enum Epilogue<'a> {
    /// `activation(row + bias)`.
    Bias(&'a [f32], Activation),
    /// `layer_norm(row + bias + residual)`.
    ResidualNorm {
        bias: &'a [f32],
        residual: &'a [f32],
        gamma: &'a [f32],
        beta: &'a [f32],
        epsilon: f32,
    },
}

/// Rows per task when an epilogue runs as a step of its own.
const EPILOGUE_ROWS_PER_TASK: usize = 16;

impl Epilogue<'_> {
    /// Runs on whole output rows `first_row..`, `rows.len() / width` of them.
    pub(crate) fn apply(&self, rows: &mut [f32], first_row: usize, width: usize) {
        match *self {
            Epilogue::Bias(bias, Activation::None) => cpu::bias_rows_simd(rows, bias),
            Epilogue::Bias(bias, Activation::Gelu) => cpu::bias_gelu_rows_simd(rows, bias),
            Epilogue::ResidualNorm {
                bias,
                residual,
                gamma,
                beta,
                epsilon,
            } => {
                let residual = &residual[first_row * width..first_row * width + rows.len()];
                cpu::residual_layer_norm_rows_simd(rows, residual, bias, gamma, beta, epsilon);
            }
        }
    }

    /// Panics unless the epilogue fits `[rows, width]` outputs.
    fn check(&self, rows: usize, width: usize) {
        let vectors: &[&[f32]] = match self {
            Epilogue::Bias(bias, _) => &[bias],
            Epilogue::ResidualNorm {
                bias,
                gamma,
                beta,
                residual,
                ..
            } => {
                assert_eq!(
                    residual.len(),
                    rows * width,
                    "residual shape differs from output"
                );
                &[bias, gamma, beta]
            }
        };
        assert!(
            vectors.iter().all(|vector| vector.len() == width),
            "bias, gamma or beta length differs from the weight's outputs"
        );
    }

    /// [`Self::apply`] on every row of `out` (`[rows, width]`), in row blocks on the encoder
    /// pool.
    pub(crate) fn apply_in_parallel(&self, out: &mut [f32], width: usize) {
        let block = EPILOGUE_ROWS_PER_TASK * width;
        let len = out.len();
        let shared = pool::SharedSlice::new(out);
        pool::run(len.div_ceil(block), |task| {
            let start = task * block;
            // SAFETY: task `t` alone takes elements t*block..(t+1)*block.
            let rows = unsafe { shared.range(start..(start + block).min(len)) };
            self.apply(rows, task * EPILOGUE_ROWS_PER_TASK, width);
        });
    }
}

/// A burn backend that can run the encoder, with optional fused versions of its hot ops.
pub trait EncoderBackend: Backend {
    /// `x @ weight + bias`, then `activation`. `x` is `[rows, in]`, `weight` `[in, out]`.
    fn fused_linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        generic::linear(x, weight, bias, activation)
    }

    /// `layer_norm(x @ weight + bias + residual)`: a BERT sub-layer's output projection.
    #[allow(clippy::too_many_arguments)]
    fn fused_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        generic::linear_residual_layer_norm(x, weight, bias, residual, gamma, beta, epsilon)
    }

    /// Multi-head self-attention over a fused QKV projection.
    ///
    /// `qkv` is `[batch, seq, 3 * hidden]` (queries, keys, values side by side);
    /// `lengths[b]` is the number of real tokens of row `b`, the rest is padding.
    /// Returns the context `[batch, seq, hidden]`. Rows past a sequence's length are
    /// padding: their values are unspecified and must not be read.
    fn fused_self_attention(
        qkv: Tensor<Self, 3>,
        lengths: &[usize],
        heads: usize,
    ) -> Tensor<Self, 3> {
        generic::self_attention(qkv, lengths, heads)
    }

    /// Whether the encoder should pack its fp32 linear weights for [`packed`]'s GEMM at
    /// load (and call [`Self::host_linear`] with them) rather than keep them as tensors.
    const PACKS_WEIGHTS: bool = false;

    /// [`Self::fused_linear`] with a weight the host CPU multiplies ([`HostWeight`]).
    fn host_linear(
        x: Tensor<Self, 2>,
        weight: HostWeight<'_>,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        let device = x.device();
        let [rows, _] = x.dims();
        let bias = host(bias);
        let out = weight.matmul(&host(x), &Epilogue::Bias(&bias, activation));
        Tensor::from_data(TensorData::new(out, [rows, weight.outer()]), &device)
    }

    /// [`Self::fused_linear_residual_norm`] with a weight the host CPU multiplies.
    #[allow(clippy::too_many_arguments)]
    fn host_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: HostWeight<'_>,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        let device = x.device();
        let [rows, _] = x.dims();
        let (bias, residual, gamma, beta) = (host(bias), host(residual), host(gamma), host(beta));
        let out = weight.matmul(
            &host(x),
            &Epilogue::ResidualNorm {
                bias: &bias,
                residual: &residual,
                gamma: &gamma,
                beta: &beta,
                epsilon: epsilon as f32,
            },
        );
        Tensor::from_data(TensorData::new(out, [rows, weight.outer()]), &device)
    }
}

/// A linear weight `[inner, outer]` that troupe's own kernels multiply on the host CPU.
#[derive(Debug, Clone, Copy)]
pub enum HostWeight<'a> {
    /// fp32, packed in panels ([`packed`]).
    Packed(&'a PackedWeight),
    /// int8 per output channel ([`int8`]); the input is quantised per row on the way in.
    Int8(&'a QuantizedWeight),
}

impl HostWeight<'_> {
    pub fn inner(&self) -> usize {
        match self {
            Self::Packed(weight) => weight.inner(),
            Self::Int8(weight) => weight.inner(),
        }
    }

    pub fn outer(&self) -> usize {
        match self {
            Self::Packed(weight) => weight.outer(),
            Self::Int8(weight) => weight.outer(),
        }
    }

    /// `x @ weight` for row-major `x` `[rows, inner]`, then `epilogue` on every row.
    ///
    /// # Panics
    /// If the epilogue's vectors do not match the weight's outputs; the encoder sizes them
    /// from the same checkpoint.
    pub(crate) fn matmul(&self, x: &[f32], epilogue: &Epilogue<'_>) -> Vec<f32> {
        assert_eq!(
            x.len() % self.inner().max(1),
            0,
            "input is not [rows, inner]"
        );
        epilogue.check(x.len() / self.inner().max(1), self.outer());
        match self {
            Self::Packed(weight) => packed::matmul(x, weight, epilogue),
            Self::Int8(weight) => int8::matmul_f32(x, weight, epilogue),
        }
    }
}

/// A float tensor's values in host memory, row-major.
///
/// # Panics
/// If the backend cannot read the tensor back as f32; the embedder turns a panic in a forward
/// pass into an error for that batch.
fn host<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_else(|error| panic!("cannot read a tensor back to the host: {error:?}"))
}

impl EncoderBackend for burn_flex::Flex {
    // Flex packs its weights (PACKS_WEIGHTS): its linear layers run through host_linear and
    // host_linear_residual_norm below, never through fused_linear.
    fn fused_self_attention(
        qkv: Tensor<Self, 3>,
        lengths: &[usize],
        heads: usize,
    ) -> Tensor<Self, 3> {
        cpu::self_attention(qkv, lengths, heads)
    }

    const PACKS_WEIGHTS: bool = true;

    fn host_linear(
        x: Tensor<Self, 2>,
        weight: HostWeight<'_>,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        cpu::host_linear(x, weight, bias, activation)
    }

    fn host_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: HostWeight<'_>,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        cpu::host_linear_residual_norm(x, weight, bias, residual, gamma, beta, epsilon)
    }
}

#[cfg(feature = "cuda")]
impl EncoderBackend for burn_cuda::Cuda {}
