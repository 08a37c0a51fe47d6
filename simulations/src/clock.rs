//! The virtual clock: one round from its start to its close, in virtual time.
//!
//! Each selected device's result is due at the round's start plus its round trip
//! ([`crate::devices::DeviceSpeed::round_trip`]). Results are handed to the engine in order of
//! arrival (ties in selection order), each at its arrival time; before a result that arrives
//! after the engine's deadline ([`RoundEngine::poll_timeout`]) the engine is told the time
//! reached the deadline ([`RoundEngine::handle_timeout`]), so it closes the round with what it
//! has, or fails it, exactly as the coordinator's deadline timer makes it do on the network.
//! Results arriving after the close are still handed over, at their arrival times, and the
//! engine refuses them as it refuses a late upload (stale round): the simulator decides
//! nothing itself.
//!
//! Simplification: late results are delivered before the next round starts (at the close),
//! so a device still uploading a late result may be sampled again at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::{DeviceId, Message, TrainResult, TrainTask};
use fedge_edge::TaskOutcome;
use fedge_engine::strategy::Strategy;
use fedge_engine::{EngineEvent, RoundEngine, RoundReport};
use rand::RngExt;

use crate::attack::Attack;
use crate::devices::DeviceSpeed;
use crate::pool::{Done, Job, Pool};
use crate::run::Observer;
use crate::secure::SecureSetup;
use crate::secure::protocol::{self, Secured};
use crate::shard::{Hosted, HostedSum};

/// One result as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// The device.
    pub device: DeviceId,
    /// Virtual time it reached the coordinator.
    pub at: Duration,
    /// Whether the engine counted it (late and invalid results are refused).
    pub accepted: bool,
}

/// One round on the virtual clock, as it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTrace {
    /// When the round started.
    pub start: Duration,
    /// The engine's deadline for it.
    pub deadline: Duration,
    /// Selected devices that dropped out (reported as failures at the start).
    pub dropped: Vec<DeviceId>,
    /// Results (and training failures, `accepted: false`) in the order they were delivered.
    pub arrivals: Vec<Arrival>,
    /// The engine's report; `closed_at` is the virtual time it closed.
    pub report: RoundReport,
    /// Selected devices that are attackers (dropouts included).
    pub attackers: usize,
}

impl RoundTrace {
    /// Virtual time from the start to the close.
    pub fn duration(&self) -> Duration {
        self.report.closed_at.saturating_sub(self.start)
    }
}

/// What the clock needs of the fleet.
pub(crate) struct Fleet<'a> {
    /// Every device's speeds, by id.
    pub speeds: &'a [DeviceSpeed],
    /// Bytes of the encoded global model (each transfer's size).
    pub model_bytes: u64,
    /// Each device's example indices.
    pub data: &'a BTreeMap<DeviceId, Arc<Vec<usize>>>,
    /// Probability that a selected device drops out.
    pub dropout: f64,
    /// The run's seed (dropouts).
    pub seed: u64,
    /// Byzantine devices, if the run has any.
    pub attack: Option<&'a Attack>,
    /// Secure aggregation, when on: on-time results go to [`crate::secure::protocol`], never
    /// to the engine.
    pub secure: Option<SecureSetup>,
    /// At most this many examples per device and round (`local_examples`).
    pub local_examples: Option<usize>,
    /// A shard of a sharded run trains only the devices it hosts; the others' results are
    /// placeholders (their sample counts, a zero delta) that keep the engine's decisions the
    /// whole run's ([`crate::shard`]).
    pub hosted: Option<Hosted>,
    /// Devices trained in one launch: a round's jobs go to the pool in groups of this many, in
    /// arrival order (a label-flip attacker's, on its own data, alone).
    pub devices_per_launch: usize,
}

impl Fleet<'_> {
    /// The examples `device` trains on for task `round`: all of `indices`, or a seeded sample
    /// of `local_examples` of them (in their own order) when it has more.
    pub fn local_indices(&self, device: DeviceId, round: u64, indices: Arc<Vec<usize>>) -> Arc<Vec<usize>> {
        match self.local_examples {
            Some(cap) if indices.len() > cap => {
                let mut rng = derive_rng(self.seed, &[stream::LOCAL_SAMPLE, round, device]);
                let mut picked = rand::seq::index::sample(&mut rng, indices.len(), cap).into_vec();
                picked.sort_unstable();
                Arc::new(picked.into_iter().map(|i| indices[i]).collect())
            }
            _ => indices,
        }
    }
}

/// What a round left besides its trace: bytes uploaded, and (in a shard) the accepted results of
/// the devices it hosts, in arrival order.
pub(crate) struct RoundOutput {
    /// The round as it happened.
    pub trace: RoundTrace,
    /// Bytes the devices uploaded.
    pub upload_bytes: u64,
    /// A shard's hosted devices' accepted results, summed as they arrive (`None` without
    /// [`Fleet::hosted`]).
    pub hosted: Option<HostedSum>,
    /// With secure aggregation, a shard's hosted devices whose results the round's sum holds,
    /// with those results (each enters the root's secure sum itself), in arrival order.
    pub members: Vec<(DeviceId, TrainResult)>,
}

