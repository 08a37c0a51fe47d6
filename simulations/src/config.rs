//! Simulation configuration: a TOML file, overridden by command-line flags, validated up front
//! so a bad value fails in one line before any work starts.

use std::path::{Path, PathBuf};

use fedge_core::config_file::{ConfigFileError, parse_toml, read_toml};

use fedge_core::dataset::DatasetName;
use fedge_core::partition::Partition;
use fedge_core::privacy::AdaptiveClipConfig;
use fedge_engine::{AsyncConfig, EngineConfig, StalenessWeight, StrategyOptions, TrainingKeys};
use fedge_learn::{BackendKind, DistillConfig, ModelKind};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::attack::AttackKind;
use crate::devices::SpeedModel;

/// Which partitioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionKind {
    /// Uniform at random.
    #[default]
    Iid,
    /// McMahan's pathological shards.
    Shards,
    /// Dirichlet(alpha) over labels.
    Dirichlet,
    /// The dataset's own clients (Shakespeare's speaking roles).
    Natural,
}

impl std::str::FromStr for PartitionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iid" => Ok(Self::Iid),
            "shards" => Ok(Self::Shards),
            "dirichlet" => Ok(Self::Dirichlet),
            "natural" => Ok(Self::Natural),
            other => Err(format!("unknown partition `{other}` (expected iid, shards, dirichlet or natural)")),
        }
    }
}

/// How the engine runs: rounds, or buffered asynchronous aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Synchronous rounds ([`fedge_engine::RoundEngine`]).
    #[default]
    Sync,
    /// FedBuff ([`fedge_engine::BufferedEngine`]): devices train as slots free up, every
    /// `buffer_size` results make a version.
    Fedbuff,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Self::Sync),
            "fedbuff" => Ok(Self::Fedbuff),
            other => Err(format!("unknown mode `{other}` (expected sync or fedbuff)")),
        }
    }
}

/// FedBuff's staleness weight, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StalenessKind {
    /// `w(s) = 1`.
    Constant,
    /// `w(s) = 1 / (1 + s)^staleness_exponent`.
    #[default]
    Polynomial,
    /// `w(s) = 1` while `s <= hinge_b`, then `1 / (hinge_a (s - hinge_b) + 1)`.
    Hinge,
}

impl std::str::FromStr for StalenessKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" => Ok(Self::Constant),
            "polynomial" => Ok(Self::Polynomial),
            "hinge" => Ok(Self::Hinge),
            other => Err(format!("unknown staleness `{other}` (expected constant, polynomial or hinge)")),
        }
    }
}

