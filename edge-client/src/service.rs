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

use crate::EdgeTrainer;
use crate::client::{DeviceStatus, EdgeClient};
use crate::config::EdgeConfig;
use crate::transport::{DeviceTls, Link};

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
}

fn save_status(dir: &std::path::Path, status: &DeviceStatus) {
    let _ = std::fs::create_dir_all(dir);
    let v = serde_json::json!({
        "model_version": status.model_version,
        "model_hash": status.model_hash.map(|h| h.to_string()),
        "last_round": status.last_round,
        "results_acknowledged": status.acked,
        "deployed_version": status.deployed_version,
        "deploy_error": status.deploy_error,
    });
    let tmp = dir.join("status.json.tmp");
    if std::fs::write(&tmp, format!("{v:#}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("status.json"));
    }
}

/// Runs the device described by `c` until `shutdown` completes: connect, train when assigned,
/// reconnect with exponential backoff and jitter when the link drops.
pub async fn run(c: EdgeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let dataset: DatasetName = c.dataset.parse().map_err(ServiceError::Config)?;
    let model: ModelKind = c.model.parse().map_err(ServiceError::Config)?;
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
    let mut trainer = Some(EdgeTrainer::new(model, data.train.num_classes, backend)?);
    let train = std::sync::Arc::new(data.train);
    let mut client: Option<EdgeClient> = None;
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let link = Link::connect(c.coordinator, &c.server_name, &tls).await?;
            let welcome = link.hello(caps.clone()).await?;
            Ok::<_, crate::transport::ConnectError>((link, welcome))
        };
        match attempt.await {
            Ok((link, welcome)) => {
                failures = 0;
                println!(
                    "connected as {} ({n} local examples); coordinator at model v{}",
                    welcome.device_id, welcome.model_version
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
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis((base * jitter) as u64)) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}
