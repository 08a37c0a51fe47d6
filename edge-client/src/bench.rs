//! `fedge-edge bench-inference`: what hybrid inference costs and buys on this device.
//!
//! - Local latency of the deployed model, single images, on a pool of `threads` threads (one
//!   by default: the target is p50 <= 1 ms, p99 <= 3 ms on one core).
//! - Over the device's real session to the coordinator: a bare round trip (`Ping`, the
//!   baseline measured in the same run) and an escalation (`InferRequest`, the teacher's answer,
//!   batch window included), one at a time and `concurrency` at a time.
//! - On held-out test images: local-only, cloud-only (answers from the coordinator's teacher
//!   over the network) and the cascade at each target rate, calibrated on even images and
//!   measured on odd ones, with the share of cloud calls saved (confidence as the device's
//!   `[inference] confidence` reads it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::escalation::{Observation, PolicyRow, policy_table};
use fedge_core::wire::ErrorCode;
use serde::Serialize;

use crate::cloud::{Cloud, CloudError, CloudTarget};
use crate::config::EdgeConfig;
use crate::link::DeviceTls;
use crate::predict::{COLS, LocalModel, ROWS};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Test images for latency and accuracy.
    pub images: usize,
    /// Threads for local inference.
    pub threads: usize,
    /// Requests in flight for the concurrent escalation row.
    pub concurrency: usize,
    /// The cascade's target escalation rates.
    pub rates: Vec<f64>,
    /// Skip the coordinator (local latency only).
    pub local_only: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { images: 2000, threads: 1, concurrency: 16, rates: vec![0.05, 0.1, 0.2], local_only: false }
    }
}

