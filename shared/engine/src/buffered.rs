//! Buffered asynchronous aggregation: FedBuff (Nguyen et al., "Federated Learning with
//! Buffered Asynchronous Aggregation", AISTATS 2022), as a sans-IO state machine in the style
//! of [`crate::RoundEngine`].
//!
//! There are no rounds. Whenever fewer than `max_concurrency` devices are training,
//! [`BufferedEngine::poll_event`] hands a free device (drawn uniformly among the available
//! devices holding no task, from the seeded stream [`stream::ASYNC_SAMPLING`]) a task on the
//! newest model. Each task has its own number (the wire's `round` field) and names the model
//! version it trains from; a device holds at most one task at a time. A result's staleness is
//! `s = current version - version it trained from`; a result with `s > max_staleness` is
//! refused ([`AsyncRejectReason::TooStale`]). An accepted result passes the synchronous
//! engine's checks (the same code: the sample cap, the server-side clip, the shape and
//! finiteness checks of FedAvg's accumulator) and is folded into the buffer with its delta
//! scaled by `w(s)` ([`StalenessWeight`]). Every `buffer_size` (K) accepted results the
//! buffer becomes the next model version:
//!
//! ```text
//! x <- x + eta_g * sum_i n_i w(s_i) delta_i / sum_i n_i
//! ```
//!
//! with `n_i` the (capped) sample counts. With equal sample counts this is the paper's
//! `eta_g / K * sum_i w(s_i) delta_i`; staleness shrinks the step rather than only moving
//! weight between results (dividing by `sum_i n_i w(s_i)` would undo the discount whenever
//! every result in the buffer is equally stale). With `w = 1` it is FedAvg over the buffer.
//! Each aggregation emits [`AsyncEvent::Aggregated`] with its report.
//!
//! Central differential privacy (`privacy`, DP-FedBuff): each aggregation releases one sum of
//! the buffer's deltas, each clipped to `C` by the server and then scaled by its staleness
//! weight `w(s) <= 1`, plus N(0, (z C)^2), divided by K (a fixed denominator, as DP-FedAvg's;
//! sample counts do not weigh). Under DP a device that has a result in the open buffer gets no
//! new task until that buffer is aggregated, so one device moves one release by at most `C`
//! (add or remove one device's data): each aggregation is one Gaussian mechanism of
//! sensitivity `C` and noise multiplier `z`. Which devices fill a buffer is decided by who is
//! free and how fast they train, not by Poisson or uniform sampling of the population, so no
//! subsampling amplification is claimed: the ledger charges every aggregation with sampling
//! rate q = 1 (the RDP of the plain Gaussian, `T alpha / (2 z^2)` after T of them). That is
//! a sound upper bound, and an expensive one: it takes a large `z` or few aggregations to stay
//! within a small epsilon. With `target_epsilon`, a buffer that would take epsilon past it is
//! not started: no more tasks are given, and results that still arrive are refused
//! ([`AsyncRejectReason::BudgetSpent`]). Local DP stays refused: a fast device uploads far
//! more often than one sampled per round, and its composition is not modelled.
//!
//! The driver also owns deadlines: a device that never answers keeps its slot until the driver
//! calls [`BufferedEngine::handle_train_failure`] or [`BufferedEngine::handle_device_gone`].
//!
//! For a driver that keeps state across crashes (the coordinator): with `one_per_device` a
//! device with a result in the open buffer gets no new task until it is aggregated, so the
//! buffer holds at most one result per device and can be stored under the device;
//! [`BufferedEngine::restore`] starts from a stored version and aggregation count and
//! [`BufferedEngine::refill`] folds the stored buffer back in, checked and weighted as when it
//! arrived. [`BufferedEngine::set_tasking`] pauses new tasks (no aggregation wanted) while
//! results of tasks already out still count.

mod config;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;
use fedge_core::params::ContentHash;
use fedge_core::privacy::PrivacyLedger;
use fedge_core::rng::{SeededRng, derive_rng, stream};
use fedge_core::wire::{DeviceId, ErrorCode, TrainResult, TrainTask};
use rand::seq::IndexedRandom;
use thiserror::Error;

