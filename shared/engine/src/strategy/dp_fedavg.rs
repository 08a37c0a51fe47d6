//! DP-FedAvg with central noise: McMahan, Ramage, Talwar and Zhang 2018, "Learning
//! Differentially Private Recurrent Language Models", with adaptive clipping from Andrew et al.
//! 2021.
//!
//! Devices clip their deltas to `C` (the coordinator clips again, so a device that does not
//! cannot raise the sensitivity); every delta counts once, whatever its sample count; the
//! coordinator adds N(0, (z C)^2) to the sum and divides by the number of results the round
//! wanted (a fixed denominator: dividing by the number that arrived would leak who took part).
//! One round is then one step of the subsampled Gaussian mechanism with noise multiplier `z`,
//! which is what the accountant composes.
//!
//! With adaptive clipping the coordinator also counts the deltas that needed no clipping,
//! noises that count and moves `C` towards the target quantile; the deltas' own noise is
//! reduced so the round's total stays at multiplier `z` (see
//! [`fedge_core::privacy::adaptive_clip`]).

use fedge_core::ModelParams;
use fedge_core::aggregate::{AggregateError, WeightedMean};
use fedge_core::privacy::{AdaptiveClip, add_gaussian_noise_f64};

use super::{Contribution, Strategy};

/// Federated averaging with clipping and central Gaussian noise.
pub struct DpFedAvg {
    noise_multiplier: f64,
    clip: f64,
    adaptive: Option<AdaptiveClip>,
    rng: Box<dyn rand::Rng + Send>,
    acc: Option<WeightedMean>,
    expected: usize,
    unclipped: usize,
}

impl std::fmt::Debug for DpFedAvg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpFedAvg")
            .field("noise_multiplier", &self.noise_multiplier)
            .field("clip", &self.clip)
            .field("adaptive", &self.adaptive)
            .finish_non_exhaustive()
    }
}

impl DpFedAvg {
    /// Noise multiplier `z` on clip norm `clip`, noise drawn from `rng` (seeded in simulations;
    /// from the operating system in a real coordinator, so nobody can replay it).
    pub fn new(
        noise_multiplier: f64,
        clip: f64,
        adaptive: Option<AdaptiveClip>,
        rng: Box<dyn rand::Rng + Send>,
    ) -> Self {
        let clip = adaptive.map_or(clip, |a| a.clip);
        Self { noise_multiplier, clip, adaptive, rng, acc: None, expected: 0, unclipped: 0 }
    }
}

