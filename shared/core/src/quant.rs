//! Post-training int8 quantisation of model parameters: per-channel affine weights, f32 biases.
//!
//! Each weight tensor of rank 2 or more is split into channels (the last axis for rank 2, which
//! is burn's `Linear` output axis; the first for rank 4, the `Conv2d` output channels) and each
//! channel gets its own `scale` and `zero_point` so that its range, widened to include 0, maps
//! onto -128..=127: `q = clamp(round(x / scale) + zero_point)`, `x' = (q - zero_point) * scale`,
//! `|x - x'| <= scale / 2`. Rank-1 tensors (biases) stay `f32`: they are few and sensitive.
//! This is what travels to devices as a student model: a quarter of the `f32` bytes.
//!
//! A pruned model ([`crate::prune`]) travels sparse ([`QuantizedModel::into_sparse`]): a tensor
//! whose values are mostly their channel's zero point (the int8 of 0.0) keeps a bitmap of the
//! others and only their values, `n / 8 + nnz` bytes instead of `n`. Lossless against the dense
//! int8 tensor.

use std::sync::Arc;

use thiserror::Error;

use crate::params::{ModelParams, ParamLayout, ParamsError, TensorSpec};

/// One tensor, quantised or not.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum QTensor {
    /// Kept as `f32`.
    F32(Vec<f32>),
    /// Per-channel affine int8 along `axis`.
    Int8 {
        /// The channel axis.
        axis: u8,
        /// One scale per channel.
        scales: Vec<f32>,
        /// One zero point per channel.
        zero_points: Vec<i8>,
        /// The values, in the tensor's row-major order.
        values: Vec<i8>,
    },
    /// Per-channel affine int8 along `axis`, storing only the values that are not their
    /// channel's zero point (those dequantise to exactly 0.0).
    SparseInt8 {
        /// The channel axis.
        axis: u8,
        /// One scale per channel.
        scales: Vec<f32>,
        /// One zero point per channel.
        zero_points: Vec<i8>,
        /// Bit `i % 8` of byte `i / 8` set: element `i` (row-major) is stored in `values`.
        /// Exactly `n.div_ceil(8)` bytes, unused high bits of the last byte clear.
        mask: Vec<u8>,
        /// The stored values, in row-major order.
        values: Vec<i8>,
    },
}

/// A quantised model: the layout and one [`QTensor`] per tensor.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct QuantizedModel {
    /// Names and shapes, in layout order.
    pub specs: Vec<TensorSpec>,
    /// The tensors, in the same order.
    pub tensors: Vec<QTensor>,
}

/// A quantised model that does not hold together.
#[derive(Debug, Error, PartialEq)]
pub enum QuantError {
    /// The layout is invalid.
    #[error(transparent)]
    Layout(#[from] ParamsError),
    /// A tensor's stored sizes do not match its shape.
    #[error("tensor `{0}` does not match its shape")]
    Shape(String),
    /// A scale is not positive and finite.
    #[error("tensor `{0}` has an invalid scale")]
    Scale(String),
}

fn channel_axis(shape: &[usize]) -> Option<usize> {
    match shape.len() {
        0 | 1 => None,
        2 => Some(1),
        _ => Some(0),
    }
}

/// Index of the channel of flat element `i` of a row-major tensor of `shape` along `axis`.
fn channel_of(i: usize, shape: &[usize], axis: usize) -> usize {
    let inner: usize = shape[axis + 1..].iter().product();
    (i / inner) % shape[axis]
}

/// The channel axis of an int8 tensor of `spec`, after checking its per-channel scales and zero
/// points (and `sizes`, the caller's own check of the stored values).
fn check_channels(
    spec: &TensorSpec,
    axis: u8,
    scales: &[f32],
    zero_points: &[i8],
    sizes: bool,
) -> Result<usize, QuantError> {
    let axis = axis as usize;
    if !sizes || axis >= spec.shape.len() || scales.len() != spec.shape[axis] || zero_points.len() != scales.len() {
        return Err(QuantError::Shape(spec.name.clone()));
    }
    if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(QuantError::Scale(spec.name.clone()));
    }
    Ok(axis)
}

