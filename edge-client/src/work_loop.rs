//! The device's work loop over a [`Link`]: ask for a task, fetch and verify the model it names,
//! train on local data, upload the result; when idle, keep the current model.
//!
//! Training runs on a blocking thread so the connection stays responsive.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::dataset::Dataset;
use fedge_core::params::ContentHash;
use fedge_core::registry::Promotion;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::{DeviceId, ErrorCode, Message};
use thiserror::Error;

use crate::deploy::{DeployError, Deployed};
use crate::download::DownloadError;
use crate::link::{ConnectError, Link};
use crate::trainer::{EdgeTrainer, TrainError};
use fedge_net::ModelKey;

/// Why the loop stopped.
#[derive(Debug, Error)]
pub enum WorkLoopError {
    /// The connection failed or closed.
    #[error(transparent)]
    Link(#[from] ConnectError),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The model could not be downloaded or failed verification.
    #[error(transparent)]
    Download(#[from] DownloadError),
}

/// What the device holds, for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceStatus {
    /// Model version held.
    pub model_version: Option<u64>,
    /// Its hash.
    pub model_hash: Option<ContentHash>,
    /// Last round trained in.
    pub last_round: Option<u64>,
    /// Results acknowledged.
    pub acked: u64,
    /// Model bytes downloaded.
    pub bytes_downloaded: u64,
    /// Downloads that continued from bytes already on disk.
    pub downloads_resumed: u64,
    /// The deployed (inference) model version running, verified.
    pub deployed_version: Option<u64>,
    /// Why the last promoted version offered was refused, if it was.
    pub deploy_error: Option<String>,
}

/// A device: its link, its trainer, its data.
pub struct EdgeClient {
    link: Link,
    trainer: Option<EdgeTrainer>,
    data: Arc<Dataset>,
    indices: Arc<Vec<usize>>,
    model: Option<(u64, Arc<ModelParams>)>,
    seed: u64,
    status: Arc<Mutex<DeviceStatus>>,
    state_dir: Option<PathBuf>,
    /// A result sent but not acknowledged when the link broke: sent again first thing after a
    /// reconnect (the coordinator keeps the first copy; a second is a harmless duplicate).
    unacked: Option<Message>,
    /// The fleet's model-signing public key.
    model_key: Option<ModelKey>,
    /// The verified deployed model.
    deployed: Option<Arc<Deployed>>,
    /// A promotion already refused on this connection, by number (not retried until a
    /// reconnect).
    refused: Option<u64>,
    /// The last promotion followed (verified), kept in the deploy folder.
    followed: Option<Promotion>,
}

/// Writes `params` as `dir/model.bin` (write-then-rename: a crash leaves the previous model,
/// never half of one).
pub fn save_model(dir: &Path, version: u64, params: &ModelParams) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = codec::encode(&Message::Model { version, hash: params.content_hash(), params: params.clone() });
    let tmp = dir.join("model.bin.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join("model.bin"))
}

/// Writes `status` as `dir/status.json` (what `fedge-edge status` shows): to a temporary
/// file, synced, then renamed into place, so a crash leaves the previous status whole.
pub fn save_status(dir: &Path, status: &DeviceStatus) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let v = serde_json::json!({
        "model_version": status.model_version,
        "model_hash": status.model_hash.map(|h| h.to_string()),
        "last_round": status.last_round,
        "results_acknowledged": status.acked,
        "deployed_version": status.deployed_version,
        "deploy_error": status.deploy_error,
    });
    let tmp = dir.join("status.json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(format!("{v:#}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join("status.json"))
}

/// The acknowledged-results count and last round kept in `dir/status.json` by an earlier run
/// (zero and none if there is no readable file).
pub fn load_acknowledged(dir: &Path) -> (u64, Option<u64>) {
    let Some(v) =
        std::fs::read(dir.join("status.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return (0, None);
    };
    (v["results_acknowledged"].as_u64().unwrap_or(0), v["last_round"].as_u64())
}

/// Reads `dir/model.bin` if present and intact (hash checked).
pub fn load_model(dir: &Path) -> Option<(u64, ModelParams)> {
    let bytes = std::fs::read(dir.join("model.bin")).ok()?;
    match codec::decode(&bytes).ok()? {
        Message::Model { version, hash, params } if params.content_hash() == hash => Some((version, params)),
        _ => None,
    }
}

/// How long to wait before sending a result again after the `attempt`-th (from 0)
/// `Unavailable`: 200 ms doubling to 5 s. The round's deadline bounds the retries: after it
/// the coordinator answers `StaleModel` and the result is dropped.
pub fn upload_retry_delay(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5_000))
}

impl EdgeClient {
    /// A client over an open `link` training on examples `indices` of `data`.
    pub fn new(link: Link, trainer: EdgeTrainer, data: Arc<Dataset>, indices: Vec<usize>, seed: u64) -> Self {
        Self {
            link,
            trainer: Some(trainer),
            data,
            indices: Arc::new(indices),
            model: None,
            seed,
            status: Arc::default(),
            state_dir: None,
            unacked: None,
            model_key: None,
            deployed: None,
            refused: None,
            followed: None,
        }
    }

