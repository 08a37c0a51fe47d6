//! One shard at work: replay the experiment's rounds, train the hosted devices for each root
//! task, upload their weighted mean (see [`crate::shard`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::ModelParams;
use fedge_core::wire::{Capabilities, ErrorCode, Message, OperatorCommand, RoundLine, TrainResult, TrainTask};
use fedge_edge::download::DownloadError;
use fedge_edge::link::{ConnectError, DeviceTls, Link};
use fedge_engine::strategy::Strategy;
use fedge_engine::{RoundEngine, RoundOutcome};

use super::members::Members;
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
    let secure = crate::secure::SecureSetup::of_run(config, &engine, &device_data);
    let fleet = |hosted| Fleet {
        speeds: &speeds,
        model_bytes,
        data: &device_data,
        dropout: config.dropout,
        seed: config.seed,
        attack: None,
        secure,
        local_examples: config.local_examples,
        hosted: Some(hosted),
        devices_per_launch: config.devices_per_launch,
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
    // A secure round's members, kept until the next task (entered again after a reconnection).
    let mut members: Option<Members> = None;
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
                members: &mut members,
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

/// Connects and says hello as a relaying aggregator.
async fn connect(opts: &ShardOptions, capabilities: Capabilities) -> Result<Link, String> {
    let addr = tokio::net::lookup_host(&opts.root)
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", opts.root))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", opts.root))?;
    let link = Link::connect(addr, &opts.server_name, &opts.tls).await.map_err(|e| e.to_string())?;
    // A relaying aggregator: in secure rounds it enters each of its devices into the sum.
    link.hello_for(capabilities, fedge_core::wire::SessionPurpose::Relay).await.map_err(|e| e.to_string())?;
    Ok(link)
}

