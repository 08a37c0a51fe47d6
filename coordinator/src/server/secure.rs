//! Secure aggregation over the wire (`secure_aggregation = true`): the coordinator learns the
//! sum of a round's updates, not one of them.
//!
//! A secure round's tasks carry [`SecureTask`] (the public weight cap). A device trains, keeps
//! its update and says `SecureReady`; the **ready phase** ends when every device still pending
//! in the round is ready, or at the latest four stage timeouts before the round's deadline.
//! The ready devices (at least 2) are then the participants of a SecAgg+ session
//! ([`fedge_secagg::ServerSession`]: ids in the order of their device ids, a round seed from the
//! OS, each stage closing when all its devices answered or at `stage_timeout`), which devices
//! follow by polling (`SecurePoll` -> `SecureStep`) and answer (`SecureSend`). When the session
//! ends, its sum decodes to the survivors' sample-weighted mean delta
//! ([`fedge_secagg::weighting`]) and goes to the engine as one
//! [`fedge_engine::SecureAggregate`]; every other selected device has failed. A session that
//! fails (too few devices or shares) fails the round, revealing nothing.
//!
//! **Members.** A relaying aggregator (a simulation shard, `SessionPurpose::Relay`) says
//! ready for its devices (`SecureReady.members`): each is a participant of its own, whose
//! messages the aggregator carries (`SecurePoll`/`SecureSend` name the member); the engine
//! counts the aggregator as one result when any of its members is summed (or when it entered
//! none: it had no update to give).
//!
//! A session's outcome stays until the next round opens: a device that asks after the round
//! closed still learns whether it was summed.
//!
//! Nothing of a session is stored: a coordinator that restarts resumes the open round (it is
//! recorded, as any round) and its devices, reconnecting, train again and enter a new session
//! with fresh keys. A device answers one unmasking request per session, so a restart cannot
//! collect both shares of one device's secrets within a session; a new session masks with new
//! secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::wire::{DeviceId, ErrorCode, Message, SecureTask};
use fedge_engine::SecureAggregate;
use fedge_engine::strategy::Strategy;
use fedge_secagg::{ClientMessage, ServerMessage, ServerSession};

use super::Coordinator;
use super::engine::Refusal;

type Rounds = fedge_engine::RoundEngine<Box<dyn Strategy>>;

/// How a coordinator runs secure rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureSettings {
    /// A stage closes this long after it opened, whoever has not answered.
    pub stage_timeout: Duration,
    /// Neighbours per device (default about `3 log2 m`).
    pub degree: Option<u32>,
    /// Shamir threshold (default `floor(k/2) + 1`).
    pub threshold: Option<u32>,
    /// Quantisation steps per unit (default `2^20 / clip`).
    pub scale: f32,
    /// `W`: a device weighs `min(num_samples, W) / W`.
    pub weight_cap: u64,
    /// The clip norm: each update's L2 bound and SecAgg's per-coordinate bound.
    pub clip: f32,
    /// Distributed DP (`noise_multiplier` with `secure_aggregation`): each device adds its
    /// share of the noise; every device weighs 1 and the sum is divided by the devices selected.
    pub noise: Option<fedge_secagg::weighting::DistributedNoise>,
}

/// The most members one aggregator may enter into a session.
pub const MAX_MEMBERS: usize = 1 << 16;

/// A participant of a session: a device, or a member of a relaying aggregator.
type Participant = (DeviceId, Option<u64>);

/// The open round's secure aggregation.
pub(super) struct SecureRound {
    round: u64,
    /// Devices selected in the round (distributed DP's denominator and noise shares).
    selected: usize,
    /// Ready devices: `None` the device itself, else an aggregator's members.
    ready: BTreeMap<DeviceId, Option<Vec<u64>>>,
    /// The ready aggregators' members, for lookups.
    members: BTreeSet<Participant>,
    /// The session's participants; participant `i` has id `i` in the session.
    peers: Vec<Participant>,
    /// Each participant's id in the session (`peers` the other way round).
    ids: BTreeMap<Participant, u64>,
    session: Option<ServerSession>,
    /// The ready phase ends here at the latest.
    ready_until: Duration,
    /// The ready phase is over (with a session, or without: fewer than 2 devices were ready).
    ready_over: bool,
}