    /// Verifies deployed models with `key` (the fleet's `model-signing.pub`); without a key no
    /// deployed model is ever used. Loads the installed one from the state folder, if any.
    pub fn with_model_key(mut self, key: ModelKey) -> Self {
        self.model_key = Some(key);
        self.load_deployed();
        self
    }

    fn deploy_dir(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join("deployed"))
    }

    fn load_deployed(&mut self) {
        let (Some(dir), Some(key)) = (self.deploy_dir(), &self.model_key) else { return };
        self.followed = crate::deploy::load_promotion(&dir, key);
        if let Some(c) = crate::deploy::load_current(&dir, key) {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.deployed_version = Some(c.deployed.record.version);
            st.deploy_error = c.fallback;
            self.deployed = Some(Arc::new(c.deployed));
        }
    }

    /// The verified deployed model, if any.
    pub fn deployed(&self) -> Option<Arc<Deployed>> {
        self.deployed.clone()
    }

    /// Follows promotion `p` (signed, and numbered higher than the last one followed) to its
    /// version if that verifies; otherwise says why and keeps running what it had.
    async fn follow_promotion(&mut self, p: Promotion) -> Result<(), WorkLoopError> {
        let v = p.version;
        let running = self.deployed.as_ref().is_some_and(|d| d.record.version == v);
        if self.refused == Some(p.sequence) || (running && self.followed.as_ref() == Some(&p)) {
            return Ok(());
        }
        let result = match &self.model_key {
            None => Err(DeployError::NoKey),
            Some(key) => match crate::deploy::check_promotion(&p, self.followed.as_ref(), key) {
                Err(e) => Err(e),
                Ok(()) if running => Ok(None),
                Ok(()) => crate::deploy::fetch(&self.link, v, key, self.deploy_dir().as_deref()).await.map(Some),
            },
        };
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(fetched) => {
                if let Some(dir) = self.deploy_dir()
                    && let Err(e) = crate::deploy::save_promotion(&dir, &p)
                {
                    tracing::warn!("cannot keep promotion #{} on disk: {e}", p.sequence);
                }
                self.followed = Some(p);
                st.deploy_error = None;
                if let Some(d) = fetched {
                    st.deployed_version = Some(v);
                    self.deployed = Some(Arc::new(d));
                    tracing::info!("now running deployed model v{v}");
                }
            }
            Err(DeployError::Link(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("refused deployed model v{v}: {e}; still running {:?}", st.deployed_version);
                st.deploy_error = Some(format!("v{v}: {e}"));
                self.refused = Some(p.sequence);
            }
        }
        Ok(())
    }

