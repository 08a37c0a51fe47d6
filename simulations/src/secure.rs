//! Secure aggregation in the simulator (`secure_aggregation = true`): the round's reporting
//! devices run SecAgg+ ([`fedge_secagg`]) and the engine gets only the sum of their updates.
//!
//! A round: the sampled devices train as without it; the results that arrive by the deadline
//! are not handed to the engine but to [`protocol::aggregate`], which runs the four SecAgg
//! stages among those devices (ids `0..m` in arrival order), every message encoded and decoded
//! with bincode as the network would carry it, each device dropping between stages with the
//! run's `dropout` probability (seeded). The server's output, the sum of the survivors'
//! quantised vectors, is decoded into their sample-weighted mean delta and handed to the engine
//! as one [`fedge_engine::SecureAggregate`]; the engine never receives a plain delta.
//!
//! **Weighting.** FedAvg weights device `i` by its samples `n_i`. Device `i` sends
//! `u_i = (w_i clip(delta_i), w_i C)` with `w_i = min(n_i, W) / W`, `W` a public cap on the
//! samples per result (the engine's `max_samples_per_result`, lowered to the largest device's
//! data). Both parts lie in `[-C, C]`; the server divides the sum's first `d` coordinates by the
//! last and multiplies by `C`: `sum n_i delta_i / sum n_i`, FedAvg's weighted mean, without
//! learning any `n_i` (only their sum).
//!
//! **Quantisation.** An L2-clipped update's coordinates lie within the clip norm `C`, so
//! SecAgg's per-coordinate clip is `C` (no extra clipping); `scale` defaults to `2^20 / C`
//! (steps of `C / 2^20`), the ring width is the fewest bits holding `m * ceil(2 C scale)`.

pub mod protocol;

use fedge_engine::StrategyConfig;
use fedge_secagg::SecAggConfig;

use crate::config::{Mode, SimConfig};

pub use fedge_secagg::weighting::{DEFAULT_LEVELS_PER_CLIP, default_degree};

/// Checks the secure-aggregation keys and what they combine with; one line on error.
pub fn validate(c: &SimConfig) -> Result<(), String> {
    if !c.secure_aggregation {
        let set = [
            ("secagg_degree", c.secagg_degree.is_some()),
            ("secagg_threshold", c.secagg_threshold.is_some()),
            ("secagg_scale", c.secagg_scale.is_some()),
            ("dp_dropout_tolerance", c.dp_dropout_tolerance.is_some()),
        ];
        return match set.iter().find(|s| s.1) {
            Some((key, _)) => Err(format!("{key} needs secure_aggregation = true")),
            None => Ok(()),
        };
    }
    let Some(clip) = c.clip_norm else {
        return Err("secure_aggregation needs clip_norm: updates are clipped to it and quantised within it".into());
    };
    if c.mode == Mode::Fedbuff {
        return Err(
            "secure_aggregation is not offered with mode = \"fedbuff\" (it sums a round's devices together)".into()
        );
    }
    if c.adaptive_clip.is_some() {
        return Err("adaptive_clip needs each update's norm; with secure_aggregation the server sees only sums".into());
    }
    match (c.noise_multiplier, c.dp_dropout_tolerance) {
        (None, Some(_)) => return Err("dp_dropout_tolerance needs noise_multiplier (distributed DP)".into()),
        (Some(z), f) => drop(DistributedNoise::new(z, f)?),
        (None, None) => {}
    }
    if c.noise_multiplier.is_some() && c.local_epsilon.is_some() {
        return Err("choose distributed DP (noise_multiplier) or local DP (local_epsilon), not both".into());
    }
    if c.strategy_options.bucket_size.is_some() {
        return Err("bucket_size needs each update; secure_aggregation gives the server only their sum".into());
    }
    let strategy = c.engine_config().map_err(|e| e.to_string())?.strategy;
    if !matches!(
        strategy,
        StrategyConfig::FedAvg { .. }
            | StrategyConfig::FedAvgM { .. }
            | StrategyConfig::FedOpt { .. }
            | StrategyConfig::FedProx { .. }
    ) {
        return Err(format!(
            "strategy `{}` needs each update; secure_aggregation gives the server only their sum (use fedavg, fedavgm, fedadam, fedadagrad, fedyogi or fedprox)",
            c.strategy
        ));
    }
    fedge_secagg::weighting::check_degree_threshold(c.secagg_degree, c.secagg_threshold)?;
    let scale = c.secagg_scale.unwrap_or(DEFAULT_LEVELS_PER_CLIP / clip);
    let levels = 2.0 * f64::from(clip) * f64::from(scale);
    if !(scale.is_finite() && scale > 0.0 && levels.is_finite() && levels <= 2f64.powi(53)) {
        return Err(format!("secagg_scale = {scale} must be positive with 2 * clip_norm * scale at most 2^53"));
    }
    if levels.ceil() * c.devices as f64 >= 2f64.powi(64) {
        return Err(format!("secagg_scale = {scale}: {} devices' sum would not fit in 64 bits", c.devices));
    }
    Ok(())
}

