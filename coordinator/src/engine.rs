//! The round engine: a sans-IO state machine for federated training rounds.
//!
//! Inputs are `handle_*` calls (a device joined or left, a result arrived, a device failed,
//! time passed) with `now` passed in; outputs are [`EngineEvent`]s taken with
//! [`RoundEngine::poll_event`], and the next deadline with [`RoundEngine::poll_timeout`]. The
//! engine never blocks, never reads a clock and never touches a socket, so the simulator (with a
//! virtual clock) and the network server drive the very same code.
//!
//! A round: [`RoundEngine::start_round`] samples `max(ceil(C * available), min_train_clients)`
//! devices and emits one [`EngineEvent::Assign`] each. Results are checked (right round and
//! model version, selected device, first upload only, right shape, finite) and streamed into
//! the strategy. The round closes when every selected device has answered or failed, or at the
//! deadline; with at least `min_train_clients` results (and no failure unless
//! `accept_failures`) the strategy aggregates and the model version advances. Otherwise the
//! round fails and the model stays as it was.
//!
//! With central DP ([`CentralDp`]) the engine also keeps the privacy ledger: each aggregated
//! round is one subsampled Gaussian step with `q = devices sampled / devices available`, and a
//! round that would take epsilon past the budget does not start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;
use fedge_core::params::ContentHash;
use fedge_core::privacy::{AdaptiveClipConfig, LedgerEntry, PrivacyError, PrivacyLedger};
use fedge_core::rng::{SeededRng, derive_rng, stream};
use fedge_core::wire::{DeviceId, ErrorCode, TrainConfig, TrainResult, TrainTask};
use rand::seq::IndexedRandom;
use thiserror::Error;

use crate::strategy::{Contribution, Strategy};

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
    /// Seed of device sampling.
    pub seed: u64,
    /// Central differential privacy, if on.
    pub privacy: Option<CentralDp>,
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
        }
    }
}

/// An impossible configuration.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// Fraction outside (0, 1].
    #[error("fraction must be in (0, 1], got {0}")]
    Fraction(f64),
    /// Zero quorum.
    #[error("min_train_clients must be at least 1")]
    MinClients,
    /// Negative or absurd over-commitment.
    #[error("over_commit must be in [0, 10], got {0}")]
    OverCommit(f64),
    /// Zero epochs or batch size, or a bad learning rate or clip norm.
    #[error("invalid training config: {0}")]
    Train(String),
    /// Bad privacy settings.
    #[error("invalid privacy settings: {0}")]
    Privacy(String),
}

impl EngineConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(ConfigError::Fraction(self.fraction));
        }
        if self.min_train_clients == 0 {
            return Err(ConfigError::MinClients);
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
        }
        Ok(())
    }
}

/// Why the configuration cannot change now.
#[derive(Debug, Error, PartialEq)]
pub enum ReconfigureError {
    /// A round is open.
    #[error("round {0} is in progress; change settings between rounds")]
    Busy(u64),
    /// The new settings are invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Why a round cannot start.
#[derive(Debug, Error, PartialEq)]
pub enum StartError {
    /// A round is in progress.
    #[error("round {0} is still in progress")]
    Busy(u64),
    /// Too few devices to reach the quorum.
    #[error("{available} devices available, {needed} needed")]
    NotEnoughDevices {
        /// Devices available.
        available: usize,
        /// Devices the quorum needs.
        needed: usize,
    },
    /// Asked for more rounds than the privacy budget allows.
    #[error(
        "privacy budget: {rounds} rounds would take epsilon from {spent:.4} to {would:.4}, past the target {target} (delta {delta:e}); {fits} rounds fit"
    )]
    TooManyRounds {
        /// Rounds asked for.
        rounds: u64,
        /// Rounds that fit.
        fits: u64,
        /// Epsilon spent so far.
        spent: f64,
        /// Epsilon after all the rounds asked for.
        would: f64,
        /// The budget.
        target: f64,
        /// The delta.
        delta: f64,
    },
    /// The round would spend more privacy than the budget allows.
    #[error(
        "privacy budget: round {round} would take epsilon from {spent:.4} to {would:.4}, past the target {target} (delta {delta:e})"
    )]
    Budget {
        /// The round refused.
        round: u64,
        /// Epsilon spent so far.
        spent: f64,
        /// Epsilon after the round.
        would: f64,
        /// The budget.
        target: f64,
        /// The delta.
        delta: f64,
    },
}

/// Why a result was refused. The device is told [`RejectReason::code`].
#[derive(Debug, Error, PartialEq)]
pub enum RejectReason {
    /// No round is open, or the result is for another round or model version.
    #[error("stale result: round {got_round} version {got_version}, current round {round} version {version}")]
    Stale {
        /// Round in the result.
        got_round: u64,
        /// Model version in the result.
        got_version: u64,
        /// Current round (0 if none is open).
        round: u64,
        /// Current model version.
        version: u64,
    },
    /// The device was not selected for this round.
    #[error("device {0} was not selected for this round")]
    NotSelected(DeviceId),
    /// The device already answered this round; the first answer stands.
    #[error("device {0} already answered this round")]
    Duplicate(DeviceId),
    /// Wrong shape or non-finite values.
    #[error("invalid update: {0}")]
    Invalid(AggregateError),
}

