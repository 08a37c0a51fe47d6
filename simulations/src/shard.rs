//! Sharded simulation: `fedge-sim shard` runs shard `I` of `N` of one seeded experiment,
//! hosting the virtual devices whose index is `I mod N`, against one real coordinator (the
//! root) over QUIC with an aggregator certificate.
//!
//! **How the shards stay one experiment.** Every shard makes the whole run's starting point
//! from the same config ([`crate::run::prepare`]: data, partition, speeds, the round engine
//! with every device) and replays every round of it on its own virtual clock with the real
//! engine: the same sampling, dropouts, arrival times, deadline and close decisions as the
//! in-process run ([`crate::clock::drive_round`]). Only the devices it hosts train, from the
//! root's model; the others are placeholders carrying their sample counts (what the engine's
//! decisions read), so the shard's engine decides exactly what the in-process engine would, and
//! its own model is never used. For each root task (round `r`) a shard uploads the
//! sample-weighted mean of its hosted devices' accepted deltas with their total samples as
//! its weight (zero weight when it hosts none of them, or when the round fails in the replay);
//! the root, which samples every shard each round (`fraction = 1`, `min_train_clients = N`),
//! aggregates the shards' means by weight: the in-process round's FedAvg, to float rounding.
//!
//! **What comes out.** The shard given `--out` (shard 0 in the shipped manifests) records the
//! experiment: it scores the root's model after each round on the test split, as the
//! in-process run does, takes the round's training loss from the root's round history (an
//! aggregator may read the root's status) and the rest of the row from its replay, and writes
//! the same `rounds.csv` as `fedge-sim run`, a row as soon as it is known (a restarted recorder
//! keeps the rows written).
//!
//! **Crash safety.** A shard holds nothing the experiment needs: a shard restarted with the
//! same index replays the rounds before the root's current task (no training), takes the task
//! again (the root keeps an aggregator's task while it is away, until the round's deadline)
//! and trains its devices; an upload whose acknowledgement was lost is answered `Duplicate`.
//! One restarted after its last upload gets no task: it reads the root's history and finishes
//! once the last round closed (the recorder writing its last rows).
//!
//! **Secure aggregation** shards: the root runs SecAgg+ and each device the replay's sum holds
//! enters the root's session itself, a member of its shard's relay session (`shard/members.rs`); no
//! shard pre-aggregates, the root learns only the sum.
//!
//! **Local DP** shards: each device clips and noises its own update before its shard sums it
//! (as in one process, with the same seeded noise), so what the root sees is post-processing
//! of the devices' private outputs.
//!
//! **What it does not run.** Refused with a clear error ([`check_shardable`]): rules that need
//! every device's update (median, Krum, ..., FLTrust), central DP and adaptive clipping (the
//! server's noise and clipping act on individual updates), distributed DP (its noise is
//! divided by the devices selected, and the root's participants are its shards), FedBuff,
//! attacks, distillation, `max_step_norm`, a target accuracy (the root runs the rounds it is given) and text datasets
//! (the coordinator serves image models); `clip_norm` must be set (a coordinator always bounds
//! the deltas it takes, so the experiment must clip in one process too).

mod launch;
mod members;
mod recorder;
mod worker;

use std::path::Path;

use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::DeviceId;
use rand::RngExt;
use thiserror::Error;

use crate::config::{Mode, SimConfig, SimConfigError};

pub use launch::{LaunchError, LaunchReport, launch};
pub use worker::{ShardOptions, ShardReport, run_shard};

/// Strategies whose aggregate of the shards' weighted means is the aggregate of every device's
/// update: a sample-weighted mean, then a server step.
pub const SHARDABLE_STRATEGIES: [&str; 6] = ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi"];

/// Which devices a shard trains: those whose index is `index` mod `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hosted {
    index: u32,
    count: u32,
    training: bool,
}

impl Hosted {
    /// Shard `index` of `count`.
    pub fn new(index: u32, count: u32) -> Result<Self, ShardError> {
        if count == 0 || index >= count {
            return Err(ShardError::Index { index, count });
        }
        Ok(Self { index, count, training: true })
    }

    /// The shard's index and count from Kubernetes' Indexed Job environment:
    /// `JOB_COMPLETION_INDEX` and `FEDGE_SHARDS` (the Job's `completions`, which Kubernetes does
    /// not export itself).
    pub fn from_env() -> Result<Self, ShardError> {
        let read = |name: &'static str| -> Result<u32, ShardError> {
            let value = std::env::var(name).map_err(|_| ShardError::Env { name, value: None })?;
            value.trim().parse().map_err(|_| ShardError::Env { name, value: Some(value) })
        };
        Self::new(read("JOB_COMPLETION_INDEX")?, read("FEDGE_SHARDS")?)
    }

    /// The same shard training nothing (catching up on rounds it missed).
    pub(crate) fn replay_only(self) -> Self {
        Self { training: false, ..self }
    }

    /// Whether the shard trains `device`.
    pub fn hosts(&self, device: DeviceId) -> bool {
        self.training && device % u64::from(self.count) == u64::from(self.index)
    }

    /// The shard's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// A shard's accepted results of one round, folded in as they arrive (a round's deltas are
