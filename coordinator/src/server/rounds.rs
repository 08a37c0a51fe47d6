//! The round driver: drains the engine's events, starts the rounds the operator asked for,
//! and makes each round's start and close durable before anyone hears of it (see the
//! parent module's "Locks and disk I/O"). Also the deadline timer, driven by the engine's
//! `poll_timeout`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::wire::{DeviceId, RoundLine, TrainTask};
use fedge_engine::buffered::{AggregationReport, AsyncEvent};
use fedge_engine::{EngineEvent, RoundOutcome, RoundReport, StartError};
use tokio::sync::Notify;

use super::engine::Engine;
use super::secure::{SecureRound, SecureSettings};

use super::registry::GlobalPlan;
use super::{Coordinator, Ordered};
use crate::metrics::Metrics;
use crate::store::{EncodedModel, RoundRecord, StoredServerState};

/// The rounds: the engine, the tasks waiting for their devices, the rounds closed.
pub(super) struct RoundDriver {
    /// The engine: rounds or FedBuff. Changed only under the order lock.
    pub(super) engine: Engine,
    /// The model version published: the latest whose round close is durable. Between a
    /// close and its write the engine is ahead of it; devices and operators are told this one.
    version: u64,
    /// Tasks of the open round, by device, once the round's start is durable.
    pub(super) tasks: BTreeMap<DeviceId, TrainTask>,
    /// When each task was handed out (for the update latency metric).
    pub(super) assigned_at: BTreeMap<DeviceId, Duration>,
    /// Rounds closed in this run (what [`Coordinator::wait_for_rounds`] counts).
    pub(super) reports: Vec<RoundReport>,
    /// Every round closed, earlier runs included (what operators see).
    pub(super) history: Vec<RoundLine>,
    /// Rounds asked for that have not started.
    pub(super) rounds_left: u64,
    /// When the open round started, on the engine's clock (unknown for a round resumed
    /// after a restart).
    opened_at: Option<Duration>,
    /// FedBuff: the open buffer whose record is durable (its results are stored under it).
    buffer_recorded: Option<u64>,
    /// FedBuff: how long a device may hold a task before the driver gives up on it.
    task_timeout: Duration,
    /// Secure aggregation, when on (`server/secure.rs`).
    pub(super) secure_settings: Option<SecureSettings>,
    /// The open round's secure aggregation.
    pub(super) secure_round: Option<SecureRound>,
    /// The round before's, still answering polls: a device (or a shard's member) that asks
    /// after the next round opened learns whether it was summed.
    pub(super) previous_secure: Option<SecureRound>,
}

/// What the driver must make durable before it publishes it.
enum Step {
    /// A round closed (boxed: its report is large).
    Close(Box<Close>),
    /// A round opened.
    Begin(Begin),
}

/// A round closed by the engine, not yet published.
struct Close {
    report: RoundReport,
    line: RoundLine,
    /// The model version after the round.
    version: u64,
    /// The new parameters, if the round aggregated.
    params: Option<Arc<ModelParams>>,
    rounds_left: u64,
    /// The new version's registry record to write, if it is to be registered.
    register: Option<GlobalPlan>,
    /// The strategy's state after the round, saved with the new version.
    server_state: Option<StoredServerState>,
}

/// A round opened by the engine, its tasks held back until it is recorded.
struct Begin {
    record: RoundRecord,
    rounds_left: u64,
    tasks: Vec<(DeviceId, TrainTask)>,
}

impl RoundDriver {
    pub(super) fn new(engine: Engine, task_timeout: Duration) -> Self {
        Self {
            version: engine.version(),
            engine,
            tasks: BTreeMap::new(),
            assigned_at: BTreeMap::new(),
            reports: Vec::new(),
            history: Vec::new(),
            rounds_left: 0,
            opened_at: None,
            buffer_recorded: None,
            task_timeout,
            secure_settings: None,
            secure_round: None,
            previous_secure: None,
        }
    }

    /// FedBuff after a restart: the open buffer `aggregation` is already recorded.
    pub(super) fn buffer_is_recorded(&mut self, aggregation: u64) {
        self.buffer_recorded = Some(aggregation);
    }

    /// When the next deadline falls: the open round's, or (FedBuff) the oldest task's.
    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        match &self.engine {
            Engine::Rounds(e) => {
                // Only while its round is open (a closed round's session only answers polls).
                let secure = self
                    .secure_round
                    .as_ref()
                    .filter(|r| e.current_round() == Some(r.round()))
                    .and_then(SecureRound::poll_timeout);
                match (e.poll_timeout(), secure) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Engine::Buffered(_) => self.assigned_at.values().min().map(|at| *at + self.task_timeout),
        }
    }

