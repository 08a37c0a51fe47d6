//! Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
//! Learning with Adaptive Clipping").
//!
//! Instead of a hand-tuned clip norm `C`, the server tracks a target quantile `gamma` of the
//! update norms. Each round every participant reports the bit `b_i = [||delta_i|| <= C]`; the
//! server forms the noised fraction `b = (sum b_i + N(0, sigma_b^2)) / m` over the `m`
//! expected participants and takes the geometric step `C <- C * exp(-eta (b - gamma))`.
//!
//! The count costs privacy too. With a total noise multiplier `z` for the round, the paper's
//! Theorem 1 gives the deltas the multiplier `z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`, so the
//! pair (noised sum, noised count) is exactly as private as one Gaussian sum with multiplier `z`
//! (the centred bits `b_i - 1/2` have sensitivity 1/2). The accountant then sees `z` alone.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::PrivacyError;

/// Settings of adaptive clipping.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipConfig {
    /// The quantile of update norms to track (gamma), in (0, 1). The paper uses 0.5.
    pub target_quantile: f64,
    /// Step size of the geometric update (eta). The paper uses 0.2.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Standard deviation of the noise on the clipped count, as a fraction of the expected
    /// participants (the paper recommends m / 20, i.e. 0.05). Zero: no noise (no DP).
    #[serde(default = "default_count_noise")]
    pub count_noise_fraction: f64,
}

fn default_learning_rate() -> f64 {
    0.2
}

fn default_count_noise() -> f64 {
    0.05
}

impl AdaptiveClipConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(PrivacyError::Adaptive(format!(
                "target quantile must be in (0, 1), got {}",
                self.target_quantile
            )));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(PrivacyError::Adaptive(format!("learning rate must be positive, got {}", self.learning_rate)));
        }
        if !(self.count_noise_fraction >= 0.0 && self.count_noise_fraction.is_finite()) {
            return Err(PrivacyError::Adaptive(format!("count noise must be >= 0, got {}", self.count_noise_fraction)));
        }
        Ok(())
    }
}

/// The clip norm and its update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    /// Settings.
    pub config: AdaptiveClipConfig,
    /// Current clip norm.
    pub clip: f64,
}

impl AdaptiveClip {
    /// Starts at `initial` clip norm.
    pub fn new(config: AdaptiveClipConfig, initial: f64) -> Result<Self, PrivacyError> {
        config.validate()?;
        if !(initial > 0.0 && initial.is_finite()) {
            return Err(PrivacyError::ClipNorm(initial));
        }
        Ok(Self { config, clip: initial })
    }

    /// Standard deviation of the count noise for `expected` participants.
    pub fn count_noise_std(&self, expected: usize) -> f64 {
        self.config.count_noise_fraction * expected as f64
    }

    /// The noise multiplier left for the deltas when the round's total is `z`:
    /// `(z^-2 - (2 sigma_b)^-2)^(-1/2)`. An error when the count noise is too small to fit in
    /// the budget (needs `2 sigma_b > z`).
    pub fn delta_noise_multiplier(&self, z: f64, expected: usize) -> Result<f64, PrivacyError> {
        let sb = self.count_noise_std(expected);
        let rest = z.powi(-2) - (2.0 * sb).powi(-2);
        if rest.is_nan() || rest <= 0.0 {
            return Err(PrivacyError::Adaptive(format!(
                "count noise std {sb} is too small for noise multiplier {z}: need 2 * std > z"
            )));
        }
        Ok(rest.powf(-0.5))
    }

    /// One round: `unclipped` of the `expected` participants had norms within the clip.
    /// Returns the new clip norm.
    pub fn update<R: Rng + ?Sized>(&mut self, unclipped: usize, expected: usize, rng: &mut R) -> f64 {
        if expected == 0 {
            return self.clip;
        }
        let noise: f64 = StandardNormal.sample(rng);
        let b = (unclipped as f64 + self.count_noise_std(expected) * noise) / expected as f64;
        self.clip *= (-self.config.learning_rate * (b - self.config.target_quantile)).exp();
        self.clip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;
    use rand::RngExt;

    fn cfg(q: f64) -> AdaptiveClipConfig {
        AdaptiveClipConfig { target_quantile: q, learning_rate: 0.2, count_noise_fraction: 0.05 }
    }

    #[test]
    fn converges_to_the_target_quantile_of_a_known_distribution() {
        // Norms ~ Exponential(1): the gamma-quantile is -ln(1 - gamma).
        for gamma in [0.3f64, 0.5, 0.8] {
            let mut rng = derive_rng(7, &[gamma.to_bits()]);
            let mut a = AdaptiveClip::new(cfg(gamma), 20.0).unwrap();
            let m = 200;
            let mut tail = Vec::new();
            for round in 0..600 {
                let unclipped = (0..m).filter(|_| -(1.0 - rng.random::<f64>()).ln() <= a.clip).count();
                a.update(unclipped, m, &mut rng);
                if round >= 400 {
                    tail.push(a.clip);
                }
            }
            let mean = tail.iter().sum::<f64>() / tail.len() as f64;
            let want = -(1.0f64 - gamma).ln();
            assert!((mean - want).abs() < 0.05 * want + 0.02, "gamma {gamma}: clip {mean}, quantile {want}");
        }
    }

    #[test]
    fn noise_split_keeps_the_total_multiplier() {
        let a = AdaptiveClip::new(cfg(0.5), 1.0).unwrap();
        // m = 100: sigma_b = 5; z = 1 -> z_delta = (1 - 1/100)^(-1/2).
        let zd = a.delta_noise_multiplier(1.0, 100).unwrap();
        assert!((zd - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        // Combined: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2.
        assert!((zd.powi(-2) + 10.0f64.powi(-2) - 1.0).abs() < 1e-12);
        // Too few participants for the count noise to fit.
        assert!(a.delta_noise_multiplier(1.0, 5).is_err());
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(AdaptiveClip::new(cfg(1.0), 1.0).is_err());
        assert!(AdaptiveClip::new(cfg(0.5), 0.0).is_err());
        assert!(AdaptiveClip::new(AdaptiveClipConfig { learning_rate: -1.0, ..cfg(0.5) }, 1.0).is_err());
    }
}
