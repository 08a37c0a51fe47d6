//! The coordinator service: the round engine behind a QUIC listener.
//!
//! A thin async shell around [`RoundEngine`]: every input from the network becomes a
//! `handle_*` call with `now` taken from the server's clock, and the engine's events are
//! drained after each call (`Assign` becomes a task waiting for its device; `RoundClosed`
//! records the report, keeps the new model version and starts the next round if the operator
//! asked for more). Devices pull work: they ask for a task, fetch the model version it names,
//! train, and upload the result, which is acknowledged only once the engine accepted it.
//!
//! With a [`Store`], everything survives a crash: model versions, the device registry, the
//! operator's settings and requested rounds, and the round in progress with every update
//! acknowledged in it. An update is written and synced before its `Ack` is sent; a restarted
//! coordinator reopens the round, folds the stored updates in again and waits for the devices
//! that had not answered (which reconnect and ask for their task again).
//!
//! # The parts
//! The coordinator's memory is one `State` made of parts that say what they own:
//! `RoundDriver` in `server/rounds.rs` (the engine, the tasks handed out, the rounds closed,
//! the version published), `Registry` in `server/registry.rs` (deployable models, promotions,
//! the signer, the blob store), `Fleet` in `server/fleet.rs` (devices known, connected, what
//! they run) and `DownloadCache` in `server/downloads.rs` (the model versions kept for
//! devices and their encoded bytes). The protocols are in `server/sessions.rs` (device and
//! operator sessions), the inference glue in `server/teacher.rs`, FLTrust's reference update
//! (trained on the server's root set beside the round) in `server/reference.rs`, what
//! operators see in `server/views.rs`. A regional aggregator's link to its root is
//! `server/upstream.rs` (its job, the root's task it works on, is the `upstream` part of the
//! state) and its middle inference tier `server/regional.rs`.
//!
//! # Locks and disk I/O
//! `State` sits behind one `Mutex`, the *state lock*, held only for work in memory: no disk
//! read or write, no fsync and no model encoding happens under it, so requests that only read
//! (task requests, model and blob downloads, status, inference) never wait for a disk.
//!
//! Everything that changes the engine or the stored state is a *durable transition*, and
//! transitions are ordered by a second lock, the *order lock* (`Coordinator::ordered`), held
//! across their I/O. The lock order is always order lock, then state lock; never the state
//! lock while waiting for the order lock. A transition decides under the state lock, releases
//! it to write, and takes it again to publish what it wrote:
//! - An update is checked under the state lock, written and synced ([`Store::save_update`])
//!   without it, then counted under it again, and acknowledged after that. Nothing can change
//!   the open round between the check and the count: every change to the engine holds the
//!   order lock. So an `Ack` still means the update survives a crash.
//! - When a round closes, the engine has already moved on, but nobody is told yet: the round
//!   driver keeps announcing the previous version (`RoundDriver::version`), hands out no task
//!   and starts no round until the close is durable (new version encoded once, blob synced,
//!   redb commit; [`Store::close_round_encoded`]). Then the report, the round's summary, the
//!   new version and its download bytes are published together.
//! - A round that opens is recorded ([`Store::begin_round`]) before any device gets its task.
//!
//! Writes happen in the order their decisions were taken (all under the order lock), so a
//! restart never finds a round opened on a model version that was not stored. Uploads still
//! wait for each other's fsync (redb serialises write transactions anyway).
//!
//! # Storage failures
//! A durable write that fails (a full disk, an I/O error: after one, redb refuses every later
//! write) stops the coordinator instead of being logged and ignored: it is recorded once
//! (`Coordinator::storage_failure`), said loudly, nothing is acknowledged from then on
//! (devices keep their results and send them again later), no round opens or closes, and
//! [`Coordinator::serve`] returns, so `fedge-coordinator serve` exits with an error. A version
//! whose close was not durable is never published, so a restarted coordinator cannot hand its
//! number to other content.
//!
//! Round deadlines are driven by the engine's own `poll_timeout`: a timer task sleeps until
//! the open round's deadline and is woken early whenever a transition may have changed it.
//! `now` is read from a `Clock` (`server/clock.rs`): the wall clock, or in tests a manual one
//! that no timer drives, moved by the in-memory harness of `server/memory.rs`.

