//! Norm bounding: Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated
//! Learning?". Every update is scaled down to L2 norm at most `M` and the results are averaged
//! by sample count, as FedAvg does: a boosted (model-replacement) update counts no more than
//! an honest one of norm `M`.
//!
//! With a configured `M` the rule streams (memory: one model). Without one, `M` is the median
//! norm of the round's updates, which needs them all first ([`super::buffer`]): with fewer
//! than half the devices attacking, the bound is an honest device's norm. With bucketing
//! ([`super::bucketing`]) the rule holds the round too and bounds and weighs the bucket means
//! (each by its bucket's total samples).

use fedge_core::ModelParams;
use fedge_core::aggregate::{AggregateError, WeightedMean};

use super::bucketing::Bucketing;
use super::buffer::{UpdateBuffer, median_f64, sq_norm};
use super::{Contribution, Strategy};

/// Sample-weighted mean of norm-bounded updates.
#[derive(Debug)]
pub struct NormBound {
    bound: Option<f64>,
    stream: Option<WeightedMean>,
    buffer: UpdateBuffer,
    bucketing: Bucketing,
}

impl NormBound {
    /// Bounds every update's norm at `bound` (`None`: the round's median norm).
    pub fn new(bound: Option<f64>) -> Self {
        Self { bound, stream: None, buffer: UpdateBuffer::default(), bucketing: Bucketing::OFF }
    }

    /// Bounds and averages bucket means instead of the updates.
    pub fn with_bucketing(self, bucketing: Bucketing) -> Self {
        Self { bucketing, ..self }
    }

    /// The fixed bound, when the rule streams (a bound and no bucketing).
    fn streaming(&self) -> Option<f64> {
        self.bound.filter(|_| !self.bucketing.is_on())
    }
}

/// The factor that brings a vector of norm `norm` within `bound`.
fn scale(norm: f64, bound: f64) -> f64 {
    if norm > bound { bound / norm } else { 1.0 }
}

impl Strategy for NormBound {
    fn name(&self) -> &'static str {
        "norm-bound"
    }

    fn begin_round(&mut self, _round: u64, global: &ModelParams, _expected: usize) {
        match self.streaming() {
            Some(_) => self.stream = Some(WeightedMean::new(global.layout().clone())),
            None => self.buffer.begin(global),
        }
    }

    fn holds_updates(&self) -> bool {
        self.streaming().is_none()
    }

    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        match &self.stream {
            Some(acc) if self.streaming().is_some() => acc.check(c.delta, c.num_samples as f64),
            _ => self.buffer.check(c),
        }
    }

    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        match (self.streaming(), self.stream.as_mut()) {
            (Some(bound), Some(acc)) => {
                let s = c.clip_scale * scale(c.delta.l2_norm() * c.clip_scale, bound);
                acc.add_scaled(c.delta, c.num_samples as f64, s)
            }
            (Some(_), None) => Err(AggregateError::Empty),
            (None, _) => self.buffer.push(c),
        }
    }

    fn aggregate_train(&mut self, round: u64, global: &ModelParams, _: usize) -> Result<ModelParams, AggregateError> {
        if self.streaming().is_some() {
            let mean = self.stream.take().ok_or(AggregateError::Empty)?.finish()?;
            let mut next = global.clone();
            next.add_scaled(&mean, 1.0)?;
            return Ok(next);
        }
        self.bucketing.apply(round, &mut self.buffer);
        self.buffer.need("norm-bound", 1)?;
        let norms: Vec<f64> = self.buffer.updates().iter().map(|u| sq_norm(u).sqrt()).collect();
        let bound = self.bound.unwrap_or_else(|| median_f64(&mut norms.clone()));
        let total: f64 = self.buffer.samples().iter().map(|&s| s as f64).sum();
        if total <= 0.0 {
            return Err(AggregateError::Empty);
        }
        let mut step = vec![0.0f64; global.numel()];
        for ((u, &norm), &samples) in self.buffer.updates().iter().zip(&norms).zip(self.buffer.samples()) {
            let w = samples as f64 * scale(norm, bound) / total;
            step.iter_mut().zip(u).for_each(|(s, &v)| *s += w * f64::from(v));
        }
        let step: Vec<f32> = step.iter().map(|&s| s as f32).collect();
        self.buffer.finish(global, &step)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Case, check, contribution, params};
    use super::*;

    #[test]
    fn check_with_a_bound() {
        let cases: &[Case] = &[
            // Norms 5 and 1 with M = 2: (3,4) -> (1.2, 1.6); (1, 0) stays. Mean (1.1, 0.8).
            ("one scaled down", &[&[3.0, 4.0], &[1.0, 0.0]], Ok(&[1.1, 0.8])),
            ("all within", &[&[1.0, 0.0], &[0.0, 1.0]], Ok(&[0.5, 0.5])),
            ("all equal", &[&[0.0, 3.0], &[0.0, 3.0]], Ok(&[0.0, 2.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| NormBound::new(Some(2.0)), cases);
    }

    #[test]
    fn check_with_the_median_norm() {
        let cases: &[Case] = &[
            // Norms 1, 2, 100: M = 2; (0, 100) -> (0, 2). Mean ((1 + 2 + 0) / 3, 2 / 3).
            ("boosted update bounded", &[&[1.0, 0.0], &[2.0, 0.0], &[0.0, 100.0]], Ok(&[1.0, 2.0 / 3.0])),
            // Even count: M = (1 + 3) / 2 = 2.
            ("even count", &[&[1.0], &[3.0]], Ok(&[1.5])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| NormBound::new(None), cases);
    }

    #[test]
    fn weighs_by_samples() {
        for bound in [Some(2.0), None] {
            let global = params(&[0.0]);
            let mut s = NormBound::new(bound);
            s.begin_round(1, &global, 2);
            s.accumulate(contribution(&params(&[2.0]), 3)).unwrap();
            s.accumulate(contribution(&params(&[-2.0]), 1)).unwrap();
            // (3 * 2 - 1 * 2) / 4 = 1.
            assert_eq!(s.aggregate_train(1, &global, 0).unwrap().data(), &[1.0], "{bound:?}");
        }
    }
}