pub use config::{
    AsyncConfig, AsyncConfigError, DEFAULT_HINGE_A, DEFAULT_HINGE_B, DEFAULT_STALENESS_EXPONENT, MAX_ASYNC_SIZE,
    StalenessWeight,
};

use crate::event::{Evaluation, RoundOutcome};
use crate::strategy::{DpFedAvg, FedAvg, Strategy};

/// What the buffered engine wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum AsyncEvent {
    /// Send `task` to `device`.
    Assign {
        /// The device.
        device: DeviceId,
        /// The task (`round` is the task's number, `model_version` the model it trains from).
        task: TrainTask,
    },
    /// The buffer became a new model version (or failed to). Evaluate it and report back with
    /// [`BufferedEngine::handle_evaluation`].
    Aggregated(AggregationReport),
}

/// One aggregation of the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregationReport {
    /// Which aggregation this is (1, 2, ...; failed ones count too).
    pub aggregation: u64,
    /// Model version after it (unchanged if it failed).
    pub model_version: u64,
    /// Hash of that model.
    pub model_hash: ContentHash,
    /// Results in the buffer (K).
    pub results: usize,
    /// Examples trained on, over those results (capped claims).
    pub samples: u64,
    /// Mean staleness of the results.
    pub mean_staleness: f64,
    /// Largest staleness among them.
    pub max_staleness: u64,
    /// Sample-weighted mean of the devices' training losses.
    pub train_loss: f64,
    /// When it happened (the `now` of the result that filled the buffer).
    pub at: Duration,
    /// Aggregated or failed.
    pub outcome: RoundOutcome,
    /// Under central DP: epsilon spent so far, at the configured delta (this aggregation
    /// included when it aggregated).
    pub epsilon: Option<f64>,
}

/// Why a result was refused. The device is told [`AsyncRejectReason::code`].
#[derive(Debug, Error, PartialEq)]
pub enum AsyncRejectReason {
    /// The device holds no task (never tasked, or its task ended).
    #[error("this device holds no training task")]
    NotTasked(DeviceId),
    /// The device already answered its last task; the first answer stands.
    #[error("this device already answered task {0}; the first answer stands")]
    Duplicate(u64),
    /// The result names another task or model version than the one the device holds.
    #[error(
        "result for task {got_task} on version {got_version}, but the device holds task {task} on version {version}"
    )]
    WrongTask {
        /// Task number in the result.
        got_task: u64,
        /// Model version in the result.
        got_version: u64,
        /// The task the device holds.
        task: u64,
        /// The version that task trains from.
        version: u64,
    },
    /// Trained from a model more than `max_staleness` versions old.
    #[error("stale result: trained {staleness} versions ago, at most {max} accepted")]
    TooStale {
        /// Versions since the task's model.
        staleness: u64,
        /// The bound.
        max: u64,
    },
    /// Wrong shape or non-finite values.
    #[error("invalid update: {0}")]
    Invalid(AggregateError),
    /// The privacy budget is spent: no further aggregation may happen.
    #[error("the privacy budget is spent (epsilon {spent:.3} of {target}): no further aggregation")]
    BudgetSpent {
        /// Epsilon spent.
        spent: f64,
        /// The budget.
        target: f64,
    },
}

impl AsyncRejectReason {
    /// The wire error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotTasked(_) => ErrorCode::NotSelected,
            Self::Duplicate(_) => ErrorCode::Duplicate,
            Self::WrongTask { .. } | Self::TooStale { .. } => ErrorCode::StaleModel,
            Self::Invalid(_) => ErrorCode::InvalidUpdate,
            Self::BudgetSpent { .. } => ErrorCode::NotSelected,
        }
    }
}

/// A task a device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    task: u64,
    version: u64,
}

/// What the buffer holds besides the strategy's running sum.
#[derive(Debug, Default)]
struct Buffer {
    results: usize,
    samples: u64,
    loss_sum: f64,
    staleness_sum: u64,
    max_staleness: u64,
}

/// The buffer's rule: FedAvg, or DP-FedAvg under central DP.
enum Rule {
    Plain(FedAvg),
    Private(DpFedAvg),
}

