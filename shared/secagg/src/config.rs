//! The round's public parameters and the rules they must obey.

use crate::error::{Result, SecAggError};

/// The public parameters of one secure-aggregation round, known to every party.
///
/// Devices are numbered `0..n_devices`. Each device shares its secrets among its `degree`
/// neighbours in the round's graph ([`crate::graph`]); `degree = n_devices - 1` is the complete
/// graph of Bonawitz et al. 2017, smaller degrees are SecAgg+ (Bell et al. 2020).
///
/// Inputs are clipped to `[-clip, clip]`, shifted by `clip` and scaled by `scale` into integers
/// `0..=max_level()` (stochastic rounding), then summed in the ring `Z_{2^modulus_bits}`.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct SecAggConfig {
    /// Devices in the round (ids `0..n_devices`).
    pub n_devices: u32,
    /// Shamir threshold `t`: shares needed to reconstruct a device's secret.
    pub threshold: u32,
    /// Neighbours per device `k` (`n_devices - 1`: the complete graph).
    pub degree: u32,
    /// Length of each device's input vector.
    pub vector_len: usize,
    /// Inputs are clipped to `[-clip, clip]`.
    pub clip: f32,
    /// Quantisation steps per unit of input.
    pub scale: f32,
    /// Width `b` of the ring `Z_{2^b}` the masked sums live in, 1..=64.
    pub modulus_bits: u32,
}

/// The largest quantisation level that keeps levels exactly representable in an f64.
const MAX_LEVEL: f64 = (1u64 << 53) as f64;

impl SecAggConfig {
    /// The largest quantised value of one coordinate: `ceil(2 * clip * scale)`.
    pub fn max_level(&self) -> u64 {
        (2.0 * f64::from(self.clip) * f64::from(self.scale)).ceil() as u64
    }

    /// The mask of the ring: `2^modulus_bits - 1`.
    pub fn ring_mask(&self) -> u64 {
        if self.modulus_bits >= 64 { u64::MAX } else { (1u64 << self.modulus_bits) - 1 }
    }

    /// Checks the rules below; every party should call it before a round.
    ///
    /// - `n_devices >= 2`; `1 <= degree <= n_devices - 1`; `n_devices * degree` even (a
    ///   `degree`-regular graph on `n_devices` nodes exists only then).
    /// - `degree / 2 < threshold <= degree`, i.e. `2 * threshold > degree`: the `degree` honest
    ///   neighbours of a device each reveal at most one of its two shares, so a server (even one
    ///   lying about who dropped) can never collect `threshold` shares of both its self-mask seed
    ///   and its mask key.
    /// - `vector_len >= 1`; `clip` and `scale` finite and positive; `max_level() <= 2^53`.
    /// - `1 <= modulus_bits <= 64` and `n_devices * max_level() < 2^modulus_bits`: the sum of all
    ///   quantised inputs never wraps, so the unmasked sum is the true integer sum.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(SecAggError::Config(s));
        if self.n_devices < 2 {
            return bad(format!("n_devices = {} but at least 2 are needed", self.n_devices));
        }
        if self.degree == 0 || self.degree >= self.n_devices {
            return bad(format!("degree = {} must be in 1..={}", self.degree, self.n_devices - 1));
        }
        if (u64::from(self.n_devices) * u64::from(self.degree)) % 2 == 1 {
            return bad(format!("degree = {} must be even when n_devices = {} is odd", self.degree, self.n_devices));
        }
        if 2 * u64::from(self.threshold) <= u64::from(self.degree) || self.threshold > self.degree {
            return bad(format!(
                "threshold = {} must satisfy degree/2 < threshold <= degree = {}",
                self.threshold, self.degree
            ));
        }
        if self.vector_len == 0 {
            return bad("vector_len must be at least 1".into());
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("clip = {} and scale = {} must be finite and positive", self.clip, self.scale));
        }
        if 2.0 * f64::from(self.clip) * f64::from(self.scale) > MAX_LEVEL {
            return bad(format!(
                "2 * clip * scale = {} exceeds 2^53",
                2.0 * f64::from(self.clip) * f64::from(self.scale)
            ));
        }
        if self.modulus_bits == 0 || self.modulus_bits > 64 {
            return bad(format!("modulus_bits = {} must be in 1..=64", self.modulus_bits));
        }
        let worst = u128::from(self.n_devices) * u128::from(self.max_level());
        if worst >= 1u128 << self.modulus_bits {
            return bad(format!(
                "n_devices * max_level = {worst} does not fit below 2^{}: the sum could wrap",
                self.modulus_bits
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cfg() -> SecAggConfig {
        SecAggConfig {
            n_devices: 10,
            threshold: 5,
            degree: 8,
            vector_len: 4,
            clip: 1.0,
            scale: 1000.0,
            modulus_bits: 32,
        }
    }

    #[test]
    fn a_sane_config_passes() {
        assert_eq!(cfg().validate(), Ok(()));
        assert_eq!(cfg().max_level(), 2000);
    }

    #[test]
    fn each_rule_refuses() {
        let cases: Vec<fn(&mut SecAggConfig)> = vec![
            |c| c.n_devices = 1,
            |c| c.degree = 10,
            |c| c.degree = 0,
            |c| c.threshold = 4, // 2t = 8 = degree: a server could get both halves
            |c| c.threshold = 9,
            |c| c.vector_len = 0,
            |c| c.clip = f32::NAN,
            |c| c.scale = 0.0,
            |c| c.modulus_bits = 65,
            |c| c.modulus_bits = 14, // 10 * 2000 = 20000 >= 2^14
            |c| {
                c.n_devices = 9;
                c.degree = 5;
                c.threshold = 3
            },
        ];
        for (i, f) in cases.into_iter().enumerate() {
            let mut c = cfg();
            f(&mut c);
            assert!(matches!(c.validate(), Err(SecAggError::Config(_))), "case {i}: {c:?}");
        }
    }

    #[test]
    fn width_rule_is_tight() {
        let mut c = cfg();
        c.modulus_bits = 15; // 20000 < 32768
        assert_eq!(c.validate(), Ok(()));
        c.scale = 1639.0; // max_level 3278, 10 * 3278 = 32780 >= 32768
        assert!(c.validate().is_err());
    }
}
