//! `mode = "fedbuff"`: the buffered asynchronous engine ([`BufferedEngine`]) on the virtual
//! clock.
//!
//! An event loop: whenever the engine has a task for a free device (fewer than
//! `max_concurrency` training), the task goes to the worker pool at once, on the model
//! version current at that virtual time `t`, and its result is due at `t` plus the device's
//! round trip ([`crate::devices::DeviceSpeed::round_trip`]). The earliest due result (ties by
//! task number) is then handed to the engine at its arrival time, which frees the device; the
//! engine draws the next device uniformly among the free ones from its seeded stream. Jobs
//! queue in the pool as soon as they are tasked, so every worker stays busy, and a reorder
//! buffer hands results over in virtual-time order whatever the threads' timing: a seeded run
//! is reproducible byte for byte. Every training job derives its random streams from the seed,
//! its task number and the device.
//!
//! A row of `rounds.csv` per aggregation; the run stops after `rounds` aggregations or once
//! an evaluation reaches `target_accuracy`. Jobs still queued when it stops are trained and
//! dropped (the pool finishes its queue when it closes).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::dataset::Dataset;
use fedge_core::partition::PartitionReport;
use fedge_core::wire::{DeviceId, Message};
use fedge_engine::{AggregationReport, AsyncEvent, BufferedEngine, Evaluation, RoundOutcome};
use fedge_learn::Trainer;

use super::report::write_json;
use super::{Observer, RoundRow, SimError, SimOutput, Summary, score, seconds};
use crate::clock::Fleet;
use crate::config::{SimConfig, SimConfigError};
use crate::pool::{Done, Job, Pool};

/// What the fedbuff loop needs from the run's setup.
pub(super) struct Setup<'a> {
    pub config: &'a SimConfig,
    pub initial: ModelParams,
    pub pool: Pool,
    pub fleet: Fleet<'a>,
    pub evaluator: &'a mut Trainer,
    pub test: &'a Dataset,
    pub csv: Option<(csv::Writer<File>, PathBuf)>,
    pub partition: PartitionReport,
    pub parameters: usize,
    pub started: Instant,
}