fn quantize_tensor(shape: &[usize], x: &[f32]) -> QTensor {
    let Some(axis) = channel_axis(shape) else { return QTensor::F32(x.to_vec()) };
    let channels = shape[axis];
    let (mut lo, mut hi) = (vec![0.0f32; channels], vec![0.0f32; channels]);
    for (i, &v) in x.iter().enumerate() {
        let c = channel_of(i, shape, axis);
        lo[c] = lo[c].min(v);
        hi[c] = hi[c].max(v);
    }
    let mut scales = Vec::with_capacity(channels);
    let mut zero_points = Vec::with_capacity(channels);
    for c in 0..channels {
        let scale = if hi[c] > lo[c] { (hi[c] - lo[c]) / 255.0 } else { 1.0 };
        let zp = (-128.0 - lo[c] / scale).round().clamp(-128.0, 127.0);
        scales.push(scale);
        zero_points.push(zp as i8);
    }
    let values = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = channel_of(i, shape, axis);
            ((v / scales[c]).round() + zero_points[c] as f32).clamp(-128.0, 127.0) as i8
        })
        .collect();
    QTensor::Int8 { axis: axis as u8, scales, zero_points, values }
}

impl QuantizedModel {
    /// Quantises every weight tensor of `params`.
    pub fn quantize(params: &ModelParams) -> Self {
        let (specs, tensors) =
            params.tensors().map(|(spec, x)| (spec.clone(), quantize_tensor(&spec.shape, x))).unzip();
        Self { specs, tensors }
    }

    /// Back to `f32` parameters (each value within half a step of the original).
    pub fn dequantize(&self) -> Result<ModelParams, QuantError> {
        if self.specs.len() != self.tensors.len() {
            return Err(QuantError::Shape("(tensor count)".into()));
        }
        let layout = Arc::new(ParamLayout::new(self.specs.clone())?);
        // Sized by what is stored, not by what the layout announces (a few bytes of specs can
        // announce gigabytes; found by the `record` fuzz target); each tensor is checked below.
        let stored: usize = self
            .tensors
            .iter()
            .map(|t| match t {
                QTensor::F32(v) => v.len(),
                QTensor::Int8 { values, .. } => values.len(),
                QTensor::SparseInt8 { mask, .. } => 8 * mask.len(),
            })
            .sum();
        let mut data = Vec::with_capacity(stored.min(layout.numel()));
        for (spec, t) in self.specs.iter().zip(&self.tensors) {
            let n = spec.numel();
            match t {
                QTensor::F32(v) if v.len() == n => data.extend_from_slice(v),
                QTensor::Int8 { axis, scales, zero_points, values } => {
                    let axis = check_channels(spec, *axis, scales, zero_points, values.len() == n)?;
                    data.extend(values.iter().enumerate().map(|(i, &q)| {
                        let c = channel_of(i, &spec.shape, axis);
                        (q as f32 - zero_points[c] as f32) * scales[c]
                    }));
                }
                QTensor::SparseInt8 { axis, scales, zero_points, mask, values } => {
                    let stored: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
                    let tail_clear = n % 8 == 0 || mask.last().is_none_or(|&b| b >> (n % 8) == 0);
                    let sizes = mask.len() == n.div_ceil(8) && tail_clear && stored == values.len();
                    let axis = check_channels(spec, *axis, scales, zero_points, sizes)?;
                    let mut next = values.iter();
                    for i in 0..n {
                        let c = channel_of(i, &spec.shape, axis);
                        let kept = mask[i / 8] >> (i % 8) & 1 == 1;
                        // `next` holds exactly one value per set bit (counted above).
                        let q = if kept { next.next().copied().unwrap_or(zero_points[c]) } else { zero_points[c] };
                        data.push((q as f32 - zero_points[c] as f32) * scales[c]);
                    }
                }
                QTensor::F32(_) => return Err(QuantError::Shape(spec.name.clone())),
            }
        }
        Ok(ModelParams::new(layout, data)?)
    }

