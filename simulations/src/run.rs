//! The simulation loop: the real round engine and the real edge trainer, driven by a virtual
//! clock over in-memory links.
//!
//! Each round the engine samples devices; their tasks go to the worker pool; each result is
//! encoded and decoded through the wire codec (exactly what would cross the network) and handed
//! back to the engine in virtual-time order, the engine's deadline enforced ([`crate::clock`]),
//! so a seeded run is reproducible byte for byte whatever the thread timing. A round starts
//! when the previous one closed. After each round the global model is evaluated on the test
//! split. With `mode = "fedbuff"` the buffered asynchronous engine runs instead, on the same
//! pool and clock ([`fedbuff`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::codec;
use fedge_core::partition::PartitionReport;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::{DeviceId, Message};
use fedge_engine::strategy::{self, Strategy};
use fedge_engine::{Evaluation, RoundEngine, StartError};
use fedge_learn::Trainer;
use rand::RngExt;
use thiserror::Error;

use crate::attack::Attack;
use crate::clock::{Fleet, drive_round};
use crate::config::{Mode, SimConfig, SimConfigError};
use crate::distill::Distiller;
use crate::pool::Pool;

mod fedbuff;
mod observer;
mod report;

pub use observer::{Console, Observer, Quiet};
pub use report::{RoundRow, SimOutput, Summary};
use report::{format_row, write_json};