    /// Time passed: times the open round out, or (FedBuff) ends the tasks held too long.
    fn handle_timeout(&mut self, now: Duration) {
        match &mut self.engine {
            Engine::Rounds(e) => {
                // The secure session first: its stage may end (and the round with it) before
                // the round's own deadline.
                if let (Some(settings), Some(secure)) = (&self.secure_settings, self.secure_round.as_mut()) {
                    secure.step(settings, e, now);
                }
                e.handle_timeout(now)
            }
            Engine::Buffered(e) => {
                let late: Vec<DeviceId> = self
                    .assigned_at
                    .iter()
                    .filter(|(_, at)| **at + self.task_timeout <= now)
                    .map(|(d, _)| *d)
                    .collect();
                for d in late {
                    tracing::warn!("device {d} held its FedBuff task past round_timeout_secs; its slot is freed");
                    e.handle_train_failure(now, d);
                    self.tasks.remove(&d);
                    self.assigned_at.remove(&d);
                }
            }
        }
    }

    /// Takes back what a previous run stored.
    pub(super) fn restore(&mut self, rounds_left: u64, history: Vec<RoundLine>) {
        self.rounds_left = rounds_left;
        self.history = history;
    }

    /// The published model version (what devices and operators are told).
    pub(super) fn version(&self) -> u64 {
        self.version
    }

    /// Publishes `version`, durable already (a regional aggregator's adopted model).
    pub(super) fn publish_version(&mut self, version: u64) {
        self.version = version;
    }

    /// The privacy spent up to the round that produced `version`, if recorded.
    pub(super) fn epsilon_of(&self, version: u64) -> Option<f64> {
        self.history.iter().rev().find(|r| r.model_version == version).and_then(|r| r.privacy).map(|p| p.epsilon)
    }

    /// Drains the engine's events until one needs a write, and starts the next round when
    /// one is wanted and possible. `changed` is set when anything happened.
    fn poll_step(&mut self, now: Duration, metrics: &Metrics, changed: &mut bool) -> Option<Step> {
        match self.engine {
            Engine::Rounds(_) => self.poll_rounds(now, metrics, changed),
            Engine::Buffered(_) => self.poll_buffered(now, metrics, changed),
        }
    }

    /// [`Self::poll_step`] for FedBuff: the open buffer's record first, then the engine's
    /// tasks (while more aggregations are wanted than the buffered results and tasks out will
    /// make) and aggregations.
    fn poll_buffered(&mut self, now: Duration, metrics: &Metrics, changed: &mut bool) -> Option<Step> {
        let Engine::Buffered(engine) = &mut self.engine else { return None };
        let open = engine.aggregations() + 1;
        if self.buffer_recorded != Some(open) {
            self.buffer_recorded = Some(open);
            *changed = true;
            let record = RoundRecord {
                round: open,
                model_version: engine.version(),
                chosen: Vec::new(),
                target: engine.config().buffer_size as u64,
                population: 0,
            };
            return Some(Step::Begin(Begin { record, rounds_left: self.rounds_left, tasks: Vec::new() }));
        }
        loop {
            let wanted = self.rounds_left.saturating_mul(engine.config().buffer_size as u64);
            engine.set_tasking(((engine.in_flight() + engine.buffered()) as u64) < wanted);
            let ev = engine.poll_event()?;
            *changed = true;
            match ev {
                AsyncEvent::Assign { device, task } => {
                    self.tasks.insert(device, task);
                    self.assigned_at.insert(device, now);
                }
                AsyncEvent::Aggregated(r) => {
                    let aggregated = r.outcome == RoundOutcome::Aggregated;
                    metrics.round_closed(aggregated);
                    // Every closed buffer counts as one of the rounds asked for.
                    self.rounds_left = self.rounds_left.saturating_sub(1);
                    tracing::info!(
                        "FedBuff aggregation {}: {} results, staleness mean {:.2} max {}",
                        r.aggregation,
                        r.results,
                        r.mean_staleness,
                        r.max_staleness
                    );
                    let privacy = engine.ledger().and_then(|l| l.entries().last().copied()).filter(|_| aggregated);
                    let report = report_of(r, privacy);
                    let line = line_of(&report, None);
                    return Some(Step::Close(Box::new(Close {
                        line,
                        version: engine.version(),
                        params: aggregated.then(|| Arc::new(engine.global().clone())),
                        rounds_left: self.rounds_left,
                        register: None,
                        server_state: None,
                        report,
                    })));
                }
            }
        }
    }

