//! One shard at work: replay the experiment's rounds, train the hosted devices for each root
//! task, upload their weighted mean (see [`crate::shard`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::ModelParams;
use fedge_core::wire::{Capabilities, ErrorCode, Message, OperatorCommand, RoundLine, TrainResult, TrainTask};
use fedge_edge::link::{DeviceTls, Link};
use fedge_engine::strategy::Strategy;
use fedge_engine::{RoundEngine, RoundOutcome};

use super::recorder::Recorder;
use super::{Hosted, ShardError, check_shardable};
use crate::clock::{Fleet, RoundOutput, drive_round};
use crate::config::SimConfig;
use crate::pool::Pool;
use crate::run::{Observer, Prepared, RoundRow, prepare, worker_count};

/// How a shard runs.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// The experiment (the same file for every shard).
    pub config: SimConfig,
    /// Which shard this is.
    pub hosted: Hosted,
    /// The root, `host:port` (a name is looked up at every connection).
    pub root: String,
    /// The name the root's certificate must carry.
    pub server_name: String,
    /// The fleet CA and this shard's aggregator certificate and key.
    pub tls: DeviceTls,
    /// Record the experiment here (`rounds.csv`): one shard does.
    pub out: Option<PathBuf>,
    /// How long to keep trying to reach the root before giving up.
    pub patience: Duration,
}

/// What a shard did.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardReport {
    /// Rounds it took part in (uploaded for), this run of the process.
    pub rounds_trained: u64,
    /// Its devices' results it pre-aggregated, this run of the process.
    pub devices_trained: u64,
    /// Rounds replayed without training (before the root's task when it started late).
    pub rounds_replayed: u64,
    /// The recorder's rows (empty on the other shards).
    pub rows: Vec<RoundRow>,
}

/// The shard's replay of the experiment: the engine (its model unused) on the virtual clock.
struct Replay {
    engine: RoundEngine<Box<dyn Strategy>>,
    now: Duration,
}