impl Rule {
    fn get(&self) -> &dyn Strategy {
        match self {
            Self::Plain(s) => s,
            Self::Private(s) => s,
        }
    }

    fn get_mut(&mut self) -> &mut dyn Strategy {
        match self {
            Self::Plain(s) => s,
            Self::Private(s) => s,
        }
    }
}

/// The buffered asynchronous engine. See the module docs.
pub struct BufferedEngine {
    config: AsyncConfig,
    strategy: Rule,
    /// Under central DP: what the aggregations spent, and the devices in the open buffer.
    ledger: Option<PrivacyLedger>,
    in_buffer: BTreeSet<DeviceId>,
    /// Set once the next aggregation would pass `target_epsilon`.
    budget_spent: Option<(f64, f64)>,
    global: ModelParams,
    version: u64,
    /// The next version number to hand out: global models and registered students share
    /// one sequence, as in the synchronous engine.
    next_version: u64,
    /// Versions handed out to students: not model changes, so not staleness.
    students: BTreeSet<u64>,
    /// Buffers closed so far (aggregated or failed).
    aggregations: u64,
    /// Whether free devices get tasks (a driver pauses tasking when no aggregation is wanted).
    tasking: bool,
    last_task: u64,
    available: BTreeSet<DeviceId>,
    training: BTreeMap<DeviceId, Held>,
    answered: BTreeMap<DeviceId, u64>,
    buffer: Buffer,
    events: VecDeque<AsyncEvent>,
    evaluations: BTreeMap<u64, Evaluation>,
    rng: SeededRng,
}

impl BufferedEngine {
    /// An engine starting from `initial` as model version 0; central DP draws its noise from
    /// `noise` (seeded in simulations, from the operating system in a coordinator).
    pub fn new(
        config: AsyncConfig,
        initial: ModelParams,
        noise: Box<dyn rand::Rng + Send>,
    ) -> Result<Self, AsyncConfigError> {
        config.validate()?;
        let (mut strategy, ledger) = match &config.privacy {
            Some(p) => {
                let ledger = PrivacyLedger::new(p.delta).map_err(|e| crate::ConfigError::Privacy(e.to_string()))?;
                (Rule::Private(DpFedAvg::new(p.noise_multiplier, p.clip_norm, None, noise)), Some(ledger))
            }
            None => (Rule::Plain(FedAvg::with_server_lr(config.server_lr as f32)), None),
        };
        strategy.get_mut().begin_round(1, &initial, config.buffer_size);
        let rng = derive_rng(config.seed, &[stream::ASYNC_SAMPLING]);
        let mut engine = Self {
            config,
            strategy,
            ledger,
            in_buffer: BTreeSet::new(),
            budget_spent: None,
            global: initial,
            version: 0,
            next_version: 1,
            students: BTreeSet::new(),
            aggregations: 0,
            tasking: true,
            last_task: 0,
            available: BTreeSet::new(),
            training: BTreeMap::new(),
            answered: BTreeMap::new(),
            buffer: Buffer::default(),
            events: VecDeque::new(),
            evaluations: BTreeMap::new(),
            rng,
        };
        engine.check_budget();
        Ok(engine)
    }

    /// An engine resuming from stored state: `global` is model `version`, `aggregations`
    /// buffers have closed, the open buffer is empty (refill it with [`Self::refill`]). Task
    /// numbers start again from 1: tasks handed out before are gone, and a result for one is
    /// refused unless its device holds the same number again.
    pub fn restore(
        config: AsyncConfig,
        global: ModelParams,
        version: u64,
        aggregations: u64,
        noise: Box<dyn rand::Rng + Send>,
    ) -> Result<Self, AsyncConfigError> {
        let mut e = Self::new(config, global, noise)?;
        e.version = version;
        e.next_version = version + 1;
        e.aggregations = aggregations;
        let global = e.global.clone();
        e.strategy.get_mut().begin_round(version + 1, &global, e.config.buffer_size);
        Ok(e)
    }

