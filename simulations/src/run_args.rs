//! `fedge-sim run`'s arguments ([`RunArgs`]) and how they map onto a [`SimConfig`]: each flag
//! overrides the configuration file's key of the same name.

use std::path::PathBuf;

use clap::Args;
use fedge_core::dataset::DatasetName;
use fedge_learn::{BackendKind, ModelKind};

use crate::attack::AttackKind;
use crate::config::{Mode, PartitionKind, SimConfig, StalenessKind};

#[derive(Args)]
/// `fedge-sim run`'s arguments (also flattened into `fedge-sim hybrid`'s): a configuration file
/// and flags that override its keys.
pub struct RunArgs {
    /// TOML config (see simulations/configs/); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder for rounds.csv, summary.json, partition.json, accuracy.svg and accuracy.png [default: runs/<model>-<dataset>-<partition>-s<seed>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print only the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// Virtual devices K.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Fraction C of devices per round.
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Local epochs E.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Local batch size B.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Local learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Model: 2nn or cnn; lstm or lstm-small for text.
    #[arg(long)]
    pub model: Option<ModelKind>,
    /// Dataset: embedded, mnist, fashion-mnist, shakespeare or shakespeare-sample.
    #[arg(long)]
    pub dataset: Option<DatasetName>,
    /// Folder with mnist/, fashion-mnist/ and shakespeare/ (see docs/data.md).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Partition: iid, shards, dirichlet or natural (the dataset's own clients: shakespeare).
    #[arg(long)]
    pub partition: Option<PartitionKind>,
    /// At most this many of a device's examples per round (a fresh seeded sample each round).
    #[arg(long)]
    pub local_examples: Option<usize>,
    /// Evaluate on a seeded sample of this many test examples.
    #[arg(long)]
    pub test_examples: Option<usize>,
    /// Shards per device (shards partition).
    #[arg(long)]
    pub shards_per_device: Option<usize>,
    /// Dirichlet concentration alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Clip each device's delta to this L2 norm.
    #[arg(long)]
    pub clip_norm: Option<f32>,
    /// Gaussian noise multiplier z (std z * clip norm), needs --clip-norm.
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// Fewest results a round needs.
    #[arg(long)]
    pub min_train_clients: Option<usize>,
    /// Probability that a selected device drops out of a round.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Worker threads (0: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Backend: flex (CPU) or wgpu (GPU; needs a build with --features wgpu).
    #[arg(long)]
    pub backend: Option<BackendKind>,
    /// Virtual devices trained in one launch, their models stacked (wgpu or flex).
    #[arg(long)]
    pub devices_per_launch: Option<usize>,
    /// Evaluate every N rounds.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Stop once test accuracy reaches this (0..1).
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Distil the global model into an int8 student every K rounds (and after the last).
    #[arg(long)]
    pub distill_every: Option<u64>,
    /// Student architecture for --distill-every (mlp, 2nn, cnn).
    #[arg(long)]
    pub student_model: Option<ModelKind>,
    /// Central DP budget: stop before a round that would pass it.
    #[arg(long)]
    pub target_epsilon: Option<f64>,
    /// Virtual seconds a round waits for results.
    #[arg(long)]
    pub round_timeout_s: Option<f64>,
    /// Median device training speed, examples per second (speed.compute_samples_per_s).
    #[arg(long)]
    pub compute_samples_per_s: Option<f64>,
    /// Log-normal sigma of the devices' training speed.
    #[arg(long)]
    pub compute_sigma: Option<f64>,
    /// Median download bandwidth, megabits per second.
    #[arg(long)]
    pub download_mbps: Option<f64>,
    /// Median upload bandwidth, megabits per second.
    #[arg(long)]
    pub upload_mbps: Option<f64>,
    /// Log-normal sigma of the devices' bandwidths.
    #[arg(long)]
    pub bandwidth_sigma: Option<f64>,
    /// One-way latency of each transfer, milliseconds.
    #[arg(long)]
    pub latency_ms: Option<f64>,
    /// Fraction of devices that are stragglers.
    #[arg(long)]
    pub straggler_fraction: Option<f64>,
    /// How many times slower a straggler is.
    #[arg(long)]
    pub straggler_slowdown: Option<f64>,
    /// The aggregation strategy and its parameters.
    #[command(flatten)]
    pub strategy: crate::strategy_args::StrategyArgs,
    /// Byzantine attack of the --attackers devices: sign-flip (send -scale x delta), scale
    /// (send scale x delta), noise (send N(0, std^2)), label-flip (train on labels
    /// classes-1-y) or little-is-enough (colluding mu - z sigma, Baruch et al. 2019); see
    /// docs/simulations.md.
    // A string, parsed in config(), so that a bad name fails in one line.
    #[arg(long, value_name = "KIND")]
    pub attack: Option<String>,
    /// Fraction of the devices that attack, in [0, 1) (round(fraction x devices), chosen from the seed).
    #[arg(long)]
    pub attackers: Option<f64>,
    /// Attack scale: sign-flip sends -scale x delta [default 1], scale sends scale x delta [default 10].
    #[arg(long)]
    pub attack_scale: Option<f64>,
    /// Standard deviation of a noise attacker's update per coordinate [default 1].
    #[arg(long)]
    pub attack_noise_std: Option<f64>,
    /// little-is-enough: z instead of the paper's z_max for the round.
    #[arg(long)]
    pub attack_z: Option<f64>,
    /// sync (rounds) or fedbuff (buffered asynchronous aggregation; --rounds counts
    /// aggregations).
    #[arg(long)]
    pub mode: Option<Mode>,
    /// FedBuff: K, results per aggregation [default 10].
    #[arg(long)]
    pub buffer_size: Option<usize>,
    /// FedBuff: the most devices training at once [default 20].
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// FedBuff: refuse results trained more versions ago than this [default 100].
    #[arg(long)]
    pub max_staleness: Option<u64>,
    /// FedBuff staleness weight: constant, polynomial or hinge [default polynomial].
    #[arg(long)]
    pub staleness: Option<StalenessKind>,
    /// FedBuff, polynomial: exponent a of 1 / (1 + s)^a [default 0.5].
    #[arg(long)]
    pub staleness_exponent: Option<f64>,
    /// FedBuff, hinge: slope a [default 10].
    #[arg(long)]
    pub hinge_a: Option<f64>,
    /// FedBuff, hinge: staleness b up to which results count fully [default 4].
    #[arg(long)]
    pub hinge_b: Option<u64>,
    /// Secure aggregation (SecAgg+): the server sees only the round's sum; needs --clip-norm.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// SecAgg neighbours per device [default about 3 log2 m, at most m - 1].
    #[arg(long)]
    pub secagg_degree: Option<u32>,
    /// SecAgg Shamir threshold, degree/2 < t <= degree [default floor(degree/2) + 1].
    #[arg(long)]
    pub secagg_threshold: Option<u32>,
    /// SecAgg quantisation levels per unit [default 2^20 / clip_norm].
    #[arg(long)]
    pub secagg_scale: Option<f32>,
    /// Distributed DP (with --secure-aggregation and --noise-multiplier): the fraction of a
    /// round's devices that may drop while the sum still carries the full noise [default 0.2].
    #[arg(long)]
    pub dp_dropout_tolerance: Option<f64>,
}