/// Everything a simulation run needs. Every field has a default; a TOML file may set any of
/// them and nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Virtual devices (K).
    pub devices: usize,
    /// Fraction of devices sampled per round (C).
    pub fraction: f64,
    /// Training rounds.
    pub rounds: u64,
    /// Local epochs (E).
    pub epochs: u32,
    /// Local minibatch size (B).
    pub batch_size: u32,
    /// Local SGD learning rate.
    pub lr: f32,
    /// `2nn`, `cnn`, or for text `lstm` / `lstm-small`.
    pub model: ModelKind,
    /// `embedded`, `mnist`, `fashion-mnist`, `shakespeare` or `shakespeare-sample`.
    pub dataset: DatasetName,
    /// Folder holding `mnist/`, `fashion-mnist/` and `shakespeare/` (not read for the embedded
    /// sets).
    pub data_dir: PathBuf,
    /// `iid`, `shards`, `dirichlet` or `natural` (the dataset's own clients: Shakespeare).
    pub partition: PartitionKind,
    /// At most this many of a device's examples per round: a fresh seeded sample each round
    /// when it has more (bounds the local steps on Shakespeare's long roles). None: all.
    pub local_examples: Option<usize>,
    /// Evaluate on a seeded sample of this many test examples (drawn once) rather than all.
    pub test_examples: Option<usize>,
    /// Shards per device for `shards` (2 in the paper).
    pub shards_per_device: usize,
    /// Concentration for `dirichlet`.
    pub alpha: f64,
    /// Seed of everything random.
    pub seed: u64,
    /// L2 bound on each device's delta (C; the starting value with adaptive clipping).
    pub clip_norm: Option<f32>,
    /// Central DP (DP-FedAvg): the server adds N(0, (z C)^2) to the sum of deltas; needs
    /// `clip_norm`.
    pub noise_multiplier: Option<f64>,
    /// Central DP: move the clip norm towards a quantile of the update norms.
    pub adaptive_clip: Option<AdaptiveClipConfig>,
    /// Local DP: each device makes its upload (local_epsilon, delta)-DP; needs `clip_norm`.
    pub local_epsilon: Option<f64>,
    /// Delta of every (epsilon, delta) reported.
    pub delta: f64,
    /// Central DP budget: the run stops before a round that would take epsilon past it.
    pub target_epsilon: Option<f64>,
    /// Fewest results a round needs to aggregate.
    pub min_train_clients: usize,
    /// Probability that a selected device drops out of a round.
    pub dropout: f64,
    /// Virtual seconds a round waits for results before the engine closes it with what it
    /// has (or fails it).
    pub round_timeout_s: f64,
    /// How fast the virtual devices compute and transfer (the `[speed]` table).
    pub speed: SpeedModel,
    /// Worker threads, each owning one model (0: one per core).
    pub workers: usize,
    /// `flex` (CPU) or `wgpu` (GPU, when built with the `wgpu` feature).
    pub backend: BackendKind,
    /// Virtual devices trained in one launch (their models stacked: `fedge_learn::group`);
    /// 1 trains each alone. More needs a burn backend (`flex` or `wgpu`).
    pub devices_per_launch: usize,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: u64,
    /// Stop early once test accuracy reaches this.
    pub target_accuracy: Option<f64>,
    /// Distil the global model into the student every this many rounds (and after the last).
    pub distill_every: Option<u64>,
    /// Student architecture (`mlp` by default).
    pub student_model: ModelKind,
    /// Training images held out from the devices as the unlabelled proxy set for distillation
    /// (0: a tenth of the training set). Only held out when `distill_every` is set.
    pub proxy_examples: usize,
    /// How to distil.
    pub distill: DistillConfig,
    /// The longest step one round may move the global model (L2 norm); a round whose aggregate
    /// goes further fails and the model stays. None: no bound.
    pub max_step_norm: Option<f64>,
    /// Aggregation strategy by name (`fedavg`, `fedadam`, `trimmed-mean`, ...; see
    /// docs/simulations.md).
    pub strategy: String,
    /// The strategy's parameters (the `[strategy_options]` table).
    pub strategy_options: StrategyOptions,
    /// Byzantine attack of the `attackers` devices ([`crate::attack`]): `sign-flip`, `scale`,
    /// `noise`, `label-flip` or `little-is-enough`.
    pub attack: Option<AttackKind>,
    /// Fraction of the devices that attack, in [0, 1) (`round(attackers * devices)` of them).
    pub attackers: f64,
    /// `sign-flip` sends `-attack_scale * delta` (default 1), `scale` `attack_scale * delta`
    /// (default 10).
    pub attack_scale: Option<f64>,
    /// Standard deviation of a `noise` attacker's update, per coordinate.
    pub attack_noise_std: f64,
    /// `little-is-enough`: z instead of the paper's z_max for the round.
    pub attack_z: Option<f64>,
    /// `sync` (rounds) or `fedbuff` (buffered asynchronous aggregation; `rounds` then counts
    /// aggregations, `fraction` and `min_train_clients` are not read).
    pub mode: Mode,
    /// FedBuff: K, results per aggregation.
    pub buffer_size: usize,
    /// FedBuff: the most devices training at once.
    pub max_concurrency: usize,
    /// FedBuff: results trained more versions ago than this are refused.
    pub max_staleness: u64,
    /// FedBuff: `constant`, `polynomial` or `hinge`.
    pub staleness: StalenessKind,
    /// FedBuff, `polynomial`: the exponent a of `1 / (1 + s)^a`.
    pub staleness_exponent: f64,
    /// FedBuff, `hinge`: the slope a.
    pub hinge_a: f64,
    /// FedBuff, `hinge`: the staleness b up to which results count fully.
    pub hinge_b: u64,
    /// Secure aggregation (SecAgg+, [`crate::secure`]): the engine gets only the sum of the
    /// round's clipped, quantised, masked updates. Needs `clip_norm`.
    pub secure_aggregation: bool,
    /// SecAgg neighbours per device k (default about 3 log2 m for m reporting devices, capped
    /// at m - 1; m - 1 is Bonawitz et al. 2017's complete graph).
    pub secagg_degree: Option<u32>,
    /// SecAgg Shamir threshold t, with k/2 < t <= k (default floor(k/2) + 1).
    pub secagg_threshold: Option<u32>,
    /// SecAgg quantisation levels per unit (default 2^20 / clip_norm).
    pub secagg_scale: Option<f32>,
    /// Distributed DP (`secure_aggregation` with `noise_multiplier`): the fraction of a
    /// round's selected devices that may drop while the sum still carries the full noise
    /// (each device adds its share for the rest; default 0.2).
    pub dp_dropout_tolerance: Option<f64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            devices: 100,
            fraction: 0.1,
            rounds: 20,
            epochs: 5,
            batch_size: 10,
            lr: 0.05,
            model: ModelKind::TwoNn,
            dataset: DatasetName::Embedded,
            data_dir: PathBuf::from("data"),
            partition: PartitionKind::Iid,
            local_examples: None,
            test_examples: None,
            shards_per_device: 2,
            alpha: 0.5,
            seed: 0,
            clip_norm: None,
            noise_multiplier: None,
            adaptive_clip: None,
            local_epsilon: None,
            delta: 1e-5,
            target_epsilon: None,
            min_train_clients: 1,
            dropout: 0.0,
            round_timeout_s: 3600.0,
            speed: SpeedModel::default(),
            workers: 0,
            backend: BackendKind::Cpu,
            devices_per_launch: 1,
            eval_every: 1,
            target_accuracy: None,
            distill_every: None,
            student_model: ModelKind::Mlp,
            proxy_examples: 0,
            distill: DistillConfig::default(),
            max_step_norm: None,
            strategy: "fedavg".into(),
            strategy_options: StrategyOptions::default(),
            attack: None,
            attackers: 0.0,
            attack_scale: None,
            attack_noise_std: crate::attack::DEFAULT_NOISE_STD,
            attack_z: None,
            mode: Mode::Sync,
            buffer_size: 10,
            max_concurrency: 20,
            max_staleness: 100,
            staleness: StalenessKind::Polynomial,
            staleness_exponent: fedge_engine::buffered::DEFAULT_STALENESS_EXPONENT,
            hinge_a: fedge_engine::buffered::DEFAULT_HINGE_A,
            hinge_b: fedge_engine::buffered::DEFAULT_HINGE_B,
            secure_aggregation: false,
            secagg_degree: None,
            secagg_threshold: None,
            secagg_scale: None,
            dp_dropout_tolerance: None,
        }
    }
}

