//! Fused CPU kernels for the `Flex` backend.
//!
//! Every op here does in one pass over memory what the generic path does in three to five:
//! the GEMM (troupe's packed tiles, [`super::packed`], or int8, [`super::int8`]) writes its
//! output once and the epilogue (bias, GELU, residual, layer norm) runs on each row while it
//! is still in cache. Work is spread over the encoder pool ([`super::pool`]).

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

use super::math::{self, dispatch_simd};
use super::packed::{self, F32Kernel, PackedWeight};
use super::pool::{self, SharedSlice};
use super::{Activation, Epilogue, HostWeight};

/// A contiguous f32 copy-free view of a Flex tensor (copies only if it is strided).
struct Dense {
    tensor: FlexTensor,
}

impl Dense {
    fn new<const D: usize>(tensor: Tensor<Flex, D>) -> Self {
        let tensor = tensor.into_primitive().tensor();
        let tensor = if tensor.as_slice::<f32>().is_some() {
            tensor
        } else {
            tensor.to_contiguous()
        };
        Self { tensor }
    }

    fn slice(&self) -> &[f32] {
        self.tensor
            .as_slice::<f32>()
            .expect("tensor was made contiguous f32 in Dense::new")
    }
}

fn into_tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    let primitive = FlexTensor::from_data(TensorData::new(data, shape));
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn bias_gelu_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (value, b) in row.iter_mut().zip(bias) {
            *value = math::gelu(*value + *b);
        }
    }
}
dispatch_simd!(bias_gelu_rows_simd, bias_gelu_rows, (rows: &mut [f32], bias: &[f32]) -> ());

#[inline(always)]
fn bias_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (value, b) in row.iter_mut().zip(bias) {
            *value += *b;
        }
    }
}
dispatch_simd!(bias_rows_simd, bias_rows, (rows: &mut [f32], bias: &[f32]) -> ());

