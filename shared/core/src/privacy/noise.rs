//! Gaussian noise on flat values. The RNG is always the caller's: seeded in simulations so runs
//! reproduce, drawn from the operating system in the coordinator so nobody can replay it.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

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

/// Adds independent N(0, std^2) noise to every value of an `f64` sum (central DP noise goes on
/// the aggregate before it is divided and rounded to `f32`).
pub fn add_gaussian_noise_f64<R: Rng + ?Sized>(values: &mut [f64], std: f64, rng: &mut R) {
    if std == 0.0 {
        return;
    }
    for v in values.iter_mut() {
        let n: f64 = StandardNormal.sample(rng);
        *v += std * n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;

    /// Mean and variance within 5 standard errors of N(0, std^2) over many draws.
    fn check_moments(v: &[f64], std: f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let se_mean = std / n.sqrt();
        let se_var = std * std * (2.0 / (n - 1.0)).sqrt();
        assert!(mean.abs() < 5.0 * se_mean, "mean {mean} (se {se_mean})");
        assert!((var - std * std).abs() < 5.0 * se_var, "var {var} vs {} (se {se_var})", std * std);
    }

    #[test]
    fn noise_has_the_right_spread() {
        for (seed, std) in [(2u64, 0.5f64), (3, 1e-3), (4, 7.0)] {
            let mut rng = derive_rng(seed, &[]);
            let mut v = vec![0.0f32; 200_000];
            add_gaussian_noise(&mut v, std, &mut rng);
            check_moments(&v.iter().map(|&x| x as f64).collect::<Vec<_>>(), std);
            let mut w = vec![0.0f64; 200_000];
            add_gaussian_noise_f64(&mut w, std, &mut rng);
            check_moments(&w, std);
        }
    }

    #[test]
    fn zero_std_adds_nothing() {
        let mut rng = derive_rng(5, &[]);
        let mut v = vec![1.5f32, -2.0];
        add_gaussian_noise(&mut v, 0.0, &mut rng);
        assert_eq!(v, [1.5, -2.0]);
    }
}
