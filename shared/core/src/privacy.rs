//! Privacy mechanisms on flat values: L2 clipping and Gaussian noise.
//!
//! Devices clip their delta to norm `C` before upload; with a noise multiplier `z`, Gaussian
//! noise of standard deviation `z * C` is added (DP-FedAvg, McMahan et al. 2018). The RNG is
//! always the caller's, so runs are reproducible.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

/// What clipping did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipOutcome {
    /// Norm before clipping.
    pub norm_before: f64,
    /// Factor applied (1.0 when the norm was already within the bound).
    pub scale: f64,
}

impl ClipOutcome {
    /// Whether the values were scaled down.
    pub fn clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// Scales `values` so that their L2 norm is at most `max_norm`; values already within the bound
/// are left untouched, bit for bit. `max_norm` must be positive and finite.
pub fn clip_l2(values: &mut [f32], max_norm: f64) -> ClipOutcome {
    assert!(max_norm.is_finite() && max_norm > 0.0, "clip norm must be positive and finite");
    let norm = l2_norm(values);
    if norm <= max_norm {
        return ClipOutcome { norm_before: norm, scale: 1.0 };
    }
    let scale = max_norm / norm;
    for v in values.iter_mut() {
        *v = (*v as f64 * scale) as f32;
    }
    ClipOutcome { norm_before: norm, scale }
}

/// Adds independent N(0, std^2) noise to every value.
pub fn add_gaussian_noise<R: Rng + ?Sized>(values: &mut [f32], std: f64, rng: &mut R) {
    if std == 0.0 {
        return;
    }
    for v in values.iter_mut() {
        let n: f64 = StandardNormal.sample(rng);
        *v = (*v as f64 + std * n) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;
    use rand::RngExt;

    #[test]
    fn clipping_bounds_norm_and_keeps_direction() {
        let mut rng = derive_rng(1, &[]);
        for &c in &[0.01, 0.5, 1.0, 10.0] {
            let orig: Vec<f32> = (0..10_000).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut v = orig.clone();
            let out = clip_l2(&mut v, c);
            assert!(out.clipped());
            // Norm is at most C (up to f32 rounding).
            assert!(l2_norm(&v) <= c * (1.0 + 1e-6), "norm {} > {c}", l2_norm(&v));
            assert!(l2_norm(&v) >= c * (1.0 - 1e-5));
            // Same direction: every value scaled by the same factor.
            for (a, b) in v.iter().zip(&orig) {
                assert!((*a as f64 - *b as f64 * out.scale).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn below_bound_is_untouched() {
        let orig = vec![0.3f32, -0.4, 0.0];
        let mut v = orig.clone();
        let out = clip_l2(&mut v, 0.5 + 1e-6);
        assert!(!out.clipped());
        assert_eq!(v, orig);
        assert!((out.norm_before - 0.5).abs() < 1e-7);
    }

    #[test]
    fn noise_has_the_right_spread() {
        let mut rng = derive_rng(2, &[]);
        let mut v = vec![0.0f32; 200_000];
        add_gaussian_noise(&mut v, 0.5, &mut rng);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        // Standard errors: mean 0.5/sqrt(n) ~ 0.0011, variance 0.25*sqrt(2/n) ~ 0.0008.
        assert!(mean.abs() < 0.006, "mean {mean}");
        assert!((var - 0.25).abs() < 0.004, "var {var}");
    }
}