/// Why a simulation could not run.
#[derive(Debug, Error)]
pub enum SimError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] SimConfigError),
    /// The dataset could not be loaded.
    #[error(transparent)]
    Dataset(#[from] fedge_core::dataset::DatasetError),
    /// The dataset's files are not in the data folder.
    #[error(
        "{dataset} not found ({cause}); get it with `fedge-sim fetch-data --out {}{}` (see docs/data.md), or point --data-dir (data_dir in a config) at a folder holding {dataset}/",
        dir.display(),
        if dataset.is_text() { " --shakespeare" } else { "" }
    )]
    MissingData {
        /// The dataset.
        dataset: fedge_core::dataset::DatasetName,
        /// The data folder searched.
        dir: PathBuf,
        /// Which file was missing.
        cause: fedge_core::dataset::DatasetError,
    },
    /// The partition is impossible.
    #[error("partition: {0}")]
    Partition(fedge_core::partition::PartitionError),
    /// The backend is unavailable.
    #[error(transparent)]
    Backend(#[from] fedge_learn::BackendError),
    /// Writing outputs failed.
    #[error("cannot write {path}: {cause}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// Evaluation failed.
    #[error("evaluation: {0}")]
    Eval(#[from] fedge_learn::ConvertError),
}

/// A seeded sample of `n` examples of `test` (in their order), or all of it when it has no more.
pub(crate) fn test_sample(test: &fedge_core::dataset::Dataset, n: usize, seed: u64) -> fedge_core::dataset::Dataset {
    if test.len() <= n {
        return test.clone();
    }
    let mut picked = rand::seq::index::sample(&mut derive_rng(seed, &[stream::TEST_SAMPLE]), test.len(), n).into_vec();
    picked.sort_unstable();
    let mut images = Vec::with_capacity(n * test.pixels());
    for &i in &picked {
        images.extend_from_slice(test.image(i));
    }
    let labels = picked.iter().map(|&i| test.labels[i]).collect();
    fedge_core::dataset::Dataset { rows: test.rows, cols: test.cols, images, labels, num_classes: test.num_classes }
}

// By hand, not `#[from]`: the message already holds the cause, and a source would print it twice.
impl From<fedge_core::partition::PartitionError> for SimError {
    fn from(e: fedge_core::partition::PartitionError) -> Self {
        Self::Partition(e)
    }
}

/// The training images distillation holds out as its unlabelled proxy set (of `n`): the tail,
/// `proxy_examples` of them (0: a tenth).
pub(crate) fn proxy_indices(config: &SimConfig, n: usize) -> Vec<usize> {
    let p = if config.proxy_examples == 0 { n / 10 } else { config.proxy_examples.min(n.saturating_sub(1)) };
    (n - p..n).collect()
}

/// Loads the configured dataset; missing files become [`SimError::MissingData`], which says how
/// to get them.
pub(crate) fn load_data(config: &SimConfig) -> Result<fedge_core::dataset::TrainTest, SimError> {
    use fedge_core::dataset::DatasetError;
    config.dataset.load(&config.data_dir).map_err(|e| match e {
        DatasetError::Io { ref cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
            SimError::MissingData { dataset: config.dataset, dir: config.data_dir.clone(), cause: e }
        }
        e => SimError::Dataset(e),
    })
}

/// What a run (or a shard of one) starts from, made the same way every time from the config:
/// the data with its held-out sets, the partition, the round engine with the initial model, the
/// devices' speeds.
pub(crate) struct Prepared {
    /// The training split, shared with the workers.
    pub train: Arc<fedge_core::dataset::Dataset>,
    /// The test split (or its seeded sample).
    pub test: fedge_core::dataset::Dataset,
    /// Classes of the task.
    pub num_classes: usize,
    /// Distillation's proxy set (training indices), empty without distillation.
    pub proxy: Vec<usize>,
    /// FLTrust's root set (training indices), empty without it.
    pub root: Vec<usize>,
    /// The partition's report.
    pub partition: PartitionReport,
    /// Each device with data, and its example indices.
    pub device_data: BTreeMap<DeviceId, Arc<Vec<usize>>>,
    /// The evaluator (and FLTrust's server trainer).
    pub evaluator: Trainer,
    /// The round engine, every device with data available, model version 0 the seeded initial.
    pub engine: RoundEngine<Box<dyn Strategy>>,
    /// Byzantine devices, if the run has any.
    pub attack: Option<Attack>,
    /// Every device's speeds.
    pub speeds: Vec<crate::devices::DeviceSpeed>,
    /// Bytes of the encoded global model.
    pub model_bytes: u64,
    /// Parameters of the model.
    pub parameters: usize,
}

/// Makes a run's starting point from `config` (checked), telling `obs` about the partition.
pub(crate) fn prepare(config: &SimConfig, obs: &mut dyn Observer) -> Result<Prepared, SimError> {
    config.validate()?;
    let mut data = load_data(config)?;
    if let Some(n) = config.test_examples {
        data.test = test_sample(&data.test, n, config.seed);
    }
    let num_classes = data.train.num_classes;
    let proxy: Vec<usize> = match config.distill_every {
        Some(_) => proxy_indices(config, data.train.len()),
        None => Vec::new(),
    };
    // FLTrust's root set: the training examples just before the proxy set, held out too.
    let root_examples = config.engine_config()?.strategy.root_examples().unwrap_or(0);
    if root_examples + proxy.len() >= data.train.len() {
        return Err(SimConfigError::Invalid(format!(
            "root_examples {root_examples}{} leave no training example for the devices (of {})",
            if proxy.is_empty() { String::new() } else { format!(" and {} proxy examples", proxy.len()) },
            data.train.len()
        ))
        .into());
    }
    let kept = data.train.len() - proxy.len() - root_examples;
    let root: Vec<usize> = (kept..kept + root_examples).collect();
    let assignment = config.partition().split_with(
        &data.train.labels[..kept],
        data.natural.as_deref().map(|owners| &owners[..kept.min(owners.len())]),
        config.devices,
        &mut derive_rng(config.seed, &[stream::PARTITION]),
    )?;
    let partition = PartitionReport::new(&assignment, &data.train.labels, num_classes);
    let (min, mean, max) = partition.size_stats();
    if !proxy.is_empty() {
        obs.line(&format!("{} training images held out as the unlabelled distillation proxy set", proxy.len()));
    }
    if !root.is_empty() {
        obs.line(&format!("{} training examples held out as the server's root set (FLTrust)", root.len()));
    }
    obs.line(&format!(
        "{} devices over {} {} examples ({:?}): size min {min} mean {mean:.1} max {max}, {:.2} labels per device{}",
        config.devices,
        data.train.len(),
        config.dataset,
        config.partition(),
        partition.mean_labels_per_device(),
        match partition.empty_devices() {
            0 => String::new(),
            n => format!(", {n} devices without data (never sampled)"),
        }
    ));

    for (d, (size, hist)) in partition.sizes.iter().zip(&partition.label_histograms).enumerate().take(3) {
        obs.line(&format!("  device {d}: {size} examples, label counts {hist:?}"));
    }
    if config.devices > 3 {
        obs.line("  (every device's size and label counts: partition.json)");
    }
    let mut evaluator = Trainer::new(config.model, num_classes, config.backend)?;
    // Evaluation runs while the workers wait: it may use every core.
    evaluator.set_threads(fedge_learn::Threads::Rayon(0));
    let initial = evaluator.initial_params(derive_rng(config.seed, &[stream::INIT]).random());
    let parameters = initial.numel();
    let engine_config = config.engine_config()?;
    let noise = Box::new(derive_rng(config.seed, &[stream::SERVER_NOISE]));
    let strategy: Box<dyn Strategy> = strategy::build(&engine_config, noise);
    let mut engine =
        RoundEngine::new(engine_config, strategy, initial).map_err(|e| SimConfigError::Invalid(e.to_string()))?;
    let device_data: BTreeMap<DeviceId, Arc<Vec<usize>>> = assignment
        .into_iter()
        .enumerate()
        .filter(|(_, idx)| !idx.is_empty())
        .map(|(d, idx)| (d as DeviceId, Arc::new(idx)))
        .collect();
    for &d in device_data.keys() {
        engine.handle_device_available(d);
    }
    let attack = Attack::from_config(config, &data.train, &device_data);
    if let Some(a) = &attack {
        obs.line(&format!("attack {}: {} of {} devices are attackers", a.kind(), a.attackers().len(), config.devices));
    }
    let speeds = config.speed.draw(config.devices, config.seed);
    let model_bytes = codec::encode(&Message::Model {
        version: 0,
        hash: engine.global().content_hash(),
        params: engine.global().clone(),
    })
    .len() as u64;
    Ok(Prepared {
        train: Arc::new(data.train),
        test: data.test,
        num_classes,
        proxy,
        root,
        partition,
        device_data,
        evaluator,
        engine,
        attack,
        speeds,
        model_bytes,
        parameters,
    })
}

/// The worker threads a run uses: `workers`, or every core for 0.
pub(crate) fn worker_count(config: &SimConfig) -> usize {
    match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs a simulation; writes `rounds.csv`, `summary.json`, `partition.json` and the plots
/// `accuracy.svg` and `accuracy.png` ([`crate::plot`]) under `out` if given.
pub fn run(config: &SimConfig, out: Option<&Path>, obs: &mut dyn Observer) -> Result<SimOutput, SimError> {
    let started = Instant::now();
    let Prepared {
        train,
        test,
        num_classes,
        proxy,
        root,
        partition,
        device_data,
        mut evaluator,
        mut engine,
        attack,
        speeds,
        model_bytes,
        parameters,
    } = prepare(config, obs)?;
    let mut csv_out = match out {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|cause| SimError::Output { path: dir.to_path_buf(), cause })?;
            write_json(&dir.join("partition.json"), &partition)?;
            let path = dir.join("rounds.csv");
            let file = std::fs::File::create(&path).map_err(|cause| SimError::Output { path: path.clone(), cause })?;
            Some((csv::Writer::from_writer(file), path))
        }
        None => None,
    };
    let mut distiller = match config.distill_every {
        Some(_) => Some(Distiller::new(config, num_classes, proxy)?),
        None => None,
    };
    let mut distilled = None;
    let train_for_distill = train.clone();
    let train_for_root = train.clone();
    let pool = Pool::new(worker_count(config), config.model, num_classes, config.backend, train, config.seed)?;
    let fleet = Fleet {
        speeds: &speeds,
        model_bytes,
        data: &device_data,
        dropout: config.dropout,
        seed: config.seed,
        attack: attack.as_ref(),
        secure: crate::secure::SecureSetup::of_run(config, &engine, &device_data),
        local_examples: config.local_examples,
        hosted: None,
        devices_per_launch: config.devices_per_launch,
    };
    if config.mode == Mode::Fedbuff {
        let setup = fedbuff::Setup {
            config,
            initial: engine.global().clone(),
            pool,
            fleet,
            evaluator: &mut evaluator,
            test: &test,
            csv: csv_out,
            partition,
            parameters,
            started,
        };
        return fedbuff::run(setup, out, obs);
    }

    let mut rows = Vec::new();
    let mut traces = Vec::new();
    let mut round_seconds = Vec::new();
    let mut upload_bytes = 0u64;
    let (mut last_eval, mut best, mut rounds_to_target) = (None::<Evaluation>, 0.0f64, None);
    // The virtual clock: each round starts when the previous one closed.
    let mut now = Duration::ZERO;
    for r in 1..=config.rounds {
        let round_started = Instant::now();
        let round = match engine.start_round(now) {
            Ok(round) => round,
            Err(e @ StartError::Budget { .. }) => {
                obs.line(&format!("stopping before round {r}: {e}"));
                break;
            }
            Err(e) => return Err(SimConfigError::Invalid(format!("cannot start round {r}: {e}")).into()),
        };
        if let Some((round, _)) = engine.wanted_reference() {
            // The server's update on its root set, with the devices' local settings; it trains
            // while they do (its time is not on the virtual clock).
            let mut rng = derive_rng(config.seed, &[stream::REFERENCE, round]);
            let global = engine.global().clone();
            let trained = evaluator.train(&global, &train_for_root, &root, &engine.config().train, &mut rng)?;
            let handed = trained
                .params
                .delta_from(&global)
                .map_err(|e| e.to_string())
                .and_then(|r| engine.handle_reference(now, round, &r).map_err(|e| e.to_string()));
            // As in the coordinator: without a reference the round fails at its deadline and
            // the model stays (a wrecked model gives a non-finite one).
            if let Err(e) = handed {
                obs.line(&format!("round {round}: no reference update: {e}; the round fails at its deadline"));
            }
        }
        let global = Arc::new(engine.global().clone());
        let done = drive_round(&mut engine, &pool, &fleet, global, round, now, obs);
        let trace = done.trace;
        upload_bytes += done.upload_bytes;
        now = trace.report.closed_at;
        let report = &trace.report;
        let evaluate = r % config.eval_every == 0 || r == config.rounds;
        let eval = if evaluate {
            let e = score(&mut evaluator, engine.global(), &test, &mut best)?;
            engine.handle_evaluation(report.model_version, e);
            last_eval = Some(e);
            Some(e)
        } else {
            None
        };
        if let (Some(d), Some(k)) = (distiller.as_mut(), config.distill_every)
            && (r % k == 0 || r == config.rounds)
        {
            let out = d.distill(&mut evaluator, engine.global(), &train_for_distill, &test)?;
            obs.line(&format!(
                "round {round}: distilled {} student, int8 accuracy {:.2}% (f32 {:.2}%), {} bytes vs the teacher's {}",
                config.student_model,
                out.accuracy * 100.0,
                out.f32_accuracy * 100.0,
                out.bytes,
                d.teacher_bytes(engine.global())
            ));
            distilled = Some(out);
        }
        let secs = round_started.elapsed().as_secs_f64();
        round_seconds.push(secs);
        let row = RoundRow::of_round(&trace, eval, engine.privacy_ledger().map(|l| l.epsilon()));
        obs.line(&format_row(&row, config.rounds, secs, report));
        if let Some((w, path)) = csv_out.as_mut() {
            w.serialize(&row)
                .and_then(|_| w.flush().map_err(Into::into))
                .map_err(|e| SimError::Output { path: path.clone(), cause: std::io::Error::other(e.to_string()) })?;
        }
        rows.push(row);
        traces.push(trace);
        if let (Some(t), Some(e)) = (config.target_accuracy, eval)
            && e.accuracy >= t
            && rounds_to_target.is_none()
        {
            rounds_to_target = Some(round);
            obs.line(&format!("target accuracy {:.2}% reached in round {round}", t * 100.0));
            break;
        }
    }
    drop(pool);
    // A budget stop can leave the last round run unevaluated.
    let final_eval = match (last_eval, rows.last()) {
        (Some(e), Some(row)) if row.accuracy.is_some() => e,
        _ => score(&mut evaluator, engine.global(), &test, &mut best)?,
    };
    let sampling_rate = engine.privacy_ledger().and_then(|l| l.entries().last().map(|e| e.sampling_rate));
    let summary = Summary {
        strategy: config.strategy.clone(),
        final_accuracy: final_eval.accuracy,
        final_loss: final_eval.loss,
        best_accuracy: best,
        rounds: rows.len() as u64,
        rounds_to_target,
        devices: config.devices,
        devices_with_data: device_data.len(),
        parameters,
        model_version: engine.version(),
        model_hash: engine.global().content_hash().to_string(),
        wall_seconds: started.elapsed().as_secs_f64(),
        round_seconds,
        virtual_seconds: seconds(now),
        upload_bytes,
        epsilon: engine.privacy_ledger().map(|l| l.epsilon()),
        sampling_rate,
        teacher_accuracy: distilled.as_ref().map(|_| final_eval.accuracy),
        teacher_bytes: distiller.as_ref().map(|d| d.teacher_bytes(engine.global())),
        student_accuracy: distilled.as_ref().map(|d| d.accuracy),
        student_f32_accuracy: distilled.as_ref().map(|d| d.f32_accuracy),
        student_bytes: distilled.as_ref().map(|d| d.bytes),
        student_parameters: distilled.as_ref().map(|d| d.parameters),
        teacher_latency_us: distilled.as_ref().map(|d| d.teacher_latency_us),
        student_latency_us: distilled.as_ref().map(|d| d.student_latency_us),
        config: config.clone(),
        attack: attack.as_ref().map(|a| a.summary(config.attackers)),
    };
    if let Some(dir) = out {
        write_json(&dir.join("summary.json"), &summary)?;
        // The run's result is in the files above: a plot that fails only warns.
        if let Err(e) = crate::plot::write_run_plots(dir, &rows, &summary) {
            tracing::warn!("no accuracy plot: {e}");
        }
    }
    let student = distiller.as_ref().filter(|_| distilled.is_some()).and_then(|d| d.int8.clone());
    Ok(SimOutput { rounds: rows, summary, partition, global: engine.global().clone(), student, traces })
}

/// Seconds, as the nearest `f64` to the exact decimal (`as_secs_f64` can print 2.1939859999999998
/// for 2.193986).
pub(crate) fn seconds(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e9
}

/// Scores `global` on `test` in batches of 500 and raises `best` to its accuracy: every
/// evaluation a run makes, synchronous or buffered.
pub(crate) fn score(
    evaluator: &mut Trainer,
    global: &fedge_core::ModelParams,
    test: &fedge_core::dataset::Dataset,
    best: &mut f64,
) -> Result<Evaluation, SimError> {
    let m = evaluator.evaluate(global, test, 500)?;
    *best = best.max(m.accuracy);
    Ok(Evaluation { accuracy: m.accuracy, loss: m.loss })
}