impl Strategy for DpFedAvg {
    fn name(&self) -> &'static str {
        "dp-fedavg"
    }

    fn begin_round(&mut self, _round: u64, global: &ModelParams, expected: usize) {
        self.acc = Some(WeightedMean::new(global.layout().clone()));
        self.expected = expected.max(1);
        self.unclipped = 0;
    }

    fn clip_norm(&self) -> Option<f64> {
        Some(self.clip)
    }

    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.acc.as_ref().ok_or(AggregateError::Empty)?.check(c.delta, 1.0)
    }

    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        let acc = self.acc.as_mut().ok_or(AggregateError::Empty)?;
        // Clip here too: the weight scales the delta onto the ball of radius C. (A non-finite
        // delta gets a NaN norm, weight 1, and `add` refuses it.) The engine's own factor
        // (1 in the synchronous engine under DP; FedBuff's staleness weight) can only shrink
        // it further, so the sensitivity stays C.
        let norm = c.delta.l2_norm();
        let scale = if norm > self.clip { self.clip / norm } else { 1.0 };
        acc.add(c.delta, scale * c.clip_scale.clamp(0.0, 1.0))?;
        if !c.clipped && scale == 1.0 {
            self.unclipped += 1;
        }
        Ok(())
    }

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &ModelParams,
        _failures: usize,
    ) -> Result<ModelParams, AggregateError> {
        let mut acc = self.acc.take().ok_or(AggregateError::Empty)?;
        if acc.count() == 0 {
            return Err(AggregateError::Empty);
        }
        let z = match &self.adaptive {
            Some(a) => a
                .delta_noise_multiplier(self.noise_multiplier, self.expected)
                .map_err(|e| AggregateError::Privacy(e.to_string()))?,
            None => self.noise_multiplier,
        };
        add_gaussian_noise_f64(acc.sum_mut(), z * self.clip, &mut self.rng);
        let mean = acc.finish_with_denominator(self.expected as f64)?;
        let mut next = global.clone();
        next.add_scaled(&mean, 1.0)?;
        if let Some(a) = &mut self.adaptive {
            self.clip = a.update(self.unclipped, self.expected, &mut self.rng);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::privacy::AdaptiveClipConfig;
    use fedge_core::rng::derive_rng;
    use fedge_core::{ParamLayout, TensorSpec};
    use std::sync::Arc;

    fn layout(n: usize) -> Arc<ParamLayout> {
        Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap())
    }

    #[test]
    fn clips_counts_each_device_once_and_divides_by_the_expected_count() {
        let l = layout(2);
        let p = |v: &[f32]| ModelParams::new(l.clone(), v.to_vec()).unwrap();
        let global = p(&[0.0, 0.0]);
        // Tiny noise so the arithmetic shows.
        let mut s = DpFedAvg::new(1e-9, 1.0, None, Box::new(derive_rng(1, &[])));
        s.begin_round(1, &global, 4);
        // Norm 5 -> clipped to norm 1 by the coordinator; sample counts do not weigh.
        s.accumulate(Contribution { delta: &p(&[3.0, 4.0]), num_samples: 1000, clipped: false, clip_scale: 1.0 })
            .unwrap();
        s.accumulate(Contribution { delta: &p(&[0.5, 0.0]), num_samples: 1, clipped: false, clip_scale: 1.0 }).unwrap();
        let next = s.aggregate_train(1, &global, 0).unwrap();
        // (0.6 + 0.5, 0.8) / 4: the denominator is the 4 results wanted, not the 2 that came.
        assert!((next.data()[0] - 1.1 / 4.0).abs() < 1e-6 && (next.data()[1] - 0.2).abs() < 1e-6, "{next:?}");
    }

    #[test]
    fn noise_on_the_mean_has_std_z_c_over_m() {
        let d = 100_000;
        let l = layout(d);
        let global = ModelParams::new(l.clone(), vec![0.0; d]).unwrap();
        let zero = global.clone();
        let (z, c, m) = (1.3, 0.5, 10);
        let mut s = DpFedAvg::new(z, c, None, Box::new(derive_rng(2, &[])));
        s.begin_round(1, &global, m);
        s.accumulate(Contribution { delta: &zero, num_samples: 1, clipped: false, clip_scale: 1.0 }).unwrap();
        let next = s.aggregate_train(1, &global, 0).unwrap();
        let v: Vec<f64> = next.data().iter().map(|&x| x as f64).collect();
        let var = v.iter().map(|x| x * x).sum::<f64>() / d as f64;
        let want = (z * c / m as f64).powi(2);
        // Standard error of a variance estimate: want * sqrt(2/d) ~ 0.45%.
        assert!((var / want - 1.0).abs() < 0.025, "var {var} vs {want}");
    }

    #[test]
    fn adaptive_clip_moves_towards_the_norms_and_reports_the_new_clip() {
        let l = layout(1);
        let global = ModelParams::new(l.clone(), vec![0.0]).unwrap();
        let cfg = AdaptiveClipConfig { target_quantile: 0.5, learning_rate: 0.2, count_noise_fraction: 0.05 };
        let a = AdaptiveClip::new(cfg, 10.0).unwrap();
        let mut s = DpFedAvg::new(0.5, 10.0, Some(a), Box::new(derive_rng(3, &[])));
        let small = ModelParams::new(l.clone(), vec![0.1]).unwrap();
        for round in 1..=30 {
            s.begin_round(round, &global, 20);
            for _ in 0..20 {
                s.accumulate(Contribution { delta: &small, num_samples: 1, clipped: false, clip_scale: 1.0 }).unwrap();
            }
            s.aggregate_train(round, &global, 0).unwrap();
        }
        // Every norm (0.1) sat under the clip, so the clip shrank geometrically from 10.
        let c = s.clip_norm().unwrap();
        assert!(c < 10.0 * (-0.2f64 * 0.4 * 30.0).exp() * 1.5, "clip {c}");
    }
}
