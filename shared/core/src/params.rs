//! Flat named parameter tensors: the one model representation everything outside burn sees.
//!
//! A [`ModelParams`] is a shared [`ParamLayout`] (names, shapes, offsets) plus one contiguous
//! `Vec<f32>`. One buffer makes FedAvg a single streaming loop, clipping a single norm, hashing
//! one pass and the wire format one raw block. Deltas (what devices upload) are `ModelParams`
//! too: same layout, the difference of two models.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Name and shape of one tensor in a model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub struct TensorSpec {
    /// Dotted module path, e.g. `conv1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of elements, or `None` if it overflows.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

/// The names, shapes and offsets of a model's tensors, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParamLayout {
    specs: Vec<TensorSpec>,
    offsets: Vec<usize>,
    total: usize,
}

/// What can go wrong building or combining parameters.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamsError {
    /// Two tensors share a name.
    #[error("duplicate tensor name `{0}`")]
    DuplicateName(String),
    /// The data length does not match the layout.
    #[error("expected {expected} values for the layout, got {actual}")]
    LengthMismatch {
        /// Values the layout needs.
        expected: usize,
        /// Values given.
        actual: usize,
    },
    /// Two parameter sets have different layouts.
    #[error("parameter layouts differ")]
    LayoutMismatch,
    /// A value is NaN or infinite.
    #[error("non-finite value at index {0}")]
    NonFinite(usize),
    /// The element count overflows.
    #[error("tensor `{0}` is too large")]
    TooLarge(String),
}

impl ParamLayout {
    /// Builds a layout from tensor specs, in the given order.
    pub fn new(specs: Vec<TensorSpec>) -> Result<Self, ParamsError> {
        let mut seen = std::collections::HashSet::new();
        let mut offsets = Vec::with_capacity(specs.len());
        let mut total = 0usize;
        for s in &specs {
            if !seen.insert(s.name.as_str()) {
                return Err(ParamsError::DuplicateName(s.name.clone()));
            }
            offsets.push(total);
            total = s
                .checked_numel()
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| ParamsError::TooLarge(s.name.clone()))?;
        }
        Ok(Self { specs, offsets, total })
    }

    /// The tensors, in order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.total
    }

    /// Element range of tensor `i` in the flat buffer.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i] + self.specs[i].numel()
    }

    fn hash_into(&self, h: &mut Sha256) {
        h.update((self.specs.len() as u64).to_le_bytes());
        for s in &self.specs {
            h.update((s.name.len() as u64).to_le_bytes());
            h.update(s.name.as_bytes());
            h.update((s.shape.len() as u64).to_le_bytes());
            for &d in &s.shape {
                h.update((d as u64).to_le_bytes());
            }
        }
    }
}

/// A model's (or a delta's) parameters: a shared layout and one flat `f32` buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    layout: Arc<ParamLayout>,
    data: Vec<f32>,
}

/// SHA-256 of a parameter set's layout and values: its content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// SHA-256 of raw bytes (a stored blob).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        ContentHash(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

impl ModelParams {
    /// Wraps `data` in `layout`, checking the length.
    pub fn new(layout: Arc<ParamLayout>, data: Vec<f32>) -> Result<Self, ParamsError> {
        if data.len() != layout.numel() {
            return Err(ParamsError::LengthMismatch { expected: layout.numel(), actual: data.len() });
        }
        Ok(Self { layout, data })
    }

    /// All zeros in `layout`.
    pub fn zeros(layout: Arc<ParamLayout>) -> Self {
        let data = vec![0.0; layout.numel()];
        Self { layout, data }
    }

    /// The layout.
    pub fn layout(&self) -> &Arc<ParamLayout> {
        &self.layout
    }