/// Runs the open round `round`, started at `start`, to its close: its tasks go to the pool,
/// the devices training from `global`, and their results come back to the engine in
/// virtual-time order.
pub(crate) fn drive_round(
    engine: &mut RoundEngine<Box<dyn Strategy>>,
    pool: &Pool,
    fleet: &Fleet<'_>,
    global: Arc<ModelParams>,
    round: u64,
    start: Duration,
    obs: &mut dyn Observer,
) -> RoundOutput {
    let deadline = engine.poll_timeout().expect("the round is open");
    let foreign = |device: DeviceId| fleet.hosted.is_some_and(|h| !h.hosts(device));
    let mut hosted_sum = fleet.hosted.map(|_| HostedSum::new(global.layout().clone()));
    let mut dropout_rng = derive_rng(fleet.seed, &[stream::DROPOUT, round]);
    let mut planned = Vec::new();
    let mut dropped = Vec::new();
    let mut selected = 0;
    let mut attackers = 0;
    while let Some(EngineEvent::Assign { device, task }) = engine.poll_event() {
        selected += 1;
        attackers += usize::from(fleet.attack.is_some_and(|a| a.is_attacker(device)));
        if fleet.dropout > 0.0 && dropout_rng.random::<f64>() < fleet.dropout {
            dropped.push(device);
            continue;
        }
        // A label-flip attacker trains on its copy of its examples, labels flipped.
        let (data, indices) = match fleet.attack.and_then(|a| a.flipped_data(device)) {
            Some((data, indices)) => (Some(data), indices),
            None => (None, fleet.data[&device].clone()),
        };
        let indices = fleet.local_indices(device, round, indices);
        let samples = indices.len() as u64 * u64::from(task.config.epochs);
        let at = start.saturating_add(fleet.speeds[device as usize].round_trip(fleet.model_bytes, samples));
        planned.push((at, device, task, indices, data));
    }
    // Arrival order; the sort is stable, so ties stay in selection order.
    planned.sort_by_key(|p| p.0);
    let due: Vec<(Duration, DeviceId)> = planned.iter().map(|p| (p.0, p.1)).collect();
    // A shard's other devices are not trained: their placeholders are made as they are due.
    let mut placeholders = BTreeMap::new();
    // A shard's devices train from the root's model, not the engine's own.
    let global_hash = fleet.hosted.map(|_| global.content_hash());
    let mut group = Vec::new();
    for (seq, (_, device, mut task, indices, data)) in planned.into_iter().enumerate() {
        if foreign(device) {
            placeholders.insert(seq, (task, indices.len() as u64));
            continue;
        }
        if let Some(hash) = global_hash {
            task.model_hash = hash;
        }
        let job = Job { seq, device, task, global: global.clone(), indices, data };
        if fleet.devices_per_launch <= 1 || job.data.is_some() {
            pool.submit(job);
            continue;
        }
        group.push(job);
        if group.len() == fleet.devices_per_launch {
            pool.submit_group(std::mem::take(&mut group));
        }
    }
    if !group.is_empty() {
        pool.submit_group(group);
    }
    obs.round_started(round, selected);
    for &d in &dropped {
        engine.handle_train_failure(start, d);
        obs.device_done();
    }
    // Deliver in arrival order: a reorder buffer keeps the run deterministic whatever the
    // workers' timing.
    let mut arrivals = Vec::with_capacity(due.len());
    let mut upload_bytes = 0u64;
    let mut waiting = BTreeMap::new();
    let mut next = 0;
    // With secure aggregation, the results that arrive by the deadline, held for the protocol.
    let mut batch = fleet.secure.map(|_| Vec::new());
    let mut members = Vec::new();
    // Attackers see the whole round before anything is delivered (little-is-enough needs all
    // their updates together); delivery order and times are unchanged.
    if let Some(attack) = fleet.attack {
        while waiting.len() < due.len() {
            let done = pool.next_done();
            obs.device_done();
            waiting.insert(done.seq, done);
        }
        let mut deltas: Vec<_> = waiting
            .values_mut()
            .filter(|d| attack.is_attacker(d.device))
            .filter_map(|d| {
                let device = d.device;
                d.outcome.as_mut().ok().map(|o| (device, &mut o.result.delta))
            })
            .collect();
        attack.apply(round, selected, attackers, &mut deltas);
    }
    while next < due.len() {
        if let Some((task, samples)) = placeholders.remove(&next) {
            let device = due[next].1;
            waiting.insert(next, placeholder(next, device, &task, samples, &global));
        }
        if !waiting.contains_key(&next) {
            let done = pool.next_done();
            obs.device_done();
            waiting.insert(done.seq, done);
        }
        while let Some(done) = waiting.remove(&next) {
            let (at, device) = due[next];
            next += 1;
            if let Some(batch) = batch.as_mut() {
                // Held until the protocol runs; `accepted` is settled by its outcome.
                match done.outcome {
                    Ok(outcome) if at <= deadline => {
                        if fleet.hosted.is_some() && !foreign(device) {
                            members.push((device, outcome.result.clone()));
                        }
                        batch.push((device, outcome.result, at));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        obs.line(&format!("round {round}: device {device} failed: {e}"));
                        engine.handle_train_failure(at, device);
                    }
                }
                arrivals.push(Arrival { device, at, accepted: false });
                continue;
            }
            if let Some(deadline) = engine.poll_timeout().filter(|&d| at > d) {
                engine.handle_timeout(deadline);
            }
            let open = engine.current_round() == Some(round);
            let accepted = match done.outcome {
                Ok(outcome) if foreign(device) => engine.handle_train_result(at, device, &outcome.result).is_ok(),
                Ok(outcome) => {
                    let bytes = codec::encode(&Message::TrainResult(outcome.result));
                    upload_bytes += bytes.len() as u64;
                    match codec::decode(&bytes) {
                        Ok(Message::TrainResult(result)) => match engine.handle_train_result(at, device, &result) {
                            Ok(()) => {
                                if let Some(sum) = hosted_sum.as_mut() {
                                    sum.add(engine.counted(device, &result), result.train_loss);
                                }
                                true
                            }
                            Err(e) => {
                                // After the close every result is refused as stale: the
                                // round's report counts those devices as stragglers.
                                if open {
                                    obs.line(&format!("round {round}: device {device} rejected: {e}"));
                                }
                                false
                            }
                        },
                        _ => {
                            engine.handle_train_failure(at, device);
                            false
                        }
                    }
                }
                Err(e) => {
                    obs.line(&format!("round {round}: device {device} failed: {e}"));
                    engine.handle_train_failure(at, device);
                    false
                }
            };
            arrivals.push(Arrival { device, at, accepted });
        }
    }
    if let (Some(batch), Some(setup)) = (batch, fleet.secure.as_ref()) {
        upload_bytes += secure_round(engine, setup, round, batch, &mut arrivals, obs);
        members.retain(|(d, _)| arrivals.iter().any(|a| a.device == *d && a.accepted));
    }
    // Every selected device answered or failed, so the round has closed; the deadline is the
    // backstop should it not have.
    if engine.current_round() == Some(round) {
        engine.handle_timeout(deadline);
    }
    let report = match engine.poll_event() {
        Some(EngineEvent::RoundClosed(r)) => r,
        Some(other) => unreachable!("no task is assigned while a round is open: {other:?}"),
        None => unreachable!("the round closed by its deadline at the latest"),
    };
    RoundOutput {
        trace: RoundTrace { start, deadline, dropped, arrivals, report, attackers },
        upload_bytes,
        hosted: hosted_sum,
        members,
    }
}