mod clock;
mod downloads;
mod engine;
mod fleet;
#[cfg(test)]
mod memory;
mod reference;
mod regional;
mod registry;
mod rounds;
mod secure;
mod sessions;
mod teacher;
mod upstream;
mod views;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::registry::ModelRecord;
use fedge_core::wire::DeviceId;
use fedge_engine::buffered::{AsyncConfig, BufferedEngine};
use fedge_engine::strategy;
use fedge_engine::{ConfigError, EngineConfig, Evaluation, ResumeError, RoundEngine, RoundReport, StoredRound};
use tokio::sync::Notify;

use crate::blobs::{BlobError, BlobStore};
use crate::certs::Role;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

pub use downloads::MAX_CHUNK_BYTES;
pub use reference::RootTrainer;
pub use regional::{RECALIBRATE_EVERY, TRAFFIC_WARMUP, TRAFFIC_WINDOW, TierBuilder, TierConfig, TierCounts, TierModel};
pub use registry::{NewStudent, RegistryError};
pub use secure::{MAX_MEMBERS, SecureSettings};
pub use upstream::{Upstream, UpstreamError};

use clock::Clock;
use downloads::DownloadCache;
use engine::Engine;
use fleet::Fleet;
use registry::Registry;
use rounds::RoundDriver;
use teacher::Inference;

/// Why a coordinator could not start from its state.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The stored state is unreadable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stored round in progress cannot be resumed.
    #[error("cannot resume the stored round: {0}")]
    Resume(#[from] ResumeError),
    /// The registry's blob store cannot be opened.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// FedBuff mode's configuration or stored buffer.
    #[error("FedBuff: {0}")]
    FedBuff(String),
}

/// The coordinator's memory, by part (see the module documentation).
struct State {
    rounds: RoundDriver,
    registry: Registry,
    fleet: Fleet,
    downloads: DownloadCache,
    /// A regional aggregator's job: the root's task it works on (`server/upstream.rs`).
    upstream: Option<upstream::Job>,
}

/// The coordinator service. Cheap to share: clone the `Arc`.
pub struct Coordinator {
    /// The state lock: memory only, never held across I/O.
    state: Mutex<State>,
    /// The order lock: serialises durable transitions, held across their I/O.
    order: Mutex<()>,
    /// Durable state (none: memory only). Used with the state lock released.
    store: Option<Store>,
    /// Rounds closed, models registered: what [`Coordinator::wait_for_rounds`] waits on.
    changed: Notify,
    /// Wakes the deadline timer: the open round's deadline may have changed.
    deadlines: Arc<Notify>,
    /// The engine's clock: the wall clock, or a manual one in the in-memory harness.
    clock: Clock,
    metrics: Arc<Metrics>,
    inference: OnceLock<Inference>,
    /// The largest `TrainResult` frame a device may send: a delta of the model, encoded, plus
    /// [`fedge_net::SMALL_FRAME_BYTES`] of slack.
    train_result_limit: usize,
    /// Set once, by the first durable write that failed: the coordinator has stopped.
    storage_failure: OnceLock<String>,
    /// Wakes [`Coordinator::serve`] to stop after a storage failure.
    halted: Notify,
    /// Wakes the reference task (`server/reference.rs`): a round may want FLTrust's reference.
    references: Arc<Notify>,
    /// Set once a root trainer serves the reference task.
    root_trainer_set: OnceLock<()>,
    /// The most samples a regional aggregator's result may claim.
    max_samples_per_region: std::sync::atomic::AtomicU64,
    /// Set once this coordinator follows a root as a regional aggregator.
    region: OnceLock<()>,
    /// A region's inference tier (`server/regional.rs`).
    tier: OnceLock<regional::RegionalTier>,
    /// The newest root model version a region heard of (tasks, `NoTask`, answers).
    root_version: std::sync::atomic::AtomicU64,
    /// A region's connection to its root, while one is open (escalations go over it).
    upstream_link: Mutex<Option<Arc<fedge_net::RequestClient>>>,
}

/// The most samples a regional aggregator's result may claim unless configured
/// (`max_samples_per_region`).
pub const DEFAULT_MAX_SAMPLES_PER_REGION: u64 = 100_000_000;