/// Latency of one path.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// What was timed.
    pub path: String,
    /// Requests timed.
    pub n: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Mean, milliseconds.
    pub mean_ms: f64,
    /// Median over the baseline's median (the bare round trip; none without a coordinator).
    pub vs_baseline: Option<f64>,
    /// Requests per second (the concurrent row).
    pub per_second: Option<f64>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The local model's registry version.
    pub model_version: u64,
    /// Its architecture.
    pub architecture: String,
    /// Threads of local inference.
    pub threads: usize,
    /// Latency rows; the baseline is `round trip (ping)`.
    pub latency: Vec<LatencyRow>,
    /// Policies on held-out images (empty without a coordinator).
    pub policies: Vec<PolicyRow>,
    /// Requests the coordinator turned away for the rate limit (and that were retried).
    pub rate_limited: u64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The configuration is unusable.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] fedge_core::dataset::DatasetError),
    /// The local model could not be loaded or run.
    #[error(transparent)]
    Predict(#[from] crate::predict::PredictError),
    /// The model key is unreadable.
    #[error(transparent)]
    ModelKey(#[from] fedge_net::SignatureError),
    /// The coordinator failed.
    #[error("coordinator: {0}")]
    Cloud(#[from] CloudError),
}

fn summarise(path: &str, mut ms: Vec<f64>, baseline: Option<f64>) -> LatencyRow {
    ms.sort_by(f64::total_cmp);
    let pct = |q: f64| ms.get(((ms.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN);
    let p50 = pct(0.5);
    LatencyRow {
        path: path.into(),
        n: ms.len(),
        p50_ms: p50,
        p99_ms: pct(0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        vs_baseline: baseline.map(|b| p50 / b),
        per_second: None,
    }
}

/// Asks the cloud, waiting out rate limits; counts them.
async fn ask_patiently(
    cloud: &Cloud,
    pixels: &[u8],
    limited: &std::sync::atomic::AtomicU64,
) -> Result<(u32, Duration), CloudError> {
    loop {
        let t = Instant::now();
        match cloud.ask(pixels, ROWS, COLS).await {
            Ok(a) => return Ok((a.class, t.elapsed())),
            Err(CloudError::Refused { code: ErrorCode::RateLimited, .. }) => {
                limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the benchmark for the device `config` describes (its state folder's deployed model,
/// its dataset's test split, its coordinator).
pub async fn run(config: &EdgeConfig, opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let key_path = config.model_key.as_ref().ok_or_else(|| BenchError::Config("model_key is not set".into()))?;
    let key = fedge_net::ModelKey::read(key_path)?;
    let dataset = config
        .dataset
        .parse::<fedge_core::dataset::DatasetName>()
        .and_then(fedge_core::dataset::DatasetName::images_only)
        .map_err(BenchError::Config)?;
    let test = Arc::new(dataset.load(&config.data_dir)?.test);
    let model = Arc::new(LocalModel::load(&config.state_dir, &key)?);
    let n = opts.images.min(test.len()).max(2);
    let mut order: Vec<usize> = (0..test.len()).collect();
    {
        use rand::seq::SliceRandom;
        order.shuffle(&mut fedge_core::rng::derive_rng(config.seed, &[0xbe4c]));
        order.truncate(n);
    }

    // Local latency on `threads` threads, and every image's local probabilities.
    let threads = opts.threads.max(1);
    let local = {
        let (model, test, order) = (model.clone(), test.clone(), order.clone());
        tokio::task::spawn_blocking(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| BenchError::Config(format!("cannot make a {threads}-thread pool: {e}")))?;
            pool.install(|| {
                for &i in order.iter().take(50) {
                    model.classify(test.image(i))?;
                }
                let mut ms = Vec::with_capacity(order.len());
                let mut probs = Vec::with_capacity(order.len());
                for &i in &order {
                    let t = Instant::now();
                    let p = model.classify(test.image(i))?;
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                    probs.push(p);
                }
                Ok::<_, BenchError>((ms, probs))
            })
        })
        .await
        .map_err(|e| BenchError::Config(format!("local benchmark failed: {e}")))??
    };
    let (local_ms, local_probs) = local;
    let mut report = BenchReport {
        model_version: model.version(),
        architecture: model.architecture().to_string(),
        threads,
        latency: Vec::new(),
        policies: Vec::new(),
        rate_limited: 0,
    };
    if opts.local_only {
        report.latency.push(summarise(&format!("local {} ({threads} thread)", report.architecture), local_ms, None));
        return Ok(report);
    }

    let tls = DeviceTls { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone() };
    let target = CloudTarget { addr: config.coordinator, server_name: config.server_name.clone(), tls };
    let cloud = Arc::new(Cloud::connect(target, Duration::from_secs(10)));
    if !cloud.wait_online(Duration::from_secs(10)).await {
        return Err(BenchError::Cloud(CloudError::Offline));
    }
    let limited = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rounds = n.min(500);
    for _ in 0..50 {
        cloud.ping().await?;
    }
    let mut ping_ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ping_ms.push(cloud.ping().await?.as_secs_f64() * 1e3);
    }
    let baseline = summarise("round trip (ping), baseline", ping_ms, None);
    let b = baseline.p50_ms;
    report.latency.push(LatencyRow { vs_baseline: Some(1.0), ..baseline });
    report.latency.push(summarise(&format!("local {} ({threads} thread)", report.architecture), local_ms, Some(b)));
    let mut one_ms = Vec::with_capacity(rounds);
    for &i in order.iter().take(rounds) {
        one_ms.push(ask_patiently(&cloud, test.image(i), &limited).await?.1.as_secs_f64() * 1e3);
    }
    report.latency.push(summarise("escalation, one at a time", one_ms, Some(b)));

    // Every image to the cloud, `concurrency` at a time: the concurrent latency row and the
    // cloud's answers for the policy table.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let (cloud, test, order, next, limited) =
            (cloud.clone(), test.clone(), order.clone(), next.clone(), limited.clone());
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(k) else { return Ok::<_, CloudError>(got) };
                let (class, took) = ask_patiently(&cloud, test.image(i), &limited).await?;
                got.push((k, class as usize, took.as_secs_f64() * 1e3));
            }
        }));
    }
    let mut cloud_class = vec![0usize; order.len()];
    let mut conc_ms = Vec::with_capacity(order.len());
    for w in workers {
        for (k, class, ms) in w.await.map_err(|e| BenchError::Config(format!("a request task failed: {e}")))?? {
            cloud_class[k] = class;
            conc_ms.push(ms);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut row = summarise(&format!("escalation, {} in flight", opts.concurrency.max(1)), conc_ms, Some(b));
    row.per_second = Some(order.len() as f64 / elapsed);
    report.latency.push(row);

    let measure = config.inference.confidence;
    let (mut calibration, mut eval) = (Vec::new(), Vec::new());
    for (k, &i) in order.iter().enumerate() {
        let p = &local_probs[k];
        let score = measure.score(&p.probabilities);
        if k % 2 == 0 {
            calibration.push(score);
        } else {
            eval.push(Observation { score, local: p.class, cloud: cloud_class[k], label: test.labels[i] as usize });
        }
    }
    report.policies = policy_table(&calibration, &eval, &opts.rates).map_err(|e| BenchError::Config(e.to_string()))?;
    report.rate_limited = limited.load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}

/// `report` as text tables.
pub fn format_report(report: &BenchReport) -> String {
    let mut out = format!(
        "model v{} ({}), local inference on {} thread(s)\n{:<34} {:>6} {:>9} {:>9} {:>9} {:>11} {:>9}\n",
        report.model_version,
        report.architecture,
        report.threads,
        "path",
        "n",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "p50 / ping",
        "req/s"
    );
    for r in &report.latency {
        out += &format!(
            "{:<34} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>11} {:>9}\n",
            r.path,
            r.n,
            r.p50_ms,
            r.p99_ms,
            r.mean_ms,
            r.vs_baseline.map_or("-".into(), |v| format!("{v:.2}x")),
            r.per_second.map_or("-".into(), |v| format!("{v:.0}"))
        );
    }
    if !report.policies.is_empty() {
        out += "\n";
        out += &fedge_core::escalation::format_table(&report.policies);
        if report.rate_limited > 0 {
            out += &format!("({} requests waited out the coordinator's rate limit)\n", report.rate_limited);
        }
    }
    out
}
