//! `fedge-edge`: the Fedge edge client.
//!
//! `run` joins a coordinator and trains when assigned (reconnecting with backoff and jitter),
//! `status` shows what the device holds, `train` trains standalone on local data (the same
//! trainer a federated task runs; a centralised baseline and a backend check), `predict`
//! answers one image (under the device's inference policy with `--config`), `serve-inference`
//! serves local apps over HTTP, `bench-inference` measures hybrid inference.

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
    /// Keep the GPU drivers' compiled shaders in the device's state folder (as `run` does on
    /// wgpu: starting itself again with the drivers' cache variables) and print where they are.
    GpuCache {
        /// edge.toml (its state_dir).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the model version and last round this device holds, and its inference metrics
    /// (when it serves inference).
    Status {
        /// The device's state folder.
        #[arg(long, default_value = "edge-state")]
        state_dir: PathBuf,
    },
    /// Classify one image with the deployed (promoted, verified) model; with --config, under
    /// the device's inference policy (escalating to the coordinator when unsure).
    Predict {
        /// The device's state folder (without --config).
        #[arg(long, default_value = "edge-state")]
        state_dir: PathBuf,
        /// The fleet's model-signing.pub (without --config).
        #[arg(long, default_value = "certs/fleet/model-signing.pub")]
        model_key: PathBuf,
        /// edge.toml: answer under its [inference] policy, with its coordinator.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the policy: local-only, cascade, speculative or cloud-first (needs --config).
        #[arg(long, requires = "config")]
        policy: Option<fedge_core::escalation::PolicyKind>,
        /// The input must not leave the device.
        #[arg(long)]
        private: bool,
        /// The most this answer may cost (unit of [inference] cloud_call_cost); a dearer
        /// escalation is answered locally (needs --config).
        #[arg(long, requires = "config")]
        max_cost: Option<f64>,
        /// An IDX image file (MNIST format, .gz allowed).
        #[arg(long, conflicts_with_all = ["raw", "png"])]
        idx: Option<PathBuf>,
        /// Which image of the IDX file.
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// A raw 784-byte 28x28 greyscale image ("-": standard input).
        #[arg(long, conflicts_with = "png")]
        raw: Option<PathBuf>,
        /// A PNG of any size (greyscale or colour; cropped, scaled and centred as MNIST was).
        #[arg(long)]
        png: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve local inference as JSON over HTTP (POST /predict, GET /corrections/ID,
    /// GET /status, GET /metrics) under the device's policy, following deployed models.
    ServeInference {
        /// edge.toml.
        #[arg(long)]
        config: PathBuf,
        /// Where to listen (default: [inference] listen, else 127.0.0.1:8089).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override the policy.
        #[arg(long)]
        policy: Option<fedge_core::escalation::PolicyKind>,
        /// Override the target escalation rate.
        #[arg(long)]
        target_rate: Option<f64>,
    },
    /// Measure local inference latency (one core by default), escalation latency to the
    /// coordinator against a bare round trip, and the policies' accuracy on held-out images.
    BenchInference {
        /// edge.toml.
        #[arg(long)]
        config: PathBuf,
        /// Test images to use.
        #[arg(long, default_value_t = 2000)]
        images: usize,
        /// Threads for local inference.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Escalations in flight in the concurrent row.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Local latency only (no coordinator).
        #[arg(long)]
        local_only: bool,
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
        /// Backend: cpu (Fedge's fused CPU kernels), flex (burn's CPU backend, the reference) or
        /// wgpu (GPU, when built with --features wgpu).
        #[arg(long, default_value = "cpu")]
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
            // The command's answer when it fails: printed, not logged, so that it reaches the
            // user whatever RUST_LOG or FEDGE_LOG_FORMAT say.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One 28x28 greyscale image from an IDX file, a raw file (or standard input) or a PNG.
fn read_image(
    idx: Option<PathBuf>,
    index: usize,
    raw: Option<PathBuf>,
    png: Option<PathBuf>,
) -> anyhow::Result<Vec<u8>> {
    Ok(match (idx, raw, png) {
        (Some(path), _, _) => {
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
        (None, Some(path), _) if path.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
        (None, Some(path), _) => std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        (None, None, Some(path)) => {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            fedge_edge::predict::decode_png(&bytes).with_context(|| path.display().to_string())?
        }
        (None, None, None) => anyhow::bail!("give an image: --idx FILE [--index N], --raw FILE or --png FILE"),
    })
}

/// One line about a hybrid answer.
fn describe(a: &fedge_edge::hybrid::HybridAnswer) -> String {
    use fedge_edge::hybrid::Source;
    let by = match a.answered_by {
        Source::Local => format!("the local {} v{}", a.architecture.as_deref().unwrap_or("model"), a.model_version),
        Source::Cloud => format!("the coordinator's teacher (global v{})", a.model_version),
        Source::Region => format!("the regional aggregator's model (v{})", a.model_version),
    };
    let mut line = format!(
        "class {} (confidence {:.3}) from {by} in {:.3} ms [{}]",
        a.class, a.confidence, a.latency_ms, a.policy
    );
    if let Some(why) = a.fallback {
        line += &format!("; unverified: {why}");
    } else if a.correction_pending {
        line += "; unverified until the cloud answers";
    }
    line += &format!(" ({})", a.route_reason);
    line
}

fn real_main() -> anyhow::Result<()> {
    fedge_log::init().context("cannot start logging")?;
    match Cli::parse().command {
        Command::Run { config } => {
            let c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            if c.backend.parse::<BackendKind>() == Ok(BackendKind::Wgpu) && BackendKind::Wgpu.available() {
                // The GPU driver's compiled shaders kept in the state folder across restarts.
                match fedge_edge::gpu_cache::keep_in(&c.state_dir) {
                    Ok(caches) => tracing::info!("GPU shader caches: {caches}"),
                    Err(e) => tracing::warn!(
                        "cannot keep the GPU shader caches in the state folder ({e}): going on without them"
                    ),
                }
            }
            tokio::runtime::Runtime::new()?.block_on(fedge_edge::service::run(c, async {
                let _ = tokio::signal::ctrl_c().await;
            }))?;
            Ok(())
        }
        Command::Predict { state_dir, model_key, config, policy, private, max_cost, idx, index, raw, png, json } => {
            if let Some(m) = max_cost {
                fedge_edge::hybrid::check_cost("--max-cost", m).map_err(anyhow::Error::msg)?;
            }
            let pixels = read_image(idx, index, raw, png)?;
            let Some(config) = config else {
                anyhow::ensure!(policy.is_none(), "--policy needs --config");
                let key = fedge_net::ModelKey::read(&model_key)?;
                let model = fedge_edge::predict::LocalModel::load(&state_dir, &key)?;
                let a = model.predict(&pixels)?;
                if json {
                    println!("{}", serde_json::to_string(&a)?);
                } else {
                    println!(
                        "class {} (confidence {:.3}) from the local {} v{} in {:.3} ms",
                        a.class, a.confidence, a.architecture, a.model_version, a.latency_ms
                    );
                }
                return Ok(());
            };
            let mut c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            if let Some(p) = policy {
                c.inference.policy = p;
            }
            tokio::runtime::Runtime::new()?.block_on(async {
                let predictor = fedge_edge::service::hybrid_predictor(&c)?;
                if !private && c.inference.policy != fedge_core::escalation::PolicyKind::LocalOnly {
                    // A one-shot command starts offline: give the session a moment.
                    predictor.cloud().wait_online(std::time::Duration::from_secs(3)).await;
                }
                let mut a = predictor.predict(fedge_edge::hybrid::Request { pixels, private, max_cost }).await?;
                let correction = a.correction.take();
                if json {
                    println!("{}", serde_json::to_string(&a)?);
                } else {
                    println!("{}", describe(&a));
                }
                if let Some(rx) = correction {
                    match rx.await {
                        Ok(Ok(c)) if json => println!("{}", serde_json::to_string(&c)?),
                        Ok(Ok(c)) => println!(
                            "cloud: class {} (confidence {:.3}) from global v{} after {:.3} ms: {}",
                            c.class,
                            c.confidence,
                            c.model_version,
                            c.latency_ms,
                            if c.differs { "a correction" } else { "confirms the local answer" }
                        ),
                        Ok(Err(e)) => eprintln!("no correction: {e}"),
                        Err(_) => eprintln!("no correction: dropped"),
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        }
        Command::ServeInference { config, listen, policy, target_rate } => {
            let mut c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            if let Some(p) = policy {
                c.inference.policy = p;
            }
            if let Some(r) = target_rate {
                c.inference.target_rate = r;
            }
            let listen = listen.or(c.inference.listen).unwrap_or_else(|| "127.0.0.1:8089".parse().expect("valid"));
            tokio::runtime::Runtime::new()?.block_on(fedge_edge::service::serve_inference(
                &c,
                listen,
                |addr| println!("local inference on http://{addr} ({} policy)", c.inference.policy),
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            ))?;
            Ok(())
        }
        Command::BenchInference { config, images, threads, concurrency, local_only, json } => {
            let c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            let opts =
                fedge_edge::bench::BenchOptions { images, threads, concurrency, local_only, ..Default::default() };
            let report = tokio::runtime::Runtime::new()?.block_on(fedge_edge::bench::run(&c, &opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", fedge_edge::bench::format_report(&report));
            }
            Ok(())
        }
        Command::GpuCache { config } => {
            let c: EdgeConfig = fedge_core::config_file::read_toml(&config)?;
            let caches = fedge_edge::gpu_cache::keep_in(&c.state_dir)
                .with_context(|| format!("cannot keep the GPU shader caches in {}", c.state_dir.display()))?;
            println!("GPU shader caches: {caches}");
            Ok(())
        }
        Command::Status { state_dir } => {
            let path = state_dir.join("status.json");
            let inference = std::fs::read_to_string(state_dir.join("inference-status.json")).ok();
            match (std::fs::read_to_string(&path), inference) {
                (Ok(text), None) => println!("{text}"),
                (Ok(text), Some(inf)) => {
                    let mut v: serde_json::Value = serde_json::from_str(&text)?;
                    v["inference"] = serde_json::from_str(&inf)?;
                    println!("{v:#}");
                }
                (Err(_), Some(inf)) => println!("{inf}"),
                (Err(e), None) => return Err(e).with_context(|| format!("no status at {}", path.display())),
            }
            Ok(())
        }
        Command::Train { dataset, data_dir, model, backend, epochs, batch_size, lr, examples, seed, json } => {
            anyhow::ensure!(
                dataset.is_text() == model.is_text(),
                "model `{model}` cannot learn dataset `{dataset}`: text (shakespeare, shakespeare-sample) takes lstm or lstm-small, images take 2nn or cnn"
            );
            let data = dataset.load(&data_dir).context("failed to load the dataset")?;
            let config = TrainConfig::sgd(epochs, batch_size, lr);
            anyhow::ensure!(
                epochs > 0 && batch_size > 0 && lr > 0.0,
                "epochs, batch size and learning rate must be positive"
            );
            let n = examples.unwrap_or(data.train.len()).min(data.train.len());
            let indices: Vec<usize> = (0..n).collect();
            let mut trainer = Trainer::new(model, data.train.num_classes, backend)?;
            trainer.set_threads(fedge_learn::Threads::Rayon(0));
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