/// Sum of a slice with 16 independent accumulators, so it vectorises.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += *value;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `row = layer_norm(row + bias + residual)` for every row, in place.
#[inline(always)]
fn residual_layer_norm_rows(
    rows: &mut [f32],
    residual: &[f32],
    bias: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
) {
    let width = bias.len();
    let inv_width = 1.0 / width as f32;
    for (row, res) in rows
        .chunks_exact_mut(width)
        .zip(residual.chunks_exact(width))
    {
        for ((value, r), b) in row.iter_mut().zip(res).zip(bias) {
            *value += *r + *b;
        }
        let mean = lane_sum(row) * inv_width;
        for value in row.iter_mut() {
            *value -= mean;
        }
        let mut lanes = [0.0f32; 16];
        let chunks = row.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for chunk in chunks {
            for (lane, value) in lanes.iter_mut().zip(chunk) {
                *lane += *value * *value;
            }
        }
        let variance = (lanes.iter().sum::<f32>() + tail) * inv_width;
        let inv_std = 1.0 / (variance + epsilon).sqrt();
        for ((value, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *value = *value * inv_std * *g + *b;
        }
    }
}
dispatch_simd!(
    residual_layer_norm_rows_simd,
    residual_layer_norm_rows,
    (rows: &mut [f32], residual: &[f32], bias: &[f32], gamma: &[f32], beta: &[f32], epsilon: f32) -> ()
);

/// Softmax of `row * scale`, in place.
#[inline(always)]
fn scaled_softmax_row(row: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for value in row.iter_mut() {
        *value *= scale;
        max = if *value > max { *value } else { max };
    }
    for value in row.iter_mut() {
        *value = math::exp(*value - max);
    }
    let inv_sum = 1.0 / lane_sum(row);
    for value in row.iter_mut() {
        *value *= inv_sum;
    }
}

#[inline(always)]
fn scaled_softmax_rows(scores: &mut [f32], width: usize, scale: f32) {
    for row in scores.chunks_exact_mut(width) {
        scaled_softmax_row(row, scale);
    }
}
dispatch_simd!(
    scaled_softmax_rows_simd,
    scaled_softmax_rows,
    (scores: &mut [f32], width: usize, scale: f32) -> ()
);

/// `x @ weight + bias`, then `activation`, with a weight troupe's kernels multiply
/// ([`HostWeight`]), reading the Flex tensors in place.
pub fn host_linear(
    x: Tensor<Flex, 2>,
    weight: HostWeight<'_>,
    bias: Tensor<Flex, 1>,
    activation: Activation,
) -> Tensor<Flex, 2> {
    let [rows, _] = x.dims();
    let (x, bias) = (Dense::new(x), Dense::new(bias));
    let out = weight.matmul(x.slice(), &Epilogue::Bias(bias.slice(), activation));
    into_tensor(out, [rows, weight.outer()])
}

/// `layer_norm(x @ weight + bias + residual)` with a weight troupe's kernels multiply.
pub fn host_linear_residual_norm(
    x: Tensor<Flex, 2>,
    weight: HostWeight<'_>,
    bias: Tensor<Flex, 1>,
    residual: Tensor<Flex, 2>,
    gamma: Tensor<Flex, 1>,
    beta: Tensor<Flex, 1>,
    epsilon: f64,
) -> Tensor<Flex, 2> {
    let [rows, _] = x.dims();
    let (x, bias, residual) = (Dense::new(x), Dense::new(bias), Dense::new(residual));
    let (gamma, beta) = (Dense::new(gamma), Dense::new(beta));
    let out = weight.matmul(
        x.slice(),
        &Epilogue::ResidualNorm {
            bias: bias.slice(),
            residual: residual.slice(),
            gamma: gamma.slice(),
            beta: beta.slice(),
            epsilon: epsilon as f32,
        },
    );
    into_tensor(out, [rows, weight.outer()])
}

pub fn self_attention(qkv: Tensor<Flex, 3>, lengths: &[usize], heads: usize) -> Tensor<Flex, 3> {
    let [batch, seq, three_hidden] = qkv.dims();
    let hidden = three_hidden / 3;
    let head_dim = hidden / heads;
    assert_eq!(lengths.len(), batch, "one length per sequence");
    assert!(
        lengths.iter().all(|&length| length <= seq),
        "length past the padded width"
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    let qkv = Dense::new(qkv);
    let qkv = qkv.slice();
    let mut out = vec![0.0f32; batch * seq * hidden];
    let shared = SharedSlice::new(&mut out);

    let kernel = F32Kernel::best();
    pool::run(batch * heads, |task| {
        let (b, h) = (task / heads, task % heads);
        let length = lengths[b];
        if length == 0 {
            return;
        }
        // This head's columns of the sequence's first row; row j of Q, K and V is
        // `three_hidden` further on, K and V `hidden` and `2 * hidden` to the right.
        let base = b * seq * three_hidden + h * head_dim;
        let at = |j: usize, part: usize, c: usize| qkv[base + j * three_hidden + part * hidden + c];
        // scores = Q K^T, with K^T packed like a weight (`head_dim` × `length`).
        let keys = PackedWeight::pack_with(head_dim, length, |c, j| at(j, 1, c));
        let mut scores = vec![0.0f32; length * length];
        packed::product(
            kernel,
            &qkv[base..],
            three_hidden,
            length,
            &keys,
            0..keys.panel_count(),
            |i, first, sums| scores[i * length + first..][..sums.len()].copy_from_slice(sums),
        );
        scaled_softmax_rows_simd(&mut scores, length, scale);
        // context = P V, written straight into this head's columns of the output rows.
        let values = PackedWeight::pack_with(length, head_dim, |j, c| at(j, 2, c));
        packed::product(
            kernel,
            &scores,
            length,
            length,
            &values,
            0..values.panel_count(),
            |i, first, sums| {
                // SAFETY: row b*seq+i, columns h*head_dim+first..+sums.len() of `out`: inside
                // it (i < length <= seq, first + sums.len() <= head_dim), and no two tasks
                // share a (b, h) pair, so their blocks are disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sums.as_ptr(),
                        shared.ptr_at((b * seq + i) * hidden + h * head_dim + first),
                        sums.len(),
                    );
                }
            },
        );
    });
    into_tensor(out, [batch, seq, hidden])
}
