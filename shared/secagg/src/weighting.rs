//! FedAvg under secure aggregation: what a device masks so that the sum decodes to the
//! sample-weighted mean of the devices' deltas without the server learning any device's weight.
//!
//! Device `i` masks `u_i = (w_i clip(delta_i), w_i C)` with `w_i = min(n_i, W) / W`, where `W`
//! is a public cap on the samples a result may claim and `C` the clip norm: both parts lie in
//! `[-C, C]`, SecAgg's per-coordinate bound. The server divides the sum's first `d` coordinates
//! by the last and multiplies by `C`: `sum_i n_i delta_i / sum_i n_i` (with each `n_i` capped at
//! `W`), learning only `sum_i n_i`.

use crate::config::SecAggConfig;
use crate::server::Aggregate;

/// The SecAgg parameters of a round of `m` devices with vectors of `vector_len`: the degree
/// (`degree` or about `3 log2 m`, at most `m - 1`, lowered by one when `m` and it are both odd so
/// that a regular graph exists), the threshold (`threshold` or `floor(k/2) + 1`), and the fewest
/// ring bits `b` that hold the sum of `m` inputs without wrapping. Fails below 2 devices or for
/// parameters `validate` refuses.
pub fn round_config(
    m: u32,
    vector_len: usize,
    clip: f32,
    scale: f32,
    degree: Option<u32>,
    threshold: Option<u32>,
) -> Result<SecAggConfig, String> {
    if m < 2 {
        return Err(format!("{m} device reported; secure aggregation needs at least 2"));
    }
    let mut k = degree.unwrap_or_else(|| default_degree(m)).min(m - 1);
    if m % 2 == 1 && k % 2 == 1 {
        k -= 1;
    }
    let mut config = SecAggConfig {
        n_devices: m,
        threshold: threshold.unwrap_or(k / 2 + 1),
        degree: k,
        vector_len,
        clip,
        scale,
        modulus_bits: 64,
    };
    let worst = u128::from(m) * u128::from(config.max_level());
    config.modulus_bits = (128 - worst.leading_zeros()).clamp(1, 64);
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The quantisation levels per unit of the clip norm by default: steps of `C / 2^20`.
pub const DEFAULT_LEVELS_PER_CLIP: f32 = 1_048_576.0;

/// Checks fixed `secagg_degree` and `secagg_threshold` keys (each may be left to its default):
/// at least 1, and `k/2 < t <= k` when both are set; one line naming the key on error.
pub fn check_degree_threshold(degree: Option<u32>, threshold: Option<u32>) -> Result<(), String> {
    if degree == Some(0) {
        return Err("secagg_degree must be at least 1".into());
    }
    if threshold == Some(0) {
        return Err("secagg_threshold must be at least 1".into());
    }
    if let (Some(k), Some(t)) = (degree, threshold)
        && !(2 * u64::from(t) > u64::from(k) && t <= k)
    {
        return Err(format!("secagg_threshold = {t} must satisfy secagg_degree/2 < t <= secagg_degree = {k}"));
    }
    Ok(())
}

/// SecAgg+'s degree by default for `m` devices: `2 ceil(1.5 log2 m)` (about `3 log2 m`, even so
/// that a regular graph exists for any `m`), at most `m - 1`. Bell et al. 2020 prove `O(log m)`
/// neighbours suffice; the constant 3 is Fedge's choice.
pub fn default_degree(m: u32) -> u32 {
    let k = 2 * (1.5 * f64::from(m.max(2)).log2()).ceil() as u32;
    k.min(m.saturating_sub(1))
}

/// What a device masks: its delta clipped to L2 norm `clip` and weighted, then its weight times
/// `clip` (`d + 1` values, each within `[-clip, clip]`).
pub fn weighted_input(delta: &[f32], num_samples: u64, weight_cap: u64, clip: f32) -> Vec<f32> {
    let cap = weight_cap.max(1);
    let w = num_samples.min(cap) as f64 / cap as f64;
    let norm = delta.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let c = f64::from(clip);
    let scale = if norm > c { c / norm } else { 1.0 } * w;
    let mut v: Vec<f32> = delta.iter().map(|&x| (f64::from(x) * scale) as f32).collect();
    v.push((w * c) as f32);
    v
}

/// The weighted mean a sum of [`weighted_input`]s decodes to, and the samples it stands for
/// (`sum_i min(n_i, W)`, rounded). Fails when the sum has the wrong length or no weight.
pub fn weighted_mean(config: &SecAggConfig, sum: &Aggregate, weight_cap: u64) -> Result<(Vec<f32>, u64), String> {
    let (c, s) = (f64::from(config.clip), f64::from(config.scale));
    let count = sum.survivors.len() as f64;
    let level = |q: u64| q as f64 / s - count * c;
    let Some((&total, coords)) = sum.sum.split_last() else {
        return Err("an empty sum".into());
    };
    if sum.sum.len() != config.vector_len {
        return Err(format!("the sum has {} values, not {}", sum.sum.len(), config.vector_len));
    }
    let weight = level(total);
    if weight.is_nan() || weight <= 0.0 {
        return Err(format!("the summed weight {weight} is not positive"));
    }
    let mean = coords.iter().map(|&q| (level(q) / weight * c) as f32).collect();
    let samples = (weight / c * weight_cap.max(1) as f64).round() as u64;
    Ok((mean, samples))
}

/// Distributed DP's parameters: every device of a round of `k` selected adds its share of the
/// noise, so that any `ceil((1 - f) k)` of them sum to N(0, (z C)^2) per coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedNoise {
    /// z: the sum of the surviving devices' updates carries N(0, (z C)^2) per coordinate.
    pub noise_multiplier: f64,
    /// f: it still does when up to this fraction of the selected devices drop.
    pub dropout_tolerance: f64,
}