impl RejectReason {
    /// The wire error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Stale { .. } => ErrorCode::StaleModel,
            Self::NotSelected(_) => ErrorCode::NotSelected,
            Self::Duplicate(_) => ErrorCode::Duplicate,
            Self::Invalid(_) => ErrorCode::InvalidUpdate,
        }
    }
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundOutcome {
    /// Aggregated into a new model version.
    Aggregated,
    /// Not aggregated; the model is unchanged.
    Failed(String),
}

/// Summary of a closed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    /// Round number.
    pub round: u64,
    /// Model version after the round (unchanged if it failed).
    pub model_version: u64,
    /// Hash of that model.
    pub model_hash: ContentHash,
    /// Devices selected.
    pub selected: usize,
    /// Results accepted.
    pub results: usize,
    /// Devices that reported a failure.
    pub failures: usize,
    /// Selected devices that had not answered at the deadline.
    pub stragglers: Vec<DeviceId>,
    /// Over-committed devices still training when enough results were in: not needed, not
    /// failures.
    pub surplus: usize,
    /// Examples trained on, over accepted results.
    pub samples: u64,
    /// Sample-weighted mean of the devices' training losses.
    pub train_loss: f64,
    /// When the round closed.
    pub closed_at: Duration,
    /// Aggregated or failed.
    pub outcome: RoundOutcome,
    /// Privacy spent (central DP, aggregated rounds only).
    pub privacy: Option<LedgerEntry>,
}

/// What the engine wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Send `task` to `device`.
    Assign {
        /// The device.
        device: DeviceId,
        /// The task.
        task: TrainTask,
    },
    /// The round closed; a new model version exists if it aggregated. Evaluate it and report
    /// back with [`RoundEngine::handle_evaluation`].
    RoundClosed(RoundReport),
}

/// Why a stored round cannot be resumed.
#[derive(Debug, Error, PartialEq)]
pub enum ResumeError {
    /// A round is already open.
    #[error("round {0} is already open")]
    Busy(u64),
    /// The stored round was for another model version.
    #[error("stored round trained from model version {stored}, but the current version is {current}")]
    Version {
        /// Version in the stored round.
        stored: u64,
        /// Current version.
        current: u64,
    },
    /// The stored round does not follow the last closed one.
    #[error("stored round {stored} does not follow the last closed round {last}")]
    Sequence {
        /// The stored open round.
        stored: u64,
        /// The last round closed.
        last: u64,
    },
    /// A stored update does not fit the round.
    #[error("stored update of device {device}: {reason}")]
    Update {
        /// The device.
        device: DeviceId,
        /// Why it was refused.
        reason: RejectReason,
    },
}

/// A round read back from durable state, to resume.
#[derive(Debug, Clone, Copy)]
pub struct StoredRound<'a> {
    /// Round number.
    pub round: u64,
    /// Model version its devices train from.
    pub model_version: u64,
    /// Devices selected.
    pub chosen: &'a [DeviceId],
    /// Results it needs to close early.
    pub target: usize,
    /// Devices available when it was sampled.
    pub population: usize,
}

/// The open round, as a driver makes it durable.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenRoundInfo {
    /// Round number.
    pub round: u64,
    /// Model version the devices train from.
    pub model_version: u64,
    /// Devices selected.
    pub chosen: Vec<DeviceId>,
    /// Results the round waits for before closing early (the rest are over-commitment).
    pub target: usize,
    /// Results accepted so far.
    pub results: usize,
    /// Deadline on the engine's clock.
    pub deadline: Duration,
    /// Devices available when it was sampled (the population of the sampling rate).
    pub population: usize,
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    deadline: Duration,
    target: usize,
    chosen: BTreeSet<DeviceId>,
    pending: BTreeSet<DeviceId>,
    selected: usize,
    results: usize,
    failures: usize,
    samples: u64,
    loss_sum: f64,
    population: usize,
    clip: Option<f64>,
}

/// Evaluation of a model version on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Fraction correct.
    pub accuracy: f64,
    /// Mean loss.
    pub loss: f64,
}

/// The round engine. See the module docs.
pub struct RoundEngine<S: Strategy> {
    config: EngineConfig,
    strategy: S,
    global: ModelParams,
    version: u64,
    /// The next version number to hand out (global models and registered students share one
    /// sequence).
    next_version: u64,
    last_round: u64,
    available: BTreeSet<DeviceId>,
    open: Option<OpenRound>,
    events: VecDeque<EngineEvent>,
    evaluations: BTreeMap<u64, Evaluation>,
    rng: SeededRng,
    ledger: Option<PrivacyLedger>,
}

impl<S: Strategy> RoundEngine<S> {
    /// An engine starting from `initial` as model version 0.
    pub fn new(config: EngineConfig, strategy: S, initial: ModelParams) -> Result<Self, ConfigError> {
        config.validate()?;
        let rng = derive_rng(config.seed, &[stream::SAMPLING]);
        let ledger = match &config.privacy {
            Some(p) => Some(PrivacyLedger::new(p.delta).map_err(|e| ConfigError::Privacy(e.to_string()))?),
            None => None,
        };
        Ok(Self {
            config,
            strategy,
            global: initial,
            version: 0,
            next_version: 1,
            last_round: 0,
            available: BTreeSet::new(),
            open: None,
            events: VecDeque::new(),
            evaluations: BTreeMap::new(),
            rng,
            ledger,
        })
    }

