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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fedge_core::ModelParams;
use fedge_core::params::ContentHash;
use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole};
use fedge_core::wire::{
    Capabilities, DeviceId, DeviceLine, ErrorCode, InferRequest, Message, ModelLine, OperatorCommand, PrivacyBudget,
    RoundLine, SessionPurpose, Status, TrainTask,
};
use fedge_engine::strategy::{self, Strategy};
use fedge_engine::{ConfigError, EngineConfig, EngineEvent, RoundEngine, RoundReport, StartError};
use fedge_engine::{Evaluation, ResumeError, RoundOutcome, StoredRound};
use tokio::sync::Notify;

use crate::blobs::{BlobError, BlobStore};
use crate::certs::{ModelSigner, Role};
use crate::inference::{InferError, InferenceConfig, InferenceCounts, InferenceService, RateLimiter, Teacher};
use crate::metrics::Metrics;
use crate::store::{RoundRecord, Settings, Store, StoreError};
use crate::transport::{Listener, Peer, answer_hello};

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
}

/// How long an idle device waits before asking for work again.
const RETRY_MS: u32 = 50;

struct State {
    engine: RoundEngine<Box<dyn Strategy>>,
    store: Option<Store>,
    ids: BTreeMap<String, DeviceId>,
    connected: BTreeSet<DeviceId>,
    capabilities: BTreeMap<DeviceId, Capabilities>,
    tasks: BTreeMap<DeviceId, TrainTask>,
    /// When each task was assigned (for the update latency metric).
    assigned_at: BTreeMap<DeviceId, Duration>,
    models: BTreeMap<u64, Arc<ModelParams>>,
    /// `Model` messages already encoded, by version: encoded once, sent to every device.
    encoded: BTreeMap<u64, (ContentHash, Arc<Vec<u8>>)>,
    /// Rounds closed in this run (what [`Coordinator::wait_for_rounds`] counts).
    reports: Vec<RoundReport>,
    /// Every round closed, earlier runs included (what operators see).
    history: Vec<RoundLine>,
    rounds_left: u64,
    /// Registered (deployable) models by version.
    registry: BTreeMap<u64, ModelRecord>,
    /// Their blobs: kept in memory when registered in this run or first sent.
    blobs: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Promotion history; the last is what devices should run.
    promotions: Vec<u64>,
    /// The deployed version each device last said it runs.
    running: BTreeMap<DeviceId, Option<u64>>,
    /// Signs registered models (none: models are registered unsigned and devices refuse them).
    signer: Option<Arc<ModelSigner>>,
    /// Where registry blobs live (none: in memory only).
    blob_store: Option<BlobStore>,
    /// Architecture of the global model, for the registry.
    architecture: String,
}

/// A distilled, quantised student to register.
#[derive(Debug, Clone)]
pub struct NewStudent {
    /// The global version it was distilled from.
    pub parent: u64,
    /// The round that produced the parent.
    pub round: u64,
    /// Its architecture.
    pub architecture: String,
    /// Its parameter count.
    pub parameters: u64,
    /// Its test accuracy (as devices run it), if measured.
    pub accuracy: Option<f64>,
    /// Its median single-image inference time, microseconds, if measured.
    pub latency_us: Option<f64>,
    /// The encoded quantised model.
    pub blob: Vec<u8>,
}

/// Why a model could not be registered, promoted or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such registered version.
    #[error("no registered model v{0}")]
    Unknown(u64),
    /// Nothing to roll back to.
    #[error("nothing to roll back to: {0} promotion(s) so far")]
    NoPrevious(usize),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// The operator's view of a closed round (accuracy is filled in when shown).
fn line_of(r: &RoundReport) -> RoundLine {
    RoundLine {
        round: r.round,
        model_version: r.model_version,
        selected: r.selected as u64,
        results: r.results as u64,
        failures: r.failures as u64,
        stragglers: r.stragglers.len() as u64,
        surplus: r.surplus as u64,
        samples: r.samples,
        train_loss: r.train_loss,
        accuracy: None,
        failed_reason: match &r.outcome {
            RoundOutcome::Aggregated => None,
            RoundOutcome::Failed(why) => Some(why.clone()),
        },
        privacy: r.privacy,
    }
}

/// The coordinator service. Cheap to share: clone the `Arc`.
pub struct Coordinator {
    state: Mutex<State>,
    changed: Notify,
    started: Instant,
    metrics: Arc<Metrics>,
    inference: std::sync::OnceLock<Inference>,
}

/// The teacher's inference service and the per-device rate limit in front of it.
struct Inference {
    service: InferenceService,
    limiter: Mutex<RateLimiter>,
}

impl Coordinator {
    /// A coordinator whose model version 0 is `initial`, with state in memory only.
    pub fn new(config: EngineConfig, initial: ModelParams) -> Result<Arc<Self>, ConfigError> {
        let strategy = strategy::for_config(&config, os_noise_rng());
        let engine = RoundEngine::new(config, strategy, initial)?;
        Ok(Self::from_engine(engine, None, BTreeMap::new()))
    }