/// never held together): their sample-weighted sum, samples and loss.
#[derive(Debug)]
pub(crate) struct HostedSum {
    mean: fedge_core::aggregate::WeightedMean,
    /// Results folded in.
    pub results: usize,
    /// Their samples.
    pub samples: u64,
    loss_sum: f64,
    loss_samples: u64,
    /// The first result that could not be folded in (the engine took it, so none should be).
    pub error: Option<String>,
}

impl HostedSum {
    pub(crate) fn new(layout: std::sync::Arc<fedge_core::params::ParamLayout>) -> Self {
        Self {
            mean: fedge_core::aggregate::WeightedMean::new(layout),
            results: 0,
            samples: 0,
            loss_sum: 0.0,
            loss_samples: 0,
            error: None,
        }
    }

    /// Folds in an accepted result as the engine counts it (its capped samples as the weight,
    /// scaled by the engine's own clipping: [`fedge_engine::RoundEngine::counted`]).
    pub(crate) fn add(&mut self, c: fedge_engine::strategy::Contribution<'_>, train_loss: f32) {
        if let Err(e) = self.mean.add_scaled(c.delta, c.num_samples as f64, c.clip_scale) {
            self.error.get_or_insert_with(|| e.to_string());
            return;
        }
        self.results += 1;
        self.samples += c.num_samples;
        if train_loss.is_finite() {
            self.loss_sum += f64::from(train_loss) * c.num_samples as f64;
            self.loss_samples += c.num_samples;
        }
    }

    /// The sample-weighted mean loss, NaN without one.
    pub(crate) fn mean_loss(&self) -> f32 {
        if self.loss_samples > 0 { (self.loss_sum / self.loss_samples as f64) as f32 } else { f32::NAN }
    }

    /// The sample-weighted mean delta (`None` without samples).
    pub(crate) fn finish(self) -> Result<Option<fedge_core::ModelParams>, fedge_core::aggregate::AggregateError> {
        if self.samples == 0 {
            return Ok(None);
        }
        self.mean.finish().map(Some)
    }
}

/// Why a shard could not run.
#[derive(Debug, Error)]
pub enum ShardError {
    /// Index out of range.
    #[error("shard {index} of {count}: the index must be below the count (and the count at least 1)")]
    Index {
        /// The index.
        index: u32,
        /// The count.
        count: u32,
    },
    /// The environment does not name the shard.
    #[error("{name} {}: set --shard and --shards, or JOB_COMPLETION_INDEX and FEDGE_SHARDS", match value { Some(v) => format!("is `{v}`, not a number"), None => "is not set".into() })]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value, if set.
        value: Option<String>,
    },
    /// The configuration cannot be sharded (or is bad).
    #[error(transparent)]
    Config(#[from] SimConfigError),
    /// The simulation could not be set up or run.
    #[error(transparent)]
    Sim(#[from] crate::run::SimError),
    /// The root's task disagrees with the simulation's configuration.
    #[error(
        "the root's {what} differs from this simulation's (generate the root's coordinator.toml with `fedge-sim shard-root`): {detail}"
    )]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// How.
        detail: String,
    },
    /// Talking to the root failed for good.
    #[error("root {root}: {detail}")]
    Root {
        /// The root's address.
        root: String,
        /// What happened.
        detail: String,
    },
    /// The root refused something, or the shard's own work failed.
    #[error("{0}")]
    Refused(String),
    /// Writing the record failed.
    #[error("cannot write {path}: {cause}")]
    Output {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        cause: String,
    },
}

/// Refuses, with the reason, what a sharded run cannot reproduce (see the module docs).
pub fn check_shardable(config: &SimConfig) -> Result<(), SimConfigError> {
    config.validate()?;
    let bad = |m: String| Err(SimConfigError::Invalid(format!("a sharded run: {m}")));
    if !SHARDABLE_STRATEGIES.contains(&config.strategy.as_str()) {
        return bad(format!(
            "strategy `{}` needs every device's update; shards send their devices' weighted mean (use one of {})",
            config.strategy,
            SHARDABLE_STRATEGIES.join(", ")
        ));
    }
    let refused = [
        (
            "noise_multiplier (central DP, or distributed DP with secure_aggregation: the root would divide by its shards)",
            config.noise_multiplier.is_some(),
        ),
        ("adaptive_clip", config.adaptive_clip.is_some()),
        ("mode = \"fedbuff\"", config.mode == Mode::Fedbuff),
        ("attack", config.attack.is_some()),
        ("distill_every", config.distill_every.is_some()),
        ("max_step_norm", config.max_step_norm.is_some()),
        ("target_accuracy", config.target_accuracy.is_some()),
    ];
    if let Some((key, _)) = refused.iter().find(|r| r.1) {
        return bad(format!("{key} is not offered (see docs/simulations.md, \"Shards\")"));
    }
    if config.clip_norm.is_none() {
        return bad("set clip_norm: a coordinator always bounds the deltas it takes (its own default is 10), so the devices must clip to the same bound in one process too".into());
    }
    if config.dataset.is_text() || config.model.is_text() {
        return bad("the coordinator serves image models: text datasets are not offered".into());
    }
    Ok(())
}