/// The encoded size of a `TrainResult` carrying a delta shaped like `model`, plus
/// [`fedge_net::SMALL_FRAME_BYTES`] of slack (every model version has the same layout).
fn train_result_limit(model: &ModelParams) -> usize {
    let result = fedge_core::wire::TrainResult {
        round: u64::MAX,
        model_version: u64::MAX,
        num_samples: u64::MAX,
        train_loss: f32::MAX,
        delta: ModelParams::zeros(model.layout().clone()),
        clipped: false,
    };
    fedge_core::codec::encode(&fedge_core::wire::Message::TrainResult(result)).len() + fedge_net::SMALL_FRAME_BYTES
}

/// Proof that the order lock is held (see the module documentation).
struct Ordered<'a> {
    _guard: MutexGuard<'a, ()>,
}

impl Coordinator {
    /// A coordinator whose model version 0 is `initial`, with state in memory only.
    pub fn new(config: EngineConfig, initial: ModelParams) -> Result<Arc<Self>, ConfigError> {
        Self::with_clock(config, initial, Clock::wall())
    }

    /// [`Self::new`] on `clock` (the in-memory harness gives a manual one).
    fn with_clock(config: EngineConfig, initial: ModelParams, clock: Clock) -> Result<Arc<Self>, ConfigError> {
        let strategy = strategy::build(&config, os_noise_rng());
        let timeout = config.round_timeout;
        let engine = RoundEngine::new(config, strategy, initial)?;
        Ok(Self::from_engine(Engine::Rounds(Box::new(engine)), timeout, None, BTreeMap::new(), clock))
    }

    /// A coordinator keeping its state in `store`: it resumes from the latest stored model
    /// version (and device registry) if there is one, else starts from `initial` as version 0.
    ///
    /// A round that was in progress is reopened with the updates acknowledged in it; operator
    /// settings changed at run time override `config`'s.
    ///
    /// A regional aggregator's stored root task sets the training settings (its devices train
    /// as the root asked, also in a resumed round).
    pub fn with_store(mut config: EngineConfig, initial: ModelParams, store: Store) -> Result<Arc<Self>, ServerError> {
        if let Some(task) = store.upstream()? {
            config.train = task.train;
        }
        let (engine, rounds_left, open, history) = match store.latest()? {
            Some(r) => {
                if let Some(settings) = &r.settings {
                    settings.apply(&mut config);
                }
                // Adaptive clipping resumes from the clip of the last released round.
                if let (Some(p), Some(last)) = (config.privacy.as_mut(), r.rounds.iter().rev().find_map(|l| l.privacy))
                {
                    p.clip_norm = last.clip_norm;
                }
                let strategy = strategy::build(&config, os_noise_rng());
                let mut engine = RoundEngine::restore(config, strategy, r.params, r.version, r.last_round)?;
                // The strategy's moments or centre come back with the version they were saved
                // with; state of another strategy (the configuration changed) is dropped, loudly.
                if let Some(saved) = r.server_state.filter(|s| s.version == r.version) {
                    let (name, strategy) = (saved.strategy.clone(), engine.config().strategy.name());
                    let state =
                        fedge_engine::strategy::ServerState { strategy: saved.strategy, vectors: saved.vectors };
                    if let Err(e) = engine.restore_server_state(state) {
                        tracing::warn!(
                            "the {name} state saved with version {} is not restored into {strategy}: {e}",
                            r.version
                        );
                    }
                }
                for (version, evaluation) in r.evaluations {
                    engine.handle_evaluation(version, evaluation);
                }
                engine
                    .restore_ledger(r.rounds.iter().filter_map(|l| l.privacy))
                    .map_err(|e| ServerError::Config(ConfigError::Privacy(e.to_string())))?;
                (engine, r.rounds_left, r.open, r.rounds)
            }
            None => {
                store.save_model(0, 0, &initial)?;
                let strategy = strategy::build(&config, os_noise_rng());
                (RoundEngine::new(config, strategy, initial)?, 0, None, Vec::new())
            }
        };
        let ids = store.devices()?.into_iter().collect();
        let records: BTreeMap<u64, ModelRecord> = store.registry()?.into_iter().map(|r| (r.version, r)).collect();
        let promotions = store.promotions()?;
        let latest = store.promotion()?;
        let blob_store = BlobStore::local(&store.dir().join("registry"))?;
        let timeout = engine.config().round_timeout;
        let me = Self::from_engine(Engine::Rounds(Box::new(engine)), timeout, Some(store), ids, Clock::wall());
        {
            let order = me.ordered();
            {
                let mut s = me.lock();
                if let (Some(&last), Some(engine)) = (records.keys().next_back(), s.rounds.engine.rounds_mut()) {
                    engine.reserve_versions_through(last);
                }
                s.registry.restore(records, promotions, latest, blob_store);
                s.rounds.restore(rounds_left, history);
                if let Some(open) = open {
                    let r = &open.record;
                    let now = me.now();
                    let stored = StoredRound {
                        round: r.round,
                        model_version: r.model_version,
                        chosen: &r.chosen,
                        target: r.target as usize,
                        population: r.population as usize,
                    };
                    if let Some(engine) = s.rounds.engine.rounds_mut() {
                        engine.resume_round(now, stored, &open.accepted)?;
                    }
                    tracing::info!(
                        "resumed round {} with {} of {} updates already acknowledged",
                        r.round,
                        open.accepted.len(),
                        r.target
                    );
                }
            }
            me.settle(&order);
        }
        Ok(me)
    }