    /// [`Self::poll_step`] for synchronous rounds.
    fn poll_rounds(&mut self, now: Duration, metrics: &Metrics, changed: &mut bool) -> Option<Step> {
        let Engine::Rounds(engine) = &mut self.engine else { return None };
        while let Some(ev) = engine.poll_event() {
            *changed = true;
            match ev {
                // A resumed round's tasks: the round is already recorded.
                EngineEvent::Assign { device, mut task } => {
                    if let Some(settings) = &self.secure_settings {
                        if self.secure_round.as_ref().is_none_or(|r| r.round() != task.round) {
                            let (deadline, selected) =
                                engine.open_round().map_or((now, 1), |o| (o.deadline, o.chosen.len()));
                            let secure = SecureRound::new(settings, task.round, selected, now, deadline);
                            self.previous_secure = self.secure_round.replace(secure);
                        }
                        task.secure = self.secure_round.as_ref().map(|r| r.task(settings));
                    }
                    self.tasks.insert(device, task);
                    self.assigned_at.insert(device, now);
                }
                EngineEvent::RoundClosed(report) => {
                    self.tasks.clear();
                    self.assigned_at.clear();
                    let aggregated = report.outcome == RoundOutcome::Aggregated;
                    metrics.round_closed(aggregated);
                    let version = engine.version();
                    let params = aggregated.then(|| Arc::new(engine.global().clone()));
                    let server_state = engine.server_state().filter(|_| aggregated).map(|s| StoredServerState {
                        version,
                        strategy: s.strategy,
                        vectors: s.vectors,
                    });
                    let duration = self.opened_at.take().map(|at| report.closed_at.saturating_sub(at));
                    let line = line_of(&report, duration);
                    let rounds_left = self.rounds_left;
                    return Some(Step::Close(Box::new(Close {
                        report,
                        line,
                        version,
                        params,
                        rounds_left,
                        register: None,
                        server_state,
                    })));
                }
            }
        }
        if self.rounds_left == 0 || engine.current_round().is_some() {
            return None;
        }
        match engine.start_round(now) {
            Ok(_) => {
                self.rounds_left -= 1;
                self.opened_at = Some(now);
                *changed = true;
                // Starting a round emits its `Assign`s and nothing else.
                let mut tasks = Vec::new();
                while let Some(ev) = engine.poll_event() {
                    if let EngineEvent::Assign { device, task } = ev {
                        tasks.push((device, task));
                    }
                }
                let open = engine.open_round().expect("a round just opened");
                if let Some(settings) = &self.secure_settings {
                    let secure = SecureRound::new(settings, open.round, tasks.len(), now, open.deadline);
                    for (_, task) in &mut tasks {
                        task.secure = Some(secure.task(settings));
                    }
                    self.previous_secure = self.secure_round.replace(secure);
                }
                let record = RoundRecord {
                    round: open.round,
                    model_version: open.model_version,
                    chosen: open.chosen,
                    target: open.target as u64,
                    population: open.population as u64,
                };
                Some(Step::Begin(Begin { record, rounds_left: self.rounds_left, tasks }))
            }
            Err(StartError::NotEnoughDevices { .. }) | Err(StartError::Busy(_)) => None,
            Err(e) => {
                // Out of privacy budget: the remaining rounds are dropped, loudly.
                tracing::warn!("{e}; {} rounds cancelled", self.rounds_left);
                self.rounds_left = 0;
                *changed = true;
                None
            }
        }
    }
}

impl Coordinator {
    /// Runs the round driver to rest after a transition: each close and start is decided
    /// under the state lock, written with it released, and published under it again.
    pub(super) fn settle(&self, _order: &Ordered<'_>) {
        let mut changed = false;
        loop {
            // After a storage failure nothing moves (see the module documentation of `server`).
            if self.storage_failure().is_some() {
                break;
            }
            let step = {
                let mut s = self.lock();
                let now = self.now();
                let mut step = s.rounds.poll_step(now, &self.metrics, &mut changed);
                // A region's registry holds its root's signed models (relayed): its own
                // versions, numbered locally, are not registered beside them.
                if let Some(Step::Close(c)) = &mut step
                    && let Some(params) = &c.params
                    && !self.is_region()
                {
                    let epsilon = c.report.privacy.map(|p| p.epsilon);
                    c.register = s.registry.plan_global(c.version, c.report.round, epsilon, params.numel() as u64);
                }
                step
            };
            match step {
                None => break,
                Some(Step::Close(c)) => self.close_round(c),
                Some(Step::Begin(b)) => self.begin_round(b),
            }
        }
        {
            let s = self.lock();
            self.metrics.model_version.set(s.rounds.version() as i64);
            self.metrics.devices_connected.set(s.fleet.connected.len() as i64);
            self.metrics.devices_known.set(s.fleet.ids.len() as i64);
        }
        if changed {
            self.changed.notify_waiters();
            self.deadlines.notify_one();
            self.references.notify_one();
        }
    }

