//! `fedge-sim bench-train`: local SGD steps per second of our models on the CPU, beside
//! PyTorch's in the same run.
//!
//! Each measurement trains one model on MNIST-shaped random data (like
//! `../shared/bench/torch_step.py`: forward, cross-entropy, backward, SGD update; our figure
//! also includes turning the bytes into standardised floats) for about `seconds`, after a
//! warm-up. With `threads = n` a single model uses n threads (PyTorch: `set_num_threads(n)`;
//! ours: `Threads::Rayon(n)`, each step's batch split into n chunks trained side by side, the
//! gradients summed, one update: `fedge-kernels`' `net/parallel.rs`); `workers` is the
//! simulator's way to use n cores: n independent models, one thread each, their samples/s
//! added. PyTorch is run as a subprocess, one configuration
//! at a time, never beside our own measurement.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fedge_core::dataset::Dataset;
use fedge_core::rng::derive_rng;
use fedge_core::wire::TrainConfig;
use fedge_learn::{BackendKind, ConvAlgorithm, ModelKind, Threads, Trainer};
use rand::RngExt;

/// One configuration's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Model.
    pub model: String,
    /// Minibatch size.
    pub batch: usize,
    /// Threads (PyTorch's intra-op threads; ours, one model's batch split; or workers).
    pub threads: usize,
    /// PyTorch's samples/s, when it ran.
    pub torch: Option<f64>,
    /// Ours, one model.
    pub fedge: f64,
    /// Ours, `threads` independent single-threaded models (the simulator's mode).
    pub fedge_workers: f64,
    /// The backend we measured.
    pub backend: String,
    /// How our convolutions computed (`Im2col` or `Winograd`).
    pub conv: String,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Models.
    pub models: Vec<ModelKind>,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Measurements of each figure, alternating PyTorch and ours; the best of each is kept
    /// (the machine's speed drifts; the best is the least disturbed).
    pub repeat: usize,
    /// Our backend (`cpu`, or `flex` for burn's own).
    pub backend: BackendKind,
    /// Convolution algorithms of the fast CPU path: each is a row, measured in turn with
    /// PyTorch in every repeat (an A/B in one run).
    pub conv: Vec<ConvAlgorithm>,
    /// PyTorch: a Python with torch and the path of `torch_step.py`; `None` skips it.
    pub torch: Option<(PathBuf, PathBuf)>,
}

/// `n` MNIST-shaped examples of random pixels and labels.
pub(crate) fn random_data(n: usize, seed: u64) -> Dataset {
    let mut rng = derive_rng(seed, &[]);
    Dataset {
        rows: 28,
        cols: 28,
        images: (0..n * 784).map(|_| rng.random::<u8>()).collect(),
        labels: (0..n).map(|_| rng.random_range(0..10u8)).collect(),
        num_classes: 10,
    }
}

/// Samples/s of `workers` models training side by side, each with `threads` GEMM threads.
pub fn measure(
    kind: ModelKind,
    backend: BackendKind,
    conv: ConvAlgorithm,
    batch: usize,
    threads: usize,
    workers: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let data = random_data(batch * 8, 1);
    let config = TrainConfig::sgd(1, batch as u32, 0.01);
    // Calibrate on one model: steps that take about `seconds`.
    let mut t = Trainer::new(kind, 10, backend)?;
    t.set_threads(if threads > 1 { Threads::Rayon(threads) } else { Threads::One });
    t.set_conv_algorithm(conv);
    let start = t.initial_params(0);
    let idx: Vec<usize> = (0..batch).collect();
    let mut rng = derive_rng(2, &[]);
    let mut step = |t: &mut Trainer, n: usize| -> anyhow::Result<()> {
        let many: Vec<usize> = idx.iter().copied().cycle().take(batch * n).collect();
        t.train(&start, &data, &many, &config, &mut rng)?;
        Ok(())
    };
    step(&mut t, 3)?;
    let t0 = Instant::now();
    step(&mut t, 5)?;
    let per = t0.elapsed().as_secs_f64() / 5.0;
    let n = ((seconds / per) as usize).clamp(5, 100_000);
    let elapsed = if workers <= 1 {
        let started = Instant::now();
        step(&mut t, n)?;
        started.elapsed().as_secs_f64()
    } else {
        // The clock starts once every worker has built its model (not part of a step).
        let ready = std::sync::Barrier::new(workers + 1);
        std::thread::scope(|s| -> anyhow::Result<f64> {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (data, start, config, ready) = (&data, &start, &config, &ready);
                    s.spawn(move || -> anyhow::Result<()> {
                        let trainer = Trainer::new(kind, 10, backend).map(|mut t| {
                            t.set_conv_algorithm(conv);
                            t
                        });
                        ready.wait();
                        let many: Vec<usize> = (0..batch).cycle().take(batch * n).collect();
                        trainer?.train(start, data, &many, config, &mut derive_rng(3, &[w as u64]))?;
                        Ok(())
                    })
                })
                .collect();
            ready.wait();
            let started = Instant::now();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a benchmark worker panicked"))??;
            }
            Ok(started.elapsed().as_secs_f64())
        })?
    };
    Ok((workers.max(1) * n * batch) as f64 / elapsed)
}

fn torch(
    python: &Path,
    script: &Path,
    kind: ModelKind,
    batch: usize,
    threads: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let out = Command::new(python)
        .arg(script)
        .args(["--models", &kind.to_string(), "--batches", &batch.to_string(), "--threads", &threads.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "torch_step.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))?;
    v["samples_per_s"].as_f64().ok_or_else(|| anyhow::anyhow!("no samples_per_s in {line}"))
}

/// Runs every configuration, calling `each` with each finished row.
pub fn run(config: &BenchConfig, mut each: impl FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &threads in &config.threads {
        for &kind in &config.models {
            for &batch in &config.batches {
                let convs = if config.conv.is_empty() { &[ConvAlgorithm::default()][..] } else { &config.conv };
                let mut torch_best = None::<f64>;
                // Per algorithm: (one model, workers).
                let mut fedge = vec![(0.0f64, 0.0f64); convs.len()];
                for _ in 0..config.repeat.max(1) {
                    if let Some((python, script)) = &config.torch {
                        let t = torch(python, script, kind, batch, threads, config.seconds)?;
                        torch_best = Some(torch_best.map_or(t, |b| b.max(t)));
                    }
                    for (&conv, (one, workers)) in convs.iter().zip(&mut fedge) {
                        *one = one.max(measure(kind, config.backend, conv, batch, threads, 1, config.seconds)?);
                        if threads > 1 {
                            *workers =
                                workers.max(measure(kind, config.backend, conv, batch, 1, threads, config.seconds)?);
                        }
                    }
                }
                for (&conv, &(one, workers)) in convs.iter().zip(&fedge) {
                    let row = Row {
                        model: kind.to_string(),
                        batch,
                        threads,
                        torch: torch_best,
                        fedge: one,
                        fedge_workers: if threads <= 1 { one } else { workers },
                        backend: config.backend.to_string(),
                        conv: format!("{conv:?}"),
                    };
                    each(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}

/// Where PyTorch is, by default: the venv `../shared/bench/setup-torch.sh` makes and the script
/// beside it, if both exist.
pub fn default_torch() -> Option<(PathBuf, PathBuf)> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let python = cache.join("fedge-torch/bin/python");
    let script = PathBuf::from("../shared/bench/torch_step.py");
    (python.exists() && script.exists()).then_some((python, script))
}
