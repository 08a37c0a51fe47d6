//! Fixed-point quantisation: clip, shift, scale, stochastically round; and back.
//!
//! A coordinate `x` becomes `q = SR((clamp(x, -c, c) + c) * s)` in `0..=max_level()`, where `c`
//! is the clip, `s` the scale and `SR(v) = floor(v) + [u < frac(v)]` for a uniform `u` from the
//! caller's RNG, so `E[q] = (x + c) * s` exactly (unbiased). A sum of `m` quantised vectors
//! dequantises as `sum / s - m * c`.

use rand::{Rng, RngExt};

use crate::config::SecAggConfig;
use crate::error::{Result, SecAggError};

/// Quantises `input` (length `vector_len`) with stochastic rounding drawn from `rng`.
pub fn quantise<R: Rng + ?Sized>(config: &SecAggConfig, input: &[f32], rng: &mut R) -> Result<Vec<u64>> {
    if input.len() != config.vector_len {
        return Err(SecAggError::Input(format!("{} values, the round expects {}", input.len(), config.vector_len)));
    }
    let (c, s, max) = (f64::from(config.clip), f64::from(config.scale), config.max_level());
    input
        .iter()
        .map(|&x| {
            if !x.is_finite() {
                return Err(SecAggError::Input(format!("non-finite value {x}")));
            }
            let v = (f64::from(x).clamp(-c, c) + c) * s;
            let floor = v.floor();
            let up = rng.random::<f64>() < v - floor;
            Ok((floor as u64 + u64::from(up)).min(max))
        })
        .collect()
}

/// The f32 sum of `count` devices' inputs from the sum of their quantised vectors.
pub fn dequantise_sum(config: &SecAggConfig, sum: &[u64], count: usize) -> Vec<f32> {
    let (c, s) = (f64::from(config.clip), f64::from(config.scale));
    sum.iter().map(|&q| (q as f64 / s - count as f64 * c) as f32).collect()
}

/// The f32 mean of `count` devices' inputs from the sum of their quantised vectors (empty for
/// `count = 0`).
pub fn dequantise_mean(config: &SecAggConfig, sum: &[u64], count: usize) -> Vec<f32> {
    if count == 0 {
        return Vec::new();
    }
    dequantise_sum(config, sum, count).into_iter().map(|v| (f64::from(v) / count as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn cfg(len: usize) -> SecAggConfig {
        SecAggConfig {
            n_devices: 10,
            threshold: 5,
            degree: 8,
            vector_len: len,
            clip: 1.0,
            scale: 100.0,
            modulus_bits: 32,
        }
    }

    #[test]
    fn clips_to_the_range() {
        let c = cfg(4);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let q = quantise(&c, &[-5.0, 5.0, -1.0, 1.0], &mut rng).unwrap();
        assert_eq!(q, vec![0, 200, 0, 200]);
        assert_eq!(dequantise_sum(&c, &q, 1), vec![-1.0, 1.0, -1.0, 1.0]);
    }

    #[test]
    fn refuses_bad_inputs() {
        let c = cfg(2);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(quantise(&c, &[0.0], &mut rng).is_err());
        assert!(quantise(&c, &[0.0, f32::NAN], &mut rng).is_err());
        assert!(quantise(&c, &[0.0, f32::INFINITY], &mut rng).is_err());
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let c = cfg(1);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let x = 0.123_4_f32; // (x + 1) * 100 = 112.34: rounds to 112 or 113
        let draws = 20_000;
        let mut total = 0u64;
        for _ in 0..draws {
            let q = quantise(&c, &[x], &mut rng).unwrap()[0];
            assert!(q == 112 || q == 113, "{q}");
            total += q;
        }
        let mean = total as f64 / draws as f64;
        let expect = (f64::from(x) + 1.0) * 100.0;
        // sd of one draw <= 0.5, of the mean <= 0.5 / sqrt(20000) ~ 0.0035: 5 sd.
        assert!((mean - expect).abs() < 0.018, "mean {mean}, expected {expect}");
        let back = dequantise_mean(&c, &[total], draws);
        assert!((back[0] - x).abs() < 2e-4, "{back:?}");
    }
}