    /// The same model with every int8 tensor that is smaller sparse stored sparse (see the
    /// module docs); others unchanged. Dequantises to exactly the same parameters.
    pub fn into_sparse(self) -> Self {
        let tensors = self
            .tensors
            .into_iter()
            .zip(&self.specs)
            .map(|(t, spec)| match t {
                QTensor::Int8 { axis, scales, zero_points, values } => {
                    let a = axis as usize;
                    let kept =
                        |i: usize, q: i8| a < spec.shape.len() && q != zero_points[channel_of(i, &spec.shape, a)];
                    let nnz = values.iter().enumerate().filter(|&(i, &q)| kept(i, q)).count();
                    if a >= spec.shape.len() || values.len().div_ceil(8) + nnz >= values.len() {
                        return QTensor::Int8 { axis, scales, zero_points, values };
                    }
                    let mut mask = vec![0u8; values.len().div_ceil(8)];
                    let mut stored = Vec::with_capacity(nnz);
                    for (i, &q) in values.iter().enumerate() {
                        if kept(i, q) {
                            mask[i / 8] |= 1 << (i % 8);
                            stored.push(q);
                        }
                    }
                    QTensor::SparseInt8 { axis, scales, zero_points, mask, values: stored }
                }
                other => other,
            })
            .collect();
        Self { specs: self.specs, tensors }
    }

