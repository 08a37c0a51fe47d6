//! The device as a service: load local data, connect with the device certificate, work, and
//! reconnect with backoff when the link drops. Status goes to `state_dir/status.json`, the
//! current model to `state_dir/model.bin`.

use std::future::Future;
use std::time::Duration;

use fedge_core::dataset::DatasetName;
use fedge_core::partition::Partition;
use fedge_core::rng::derive_rng;
use fedge_core::wire::Capabilities;
use fedge_learn::{BackendKind, ModelKind};
use rand::RngExt;

use std::sync::Arc;

use crate::EdgeTrainer;
use crate::cloud::{Cloud, CloudTarget};
use crate::config::EdgeConfig;
use crate::hybrid::{CalibrationSet, HybridPredictor};
use crate::link::{DeviceTls, Link};
use crate::work_loop::{DeviceStatus, EdgeClient};

/// Why the device service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A configuration value is out of range or names something that does not exist.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The local dataset could not be loaded.
    #[error("failed to load the local dataset: {0}")]
    Data(#[from] fedge_core::dataset::DatasetError),
    /// The local partition could not be made.
    #[error(transparent)]
    Partition(#[from] fedge_core::partition::PartitionError),
    /// The training backend is not available.
    #[error(transparent)]
    Backend(#[from] fedge_learn::BackendError),
    /// The model public key cannot be read.
    #[error(transparent)]
    ModelKey(#[from] fedge_net::SignatureError),
    /// The local model cannot answer.
    #[error(transparent)]
    Predict(#[from] crate::predict::PredictError),
}

/// The hybrid predictor the device described by `c` runs: its deployed model (verified with
/// `model_key`), calibrated on `c.inference.calibration_examples` held-out images of its
/// dataset's test split, escalating to its coordinator over an inference session. Call within
/// a tokio runtime.
pub fn hybrid_predictor(c: &EdgeConfig) -> Result<HybridPredictor, ServiceError> {
    c.inference.validate().map_err(ServiceError::Config)?;
    let key_path = c.model_key.as_ref().ok_or_else(|| {
        ServiceError::Config("model_key is not set: deployed models cannot be verified, so none runs".into())
    })?;
    let key = fedge_net::ModelKey::read(key_path)?;
    let dataset = c.dataset.parse::<DatasetName>().and_then(DatasetName::images_only).map_err(ServiceError::Config)?;
    let test = dataset.load(&c.data_dir)?.test;
    let set = CalibrationSet::sample(&test, c.inference.calibration_examples, c.seed);
    let tls = DeviceTls { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone() };
    let target = CloudTarget { addr: c.coordinator, server_name: c.server_name.clone(), tls };
    let cloud = Cloud::connect(target, Duration::from_millis(c.inference.cloud_timeout_ms));
    HybridPredictor::new(c.inference.clone(), c.state_dir.clone(), key, set, cloud).map_err(ServiceError::Predict)
}

/// Serves local inference for the device `c` on `listen` until `shutdown` completes,
/// following newly deployed models (recalibrating each).
pub async fn serve_inference(
    c: &EdgeConfig,
    listen: std::net::SocketAddr,
    ready: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let predictor = Arc::new(hybrid_predictor(c)?);
    match predictor.calibration() {
        Some(cal) => tracing::info!(
            "inference: model v{} ({}), threshold {:.4} for {:.0}% escalation ({:.1}% on {} held-out images)",
            cal.model_version,
            c.inference.policy,
            cal.threshold,
            cal.target_rate * 100.0,
            cal.calibration_rate * 100.0,
            cal.examples
        ),
        None => tracing::info!("inference: no deployed model yet; the coordinator answers until one is"),
    }
    let watcher = predictor.watch(Duration::from_millis(500));
    let _status = AbortOnDrop(vec![keep_inference_status(c.state_dir.clone(), &predictor)]);
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServiceError::Config(format!("cannot listen on {listen}: {e}")))?;
    let bound = tcp.local_addr().map_err(|e| ServiceError::Config(format!("no local address: {e}")))?;
    ready(bound);
    tokio::select! {
        r = crate::http::serve(tcp, predictor) => {
            watcher.abort();
            r.map_err(|e| ServiceError::Config(format!("inference server on {bound}: {e}")))
        }
        _ = shutdown => {
            watcher.abort();
            Ok(())
        }
    }
}

/// Writes the inference metrics and calibration to `dir/inference-status.json` every second
/// (what `fedge-edge status` shows beside `status.json`), until aborted.
fn keep_inference_status(dir: std::path::PathBuf, predictor: &Arc<HybridPredictor>) -> tokio::task::JoinHandle<()> {
    let p = Arc::downgrade(predictor);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(p) = p.upgrade() else { return };
            let v = serde_json::json!({
                "policy": p.config().policy,
                "online": p.cloud().online(),
                "calibration": p.calibration(),
                "metrics": p.metrics().snapshot(),
            });
            let _ = std::fs::create_dir_all(&dir);
            let tmp = dir.join("inference-status.json.tmp");
            if std::fs::write(&tmp, format!("{v:#}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("inference-status.json"));
            }
        }
    })
}

fn save_status(dir: &std::path::Path, status: &DeviceStatus) {
    if let Err(e) = crate::work_loop::save_status(dir, status) {
        tracing::warn!("cannot write {}: {e}", dir.join("status.json").display());
    }
}

/// Runs the device described by `c` until `shutdown` completes: connect, train when assigned,
/// reconnect with exponential backoff and jitter when the link drops.
pub async fn run(c: EdgeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let dataset = c.dataset.parse::<DatasetName>().and_then(DatasetName::images_only).map_err(ServiceError::Config)?;
    let model = c.model.parse::<ModelKind>().and_then(ModelKind::images_only).map_err(ServiceError::Config)?;
    let backend: BackendKind = c.backend.parse()?;
    if c.shards == 0 || c.shard >= c.shards {
        return Err(ServiceError::Config(format!("shard {} must be in 0..{}", c.shard, c.shards)));
    }
    let data = dataset.load(&c.data_dir)?;
    let model_key = match &c.model_key {
        Some(path) => Some(fedge_net::ModelKey::read(path)?),
        None => None,
    };
    let parts = Partition::Iid.split(
        &data.train.labels,
        c.shards as usize,
        &mut derive_rng(c.seed, &[fedge_core::rng::stream::PARTITION]),
    )?;
    let indices = parts[c.shard as usize].clone();
    let n = indices.len();
    let tls = DeviceTls { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone() };
    let caps = Capabilities {
        backend: backend.to_string(),
        memory_mb: c.memory_mb,
        charging: true,
        unmetered: true,
        num_samples: n as u64,
    };
    // The local inference server, when asked for, beside the training loop.
    let _inference = match c.inference.listen {
        Some(listen) => {
            let c = c.clone();
            let predictor = Arc::new(hybrid_predictor(&c)?);
            let tcp = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| ServiceError::Config(format!("cannot listen on {listen}: {e}")))?;
            tracing::info!("local inference on http://{listen} ({} policy)", c.inference.policy);
            let watcher = predictor.watch(Duration::from_millis(500));
            let status = keep_inference_status(c.state_dir.clone(), &predictor);
            Some(AbortOnDrop(vec![
                watcher,
                status,
                tokio::spawn(async move {
                    if let Err(e) = crate::http::serve(tcp, predictor).await {
                        tracing::error!("inference server stopped: {e}");
                    }
                }),
            ]))
        }
        None => None,
    };
    let mut trainer = Some(EdgeTrainer::new(model, data.train.num_classes, backend)?);
    // One trainer on the device: its steps may use every core.
    if let Some(t) = &mut trainer {
        t.learner().set_threads(fedge_learn::Threads::Rayon(0));
    }
    let train = std::sync::Arc::new(data.train);
    let mut client: Option<EdgeClient> = None;
    let mut failures = 0u32;
    loop {
        let setback;
        let attempt = async {
            let link = Link::connect(c.coordinator, &c.server_name, &tls).await?;
            let welcome = link.hello(caps.clone()).await?;
            Ok::<_, crate::link::ConnectError>((link, welcome))
        };
        match attempt.await {
            Ok((link, welcome)) => {
                failures = 0;
                tracing::info!(
                    "connected as {} ({n} local examples); coordinator at model v{}",
                    welcome.device_id,
                    welcome.model_version
                );
                let cl = match client.as_mut() {
                    Some(cl) => {
                        cl.reconnect(link);
                        cl
                    }
                    None => {
                        let cl = EdgeClient::new(
                            link,
                            trainer.take().expect("first connection"),
                            train.clone(),
                            indices.clone(),
                            c.seed,
                        )
                        .with_state_dir(c.state_dir.clone());
                        let cl = match model_key.clone() {
                            Some(key) => cl.with_model_key(key),
                            None => cl,
                        };
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
                    _ = &mut shutdown => {
                        saver.abort();
                        save_status(&c.state_dir, &status.lock().unwrap_or_else(|p| p.into_inner()).clone());
                        return Ok(());
                    }
                };
                saver.abort();
                save_status(&c.state_dir, &status.lock().unwrap_or_else(|p| p.into_inner()).clone());
                setback = match outcome {
                    Err(e) => {
                        tracing::warn!("disconnected: {e}");
                        let setback = Setback::of(&e.to_string());
                        if setback == Setback::CertificateRefused {
                            failures = 1;
                        }
                        setback
                    }
                    Ok(()) => Setback::Network,
                };
            }
            Err(e) => {
                failures += 1;
                setback = Setback::of(&e.to_string());
                match setback {
                    Setback::CertificateRefused => tracing::error!("the coordinator refused this device: {e}"),
                    Setback::Network => tracing::warn!("cannot reach the coordinator: {e}"),
                }
            }
        }
        // Exponential backoff with jitter (+-25%): see `retry_delay`.
        let base = retry_delay(failures, setback).as_millis() as f64;
        let jitter: f64 = rand::rng().random_range(0.75..1.25);
        let wait = Duration::from_millis((base * jitter) as u64);
        if setback == Setback::CertificateRefused {
            tracing::info!("next attempt in {} s (a certificate refusal needs an operator)", wait.as_secs());
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// What the last connection attempt ran into, which sets how long to wait before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setback {
    /// The network or the coordinator was away: try again soon.
    Network,
    /// The coordinator refused this device's certificate (revoked, expired, unknown CA): only
    /// an operator can change that, so try again rarely.
    CertificateRefused,
}

impl Setback {
    /// The setback an error (as [`fedge_net::frame::explain`] words it) says.
    pub fn of(error: &str) -> Self {
        if error.contains("refused this certificate") || error.contains("closed by the peer: certificate") {
            Self::CertificateRefused
        } else {
            Self::Network
        }
    }
}

/// The wait (before jitter) after `failures` failed attempts in a row (at least 1) that ended
/// with `setback`: 100 ms doubling to 10 s after a network error; 30 s doubling to 10 min
/// after a certificate refusal.
pub fn retry_delay(failures: u32, setback: Setback) -> Duration {
    let n = failures.saturating_sub(1);
    match setback {
        Setback::Network => Duration::from_millis((100u64 << n.min(7)).min(10_000)),
        Setback::CertificateRefused => Duration::from_secs((30u64 << n.min(5)).min(600)),
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_refusal_waits_longer_than_a_network_error() {
        let refused = "cannot connect to 127.0.0.1:1: the peer refused this certificate: revoked";
        let revoked = "stream closed: closed by the peer: certificate revoked";
        assert_eq!(Setback::of(refused), Setback::CertificateRefused);
        assert_eq!(Setback::of(revoked), Setback::CertificateRefused);
        assert_eq!(Setback::of("stream closed: connection lost: timed out"), Setback::Network);
        for failures in 1..20 {
            let cert = retry_delay(failures, Setback::CertificateRefused);
            let net = retry_delay(failures, Setback::Network);
            assert!(cert > net, "after {failures} failures: {cert:?} vs {net:?}");
            assert!(cert >= Duration::from_secs(30) && cert <= Duration::from_secs(600), "{cert:?}");
            assert!(net <= Duration::from_secs(10), "{net:?}");
        }
        // Even the longest network wait (with +25% jitter) is shorter than the first wait
        // after a refusal (with -25%).
        assert!(
            retry_delay(100, Setback::Network).mul_f64(1.25)
                < retry_delay(1, Setback::CertificateRefused).mul_f64(0.75)
        );
        assert_eq!(retry_delay(1, Setback::Network), Duration::from_millis(100));
        assert_eq!(retry_delay(100, Setback::CertificateRefused), Duration::from_secs(600));
    }
}