    /// A coordinator keeping its state in `store`: it resumes from the latest stored model
    /// version (and device registry) if there is one, else starts from `initial` as version 0.
    ///
    /// A round that was in progress is reopened with the updates acknowledged in it; operator
    /// settings changed at run time override `config`'s.
    pub fn with_store(mut config: EngineConfig, initial: ModelParams, store: Store) -> Result<Arc<Self>, ServerError> {
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
                let strategy = strategy::for_config(&config, os_noise_rng());
                let mut engine = RoundEngine::restore(config, strategy, r.params, r.version, r.last_round)?;
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
                let strategy = strategy::for_config(&config, os_noise_rng());
                (RoundEngine::new(config, strategy, initial)?, 0, None, Vec::new())
            }
        };
        let ids = store.devices()?.into_iter().collect();
        let registry: BTreeMap<u64, ModelRecord> = store.registry()?.into_iter().map(|r| (r.version, r)).collect();
        let promotions = store.promotions()?;
        let blob_store = BlobStore::local(&store.dir().join("registry"))?;
        let me = Self::from_engine(engine, Some(store), ids);
        {
            let mut s = me.lock();
            if let Some(&last) = registry.keys().next_back() {
                s.engine.reserve_versions_through(last);
            }
            s.registry = registry;
            s.promotions = promotions;
            s.blob_store = Some(blob_store);
            s.rounds_left = rounds_left;
            s.history = history;
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
                s.engine.resume_round(now, stored, &open.accepted)?;
                eprintln!(
                    "resumed round {} with {} of {} updates already acknowledged",
                    r.round,
                    open.accepted.len(),
                    r.target
                );
            }
            me.pump(&mut s);
        }
        Ok(me)
    }

    fn from_engine(
        engine: RoundEngine<Box<dyn Strategy>>,
        store: Option<Store>,
        ids: BTreeMap<String, DeviceId>,
    ) -> Arc<Self> {
        let first = Arc::new(engine.global().clone());
        let version = engine.version();
        Arc::new(Self {
            state: Mutex::new(State {
                engine,
                store,
                ids,
                connected: BTreeSet::new(),
                capabilities: BTreeMap::new(),
                registry: BTreeMap::new(),
                blobs: BTreeMap::new(),
                promotions: Vec::new(),
                running: BTreeMap::new(),
                signer: None,
                blob_store: None,
                architecture: String::new(),
                tasks: BTreeMap::new(),
                assigned_at: BTreeMap::new(),
                models: BTreeMap::from([(version, first)]),
                encoded: BTreeMap::new(),
                reports: Vec::new(),
                history: Vec::new(),
                rounds_left: 0,
            }),
            changed: Notify::new(),
            started: Instant::now(),
            metrics: Arc::new(Metrics::default()),
            inference: std::sync::OnceLock::new(),
        })
    }

    /// The coordinator's metrics (serve them with [`crate::metrics::serve`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Answers devices' inference requests with `teacher` on the current global model, batched
    /// and rate-limited as `config` says. Call once, within a tokio runtime; a second call is
    /// ignored (returns false).
    pub fn set_inference(self: &Arc<Self>, config: InferenceConfig, teacher: Box<dyn Teacher>) -> bool {
        let me = Arc::downgrade(self);
        let model: crate::inference::ModelSource = Arc::new(move || me.upgrade().map(|c| c.global()));
        let metrics = self.metrics.clone();
        let service = InferenceService::spawn(config, teacher, model)
            .with_observer(Arc::new(move |batch, latency| metrics.inference_answered(batch, latency)));
        let limiter = Mutex::new(RateLimiter::new(config.rate_per_sec, config.burst));
        self.inference.set(Inference { service, limiter }).is_ok()
    }

    /// What the inference service answered so far (`None`: not serving inference).
    pub fn inference_counts(&self) -> Option<&InferenceCounts> {
        self.inference.get().map(|i| i.service.counts())
    }

    /// Answers one inference request from device `device` (certificate id).
    pub async fn infer(
        &self,
        device: &str,
        request: InferRequest,
    ) -> Result<fedge_core::wire::InferAnswer, InferError> {
        let Some(inf) = self.inference.get() else {
            return Err(InferError::Unavailable("this coordinator does not serve inference".into()));
        };
        let checked = inf.limiter.lock().unwrap_or_else(|p| p.into_inner()).check(device, self.now());
        let out = match checked {
            Ok(()) => inf.service.infer(request).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &out {
            self.metrics.rejected(e.code());
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving the state as it was.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `rounds` more training rounds; the first starts as soon as enough devices
    /// are connected.
    pub fn start_rounds(&self, rounds: u64) {
        let mut s = self.lock();
        s.rounds_left += rounds;
        if let Some(store) = &s.store
            && let Err(e) = store.set_rounds_left(s.rounds_left)
        {
            eprintln!("cannot record the rounds asked for: {e}");
        }
        self.pump(&mut s);
    }

    /// Reports of the rounds closed so far.
    pub fn reports(&self) -> Vec<RoundReport> {
        self.lock().reports.clone()
    }

    /// The current model version and parameters.
    pub fn global(&self) -> (u64, Arc<ModelParams>) {
        let s = self.lock();
        let v = s.engine.version();
        (v, s.models[&v].clone())
    }

    /// Devices connected now.
    pub fn connected(&self) -> usize {
        self.lock().connected.len()
    }

    /// Waits until at least `n` rounds have closed.
    pub async fn wait_for_rounds(&self, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.lock().reports.len() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Drains engine events and starts the next round when one is wanted and possible.
    fn pump(&self, s: &mut State) {
        let mut changed = false;
        loop {
            while let Some(ev) = s.engine.poll_event() {
                changed = true;
                match ev {
                    EngineEvent::Assign { device, task } => {
                        s.tasks.insert(device, task);
                        s.assigned_at.insert(device, self.now());
                    }
                    EngineEvent::RoundClosed(report) => {
                        s.tasks.clear();
                        s.assigned_at.clear();
                        self.metrics.round_closed(report.outcome == RoundOutcome::Aggregated);
                        let v = s.engine.version();
                        let line = line_of(&report);
                        if let Some(store) = &s.store {
                            let aggregated =
                                (report.outcome == RoundOutcome::Aggregated).then(|| (v, s.engine.global()));
                            if let Err(e) = store.close_round(&line, aggregated, s.rounds_left) {
                                eprintln!("cannot record the close of round {}: {e}", report.round);
                            }
                        }
                        s.models.entry(v).or_insert_with(|| Arc::new(s.engine.global().clone()));
                        if report.outcome == RoundOutcome::Aggregated {
                            register_global(s, v, report.round, report.privacy.map(|p| p.epsilon));
                        }
                        // Keep the last few versions for devices still fetching them.
                        while s.models.len() > 4 {
                            if let Some((old, _)) = s.models.pop_first() {
                                s.encoded.remove(&old);
                            }
                        }
                        s.reports.push(report);
                        s.history.push(line);
                    }
                }
            }
            if s.rounds_left == 0 || s.engine.current_round().is_some() {
                break;
            }
            match s.engine.start_round(self.now()) {
                Ok(_) => {
                    s.rounds_left -= 1;
                    if let (Some(store), Some(open)) = (&s.store, s.engine.open_round()) {
                        let record = RoundRecord {
                            round: open.round,
                            model_version: open.model_version,
                            chosen: open.chosen,
                            target: open.target as u64,
                            population: open.population as u64,
                        };
                        if let Err(e) = store.begin_round(&record, s.rounds_left) {
                            eprintln!("cannot record the start of round {}: {e}", record.round);
                        }
                    }
                }
                Err(StartError::NotEnoughDevices { .. }) | Err(StartError::Busy(_)) => break,
                Err(e) => {
                    // Out of privacy budget: the remaining rounds are dropped, loudly.
                    eprintln!("{e}; {} rounds cancelled", s.rounds_left);
                    s.rounds_left = 0;
                    changed = true;
                    break;
                }
            }
        }
        self.metrics.model_version.set(s.engine.version() as i64);
        self.metrics.devices_connected.set(s.connected.len() as i64);
        self.metrics.devices_known.set(s.ids.len() as i64);
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Serves `listener` until it is closed: admits devices, answers their requests, and ticks
    /// the engine's deadlines.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        let ticker = {
            // A weak handle: the ticker must not keep a stopped coordinator (and its store) alive.
            let me = Arc::downgrade(&self);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(200));
                loop {
                    every.tick().await;
                    let Some(me) = me.upgrade() else { return };
                    let mut s = me.lock();
                    let now = me.now();
                    s.engine.handle_timeout(now);
                    me.pump(&mut s);
                }
            })
        };
        while let Some(peer) = listener.accept().await {
            match peer {
                Ok(peer) => {
                    let me = self.clone();
                    match peer.identity.role {
                        Role::Device => tokio::spawn(async move { me.device_session(peer).await }),
                        Role::Operator => tokio::spawn(async move { me.operator_session(peer).await }),
                    };
                }
                Err(e) => {
                    self.metrics.rejected_connection();
                    eprintln!("refused a connection: {e}");
                }
            }
        }
        ticker.abort();
    }

    /// Records the evaluation of model `version` (computed outside, e.g. with fedge-learn).
    pub fn record_evaluation(&self, version: u64, evaluation: Evaluation) {
        let mut s = self.lock();
        if let Some(store) = &s.store
            && let Err(e) = store.save_evaluation(version, evaluation)
        {
            eprintln!("cannot record the evaluation of v{version}: {e}");
        }
        s.engine.handle_evaluation(version, evaluation);
    }

    /// The state operators see.
    pub fn status(&self) -> Status {
        let s = self.lock();
        let names: BTreeMap<DeviceId, &String> = s.ids.iter().map(|(k, v)| (*v, k)).collect();
        let evals = s.engine.evaluations();
        let privacy = match (s.engine.config().privacy.as_ref(), s.engine.privacy_ledger()) {
            (Some(p), Some(ledger)) => Some(PrivacyBudget {
                noise_multiplier: p.noise_multiplier,
                clip_norm: s.engine.clip_norm().unwrap_or(p.clip_norm),
                delta: ledger.delta(),
                epsilon: ledger.epsilon(),
                target_epsilon: p.target_epsilon,
            }),
            _ => None,
        };
        Status {
            privacy,
            model_version: s.engine.version(),
            model_hash: s.engine.global().content_hash(),
            current_round: s.engine.current_round(),
            rounds_left: s.rounds_left,
            devices_connected: s.connected.iter().filter_map(|d| names.get(d).map(|n| n.to_string())).collect(),
            devices_known: s.ids.len() as u64,
            rounds: s
                .history
                .iter()
                .map(|r| RoundLine {
                    accuracy: r
                        .failed_reason
                        .is_none()
                        .then(|| evals.get(&r.model_version).map(|e| e.accuracy))
                        .flatten(),
                    ..r.clone()
                })
                .collect(),
        }
    }

    /// Signs models registered from now on with `signer`, and names the global model's
    /// architecture in the registry.
    pub fn set_signer(&self, signer: ModelSigner, architecture: &str) {
        let mut s = self.lock();
        s.signer = Some(Arc::new(signer));
        s.architecture = architecture.to_string();
        // The model this run starts from is a version too.
        let (v, round) = (s.engine.version(), s.history.last().map_or(0, |r| r.round));
        let epsilon = s.history.iter().rev().find(|r| r.model_version == v).and_then(|r| r.privacy).map(|p| p.epsilon);
        register_global(&mut s, v, round, epsilon);
    }

    /// Keeps registry blobs in `blobs` from now on (the default with a store is the local
    /// filesystem under its folder).
    pub fn set_blob_store(&self, blobs: BlobStore) {
        self.lock().blob_store = Some(blobs);
    }

    /// Registers a student distilled from global version `student.parent`: stores its blob,
    /// allocates its version, signs its record, commits it, and promotes it if `promote`.
    /// Returns the record.
    pub async fn register_student(&self, student: NewStudent, promote: bool) -> Result<ModelRecord, RegistryError> {
        let NewStudent { parent, round, architecture, parameters, accuracy, latency_us, blob } = student;
        // The blob is durable before any record names it.
        let blobs = self.lock().blob_store.clone();
        if let Some(b) = &blobs {
            b.put(blob.clone()).await?;
        }
        let mut s = self.lock();
        let epsilon =
            s.history.iter().rev().find(|r| r.model_version == parent).and_then(|r| r.privacy).map(|p| p.epsilon);
        let version = s.engine.allocate_version();
        let mut record = ModelRecord {
            parent: Some(parent),
            round,
            accuracy,
            latency_us,
            epsilon,
            created_at: unix_now(),
            ..ModelRecord::of_blob(version, ModelRole::Student, &architecture, BlobFormat::Int8, parameters, &blob)
        };
        if let Some(signer) = &s.signer {
            signer.sign(&mut record).map_err(|e| RegistryError::Sign(e.to_string()))?;
        }
        if let Some(store) = &s.store {
            store.save_registered(&record)?;
        }
        s.registry.insert(version, record.clone());
        s.blobs.insert(version, Arc::new(blob));
        if promote {
            Self::promote_locked(&mut s, version)?;
        }
        self.changed.notify_waiters();
        Ok(record)
    }

    fn promote_locked(s: &mut State, version: u64) -> Result<(), RegistryError> {
        if !s.registry.contains_key(&version) {
            return Err(RegistryError::Unknown(version));
        }
        let mut history = s.promotions.clone();
        if history.last() != Some(&version) {
            history.push(version);
        }
        if let Some(store) = &s.store {
            store.save_promotions(&history)?;
        }
        s.promotions = history;
        Ok(())
    }

    /// Makes registered `version` what devices should run.
    pub fn promote(&self, version: u64) -> Result<(), RegistryError> {
        let mut s = self.lock();
        Self::promote_locked(&mut s, version)
    }

    /// Goes back to the version promoted before the current one; returns it.
    pub fn rollback(&self) -> Result<u64, RegistryError> {
        let mut s = self.lock();
        if s.promotions.len() < 2 {
            return Err(RegistryError::NoPrevious(s.promotions.len()));
        }
        let mut history = s.promotions.clone();
        history.pop();
        if let Some(store) = &s.store {
            store.save_promotions(&history)?;
        }
        s.promotions = history;
        Ok(*s.promotions.last().expect("two or more before the pop"))
    }

    /// Records a measured inference latency for registered `version` (not signed, like
    /// accuracy).
    pub fn set_latency(&self, version: u64, latency_us: f64) -> Result<(), RegistryError> {
        let mut s = self.lock();
        let Some(record) = s.registry.get_mut(&version) else { return Err(RegistryError::Unknown(version)) };
        record.latency_us = Some(latency_us);
        let record = record.clone();
        if let Some(store) = &s.store {
            store.save_registered(&record)?;
        }
        Ok(())
    }

    /// The promoted version, if any.
    pub fn promoted(&self) -> Option<u64> {
        self.lock().promotions.last().copied()
    }

    /// How many connected devices run each deployed version (`None`: none yet).
    pub fn fleet_versions(&self) -> BTreeMap<Option<u64>, u64> {
        let s = self.lock();
        let mut out = BTreeMap::new();
        for id in &s.connected {
            *out.entry(s.running.get(id).copied().flatten()).or_insert(0) += 1;
        }
        out
    }

    /// Every device ever seen, by certificate id.
    pub fn devices(&self) -> Vec<DeviceLine> {
        let s = self.lock();
        s.ids
            .iter()
            .map(|(name, id)| DeviceLine {
                id: name.clone(),
                connected: s.connected.contains(id),
                capabilities: s.capabilities.get(id).cloned(),
                running: s.running.get(id).copied().flatten(),
            })
            .collect()
    }

    /// The model versions kept (all stored ones with a store, else the last few in memory).
    pub fn models(&self) -> Vec<ModelLine> {
        let s = self.lock();
        let evals = s.engine.evaluations();
        let kept: Vec<(u64, ContentHash)> = match s.store.as_ref().map(|st| st.models()) {
            Some(Ok(stored)) => stored,
            _ => s.models.iter().map(|(v, p)| (*v, p.content_hash())).collect(),
        };
        let epsilon: BTreeMap<u64, f64> =
            s.history.iter().filter_map(|r| r.privacy.map(|p| (r.model_version, p.epsilon))).collect();
        let round_of: BTreeMap<u64, u64> = s.history.iter().map(|r| (r.model_version, r.round)).collect();
        let mut running: BTreeMap<u64, u64> = BTreeMap::new();
        for id in &s.connected {
            if let Some(Some(v)) = s.running.get(id) {
                *running.entry(*v).or_insert(0) += 1;
            }
        }
        let promoted = s.promotions.last().copied();
        let previous: Vec<Option<u64>> =
            std::iter::once(None).chain(kept.iter().map(|(v, _)| Some(*v))).take(kept.len()).collect();
        let mut lines: Vec<ModelLine> = kept
            .into_iter()
            .zip(previous)
            .map(|((version, hash), parent)| match s.registry.get(&version) {
                Some(r) => ModelLine {
                    version,
                    hash,
                    accuracy: evals.get(&version).map(|e| e.accuracy),
                    latency_us: r.latency_us,
                    epsilon: r.epsilon.or_else(|| epsilon.get(&version).copied()),
                    role: r.role,
                    architecture: r.architecture.clone(),
                    parent: r.parent.or(parent),
                    round: r.round,
                    parameters: r.parameters,
                    size_bytes: r.size_bytes,
                    created_at: r.created_at,
                    signed: !r.signature.is_empty(),
                    promoted: promoted == Some(version),
                    devices_running: running.get(&version).copied().unwrap_or(0),
                },
                None => ModelLine {
                    version,
                    hash,
                    accuracy: evals.get(&version).map(|e| e.accuracy),
                    latency_us: None,
                    epsilon: epsilon.get(&version).copied(),
                    role: ModelRole::Global,
                    architecture: s.architecture.clone(),
                    parent,
                    round: round_of.get(&version).copied().unwrap_or(0),
                    parameters: s.engine.global().numel() as u64,
                    size_bytes: s.store.as_ref().and_then(|st| st.model_blob_size(&hash)).unwrap_or(0),
                    created_at: 0,
                    signed: false,
                    promoted: false,
                    devices_running: 0,
                },
            })
            .collect();
        lines.extend(s.registry.values().filter(|r| r.role == ModelRole::Student).map(|r| ModelLine {
            version: r.version,
            hash: r.sha256,
            accuracy: r.accuracy,
            latency_us: r.latency_us,
            epsilon: r.epsilon,
            role: r.role,
            architecture: r.architecture.clone(),
            parent: r.parent,
            round: r.round,
            parameters: r.parameters,
            size_bytes: r.size_bytes,
            created_at: r.created_at,
            signed: !r.signature.is_empty(),
            promoted: promoted == Some(r.version),
            devices_running: running.get(&r.version).copied().unwrap_or(0),
        }));
        lines.sort_by_key(|l| l.version);
        lines
    }

    async fn operator_session(self: Arc<Self>, peer: Peer) {
        while let Ok((mut send, mut recv)) = peer.connection.accept_bi().await {
            let reply = match fedge_net::read_message(&mut recv).await {
                Ok(Message::Operator(OperatorCommand::StartRounds {
                    rounds,
                    fraction,
                    min_train_clients,
                    deadline_secs,
                })) => {
                    let mut s = self.lock();
                    let changed = s.engine.reconfigure(|c| {
                        if let Some(f) = fraction {
                            c.fraction = f;
                        }
                        if let Some(k) = min_train_clients {
                            c.min_train_clients = k as usize;
                        }
                        if let Some(d) = deadline_secs {
                            c.round_timeout = Duration::from_secs(d);
                        }
                    });
                    if changed.is_ok()
                        && let Some(store) = &s.store
                        && let Err(e) = store.save_settings(&Settings::of(s.engine.config()))
                    {
                        eprintln!("cannot record the new settings: {e}");
                    }
                    let changed = changed
                        .map_err(|e| e.to_string())
                        .and_then(|()| s.engine.check_budget(rounds).map_err(|e| e.to_string()));
                    drop(s);
                    match changed {
                        Ok(()) => {
                            self.start_rounds(rounds);
                            Message::Status(self.status())
                        }
                        Err(message) => Message::Error { code: ErrorCode::Malformed, message },
                    }
                }
                Ok(Message::Operator(OperatorCommand::Status)) => Message::Status(self.status()),
                Ok(Message::Operator(OperatorCommand::Devices)) => Message::Devices(self.devices()),
                Ok(Message::Operator(OperatorCommand::Models)) => Message::Models(self.models()),
                Ok(Message::Operator(OperatorCommand::Promote { version })) => match self.promote(version) {
                    Ok(()) => Message::Models(self.models()),
                    Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                },
                Ok(Message::Operator(OperatorCommand::Rollback)) => match self.rollback() {
                    Ok(_) => Message::Models(self.models()),
                    Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                },
                Ok(_) => {
                    Message::Error { code: ErrorCode::Unauthorized, message: "operators send operator commands".into() }
                }
                Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
            };
            if fedge_net::write_message(&mut send, &reply).await.is_err() {
                break;
            }
            let _ = send.finish();
        }
    }

    /// Reads registered version `v`'s blob from the blob store into memory (hash-checked), if
    /// it is not there yet. A failure is logged; the device is then told the version is not kept.
    async fn cache_blob(&self, v: u64) {
        let (hash, blobs) = {
            let s = self.lock();
            if s.blobs.contains_key(&v) {
                return;
            }
            match (s.registry.get(&v), &s.blob_store) {
                (Some(r), Some(b)) => (r.sha256, b.clone()),
                _ => return,
            }
        };
        // Global versions' blobs are the store's own model files.
        let from_store = {
            let s = self.lock();
            match (s.registry.get(&v), &s.store) {
                (Some(r), Some(st)) if r.format == BlobFormat::F32 => st.model_bytes(v).ok().flatten(),
                _ => None,
            }
        };
        let read = match from_store {
            Some(bytes) if ContentHash::of_bytes(&bytes) == hash => Ok(bytes),
            _ => blobs.get(&hash).await,
        };
        match read {
            Ok(bytes) => {
                self.lock().blobs.insert(v, Arc::new(bytes));
            }
            Err(e) => eprintln!("cannot read the blob of v{v}: {e}"),
        }
    }

    async fn device_session(self: Arc<Self>, peer: Peer) {
        let version = self.lock().engine.version();
        let hello = match answer_hello(&peer, version).await {
            Ok(hello) => hello,
            Err(e) => {
                self.metrics.rejected(e.code());
                eprintln!("{}: {e}", peer.identity.id);
                // Let the refusal reach the device before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(5), peer.connection.closed()).await;
                return;
            }
        };
        let training = hello.purpose == SessionPurpose::Train;
        let id = {
            let mut s = self.lock();
            let name = peer.identity.id.clone();
            let id = match (s.ids.get(&name), &s.store) {
                (Some(&id), _) => id,
                (None, Some(store)) => match store.device_id(&name) {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("device {name}: cannot register: {e}");
                        return;
                    }
                },
                (None, None) => s.ids.len() as DeviceId,
            };
            s.ids.insert(name, id);
            if training {
                s.connected.insert(id);
                s.capabilities.insert(id, hello.capabilities);
                s.engine.handle_device_available(id);
                self.pump(&mut s);
            }
            id
        };
        while let Ok((mut send, mut recv)) = peer.connection.accept_bi().await {
            let request = match fedge_net::read_message_sized(&mut recv).await {
                Ok((m, n)) => {
                    self.metrics.received(n);
                    m
                }
                Err(e) => {
                    let code = match e {
                        fedge_net::FrameError::TooLarge(_) => ErrorCode::TooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    self.metrics.rejected(code);
                    eprintln!("device {}: bad frame: {e}", peer.identity.id);
                    let reply = Message::Error { code, message: e.to_string() };
                    let _ = fedge_net::write_message(&mut send, &reply).await;
                    continue;
                }
            };
            let request = match request {
                Message::InferRequest(r) => {
                    // Answered on its own task: the teacher's batch window must not hold up
                    // this device's other requests.
                    let (me, name) = (self.clone(), peer.identity.id.clone());
                    tokio::spawn(async move {
                        let reply = match me.infer(&name, r).await {
                            Ok(a) => Message::InferAnswer(a),
                            Err(e) => Message::Error { code: e.code(), message: e.to_string() },
                        };
                        let bytes = fedge_core::codec::encode(&reply);
                        me.metrics.sent(bytes.len() + 4);
                        if fedge_net::write_encoded(&mut send, &bytes).await.is_ok() {
                            let _ = send.finish();
                        }
                    });
                    continue;
                }
                other => other,
            };
            if let Message::BlobChunkRequest { version, .. } = &request {
                self.cache_blob(*version).await;
            }
            let written = match self.answer(id, training, request) {
                Reply::Message(m) => {
                    let bytes = fedge_core::codec::encode(&m);
                    self.metrics.sent(bytes.len() + 4);
                    fedge_net::write_encoded(&mut send, &bytes).await
                }
                Reply::Encoded(bytes) => {
                    self.metrics.sent(bytes.len() + 4);
                    fedge_net::write_encoded(&mut send, &bytes).await
                }
                Reply::Chunk(prefix, model, range) => {
                    self.metrics.sent(prefix.len() + range.len() + 4);
                    fedge_net::write_parts(&mut send, &prefix, &model[range]).await
                }
            };
            if written.is_err() {
                break;
            }
            let _ = send.finish();
        }
        if !training {
            return;
        }
        let mut s = self.lock();
        s.connected.remove(&id);
        s.tasks.remove(&id);
        s.assigned_at.remove(&id);
        let now = self.now();
        s.engine.handle_device_gone(now, id);
        self.pump(&mut s);
    }

    /// The answer to `request` from device `id` on a training (or else inference-only) session.
    fn answer(&self, id: DeviceId, training: bool, request: Message) -> Reply {
        let mut s = self.lock();
        let reply = match request {
            Message::TaskRequest { .. } | Message::TrainResult(_) if !training => {
                self.metrics.rejected(ErrorCode::Unauthorized);
                Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: "an inference session does not train: connect for training".into(),
                }
            }
            Message::TaskRequest { running } => {
                s.running.insert(id, running);
                match s.tasks.get(&id) {
                    Some(task) => Message::TrainTask(task.clone()),
                    None => Message::NoTask {
                        retry_after_ms: RETRY_MS,
                        model_version: s.engine.version(),
                        deployed: s.promotions.last().copied(),
                    },
                }
            }
            Message::DeployedRequest { version } => match s.registry.get(&version) {
                Some(record) => Message::Deployed(record.clone()),
                None => not_kept(version),
            },
            Message::BlobChunkRequest { version, offset, max_len } => match registered_blob(&mut s, version) {
                Some(blob) if offset <= blob.len() as u64 => {
                    let start = offset as usize;
                    let end = start + (max_len.min(MAX_CHUNK_BYTES) as usize).min(blob.len() - start);
                    self.metrics.sent(end - start);
                    Message::BlobChunk {
                        version,
                        total_len: blob.len() as u64,
                        offset,
                        bytes: blob[start..end].to_vec(),
                    }
                }
                Some(blob) => Message::Error {
                    code: ErrorCode::Malformed,
                    message: format!("offset {offset} is past the end of v{version} ({} bytes)", blob.len()),
                },
                None => not_kept(version),
            },
            Message::ModelRequest { version } => {
                let v = version.unwrap_or_else(|| s.engine.version());
                match encoded_model(&mut s, v) {
                    Some((_, bytes)) => return Reply::Encoded(bytes),
                    None => not_kept(v),
                }
            }
            Message::ModelChunkRequest { version, offset, max_len } => match encoded_model(&mut s, version) {
                Some((hash, bytes)) if offset <= bytes.len() as u64 => {
                    let start = offset as usize;
                    let end = start + (max_len.min(MAX_CHUNK_BYTES) as usize).min(bytes.len() - start);
                    let total = bytes.len() as u64;
                    let prefix = fedge_core::codec::model_chunk_prefix(version, hash, total, offset, end - start);
                    return Reply::Chunk(prefix, bytes, start..end);
                }
                Some((_, bytes)) => Message::Error {
                    code: ErrorCode::Malformed,
                    message: format!("offset {offset} is past the end of model v{version} ({} bytes)", bytes.len()),
                },
                None => not_kept(version),
            },
            Message::TrainResult(result) => {
                // Checked, then made durable, then counted, then acknowledged: an `Ack` means
                // the update survives a crash.
                let reply = match s.engine.check_train_result(id, &result) {
                    Err(e) => Err((e.code(), e.to_string())),
                    Ok(()) => match s.store.as_ref().map(|st| st.save_update(result.round, id, &result)) {
                        Some(Err(e)) => Err((ErrorCode::Unavailable, format!("cannot record the update: {e}"))),
                        _ => {
                            let now = self.now();
                            match s.engine.handle_train_result(now, id, &result) {
                                Ok(()) => {
                                    s.tasks.remove(&id);
                                    let since = s.assigned_at.remove(&id).unwrap_or(now);
                                    self.metrics.update_accepted(now.saturating_sub(since));
                                    Ok(result.round)
                                }
                                Err(e) => Err((e.code(), e.to_string())),
                            }
                        }
                    },
                };
                self.pump(&mut s);
                match reply {
                    Ok(round) => Message::Ack { round },
                    Err((code, message)) => {
                        self.metrics.rejected(code);
                        eprintln!("device {id}: update refused ({code:?}): {message}");
                        Message::Error { code, message }
                    }
                }
            }
            Message::Ping { nonce } => Message::Pong { nonce },
            Message::Operator(_) => {
                self.metrics.rejected(ErrorCode::Unauthorized);
                Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: "a device certificate cannot run operator commands".into(),
                }
            }
            _ => {
                self.metrics.rejected(ErrorCode::Malformed);
                Message::Error { code: ErrorCode::Malformed, message: "unexpected message from a device".into() }
            }
        };
        Reply::Message(reply)
    }
}