impl SecureRound {
    /// The secure part of round `round`, whose engine deadline is `deadline`.
    pub(super) fn new(
        settings: &SecureSettings,
        round: u64,
        selected: usize,
        now: Duration,
        deadline: Duration,
    ) -> Self {
        let stages = settings.stage_timeout.saturating_mul(4);
        Self {
            round,
            selected,
            ready: BTreeMap::new(),
            members: BTreeSet::new(),
            peers: Vec::new(),
            ids: BTreeMap::new(),
            session: None,
            ready_until: deadline.saturating_sub(stages).max(now),
            ready_over: false,
        }
    }

    /// The round it belongs to.
    pub(super) fn round(&self) -> u64 {
        self.round
    }

    /// What a task of this round carries.
    pub(super) fn task(&self, settings: &SecureSettings) -> SecureTask {
        SecureTask { weight_cap: settings.weight_cap, noise_std: self.sigma(settings) }
    }

    /// Distributed DP: each device's noise standard deviation in this round.
    fn sigma(&self, settings: &SecureSettings) -> Option<f64> {
        settings.noise.map(|n| n.device_sigma(self.selected, f64::from(settings.clip)))
    }

    /// When it next has to act.
    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        match &self.session {
            Some(s) => s.poll_timeout(),
            None if self.ready_over => None,
            None => Some(self.ready_until),
        }
    }

    /// Where it stands, for operators, at `now`.
    pub(super) fn line(&self, now: Duration) -> fedge_core::wire::SecureLine {
        let until = |at: Option<Duration>| {
            at.map_or(0, |d| u64::try_from(d.saturating_sub(now).as_millis()).unwrap_or(u64::MAX))
        };
        let ready: usize = self.ready.values().map(|m| m.as_ref().map_or(1, Vec::len)).sum();
        let (stage, participants, answered) = match &self.session {
            Some(s) => (s.stage_name(), s.peers().len(), s.answered()),
            None if self.ready_over => ("none", ready, ready),
            None => ("ready", ready, ready),
        };
        fedge_core::wire::SecureLine {
            round: self.round,
            stage: stage.to_string(),
            participants: participants as u64,
            answered: answered as u64,
            deadline_in_ms: until(self.poll_timeout()),
        }
    }

    /// Whether `device` takes part (ready, or in the session).
    pub(super) fn holds(&self, device: DeviceId) -> bool {
        self.ready.contains_key(&device)
    }

    /// Device `device` trained for `round` on `version` and holds its update (`members`: a
    /// relaying aggregator's devices that do, `aggregator`: whether `device` is one).
    pub(super) fn ready(
        &mut self,
        settings: &SecureSettings,
        engine: &mut Rounds,
        now: Duration,
        (device, aggregator): (DeviceId, bool),
        (round, version): (u64, u64),
        members: Option<Vec<u64>>,
    ) -> Result<(), Refusal> {
        if let Some(members) = &members {
            if !aggregator {
                return Err((ErrorCode::Malformed, "only a relaying aggregator enters members".into()));
            }
            if members.len() > MAX_MEMBERS {
                return Err((ErrorCode::Malformed, format!("{} members (at most {MAX_MEMBERS})", members.len())));
            }
            let mut sorted = members.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err((ErrorCode::Malformed, "a member is named twice".into()));
            }
        }
        if round != self.round || version != engine.version() {
            return Err((
                ErrorCode::StaleModel,
                format!("round {round} on v{version} is not the open round {} on v{}", self.round, engine.version()),
            ));
        }
        if !engine.is_pending(device) {
            return Err((ErrorCode::NotSelected, format!("device {device} is not waited for in round {round}")));
        }
        if self.ready_over {
            return Err((ErrorCode::StaleModel, format!("round {round}'s secure session began without this device")));
        }
        if self.ready.contains_key(&device) {
            return Err((ErrorCode::Duplicate, format!("device {device} is already ready")));
        }
        self.members.extend(members.iter().flatten().map(|&m| (device, Some(m))));
        self.ready.insert(device, members);
        self.step(settings, engine, now);
        Ok(())
    }

    /// Whether `who` said it is ready.
    fn is_ready(&self, who: Participant) -> bool {
        match who.1 {
            None => matches!(self.ready.get(&who.0), Some(None)),
            Some(_) => self.members.contains(&who),
        }
    }

    /// `who`'s id in the session.
    fn id_of(&self, who: Participant) -> Option<u64> {
        self.ids.get(&who).copied()
    }

    /// What `who` is to do now in `round` (`open`: whether the round is still open).
    pub(super) fn poll(&self, who: Participant, round: u64, open: bool) -> Result<ServerMessage, Refusal> {
        let not_in = || (ErrorCode::StaleModel, format!("{} is not in round {round}'s secure session", name(who)));
        if round != self.round {
            return Err(not_in());
        }
        match &self.session {
            Some(s) => self.id_of(who).and_then(|id| s.poll(id)).ok_or_else(not_in),
            // The round ended without a session (too few devices ready): nothing will come.
            None if self.is_ready(who) && (self.ready_over || !open) => Ok(ServerMessage::Finished { summed: false }),
            None if self.is_ready(who) => Ok(ServerMessage::Wait),
            None => Err(not_in()),
        }
    }

    /// `who`'s message for the open stage.
    pub(super) fn send(
        &mut self,
        settings: &SecureSettings,
        engine: &mut Rounds,
        now: Duration,
        who: Participant,
        round: u64,
        msg: ClientMessage,
    ) -> Result<(), Refusal> {
        let id = self.id_of(who);
        let Some(session) = self.session.as_mut().filter(|_| round == self.round) else {
            return Err((ErrorCode::StaleModel, format!("no secure session of round {round} is open")));
        };
        let Some(id) = id else {
            return Err((ErrorCode::StaleModel, format!("{} is not in round {round}'s secure session", name(who))));
        };
        let taken = session.handle(now, id, msg).map_err(|e| (ErrorCode::InvalidUpdate, e.to_string()));
        self.step(settings, engine, now);
        taken
    }

    /// Time passed (or something arrived): opens the session once the ready phase is over,
    /// closes stages at their deadlines, hands the engine the outcome.
    pub(super) fn step(&mut self, settings: &SecureSettings, engine: &mut Rounds, now: Duration) {
        if engine.current_round() != Some(self.round) {
            return;
        }
        if self.session.is_none() {
            if self.ready_over {
                // Ended without a session: the round fails at its deadline.
                return;
            }
            // Ready devices that failed since (gone, refused) are out.
            self.ready.retain(|d, _| engine.is_pending(*d));
            let ready = &self.ready;
            self.members.retain(|(d, _)| ready.contains_key(d));
            let all = engine.pending().iter().all(|d| self.ready.contains_key(d));
            if (all && !self.ready.is_empty()) || now >= self.ready_until {
                self.begin(settings, engine, now);
            }
            return;
        }
        let session = self.session.as_mut().expect("checked");
        session.handle_timeout(now);
        let Some(outcome) = session.outcome() else { return };
        let survivors = outcome.as_ref().map_or(0, |a| a.survivors.len());
        let peers = &self.peers;
        // Aggregators that entered no member had nothing to add: they answered all the same.
        let empty: Vec<DeviceId> =
            self.ready.iter().filter(|(_, m)| m.as_ref().is_some_and(Vec::is_empty)).map(|(d, _)| *d).collect();
        let selected = self.selected;
        let result = outcome.map_err(|e| e.to_string()).and_then(|agg| {
            let (mean, samples, noise_multiplier) = match settings.noise {
                // Every survivor weighs 1; the noised sum over the devices selected.
                Some(n) => (
                    fedge_secagg::weighting::fixed_denominator_mean(session.config(), agg, selected)?,
                    agg.survivors.len() as u64,
                    Some(n.carried(selected, agg.survivors.len())),
                ),
                None => {
                    let (mean, samples) =
                        fedge_secagg::weighting::weighted_mean(session.config(), agg, settings.weight_cap)?;
                    (mean, samples, None)
                }
            };
            let delta = ModelParams::new(engine.global().layout().clone(), mean).map_err(|e| e.to_string())?;
            let mut devices: Vec<DeviceId> = agg.survivors.iter().map(|&i| peers[i as usize].0).collect();
            devices.extend(empty);
            devices.sort_unstable();
            devices.dedup();
            Ok(SecureAggregate { devices, mean_delta: delta, samples, noise_multiplier })
        });
        match result {
            Ok(aggregate) => {
                tracing::info!(
                    "round {}: secure sum of {} of {} participants ({} devices)",
                    self.round,
                    survivors,
                    peers.len(),
                    aggregate.devices.len()
                );
                if let Err(e) = engine.handle_secure_aggregate(now, self.round, &aggregate) {
                    tracing::warn!("round {}: the secure sum was refused: {e}", self.round);
                }
            }
            Err(e) => tracing::warn!("round {}: secure aggregation failed: {e}", self.round),
        }
        // Whoever is not in the sum is done with this round.
        for d in engine.pending() {
            engine.handle_train_failure(now, d);
        }
    }

    /// Opens the session among the ready devices' participants (at least 2; with fewer, or
    /// settings SecAgg refuses for their number, the round fails now: no device it still waits
    /// for could enter a sum).
    fn begin(&mut self, settings: &SecureSettings, engine: &mut Rounds, now: Duration) {
        self.ready_over = true;
        self.peers = self
            .ready
            .iter()
            .flat_map(|(&d, members)| match members {
                None => vec![(d, None)],
                Some(ms) => ms.iter().map(|&m| (d, Some(m))).collect(),
            })
            .collect();
        self.ids = self.peers.iter().enumerate().map(|(i, p)| (*p, i as u64)).collect();
        let ids: Vec<u64> = (0..self.peers.len() as u64).collect();
        let m = ids.len() as u32;
        if m < 2 {
            tracing::warn!("round {}: {m} participant ready for the secure sum; the round fails", self.round);
            fail_pending(engine, now);
            return;
        }
        let d = engine.global().numel() + 1;
        // Under distributed DP a coordinate is a clipped value plus noise: bounded at C + 8 sigma.
        let bound = settings.clip + self.sigma(settings).map_or(0.0, |s| (8.0 * s) as f32);
        let config = match fedge_secagg::weighting::round_config(
            m,
            d,
            bound,
            settings.scale,
            settings.degree,
            settings.threshold,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("round {}: no secure session for {m} participants: {e}", self.round);
                fail_pending(engine, now);
                return;
            }
        };
        let seed: [u8; 32] = rand::random();
        match ServerSession::new(&config, seed, ids, now, settings.stage_timeout) {
            Ok(s) => {
                tracing::info!(
                    "round {}: secure session of {m} participants (degree {}, threshold {}, {}-bit ring)",
                    self.round,
                    config.degree,
                    config.threshold,
                    config.modulus_bits
                );
                self.session = Some(s);
            }
            Err(e) => {
                tracing::warn!("round {}: no secure session: {e}", self.round);
                fail_pending(engine, now);
            }
        }
    }
}