    /// A coordinator in FedBuff mode (buffered asynchronous aggregation, `config`), keeping
    /// its state in `store`: it resumes from the latest stored version with the open buffer's
    /// acknowledged results folded back in, or starts from `initial` as version 0. A device
    /// holding a task longer than `task_timeout` is given up on (its slot freed). Every
    /// aggregation counts as one of the rounds operators ask for.
    pub fn with_store_fedbuff(
        mut config: AsyncConfig,
        task_timeout: Duration,
        initial: ModelParams,
        store: Store,
    ) -> Result<Arc<Self>, ServerError> {
        // Each buffered result is stored under its device: one per device per buffer.
        config.one_per_device = true;
        let fedbuff = |e: fedge_engine::buffered::AsyncConfigError| ServerError::FedBuff(e.to_string());
        let (engine, rounds_left, open, history) = match store.latest()? {
            Some(r) => {
                let mut engine = BufferedEngine::restore(config, r.params, r.version, r.last_round, os_noise_rng())
                    .map_err(fedbuff)?;
                for (version, evaluation) in r.evaluations {
                    engine.handle_evaluation(version, evaluation);
                }
                engine
                    .restore_ledger(r.rounds.iter().filter_map(|l| l.privacy))
                    .map_err(|e| ServerError::FedBuff(e.to_string()))?;
                (engine, r.rounds_left, r.open, r.rounds)
            }
            None => {
                store.save_model(0, 0, &initial)?;
                (BufferedEngine::new(config, initial, os_noise_rng()).map_err(fedbuff)?, 0, None, Vec::new())
            }
        };
        let ids = store.devices()?.into_iter().collect();
        let records: BTreeMap<u64, ModelRecord> = store.registry()?.into_iter().map(|r| (r.version, r)).collect();
        let promotions = store.promotions()?;
        let latest = store.promotion()?;
        let blob_store = BlobStore::local(&store.dir().join("registry"))?;
        let mut engine = engine;
        if let Some(&last) = records.keys().next_back() {
            let students = records.values().filter(|r| r.role == fedge_core::registry::ModelRole::Student);
            engine.reserve_versions_through(last, students.map(|r| r.version));
        }
        let open_buffer = engine.aggregations() + 1;
        let me = Self::from_engine(Engine::Buffered(Box::new(engine)), task_timeout, Some(store), ids, Clock::wall());
        {
            let order = me.ordered();
            let mut dropped = Vec::new();
            {
                let mut s = me.lock();
                s.registry.restore(records, promotions, latest, blob_store);
                s.rounds.restore(rounds_left, history);
                if let Some(open) = open.filter(|o| o.record.round == open_buffer) {
                    let now = me.now();
                    s.rounds.buffer_is_recorded(open_buffer);
                    if let Engine::Buffered(engine) = &mut s.rounds.engine {
                        // One at a time: a result the configuration no longer takes (say
                        // max_staleness lowered between runs) is dropped, loudly, not the start.
                        for stored in &open.accepted {
                            if let Err((device, e)) = engine.refill(now, std::slice::from_ref(stored)) {
                                tracing::warn!(
                                    "dropping the stored result of device {device} in FedBuff buffer {open_buffer}: {e} (acknowledged under the earlier configuration; this one refuses it)"
                                );
                                dropped.push(device);
                            }
                        }
                    }
                    tracing::info!(
                        "resumed FedBuff buffer {open_buffer} with {} results already acknowledged",
                        open.accepted.len() - dropped.len()
                    );
                }
            }
            // Forgotten for good, with the state lock released: not refused again next start.
            if let Some(store) = &me.store {
                for device in dropped {
                    store.drop_update(open_buffer, device)?;
                }
            }
            me.settle(&order);
        }
        Ok(me)
    }