/// How a session with the root ended early.
pub(super) enum Step {
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
    members: &'a mut Option<Members>,
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
    let mut next_look = Instant::now();
    loop {
        if *w.uploaded_last_round && w.recorder.as_ref().is_none_or(|r| r.complete()) {
            return Ok(());
        }
        match request(&Message::TaskRequest { running: None })? {
            Message::TrainTask(task) => {
                // The same task again (an acknowledgement or a session lost with the link):
                // its result is sent again, its members enter again.
                let again = w.last.as_ref().is_some_and(|(r, _)| *r == task.round)
                    || w.members.as_ref().is_some_and(|m| m.round == task.round);
                if !again {
                    do_task(rt, link, config, w, &task, obs)?;
                }
                match w.members.as_mut().filter(|m| m.round == task.round) {
                    // Entered: the root's session goes on among the other shards' members.
                    Some(members) if members.done() => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    Some(members) => {
                        let entered = members.enter(rt, link, &mut |line| obs.line(&line))?;
                        obs.line(&format!(
                            "round {}: {} of this shard's {} members in the root's secure sum",
                            task.round,
                            entered.summed,
                            members.len()
                        ));
                    }
                    None => {
                        let (_, result) = w.last.as_ref().expect("the task's result was just made");
                        let result = result.clone();
                        upload(&request, &result, obs)?;
                    }
                }
                *w.uploaded_last_round |= task.round == config.rounds;
            }
            Message::NoTask { retry_after_ms, .. } => {
                // Has the root closed the experiment's last round? A shard restarted after its
                // last upload learns it only so (it gets no more tasks).
                if Instant::now() >= next_look {
                    next_look = Instant::now() + LOOK_EVERY;
                    if let Some(line) = root_round(&request, config.rounds)? {
                        return finish(rt, link, config, w, &line, obs);
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

/// How often a shard without a task reads the root's history.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The root closed the experiment's last round (`last`): the recorder replays the rounds it
/// has not (it restarted after its last upload) and writes the rows left; the others are done.
fn finish(
    rt: &tokio::runtime::Runtime,
    link: &Link,
    config: &SimConfig,
    w: &mut Work<'_, '_>,
    last: &RoundLine,
    obs: &mut dyn Observer,
) -> Result<(), Step> {
    if w.recorder.as_ref().is_none_or(|r| r.complete()) {
        return Ok(());
    }
    replay_before(w, config.rounds + 1, obs)?;
    let params = fetch(rt, link, last.model_version)?;
    record_up_to(rt, link, w, config.rounds, Some(&params), obs)
}

/// Replays (decisions only) the rounds before `round` that this shard has not seen: it started
/// or restarted late.
fn replay_before(w: &mut Work<'_, '_>, round: u64, obs: &mut dyn Observer) -> Result<(), Step> {
    while w.replay.engine.last_round() + 1 < round {
        let global = Arc::new(w.replay.engine.global().clone());
        let out = step(w.replay, w.pool, w.replaying, global, obs)?;
        w.report.rounds_replayed += 1;
        if let Some(rec) = w.recorder.as_deref_mut() {
            rec.replayed(out.trace);
        }
    }
    Ok(())
}

/// On the recorder, writes the rows up to round `upto`, which the root has closed: each from
/// the root's line and the replay's trace, scored (when due) on the model after it: `model`
/// for round `upto`, an earlier one fetched while the root keeps it. Usually one row; more when
/// the recorder was away while the root closed rounds.
fn record_up_to(
    rt: &tokio::runtime::Runtime,
    link: &Link,
    w: &mut Work<'_, '_>,
    upto: u64,
    model: Option<&ModelParams>,
    obs: &mut dyn Observer,
) -> Result<(), Step> {
    let Some(rec) = w.recorder.as_deref_mut() else { return Ok(()) };
    if rec.has_row(upto) {
        return Ok(());
    }
    let request = |msg: &Message| rt.block_on(link.request(msg)).map_err(|e| Step::Link(e.to_string()));
    let history = root_history(&request)?;
    for round in rec.written() + 1..=upto {
        let line = history.iter().find(|l| l.round == round).ok_or_else(|| {
            Step::Link(format!("the root's history lacks round {round} though it has closed round {upto}"))
        })?;
        let fetched = match model {
            Some(_) if round == upto => None,
            _ if rec.scores(round) => fetch_kept(rt, link, line.model_version)?,
            _ => None,
        };
        let params = if round == upto { model } else { fetched.as_ref() };
        rec.model_after(round, line, params, w.evaluator, w.test, obs)?;
    }
    Ok(())
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
    if task.secure.is_some() != config.secure_aggregation {
        return Err(ShardError::Mismatch {
            what: "secure aggregation",
            detail: format!(
                "the root's task {} secure; the simulation's secure_aggregation is {}",
                if task.secure.is_some() { "is" } else { "is not" },
                config.secure_aggregation
            ),
        }
        .into());
    }
    if let (Some(mine), Some(root)) = (w.training.secure, task.secure)
        && mine.weight_cap != root.weight_cap
    {
        return Err(ShardError::Mismatch {
            what: "secure aggregation weight cap",
            detail: format!("{} against the simulation's {}", root.weight_cap, mine.weight_cap),
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
    replay_before(w, round, obs)?;
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
    if round > 1 {
        // The model this task trains from is the one after the previous round: score it now.
        record_up_to(rt, link, w, round - 1, Some(&params), obs)?;
    }
    let started = Instant::now();
    let layout = params.layout().clone();
    let RoundOutput { trace, hosted, members, .. } = step(w.replay, w.pool, w.training, Arc::new(params), obs)?;
    if let Some(secure) = task.secure {
        // Each of its devices in the round's sum enters the root's secure sum itself.
        let members = Members::new(task, secure, members)
            .map_err(|e| Step::Fatal(ShardError::Mismatch { what: "secure aggregation", detail: e }))?;
        obs.line(&format!(
            "round {round}: shard {} trained {} members of the {} results in {:.2}s",
            w.hosted.index(),
            members.len(),
            trace.report.results,
            started.elapsed().as_secs_f64(),
        ));
        w.report.rounds_trained += 1;
        w.report.devices_trained += members.len() as u64;
        if let Some(rec) = w.recorder.as_deref_mut() {
            rec.replayed(trace);
        }
        *w.members = Some(members);
        *w.last = None;
        return Ok(());
    }
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
    *w.members = None;
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
    Ok(root_history(request)?.into_iter().find(|l| l.round == round))
}

/// The root's closed rounds, oldest first.
fn root_history(request: &impl Fn(&Message) -> Result<Message, Step>) -> Result<Vec<RoundLine>, Step> {
    match request(&Message::Operator(OperatorCommand::Status))? {
        Message::Status(s) => Ok(s.rounds),
        Message::Error { code, message } => {
            Err(Step::Fatal(ShardError::Refused(format!("cannot read the root's rounds ({code:?}): {message}"))))
        }
        other => Err(Step::Link(format!("unexpected answer to a status request: {other:?}"))),
    }
}

/// Downloads root model `version` if the root still keeps it (it keeps the last few).
fn fetch_kept(rt: &tokio::runtime::Runtime, link: &Link, version: u64) -> Result<Option<ModelParams>, Step> {
    match rt.block_on(fedge_edge::download::fetch_model(link, version, None)) {
        Ok(d) => Ok(Some(d.params)),
        Err(DownloadError::Link(ConnectError::Refused { code: ErrorCode::StaleModel, .. })) => Ok(None),
        Err(e) => Err(Step::Link(format!("model version {version}: {e}"))),
    }
}

/// Downloads (and verifies) root model `version`.
fn fetch(rt: &tokio::runtime::Runtime, link: &Link, version: u64) -> Result<ModelParams, Step> {
    rt.block_on(fedge_edge::download::fetch_model(link, version, None))
        .map(|d| d.params)
        .map_err(|e| Step::Link(format!("model version {version}: {e}")))
}