/// Runs shard `opts.hosted` until the experiment's last round is uploaded (and, for the
/// recorder, recorded). Blocks: it runs its own async runtime for the link.
pub fn run_shard(opts: ShardOptions, obs: &mut dyn Observer) -> Result<ShardReport, ShardError> {
    let config = &opts.config;
    check_shardable(config)?;
    let hosted = opts.hosted;
    let Prepared { train, test, num_classes, device_data, mut evaluator, engine, speeds, model_bytes, .. } =
        prepare(config, obs)?;
    let mine: u64 = device_data.iter().filter(|(d, _)| hosted.hosts(**d)).map(|(_, i)| i.len() as u64).sum();
    obs.line(&format!(
        "shard {} of {}: {} of {} devices with data, {mine} examples; root {}",
        hosted.index(),
        hosted.count(),
        device_data.keys().filter(|d| hosted.hosts(**d)).count(),
        device_data.len(),
        opts.root
    ));
    let pool = Pool::new(worker_count(config), config.model, num_classes, config.backend, train, config.seed)
        .map_err(crate::run::SimError::from)?;
    let fleet = |hosted| Fleet {
        speeds: &speeds,
        model_bytes,
        data: &device_data,
        dropout: config.dropout,
        seed: config.seed,
        attack: None,
        secure: None,
        local_examples: config.local_examples,
        hosted: Some(hosted),
    };
    let (training, replaying) = (fleet(hosted), fleet(hosted.replay_only()));
    let mut replay = Replay { engine, now: Duration::ZERO };
    let mut recorder = match &opts.out {
        Some(dir) => Some(Recorder::open(dir, config)?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| ShardError::Root { root: opts.root.clone(), detail: format!("no async runtime: {e}") })?;
    let mut report = ShardReport { rounds_trained: 0, devices_trained: 0, rounds_replayed: 0, rows: Vec::new() };
    // The last result made, by round: sent again when its acknowledgement was lost.
    let mut last: Option<(u64, TrainResult)> = None;
    let mut uploaded_last_round = false;
    let capabilities = Capabilities {
        backend: config.backend.to_string(),
        memory_mb: 0,
        charging: true,
        unmetered: true,
        num_samples: mine,
    };
    let mut contact = Instant::now();
    loop {
        let link = match rt.block_on(connect(&opts, capabilities.clone())) {
            Ok(link) => link,
            Err(detail) => {
                if contact.elapsed() > opts.patience {
                    return Err(ShardError::Root { root: opts.root.clone(), detail });
                }
                obs.line(&format!("shard {}: cannot reach the root ({detail}); trying again", hosted.index()));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let step = serve(
            &rt,
            &link,
            config,
            &mut Work {
                replay: &mut replay,
                pool: &pool,
                training: &training,
                replaying: &replaying,
                evaluator: &mut evaluator,
                test: &test,
                recorder: recorder.as_mut(),
                last: &mut last,
                uploaded_last_round: &mut uploaded_last_round,
                report: &mut report,
                hosted,
            },
            obs,
        );
        rt.block_on(link.close());
        match step {
            Ok(()) => break,
            Err(Step::Fatal(e)) => return Err(e),
            Err(Step::Link(detail)) => {
                obs.line(&format!("shard {}: link to the root lost ({detail}); reconnecting", hosted.index()));
                contact = Instant::now();
            }
        }
    }
    if let Some(r) = recorder {
        report.rows = r.into_rows();
    }
    Ok(report)
}

/// Connects and says hello as an aggregator.
async fn connect(opts: &ShardOptions, capabilities: Capabilities) -> Result<Link, String> {
    let addr = tokio::net::lookup_host(&opts.root)
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", opts.root))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", opts.root))?;
    let link = Link::connect(addr, &opts.server_name, &opts.tls).await.map_err(|e| e.to_string())?;
    link.hello(capabilities).await.map_err(|e| e.to_string())?;
    Ok(link)
}

/// How a session with the root ended early.
enum Step {
    /// The link broke: reconnect and carry on.
    Link(String),
    /// The experiment cannot go on.
    Fatal(ShardError),
}

impl From<ShardError> for Step {
    fn from(e: ShardError) -> Self {
        Self::Fatal(e)
    }
}

/// What a session works on, across reconnections.
struct Work<'a, 'f> {
    replay: &'a mut Replay,
    pool: &'a Pool,
    training: &'a Fleet<'f>,
    replaying: &'a Fleet<'f>,
    evaluator: &'a mut fedge_learn::Trainer,
    test: &'a fedge_core::dataset::Dataset,
    recorder: Option<&'a mut Recorder>,
    last: &'a mut Option<(u64, TrainResult)>,
    uploaded_last_round: &'a mut bool,
    report: &'a mut ShardReport,
    hosted: Hosted,
}

/// One session: ask for tasks and do them until the experiment is done (`Ok`) or the link
/// breaks.
fn serve(
    rt: &tokio::runtime::Runtime,
    link: &Link,
    config: &SimConfig,
    w: &mut Work<'_, '_>,
    obs: &mut dyn Observer,
) -> Result<(), Step> {
    let request = |msg: &Message| rt.block_on(link.request(msg)).map_err(|e| Step::Link(e.to_string()));
    loop {
        if *w.uploaded_last_round && w.recorder.as_ref().is_none_or(|r| r.complete()) {
            return Ok(());
        }
        match request(&Message::TaskRequest { running: None })? {
            Message::TrainTask(task) => {
                if let Some((round, result)) = w.last.as_ref()
                    && *round == task.round
                {
                    let result = result.clone();
                    upload(&request, &result, obs)?;
                    *w.uploaded_last_round |= task.round == config.rounds;
                    continue;
                }
                do_task(rt, link, config, w, &task, obs)?;
                let (_, result) = w.last.as_ref().expect("the task's result was just made");
                let result = result.clone();
                upload(&request, &result, obs)?;
                *w.uploaded_last_round |= task.round == config.rounds;
            }
            Message::NoTask { retry_after_ms, .. } => {
                if let Some(rec) = w.recorder.as_deref_mut()
                    && w.replay.engine.last_round() == config.rounds
                    && !rec.complete()
                {
                    // The last round's row: once the root has closed it, its model is scored.
                    if let Some(line) = root_round(&request, config.rounds)? {
                        let params = fetch(rt, link, line.model_version)?;
                        rec.model_after(config.rounds, &line, &params, w.evaluator, w.test, obs)?;
                        continue;
                    }
                }
                std::thread::sleep(Duration::from_millis(u64::from(retry_after_ms.clamp(20, 1000))));
            }
            Message::Error { code, message } => {
                return Err(Step::Fatal(ShardError::Refused(format!("the root refused ({code:?}): {message}"))));
            }
            other => return Err(Step::Link(format!("unexpected answer {other:?}"))),
        }
    }
}

/// Does root task `task`: replays the rounds before it, trains the hosted devices of its round
/// and leaves the result in `w.last`.
fn do_task(
    rt: &tokio::runtime::Runtime,
    link: &Link,
    config: &SimConfig,
    w: &mut Work<'_, '_>,
    task: &TrainTask,
    obs: &mut dyn Observer,
) -> Result<(), Step> {
    let request = |msg: &Message| rt.block_on(link.request(msg)).map_err(|e| Step::Link(e.to_string()));
    let round = task.round;
    if round > config.rounds {
        return Err(ShardError::Mismatch {
            what: "number of rounds",
            detail: format!("it asks for round {round}; the simulation has {}", config.rounds),
        }
        .into());
    }
    if round <= w.replay.engine.last_round() {
        return Err(ShardError::Mismatch {
            what: "round numbering",
            detail: format!("it asks for round {round} again after this shard replayed it (did a root round fail?)"),
        }
        .into());
    }
    let expected = w.replay.engine.config().train;
    if task.config != expected {
        return Err(ShardError::Mismatch {
            what: "training settings",
            detail: format!("{:?} against {expected:?}", task.config),
        }
        .into());
    }
    // Rounds this shard has not seen (it started or restarted late): decisions only.
    while w.replay.engine.last_round() + 1 < round {
        let global = Arc::new(w.replay.engine.global().clone());
        let out = step(w.replay, w.pool, w.replaying, global, obs)?;
        w.report.rounds_replayed += 1;
        if let Some(rec) = w.recorder.as_deref_mut() {
            rec.replayed(out.trace);
        }
    }
    let params = fetch(rt, link, task.model_version)?;
    if params.content_hash() != task.model_hash {
        return Err(Step::Link(format!("model version {} does not match the task's hash", task.model_version)));
    }
    if round == 1 && params.content_hash() != w.replay.engine.global().content_hash() {
        return Err(ShardError::Mismatch {
            what: "initial model",
            detail: format!(
                "version {} is not the simulation's seeded initial model (seed, model)",
                task.model_version
            ),
        }
        .into());
    }
    if round > 1
        && let Some(rec) = w.recorder.as_deref_mut()
        && !rec.has_row(round - 1)
    {
        // The model this task trains from is the one after the previous round: score it now.
        let line = root_round(&request, round - 1)?.ok_or_else(|| {
            Step::Link(format!("the root's history lacks round {} though it runs round {round}", round - 1))
        })?;
        rec.model_after(round - 1, &line, &params, w.evaluator, w.test, obs)?;
    }
    let started = Instant::now();
    let layout = params.layout().clone();
    let RoundOutput { trace, hosted, .. } = step(w.replay, w.pool, w.training, Arc::new(params), obs)?;
    let (all, failed) = (trace.report.results, trace.report.outcome != RoundOutcome::Aggregated);
    let sum = hosted.expect("a shard's fleet hosts its devices");
    let (result, mine) = pre_aggregate(task, layout, sum, !failed).map_err(|e| {
        Step::Fatal(ShardError::Refused(format!("round {round}: cannot average this shard's results: {e}")))
    })?;
    obs.line(&format!(
        "round {round}: shard {} trained {mine} of the {all} results ({} samples) in {:.2}s{}",
        w.hosted.index(),
        result.num_samples,
        started.elapsed().as_secs_f64(),
        if failed { "; the round fails in the replay" } else { "" }
    ));
    w.report.rounds_trained += 1;
    w.report.devices_trained += mine as u64;
    if let Some(rec) = w.recorder.as_deref_mut() {
        rec.replayed(trace);
    }
    *w.last = Some((round, result));
    Ok(())
}

/// Opens and drives the replay's next round on `fleet`.
fn step(
    replay: &mut Replay,
    pool: &Pool,
    fleet: &Fleet<'_>,
    global: Arc<ModelParams>,
    obs: &mut dyn Observer,
) -> Result<RoundOutput, Step> {
    let round = replay.engine.start_round(replay.now).map_err(|e| {
        Step::Fatal(ShardError::Mismatch { what: "round", detail: format!("the replay cannot start it: {e}") })
    })?;
    let out = drive_round(&mut replay.engine, pool, fleet, global, round, replay.now, obs);
    replay.now = out.trace.report.closed_at;
    Ok(out)
}

/// The shard's upload for `task`: its accepted hosted results' sample-weighted mean delta with
/// their total samples and mean loss; zero weight when it has none or the round fails in the
/// replay (then the root's round fails too, as the in-process one does, when every shard says
/// so).
fn pre_aggregate(
    task: &TrainTask,
    layout: Arc<fedge_core::params::ParamLayout>,
    sum: crate::shard::HostedSum,
    aggregated: bool,
) -> Result<(TrainResult, usize), String> {
    if let Some(e) = sum.error {
        return Err(e);
    }
    let (results, samples, loss) = (sum.results, sum.samples, sum.mean_loss());
    let delta = if aggregated { sum.finish().map_err(|e| e.to_string())? } else { None };
    let (delta, samples) = match delta {
        Some(delta) => (delta, samples),
        None => (ModelParams::zeros(layout), 0),
    };
    let result = TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: samples,
        train_loss: if samples > 0 { loss } else { f32::NAN },
        delta,
        clipped: false,
    };
    Ok((result, results))
}

