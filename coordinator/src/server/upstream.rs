//! A regional aggregator's link to its root: hierarchical aggregation.
//!
//! A coordinator with an `[upstream]` table serves its own devices like any coordinator, and
//! takes part in its root's rounds like a device, with an `aggregator` certificate. For each
//! task the root hands it (round `r` on root version `v`) it fetches `v` and checks its hash,
//! adopts it as its own next version ([`fedge_engine::RoundEngine::adopt`]; the model and the
//! task are stored in one transaction, [`Store::adopt_upstream`], before any round starts),
//! runs one round among its devices with the task's training settings (their results checked
//! and clipped here, as any coordinator does), and uploads the aggregated version minus the
//! adopted one, with the round's total samples as its weight. The root's sample-weighted mean
//! of the regions' means is then the flat FedAvg of every device's update. A region round that
//! fails is run again while the root's task stands.
//!
//! Crash safety at this level: what a region acknowledged to its devices is in its store (as
//! in any coordinator); a restarted region resumes its stored round with the task's training
//! settings, reconnects, finds the same task (the root keeps an aggregator's task while it is
//! away, until the round's deadline) and uploads once its round is done. An upload whose
//! acknowledgement was lost is answered `Duplicate`, which counts as done.
//!
//! [`Store::adopt_upstream`]: crate::store::Store::adopt_upstream

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::params::ContentHash;
use fedge_core::wire::{
    Capabilities, ErrorCode, Hello, Message, PROTOCOL_VERSION, SessionPurpose, TrainResult, TrainTask,
};
use fedge_net::RequestClient;

use super::Coordinator;
use crate::store::{EncodedModel, UpstreamTask};

/// Where a regional aggregator's root is, and the aggregator's TLS identity.
#[derive(Clone)]
pub struct Upstream {
    /// `host:port` (a name is looked up at every connection: a root behind a Service name).
    addr: String,
    server_name: String,
    tls: quinn::ClientConfig,
    /// The fleet's model-signing key: regional models must be signed with it.
    model_key: Option<fedge_net::ModelKey>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({} as {})", self.addr, self.server_name)
    }
}

