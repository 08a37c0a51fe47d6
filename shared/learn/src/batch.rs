//! Turning dataset examples into tensors.
//!
//! Pixels are scaled to [0, 1] and standardised with the MNIST statistics (mean 0.1307,
//! std 0.3081), the usual preprocessing for both MNIST and Fashion-MNIST. Text examples
//! (character classes) go in as they are.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedge_core::dataset::Dataset;

use crate::model::Model;

/// The logits of `model` for examples `indices` of `data`: images for the image models,
/// character sequences for the text ones.
pub fn forward(model: &Model, data: &Dataset, indices: &[usize], device: &Device) -> Tensor<2> {
    if model.kind().is_text() {
        model.forward_tokens(tokens(data, indices, device))
    } else {
        model.forward(images(data, indices, device))
    }
}

/// Examples `indices` of a text dataset as character classes `[n, steps]`.
pub fn tokens(data: &Dataset, indices: &[usize], device: &Device) -> Tensor<2, Int> {
    let p = data.pixels();
    let mut v = Vec::with_capacity(indices.len() * p);
    for &i in indices {
        v.extend(data.image(i).iter().map(|&c| c as i64));
    }
    Tensor::from_data(TensorData::new(v, [indices.len(), p]), device)
}

pub(crate) const MEAN: f32 = 0.1307;
pub(crate) const STD: f32 = 0.3081;

/// Images `indices` of `data` as a `[n, 1, rows, cols]` tensor.
pub fn images(data: &Dataset, indices: &[usize], device: &Device) -> Tensor<4> {
    let p = data.pixels();
    let mut v = Vec::with_capacity(indices.len() * p);
    for &i in indices {
        v.extend(data.image(i).iter().map(|&x| (x as f32 / 255.0 - MEAN) / STD));
    }
    Tensor::from_data(TensorData::new(v, [indices.len(), 1, data.rows, data.cols]), device)
}

/// Labels `indices` of `data` as an int tensor `[n]`.
pub fn labels(data: &Dataset, indices: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = indices.iter().map(|&i| data.labels[i] as i64).collect();
    Tensor::from_data(TensorData::new(v, [indices.len()]), device)
}

/// `chunk` padded to `size` examples by repeating its first (a full chunk as it is): on a
/// backend that compiles kernels per tensor shape (wgpu) every batch then has one shape, so the
/// last, short batch of a device's epoch compiles nothing new. The padding is masked out of the
/// loss ([`masked_cross_entropy`]) and of evaluation.
pub fn padded(chunk: &[usize], size: usize) -> Vec<usize> {
    let mut v = chunk.to_vec();
    if let Some(&first) = chunk.first() {
        v.resize(size.max(chunk.len()), first);
    }
    v
}

/// 1 for the first `real` of `n` rows, 0 for the padding, as a `[n]` tensor.
pub fn mask(n: usize, real: usize, device: &Device) -> Tensor<1> {
    let v: Vec<f32> = (0..n).map(|i| if i < real { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// The mean cross-entropy of the first `real` rows of `logits` against `labels`, the padding
/// rows weighing nothing: the unpadded batch's loss, and so its gradients.
pub fn masked_cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>, real: usize) -> Tensor<1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let picked: Tensor<1> = log_softmax(logits, 1).gather(1, labels.reshape([n, 1])).reshape([n]);
    (picked * mask(n, real, &device)).sum().neg().div_scalar(real.max(1) as f32)
}
