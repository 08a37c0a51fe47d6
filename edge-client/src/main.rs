//! `fedge-edge`: the Fedge edge client.
//!
//! `run` joins a coordinator and trains when assigned (reconnecting with backoff and jitter),
//! `status` shows what the device holds, `train` trains standalone on local data (the same
//! trainer a federated task runs; a centralised baseline and a backend check).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_core::dataset::DatasetName;
use fedge_core::rng::derive_rng;
use fedge_core::wire::TrainConfig;
use fedge_core::partition::Partition;
use fedge_core::wire::Capabilities;
use fedge_edge::EdgeTrainer;
use fedge_edge::client::{DeviceStatus, EdgeClient};
use fedge_edge::config::EdgeConfig;
use fedge_edge::transport::{DeviceTls, Link};
use fedge_learn::{BackendKind, ModelKind, Trainer};
use rand::RngExt;

#[derive(Parser)]
#[command(name = "fedge-edge", version, about = "Fedge edge client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a coordinator and train when assigned, until interrupted.
    Run {
        /// edge.toml (see docs/operations.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the model version and last round this device holds.
    Status {
        /// The device's state folder.
        #[arg(long, default_value = "edge-state")]
        state_dir: PathBuf,
    },
    /// Train a fresh model on local data and evaluate it on the test split.
    Train {
        /// Dataset: embedded, mnist or fashion-mnist.
        #[arg(long, default_value = "embedded")]
        dataset: DatasetName,
        /// Folder with mnist/ and fashion-mnist/.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Model: 2nn or cnn.
        #[arg(long, default_value = "2nn")]
        model: ModelKind,
        /// Backend: flex (CPU) or wgpu (GPU, when built with --features wgpu).
        #[arg(long, default_value = "flex")]
        backend: BackendKind,
        /// Epochs.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// Batch size.
        #[arg(long, default_value_t = 10)]
        batch_size: u32,
        /// Learning rate.
        #[arg(long, default_value_t = 0.05)]
        lr: f32,
        /// Train on the first N training examples only.
        #[arg(long)]
        examples: Option<usize>,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { config } => {
            let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let c: EdgeConfig = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", config.display(), e.message().replace('\n', " ")))?;
            tokio::runtime::Runtime::new()?.block_on(run(c))
        }
        Command::Status { state_dir } => {
            let path = state_dir.join("status.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("no status at {}", path.display()))?;
            println!("{text}");
            Ok(())
        }
        Command::Train { dataset, data_dir, model, backend, epochs, batch_size, lr, examples, seed, json } => {
            let data = dataset.load(&data_dir).context("failed to load the dataset")?;
            let config = TrainConfig { epochs, batch_size, learning_rate: lr, clip_norm: None, noise_multiplier: None };
            anyhow::ensure!(
                epochs > 0 && batch_size > 0 && lr > 0.0,
                "epochs, batch size and learning rate must be positive"
            );
            let n = examples.unwrap_or(data.train.len()).min(data.train.len());
            let indices: Vec<usize> = (0..n).collect();
            let mut trainer = Trainer::new(model, data.train.num_classes, backend)?;
            let start = trainer.initial_params(seed);
            let t0 = Instant::now();
            let out = trainer.train(&start, &data.train, &indices, &config, &mut derive_rng(seed, &[]))?;
            let train_seconds = t0.elapsed().as_secs_f64();
            let eval = trainer.evaluate(&out.params, &data.test, 500)?;
            let report = serde_json::json!({
                "model": model.to_string(),
                "backend": backend.to_string(),
                "dataset": dataset.to_string(),
                "examples": n,
                "epochs": epochs,
                "steps": out.steps,
                "train_seconds": train_seconds,
                "examples_per_second": (n as f64 * epochs as f64) / train_seconds,
                "train_loss": out.mean_loss,
                "test_accuracy": eval.accuracy,
                "test_loss": eval.loss,
            });
            if json {
                println!("{report:#}");
            } else {
                println!(
                    "{model} on {backend}: {} steps over {n} {dataset} examples in {train_seconds:.1}s ({:.0} examples/s); test accuracy {:.2}%, loss {:.4}",
                    out.steps,
                    report["examples_per_second"].as_f64().unwrap_or(0.0),
                    eval.accuracy * 100.0,
                    eval.loss
                );
            }
            Ok(())
        }
    }
}

fn save_status(dir: &std::path::Path, status: &DeviceStatus) {
    let _ = std::fs::create_dir_all(dir);
    let v = serde_json::json!({
        "model_version": status.model_version,
        "model_hash": status.model_hash.map(|h| h.to_string()),
        "last_round": status.last_round,
        "results_acknowledged": status.acked,
    });
    let tmp = dir.join("status.json.tmp");
    if std::fs::write(&tmp, format!("{v:#}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("status.json"));
    }
}

async fn run(c: EdgeConfig) -> anyhow::Result<()> {
    let dataset: DatasetName = c.dataset.parse().map_err(anyhow::Error::msg)?;
    let model: ModelKind = c.model.parse().map_err(anyhow::Error::msg)?;
    let backend: BackendKind = c.backend.parse()?;
    anyhow::ensure!(c.shards > 0 && c.shard < c.shards, "shard must be in 0..shards");
    let data = dataset.load(&c.data_dir).context("failed to load the local dataset")?;
    let parts = Partition::Iid.split(&data.train.labels, c.shards as usize, &mut derive_rng(c.seed, &[fedge_core::rng::stream::PARTITION]))?;
    let indices = parts[c.shard as usize].clone();
    let n = indices.len();
    let tls = DeviceTls { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone() };
    let caps = Capabilities { backend: backend.to_string(), memory_mb: c.memory_mb, charging: true, unmetered: true, num_samples: n as u64 };
    let mut trainer = Some(EdgeTrainer::new(model, data.train.num_classes, backend)?);
    let train = std::sync::Arc::new(data.train);
    let mut client: Option<EdgeClient> = None;
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let link = Link::connect(c.coordinator, &c.server_name, &tls).await?;
            let welcome = link.hello(caps.clone()).await?;
            Ok::<_, fedge_edge::transport::ConnectError>((link, welcome))
        };
        match attempt.await {
            Ok((link, welcome)) => {
                failures = 0;
                println!("connected as {} ({n} local examples); coordinator at model v{}", welcome.device_id, welcome.model_version);
                let cl = match client.as_mut() {
                    Some(cl) => {
                        cl.reconnect(link);
                        cl
                    }
                    None => {
                        let cl = EdgeClient::new(link, trainer.take().expect("first connection"), train.clone(), indices.clone(), c.seed)
                            .with_state_dir(c.state_dir.clone());
                        client.insert(cl)
                    }
                };
                let status = cl.status();
                let saver = {
                    let status = status.clone();
                    let dir = c.state_dir.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            save_status(&dir, &s);
                        }
                    })
                };
                let outcome = tokio::select! {
                    r = cl.run(c.shard) => r,
                    _ = tokio::signal::ctrl_c() => {
                        saver.abort();
                        save_status(&c.state_dir, &status.lock().unwrap_or_else(|p| p.into_inner()).clone());
                        return Ok(());
                    }
                };
                saver.abort();
                save_status(&c.state_dir, &status.lock().unwrap_or_else(|p| p.into_inner()).clone());
                if let Err(e) = outcome {
                    eprintln!("disconnected: {e}");
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("cannot reach the coordinator: {e}");
            }
        }
        // Exponential backoff with jitter: 100 ms doubling to 10 s, +-25%.
        let base = (100u64 << failures.min(7)).min(10_000) as f64;
        let jitter: f64 = rand::rng().random_range(0.75..1.25);
        tokio::time::sleep(Duration::from_millis((base * jitter) as u64)).await;
    }
}