    /// An engine resuming from stored state: `global` is model `version`, `last_round` rounds
    /// have closed, no round is open.
    pub fn restore(
        config: EngineConfig,
        strategy: S,
        global: ModelParams,
        version: u64,
        last_round: u64,
    ) -> Result<Self, ConfigError> {
        let mut e = Self::new(config, strategy, global)?;
        e.version = version;
        e.next_version = version + 1;
        e.last_round = last_round;
        Ok(e)
    }

    /// The current global model.
    pub fn global(&self) -> &ModelParams {
        &self.global
    }

    /// The current model version (0 before any aggregation).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The open round, if any.
    pub fn current_round(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.round)
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Changes the configuration for the rounds to come; refused while a round is open (the
    /// open round keeps the settings it started with) or if the result is invalid.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut EngineConfig)) -> Result<(), ReconfigureError> {
        if let Some(o) = &self.open {
            return Err(ReconfigureError::Busy(o.round));
        }
        let mut next = self.config.clone();
        change(&mut next);
        next.validate()?;
        self.config = next;
        Ok(())
    }

    /// Evaluations reported so far, by model version.
    pub fn evaluations(&self) -> &BTreeMap<u64, Evaluation> {
        &self.evaluations
    }

    /// A device can be sampled from now on.
    pub fn handle_device_available(&mut self, device: DeviceId) {
        self.available.insert(device);
    }

    /// A device went away; if it was training in the open round, that counts as a failure.
    pub fn handle_device_gone(&mut self, now: Duration, device: DeviceId) {
        self.available.remove(&device);
        self.handle_train_failure(now, device);
    }

    /// Samples devices and opens the next round, emitting one `Assign` per device.
    ///
    /// The round needs `k = max(ceil(C * available), min_train_clients)` results; with
    /// over-commitment `o` it samples `ceil(k * (1 + o))` devices (at most all of them) and
    /// closes once `k` have answered.
    pub fn start_round(&mut self, now: Duration) -> Result<u64, StartError> {
        if let Some(o) = &self.open {
            return Err(StartError::Busy(o.round));
        }
        let n = self.available.len();
        let needed = self.config.min_train_clients;
        if n < needed {
            return Err(StartError::NotEnoughDevices { available: n, needed });
        }
        let (k, sampled) = self.sample_sizes(n);
        let round = self.last_round + 1;
        if let (Some(p), Some(ledger)) = (&self.config.privacy, &self.ledger)
            && let Some(target) = p.target_epsilon
        {
            let q = sampled as f64 / n as f64;
            let would = ledger.preview(q, p.noise_multiplier, 1).map(|e| e.epsilon).unwrap_or(f64::INFINITY);
            if would > target {
                return Err(StartError::Budget {
                    round,
                    spent: ledger.epsilon(),
                    would,
                    target,
                    delta: ledger.delta(),
                });
            }
        }
        let pool: Vec<DeviceId> = self.available.iter().copied().collect();
        let mut chosen: Vec<DeviceId> = pool.sample(&mut self.rng, sampled).copied().collect();
        chosen.sort_unstable();
        let task = self.open(now, round, &chosen, k, n);
        for &device in &chosen {
            self.events.push_back(EngineEvent::Assign { device, task: task.clone() });
        }
        Ok(round)
    }

    /// Results needed and devices sampled when `n` devices are available.
    fn sample_sizes(&self, n: usize) -> (usize, usize) {
        let k = ((self.config.fraction * n as f64).ceil() as usize).max(self.config.min_train_clients).min(n);
        let sampled = ((k as f64 * (1.0 + self.config.over_commit)).ceil() as usize).clamp(k, n);
        (k, sampled)
    }

    /// Whether `rounds` more rounds at today's sampling rate fit the privacy budget. Without
    /// central DP, a budget or any device available, there is nothing to check (each round
    /// is checked again when it starts).
    pub fn check_budget(&self, rounds: u64) -> Result<(), StartError> {
        let (Some(p), Some(ledger)) = (&self.config.privacy, &self.ledger) else { return Ok(()) };
        let Some(target) = p.target_epsilon else { return Ok(()) };
        let n = self.available.len();
        if n == 0 || rounds == 0 {
            return Ok(());
        }
        let q = self.sample_sizes(n).1 as f64 / n as f64;
        let would = ledger.preview(q, p.noise_multiplier, rounds).map(|e| e.epsilon).unwrap_or(f64::INFINITY);
        if would <= target {
            return Ok(());
        }
        let fits = ledger.rounds_within(q, p.noise_multiplier, target, rounds).unwrap_or(0);
        Err(StartError::TooManyRounds { rounds, fits, spent: ledger.epsilon(), would, target, delta: ledger.delta() })
    }

    /// The clip norm devices are asked for now (central DP).
    pub fn clip_norm(&self) -> Option<f64> {
        self.strategy.clip_norm()
    }

    fn open(&mut self, now: Duration, round: u64, chosen: &[DeviceId], target: usize, population: usize) -> TrainTask {
        self.last_round = round;
        self.strategy.begin_round(round, &self.global, target);
        let clip = self.strategy.clip_norm();
        let mut config = self.config.train;
        if let Some(c) = clip {
            config.clip_norm = Some(c as f32);
        }
        self.open = Some(OpenRound {
            round,
            deadline: now + self.config.round_timeout,
            target,
            pending: chosen.iter().copied().collect(),
            chosen: chosen.iter().copied().collect(),
            selected: chosen.len(),
            results: 0,
            failures: 0,
            samples: 0,
            loss_sum: 0.0,
            population: population.max(chosen.len()).max(1),
            clip,
        });
        TrainTask { round, model_version: self.version, model_hash: self.global.content_hash(), config }
    }

