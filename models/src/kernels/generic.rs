//! The encoder's operations in plain burn tensor ops: correct on every backend, and the
//! reference the fused CPU kernels are tested against.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, Bool, Tensor, TensorData};

use super::Activation;

pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    activation: Activation,
) -> Tensor<B, 2> {
    let y = x.matmul(weight) + bias.unsqueeze::<2>();
    match activation {
        Activation::None => y,
        Activation::Gelu => activation::gelu(y),
    }
}

pub fn layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, 2> {
    let (variance, mean) = x.clone().var_mean_bias(1);
    let normalised = (x - mean).div((variance + epsilon).sqrt());
    normalised * gamma.unsqueeze::<2>() + beta.unsqueeze::<2>()
}

pub fn linear_residual_layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    residual: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, 2> {
    let y = linear(x, weight, bias, Activation::None) + residual;
    layer_norm(y, gamma, beta, epsilon)
}

pub fn self_attention<B: Backend>(
    qkv: Tensor<B, 3>,
    lengths: &[usize],
    heads: usize,
) -> Tensor<B, 3> {
    let [batch, seq, three_hidden] = qkv.dims();
    let hidden = three_hidden / 3;
    let head_dim = hidden / heads;
    let split = |index: usize| {
        qkv.clone()
            .slice([0..batch, 0..seq, index * hidden..(index + 1) * hidden])
            .reshape([batch, seq, heads, head_dim])
            .swap_dims(1, 2)
    };
    let (query, key, value) = (split(0), split(1), split(2));
    let device = qkv.device();
    let padded: Vec<bool> = lengths
        .iter()
        .flat_map(|&length| (0..seq).map(move |position| position >= length))
        .collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(padded, [batch, seq]), &device)
        .reshape([batch, 1, 1, seq])
        .expand([batch, heads, seq, seq]);
    let options = AttentionModuleOptions {
        scale: Some(1.0 / (head_dim as f64).sqrt()),
        softcap: None,
        is_causal: false,
    };
    attention(query, key, value, Some(mask), None, options)
        .swap_dims(1, 2)
        .reshape([batch, seq, hidden])
}
