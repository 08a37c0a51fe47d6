//! How rounds are run: [`EngineConfig`] and its central-DP part [`CentralDp`], checked by
//! `validate`, and [`TrainingKeys`], the training and privacy keys that the coordinator's and
//! the simulator's configuration files both spell out flat, assembled here once.

use std::time::Duration;

use fedge_core::privacy::{AdaptiveClipConfig, PrivacyError};
use fedge_core::wire::{LocalDp, TrainConfig};
use thiserror::Error;

use crate::strategy::choice::DEFAULT_MAX_BUFFER_MB;
use crate::strategy::{StrategyConfig, StrategyOptions};

/// How rounds are run.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Fraction C of available devices sampled per round, in (0, 1].
    pub fraction: f64,
    /// Fewest results a round needs to aggregate (and fewest devices sampled).
    pub min_train_clients: usize,
    /// Over-commitment: sample this fraction more devices than the round needs and close it
    /// as soon as the needed number has answered (Bonawitz et al. 2019 select 130% for 100%).
    /// 0 samples exactly the devices needed.
    pub over_commit: f64,
    /// Whether a round with some failed devices may still aggregate.
    pub accept_failures: bool,
    /// With `accept_failures`, the most failed or late devices a round may have and still
    /// aggregate (`None`: no bound beyond the quorum).
    pub max_failures: Option<usize>,
    /// How long a round waits for results.
    pub round_timeout: Duration,
    /// What devices are asked to do.
    pub train: TrainConfig,
    /// Seed of device sampling and of the robust rules' buckets (with the round).
    pub seed: u64,
    /// Central differential privacy, if on.
    pub privacy: Option<CentralDp>,
    /// With `privacy`: the noise is added by the devices, not the coordinator (distributed
    /// DP under secure aggregation): results arrive only as secure sums that carry it, the
    /// strategy adds none, and the ledger charges the noise each sum reports it carries.
    pub distributed_dp: bool,
    /// The most samples one result may claim: a larger `num_samples` weighs this much (one
    /// device certificate must not be able to outweigh the fleet by saying it has 10^18).
    pub max_samples_per_result: u64,
    /// The longest step (L2 norm of the change) one round may move the global model; a round
    /// whose aggregate moves it further fails and the model stays (`None`: no bound beyond
    /// finiteness). A backstop against whatever got past the strategy.
    pub max_step_norm: Option<f64>,
    /// How results become the next model.
    pub strategy: StrategyConfig,
    /// The most memory, in MiB, a strategy that holds the round's updates may use: a round
    /// whose sampled devices could need more does not start.
    pub max_buffer_mb: u64,
}

/// Central DP (DP-FedAvg): devices clip to `clip_norm`, the coordinator adds N(0, (z C)^2) to
/// the sum of deltas. The strategy must be a [`crate::strategy::DpFedAvg`] with the same
/// settings (see [`crate::strategy::for_config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CentralDp {
    /// Noise multiplier z (noise std / clip norm on the sum).
    pub noise_multiplier: f64,
    /// Clip norm C (the starting value with adaptive clipping).
    pub clip_norm: f64,
    /// Adaptive clipping, if on.
    pub adaptive: Option<AdaptiveClipConfig>,
    /// Delta epsilon is reported at.
    pub delta: f64,
    /// Budget: a round that would take epsilon past it does not start.
    pub target_epsilon: Option<f64>,
}

impl CentralDp {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        fedge_core::privacy::rdp::check_step(1.0, self.noise_multiplier)?;
        fedge_core::privacy::rdp::check_delta(self.delta)?;
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err(PrivacyError::ClipNorm(self.clip_norm));
        }
        if let Some(a) = &self.adaptive {
            a.validate()?;
        }
        if let Some(e) = self.target_epsilon
            && !(e > 0.0 && e.is_finite())
        {
            return Err(PrivacyError::Epsilon(e));
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            min_train_clients: 1,
            over_commit: 0.0,
            accept_failures: true,
            max_failures: None,
            round_timeout: Duration::from_secs(600),
            train: TrainConfig::sgd(5, 10, 0.05),
            seed: 0,
            privacy: None,
            distributed_dp: false,
            max_samples_per_result: DEFAULT_MAX_SAMPLES_PER_RESULT,
            max_step_norm: None,
            strategy: StrategyConfig::default(),
            max_buffer_mb: DEFAULT_MAX_BUFFER_MB,
        }
    }
}

/// The default bound on one result's claimed sample count.
pub const DEFAULT_MAX_SAMPLES_PER_RESULT: u64 = 100_000;