    fn from_engine(
        engine: Engine,
        task_timeout: Duration,
        store: Option<Store>,
        ids: BTreeMap<String, DeviceId>,
        clock: Clock,
    ) -> Arc<Self> {
        let first = Arc::new(engine.global().clone());
        let train_result_limit = train_result_limit(&first);
        let downloads = DownloadCache::new(engine.version(), first);
        Arc::new(Self {
            state: Mutex::new(State {
                rounds: RoundDriver::new(engine, task_timeout),
                registry: Registry::default(),
                fleet: Fleet::new(ids),
                downloads,
                upstream: None,
            }),
            order: Mutex::new(()),
            store,
            changed: Notify::new(),
            deadlines: Arc::new(Notify::new()),
            clock,
            metrics: Arc::new(Metrics::default()),
            inference: OnceLock::new(),
            train_result_limit,
            storage_failure: OnceLock::new(),
            halted: Notify::new(),
            references: Arc::new(Notify::new()),
            root_trainer_set: OnceLock::new(),
            max_samples_per_region: std::sync::atomic::AtomicU64::new(DEFAULT_MAX_SAMPLES_PER_REGION),
            region: OnceLock::new(),
            tier: OnceLock::new(),
            root_version: std::sync::atomic::AtomicU64::new(0),
            upstream_link: Mutex::new(None),
        })
    }

