//! Aggregation maths: the streaming weighted mean behind FedAvg (McMahan et al. 2017).
//!
//! Updates are folded in one at a time as they arrive, so memory stays at one model whatever
//! the number of devices. Sums are kept in `f64`: averaging thousands of `f32` updates in `f32`
//! loses digits, and `f64` makes the result independent of arrival order in practice.

use std::sync::Arc;

use thiserror::Error;

use crate::params::{ModelParams, ParamLayout, ParamsError};

/// Why an update could not be aggregated.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum AggregateError {
    /// The update's layout is not the model's.
    #[error("update does not match the model layout")]
    LayoutMismatch,
    /// The weight is negative, NaN or infinite.
    #[error("invalid weight {0}")]
    InvalidWeight(f64),
    /// The update holds NaN or infinite values.
    #[error("update has a non-finite value at index {0}")]
    NonFinite(usize),
    /// Nothing with positive weight was aggregated.
    #[error("no update with positive weight to aggregate")]
    Empty,
    /// A privacy mechanism could not be applied as configured.
    #[error("privacy: {0}")]
    Privacy(String),
    /// A rule that needs more results than the round has (Krum needs 2f + 3).
    #[error("{rule} needs at least {needed} results, got {got}")]
    TooFew {
        /// The rule.
        rule: &'static str,
        /// Results it needs.
        needed: usize,
        /// Results the round has.
        got: usize,
    },
    /// Stored server state (optimiser moments, a centre) does not fit the model.
    #[error("server state does not fit the model: {0}")]
    State(String),
    /// A rule that scores updates against the server's own reference update (FLTrust) has
    /// none it can use.
    #[error("the server's reference update: {0}")]
    Reference(String),
}

impl From<ParamsError> for AggregateError {
    fn from(e: ParamsError) -> Self {
        match e {
            ParamsError::NonFinite(i) => AggregateError::NonFinite(i),
            _ => AggregateError::LayoutMismatch,
        }
    }
}

/// Streaming weighted mean of parameter sets (typically deltas weighted by sample count).
#[derive(Debug, Clone)]
pub struct WeightedMean {
    layout: Arc<ParamLayout>,
    sum: Vec<f64>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    /// An empty accumulator for parameters of `layout`.
    pub fn new(layout: Arc<ParamLayout>) -> Self {
        let sum = vec![0.0; layout.numel()];
        Self { layout, sum, total_weight: 0.0, count: 0 }
    }

    /// Folds in `update` with `weight`. Rejects the update, leaving the sum untouched, if its
    /// layout differs, its weight is invalid or any value is not finite.
    pub fn add(&mut self, update: &ModelParams, weight: f64) -> Result<(), AggregateError> {
        self.add_scaled(update, weight, 1.0)
    }

    /// Folds in `scale * update` with `weight` (the total weight grows by `weight` alone): an
    /// update clipped on the server counts as many samples as before, pointing the same way,
    /// no longer. Refuses as [`Self::add`] does, and a negative or non-finite `scale`.
    pub fn add_scaled(&mut self, update: &ModelParams, weight: f64, scale: f64) -> Result<(), AggregateError> {
        self.check(update, weight)?;
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(AggregateError::InvalidWeight(scale));
        }
        let w = weight * scale;
        if w > 0.0 {
            for (s, &v) in self.sum.iter_mut().zip(update.data()) {
                *s += w * v as f64;
            }
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// What [`Self::add`] would refuse, without folding anything in: a layout other than the
    /// accumulator's, an invalid weight, a value that is not finite.
    pub fn check(&self, update: &ModelParams, weight: f64) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AggregateError::InvalidWeight(weight));
        }
        if **update.layout() != *self.layout {
            return Err(AggregateError::LayoutMismatch);
        }
        update.check_finite()?;
        Ok(())
    }

    /// Number of updates folded in (zero-weight ones included).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the weights so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weighted sum itself (before division), for mechanisms that act on the sum, such as
    /// central DP noise.
    pub fn sum_mut(&mut self) -> &mut [f64] {
        &mut self.sum
    }

    /// The weighted mean. Fails if the total weight is zero.
    pub fn finish(self) -> Result<ModelParams, AggregateError> {
        if self.total_weight <= 0.0 {
            return Err(AggregateError::Empty);
        }
        let inv = 1.0 / self.total_weight;
        let data = self.sum.iter().map(|s| (s * inv) as f32).collect();
        Ok(ModelParams::new(self.layout, data)?)
    }
}

impl WeightedMean {
    /// The weighted sum divided by a fixed `denominator` rather than the total weight (the
    /// fixed-denominator estimator of DP-FedAvg, whose sensitivity does not depend on who took
    /// part). Fails if nothing was added.
    pub fn finish_with_denominator(self, denominator: f64) -> Result<ModelParams, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        if !(denominator.is_finite() && denominator > 0.0) {
            return Err(AggregateError::InvalidWeight(denominator));
        }
        let inv = 1.0 / denominator;
        let data = self.sum.iter().map(|s| (s * inv) as f32).collect();
        Ok(ModelParams::new(self.layout, data)?)
    }
}