/// The largest quorum a configuration may ask for.
pub const MAX_MIN_CLIENTS: usize = 1_000_000;
/// The longest round deadline: a week.
pub const MAX_ROUND_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// An impossible configuration.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// Fraction outside (0, 1].
    #[error("fraction must be in (0, 1], got {0}")]
    Fraction(f64),
    /// A quorum of none, or past [`MAX_MIN_CLIENTS`] (a round that could never start).
    #[error("min_train_clients must be 1 to {MAX_MIN_CLIENTS}, got {0}")]
    MinClients(usize),
    /// A step bound that is not positive and finite.
    #[error("max_step_norm must be positive and finite, got {0}")]
    MaxStepNorm(f64),
    /// A per-result sample bound of zero.
    #[error("max_samples_per_result must be at least 1")]
    MaxSamples,
    /// A round deadline of zero or past [`MAX_ROUND_TIMEOUT`].
    #[error("the round deadline must be 1 ms to {} s, got {} ms", MAX_ROUND_TIMEOUT.as_secs(), .0.as_millis())]
    RoundTimeout(Duration),
    /// Negative or absurd over-commitment.
    #[error("over_commit must be in [0, 10], got {0}")]
    OverCommit(f64),
    /// Zero epochs or batch size, or a bad learning rate, clip norm or proximal mu.
    #[error("invalid training config: {0}")]
    Train(String),
    /// Bad privacy settings.
    #[error("invalid privacy settings: {0}")]
    Privacy(String),
    /// An unknown strategy, a parameter it does not read or out of range, or a strategy that
    /// cannot run with the privacy settings.
    #[error("invalid strategy: {0}")]
    Strategy(String),
}