    /// Keeps every verified model in `dir/model.bin` and starts from the one there, if any;
    /// keeps the count of acknowledged results in `dir/status.json` (written on every
    /// acknowledgement) and continues it.
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        if let Some((version, params)) = load_model(&dir) {
            self.set_model(version, params);
        }
        let (acked, last_round) = load_acknowledged(&dir);
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.acked = acked;
            st.last_round = last_round;
        }
        self.state_dir = Some(dir);
        self.load_deployed();
        self
    }

    /// A handle on the device's status, updated as it works.
    pub fn status(&self) -> Arc<Mutex<DeviceStatus>> {
        self.status.clone()
    }

    async fn request(&self, msg: &Message) -> Result<Message, WorkLoopError> {
        Ok(self.link.request(msg).await?)
    }

    /// The global model `version`, held or fetched. With `expected` (a task's hash), the model
    /// held is kept only if its content hash is that one, not merely its version number (a
    /// coordinator restored from an old backup could name other content by the same number),
    /// and a fetched model must have it.
    async fn ensure_model(
        &mut self,
        version: u64,
        expected: Option<ContentHash>,
    ) -> Result<Arc<ModelParams>, WorkLoopError> {
        let held_hash = self.status.lock().unwrap_or_else(|p| p.into_inner()).model_hash;
        if let Some((v, p)) = &self.model
            && *v == version
            && expected.is_none_or(|h| held_hash == Some(h))
        {
            return Ok(p.clone());
        }
        let d = crate::download::fetch_model(&self.link, version, self.state_dir.as_deref()).await?;
        if let Some(expected) = expected
            && d.hash != expected
        {
            return Err(
                DownloadError::BadModel { version, expected: expected.to_string(), got: d.hash.to_string() }.into()
            );
        }
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.bytes_downloaded += d.fetched;
            st.downloads_resumed += u64::from(d.resumed_from > 0);
        }
        if let (Some(dir), Some(file)) = (&self.state_dir, &d.file)
            && let Err(e) = std::fs::rename(file, dir.join("model.bin"))
        {
            tracing::warn!("cannot keep model v{version} on disk: {e}");
        }
        let params = Arc::new(d.params);
        self.model = Some((version, params.clone()));
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.model_version = Some(version);
        st.model_hash = Some(d.hash);
        Ok(params)
    }

    /// Replaces a broken link with a new one, keeping the model held.
    pub fn reconnect(&mut self, link: Link) {
        self.link = link;
        self.refused = None;
    }

    /// The model held, if any.
    pub fn model(&self) -> Option<(u64, Arc<ModelParams>)> {
        self.model.clone()
    }

    /// Starts from a model held from before (e.g. read from disk), after checking its hash.
    pub fn set_model(&mut self, version: u64, params: ModelParams) {
        let hash = params.content_hash();
        self.model = Some((version, Arc::new(params)));
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.model_version = Some(version);
        st.model_hash = Some(hash);
    }

    /// Uploads the unacknowledged result, keeping it if the link fails again. While the
    /// coordinator answers `Unavailable` (it could not make the update durable; nothing was
    /// recorded) the result is sent again after a back-off ([`upload_retry_delay`]), until it
    /// is acknowledged or refused for good (the round closed: `StaleModel`).
    async fn upload(&mut self) -> Result<(), WorkLoopError> {
        let Some(msg) = self.unacked.as_ref() else { return Ok(()) };
        let round = match msg {
            Message::TrainResult(r) => r.round,
            _ => 0,
        };
        let mut attempt = 0u32;
        loop {
            match self.link.request(msg).await? {
                // A duplicate means the coordinator already holds this result (its ack was lost).
                Message::Ack { .. } | Message::Error { code: ErrorCode::Duplicate, .. } => self.record_round(round),
                Message::Error { code: ErrorCode::Unavailable, message } => {
                    let delay = upload_retry_delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!("round {round}: result not stored yet ({message}); sending it again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                // Not retryable: a stale round, an update refused as invalid.
                Message::Error { code, message } => {
                    tracing::warn!("round {round}: result refused ({code:?}): {message}")
                }
                _ => return Err(ConnectError::Unexpected.into()),
            }
            break;
        }
        self.unacked = None;
        Ok(())
    }

    /// Round `round` took this device's update (acknowledged, or in the secure sum): the status
    /// says so, on disk too.
    fn record_round(&self, round: u64) {
        let status = {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.last_round = Some(round);
            st.acked += 1;
            st.clone()
        };
        if let Some(dir) = &self.state_dir
            && let Err(e) = save_status(dir, &status)
        {
            tracing::warn!("cannot record round {round} in {}: {e}", dir.display());
        }
    }

    /// Records how the device's part in round `round`'s secure sum ended.
    fn secure_entered(&self, round: u64, outcome: &crate::secure::SecureOutcome) {
        use crate::secure::SecureOutcome;
        match outcome {
            SecureOutcome::Summed => self.record_round(round),
            SecureOutcome::NotSummed => tracing::warn!("round {round}: this device's update is not in the secure sum"),
            SecureOutcome::Refused(why) => tracing::warn!("round {round}: secure aggregation refused: {why}"),
        }
    }

    /// Works until the connection closes (then returns the link error) or a model fails
    /// verification. Call again after [`Self::reconnect`]; a result whose upload was cut off
    /// is sent again first.
    pub async fn run(&mut self, device: DeviceId) -> Result<(), WorkLoopError> {
        self.upload().await?;
        loop {
            let running = self.deployed.as_ref().map(|d| d.record.version);
            match self.request(&Message::TaskRequest { running }).await? {
                Message::TrainTask(task) => {
                    let global = self.ensure_model(task.model_version, Some(task.model_hash)).await?;
                    let mut trainer = self.trainer.take().expect("trainer is home between tasks");
                    let (data, indices, seed) = (self.data.clone(), self.indices.clone(), self.seed);
                    let t = task.clone();
                    let (trainer, outcome) = tokio::task::spawn_blocking(move || {
                        let mut train_rng = derive_rng(seed, &[stream::LOCAL_TRAIN, t.round, device]);
                        // Local DP noise on a real device comes from the OS: a seed in a config file
                        // must not let anyone replay it.
                        let mut noise_rng =
                            <fedge_core::rng::SeededRng as rand::SeedableRng>::from_rng(&mut rand::rng());
                        let outcome = trainer.run_task(&t, &global, &data, &indices, &mut train_rng, &mut noise_rng);
                        (trainer, outcome)
                    })
                    .await
                    .expect("training thread panicked");
                    self.trainer = Some(trainer);
                    let outcome = outcome?;
                    if let Some(secure) = task.secure {
                        // The update goes into the round's secure sum, never out in the clear.
                        let entered = crate::secure::enter_sum(&self.link, &task, secure, &outcome.result).await?;
                        self.secure_entered(task.round, &entered);
                        continue;
                    }
                    self.unacked = Some(Message::TrainResult(outcome.result));
                    // A refused result (stale, past the deadline) is not fatal: ask again.
                    self.upload().await?;
                }
                Message::NoTask { retry_after_ms, model_version, deployed } => {
                    if self.model.as_ref().is_none_or(|(v, _)| *v != model_version) {
                        self.ensure_model(model_version, None).await?;
                    }
                    if let Some(v) = deployed {
                        self.follow_promotion(v).await?;
                    }
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(10, 5_000) as u64)).await;
                }
                Message::Error { code, message } => return Err(ConnectError::Refused { code, message }.into()),
                _ => return Err(ConnectError::Unexpected.into()),
            }
        }
    }
}