/// All-at-once weighted mean of `(update, weight)` pairs; the reference the streaming
/// accumulator is tested against.
pub fn weighted_mean<'a>(
    updates: impl IntoIterator<Item = (&'a ModelParams, f64)>,
) -> Result<ModelParams, AggregateError> {
    let mut it = updates.into_iter().peekable();
    let first = it.peek().ok_or(AggregateError::Empty)?.0;
    let mut acc = WeightedMean::new(first.layout().clone());
    for (u, w) in it {
        acc.add(u, w)?;
    }
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorSpec;

    fn layout(n: usize) -> Arc<ParamLayout> {
        Arc::new(ParamLayout::new(vec![TensorSpec { name: "x".into(), shape: vec![n] }]).unwrap())
    }

    fn p(values: &[f32]) -> ModelParams {
        ModelParams::new(layout(values.len()), values.to_vec()).unwrap()
    }

    /// One table row: updates with weights, and the expected mean (or error).
    fn check(updates: &[(&[f32], f64)], expected: Result<&[f32], AggregateError>) {
        let ps: Vec<ModelParams> = updates.iter().map(|(v, _)| p(v)).collect();
        let got = weighted_mean(ps.iter().zip(updates.iter().map(|u| u.1)));
        match (got, expected) {
            (Ok(g), Ok(e)) => {
                for (a, b) in g.data().iter().zip(e) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{:?} vs {:?}", g.data(), e);
                }
            }
            (Err(g), Err(e)) => assert_eq!(g, e),
            (g, e) => panic!("got {g:?}, expected {e:?}"),
        }
    }

    #[test]
    fn fedavg_table() {
        // Plain mean.
        check(&[(&[1.0, 2.0], 1.0), (&[3.0, 6.0], 1.0)], Ok(&[2.0, 4.0]));
        // Weighted by sample counts: (10*1 + 30*5) / 40 = 4.
        check(&[(&[1.0], 10.0), (&[5.0], 30.0)], Ok(&[4.0]));
        // A single device: its update unchanged.
        check(&[(&[0.25, -7.5, 3.0], 17.0)], Ok(&[0.25, -7.5, 3.0]));
        // Zero-weight updates count but do not move the mean.
        check(&[(&[1.0], 2.0), (&[1000.0], 0.0)], Ok(&[1.0]));
        // Only zero weights: nothing to average.
        check(&[(&[1.0], 0.0)], Err(AggregateError::Empty));
        // Nothing at all.
        check(&[], Err(AggregateError::Empty));
        // Bad weights and values are refused.
        check(&[(&[1.0], -1.0)], Err(AggregateError::InvalidWeight(-1.0)));
        check(&[(&[1.0], 1.0), (&[f32::INFINITY], 1.0)], Err(AggregateError::NonFinite(0)));
    }

    #[test]
    fn rejected_update_leaves_sum_untouched() {
        let mut acc = WeightedMean::new(layout(2));
        acc.add(&p(&[2.0, 2.0]), 1.0).unwrap();
        assert_eq!(acc.add(&p(&[f32::NAN, 0.0]), 1.0), Err(AggregateError::NonFinite(0)));
        assert_eq!(acc.add(&p(&[1.0]), 1.0), Err(AggregateError::LayoutMismatch));
        assert_eq!(acc.add(&p(&[1.0, 1.0]), f64::NAN).map_err(|_| ()), Err(()));
        assert_eq!(acc.count(), 1);
        assert_eq!(acc.finish().unwrap().data(), &[2.0, 2.0]);
    }

    #[test]
    fn streaming_equals_all_at_once_in_any_order() {
        use rand::{RngExt, seq::SliceRandom};
        let mut rng = crate::rng::derive_rng(3, &[0]);
        let n = 1000;
        let updates: Vec<(ModelParams, f64)> = (0..50)
            .map(|_| {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                (p(&v), rng.random_range(1..600) as f64)
            })
            .collect();
        let all = weighted_mean(updates.iter().map(|(u, w)| (u, *w))).unwrap();
        // Reference in f64, computed directly.
        let total: f64 = updates.iter().map(|u| u.1).sum();
        for i in 0..n {
            let e: f64 = updates.iter().map(|(u, w)| u.data()[i] as f64 * w).sum::<f64>() / total;
            assert!((all.data()[i] as f64 - e).abs() < 1e-6);
        }
        let mut order: Vec<usize> = (0..updates.len()).collect();
        order.shuffle(&mut rng);
        let mut acc = WeightedMean::new(layout(n));
        for i in order {
            acc.add(&updates[i].0, updates[i].1).unwrap();
        }
        assert_eq!(acc.finish().unwrap().data(), all.data());
    }
}