/// Registers global version `v` (trained in `round`): its blob is the encoded `Model` message
/// the store already keeps; the record is signed when a signer is set.
fn register_global(s: &mut State, v: u64, round: u64, epsilon: Option<f64>) {
    if s.registry.contains_key(&v) {
        return;
    }
    let Some((_, bytes)) = encoded_model(s, v) else { return };
    let parent = s.registry.values().rev().find(|r| r.role == ModelRole::Global && r.version < v).map(|r| r.version);
    let parameters = s.models.get(&v).map_or(0, |p| p.numel() as u64);
    let mut record = ModelRecord {
        parent,
        round,
        epsilon,
        created_at: unix_now(),
        ..ModelRecord::of_blob(v, ModelRole::Global, &s.architecture, BlobFormat::F32, parameters, &bytes)
    };
    if let Some(signer) = &s.signer
        && let Err(e) = signer.sign(&mut record)
    {
        eprintln!("cannot sign global model v{v}: {e}");
    }
    if let Some(store) = &s.store
        && let Err(e) = store.save_registered(&record)
    {
        eprintln!("cannot register global model v{v}: {e}");
        return;
    }
    s.registry.insert(v, record);
    s.blobs.insert(v, bytes);
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The blob of registered version `v`, if in memory (see [`Coordinator::cache_blob`]).
fn registered_blob(s: &mut State, v: u64) -> Option<Arc<Vec<u8>>> {
    s.blobs.get(&v).cloned()
}

/// Largest chunk of a model download sent at once.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;

/// The hash and encoded `Model` message of version `v`, computed once and kept for every
/// device.
fn encoded_model(s: &mut State, v: u64) -> Option<(ContentHash, Arc<Vec<u8>>)> {
    if let Some(kept) = s.encoded.get(&v) {
        return Some(kept.clone());
    }
    let p = s.models.get(&v)?.clone();
    let hash = p.content_hash();
    let msg = Message::Model { version: v, hash, params: (*p).clone() };
    let kept = (hash, Arc::new(fedge_core::codec::encode(&msg)));
    s.encoded.insert(v, kept.clone());
    Some(kept)
}

fn not_kept(v: u64) -> Message {
    Message::Error { code: ErrorCode::StaleModel, message: format!("model version {v} is not kept") }
}

/// An answer to a device: a message, one already encoded, or a model chunk (its encoded
/// prefix, then a range of an encoded model sent without copying).
enum Reply {
    Message(Message),
    Encoded(Arc<Vec<u8>>),
    Chunk(Vec<u8>, Arc<Vec<u8>>, std::ops::Range<usize>),
}

/// Noise for a real coordinator: ChaCha20 seeded from the operating system, so the noise
/// cannot be replayed from a configuration file.
fn os_noise_rng() -> Box<dyn rand::Rng + Send> {
    use rand::SeedableRng;
    Box::new(rand_chacha::ChaCha20Rng::from_rng(&mut rand::rng()))
}
