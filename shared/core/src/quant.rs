//! Post-training int8 quantisation of model parameters: per-channel affine weights, f32 biases.
//!
//! Each weight tensor of rank 2 or more is split into channels (the last axis for rank 2, which
//! is burn's `Linear` output axis; the first for rank 4, the `Conv2d` output channels) and each
//! channel gets its own `scale` and `zero_point` so that its range, widened to include 0, maps
//! onto -128..=127: `q = clamp(round(x / scale) + zero_point)`, `x' = (q - zero_point) * scale`,
//! `|x - x'| <= scale / 2`. Rank-1 tensors (biases) stay `f32`: they are few and sensitive.
//! This is what travels to devices as a student model: a quarter of the `f32` bytes.

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
            })
            .sum();
        let mut data = Vec::with_capacity(stored.min(layout.numel()));
        for (spec, t) in self.specs.iter().zip(&self.tensors) {
            let n = spec.numel();
            match t {
                QTensor::F32(v) if v.len() == n => data.extend_from_slice(v),
                QTensor::Int8 { axis, scales, zero_points, values } => {
                    let axis = *axis as usize;
                    if values.len() != n
                        || axis >= spec.shape.len()
                        || scales.len() != spec.shape[axis]
                        || zero_points.len() != scales.len()
                    {
                        return Err(QuantError::Shape(spec.name.clone()));
                    }
                    if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                        return Err(QuantError::Scale(spec.name.clone()));
                    }
                    data.extend(values.iter().enumerate().map(|(i, &q)| {
                        let c = channel_of(i, &spec.shape, axis);
                        (q as f32 - zero_points[c] as f32) * scales[c]
                    }));
                }
                QTensor::F32(_) => return Err(QuantError::Shape(spec.name.clone())),
            }
        }
        Ok(ModelParams::new(layout, data)?)
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