    /// Rebuilds the privacy ledger from stored entries after a restart (central DP only).
    pub fn restore_ledger(
        &mut self,
        entries: impl IntoIterator<Item = fedge_core::privacy::LedgerEntry>,
    ) -> Result<(), fedge_core::privacy::PrivacyError> {
        if let Some(p) = &self.config.privacy {
            self.ledger = Some(PrivacyLedger::from_entries(p.delta, entries)?);
            self.check_budget();
        }
        Ok(())
    }

    /// Folds results accepted into the open buffer before a restart back in (their tasks are
    /// gone): each is checked as when it arrived (trained from a version no newer than the
    /// current one and within `max_staleness`, shape, finiteness, one per device when that
    /// holds) and weighted by the same staleness. When they fill the buffer it aggregates at
    /// once. Refused at the first bad one, naming its device; those before it stay folded in.
    pub fn refill(
        &mut self,
        now: Duration,
        stored: &[(DeviceId, TrainResult)],
    ) -> Result<(), (DeviceId, AsyncRejectReason)> {
        for (device, result) in stored {
            let stale = |staleness| AsyncRejectReason::TooStale { staleness, max: self.config.max_staleness };
            if result.model_version > self.version {
                return Err((*device, stale(0)));
            }
            let staleness = self.staleness(result.model_version);
            if staleness > self.config.max_staleness {
                return Err((*device, stale(staleness)));
            }
            if self.in_buffer.contains(device) {
                return Err((*device, AsyncRejectReason::Duplicate(result.round)));
            }
            self.strategy
                .get()
                .check(self.contribution(result, false))
                .map_err(|e| (*device, AsyncRejectReason::Invalid(e)))?;
            self.fold(now, *device, result, staleness).map_err(|e| (*device, e))?;
        }
        Ok(())
    }