impl Coordinator {
    /// Runs every round from now on with secure aggregation. Refused in FedBuff mode, under
    /// central DP, for a strategy that needs every update, and for settings SecAgg refuses.
    pub fn set_secure_aggregation(&self, settings: SecureSettings) -> Result<(), String> {
        let mut s = self.lock();
        let Some(engine) = s.rounds.engine.rounds() else {
            return Err("secure_aggregation sums a round's devices: FedBuff mode has no rounds".into());
        };
        match (engine.config().privacy.is_some(), engine.config().distributed_dp, settings.noise.is_some()) {
            (true, false, _) => {
                return Err("secure_aggregation with central DP: the server cannot clip or noise updates it never sees (set noise_multiplier with secure_aggregation for distributed DP)".into());
            }
            (true, true, true) | (false, false, false) => {}
            _ => return Err("distributed DP needs both the engine's DP keys and the devices' noise".into()),
        }
        if engine.holds_updates() {
            return Err("secure_aggregation gives the server only the sum: the strategy needs every update (use fedavg, fedavgm, fedadam, fedadagrad, fedyogi or fedprox)".into());
        }
        if !(settings.clip.is_finite() && settings.clip > 0.0) || settings.weight_cap == 0 {
            return Err("secure_aggregation needs a positive clip_norm and weight cap".into());
        }
        // The clip and scale as any session of this model checks them (the degree and threshold
        // are checked per round, for its number of devices).
        fedge_secagg::weighting::round_config(
            2,
            engine.global().numel() + 1,
            settings.clip,
            settings.scale,
            None,
            None,
        )?;
        let open = engine.open_round();
        let now = self.now();
        let rounds = &mut s.rounds;
        rounds.secure_settings = Some(settings);
        // A round resumed from the store before this was set: its tasks are secure too.
        if let Some(open) = open {
            let secure = SecureRound::new(&settings, open.round, open.chosen.len(), now, open.deadline);
            for task in rounds.tasks.values_mut() {
                task.secure = Some(secure.task(&settings));
            }
            rounds.secure_round = Some(secure);
        }
        Ok(())
    }