/// Runs FedBuff to `rounds` aggregations (or the target accuracy) and writes the outputs.
pub(super) fn run(setup: Setup<'_>, out: Option<&Path>, obs: &mut dyn Observer) -> Result<SimOutput, SimError> {
    let Setup { config, initial, pool, fleet, evaluator, test, mut csv, partition, parameters, started } = setup;
    let async_config = config.async_config()?;
    obs.line(&format!(
        "fedbuff: buffer K = {}, at most {} devices training, staleness weight {} (max {}), server_lr {}{}",
        async_config.buffer_size,
        async_config.max_concurrency,
        async_config.staleness.name(),
        async_config.max_staleness,
        async_config.server_lr,
        match &async_config.privacy {
            Some(p) => format!(
                ", central DP z = {} C = {} (each aggregation charged as a Gaussian release, q = 1)",
                p.noise_multiplier, p.clip_norm
            ),
            None => String::new(),
        }
    ));
    let noise = Box::new(fedge_core::rng::derive_rng(config.seed, &[fedge_core::rng::stream::SERVER_NOISE]));
    let mut engine =
        BufferedEngine::new(async_config, initial, noise).map_err(|e| SimConfigError::Invalid(e.to_string()))?;
    for &d in fleet.data.keys() {
        engine.handle_device_available(d);
    }
    let mut global = (engine.version(), Arc::new(engine.global().clone()));
    // Tasks in flight by (arrival, task number); finished jobs waiting to be delivered.
    let mut in_flight: BTreeMap<(Duration, u64), DeviceId> = BTreeMap::new();
    let mut finished: BTreeMap<u64, Done> = BTreeMap::new();
    let mut now = Duration::ZERO;
    let mut rows = Vec::new();
    let mut round_seconds = Vec::new();
    let mut upload_bytes = 0u64;
    let (mut last_eval, mut best, mut rounds_to_target) = (None::<Evaluation>, 0.0f64, None);
    let (mut tasked, mut refused, mut since) = (0usize, 0usize, Instant::now());
    let mut last_at = Duration::ZERO;
    'run: loop {
        while let Some(event) = engine.poll_event() {
            match event {
                AsyncEvent::Assign { device, task } => {
                    if global.0 != task.model_version {
                        global = (engine.version(), Arc::new(engine.global().clone()));
                    }
                    let indices = fleet.local_indices(device, task.round, fleet.data[&device].clone());
                    let samples = indices.len() as u64 * u64::from(task.config.epochs);
                    let at = now.saturating_add(fleet.speeds[device as usize].round_trip(fleet.model_bytes, samples));
                    in_flight.insert((at, task.round), device);
                    tasked += 1;
                    let seq = task.round as usize;
                    pool.submit(Job { seq, device, task, global: global.1.clone(), indices, data: None });
                }
                AsyncEvent::Aggregated(report) => {
                    let n = rows.len() as u64 + 1;
                    let evaluate = n.is_multiple_of(config.eval_every) || n == config.rounds;
                    let eval = if evaluate {
                        let e = score(evaluator, engine.global(), test, &mut best)?;
                        engine.handle_evaluation(report.model_version, e);
                        last_eval = Some(e);
                        Some(e)
                    } else {
                        None
                    };
                    let secs = since.elapsed().as_secs_f64();
                    round_seconds.push(secs);
                    let row = row(n, &report, eval, tasked, refused, last_at);
                    (tasked, refused, since, last_at) = (0, 0, Instant::now(), report.at);
                    obs.line(&format_row(&row, config.rounds, secs, &report));
                    if let Some((w, path)) = csv.as_mut() {
                        w.serialize(&row).and_then(|_| w.flush().map_err(Into::into)).map_err(|e| {
                            SimError::Output { path: path.clone(), cause: std::io::Error::other(e.to_string()) }
                        })?;
                    }
                    rows.push(row);
                    if let (Some(t), Some(e)) = (config.target_accuracy, eval)
                        && e.accuracy >= t
                    {
                        rounds_to_target = Some(n);
                        obs.line(&format!("target accuracy {:.2}% reached at aggregation {n}", t * 100.0));
                        break 'run;
                    }
                    if n >= config.rounds {
                        break 'run;
                    }
                }
            }
        }
        let Some(((at, task), device)) = in_flight.pop_first() else {
            match engine.budget_spent() {
                Some((spent, target)) => obs.line(&format!(
                    "stopping: one more aggregation would take epsilon from {spent:.3} past the budget {target}"
                )),
                None => obs.line("no device left to task: stopping"),
            }
            break;
        };
        now = at;
        let done = loop {
            if let Some(done) = finished.remove(&task) {
                break done;
            }
            let done = pool.next_done();
            finished.insert(done.seq as u64, done);
        };
        let accepted = match done.outcome {
            Ok(outcome) => {
                let bytes = codec::encode(&Message::TrainResult(outcome.result));
                upload_bytes += bytes.len() as u64;
                match codec::decode(&bytes) {
                    Ok(Message::TrainResult(result)) => match engine.handle_train_result(now, device, &result) {
                        Ok(()) => true,
                        Err(e) => {
                            obs.line(&format!("task {task}: device {device} refused: {e}"));
                            false
                        }
                    },
                    _ => false,
                }
            }
            Err(e) => {
                obs.line(&format!("task {task}: device {device} failed: {e}"));
                false
            }
        };
        if !accepted {
            // Refusals of the device's own task end it already; this covers the rest.
            engine.handle_train_failure(now, device);
            refused += 1;
            if refused > 1000 + 10 * (config.max_concurrency + config.buffer_size) {
                obs.line(&format!("{refused} results refused since the last aggregation: stopping"));
                break;
            }
        }
    }
    drop(pool);
    let final_eval = match (last_eval, rows.last()) {
        (Some(e), Some(row)) if row.accuracy.is_some() => e,
        _ => score(evaluator, engine.global(), test, &mut best)?,
    };
    let summary = Summary {
        strategy: "fedbuff".into(),
        final_accuracy: final_eval.accuracy,
        final_loss: final_eval.loss,
        best_accuracy: best,
        rounds: rows.len() as u64,
        rounds_to_target,
        devices: config.devices,
        devices_with_data: fleet.data.len(),
        parameters,
        model_version: engine.version(),
        model_hash: engine.global().content_hash().to_string(),
        wall_seconds: started.elapsed().as_secs_f64(),
        round_seconds,
        virtual_seconds: seconds(last_at),
        upload_bytes,
        epsilon: engine.epsilon(),
        sampling_rate: engine.epsilon().map(|_| 1.0),
        teacher_accuracy: None,
        teacher_bytes: None,
        student_accuracy: None,
        student_f32_accuracy: None,
        student_bytes: None,
        student_parameters: None,
        teacher_latency_us: None,
        student_latency_us: None,
        config: config.clone(),
        attack: None,
    };
    if let Some(dir) = out {
        write_json(&dir.join("summary.json"), &summary)?;
        if let Err(e) = crate::plot::write_run_plots(dir, &rows, &summary) {
            tracing::warn!("no accuracy plot: {e}");
        }
    }
    Ok(SimOutput {
        rounds: rows,
        summary,
        partition,
        global: engine.global().clone(),
        student: None,
        traces: Vec::new(),
    })
}

/// The aggregation's line of `rounds.csv`.
fn row(
    n: u64,
    report: &AggregationReport,
    eval: Option<Evaluation>,
    tasked: usize,
    refused: usize,
    last_at: Duration,
) -> RoundRow {
    RoundRow {
        round: n,
        accuracy: eval.map(|e| e.accuracy),
        loss: eval.map(|e| e.loss),
        train_loss: report.train_loss,
        model_version: report.model_version,
        selected: tasked,
        results: report.results,
        failures: refused,
        samples: report.samples,
        aggregated: report.outcome == RoundOutcome::Aggregated,
        virtual_start_s: seconds(last_at),
        virtual_duration_s: seconds(report.at.saturating_sub(last_at)),
        clip_norm: None,
        epsilon: report.epsilon,
        mean_staleness: Some(report.mean_staleness),
        max_staleness: Some(report.max_staleness),
        attackers: 0,
    }
}

/// An aggregation's console line.
fn format_row(row: &RoundRow, rounds: u64, secs: f64, report: &AggregationReport) -> String {
    let eval = match (row.accuracy, row.loss) {
        (Some(a), Some(l)) => format!("accuracy {:6.2}%  loss {l:.4}", a * 100.0),
        _ => "accuracy    -     loss   -   ".to_string(),
    };
    let status = match &report.outcome {
        RoundOutcome::Aggregated => String::new(),
        RoundOutcome::Failed(why) => format!("  (not aggregated: {why})"),
    };
    format!(
        "aggregation {:>w$}/{rounds}  {eval}  train_loss {:.4}  results {}  staleness mean {:.2} max {}  v{}  virtual {:.1}s  {secs:.2}s{status}",
        row.round,
        row.train_loss,
        row.results,
        report.mean_staleness,
        report.max_staleness,
        row.model_version,
        seconds(report.at),
        w = rounds.to_string().len()
    )
}