    /// Hands out a version number for a model made outside the aggregations (a distilled
    /// student); the next global model takes the number after it. Staleness does not count it.
    pub fn allocate_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        self.students.insert(v);
        v
    }

    /// After a restart: version numbers up to `version` are taken, the `students` among them
    /// by registered students (staleness skips them).
    pub fn reserve_versions_through(&mut self, version: u64, students: impl IntoIterator<Item = u64>) {
        self.next_version = self.next_version.max(version + 1);
        self.students.extend(students);
    }

    /// Model changes since version `from`: the versions after it, students' aside.
    fn staleness(&self, from: u64) -> u64 {
        if from >= self.version {
            return 0;
        }
        let students = self.students.range(from + 1..=self.version).count() as u64;
        (self.version - from).saturating_sub(students)
    }

    /// Whether free devices get tasks; off, the engine hands out none (results of tasks
    /// already out are still taken).
    pub fn set_tasking(&mut self, on: bool) {
        self.tasking = on;
    }

    /// Buffers closed so far (aggregated or failed); the open one is the next.
    pub fn aggregations(&self) -> u64 {
        self.aggregations
    }

    /// Epsilon spent so far under central DP (at the configured delta).
    pub fn epsilon(&self) -> Option<f64> {
        self.ledger.as_ref().map(PrivacyLedger::epsilon)
    }

    /// The privacy ledger under central DP: one entry per aggregation.
    pub fn ledger(&self) -> Option<&PrivacyLedger> {
        self.ledger.as_ref()
    }

    /// Whether the budget stops further aggregations: `(spent, target)`.
    pub fn budget_spent(&self) -> Option<(f64, f64)> {
        self.budget_spent
    }

    /// Marks the budget spent when one more aggregation would pass `target_epsilon`.
    fn check_budget(&mut self) {
        let (Some(p), Some(ledger)) = (&self.config.privacy, &self.ledger) else { return };
        let Some(target) = p.target_epsilon else { return };
        let would = ledger.preview(1.0, p.noise_multiplier, 1).map_or(f64::INFINITY, |e| e.epsilon);
        if would > target {
            self.budget_spent = Some((ledger.epsilon(), target));
        }
    }

    /// The current global model.
    pub fn global(&self) -> &ModelParams {
        &self.global
    }

    /// The current model version (0 before any aggregation).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The configuration.
    pub fn config(&self) -> &AsyncConfig {
        &self.config
    }

    /// Devices holding a task now.
    pub fn in_flight(&self) -> usize {
        self.training.len()
    }

    /// Whether `device` holds a task now (a refused result can end it: too stale, invalid).
    pub fn holds_task(&self, device: DeviceId) -> bool {
        self.training.contains_key(&device)
    }

    /// Accepted results waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.results
    }

    /// Evaluations reported so far, by model version.
    pub fn evaluations(&self) -> &BTreeMap<u64, Evaluation> {
        &self.evaluations
    }

    /// A device can be tasked from now on.
    pub fn handle_device_available(&mut self, device: DeviceId) {
        self.available.insert(device);
    }

    /// A device went away; its task, if any, ends and its slot is free.
    pub fn handle_device_gone(&mut self, now: Duration, device: DeviceId) {
        self.available.remove(&device);
        self.handle_train_failure(now, device);
    }

    /// A device reported that it could not train (or the driver gave up on it): its task ends
    /// and its slot is free. A device holding no task is ignored.
    pub fn handle_train_failure(&mut self, _now: Duration, device: DeviceId) {
        self.training.remove(&device);
    }

    /// What [`Self::handle_train_result`] would refuse, checked without changing anything;
    /// on success, the result's staleness.
    pub fn check_train_result(&self, device: DeviceId, result: &TrainResult) -> Result<u64, AsyncRejectReason> {
        if let Some((spent, target)) = self.budget_spent {
            return Err(AsyncRejectReason::BudgetSpent { spent, target });
        }
        let Some(held) = self.training.get(&device) else {
            return Err(match self.answered.get(&device) {
                Some(&task) if task == result.round => AsyncRejectReason::Duplicate(task),
                _ => AsyncRejectReason::NotTasked(device),
            });
        };
        if result.round != held.task || result.model_version != held.version {
            return Err(AsyncRejectReason::WrongTask {
                got_task: result.round,
                got_version: result.model_version,
                task: held.task,
                version: held.version,
            });
        }
        let staleness = self.staleness(held.version);
        if staleness > self.config.max_staleness {
            return Err(AsyncRejectReason::TooStale { staleness, max: self.config.max_staleness });
        }
        self.strategy.get().check(self.contribution(result, false)).map_err(AsyncRejectReason::Invalid)?;
        Ok(staleness)
    }

    /// The synchronous engine's view of a result: capped samples and (with `clip` and a clip
    /// norm, without central DP, whose rule clips itself) the server-side clip.
    fn contribution<'a>(&self, result: &'a TrainResult, clip: bool) -> crate::strategy::Contribution<'a> {
        let clip_norm = if clip && self.config.privacy.is_none() { self.config.train.clip_norm } else { None };
        crate::engine::contribution(result, self.config.max_samples_per_result, clip_norm)
    }

    /// A device's result arrived at `now`. Accepted results go into the buffer, discounted by
    /// their staleness; the K-th aggregates. A refused result that answers the device's task
    /// (too stale, invalid) still ends the task, so the device is free again.
    pub fn handle_train_result(
        &mut self,
        now: Duration,
        device: DeviceId,
        result: &TrainResult,
    ) -> Result<(), AsyncRejectReason> {
        let staleness = match self.check_train_result(device, result) {
            Ok(s) => s,
            Err(e) => {
                if matches!(
                    e,
                    AsyncRejectReason::TooStale { .. }
                        | AsyncRejectReason::Invalid(_)
                        | AsyncRejectReason::BudgetSpent { .. }
                ) {
                    self.end_task(device);
                }
                return Err(e);
            }
        };
        let folded = self.fold(now, device, result, staleness);
        self.end_task(device);
        folded
    }

    /// Folds an accepted result into the buffer, discounted by its staleness; the K-th
    /// aggregates.
    fn fold(
        &mut self,
        now: Duration,
        device: DeviceId,
        result: &TrainResult,
        staleness: u64,
    ) -> Result<(), AsyncRejectReason> {
        let mut contribution = self.contribution(result, true);
        contribution.clip_scale *= self.config.staleness.weight(staleness);
        let samples = contribution.num_samples;
        self.strategy.get_mut().accumulate(contribution).map_err(AsyncRejectReason::Invalid)?;
        if self.ledger.is_some() || self.config.one_per_device {
            self.in_buffer.insert(device);
        }
        let b = &mut self.buffer;
        b.results += 1;
        b.samples = b.samples.saturating_add(samples);
        if result.train_loss.is_finite() {
            b.loss_sum += f64::from(result.train_loss) * samples as f64;
        }
        b.staleness_sum = b.staleness_sum.saturating_add(staleness);
        b.max_staleness = b.max_staleness.max(staleness);
        if b.results >= self.config.buffer_size {
            self.aggregate(now);
        }
        Ok(())
    }

    fn end_task(&mut self, device: DeviceId) {
        if let Some(held) = self.training.remove(&device) {
            self.answered.insert(device, held.task);
        }
    }

    /// The evaluation of model `version` the driver was asked for.
    pub fn handle_evaluation(&mut self, version: u64, evaluation: Evaluation) {
        self.evaluations.insert(version, evaluation);
    }

    /// The next thing to do, if any: a pending report first, then a task for a free device
    /// while fewer than `max_concurrency` are training.
    pub fn poll_event(&mut self) -> Option<AsyncEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if !self.tasking || self.training.len() >= self.config.max_concurrency || self.budget_spent.is_some() {
            return None;
        }
        let free: Vec<DeviceId> = self
            .available
            .iter()
            .copied()
            .filter(|d| !self.training.contains_key(d) && !self.in_buffer.contains(d))
            .collect();
        let &device = free.choose(&mut self.rng)?;
        self.last_task += 1;
        let held = Held { task: self.last_task, version: self.version };
        self.training.insert(device, held);
        let task = TrainTask {
            round: held.task,
            model_version: held.version,
            model_hash: self.global.content_hash(),
            config: self.config.train,
            secure: None,
        };
        Some(AsyncEvent::Assign { device, task })
    }

    fn aggregate(&mut self, now: Duration) {
        let b = std::mem::take(&mut self.buffer);
        let round = self.next_version;
        self.aggregations += 1;
        let outcome = match self.strategy.get_mut().aggregate_train(round, &self.global, 0) {
            Ok(next) if next.check_finite().is_err() => {
                RoundOutcome::Failed("the aggregate has a non-finite value; the model is unchanged".into())
            }
            // The noised sum leaves the server only as a model: charge it first, and release
            // nothing uncounted.
            Ok(next) => match self.charge(self.aggregations) {
                Ok(()) => {
                    self.global = next;
                    self.version = round;
                    self.next_version = round + 1;
                    RoundOutcome::Aggregated
                }
                Err(e) => RoundOutcome::Failed(format!("privacy accounting failed ({e}); the model is unchanged")),
            },
            Err(e) => RoundOutcome::Failed(format!("aggregation failed: {e}")),
        };
        self.in_buffer.clear();
        self.check_budget();
        self.strategy.get_mut().begin_round(self.version + 1, &self.global, self.config.buffer_size);
        let per = |x: f64, n: f64| if n > 0.0 { x / n } else { f64::NAN };
        self.events.push_back(AsyncEvent::Aggregated(AggregationReport {
            aggregation: self.aggregations,
            model_version: self.version,
            model_hash: self.global.content_hash(),
            results: b.results,
            samples: b.samples,
            mean_staleness: per(b.staleness_sum as f64, b.results as f64),
            max_staleness: b.max_staleness,
            train_loss: per(b.loss_sum, b.samples as f64),
            at: now,
            outcome,
            epsilon: self.ledger.as_ref().map(PrivacyLedger::epsilon),
        }));
    }

    /// Records aggregation number `round` in the ledger under central DP: one Gaussian release,
    /// q = 1.
    fn charge(&mut self, round: u64) -> Result<(), fedge_core::privacy::PrivacyError> {
        match (&mut self.ledger, &self.config.privacy) {
            (Some(ledger), Some(p)) => ledger.record(round, 1.0, p.noise_multiplier, p.clip_norm).map(|_| ()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