/// The default fraction of a round's devices distributed DP's noise survives the loss of.
pub const DEFAULT_DP_DROPOUT_TOLERANCE: f64 = 0.2;

impl DistributedNoise {
    /// Distributed DP at noise multiplier `z`, surviving the loss of `tolerance` (default
    /// [`DEFAULT_DP_DROPOUT_TOLERANCE`]) of a round's devices; refused, in one line, outside
    /// `[0, 0.9]`.
    pub fn new(z: f64, tolerance: Option<f64>) -> Result<Self, String> {
        let f = tolerance.unwrap_or(DEFAULT_DP_DROPOUT_TOLERANCE);
        if !(0.0..=0.9).contains(&f) {
            return Err(format!("dp_dropout_tolerance must be in [0, 0.9], got {f}"));
        }
        Ok(Self { noise_multiplier: z, dropout_tolerance: f })
    }

    /// The fewest devices whose shares make up the full noise, of `selected`:
    /// `ceil((1 - f) selected)`, at least 1.
    pub fn sized_for(&self, selected: usize) -> usize {
        (((1.0 - self.dropout_tolerance) * selected as f64).ceil() as usize).max(1)
    }

    /// Each device's noise standard deviation for a round of `selected` devices and clip `c`:
    /// `z c / sqrt(n_min)`, so any `n_min` of them sum to the full `z c`.
    pub fn device_sigma(&self, selected: usize, c: f64) -> f64 {
        self.noise_multiplier * c / (self.sized_for(selected) as f64).sqrt()
    }

    /// The noise multiplier `survivors` devices' shares carry together: `z sqrt(m' / n_min)`.
    pub fn carried(&self, selected: usize, survivors: usize) -> f64 {
        self.noise_multiplier * (survivors as f64 / self.sized_for(selected) as f64).sqrt()
    }
}

/// Under distributed DP every device weighs 1 and the sum is divided by the devices selected
/// (DP-FedAvg's fixed denominator): the first `vector_len - 1` coordinates of the decoded sum
/// over `denominator`.
pub fn fixed_denominator_mean(config: &SecAggConfig, sum: &Aggregate, denominator: usize) -> Result<Vec<f32>, String> {
    if sum.sum.len() != config.vector_len || sum.sum.is_empty() {
        return Err(format!("the sum has {} values, not {}", sum.sum.len(), config.vector_len));
    }
    if denominator == 0 {
        return Err("no device was selected".into());
    }
    let (c, s) = (f64::from(config.clip), f64::from(config.scale));
    let count = sum.survivors.len() as f64;
    let coords = &sum.sum[..sum.sum.len() - 1];
    Ok(coords.iter().map(|&q| ((q as f64 / s - count * c) / denominator as f64) as f32).collect())
}
