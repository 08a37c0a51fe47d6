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
//! With central DP ([`crate::CentralDp`]) the engine also keeps the privacy ledger: each
//! aggregated round is one subsampled Gaussian step with `q = devices sampled / devices
//! available`, and a round that would take epsilon past the budget does not start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::privacy::{LedgerEntry, PrivacyError, PrivacyLedger};
use fedge_core::rng::{SeededRng, derive_rng, stream};
use fedge_core::wire::{DeviceId, TrainResult, TrainTask};
use rand::seq::IndexedRandom;

use crate::config::{ConfigError, EngineConfig};
use crate::error::{AdoptError, ReconfigureError, RejectReason, ResumeError, StartError};
use crate::event::{EngineEvent, Evaluation, OpenRoundInfo, RoundOutcome, RoundReport, StoredRound};
use crate::strategy::{Contribution, Strategy};

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
    /// Under distributed DP: the noise multiplier the round's secure sum carried.
    carried_noise: Option<f64>,
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
    /// Participants that speak for many devices (regional aggregators), with the most samples
    /// one of their results may claim instead of `max_samples_per_result`.
    sample_caps: BTreeMap<DeviceId, u64>,
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
            sample_caps: BTreeMap::new(),
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

    /// The last round opened (0 before any).
    pub fn last_round(&self) -> u64 {
        self.last_round
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

    /// Participant `device` speaks for many devices (a regional aggregator sending its
    /// devices' weighted mean): its results may claim up to `max_samples` samples (their
    /// total) instead of `max_samples_per_result`. `None` makes it a plain device again.
    pub fn set_sample_cap(&mut self, device: DeviceId, max_samples: Option<u64>) {
        match max_samples {
            Some(cap) => self.sample_caps.insert(device, cap),
            None => self.sample_caps.remove(&device),
        };
    }

    /// Installs `params`, a model made elsewhere (a regional aggregator's copy of its root's
    /// version), as the next global version, and returns its number. Refused while a round is
    /// open, for another layout or non-finite values, and for a strategy that carries state
    /// between rounds (its state belongs to the model it replaced).
    pub fn adopt(&mut self, params: ModelParams) -> Result<u64, AdoptError> {
        if let Some(o) = &self.open {
            return Err(AdoptError::Busy(o.round));
        }
        if params.layout() != self.global.layout() {
            return Err(AdoptError::Layout);
        }
        if params.check_finite().is_err() {
            return Err(AdoptError::NotFinite);
        }
        if self.strategy.server_state().is_some() {
            return Err(AdoptError::Stateful(self.strategy.name()));
        }
        let version = self.allocate_version();
        self.global = params;
        self.version = version;
        Ok(version)
    }

    /// A participant went away for now but its task in the open round stands until the
    /// deadline (a regional aggregator restarting resumes its own round and answers it): it is
    /// not sampled for new rounds meanwhile.
    pub fn handle_device_away(&mut self, device: DeviceId) {
        self.available.remove(&device);
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
        if self.strategy.holds_updates() {
            let mb = (sampled as u64).saturating_mul(self.global.numel() as u64 * 4).div_ceil(1 << 20);
            if mb > self.config.max_buffer_mb {
                return Err(StartError::Buffer {
                    strategy: self.strategy.name(),
                    updates: sampled,
                    mb,
                    max_mb: self.config.max_buffer_mb,
                });
            }
        }
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

    /// What the strategy carries between rounds (optimiser moments, a centre), to save with
    /// the current model version.
    pub fn server_state(&self) -> Option<crate::strategy::ServerState> {
        self.strategy.server_state()
    }

    /// Restores state saved with the current model version after a restart; refused (and
    /// nothing changed) when it does not fit the strategy or the model.
    pub fn restore_server_state(
        &mut self,
        state: crate::strategy::ServerState,
    ) -> Result<(), fedge_core::aggregate::AggregateError> {
        let d = self.global.numel();
        if let Some(v) = state.vectors.iter().find(|v| !v.is_empty() && v.len() != d) {
            return Err(fedge_core::aggregate::AggregateError::State(format!(
                "a vector of {} values for a model of {d}",
                v.len()
            )));
        }
        self.strategy.restore_server_state(state)
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
        if let Some(mu) = self.strategy.proximal_mu() {
            config.proximal_mu = Some(mu);
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
            carried_noise: None,
        });
        TrainTask { round, model_version: self.version, model_hash: self.global.content_hash(), config, secure: None }
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

    /// Whether the strategy needs every update (the robust rules), not only their sum.
    pub fn holds_updates(&self) -> bool {
        self.strategy.holds_updates()
    }

    /// Whether `device` was selected in the open round and has neither answered nor failed.
    pub fn is_pending(&self, device: DeviceId) -> bool {
        self.open.as_ref().is_some_and(|o| o.pending.contains(&device))
    }

    /// The open round's devices that have neither answered nor failed.
    pub fn pending(&self) -> Vec<DeviceId> {
        self.open.as_ref().map(|o| o.pending.iter().copied().collect()).unwrap_or_default()
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
        if self.config.distributed_dp {
            return Err(RejectReason::Secure(
                "distributed DP: results count only inside a secure sum, which carries the noise".into(),
            ));
        }
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
        self.strategy.check(self.contribution(device, result, false)).map_err(RejectReason::Invalid)
    }

    /// What a result counts for: its sample claim bounded by `max_samples_per_result`, and
    /// (when `clip` and the configuration sets a clip norm without central DP, whose strategy
    /// clips itself) the factor that brings its delta within the clip norm, whatever the
    /// device says it did.
    fn contribution<'a>(&self, device: DeviceId, result: &'a TrainResult, clip: bool) -> Contribution<'a> {
        let clip_norm = if clip && self.config.privacy.is_none() { self.config.train.clip_norm } else { None };
        contribution(result, self.max_samples(device), clip_norm)
    }

    /// What `device`'s result counts for in the aggregate: its sample claim bounded by
    /// `max_samples_per_result` (or its aggregator's cap) and the engine's own clip scale. For a
    /// driver that pre-aggregates accepted results itself, as this engine weighs them (a
    /// simulation shard).
    pub fn counted<'a>(&self, device: DeviceId, result: &'a TrainResult) -> Contribution<'a> {
        self.contribution(device, result, true)
    }

    /// The most samples a result of `device` may claim.
    fn max_samples(&self, device: DeviceId) -> u64 {
        self.sample_caps.get(&device).copied().unwrap_or(self.config.max_samples_per_result)
    }

    /// A device's result arrived. Accepted results are streamed into the strategy at once.
    pub fn handle_train_result(
        &mut self,
        now: Duration,
        device: DeviceId,
        result: &TrainResult,
    ) -> Result<(), RejectReason> {
        self.check_train_result(device, result)?;
        let contribution = self.contribution(device, result, true);
        let samples = contribution.num_samples;
        self.strategy.accumulate(contribution).map_err(RejectReason::Invalid)?;
        let open = self.open.as_mut().expect("checked: a round is open");
        open.pending.remove(&device);
        open.results += 1;
        open.samples = open.samples.saturating_add(samples);
        if result.train_loss.is_finite() {
            open.loss_sum += result.train_loss as f64 * samples as f64;
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

    /// The open round, when its strategy scores updates against the server's own reference
    /// update (FLTrust) and that has not been handed over: `(round, model_version)`. The driver
    /// trains model `model_version` on its root set and calls [`Self::handle_reference`]; until
    /// then the round does not close on its results (at its deadline it fails without one).
    pub fn wanted_reference(&self) -> Option<(u64, u64)> {
        let open = self.open.as_ref()?;
        self.strategy.wants_reference().then_some((open.round, self.version))
    }

    /// The server's reference update for round `round` (trained from the current model on the
    /// root set). Refused when that round is not open or the update does not fit the model or
    /// is not finite; the round then keeps waiting.
    pub fn handle_reference(
        &mut self,
        now: Duration,
        round: u64,
        reference: &ModelParams,
    ) -> Result<(), fedge_core::aggregate::AggregateError> {
        use fedge_core::aggregate::AggregateError;
        match self.open.as_ref() {
            Some(o) if o.round == round => {}
            _ => {
                return Err(AggregateError::Reference(format!(
                    "round {round} is not open (open: {})",
                    self.current_round().map_or("none".into(), |r| r.to_string())
                )));
            }
        }
        self.strategy.set_reference(reference)?;
        self.close_if_done(now);
        Ok(())
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
        // A rule waiting for the server's reference cannot aggregate yet: the reference or the
        // deadline decides (a round that fails anyway, too few results, need not wait).
        let min = self.config.min_train_clients;
        if self.strategy.wants_reference() && self.open.as_ref().is_some_and(|o| o.results >= min.max(1)) {
            return;
        }
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
            // A round that fails leaves the strategy's state (moments, centre) as it was.
            let saved = self.strategy.server_state();
            let outcome = match self.strategy.aggregate_train(open.round, &self.global, failures) {
                Ok(next) if next.check_finite().is_err() => {
                    RoundOutcome::Failed("the aggregate has a non-finite value; the model is unchanged".into())
                }
                Ok(next) => match (self.config.max_step_norm, next.delta_from(&self.global)) {
                    (Some(bound), Ok(step)) if step.l2_norm() > bound => RoundOutcome::Failed(format!(
                        "the aggregate would move the model by {:.4e}, more than max_step_norm {bound}; the model is unchanged",
                        step.l2_norm()
                    )),
                    _ => {
                        self.global = next;
                        self.version = self.next_version;
                        self.next_version += 1;
                        RoundOutcome::Aggregated
                    }
                },
                Err(e) => RoundOutcome::Failed(format!("aggregation failed: {e}")),
            };
            if let (RoundOutcome::Failed(_), Some(state)) = (&outcome, saved) {
                // The state was the strategy's own a moment ago: it fits.
                let _ = self.strategy.restore_server_state(state);
            }
            outcome
        };
        // A released model is one subsampled Gaussian step; a failed round releases nothing.
        let privacy = match (&outcome, &self.config.privacy, self.ledger.as_mut()) {
            (RoundOutcome::Aggregated, Some(p), Some(ledger)) => {
                let q = open.selected as f64 / open.population as f64;
                let clip = open.clip.unwrap_or(p.clip_norm);
                // Distributed DP charges what the sum carried (less than configured when more
                // devices dropped than it was sized for); a round without a sum releases none.
                let z = if self.config.distributed_dp { open.carried_noise } else { Some(p.noise_multiplier) };
                z.and_then(|z| ledger.record(open.round, q, z, clip).ok())
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

/// What a result counts for, in either engine: its sample claim bounded by `max_samples`, and
/// with `clip_norm` the factor that brings its delta within it, whatever the device says it
/// did. The strategy's `check` then refuses a wrong shape or a non-finite value.
pub(crate) fn contribution(result: &TrainResult, max_samples: u64, clip_norm: Option<f32>) -> Contribution<'_> {
    let num_samples = result.num_samples.min(max_samples);
    let clip_scale = match clip_norm {
        Some(c) => {
            // A non-finite delta has a NaN norm: scale 1, and the strategy refuses it.
            let norm = result.delta.l2_norm();
            if norm > f64::from(c) { f64::from(c) / norm } else { 1.0 }
        }
        None => 1.0,
    };
    Contribution { delta: &result.delta, num_samples, clipped: result.clipped, clip_scale }
}

mod secure;
pub use secure::SecureAggregate;
#[cfg(test)]
mod tests;