/// Sends `result` until the root takes it (or refuses it for good, which is logged: its round
/// closed without it).
fn upload(
    request: &impl Fn(&Message) -> Result<Message, Step>,
    result: &TrainResult,
    obs: &mut dyn Observer,
) -> Result<(), Step> {
    let msg = Message::TrainResult(result.clone());
    let mut attempt = 0;
    loop {
        match request(&msg)? {
            Message::Ack { .. } | Message::Error { code: ErrorCode::Duplicate, .. } => return Ok(()),
            Message::Error { code: ErrorCode::Unavailable, message } => {
                let delay = fedge_edge::work_loop::upload_retry_delay(attempt);
                attempt += 1;
                obs.line(&format!("round {}: the root could not store the result yet ({message})", result.round));
                std::thread::sleep(delay);
            }
            Message::Error { code, message } => {
                obs.line(&format!(
                    "round {}: the root refused this shard's result ({code:?}): {message}",
                    result.round
                ));
                return Ok(());
            }
            other => return Err(Step::Link(format!("unexpected answer to an upload: {other:?}"))),
        }
    }
}

/// The root's line for closed round `round`, if it has closed.
fn root_round(request: &impl Fn(&Message) -> Result<Message, Step>, round: u64) -> Result<Option<RoundLine>, Step> {
    match request(&Message::Operator(OperatorCommand::Status))? {
        Message::Status(s) => Ok(s.rounds.into_iter().find(|l| l.round == round)),
        Message::Error { code, message } => {
            Err(Step::Fatal(ShardError::Refused(format!("cannot read the root's rounds ({code:?}): {message}"))))
        }
        other => Err(Step::Link(format!("unexpected answer to a status request: {other:?}"))),
    }
}

/// Downloads (and verifies) root model `version`.
fn fetch(rt: &tokio::runtime::Runtime, link: &Link, version: u64) -> Result<ModelParams, Step> {
    rt.block_on(fedge_edge::download::fetch_model(link, version, None))
        .map(|d| d.params)
        .map_err(|e| Step::Link(format!("model version {version}: {e}")))
}
