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

use int8::QuantizedWeight;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// What to apply to a linear layer's output in the same pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Gelu,
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

    /// [`Self::fused_linear`] with an int8 weight: `x` is quantised per row, multiplied in
    /// integers, and dequantised before the epilogue.
    fn quantized_linear(
        x: Tensor<Self, 2>,
        weight: &QuantizedWeight,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        let device = x.device();
        let [rows, _] = x.dims();
        let out = int8::linear(&host(x), weight, &host(bias), activation);
        Tensor::from_data(TensorData::new(out, [rows, weight.outer()]), &device)
    }

    /// [`Self::fused_linear_residual_norm`] with an int8 weight.
    #[allow(clippy::too_many_arguments)]
    fn quantized_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: &QuantizedWeight,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        let device = x.device();
        let [rows, _] = x.dims();
        let out = int8::linear_residual_layer_norm(
            &host(x),
            weight,
            &host(bias),
            &host(residual),
            &host(gamma),
            &host(beta),
            epsilon,
        );
        Tensor::from_data(TensorData::new(out, [rows, weight.outer()]), &device)
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
    fn fused_linear(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        cpu::linear(x, weight, bias, activation)
    }

    fn fused_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        cpu::linear_residual_layer_norm(x, weight, bias, residual, gamma, beta, epsilon)
    }

    fn fused_self_attention(
        qkv: Tensor<Self, 3>,
        lengths: &[usize],
        heads: usize,
    ) -> Tensor<Self, 3> {
        cpu::self_attention(qkv, lengths, heads)
    }

    fn quantized_linear(
        x: Tensor<Self, 2>,
        weight: &QuantizedWeight,
        bias: Tensor<Self, 1>,
        activation: Activation,
    ) -> Tensor<Self, 2> {
        cpu::quantized_linear(x, weight, bias, activation)
    }

    fn quantized_linear_residual_norm(
        x: Tensor<Self, 2>,
        weight: &QuantizedWeight,
        bias: Tensor<Self, 1>,
        residual: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 2> {
        cpu::quantized_linear_residual_norm(x, weight, bias, residual, gamma, beta, epsilon)
    }
}

#[cfg(feature = "cuda")]
impl EncoderBackend for burn_cuda::Cuda {}