/// A result standing in for a device another shard trains: what the engine's decisions read
/// of it (round, version, sample count) are the real result's; the delta is zero.
fn placeholder(seq: usize, device: DeviceId, task: &TrainTask, samples: u64, global: &ModelParams) -> Done {
    let result = TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: samples,
        train_loss: f32::NAN,
        delta: ModelParams::zeros(global.layout().clone()),
        clipped: false,
    };
    Done { seq, device, outcome: Ok(TaskOutcome { result, clip: None, noise_std: None, steps: 0 }) }
}

/// Runs secure aggregation among the round's on-time results and hands the engine their sum
/// at the last one's arrival (the protocol's own time is not modelled); devices not summed
/// fail. Returns the bytes the devices sent.
fn secure_round(
    engine: &mut RoundEngine<Box<dyn Strategy>>,
    setup: &SecureSetup,
    round: u64,
    batch: Vec<(DeviceId, fedge_core::wire::TrainResult, Duration)>,
    arrivals: &mut [Arrival],
    obs: &mut dyn Observer,
) -> u64 {
    let at = batch.iter().map(|b| b.2).max().unwrap_or_default();
    let reported: Vec<DeviceId> = batch.iter().map(|b| b.0).collect();
    let plain = batch.into_iter().map(|(d, r, _)| (d, r)).collect();
    let selected = engine.open_round().map_or(reported.len(), |o| o.chosen.len());
    let (summed, failed, traffic) = match protocol::aggregate(setup, round, selected, plain) {
        Ok(Secured { aggregate, dropped, traffic }) => (Some(aggregate), dropped, traffic),
        Err(f) => {
            obs.line(&format!("round {round}: secure aggregation failed: {}", f.reason));
            (None, reported, f.traffic)
        }
    };
    for &d in &failed {
        engine.handle_train_failure(at, d);
    }
    if let Some(aggregate) = summed {
        match engine.handle_secure_aggregate(at, round, &aggregate) {
            Ok(()) => {
                for a in arrivals.iter_mut().filter(|a| aggregate.devices.contains(&a.device)) {
                    a.accepted = true;
                }
            }
            Err(e) => obs.line(&format!("round {round}: the secure aggregate was refused: {e}")),
        }
    }
    traffic.iter().map(|t| t.sent).sum()
}