    /// Bytes of the stored numbers (values, scales, zero points, f32 tensors).
    pub fn payload_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| match t {
                QTensor::F32(v) => 4 * v.len(),
                QTensor::Int8 { scales, zero_points, values, .. } => {
                    values.len() + 4 * scales.len() + zero_points.len()
                }
                QTensor::SparseInt8 { scales, zero_points, mask, values, .. } => {
                    mask.len() + values.len() + 4 * scales.len() + zero_points.len()
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;
    use rand::RngExt;

    fn model() -> ModelParams {
        let layout = Arc::new(
            ParamLayout::new(vec![
                TensorSpec { name: "fc.weight".into(), shape: vec![30, 8] },
                TensorSpec { name: "fc.bias".into(), shape: vec![8] },
                TensorSpec { name: "conv.weight".into(), shape: vec![4, 2, 3, 3] },
            ])
            .unwrap(),
        );
        let mut rng = derive_rng(1, &[]);
        // Channels with very different ranges: per-channel scales matter.
        let data = (0..layout.numel()).map(|i| rng.random_range(-1.0f32..1.0) * (1 + i % 8) as f32).collect();
        ModelParams::new(layout, data).unwrap()
    }

    #[test]
    fn round_trip_is_within_half_a_step_per_channel() {
        let p = model();
        let q = QuantizedModel::quantize(&p);
        let back = q.dequantize().unwrap();
        assert_eq!(back.layout(), p.layout());
        for ((spec, a), (t, (_, b))) in p.tensors().zip(q.tensors.iter().zip(back.tensors())) {
            match t {
                QTensor::F32(_) => assert_eq!(a, b, "{} kept exactly", spec.name),
                QTensor::SparseInt8 { .. } => unreachable!("quantize makes dense tensors"),
                QTensor::Int8 { axis, scales, .. } => {
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        let s = scales[channel_of(i, &spec.shape, *axis as usize)];
                        assert!((x - y).abs() <= s * 0.5001, "{}[{i}]: {x} vs {y} (scale {s})", spec.name);
                    }
                }
            }
        }
        // Zero is exact (the range always includes it).
        let zeros = ModelParams::zeros(p.layout().clone());
        assert!(QuantizedModel::quantize(&zeros).dequantize().unwrap().data().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn weights_take_a_quarter_of_the_bytes() {
        let p = model();
        let q = QuantizedModel::quantize(&p);
        let f32_bytes = 4 * p.numel();
        assert!(q.payload_bytes() * 100 < 32 * f32_bytes, "{} vs {f32_bytes}", q.payload_bytes());
    }

    #[test]
    fn a_pruned_model_travels_sparse_and_dequantises_the_same() {
        let mut p = model();
        // Zero 90% of each weight tensor (every tenth value kept), keep the bias.
        for (i, v) in p.data_mut().iter_mut().enumerate() {
            if !(240..248).contains(&i) && i % 10 != 0 {
                *v = 0.0;
            }
        }
        let dense = QuantizedModel::quantize(&p);
        let sparse = dense.clone().into_sparse();
        assert!(matches!(sparse.tensors[0], QTensor::SparseInt8 { .. }));
        assert!(matches!(sparse.tensors[1], QTensor::F32(_)));
        assert!(matches!(sparse.tensors[2], QTensor::SparseInt8 { .. }));
        assert_eq!(sparse.dequantize().unwrap(), dense.dequantize().unwrap());
        // 240 + 72 weights: a bitmap of 30 + 9 bytes and 24 + 7 values (every tenth index of
        // each), against 312 bytes dense; scales, zero points and the bias alike in both.
        let (d, s) = (dense.payload_bytes(), sparse.payload_bytes());
        assert_eq!(d - s, 312 - (30 + 9 + 24 + 7), "dense {d}, sparse {s}");
        // Through the codec, as it travels.
        let bytes = crate::codec::encode_value(&sparse);
        let back: QuantizedModel = crate::codec::decode_value(&bytes).unwrap();
        assert_eq!(back, sparse);
        // A dense model stays dense: sparse would not be smaller.
        let q = QuantizedModel::quantize(&model());
        assert_eq!(q.clone().into_sparse(), q);
    }

    #[test]
    fn inconsistent_sparse_tensors_are_refused() {
        let mut p = model();
        p.data_mut().iter_mut().enumerate().filter(|(i, _)| i % 5 != 0).for_each(|(_, v)| *v = 0.0);
        let sparse = QuantizedModel::quantize(&p).into_sparse();
        let broken = |f: &dyn Fn(&mut Vec<u8>, &mut Vec<i8>)| {
            let mut q = sparse.clone();
            if let QTensor::SparseInt8 { mask, values, .. } = &mut q.tensors[0] {
                f(mask, values);
            }
            q.dequantize()
        };
        assert!(broken(&|_, _| {}).is_ok());
        // One value too few, one too many, a bitmap byte short, a set bit past the end.
        assert!(matches!(
            broken(&|_, v| {
                v.pop();
            }),
            Err(QuantError::Shape(_))
        ));
        assert!(matches!(broken(&|_, v| v.push(1)), Err(QuantError::Shape(_))));
        assert!(matches!(
            broken(&|m, _| {
                m.pop();
            }),
            Err(QuantError::Shape(_))
        ));
        let mut q = QuantizedModel::quantize(&p).into_sparse();
        // conv.weight has 72 values: its bitmap's 9 bytes are full; fc.weight 240: 30 full.
        // A 3-value tensor would have spare bits; make one by hand.
        q.specs[1] = TensorSpec { name: "odd.weight".into(), shape: vec![3, 1] };
        q.tensors[1] = QTensor::SparseInt8 {
            axis: 1,
            scales: vec![1.0],
            zero_points: vec![0],
            mask: vec![0b1000_0001],
            values: vec![5, 6],
        };
        assert!(matches!(q.dequantize(), Err(QuantError::Shape(_))), "a bit past the third value");
    }

    #[test]
    fn inconsistent_models_are_refused() {
        let mut q = QuantizedModel::quantize(&model());
        if let QTensor::Int8 { scales, .. } = &mut q.tensors[0] {
            scales[0] = f32::NAN;
        }
        assert!(matches!(q.dequantize(), Err(QuantError::Scale(_))));
        let mut q = QuantizedModel::quantize(&model());
        q.tensors.pop();
        assert!(q.dequantize().is_err());
    }
}