/// The seed the root's coordinator.toml needs for its model version 0 to be the simulation's
/// initial model (the coordinator initialises from its `seed` directly).
pub fn root_seed(config: &SimConfig) -> u64 {
    derive_rng(config.seed, &[stream::INIT]).random()
}

/// Where the root listens and keeps things, for [`root_config`].
#[derive(Debug, Clone)]
pub struct RootPlace<'a> {
    /// `listen` (e.g. `0.0.0.0:4433`).
    pub listen: &'a str,
    /// The fleet's certificate folder.
    pub certs_dir: &'a Path,
    /// The root's state folder.
    pub state_dir: &'a Path,
    /// The round deadline, seconds (wall-clock: a shard's training of its devices).
    pub round_timeout_secs: u64,
}

/// The root's `coordinator.toml` for `config` run as `shards` shards: the simulation's model
/// and initial model, training settings and strategy; every shard sampled every round; a round
/// fails if a shard does not answer by the deadline.
pub fn root_config(config: &SimConfig, shards: u32, place: &RootPlace<'_>) -> Result<String, crate::run::SimError> {
    check_shardable(config)?;
    if shards == 0 {
        return Err(SimConfigError::Invalid("shards must be at least 1".into()).into());
    }
    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let mut out = format!(
        "# The root of a sharded simulation: generated by `fedge-sim shard-root --shards {shards}` from the\n\
         # simulation's config (seed {seed}); the shards check every task against it.\n\
         listen = \"{listen}\"\ncerts_dir = {certs}\nstate_dir = {state}\nmodel = \"{model}\"\nseed = {root_seed}\n\
         eval_dataset = \"{dataset}\"\ndata_dir = {data}\nfraction = 1.0\nmin_train_clients = {shards}\naccept_failures = false\n\
         round_timeout_secs = {timeout}\nepochs = {epochs}\nbatch_size = {batch}\nlr = {lr:?}\nstrategy = \"{strategy}\"\n",
        seed = config.seed,
        listen = place.listen,
        certs = q(place.certs_dir),
        state = q(place.state_dir),
        model = config.model,
        root_seed = root_seed(config),
        dataset = config.dataset,
        data = q(&config.data_dir),
        timeout = place.round_timeout_secs,
        epochs = config.epochs,
        batch = config.batch_size,
        lr = config.lr,
        strategy = config.strategy,
    );
    if let Some(c) = config.clip_norm {
        out.push_str(&format!("clip_norm = {c:?}\n"));
    }
    if config.secure_aggregation {
        // The shards' devices enter the root's secure sum as members, weighed as in one
        // process: relative to the cap on samples per result lowered to the largest device's
        // data (read from the data, as the shards do). A stage waits a fifth of the round at
        // most (four stages fit in the round).
        let p = crate::run::prepare(config, &mut crate::run::Quiet)?;
        let weight_cap =
            crate::secure::SecureSetup::of_run(config, &p.engine, &p.device_data).map_or(1, |s| s.weight_cap);
        out.push_str(&format!(
            "secure_aggregation = true\nsecagg_weight_cap = {weight_cap}\nsecagg_stage_secs = {}\n",
            (place.round_timeout_secs / 5).max(1)
        ));
        for (key, value) in [("secagg_degree", config.secagg_degree), ("secagg_threshold", config.secagg_threshold)] {
            if let Some(v) = value {
                out.push_str(&format!("{key} = {v}\n"));
            }
        }
        if let Some(scale) = config.secagg_scale {
            out.push_str(&format!("secagg_scale = {scale:?}\n"));
        }
    }
    if let Some(e) = config.local_epsilon {
        out.push_str(&format!("local_epsilon = {e:?}\ndelta = {:?}\n", config.delta));
    }
    let options = toml::to_string(&config.strategy_options)
        .map_err(|e| SimConfigError::Invalid(format!("strategy_options: {e}")))?;
    if !options.trim().is_empty() {
        out.push_str("\n[strategy_options]\n");
        out.push_str(&options);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
