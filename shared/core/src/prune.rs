//! Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections"): in each weight
//! tensor (rank 2 or more; biases are kept whole) the given share of values smallest in
//! magnitude is set to zero, and a [`PruneMask`] remembers which, so that fine-tuning can be
//! followed by the same zeros again. Per tensor rather than one global threshold, so that no
//! layer is pruned away. Ties are broken by position, so a mask is a function of the values.
//! A pruned model travels sparse: [`crate::quant::QuantizedModel::into_sparse`].

use thiserror::Error;

use crate::params::ModelParams;

/// Which parameters a pruning keeps (`true`), over a model's flat values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneMask {
    keep: Vec<bool>,
    /// Values of the weight tensors (those pruning applies to).
    weights: usize,
}

/// A pruning that cannot be done.
#[derive(Debug, Error, PartialEq)]
pub enum PruneError {
    /// The share to prune is not in `[0, 1)`.
    #[error("sparsity must be in [0, 1), got {0}")]
    Sparsity(f64),
    /// The mask was made for a model of another size.
    #[error("a mask over {mask} values for a model of {model}")]
    Size {
        /// Values the mask covers.
        mask: usize,
        /// Values of the model.
        model: usize,
    },
}

impl PruneMask {
    /// Zeros `floor(sparsity * n)` of the smallest-magnitude values of each weight tensor of
    /// `params` (in place), and returns which values were kept.
    pub fn prune(params: &mut ModelParams, sparsity: f64) -> Result<Self, PruneError> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(PruneError::Sparsity(sparsity));
        }
        let layout = params.layout().clone();
        let mut keep = vec![true; params.numel()];
        let mut weights = 0;
        for (i, spec) in layout.specs().iter().enumerate() {
            if spec.shape.len() < 2 {
                continue;
            }
            let range = layout.range(i);
            let values = &params.data()[range.clone()];
            weights += values.len();
            let cut = (sparsity * values.len() as f64).floor() as usize;
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
            for &j in &order[..cut] {
                keep[range.start + j] = false;
            }
        }
        let mask = Self { keep, weights };
        mask.apply(params)?;
        Ok(mask)
    }

    /// Sets every value the mask did not keep to zero (after fine-tuning moved them).
    pub fn apply(&self, params: &mut ModelParams) -> Result<(), PruneError> {
        if self.keep.len() != params.numel() {
            return Err(PruneError::Size { mask: self.keep.len(), model: params.numel() });
        }
        params.data_mut().iter_mut().zip(&self.keep).filter(|(_, k)| !**k).for_each(|(v, _)| *v = 0.0);
        Ok(())
    }

    /// Share of the weight tensors' values pruned (biases not counted).
    pub fn sparsity(&self) -> f64 {
        let pruned = self.keep.iter().filter(|k| !**k).count();
        if self.weights == 0 { 0.0 } else { pruned as f64 / self.weights as f64 }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::params::{ParamLayout, TensorSpec};

    fn model() -> ModelParams {
        let layout = Arc::new(
            ParamLayout::new(vec![
                TensorSpec { name: "fc.weight".into(), shape: vec![4, 5] },
                TensorSpec { name: "fc.bias".into(), shape: vec![5] },
                TensorSpec { name: "out.weight".into(), shape: vec![5, 2] },
            ])
            .unwrap(),
        );
        // Magnitudes 1..=20 (alternating signs) in fc.weight, 0.5 in the bias, 1..=10 in out.
        let mut data: Vec<f32> = (1..=20).map(|v| if v % 2 == 0 { v as f32 } else { -v as f32 }).collect();
        data.extend([0.5; 5]);
        data.extend((1..=10).rev().map(|v| v as f32));
        ModelParams::new(layout, data).unwrap()
    }

    #[test]
    fn each_weight_tensor_loses_its_smallest_values_and_biases_stay() {
        let mut p = model();
        let mask = PruneMask::prune(&mut p, 0.5).unwrap();
        let d = p.data();
        // fc.weight: the ten of magnitude 1..=10 are gone, 11..=20 kept with their signs.
        assert!(d[..10].iter().all(|&v| v == 0.0));
        assert_eq!(&d[10..20], &[-11.0, 12.0, -13.0, 14.0, -15.0, 16.0, -17.0, 18.0, -19.0, 20.0]);
        assert_eq!(&d[20..25], &[0.5; 5]);
        // out.weight (10 down to 1): the five smallest are its last five.
        assert_eq!(&d[25..35], &[10.0, 9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(mask.sparsity(), 15.0 / 30.0);
        // Fine-tuning moves the pruned values; applying the mask zeroes them again, only them.
        p.data_mut().iter_mut().for_each(|v| *v += 0.25);
        mask.apply(&mut p).unwrap();
        assert!(p.data()[..10].iter().all(|&v| v == 0.0) && p.data()[10] == -10.75 && p.data()[20] == 0.75);
    }

    #[test]
    fn ties_break_by_position_and_zero_sparsity_keeps_everything() {
        let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2, 3] }]).unwrap());
        let mut p = ModelParams::new(layout, vec![1.0, -1.0, 1.0, 2.0, 1.0, -1.0]).unwrap();
        PruneMask::prune(&mut p, 0.5).unwrap();
        assert_eq!(p.data(), &[0.0, 0.0, 0.0, 2.0, 1.0, -1.0]);
        let mut q = model();
        let mask = PruneMask::prune(&mut q, 0.0).unwrap();
        assert_eq!(q, model());
        assert_eq!(mask.sparsity(), 0.0);
    }

    #[test]
    fn bad_sparsities_and_foreign_models_are_refused() {
        for s in [-0.1, 1.0, 1.5, f64::NAN] {
            assert!(matches!(PruneMask::prune(&mut model(), s), Err(PruneError::Sparsity(_))), "{s}");
        }
        let mask = PruneMask::prune(&mut model(), 0.3).unwrap();
        let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2, 2] }]).unwrap());
        let mut other = ModelParams::zeros(layout);
        assert_eq!(mask.apply(&mut other), Err(PruneError::Size { mask: 35, model: 4 }));
    }
}