impl RunArgs {
    /// The configuration: the file (or the defaults) with the flags given written over it,
    /// validated.
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let mut c = match &self.config {
            Some(path) => SimConfig::from_file(path)?,
            None => SimConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(devices, fraction, rounds, epochs, batch_size, lr, model, dataset, data_dir, partition);
        set!(shards_per_device, alpha, seed, min_train_clients, dropout, workers, backend, eval_every);
        set!(devices_per_launch);
        set!(round_timeout_s, mode, buffer_size, max_concurrency, max_staleness, staleness);
        set!(staleness_exponent, hinge_a, hinge_b);
        self.strategy.apply(&mut c);
        set!(round_timeout_s, attackers, attack_noise_std);
        macro_rules! speed {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.speed.$f = v; } )* };
        }
        speed!(compute_samples_per_s, compute_sigma, download_mbps, upload_mbps, bandwidth_sigma, latency_ms);
        speed!(straggler_fraction, straggler_slowdown);
        if self.clip_norm.is_some() {
            c.clip_norm = self.clip_norm;
        }
        if self.noise_multiplier.is_some() {
            c.noise_multiplier = self.noise_multiplier;
        }
        if self.target_accuracy.is_some() {
            c.target_accuracy = self.target_accuracy;
        }
        if self.local_examples.is_some() {
            c.local_examples = self.local_examples;
        }
        if self.test_examples.is_some() {
            c.test_examples = self.test_examples;
        }
        if self.distill_every.is_some() {
            c.distill_every = self.distill_every;
        }
        if let Some(m) = self.student_model {
            c.student_model = m;
        }
        if self.target_epsilon.is_some() {
            c.target_epsilon = self.target_epsilon;
        }
        if let Some(kind) = &self.attack {
            c.attack = Some(kind.parse::<AttackKind>().map_err(anyhow::Error::msg)?);
        }
        if self.attack_scale.is_some() {
            c.attack_scale = self.attack_scale;
        }
        if self.attack_z.is_some() {
            c.attack_z = self.attack_z;
        }
        c.secure_aggregation |= self.secure_aggregation;
        for (v, f) in [(&mut c.secagg_degree, self.secagg_degree), (&mut c.secagg_threshold, self.secagg_threshold)] {
            if f.is_some() {
                *v = f;
            }
        }
        if self.secagg_scale.is_some() {
            c.secagg_scale = self.secagg_scale;
        }
        if self.dp_dropout_tolerance.is_some() {
            c.dp_dropout_tolerance = self.dp_dropout_tolerance;
        }
        c.validate()?;
        Ok(c)
    }
}