    /// The flat values.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The flat values, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes self, returning the flat values.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Iterates `(spec, values)` per tensor.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        self.layout.specs().iter().enumerate().map(|(i, s)| (s, &self.data[self.layout.range(i)]))
    }

    /// Values of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        let i = self.layout.specs().iter().position(|s| s.name == name)?;
        Some(&self.data[self.layout.range(i)])
    }

    /// Checks that `other` has the same layout (same names and shapes, same order).
    pub fn check_same_layout(&self, other: &ModelParams) -> Result<(), ParamsError> {
        if Arc::ptr_eq(&self.layout, &other.layout) || self.layout == other.layout {
            Ok(())
        } else {
            Err(ParamsError::LayoutMismatch)
        }
    }

    /// `self - base`: the delta a device uploads after training from `base`.
    pub fn delta_from(&self, base: &ModelParams) -> Result<ModelParams, ParamsError> {
        self.check_same_layout(base)?;
        let data = self.data.iter().zip(&base.data).map(|(a, b)| a - b).collect();
        Ok(ModelParams { layout: self.layout.clone(), data })
    }

    /// `self += scale * delta`.
    pub fn add_scaled(&mut self, delta: &ModelParams, scale: f32) -> Result<(), ParamsError> {
        self.check_same_layout(delta)?;
        for (a, d) in self.data.iter_mut().zip(&delta.data) {
            *a += scale * d;
        }
        Ok(())
    }

    /// Euclidean norm of all values, accumulated in f64.
    pub fn l2_norm(&self) -> f64 {
        crate::privacy::l2_norm(&self.data)
    }

    /// Fails on the first NaN or infinite value.
    pub fn check_finite(&self) -> Result<(), ParamsError> {
        // A branch-free pass (vectorises) first; the index is looked for only on failure.
        if self.data.iter().fold(true, |ok, v| ok & v.is_finite()) {
            return Ok(());
        }
        Err(ParamsError::NonFinite(self.data.iter().position(|v| !v.is_finite()).unwrap_or(0)))
    }

    /// SHA-256 over the layout and the little-endian bytes of every value.
    pub fn content_hash(&self) -> ContentHash {
        let mut h = Sha256::new();
        self.layout.hash_into(&mut h);
        let mut buf = vec![0u8; 4 * 4096];
        for chunk in self.data.chunks(4096) {
            let bytes = &mut buf[..4 * chunk.len()];
            f32s_to_le_bytes(chunk, bytes);
            h.update(bytes);
        }
        ContentHash(h.finalize().into())
    }
}

/// Writes `src` as little-endian bytes into `dst` (`dst.len() == 4 * src.len()`).
pub fn f32s_to_le_bytes(src: &[f32], dst: &mut [u8]) {
    for (d, v) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&v.to_le_bytes());
    }
}

/// Appends the floats read from little-endian `src` (`src.len()` a multiple of 4) to `dst`.
pub fn extend_f32s_from_le_bytes(dst: &mut Vec<f32>, src: &[u8]) {
    dst.extend(src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Arc<ParamLayout> {
        Arc::new(
            ParamLayout::new(vec![
                TensorSpec { name: "w".into(), shape: vec![2, 3] },
                TensorSpec { name: "b".into(), shape: vec![3] },
            ])
            .unwrap(),
        )
    }

    #[test]
    fn layout_offsets_and_lookup() {
        let p = ModelParams::new(layout(), (0..9).map(|i| i as f32).collect()).unwrap();
        assert_eq!(p.layout().range(1), 6..9);
        assert_eq!(p.tensor("b"), Some(&[6.0, 7.0, 8.0][..]));
        assert_eq!(p.tensor("nope"), None);
    }

    #[test]
    fn rejects_bad_lengths_and_duplicate_names() {
        assert_eq!(
            ModelParams::new(layout(), vec![0.0; 8]).unwrap_err(),
            ParamsError::LengthMismatch { expected: 9, actual: 8 }
        );
        let dup =
            vec![TensorSpec { name: "a".into(), shape: vec![1] }, TensorSpec { name: "a".into(), shape: vec![2] }];
        assert_eq!(ParamLayout::new(dup).unwrap_err(), ParamsError::DuplicateName("a".into()));
    }

    #[test]
    fn delta_then_add_restores() {
        let a = ModelParams::new(layout(), vec![1.0; 9]).unwrap();
        let b = ModelParams::new(layout(), (0..9).map(|i| i as f32 * 0.5).collect()).unwrap();
        let d = b.delta_from(&a).unwrap();
        let mut back = a.clone();
        back.add_scaled(&d, 1.0).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn hash_depends_on_values_and_names() {
        let a = ModelParams::new(layout(), vec![1.0; 9]).unwrap();
        let mut b = a.clone();
        assert_eq!(a.content_hash(), b.content_hash());
        b.data_mut()[4] = 1.0000001;
        assert_ne!(a.content_hash(), b.content_hash());
        let other = Arc::new(
            ParamLayout::new(vec![
                TensorSpec { name: "w".into(), shape: vec![3, 2] },
                TensorSpec { name: "b".into(), shape: vec![3] },
            ])
            .unwrap(),
        );
        let c = ModelParams::new(other, vec![1.0; 9]).unwrap();
        assert_ne!(a.content_hash(), c.content_hash());
        assert!(a.check_same_layout(&c).is_err());
    }

    #[test]
    fn finite_check_finds_nan() {
        let mut a = ModelParams::zeros(layout());
        assert!(a.check_finite().is_ok());
        a.data_mut()[5] = f32::NAN;
        assert_eq!(a.check_finite(), Err(ParamsError::NonFinite(5)));
    }
}