/// A bad configuration, in one line.
#[derive(Debug, Error, PartialEq)]
pub enum SimConfigError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A value is impossible.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl SimConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, SimConfigError> {
        Ok(read_toml(path)?)
    }

    /// Parses TOML text; on error, the 1-based line and a one-line reason.
    pub fn from_toml(text: &str) -> Result<Self, (usize, String)> {
        parse_toml(text)
    }

    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        let bad = |m: String| Err(SimConfigError::Invalid(m));
        if self.devices == 0 {
            return bad("devices must be at least 1".into());
        }
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if !(1..=4096).contains(&self.devices_per_launch) {
            return bad(format!("devices_per_launch must be 1 to 4096, got {}", self.devices_per_launch));
        }
        if self.devices_per_launch > 1 {
            let refused = [
                (
                    self.backend == BackendKind::Cpu,
                    "the cpu backend's fused kernels train one device at a time (use backend = \"wgpu\", or \"flex\")",
                ),
                (self.model.is_text(), "the LSTMs have no stacked form"),
                (self.mode == Mode::Fedbuff, "FedBuff hands out tasks one at a time"),
                (self.attack.is_some(), "a label-flip attacker trains on its own copy of the data"),
            ];
            if let Some((_, why)) = refused.iter().find(|r| r.0) {
                return bad(format!("devices_per_launch > 1: {why}"));
            }
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if !(self.round_timeout_s >= 0.001 && self.round_timeout_s <= 604_800.0) {
            return bad(format!(
                "round_timeout_s must be 0.001 to 604800 seconds (a week), got {}",
                self.round_timeout_s
            ));
        }
        self.speed.validate().map_err(SimConfigError::Invalid)?;
        if self.eval_every == 0 {
            return bad("eval_every must be at least 1".into());
        }
        if let Some(t) = self.target_accuracy
            && !(t > 0.0 && t <= 1.0)
        {
            return bad(format!("target_accuracy must be in (0, 1], got {t}"));
        }
        if (self.noise_multiplier.is_some() || self.local_epsilon.is_some()) && self.clip_norm.is_none() {
            return bad("differential privacy needs a clip norm (clip_norm)".into());
        }
        if self.adaptive_clip.is_some() && self.noise_multiplier.is_none() {
            return bad("adaptive_clip needs central DP (noise_multiplier)".into());
        }
        if let (Some(a), Some(z), Some(c)) = (self.adaptive_clip, self.noise_multiplier, self.clip_norm) {
            let m = ((self.fraction * self.devices as f64).ceil() as usize).max(self.min_train_clients);
            let clip = fedge_core::privacy::AdaptiveClip::new(a, c as f64)
                .map_err(|e| SimConfigError::Invalid(e.to_string()))?;
            clip.delta_noise_multiplier(z, m)
                .map_err(|e| SimConfigError::Invalid(format!("{e} ({m} devices a round)")))?;
        }
        if self.distill_every == Some(0) {
            return bad("distill_every must be at least 1".into());
        }
        if self.distill.epochs == 0 || self.distill.batch_size == 0 {
            return bad("distill epochs and batch_size must be at least 1".into());
        }
        self.distill.validate().map_err(SimConfigError::Invalid)?;
        if self.dataset.is_text() != self.model.is_text() {
            return bad(format!(
                "model `{}` cannot learn dataset `{}`: text (shakespeare, shakespeare-sample) takes `lstm` or `lstm-small`, images take `2nn` or `cnn`",
                self.model, self.dataset
            ));
        }
        if self.partition == PartitionKind::Natural && !self.dataset.is_text() {
            return bad(format!(
                "partition `natural` needs a dataset with its own clients (shakespeare), not `{}`",
                self.dataset
            ));
        }
        if self.student_model.is_text() {
            return bad(format!(
                "student_model `{}` reads text: students are image models (mlp, 2nn)",
                self.student_model
            ));
        }
        if self.dataset.is_text() && self.distill_every.is_some() {
            return bad("distillation (distill_every) is for image models only; hybrid inference is image-only".into());
        }
        if self.local_examples == Some(0) {
            return bad("local_examples must be at least 1".into());
        }
        if self.test_examples == Some(0) {
            return bad("test_examples must be at least 1".into());
        }
        if self.min_train_clients > self.devices {
            return bad(format!("min_train_clients {} exceeds devices {}", self.min_train_clients, self.devices));
        }
        self.engine_config()?;
        if self.mode == Mode::Fedbuff {
            self.async_config()?;
        }
        crate::attack::validate(self).map_err(SimConfigError::Invalid)?;
        crate::secure::validate(self).map_err(SimConfigError::Invalid)?;
        match self.partition() {
            Partition::Dirichlet { alpha } if !(alpha.is_finite() && alpha > 0.0) => {
                bad(format!("alpha must be positive, got {alpha}"))
            }
            Partition::Shards { shards_per_device: 0 } => bad("shards_per_device must be at least 1".into()),
            _ => Ok(()),
        }
    }

    /// The partitioner this config names.
    pub fn partition(&self) -> Partition {
        match self.partition {
            PartitionKind::Iid => Partition::Iid,
            PartitionKind::Shards => Partition::Shards { shards_per_device: self.shards_per_device },
            PartitionKind::Dirichlet => Partition::Dirichlet { alpha: self.alpha },
            PartitionKind::Natural => Partition::Natural,
        }
    }

    /// The training and privacy keys, as the engine reads them.
    pub fn training_keys(&self) -> TrainingKeys {
        TrainingKeys {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            adaptive_clip: self.adaptive_clip,
            local_epsilon: self.local_epsilon,
            delta: self.delta,
            target_epsilon: self.target_epsilon,
        }
    }

    /// The round engine's configuration, checked.
    pub fn engine_config(&self) -> Result<EngineConfig, SimConfigError> {
        let keys = self.training_keys();
        let mut c = EngineConfig {
            fraction: self.fraction,
            min_train_clients: self.min_train_clients,
            over_commit: 0.0,
            accept_failures: true,
            max_failures: None,
            // Virtual time: rounds never wait on a wall clock. Validated to be in [0.001, 604800]
            // (a NaN is refused before this is used).
            round_timeout: std::time::Duration::try_from_secs_f64(self.round_timeout_s)
                .unwrap_or(std::time::Duration::from_secs(3600)),
            train: keys.train(),
            seed: self.seed,
            privacy: keys.central_dp(),
            // With secure aggregation the devices add the noise (crate::secure).
            distributed_dp: self.secure_aggregation && self.noise_multiplier.is_some(),
            max_step_norm: self.max_step_norm,
            ..EngineConfig::default()
        };
        let invalid = |e: fedge_engine::ConfigError| SimConfigError::Invalid(e.to_string());
        c.set_strategy(&self.strategy, &self.strategy_options).map_err(invalid)?;
        c.validate().map_err(invalid)?;
        Ok(c)
    }

    /// The buffered engine's configuration (`mode = "fedbuff"`), checked, refusing what it
    /// does not run yet in one line.
    pub fn async_config(&self) -> Result<AsyncConfig, SimConfigError> {
        let bad = |m: String| Err(SimConfigError::Invalid(m));
        // Central DP is offered (DP-FedBuff, charged without subsampling amplification: see
        // fedge_engine::buffered); adaptive clipping and local DP are not.
        let privacy =
            [("adaptive_clip", self.adaptive_clip.is_some()), ("local_epsilon", self.local_epsilon.is_some())];
        if let Some((key, _)) = privacy.iter().find(|p| p.1) {
            return bad(format!(
                "{key} is not offered with mode = \"fedbuff\" (central DP is: noise_multiplier, target_epsilon): unset it or use mode = \"sync\""
            ));
        }
        if self.target_epsilon.is_some() && self.noise_multiplier.is_none() {
            return bad("target_epsilon needs central DP (noise_multiplier)".into());
        }
        if self.strategy != "fedavg" {
            return bad(format!(
                "mode = \"fedbuff\" aggregates with FedAvg over the buffer (server_lr applies); strategy `{}` is for mode = \"sync\"",
                self.strategy
            ));
        }
        let unsupported = [
            ("attack", self.attack.is_some()),
            ("dropout", self.dropout > 0.0),
            ("distill_every", self.distill_every.is_some()),
            ("max_step_norm", self.max_step_norm.is_some()),
        ];
        if let Some((key, _)) = unsupported.iter().find(|p| p.1) {
            return bad(format!("{key} is not supported with mode = \"fedbuff\" yet"));
        }
        let staleness = match self.staleness {
            StalenessKind::Constant => StalenessWeight::Constant,
            StalenessKind::Polynomial => StalenessWeight::Polynomial { exponent: self.staleness_exponent },
            StalenessKind::Hinge => StalenessWeight::Hinge { a: self.hinge_a, b: self.hinge_b },
        };
        let c = AsyncConfig {
            buffer_size: self.buffer_size,
            max_concurrency: self.max_concurrency,
            max_staleness: self.max_staleness,
            staleness,
            server_lr: self.strategy_options.server_lr.unwrap_or(1.0),
            train: self.training_keys().train(),
            privacy: self.training_keys().central_dp(),
            seed: self.seed,
            ..AsyncConfig::default()
        };
        c.validate().map_err(|e| SimConfigError::Invalid(e.to_string()))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