    /// The open round, for a driver to make durable.
    pub fn open_round(&self) -> Option<OpenRoundInfo> {
        self.open.as_ref().map(|o| OpenRoundInfo {
            round: o.round,
            model_version: self.version,
            chosen: o.chosen.iter().copied().collect(),
            target: o.target,
            results: o.results,
            deadline: o.deadline,
            population: o.population,
        })
    }

    /// Hands out a version number for a model made outside the rounds (a distilled student);
    /// the next global model takes the number after it.
    pub fn allocate_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    /// After a restart: version numbers up to `version` are taken (by registered models).
    pub fn reserve_versions_through(&mut self, version: u64) {
        self.next_version = self.next_version.max(version + 1);
    }

    /// The privacy ledger (central DP only).
    pub fn privacy_ledger(&self) -> Option<&PrivacyLedger> {
        self.ledger.as_ref()
    }

    /// Rebuilds the privacy ledger from stored entries after a restart.
    pub fn restore_ledger(&mut self, entries: impl IntoIterator<Item = LedgerEntry>) -> Result<(), PrivacyError> {
        if let Some(p) = &self.config.privacy {
            self.ledger = Some(PrivacyLedger::from_entries(p.delta, entries)?);
        }
        Ok(())
    }

    /// Reopens round `round` (trained from `model_version`) after a restart: the same devices
    /// `chosen` (needing `target` results), the updates `accepted` before the restart folded in
    /// again, and an `Assign` for every device that had not answered. The deadline starts again from `now`: devices
    /// need time to reconnect. If the stored updates already complete the round, it closes at
    /// once.
    pub fn resume_round(
        &mut self,
        now: Duration,
        stored: StoredRound<'_>,
        accepted: &[(DeviceId, TrainResult)],
    ) -> Result<(), ResumeError> {
        let StoredRound { round, model_version, chosen, target, population } = stored;
        if let Some(o) = &self.open {
            return Err(ResumeError::Busy(o.round));
        }
        if round != self.last_round + 1 {
            return Err(ResumeError::Sequence { stored: round, last: self.last_round });
        }
        if model_version != self.version {
            return Err(ResumeError::Version { stored: model_version, current: self.version });
        }
        let task = self.open(now, round, chosen, target.clamp(1, chosen.len().max(1)), population);
        for (device, result) in accepted {
            if let Err(reason) = self.handle_train_result(now, *device, result) {
                // Leave no half-resumed round behind.
                self.open = None;
                self.last_round = round - 1;
                self.events.clear();
                return Err(ResumeError::Update { device: *device, reason });
            }
        }
        if let Some(o) = &self.open {
            for &device in &o.pending {
                self.events.push_back(EngineEvent::Assign { device, task: task.clone() });
            }
        }
        Ok(())
    }

    /// What [`Self::handle_train_result`] would refuse, checked without changing anything, so
    /// that a driver can make an acceptable result durable before it counts.
    pub fn check_train_result(&self, device: DeviceId, result: &TrainResult) -> Result<(), RejectReason> {
        let version = self.version;
        let Some(open) = self.open.as_ref().filter(|o| o.round == result.round && result.model_version == version)
        else {
            return Err(RejectReason::Stale {
                got_round: result.round,
                got_version: result.model_version,
                round: self.current_round().unwrap_or(0),
                version,
            });
        };
        if !open.chosen.contains(&device) {
            return Err(RejectReason::NotSelected(device));
        }
        if !open.pending.contains(&device) {
            return Err(RejectReason::Duplicate(device));
        }
        let contribution =
            Contribution { delta: &result.delta, num_samples: result.num_samples, clipped: result.clipped };
        self.strategy.check(contribution).map_err(RejectReason::Invalid)
    }

    /// A device's result arrived. Accepted results are streamed into the strategy at once.
    pub fn handle_train_result(
        &mut self,
        now: Duration,
        device: DeviceId,
        result: &TrainResult,
    ) -> Result<(), RejectReason> {
        self.check_train_result(device, result)?;
        let contribution =
            Contribution { delta: &result.delta, num_samples: result.num_samples, clipped: result.clipped };
        self.strategy.accumulate(contribution).map_err(RejectReason::Invalid)?;
        let open = self.open.as_mut().expect("checked: a round is open");
        open.pending.remove(&device);
        open.results += 1;
        open.samples += result.num_samples;
        if result.train_loss.is_finite() {
            open.loss_sum += result.train_loss as f64 * result.num_samples as f64;
        }
        self.close_if_done(now);
        Ok(())
    }

    /// A selected device reported that it could not train (or vanished). Unknown devices and
    /// devices not pending in the open round are ignored.
    pub fn handle_train_failure(&mut self, now: Duration, device: DeviceId) {
        if let Some(open) = self.open.as_mut()
            && open.pending.remove(&device)
        {
            open.failures += 1;
            self.close_if_done(now);
        }
    }