/// What every round's secure aggregation shares: the run's validated keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureSetup {
    /// Neighbours per device, when fixed.
    pub degree: Option<u32>,
    /// Shamir threshold, when fixed.
    pub threshold: Option<u32>,
    /// The clip norm `C`, also SecAgg's per-coordinate clip.
    pub clip: f32,
    /// Quantisation levels per unit.
    pub scale: f32,
    /// `W`, the public cap on samples per result the weights are relative to.
    pub weight_cap: u64,
    /// Probability that a device drops between two stages.
    pub dropout: f64,
    /// The run's seed (entropy, round seeds, dropouts).
    pub seed: u64,
    /// Distributed DP: the noise multiplier the sum must carry and the fraction of a round's
    /// devices that may drop with it still carried.
    pub noise: Option<DistributedNoise>,
}

pub use fedge_secagg::weighting::{DEFAULT_DP_DROPOUT_TOLERANCE, DistributedNoise};

impl SecureSetup {
    /// The setup of a validated config with secure aggregation on; `largest` is the largest
    /// device's example count (the cap is no higher).
    pub fn new(c: &SimConfig, max_samples_per_result: u64, largest: u64) -> Option<Self> {
        let clip = c.clip_norm.filter(|_| c.secure_aggregation)?;
        Some(SecureSetup {
            degree: c.secagg_degree,
            threshold: c.secagg_threshold,
            clip,
            scale: c.secagg_scale.unwrap_or(DEFAULT_LEVELS_PER_CLIP / clip),
            weight_cap: max_samples_per_result.min(largest).max(1),
            dropout: c.dropout,
            seed: c.seed,
            // Validated: the tolerance is in range.
            noise: c.noise_multiplier.and_then(|z| DistributedNoise::new(z, c.dp_dropout_tolerance).ok()),
        })
    }

    /// The setup of a prepared run (its engine's cap on samples per result, its largest
    /// device's data).
    pub(crate) fn of_run(
        c: &SimConfig,
        engine: &fedge_engine::RoundEngine<Box<dyn fedge_engine::strategy::Strategy>>,
        device_data: &std::collections::BTreeMap<fedge_core::wire::DeviceId, std::sync::Arc<Vec<usize>>>,
    ) -> Option<Self> {
        let largest = device_data.values().map(|d| d.len() as u64).max().unwrap_or(1);
        Self::new(c, engine.config().max_samples_per_result, largest)
    }

    /// The SecAgg parameters for a round of `m` reporting devices and vectors of `vector_len`:
    /// the degree (fixed or default, at most `m - 1`, lowered by one when `m` and it are both
    /// odd), the threshold (fixed or `floor(k/2) + 1`), the fewest ring bits that hold the sum.
    pub fn round_config(&self, m: u32, vector_len: usize) -> Result<SecAggConfig, String> {
        self.round_config_within(m, vector_len, self.clip)
    }

    /// [`Self::round_config`] with each coordinate bounded by `bound` instead of the clip norm
    /// (distributed DP: clipped updates plus their noise).
    pub fn round_config_within(&self, m: u32, vector_len: usize, bound: f32) -> Result<SecAggConfig, String> {
        fedge_secagg::weighting::round_config(m, vector_len, bound, self.scale, self.degree, self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> SimConfig {
        SimConfig { secure_aggregation: true, clip_norm: Some(1.0), ..SimConfig::default() }
    }

    #[test]
    fn default_degree_is_logarithmic_and_fits() {
        assert_eq!([2, 3, 20, 100, 1000].map(default_degree), [1, 2, 14, 20, 30]);
        let s = SecureSetup::new(&on(), 1000, 600).unwrap();
        assert_eq!(s.weight_cap, 600);
        for m in 2..60 {
            let c = s.round_config(m, 5).unwrap();
            assert!(c.degree >= 1 && 2 * c.threshold > c.degree, "{c:?}");
        }
        let c = s.round_config(1000, 5).unwrap();
        assert_eq!((c.degree, c.threshold, c.modulus_bits, c.max_level()), (30, 16, 31, 1 << 21));
        assert!(s.round_config(1, 5).is_err());
    }

    #[test]
    fn refusals_are_one_line() {
        let cases: Vec<(SimConfig, &str)> = vec![
            (SimConfig { clip_norm: None, ..on() }, "needs clip_norm"),
            (SimConfig { mode: Mode::Fedbuff, ..on() }, "mode = \"fedbuff\""),
            (
                SimConfig { noise_multiplier: Some(1.0), dp_dropout_tolerance: Some(1.0), ..on() },
                "dp_dropout_tolerance must be",
            ),
            (SimConfig { dp_dropout_tolerance: Some(0.1), ..on() }, "dp_dropout_tolerance needs noise_multiplier"),
            (SimConfig { strategy: "median".into(), ..on() }, "strategy `median` needs each update"),
            (SimConfig { strategy: "krum".into(), ..on() }, "strategy `krum`"),
            (SimConfig { secagg_degree: Some(10), secagg_threshold: Some(5), ..on() }, "secagg_threshold = 5"),
            (SimConfig { secagg_scale: Some(-1.0), ..on() }, "secagg_scale"),
            (SimConfig { secagg_degree: Some(4), ..SimConfig::default() }, "needs secure_aggregation"),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
        on().validate().unwrap();
        SimConfig { noise_multiplier: Some(1.0), ..on() }.validate().unwrap();
        SimConfig { local_epsilon: Some(8.0), strategy: "fedadam".into(), ..on() }.validate().unwrap();
    }
}