impl Upstream {
    /// The root at `addr` (`host:port` or an address), whose certificate must name
    /// `server_name`, reached with the aggregator certificate `cert`/`key` (issued by `certs
    /// issue-aggregator`), trusting `ca`.
    pub fn new(
        addr: impl ToString,
        server_name: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, fedge_net::TlsError> {
        let tls = fedge_net::client_config(ca, cert, key)?;
        Ok(Self { addr: addr.to_string(), server_name: server_name.to_string(), tls, model_key: None })
    }

    /// Takes the root's regional models (for a regional inference tier) when they are signed
    /// with `key`, the fleet's `model-signing.pub`; without a key none is taken.
    pub fn with_model_key(mut self, key: fedge_net::ModelKey) -> Self {
        self.model_key = Some(key);
        self
    }
}

/// Why a step of following the root failed (the link is opened again after a pause).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting or a request failed.
    #[error(transparent)]
    Request(#[from] fedge_net::RequestError),
    /// The root refused.
    #[error("the root refused ({code:?}): {message}")]
    Refused {
        /// Typed reason.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The root answered something else than the protocol says.
    #[error("unexpected answer from the root to {0}")]
    Unexpected(&'static str),
    /// The model the root sent is not the one its task names.
    #[error("root model v{version} failed verification: the task names {expected}, got {got}")]
    BadModel {
        /// The version.
        version: u64,
        /// The task's hash.
        expected: ContentHash,
        /// What arrived.
        got: ContentHash,
    },
    /// This coordinator cannot take the task on.
    #[error("cannot take on the root's task: {0}")]
    Refusing(String),
    /// The root's name does not resolve.
    #[error("cannot resolve the root's address {0}: {1}")]
    Resolve(String, String),
    /// The store failed: the coordinator stopped.
    #[error("the coordinator's storage failed")]
    Storage,
}

/// The root's task this region works on.
pub(super) struct Job {
    pub(super) task: UpstreamTask,
    /// The adopted model (the region round's starting point).
    base: Arc<ModelParams>,
    /// Its result was acknowledged (or refused for good) by the root.
    pub(super) uploaded: bool,
}

/// Where the job of a root task stands.
enum JobState {
    /// Not this task's job: take the task on.
    Other,
    /// The region's round is not asked for (its last attempt failed): ask again.
    NeedsRound,
    /// The region's round is asked for or running.
    Pending,
    /// The region's round aggregated into `params` (from `base`): the upload, once the delta is
    /// formed (with the state lock released: it is model-sized work).
    Ready(Box<Upload>),
    /// Uploaded already.
    Uploaded,
}

/// What a region's upload is made of.
struct Upload {
    task: UpstreamTask,
    base: Arc<ModelParams>,
    params: Arc<ModelParams>,
    version: u64,
    samples: u64,
    train_loss: f64,
}

impl Upload {
    /// The result the root is sent: the aggregated version minus the adopted one.
    fn result(&self) -> Result<TrainResult, fedge_core::params::ParamsError> {
        Ok(TrainResult {
            round: self.task.root_round,
            model_version: self.task.root_version,
            num_samples: self.samples,
            train_loss: self.train_loss as f32,
            delta: self.params.delta_from(&self.base)?,
            clipped: false,
        })
    }
}

/// How often a region asks its root for work, and looks at its own round, while waiting.
const POLL: Duration = Duration::from_millis(100);

/// How often a region with an inference tier asks its root for a newer regional model.
const REGIONAL_EVERY: Duration = Duration::from_secs(2);

/// The largest regional model blob a region takes.
const MAX_REGIONAL_BYTES: u64 = fedge_core::codec::MAX_MESSAGE_BYTES as u64;

impl Coordinator {
    /// Makes this coordinator a regional aggregator of `upstream`: it takes the root's tasks
    /// on until it is dropped (see the module documentation). Takes back the task stored by an
    /// earlier run. Operators cannot start rounds on a region: its rounds are its root's.
    pub fn follow_upstream(
        self: &Arc<Self>,
        upstream: Upstream,
    ) -> Result<tokio::task::JoinHandle<()>, super::ServerError> {
        if self.lock().rounds.engine.rounds().is_none() {
            return Err(super::ServerError::FedBuff(
                "a regional aggregator runs synchronous rounds, not FedBuff".into(),
            ));
        }
        let _ = self.region.set(());
        if let Some(store) = &self.store
            && let Some(task) = store.upstream()?
        {
            match store.model(task.base)? {
                Some(base) => {
                    tracing::info!(
                        "regional aggregator: resuming the root's round {} (root v{}, adopted as v{})",
                        task.root_round,
                        task.root_version,
                        task.base
                    );
                    self.lock().upstream = Some(Job { task, base: Arc::new(base), uploaded: false });
                }
                None => tracing::warn!("the stored root task's model v{} is gone; waiting for a new task", task.base),
            }
        }
        Ok(tokio::spawn(follow(Arc::downgrade(self), upstream)))
    }

    /// Whether this coordinator is a regional aggregator.
    pub fn is_region(&self) -> bool {
        self.region.get().is_some()
    }

    /// Where the job of root task `task` stands.
    fn job_state(&self, task: &TrainTask) -> JobState {
        let s = self.lock();
        let Some(job) = s.upstream.as_ref().filter(|j| {
            (j.task.root_round, j.task.root_version, j.task.root_hash)
                == (task.round, task.model_version, task.model_hash)
        }) else {
            return JobState::Other;
        };
        if job.uploaded {
            return JobState::Uploaded;
        }
        let Some(engine) = s.rounds.engine.rounds() else { return JobState::Other };
        let published = s.rounds.version();
        if published == job.task.base {
            let idle = engine.current_round().is_none() && engine.version() == published;
            return if idle && s.rounds.rounds_left == 0 { JobState::NeedsRound } else { JobState::Pending };
        }
        // The one round asked for since the adoption aggregated into the published version.
        let line = s.rounds.history.iter().rev().find(|l| l.model_version == published && l.failed_reason.is_none());
        let (Some(line), Some(params)) = (line, s.downloads.model(published)) else { return JobState::Pending };
        JobState::Ready(Box::new(Upload {
            task: job.task.clone(),
            base: job.base.clone(),
            params,
            version: published,
            samples: line.samples,
            train_loss: line.train_loss,
        }))
    }

    /// Takes on root task `task` with its model `params` (hash checked): adopted as the next
    /// version, durable with the task, then one round asked for with the task's settings.
    fn take_on(&self, task: &TrainTask, params: ModelParams) -> Result<(), UpstreamError> {
        let order = self.ordered();
        if self.storage_failure().is_some() {
            return Err(UpstreamError::Storage);
        }
        let (model, round, record, params) = {
            let mut s = self.lock();
            let engine = s.rounds.engine.rounds_mut().ok_or(UpstreamError::Refusing("FedBuff mode".into()))?;
            if let Some(r) = engine.current_round() {
                return Err(UpstreamError::Refusing(format!("round {r} of an earlier task is still open")));
            }
            engine.reconfigure(|c| c.train = task.config).map_err(|e| UpstreamError::Refusing(e.to_string()))?;
            let version = engine.adopt(params.clone()).map_err(|e| UpstreamError::Refusing(e.to_string()))?;
            let round = engine.last_round();
            s.rounds.rounds_left = 1;
            let record = UpstreamTask {
                root_round: task.round,
                root_version: task.model_version,
                root_hash: task.model_hash,
                base: version,
                train: task.config,
            };
            let params = Arc::new(params);
            (EncodedModel::new(version, &params), round, record, params)
        };
        if let Some(store) = &self.store
            && let Err(e) = store.adopt_upstream(&model, round, &record, 1)
        {
            self.storage_failed(format_args!("cannot record the root's task (round {})", task.round), &e);
            return Err(UpstreamError::Storage);
        }
        tracing::info!(
            "regional aggregator: root round {} on root v{} taken on as v{}",
            task.round,
            task.model_version,
            record.base
        );
        {
            let mut s = self.lock();
            s.downloads.publish(params.clone(), model);
            s.downloads.prune();
            s.rounds.publish_version(record.base);
            s.upstream = Some(Job { task: record, base: params, uploaded: false });
        }
        self.settle(&order);
        Ok(())
    }

    /// The job's result reached the root (acknowledged, or refused for good).
    fn job_uploaded(&self) {
        if let Some(job) = self.lock().upstream.as_mut() {
            job.uploaded = true;
        }
    }
}

/// Follows the root until the coordinator is gone or its storage failed: one session at a
/// time, opened again after a pause (200 ms doubling to 5 s) when it breaks.
async fn follow(me: Weak<Coordinator>, upstream: Upstream) {
    let mut attempt = 0u32;
    loop {
        match session(&me, &upstream, &mut attempt).await {
            Ok(()) => return,
            Err(e) => {
                let pause = Duration::from_millis((200u64 << attempt.min(5)).min(5_000));
                attempt = attempt.saturating_add(1);
                tracing::warn!("regional aggregator: root {}: {e}; trying again in {pause:?}", upstream.addr);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// One session with the root: Hello, then ask for work and do it. `Ok` when the coordinator
/// is gone or stopped.
async fn session(me: &Weak<Coordinator>, up: &Upstream, attempt: &mut u32) -> Result<(), UpstreamError> {
    let addr = resolve(&up.addr).await?;
    let client = Arc::new(RequestClient::connect(addr, &up.server_name, up.tls.clone()).await?);
    let capabilities =
        Capabilities { backend: "region".into(), memory_mb: 0, charging: true, unmetered: true, num_samples: 0 };
    let hello = Hello { protocol_version: PROTOCOL_VERSION, capabilities, purpose: SessionPurpose::Train };
    match client.request(&Message::Hello(hello)).await? {
        Message::Welcome(w) => tracing::info!("regional aggregator: joined root {} as {}", up.addr, w.device_id),
        Message::Error { code, message } => return Err(UpstreamError::Refused { code, message }),
        _ => return Err(UpstreamError::Unexpected("Hello")),
    }
    *attempt = 0;
    // Escalations go over this connection while the session lasts (the guard takes it back
    // when the session ends, also when its task is aborted).
    let _link = match me.upgrade() {
        Some(c) => {
            *c.upstream_link.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
            LinkGuard(me.clone())
        }
        None => return Ok(()),
    };
    let mut regional = RegionalFetch { next: tokio::time::Instant::now(), refused: None };
    let mut relayed_refused = None;
    // The root round already said to wait for an earlier region round (said once).
    let mut waiting_for = None;
    // The root task last refused (round, version).
    let mut refused_task = None;
    loop {
        let Some(c) = me.upgrade() else { return Ok(()) };
        if c.storage_failure().is_some() {
            return Ok(());
        }
        if let Some(key) = &up.model_key
            && c.tier.get().is_some()
            && tokio::time::Instant::now() >= regional.next
        {
            regional.next = tokio::time::Instant::now() + REGIONAL_EVERY;
            c.refresh_regional(&client, key, &mut regional.refused).await?;
        }
        let task = match client.request(&Message::TaskRequest { running: None }).await? {
            Message::TrainTask(task) => {
                c.heard_of_root_version(task.model_version);
                task
            }
            Message::NoTask { retry_after_ms, model_version, deployed } => {
                c.heard_of_root_version(model_version);
                if let (Some(p), Some(key)) = (deployed, &up.model_key) {
                    c.relay_promotion(&client, key, p, &mut relayed_refused).await?;
                }
                drop(c);
                tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms)).clamp(POLL, 5 * POLL)).await;
                continue;
            }
            Message::Error { code, message } => return Err(UpstreamError::Refused { code, message }),
            _ => return Err(UpstreamError::Unexpected("TaskRequest")),
        };
        match c.job_state(&task) {
            JobState::Other => {
                // A round of an earlier task still open: its deadline ends it; the model is
                // fetched only once the region can take the new task on (said once per task).
                let open = c.lock().rounds.engine.current_round();
                if let Some(r) = open {
                    if waiting_for != Some(task.round) {
                        tracing::warn!(
                            "regional aggregator: root round {} waits until this region's round {r}, of an earlier task, ends",
                            task.round
                        );
                        waiting_for = Some(task.round);
                    }
                    drop(c);
                    tokio::time::sleep(5 * POLL).await;
                    continue;
                }
                // A task this region cannot take on (a model of another layout, settings its
                // engine refuses) is refused once, not fetched again every second.
                if refused_task == Some((task.round, task.model_version)) {
                    drop(c);
                    tokio::time::sleep(10 * POLL).await;
                    continue;
                }
                let params = fetch(&client, &task).await?;
                if let Err(e) = c.take_on(&task, params) {
                    if matches!(e, UpstreamError::Storage) {
                        return Ok(());
                    }
                    tracing::warn!("regional aggregator: root round {}: {e}; not taking it on", task.round);
                    refused_task = Some((task.round, task.model_version));
                    drop(c);
                    tokio::time::sleep(10 * POLL).await;
                }
            }
            JobState::NeedsRound => c.start_rounds(1),
            JobState::Pending | JobState::Uploaded => {
                drop(c);
                tokio::time::sleep(POLL).await;
            }
            JobState::Ready(upload) => {
                drop(c);
                let result = match upload.result() {
                    Ok(r) => r,
                    Err(e) => {
                        // Cannot happen for a version made from the base; said, and the task waits.
                        tracing::error!("regional aggregator: cannot form the upload of v{}: {e}", upload.version);
                        tokio::time::sleep(10 * POLL).await;
                        continue;
                    }
                };
                let Some(c) = me.upgrade() else { return Ok(()) };
                let round = result.round;
                match client.request(&Message::TrainResult(result)).await? {
                    Message::Ack { .. } | Message::Error { code: ErrorCode::Duplicate, .. } => {
                        tracing::info!("regional aggregator: root round {round}: result acknowledged");
                        c.job_uploaded();
                    }
                    Message::Error { code: ErrorCode::Unavailable, message } => {
                        tracing::warn!("regional aggregator: root round {round}: not stored yet ({message})");
                        drop(c);
                        tokio::time::sleep(10 * POLL).await;
                    }
                    Message::Error { code, message } => {
                        tracing::warn!("regional aggregator: root round {round}: result refused ({code:?}): {message}");
                        c.job_uploaded();
                    }
                    _ => return Err(UpstreamError::Unexpected("TrainResult")),
                }
            }
        }
    }
}

/// Takes the region's root connection back from escalations when a session ends.
struct LinkGuard(Weak<Coordinator>);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.upgrade() {
            *c.upstream_link.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// When a region next asks for a regional model, and the version it refused last (not fetched
/// again).
struct RegionalFetch {
    next: tokio::time::Instant,
    refused: Option<u64>,
}

impl Coordinator {
    /// Asks the root for its newest regional model and, when it is newer than the one
    /// installed, fetches, verifies and installs it. A model that fails verification or
    /// calibration is refused (said once, `refused` remembers it); only the link's failure is
    /// an error.
    async fn refresh_regional(
        &self,
        client: &RequestClient,
        key: &fedge_net::ModelKey,
        refused: &mut Option<u64>,
    ) -> Result<(), UpstreamError> {
        let Some(tier) = self.tier.get() else { return Ok(()) };
        let record = match client.request(&Message::RegionalRequest).await? {
            Message::Deployed(r) if r.role == fedge_core::registry::ModelRole::Regional => r,
            // None registered yet.
            Message::Error { code: ErrorCode::Unavailable, .. } => return Ok(()),
            Message::Error { code, message } => return Err(UpstreamError::Refused { code, message }),
            _ => return Err(UpstreamError::Unexpected("RegionalRequest")),
        };
        let v = record.version;
        if tier.version().is_some_and(|have| have >= v) || *refused == Some(v) {
            return Ok(());
        }
        let mut refuse = |why: String| {
            tracing::warn!("regional aggregator: refused regional model v{v}: {why}");
            *refused = Some(v);
            Ok(())
        };
        if let Err(e) = key.verify(&record) {
            return refuse(e.to_string());
        }
        if record.size_bytes > MAX_REGIONAL_BYTES {
            return refuse(format!("{} bytes is more than a region takes", record.size_bytes));
        }
        let Some(blob) = fetch_blob(client, &record).await? else { return refuse("a bad blob chunk".into()) };
        let params = match fedge_net::open_blob(&record, &blob, key) {
            Ok(p) => p,
            Err(e) => return refuse(e.to_string()),
        };
        let architecture = record.architecture.clone();
        match self.install_regional(record, params).await {
            Ok(threshold) => {
                tracing::info!(
                    "regional aggregator: regional model v{v} ({architecture}) installed; escalates below confidence {threshold:.4}"
                );
                Ok(())
            }
            Err(e) => refuse(e),
        }
    }
}

/// The blob of registered `record`, fetched from the root in chunks (`None`: a chunk made no
/// sense). Checked against the record by the caller.
async fn fetch_blob(
    client: &RequestClient,
    record: &fedge_core::registry::ModelRecord,
) -> Result<Option<Vec<u8>>, UpstreamError> {
    let v = record.version;
    let mut blob = Vec::new();
    while (blob.len() as u64) < record.size_bytes {
        let offset = blob.len() as u64;
        let ask = Message::BlobChunkRequest { version: v, offset, max_len: 1 << 20 };
        match client.request(&ask).await? {
            Message::BlobChunk { version, total_len, offset: o, bytes }
                if version == v && o == offset && total_len == record.size_bytes && !bytes.is_empty() =>
            {
                blob.extend_from_slice(&bytes[..bytes.len().min((total_len - offset) as usize)]);
            }
            Message::Error { code, message } => return Err(UpstreamError::Refused { code, message }),
            _ => return Ok(None),
        }
    }
    Ok(Some(blob))
}

impl Coordinator {
    /// Relays the root's promotion `p` to this region's devices: when it is newer than the one
    /// relayed, its signature holds and its student's record and blob verify, the record, the
    /// blob and the promotion (all signed by the root) are stored in this region's registry and
    /// its `NoTask`s carry the promotion, so devices behind a region deploy the root's students
    /// as if connected to the root. A promotion that fails a check is refused once
    /// (`refused`); only the link's failure is an error.
    async fn relay_promotion(
        &self,
        client: &RequestClient,
        key: &fedge_net::ModelKey,
        p: fedge_core::registry::Promotion,
        refused: &mut Option<u64>,
    ) -> Result<(), UpstreamError> {
        let sequence = p.sequence;
        if self.lock().registry.latest.as_ref().is_some_and(|l| l.sequence >= sequence) || *refused == Some(sequence) {
            return Ok(());
        }
        let mut refuse = |why: String| {
            tracing::warn!("regional aggregator: not relaying promotion #{sequence} (v{}): {why}", p.version);
            *refused = Some(sequence);
            Ok(())
        };
        if let Err(e) = key.verify_promotion(&p) {
            return refuse(e.to_string());
        }
        let record = match client.request(&Message::DeployedRequest { version: p.version }).await? {
            Message::Deployed(r) if r.version == p.version => r,
            Message::Error { code, message } => return refuse(format!("{code:?}: {message}")),
            _ => return refuse("an unexpected answer to DeployedRequest".into()),
        };
        if record.size_bytes > MAX_REGIONAL_BYTES {
            return refuse(format!("{} bytes is more than a region takes", record.size_bytes));
        }
        let Some(blob) = fetch_blob(client, &record).await? else { return refuse("a bad blob chunk".into()) };
        if let Err(e) = fedge_net::open_blob(&record, &blob, key) {
            return refuse(e.to_string());
        }
        // Durable before devices hear of it, as the root's own registrations are.
        let blobs = self.lock().registry.blob_store.clone();
        if let Some(b) = &blobs
            && let Err(e) = b.put(blob.clone()).await
        {
            tracing::warn!("regional aggregator: cannot keep the blob of v{}: {e}", record.version);
            return Ok(());
        }
        let _order = self.ordered();
        let history = {
            let s = self.lock();
            let mut history = s.registry.promotions.clone();
            if history.last() != Some(&p.version) {
                history.push(p.version);
            }
            history
        };
        if let Some(store) = &self.store {
            let saved = store.save_registered(&record).and_then(|()| store.save_promotions(&history, &p));
            if let Err(e) = saved {
                self.storage_failed(format_args!("cannot record the root's promotion #{sequence}"), &e);
                return Err(UpstreamError::Storage);
            }
        }
        tracing::info!(
            "regional aggregator: relaying promotion #{sequence}: student v{} ({})",
            p.version,
            record.architecture
        );
        let mut s = self.lock();
        s.downloads.keep_blob(record.version, Arc::new(blob));
        s.registry.records.insert(record.version, record);
        s.registry.promotions = history;
        s.registry.latest = Some(p);
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }
}

/// The first address `host:port` names.
async fn resolve(host_port: &str) -> Result<SocketAddr, UpstreamError> {
    let mut found = tokio::net::lookup_host(host_port)
        .await
        .map_err(|e| UpstreamError::Resolve(host_port.to_string(), e.to_string()))?;
    found.next().ok_or_else(|| UpstreamError::Resolve(host_port.to_string(), "no address".into()))
}

/// The model `task` names, fetched whole and checked against the task's hash.
async fn fetch(client: &RequestClient, task: &TrainTask) -> Result<ModelParams, UpstreamError> {
    let version = task.model_version;
    match client.request(&Message::ModelRequest { version: Some(version) }).await? {
        Message::Model { version: v, params, .. } if v == version => {
            let got = params.content_hash();
            if got != task.model_hash {
                return Err(UpstreamError::BadModel { version, expected: task.model_hash, got });
            }
            Ok(params)
        }
        Message::Error { code, message } => Err(UpstreamError::Refused { code, message }),
        _ => Err(UpstreamError::Unexpected("ModelRequest")),
    }
}