    /// Whether rounds aggregate securely.
    pub fn secure_aggregation(&self) -> Option<SecureSettings> {
        self.lock().rounds.secure_settings
    }

    /// A device's message about secure aggregation: ready, poll or send.
    pub(super) fn handle_secure(&self, id: DeviceId, msg: Message) -> Message {
        let order = self.ordered();
        let reply = {
            let mut s = self.lock();
            let now = self.now();
            let aggregator = s.fleet.aggregators.contains(&id);
            let rounds = &mut s.rounds;
            let (Some(settings), Some(secure)) = (rounds.secure_settings, rounds.secure_round.as_mut()) else {
                return Message::Error { code: ErrorCode::StaleModel, message: "no secure round is open".into() };
            };
            let Some(engine) = rounds.engine.rounds_mut() else {
                return Message::Error { code: ErrorCode::Malformed, message: "no rounds here".into() };
            };
            let answer = match msg {
                Message::SecureReady { round, model_version, members } => secure
                    .ready(&settings, engine, now, (id, aggregator), (round, model_version), members)
                    .map(|()| Message::Ack { round }),
                Message::SecurePoll { round, member } => {
                    let open = engine.current_round() == Some(round);
                    let asked = match &rounds.previous_secure {
                        Some(previous) if previous.round() == round => previous,
                        _ => secure,
                    };
                    asked.poll((id, member), round, open).map(|step| Message::SecureStep { round, step })
                }
                Message::SecureSend { round, member, msg } => {
                    secure.send(&settings, engine, now, (id, member), round, msg).map(|()| Message::Ack { round })
                }
                _ => Err((ErrorCode::Malformed, "not a secure-aggregation message".into())),
            };
            answer.unwrap_or_else(|(code, message)| {
                self.metrics.rejected(code);
                Message::Error { code, message }
            })
        };
        // A session may have opened or a stage closed: its deadline moved.
        self.deadlines.notify_one();
        self.settle(&order);
        reply
    }
}

/// Every device the open round still waits for is done with it.
fn fail_pending(engine: &mut Rounds, now: Duration) {
    for d in engine.pending() {
        engine.handle_train_failure(now, d);
    }
}

/// A participant as a log line names it.
fn name((device, member): Participant) -> String {
    match member {
        None => format!("device {device}"),
        Some(m) => format!("member {m} of aggregator {device}"),
    }
}