impl EngineConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(ConfigError::Fraction(self.fraction));
        }
        if !(1..=MAX_MIN_CLIENTS).contains(&self.min_train_clients) {
            return Err(ConfigError::MinClients(self.min_train_clients));
        }
        if self.max_samples_per_result == 0 {
            return Err(ConfigError::MaxSamples);
        }
        if self.round_timeout.is_zero() || self.round_timeout > MAX_ROUND_TIMEOUT {
            return Err(ConfigError::RoundTimeout(self.round_timeout));
        }
        if !(0.0..=10.0).contains(&self.over_commit) {
            return Err(ConfigError::OverCommit(self.over_commit));
        }
        let t = &self.train;
        if t.epochs == 0 {
            return Err(ConfigError::Train("epochs must be at least 1".into()));
        }
        if t.batch_size == 0 {
            return Err(ConfigError::Train("batch size must be at least 1".into()));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(ConfigError::Train(format!("learning rate must be positive, got {}", t.learning_rate)));
        }
        if let Some(c) = t.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ConfigError::Train(format!("clip norm must be positive, got {c}")));
        }
        if let Some(mu) = t.proximal_mu
            && !(mu.is_finite() && mu >= 0.0)
        {
            return Err(ConfigError::Train(format!("proximal mu must be finite and not negative, got {mu}")));
        }
        if let Some(l) = t.local_dp {
            if t.clip_norm.is_none() {
                return Err(ConfigError::Privacy("local DP needs a clip norm".into()));
            }
            if !(l.epsilon > 0.0 && l.epsilon.is_finite()) {
                return Err(ConfigError::Privacy(PrivacyError::Epsilon(l.epsilon).to_string()));
            }
            fedge_core::privacy::rdp::check_delta(l.delta).map_err(|e| ConfigError::Privacy(e.to_string()))?;
            if self.privacy.is_some() {
                return Err(ConfigError::Privacy("choose central or local DP, not both".into()));
            }
        }
        if let Some(p) = &self.privacy {
            p.validate().map_err(|e| ConfigError::Privacy(e.to_string()))?;
            if self.strategy.is_robust() {
                return Err(ConfigError::Strategy(format!(
                    "{} combines the updates jointly, so one device can move its result by more than clip_norm / m, \
                     the bound central DP's accountant assumes; with central DP use fedavg, fedprox or a server optimiser \
                     (fedavgm, fedadagrad, fedadam, fedyogi), or use local DP",
                    self.strategy.name()
                )));
            }
        }
        if self.distributed_dp {
            match &self.privacy {
                None => return Err(ConfigError::Privacy("distributed DP needs noise_multiplier".into())),
                Some(p) if p.adaptive.is_some() => {
                    return Err(ConfigError::Privacy(
                        "adaptive clipping needs each update's norm; distributed DP sees only sums".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(m) = self.max_step_norm
            && !(m.is_finite() && m > 0.0)
        {
            return Err(ConfigError::MaxStepNorm(m));
        }
        if !(1..=1 << 24).contains(&self.max_buffer_mb) {
            return Err(ConfigError::Strategy(format!(
                "max_buffer_mb must be 1 to {}, got {}",
                1u64 << 24,
                self.max_buffer_mb
            )));
        }
        Ok(())
    }

    /// Sets the strategy called `name` with `options` (and the buffer bound they give),
    /// refusing an unknown name or a bad parameter in one line.
    pub fn set_strategy(&mut self, name: &str, options: &StrategyOptions) -> Result<(), ConfigError> {
        self.strategy = StrategyConfig::parse(name, options).map_err(ConfigError::Strategy)?;
        self.max_buffer_mb = options.max_buffer_mb.unwrap_or(DEFAULT_MAX_BUFFER_MB);
        Ok(())
    }
}

/// The training and privacy keys that `coordinator.toml` and the simulator's configuration
/// files share. The files spell them flat (each file keeps its own defaults and its own
/// `deny_unknown_fields` errors with line numbers, which `serde(flatten)` would lose); this is
/// the one place that turns them into what the engine runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingKeys {
    /// `epochs`: local epochs.
    pub epochs: u32,
    /// `batch_size`: local batch size.
    pub batch_size: u32,
    /// `lr`: local learning rate.
    pub lr: f32,
    /// `clip_norm`: the L2 bound devices clip their deltas to (the starting value with
    /// adaptive clipping).
    pub clip_norm: Option<f32>,
    /// `noise_multiplier`: central DP, the coordinator adds N(0, (z C)^2) to the sum of deltas.
    pub noise_multiplier: Option<f64>,
    /// `adaptive_clip`: central DP, move the clip norm towards a quantile of update norms.
    pub adaptive_clip: Option<AdaptiveClipConfig>,
    /// `local_epsilon`: local DP, each device makes its own upload (epsilon, delta)-DP.
    pub local_epsilon: Option<f64>,
    /// `delta`: the delta of every (epsilon, delta) reported or enforced.
    pub delta: f64,
    /// `target_epsilon`: central DP budget.
    pub target_epsilon: Option<f64>,
}

impl TrainingKeys {
    /// What devices are asked to do.
    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.lr,
            clip_norm: self.clip_norm,
            local_dp: self.local_epsilon.map(|epsilon| LocalDp { epsilon, delta: self.delta }),
            proximal_mu: None,
        }
    }

    /// Central DP settings (none without a noise multiplier). A missing clip norm becomes 0,
    /// which validation refuses with a clear message.
    pub fn central_dp(&self) -> Option<CentralDp> {
        self.noise_multiplier.map(|z| CentralDp {
            noise_multiplier: z,
            clip_norm: self.clip_norm.map_or(0.0, f64::from),
            adaptive: self.adaptive_clip,
            delta: self.delta,
            target_epsilon: self.target_epsilon,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_and_deadline_out_of_range_are_refused() {
        let with = |min_train_clients, round_timeout| {
            EngineConfig { min_train_clients, round_timeout, ..EngineConfig::default() }.validate()
        };
        let hour = Duration::from_secs(3600);
        assert_eq!(with(0, hour), Err(ConfigError::MinClients(0)));
        assert_eq!(with(usize::MAX, hour), Err(ConfigError::MinClients(usize::MAX)));
        assert_eq!(with(1, Duration::ZERO), Err(ConfigError::RoundTimeout(Duration::ZERO)));
        let forever = Duration::from_secs(u64::MAX);
        assert_eq!(with(1, forever), Err(ConfigError::RoundTimeout(forever)));
        assert!(with(1, forever).unwrap_err().to_string().contains("1 ms to 604800 s"));
        assert_eq!(with(MAX_MIN_CLIENTS, MAX_ROUND_TIMEOUT), Ok(()));
        assert_eq!(with(1, Duration::from_millis(1)), Ok(()));
    }

    #[test]
    fn proximal_mu_must_be_finite_and_not_negative() {
        let with = |proximal_mu| {
            let d = EngineConfig::default();
            EngineConfig { train: TrainConfig { proximal_mu, ..d.train }, ..d }.validate()
        };
        for bad in [-0.1, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = with(Some(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::Train(_)), "{bad}: {err}");
            assert!(err.to_string().contains("proximal mu"), "{err}");
        }
        for ok in [None, Some(0.0), Some(0.01), Some(1.0)] {
            assert_eq!(with(ok), Ok(()), "{ok:?}");
        }
    }
}
