//! `fedge-edge`: the Fedge edge client.
//!
//! `run` joins a coordinator and trains when assigned (reconnecting with backoff and jitter),
//! `status` shows what the device holds, `train` trains standalone on local data (the same
//! trainer a federated task runs; a centralised baseline and a backend check).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_core::dataset::DatasetName;
use fedge_core::rng::derive_rng;
use fedge_core::wire::TrainConfig;
use fedge_edge::config::EdgeConfig;
use fedge_learn::{BackendKind, ModelKind, Trainer};

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
    /// Classify one image with the deployed (promoted, verified) model.
    Predict {
        /// The device's state folder.
        #[arg(long, default_value = "edge-state")]
        state_dir: PathBuf,
        /// The fleet's model-signing.pub.
        #[arg(long, default_value = "certs/fleet/model-signing.pub")]
        model_key: PathBuf,
        /// An IDX image file (MNIST format, .gz allowed).
        #[arg(long, conflicts_with = "raw")]
        idx: Option<PathBuf>,
        /// Which image of the IDX file.
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// A raw 784-byte 28x28 greyscale image ("-": standard input).
        #[arg(long)]
        raw: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
            let c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            tokio::runtime::Runtime::new()?.block_on(fedge_edge::service::run(c, async {
                let _ = tokio::signal::ctrl_c().await;
            }))?;
            Ok(())
        }
        Command::Predict { state_dir, model_key, idx, index, raw, json } => {
            let key = fedge_net::ModelKey::read(&model_key)?;
            let model = fedge_edge::predict::LocalModel::load(&state_dir, &key)?;
            let pixels = match (idx, raw) {
                (Some(path), _) => {
                    let a = fedge_core::dataset::idx::read_file(&path)?;
                    let per: usize = a.dims.iter().skip(1).product();
                    let count = a.dims.first().copied().unwrap_or(0);
                    anyhow::ensure!(
                        a.dims.len() == 3 && per == 784,
                        "{}: expected images of 28x28, dims {:?}",
                        path.display(),
                        a.dims
                    );
                    anyhow::ensure!(index < count, "{}: image {index} of {count}", path.display());
                    a.data[index * per..(index + 1) * per].to_vec()
                }
                (None, Some(path)) if path.as_os_str() == "-" => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                    v
                }
                (None, Some(path)) => {
                    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give an image: --idx FILE [--index N] or --raw FILE"),
            };
            let a = model.predict(&pixels)?;
            if json {
                println!("{}", serde_json::to_string(&a)?);
            } else {
                println!(
                    "class {} (confidence {:.3}) from the local {} v{} in {:.3} ms",
                    a.class, a.confidence, a.architecture, a.model_version, a.latency_ms
                );
            }
            Ok(())
        }
        Command::Status { state_dir } => {
            let path = state_dir.join("status.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("no status at {}", path.display()))?;
            println!("{text}");
            Ok(())
        }
        Command::Train { dataset, data_dir, model, backend, epochs, batch_size, lr, examples, seed, json } => {
            let data = dataset.load(&data_dir).context("failed to load the dataset")?;
            let config = TrainConfig { epochs, batch_size, learning_rate: lr, clip_norm: None, local_dp: None };
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