    /// Time passed: closes the open round if its deadline is reached.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.open.as_ref().is_some_and(|o| now >= o.deadline) {
            self.close(now);
        }
    }

    /// The evaluation of model `version` the driver was asked for.
    pub fn handle_evaluation(&mut self, version: u64, evaluation: Evaluation) {
        self.evaluations.insert(version, evaluation);
    }

    /// The next thing to do, if any.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.open.as_ref().map(|o| o.deadline)
    }

    fn close_if_done(&mut self, now: Duration) {
        if self.open.as_ref().is_some_and(|o| o.pending.is_empty() || o.results >= o.target) {
            self.close(now);
        }
    }

    fn close(&mut self, now: Duration) {
        let Some(open) = self.open.take() else { return };
        // Enough results: devices still training were over-committed, not late.
        let (stragglers, surplus) = if open.results >= open.target {
            (Vec::new(), open.pending.len())
        } else {
            (open.pending.iter().copied().collect::<Vec<DeviceId>>(), 0)
        };
        let failures = open.failures + stragglers.len();
        let outcome = if open.results < self.config.min_train_clients {
            RoundOutcome::Failed(format!(
                "{} results, {} needed ({} failed, {} past the deadline)",
                open.results,
                self.config.min_train_clients,
                open.failures,
                stragglers.len()
            ))
        } else if failures > 0 && !self.config.accept_failures {
            RoundOutcome::Failed(format!("{failures} devices failed and failures are not accepted"))
        } else if let Some(bound) = self.config.max_failures.filter(|&b| failures > b) {
            RoundOutcome::Failed(format!("{failures} devices failed, at most {bound} accepted"))
        } else {
            match self.strategy.aggregate_train(open.round, &self.global, failures) {
                Ok(next) => {
                    self.global = next;
                    self.version = self.next_version;
                    self.next_version += 1;
                    RoundOutcome::Aggregated
                }
                Err(e) => RoundOutcome::Failed(format!("aggregation failed: {e}")),
            }
        };
        // A released model is one subsampled Gaussian step; a failed round releases nothing.
        let privacy = match (&outcome, &self.config.privacy, self.ledger.as_mut()) {
            (RoundOutcome::Aggregated, Some(p), Some(ledger)) => {
                let q = open.selected as f64 / open.population as f64;
                let clip = open.clip.unwrap_or(p.clip_norm);
                ledger.record(open.round, q, p.noise_multiplier, clip).ok()
            }
            _ => None,
        };
        let train_loss = if open.samples > 0 { open.loss_sum / open.samples as f64 } else { f64::NAN };
        self.events.push_back(EngineEvent::RoundClosed(RoundReport {
            round: open.round,
            model_version: self.version,
            model_hash: self.global.content_hash(),
            selected: open.selected,
            results: open.results,
            failures: open.failures,
            stragglers,
            surplus,
            samples: open.samples,
            train_loss,
            closed_at: now,
            outcome,
            privacy,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::FedAvg;
    use fedge_core::wire::LocalDp;
    use fedge_core::{ParamLayout, TensorSpec};
    use std::sync::Arc;

    const S: Duration = Duration::from_secs(1);

    fn stored(
        round: u64,
        model_version: u64,
        chosen: &[DeviceId],
        target: usize,
        population: usize,
    ) -> StoredRound<'_> {
        StoredRound { round, model_version, chosen, target, population }
    }

    fn layout() -> Arc<ParamLayout> {
        Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2] }]).unwrap())
    }

    fn params(v: [f32; 2]) -> ModelParams {
        ModelParams::new(layout(), v.to_vec()).unwrap()
    }

    fn engine(devices: u64, config: EngineConfig) -> RoundEngine<FedAvg> {
        let mut e = RoundEngine::new(config, FedAvg::default(), params([0.0, 0.0])).unwrap();
        for d in 0..devices {
            e.handle_device_available(d);
        }
        e
    }

    fn cfg(fraction: f64, min: usize) -> EngineConfig {
        EngineConfig { fraction, min_train_clients: min, round_timeout: 10 * S, ..EngineConfig::default() }
    }

    fn assigned<S: Strategy>(e: &mut RoundEngine<S>) -> Vec<(DeviceId, TrainTask)> {
        let mut out = Vec::new();
        while let Some(ev) = e.poll_event() {
            match ev {
                EngineEvent::Assign { device, task } => out.push((device, task)),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    fn closed<S: Strategy>(e: &mut RoundEngine<S>) -> RoundReport {
        match e.poll_event() {
            Some(EngineEvent::RoundClosed(r)) => r,
            other => panic!("expected RoundClosed, got {other:?}"),
        }
    }

    fn result(task: &TrainTask, delta: [f32; 2], n: u64) -> TrainResult {
        TrainResult {
            round: task.round,
            model_version: task.model_version,
            num_samples: n,
            train_loss: 0.5,
            delta: params(delta),
            clipped: false,
        }
    }

    #[test]
    fn a_round_samples_collects_and_aggregates() {
        let mut e = engine(10, cfg(0.3, 1));
        assert_eq!(e.start_round(S), Ok(1));
        let tasks = assigned(&mut e);
        assert_eq!(tasks.len(), 3);
        assert!(
            tasks
                .iter()
                .all(|(_, t)| t.round == 1 && t.model_version == 0 && t.model_hash == e.global().content_hash())
        );
        for (i, (d, t)) in tasks.iter().enumerate() {
            assert!(e.poll_event().is_none());
            e.handle_train_result(2 * S, *d, &result(t, [i as f32, 1.0], 10 * (i as u64 + 1))).unwrap();
        }
        let r = closed(&mut e);
        assert_eq!((r.round, r.model_version, r.results, r.failures, r.samples), (1, 1, 3, 0, 60));
        assert_eq!(r.outcome, RoundOutcome::Aggregated);
        assert_eq!(r.closed_at, 2 * S);
        // Weighted mean of deltas (0,1)x10, (1,1)x20, (2,1)x30 = (80/60, 1).
        assert_eq!(e.global().data(), &[80.0 / 60.0, 1.0]);
        assert_eq!(e.version(), 1);
        assert_eq!(r.model_hash, e.global().content_hash());
    }

    #[test]
    fn bad_results_are_refused_with_their_code() {
        let mut e = engine(4, cfg(0.5, 1));
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        let (d, t) = tasks[0].clone();
        let unselected = (0..4).find(|x| tasks.iter().all(|(s, _)| s != x)).unwrap();
        let stale = TrainResult { model_version: 7, ..result(&t, [0.0; 2], 1) };
        let wrong_round = TrainResult { round: 9, ..result(&t, [0.0; 2], 1) };
        let nan = result(&t, [f32::NAN, 0.0], 1);
        let wrong_shape = TrainResult {
            delta: ModelParams::new(
                Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![3] }]).unwrap()),
                vec![0.0; 3],
            )
            .unwrap(),
            ..result(&t, [0.0; 2], 1)
        };
        let check = |e: &mut RoundEngine<FedAvg>, dev, r: &TrainResult, code| {
            assert_eq!(e.handle_train_result(S, dev, r).unwrap_err().code(), code);
        };
        check(&mut e, d, &stale, ErrorCode::StaleModel);
        check(&mut e, d, &wrong_round, ErrorCode::StaleModel);
        check(&mut e, unselected, &result(&t, [0.0; 2], 1), ErrorCode::NotSelected);
        check(&mut e, d, &nan, ErrorCode::InvalidUpdate);
        check(&mut e, d, &wrong_shape, ErrorCode::InvalidUpdate);
        // None of that disturbed the round: the good result is accepted, then a repeat refused.
        e.handle_train_result(S, d, &result(&t, [2.0, 2.0], 1)).unwrap();
        check(&mut e, d, &result(&t, [9.0, 9.0], 1), ErrorCode::Duplicate);
        e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 0.0], 1)).unwrap();
        assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
        assert_eq!(e.global().data(), &[1.0, 1.0], "first upload wins, bad ones ignored");
        // After the round, a late result is stale.
        check(&mut e, d, &result(&t, [0.0; 2], 1), ErrorCode::StaleModel);
    }

    #[test]
    fn stragglers_are_dropped_at_the_deadline() {
        let mut e = engine(3, cfg(1.0, 2));
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        e.handle_train_result(2 * S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
        e.handle_train_result(3 * S, tasks[1].0, &result(&tasks[1].1, [1.0, 1.0], 5)).unwrap();
        assert_eq!(e.poll_timeout(), Some(11 * S));
        e.handle_timeout(10 * S);
        assert!(e.poll_event().is_none(), "not before the deadline");
        e.handle_timeout(11 * S);
        let r = closed(&mut e);
        assert_eq!(r.stragglers, vec![tasks[2].0]);
        assert_eq!(r.outcome, RoundOutcome::Aggregated);
        assert_eq!(e.global().data(), &[2.0, 2.0]);
        // The straggler's late answer is stale.
        assert!(matches!(
            e.handle_train_result(12 * S, tasks[2].0, &result(&tasks[2].1, [0.0; 2], 1)),
            Err(RejectReason::Stale { .. })
        ));
    }

    #[test]
    fn without_quorum_the_model_stays() {
        let mut e = engine(3, cfg(1.0, 2));
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
        e.handle_train_failure(S, tasks[1].0);
        e.handle_device_gone(S, tasks[2].0);
        let r = closed(&mut e);
        assert!(
            matches!(r.outcome, RoundOutcome::Failed(ref m) if m.contains("1 results, 2 needed")),
            "{:?}",
            r.outcome
        );
        assert_eq!((r.failures, e.version()), (2, 0));
        assert_eq!(e.global().data(), &[0.0, 0.0]);
        // The next round starts from the same version, without the departed device.
        assert_eq!(e.start_round(2 * S), Ok(2));
        let tasks = assigned(&mut e);
        assert_eq!(tasks.len(), 2);
        assert!(tasks.iter().all(|(_, t)| t.model_version == 0));
    }

    #[test]
    fn failures_fail_the_round_unless_accepted() {
        let mut e = engine(2, EngineConfig { accept_failures: false, ..cfg(1.0, 1) });
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
        e.handle_train_failure(S, tasks[1].0);
        assert!(matches!(closed(&mut e).outcome, RoundOutcome::Failed(_)));
        assert_eq!(e.version(), 0);
    }

    #[test]
    fn failures_beyond_the_bound_fail_the_round() {
        let run = |bound| {
            let mut e = engine(4, EngineConfig { max_failures: Some(bound), ..cfg(1.0, 1) });
            e.start_round(S).unwrap();
            let tasks = assigned(&mut e);
            e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
            e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [3.0, 3.0], 5)).unwrap();
            e.handle_train_failure(S, tasks[2].0);
            e.handle_timeout(11 * S); // tasks[3] is late
            closed(&mut e).outcome
        };
        assert_eq!(run(2), RoundOutcome::Aggregated);
        assert!(matches!(run(1), RoundOutcome::Failed(ref m) if m.contains("2 devices failed, at most 1")));
    }

    #[test]
    fn sampling_is_seeded_and_respects_the_quorum() {
        let pick = |seed| {
            let mut e = engine(100, EngineConfig { seed, ..cfg(0.1, 1) });
            e.start_round(S).unwrap();
            assigned(&mut e).into_iter().map(|(d, _)| d).collect::<Vec<_>>()
        };
        assert_eq!(pick(1).len(), 10);
        assert_eq!(pick(1), pick(1));
        assert_ne!(pick(1), pick(2));
        // The quorum lifts the sample size: 10% of 5 devices is 1, but 3 are needed.
        let mut e = engine(5, cfg(0.1, 3));
        e.start_round(S).unwrap();
        assert_eq!(assigned(&mut e).len(), 3);
        assert_eq!(e.start_round(S), Err(StartError::Busy(1)));
        let mut e = engine(2, cfg(0.1, 3));
        assert_eq!(e.start_round(S), Err(StartError::NotEnoughDevices { available: 2, needed: 3 }));
    }

    #[test]
    fn reconfigure_between_rounds_only() {
        let mut e = engine(10, cfg(0.1, 1));
        e.reconfigure(|c| c.fraction = 0.5).unwrap();
        assert_eq!(e.reconfigure(|c| c.fraction = 0.0), Err(ReconfigureError::Invalid(ConfigError::Fraction(0.0))));
        e.start_round(S).unwrap();
        assert_eq!(assigned(&mut e).len(), 5);
        assert_eq!(e.reconfigure(|c| c.fraction = 1.0), Err(ReconfigureError::Busy(1)));
        assert_eq!(e.config().fraction, 0.5);
    }

    #[test]
    fn impossible_configs_are_refused() {
        let bad =
            |c: EngineConfig| RoundEngine::new(c, FedAvg::default(), params([0.0; 2])).err().map(|e| e.to_string());
        let t = EngineConfig::default().train;
        assert!(bad(cfg(0.0, 1)).unwrap().contains("fraction"));
        assert!(bad(cfg(1.5, 1)).unwrap().contains("fraction"));
        assert!(bad(cfg(0.5, 0)).unwrap().contains("min_train_clients"));
        assert!(
            bad(EngineConfig { train: TrainConfig { batch_size: 0, ..t }, ..cfg(0.5, 1) }).unwrap().contains("batch")
        );
        assert!(bad(EngineConfig { train: TrainConfig { epochs: 0, ..t }, ..cfg(0.5, 1) }).unwrap().contains("epochs"));
        assert!(
            bad(EngineConfig {
                train: TrainConfig { local_dp: Some(LocalDp { epsilon: 1.0, delta: 1e-5 }), ..t },
                ..cfg(0.5, 1)
            })
            .unwrap()
            .contains("clip")
        );
        assert!(bad(cfg(0.5, 1)).is_none());
    }

    #[test]
    fn over_commitment_closes_the_round_when_enough_have_answered() {
        let mut e = engine(10, EngineConfig { over_commit: 0.5, accept_failures: false, ..cfg(0.2, 1) });
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        assert_eq!(tasks.len(), 3, "2 needed, 50% more sampled");
        assert_eq!(e.open_round().unwrap().target, 2);
        e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [1.0, 1.0], 1)).unwrap();
        assert!(e.poll_event().is_none());
        e.handle_train_result(S, tasks[2].0, &result(&tasks[2].1, [3.0, 3.0], 1)).unwrap();
        let r = closed(&mut e);
        // The third device was surplus: not a failure, not a straggler, even without
        // accept_failures.
        assert_eq!((r.results, r.failures, r.surplus, r.stragglers.len()), (2, 0, 1, 0));
        assert_eq!(r.outcome, RoundOutcome::Aggregated);
        assert_eq!(e.global().data(), &[2.0, 2.0]);
        // Its late answer is told the round is over.
        assert_eq!(
            e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0; 2], 1)).unwrap_err().code(),
            ErrorCode::StaleModel
        );
        assert!(matches!(
            RoundEngine::new(EngineConfig { over_commit: -0.1, ..cfg(0.2, 1) }, FedAvg::default(), params([0.0; 2])),
            Err(ConfigError::OverCommit(_))
        ));
    }

    #[test]
    fn a_resumed_round_keeps_its_accepted_updates_and_reassigns_the_rest() {
        // Life 1: round 1 opens with 3 devices; two answer, then the coordinator "crashes".
        let mut first = engine(3, cfg(1.0, 3));
        first.start_round(S).unwrap();
        let tasks = assigned(&mut first);
        let info = first.open_round().unwrap();
        assert_eq!((info.round, info.model_version, info.chosen.len(), info.target), (1, 0, 3, 3));
        let accepted: Vec<(DeviceId, TrainResult)> =
            vec![(tasks[0].0, result(&tasks[0].1, [1.0, 0.0], 1)), (tasks[1].0, result(&tasks[1].1, [2.0, 0.0], 1))];
        for (d, r) in &accepted {
            first.check_train_result(*d, r).unwrap();
            first.handle_train_result(S, *d, r).unwrap();
        }

        // Life 2: restored at version 0 after round 0, the round reopened from the record.
        let mut e = RoundEngine::restore(cfg(1.0, 3), FedAvg::default(), params([0.0, 0.0]), 0, 0).unwrap();
        e.resume_round(100 * S, stored(1, 0, &info.chosen, info.target, info.population), &accepted).unwrap();
        let again = assigned(&mut e);
        assert_eq!(again.len(), 1, "only the device that had not answered is asked again");
        assert_eq!(again[0].0, tasks[2].0);
        assert_eq!(again[0].1, tasks[2].1, "the same task as before the crash");
        assert_eq!(e.poll_timeout(), Some(110 * S), "a fresh deadline for reconnecting devices");
        // An acknowledged update sent again is a duplicate, not counted twice.
        assert_eq!(e.check_train_result(tasks[0].0, &accepted[0].1).unwrap_err().code(), ErrorCode::Duplicate);
        e.handle_train_result(101 * S, tasks[2].0, &result(&tasks[2].1, [3.0, 0.0], 1)).unwrap();
        let r = closed(&mut e);
        assert_eq!((r.round, r.results, r.model_version), (1, 3, 1));
        assert_eq!(e.global().data(), &[2.0, 0.0], "mean of all three, the two from before the crash included");

        // Stored state that does not fit is refused, leaving no round open.
        let mut e = RoundEngine::restore(cfg(1.0, 3), FedAvg::default(), params([0.0, 0.0]), 0, 0).unwrap();
        assert_eq!(
            e.resume_round(S, stored(2, 0, &info.chosen, 3, 3), &[]),
            Err(ResumeError::Sequence { stored: 2, last: 0 })
        );
        assert_eq!(
            e.resume_round(S, stored(1, 5, &info.chosen, 3, 3), &[]),
            Err(ResumeError::Version { stored: 5, current: 0 })
        );
        let foreign = vec![(99, result(&tasks[0].1, [1.0, 0.0], 1))];
        assert!(matches!(
            e.resume_round(S, stored(1, 0, &info.chosen, 3, 3), &foreign),
            Err(ResumeError::Update { .. })
        ));
        assert_eq!(e.current_round(), None);
        assert!(e.poll_event().is_none());
        // All updates stored: the round closes during the resume.
        let all: Vec<(DeviceId, TrainResult)> =
            tasks.iter().map(|(d, t)| (*d, result(t, [*d as f32, 0.0], 1))).collect();
        e.resume_round(S, stored(1, 0, &info.chosen, 3, 3), &all).unwrap();
        assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
    }

    #[test]
    fn central_dp_keeps_a_ledger_sets_the_clip_and_enforces_the_budget() {
        let privacy =
            CentralDp { noise_multiplier: 1.0, clip_norm: 0.5, adaptive: None, delta: 1e-5, target_epsilon: None };
        let config = EngineConfig { privacy: Some(privacy.clone()), ..cfg(0.25, 1) };
        let strategy = crate::strategy::for_config(&config, Box::new(derive_rng(1, &[])));
        let mut e = RoundEngine::new(config.clone(), strategy, params([0.0, 0.0])).unwrap();
        for d in 0..8 {
            e.handle_device_available(d);
        }
        let mut eps = Vec::new();
        for round in 1..=3 {
            e.start_round(S).unwrap();
            let tasks = assigned(&mut e);
            assert_eq!(tasks.len(), 2, "q = 2 of 8");
            // Devices are told the clip norm; they add no noise themselves.
            assert!(tasks.iter().all(|(_, t)| t.config.clip_norm == Some(0.5) && t.config.local_dp.is_none()));
            for (d, t) in &tasks {
                e.handle_train_result(S, *d, &result(t, [3.0, 4.0], 10)).unwrap();
            }
            let r = closed(&mut e);
            let p = r.privacy.expect("an aggregated round is accounted");
            assert_eq!((p.round, p.sampling_rate, p.noise_multiplier, p.clip_norm), (round, 0.25, 1.0, 0.5));
            let want = fedge_core::privacy::epsilon(0.25, 1.0, round, 1e-5).unwrap().epsilon;
            assert!((p.epsilon - want).abs() < 1e-12);
            eps.push(p.epsilon);
        }
        assert_eq!(e.privacy_ledger().unwrap().entries().len(), 3);

        // A budget that fits one more round but not two.
        let four = fedge_core::privacy::epsilon(0.25, 1.0, 4, 1e-5).unwrap().epsilon;
        let five = fedge_core::privacy::epsilon(0.25, 1.0, 5, 1e-5).unwrap().epsilon;
        assert!(eps[2] < four && four < five);
        let target = (four + five) / 2.0;
        let budget = EngineConfig { privacy: Some(CentralDp { target_epsilon: Some(target), ..privacy }), ..config };
        let strategy = crate::strategy::for_config(&budget, Box::new(derive_rng(1, &[])));
        let mut b = RoundEngine::new(budget, strategy, params([0.0, 0.0])).unwrap();
        for d in 0..8 {
            b.handle_device_available(d);
        }
        let entries = e.privacy_ledger().unwrap().entries().to_vec();
        b.restore_ledger(entries).unwrap();
        assert!(b.check_budget(1).is_ok());
        match b.check_budget(3) {
            Err(StartError::TooManyRounds { rounds: 3, fits: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        b.start_round(S).unwrap();
        for (d, t) in assigned(&mut b) {
            b.handle_train_result(S, d, &result(&t, [0.1, 0.1], 1)).unwrap();
        }
        assert!(closed(&mut b).privacy.is_some());
        let err = b.start_round(2 * S).unwrap_err();
        assert!(matches!(err, StartError::Budget { round: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("past the target"), "{err}");
        assert!(b.poll_event().is_none(), "a refused round assigns nothing");
    }
}