    /// Makes a closed round durable (the new version encoded once, for the store and for
    /// downloads), then publishes it.
    fn close_round(&self, c: Box<Close>) {
        let Close { report, line, version, params, rounds_left, register, server_state } = *c;
        let encoded = params.as_ref().map(|p| EncodedModel::new(version, p));
        if let Some(store) = &self.store
            && let Err(e) = store.close_round_encoded(&line, encoded.as_ref(), server_state.as_ref(), rounds_left)
        {
            // Not durable, so never published: a restart must not find v{version} named by
            // another model.
            self.storage_failed(format_args!("cannot record the close of round {} (v{version})", report.round), &e);
            return;
        }
        let record = match (register, &encoded) {
            (Some(plan), Some(model)) => match plan.write(model, self.store.as_ref()) {
                Ok(record) => Some(record),
                Err(e) => {
                    // The version itself is durable and is published; its registry record
                    // is not, and nothing more moves.
                    self.storage_failed(format_args!("cannot register global model v{version}"), &e);
                    None
                }
            },
            _ => None,
        };
        let mut s = self.lock();
        if let (Some(params), Some(model)) = (params, encoded) {
            s.downloads.publish(params, model.clone());
            if let Some(record) = record {
                s.registry.records.insert(version, record);
                s.downloads.keep_blob(version, model.bytes);
            }
        }
        // Keep the last few versions for devices still fetching them.
        s.downloads.prune();
        s.rounds.reports.push(report);
        s.rounds.history.push(line);
        s.rounds.version = version;
    }

    /// Records an opened round, then hands out its tasks.
    fn begin_round(&self, b: Begin) {
        let Begin { record, rounds_left, tasks } = b;
        if let Some(store) = &self.store
            && let Err(e) = store.begin_round(&record, rounds_left)
        {
            // No task is handed out for a round the store does not know.
            self.storage_failed(format_args!("cannot record the start of round {}", record.round), &e);
            return;
        }
        let mut s = self.lock();
        let now = self.now();
        for (device, task) in tasks {
            s.rounds.tasks.insert(device, task);
            s.rounds.assigned_at.insert(device, now);
        }
    }

    /// The deadline passed: times the open round out.
    pub(super) fn handle_deadline(&self) {
        let order = self.ordered();
        {
            let mut s = self.lock();
            let now = self.now();
            s.rounds.handle_timeout(now);
        }
        self.settle(&order);
    }
}

/// The deadline timer: sleeps until the open round's deadline (the engine's `poll_timeout`),
/// woken early by `wake` when a transition may have changed it; returns when the coordinator
/// is gone.
pub(super) async fn drive_deadlines(me: Weak<Coordinator>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(c) = me.upgrade() else { return };
            // A manual clock (the in-memory harness) is moved by hand: no timer runs on it.
            let Some(started) = c.clock.started() else { return };
            let deadline = c.lock().rounds.poll_timeout();
            deadline.map(|at| tokio::time::Instant::from_std(started + at))
        };
        match next {
            Some(at) => tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = wake.notified() => continue,
            },
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(c) = me.upgrade() else { return };
        c.handle_deadline();
    }
}

/// A FedBuff aggregation as a round's report: every buffered result counts as selected and
/// answered; none failed (a task given up on never reaches the buffer).
fn report_of(r: AggregationReport, privacy: Option<fedge_core::privacy::LedgerEntry>) -> RoundReport {
    RoundReport {
        round: r.aggregation,
        model_version: r.model_version,
        model_hash: r.model_hash,
        selected: r.results,
        results: r.results,
        failures: 0,
        stragglers: Vec::new(),
        surplus: 0,
        samples: r.samples,
        train_loss: r.train_loss,
        closed_at: r.at,
        outcome: r.outcome,
        privacy,
    }
}

/// The operator's view of a closed round (accuracy is filled in when shown).
fn line_of(r: &RoundReport, duration: Option<Duration>) -> RoundLine {
    RoundLine {
        round: r.round,
        model_version: r.model_version,
        selected: r.selected as u64,
        results: r.results as u64,
        failures: r.failures as u64,
        stragglers: r.stragglers.len() as u64,
        surplus: r.surplus as u64,
        samples: r.samples,
        train_loss: r.train_loss,
        accuracy: None,
        failed_reason: match &r.outcome {
            RoundOutcome::Aggregated => None,
            RoundOutcome::Failed(why) => Some(why.clone()),
        },
        privacy: r.privacy,
        duration_ms: duration.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}