    /// The coordinator's metrics (serve them with [`crate::web::Site`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The most samples a regional aggregator's result may claim (its devices' total; a
    /// device's own cap is `max_samples_per_result`). Applies to aggregators that connect
    /// from now on.
    pub fn set_max_samples_per_region(&self, max_samples: u64) {
        self.max_samples_per_region.store(max_samples.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Why the coordinator stopped, if a durable write failed (see the module documentation).
    pub fn storage_failure(&self) -> Option<&str> {
        self.storage_failure.get().map(String::as_str)
    }

    /// Records the first storage failure, says it loudly and stops the coordinator: nothing is
    /// acknowledged and no round moves from now on, and [`Self::serve`] returns.
    fn storage_failed(&self, what: std::fmt::Arguments<'_>, e: &StoreError) {
        let why = format!("{what}: {e}");
        if self.storage_failure.set(why.clone()).is_ok() {
            tracing::error!(
                "STORAGE FAILED: {why}. The coordinator stops: nothing more is acknowledged and no round opens or closes; every update acknowledged so far is on disk. Free or repair the storage, then start it again."
            );
            self.metrics.storage_failed.set(1);
            self.halted.notify_one();
            self.changed.notify_waiters();
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The state lock. Never call [`Self::ordered`] while holding it.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving the state as it was.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order lock, for a durable transition.
    fn ordered(&self) -> Ordered<'_> {
        Ordered { _guard: self.order.lock().unwrap_or_else(|p| p.into_inner()) }
    }

    /// Asks for `rounds` more training rounds; the first starts as soon as enough devices
    /// are connected.
    pub fn start_rounds(&self, rounds: u64) {
        let order = self.ordered();
        self.add_rounds(&order, rounds);
    }

    fn add_rounds(&self, order: &Ordered<'_>, rounds: u64) {
        let left = {
            let mut s = self.lock();
            s.rounds.rounds_left = s.rounds.rounds_left.saturating_add(rounds);
            s.rounds.rounds_left
        };
        if let Some(store) = &self.store
            && let Err(e) = store.set_rounds_left(left)
        {
            self.storage_failed(format_args!("cannot record the rounds asked for"), &e);
        }
        self.settle(order);
    }

    /// Reports of the rounds closed so far.
    pub fn reports(&self) -> Vec<RoundReport> {
        self.lock().rounds.reports.clone()
    }

    /// The current model version and parameters.
    pub fn global(&self) -> (u64, Arc<ModelParams>) {
        let s = self.lock();
        let v = s.rounds.version();
        (v, s.downloads.model(v).expect("the published version is kept"))
    }

    /// Devices connected now.
    pub fn connected(&self) -> usize {
        self.lock().fleet.connected.len()
    }

    /// Waits until at least `n` rounds have closed.
    pub async fn wait_for_rounds(&self, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.lock().rounds.reports.len() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Records the evaluation of model `version` (computed outside, e.g. with fedge-learn).
    pub fn record_evaluation(&self, version: u64, evaluation: Evaluation) {
        let _order = self.ordered();
        if let Some(store) = &self.store
            && let Err(e) = store.save_evaluation(version, evaluation)
        {
            self.storage_failed(format_args!("cannot record the evaluation of v{version}"), &e);
        }
        self.lock().rounds.engine.handle_evaluation(version, evaluation);
    }

    /// Serves `listener` until it is closed or the storage fails (see
    /// [`Self::storage_failure`]): admits devices, answers their requests, and times rounds out
    /// at the engine's deadlines.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        // A weak handle: the timer must not keep a stopped coordinator (and its store) alive.
        let timer = tokio::spawn(rounds::drive_deadlines(Arc::downgrade(&self), self.deadlines.clone()));
        let listener = Arc::new(listener);
        // Revocation and expiry reach live connections within a second (`certs revoke` on a
        // running coordinator: no restart needed).
        let enforcer = tokio::spawn({
            // Weak: once the accept loop is gone (stopped or aborted), so is the endpoint.
            let listener = Arc::downgrade(&listener);
            async move {
                let mut complained = false;
                loop {
                    tokio::time::sleep(ENFORCE_EVERY).await;
                    let Some(listener) = listener.upgrade() else { return };
                    match listener.enforce() {
                        Ok(done) => {
                            complained = false;
                            if done.reloaded || done.revoked + done.expired > 0 {
                                tracing::info!(
                                    "certificates: {}{} revoked and {} expired connection(s) closed",
                                    if done.reloaded { "revocation list reloaded; " } else { "" },
                                    done.revoked,
                                    done.expired
                                );
                            }
                        }
                        Err(e) if !complained => {
                            complained = true;
                            tracing::warn!("certificates: keeping the last revocation list: {e}");
                        }
                        Err(_) => {}
                    }
                }
            }
        });
        let mut halted = false;
        loop {
            let peer = tokio::select! {
                peer = listener.accept() => peer,
                () = self.halted.notified() => {
                    halted = true;
                    None
                }
            };
            let Some(peer) = peer else { break };
            match peer {
                Ok(peer) => {
                    let me = self.clone();
                    match peer.identity.role {
                        Role::Device | Role::Aggregator => tokio::spawn(async move { me.device_session(peer).await }),
                        Role::Operator => tokio::spawn(async move { me.operator_session(peer).await }),
                    };
                }
                Err(e) => {
                    self.metrics.rejected_connection();
                    tracing::warn!("refused a connection: {e}");
                }
            }
        }
        timer.abort();
        enforcer.abort();
        if halted {
            // Acknowledgements decided before the failure still reach their devices.
            listener.shut_down("the coordinator's storage failed", Duration::from_millis(500)).await;
        }
    }
}

/// How often revocation and expiry are applied to live connections.
const ENFORCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Coordinator {
    fn drop(&mut self) {
        // Let a deadline timer or reference task still waiting find the coordinator gone.
        self.deadlines.notify_one();
        self.references.notify_one();
    }
}

/// Noise for a real coordinator: ChaCha20 seeded from the operating system, so the noise
/// cannot be replayed from a configuration file.
fn os_noise_rng() -> Box<dyn rand::Rng + Send> {
    use rand::SeedableRng;
    Box::new(rand_chacha::ChaCha20Rng::from_rng(&mut rand::rng()))
}
