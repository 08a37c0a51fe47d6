//! The coordinator as a service: load the configuration's certificates and evaluation data,
//! make the initial model, serve devices and operators, and evaluate every new model version.
//!
//! With `main.rs`, the one coordinator place that calls into burn (fedge-learn): for the
//! initial model and the evaluation of each version on a test split.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use fedge_core::dataset::DatasetName;
use fedge_core::registry::ModelRole;
use fedge_engine::Evaluation;
use fedge_learn::{BackendKind, ModelKind, Trainer};

use crate::certs::{CertDir, CertError};
use crate::config::ServeConfig;
use crate::listener::{Listener, ListenerError};
use crate::root_set::RootSet;
use crate::server::{Coordinator, ServerError};
use crate::store::{Store, StoreError};

/// Why the coordinator service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A configuration value names something that does not exist.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The evaluation dataset could not be loaded.
    #[error("failed to load the evaluation dataset: {0}")]
    Data(#[from] fedge_core::dataset::DatasetError),
    /// The certificate folder is missing or broken.
    #[error("failed to open the certificate folder: {0}")]
    Certs(#[from] CertError),
    /// The training backend is not available.
    #[error(transparent)]
    Backend(#[from] fedge_learn::BackendError),
    /// The state folder cannot be opened.
    #[error("failed to open the state folder: {0}")]
    Store(#[from] StoreError),
    /// A durable write failed while serving: the coordinator stopped.
    #[error("the coordinator stopped: storage failed: {0}")]
    StorageFailed(String),
    /// The stored state cannot be resumed.
    #[error("failed to start from the stored state: {0}")]
    Resume(#[from] ServerError),
    /// The QUIC endpoint cannot be bound.
    #[error(transparent)]
    Transport(#[from] ListenerError),
    /// The blob store URL is unusable.
    #[error(transparent)]
    Blobs(#[from] crate::blobs::BlobError),
    /// A socket could not be opened.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs the coordinator described by `c` until `shutdown` completes; `ready` is called with
/// the bound address once it listens.
pub async fn run(
    c: ServeConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let model = c.model.parse::<ModelKind>().and_then(ModelKind::images_only).map_err(ServiceError::Config)?;
    if let Some(addr) = c.metrics_listen {
        crate::web::check_listen(addr, c.page_token.as_deref()).map_err(ServiceError::Config)?;
    }
    let dataset =
        c.eval_dataset.parse::<DatasetName>().and_then(DatasetName::images_only).map_err(ServiceError::Config)?;
    let data = dataset.load(&c.data_dir)?;
    let test = data.test;
    let certs = CertDir::open(&c.certs_dir)?;
    // A region signs nothing (it relays its root's signed models): it needs no signing key.
    let signer = match c.upstream {
        None => Some(certs.model_signer()?),
        Some(_) => None,
    };
    let mut evaluator = Trainer::new(model, test.num_classes, BackendKind::Cpu)?;
    let student_kind =
        c.student_model.parse::<ModelKind>().and_then(ModelKind::images_only).map_err(ServiceError::Config)?;
    let train = std::sync::Arc::new(data.train);
    let mut proxy_examples = 0;
    let regional_kind = match &c.regional_model {
        Some(name) if c.distill_every.is_none() => {
            return Err(ServiceError::Config(format!(
                "regional_model = \"{name}\" is distilled with the students: set distill_every too"
            )));
        }
        Some(name) => Some(name.parse::<ModelKind>().and_then(ModelKind::images_only).map_err(ServiceError::Config)?),
        None => None,
    };
    let distiller = match c.distill_every {
        Some(0) => return Err(ServiceError::Config("distill_every must be at least 1".into())),
        Some(every) => {
            c.distill.validate().map_err(ServiceError::Config)?;
            let n = train.len();
            proxy_examples = c.proxy_examples.clamp(1, n);
            let proxy: Vec<usize> = (n - proxy_examples..n).collect();
            let mut student = Trainer::new(student_kind, test.num_classes, BackendKind::Flex)?;
            let start = student.initial_params(c.seed ^ 0x5eed);
            let regional = match regional_kind {
                Some(kind) => {
                    let mut trainer = Trainer::new(kind, test.num_classes, BackendKind::Flex)?;
                    let start = trainer.initial_params(c.seed ^ 0x4e61);
                    // Medium-tier: dense (pruning is for what devices download).
                    let config = fedge_learn::DistillConfig { sparsity: 0.0, ..c.distill };
                    Some(fedge_learn::WarmStudent::new(trainer, start, proxy.clone(), config))
                }
                None => None,
            };
            let student = fedge_learn::WarmStudent::new(student, start, proxy, c.distill);
            Some(Distiller { every, student, regional, train: train.clone() })
        }
        None => None,
    };
    let initial = evaluator.initial_params(c.seed);
    let engine = c.engine().map_err(|e| ServiceError::Config(e.to_string()))?;
    let fedbuff = c.fedbuff().map_err(ServiceError::Config)?;
    // FLTrust: the server's root set, the training examples just before the proxy set.
    let root_set = match engine.strategy.root_examples() {
        Some(n) => {
            let indices = RootSet::tail_indices(&train, n, proxy_examples).map_err(ServiceError::Config)?;
            Some((n, RootSet::new(model, train.clone(), indices, c.seed).map_err(ServiceError::Config)?))
        }
        None => None,
    };
    let upstream = match c.upstream().map_err(ServiceError::Config)? {
        Some(u) => {
            let mut upstream = crate::server::Upstream::new(&u.address, &u.server_name, &u.ca, &u.cert, &u.key)
                .map_err(|e| ServiceError::Config(format!("[upstream]: {e}")))?;
            let key_path = u.model_key.clone().unwrap_or_else(|| c.certs_dir.join("model-signing.pub"));
            if u.model_key.is_some() || key_path.exists() {
                let key = fedge_net::ModelKey::read(&key_path)
                    .map_err(|e| ServiceError::Config(format!("[upstream] model_key: {e}")))?;
                upstream = upstream.with_model_key(key);
            }
            // The regional tier calibrates on the end of the test split, unlabelled.
            let n = u.calibration_examples.min(test.len());
            let calibration = (test.len() - n..test.len()).map(|i| test.image(i).to_vec()).collect();
            let tier = crate::server::TierConfig {
                escalate_rate: u.escalate_rate,
                measure: fedge_core::escalation::ConfidenceMeasure::MaxSoftmax,
                calibration,
                shape: (test.rows, test.cols),
            };
            Some((upstream, tier))
        }
        None => None,
    };
    if c.max_samples_per_region == 0 {
        return Err(ServiceError::Config("max_samples_per_region must be at least 1".into()));
    }
    let store = Store::open(&c.state_dir)?;
    if upstream.is_none() && store.upstream()?.is_some() {
        // Once a regional aggregator, now not: the stored root task no longer sets how its
        // devices train.
        tracing::info!("no [upstream]: forgetting the root task this state kept as a region");
        store.forget_upstream()?;
    }
    let coordinator = match fedbuff {
        Some(async_config) => {
            tracing::info!(
                "FedBuff mode: every {} results make a version, at most {} devices training",
                async_config.buffer_size,
                async_config.max_concurrency
            );
            let timeout = std::time::Duration::from_secs(c.round_timeout_secs);
            Coordinator::with_store_fedbuff(async_config, timeout, initial, store)?
        }
        None => Coordinator::with_store(engine, initial, store)?,
    };
    // A region signs nothing: its registry holds its root's signed students, relayed.
    if let Some(signer) = signer {
        coordinator.set_signer(signer, &c.model);
    }
    coordinator.set_max_samples_per_region(c.max_samples_per_region);
    if let Some(settings) = c.secure().map_err(ServiceError::Config)? {
        coordinator.set_secure_aggregation(settings).map_err(ServiceError::Config)?;
        tracing::info!("secure aggregation: rounds sum their devices' masked updates (SecAgg+)");
    }
    let follower = match upstream {
        Some((upstream, tier)) => {
            tracing::info!("regional aggregator of the root at {upstream:?}");
            if c.inference.enabled {
                let shape = tier.shape;
                let builder: crate::server::TierBuilder = Box::new(move |record, params| {
                    let kind = record.architecture.parse::<ModelKind>()?;
                    let predictor =
                        fedge_learn::Predictor::new(kind, params, BackendKind::Flex).map_err(|e| e.to_string())?;
                    Ok(Box::new(TierPredictor { predictor, shape }) as Box<dyn crate::server::TierModel>)
                });
                coordinator.set_regional_tier(tier, builder).map_err(ServiceError::Config)?;
            }
            Some(coordinator.follow_upstream(upstream)?)
        }
        None => None,
    };
    if let Some((n, root_set)) = root_set {
        tracing::info!("FLTrust: the server's root set is {n} training examples, held by the coordinator");
        coordinator.set_root_trainer(Box::new(root_set));
    }
    if let Some(url) = &c.blob_store {
        coordinator.set_blob_store(crate::blobs::BlobStore::from_url(url)?);
    }
    if c.inference.enabled {
        c.inference.validate().map_err(ServiceError::Config)?;
        let teacher = BurnTeacher::new(model, test.num_classes, (test.rows, test.cols));
        coordinator.set_inference(c.inference, Box::new(teacher));
    }
    let listener = Listener::bind(c.listen, &certs)?;
    ready(listener.local_addr().map_err(|source| ServiceError::Io { context: "no local address".into(), source })?);
    let mut server = tokio::spawn(coordinator.clone().serve(listener));
    let metrics = match c.metrics_listen {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServiceError::Io {
                context: format!("cannot listen for metrics on {addr}"),
                source,
            })?;
            let bound =
                tcp.local_addr().map_err(|source| ServiceError::Io { context: "no metrics address".into(), source })?;
            tracing::info!("metrics on http://{bound}/metrics, operator page on http://{bound}/");
            let site = crate::web::Site::new(coordinator.metrics(), Some(coordinator.clone()), c.page_token.clone());
            Some(tokio::spawn(std::sync::Arc::new(site).serve(tcp)))
        }
        None => None,
    };
    let follow = FollowUp {
        coordinator: coordinator.clone(),
        auto_promote: c.auto_promote,
        student: c.student_model.clone(),
        regional: c.regional_model.clone(),
    };
    let eval = {
        let coordinator = coordinator.clone();
        // Evaluation and distillation take seconds of CPU: they run on a blocking thread, the
        // state moving there and back, so the runtime's workers keep serving devices.
        let mut work = Some(Work { evaluator, distiller, test });
        tokio::spawn(async move {
            // A kill between a round's close and its follow-up left the latest version without
            // its evaluation or its student: finish them first.
            if let Some((version, round, evaluate)) = follow.interrupted(work.as_ref()) {
                let (v, global) = coordinator.global();
                if v == version {
                    tracing::info!("finishing what a restart interrupted for v{version} (round {round})");
                    let Some(line) = follow.run(&mut work, version, global, evaluate, (round, true)).await else {
                        return;
                    };
                    tracing::info!("model v{version} (round {round}, before the restart): {line}");
                }
            }
            let mut seen = 0;
            loop {
                coordinator.wait_for_rounds(seen + 1).await;
                let reports = coordinator.reports();
                for r in &reports[seen..] {
                    let (version, global) = coordinator.global();
                    let evaluate = version == r.model_version;
                    let round = (r.round, r.outcome == fedge_engine::RoundOutcome::Aggregated);
                    let Some(line) = follow.run(&mut work, version, global, evaluate, round).await else { return };
                    tracing::info!(
                        "round {} -> model v{}: {}/{} results, {} failed, {} late; {line}",
                        r.round,
                        r.model_version,
                        r.results,
                        r.selected,
                        r.failures,
                        r.stragglers.len()
                    );
                }
                seen = reports.len();
            }
        })
    };
    // The server stops by itself only when the storage failed.
    tokio::select! {
        () = shutdown => {}
        _ = &mut server => {}
    }
    eval.abort();
    server.abort();
    if let Some(f) = follower {
        f.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    match coordinator.storage_failure() {
        Some(why) => Err(ServiceError::StorageFailed(why.to_string())),
        None => Ok(()),
    }
}

/// The teacher behind the coordinator's inference endpoint: the global model on the CPU
/// (fedge-learn's flex backend), rebuilt when the version changes.
pub struct BurnTeacher {
    kind: ModelKind,
    classes: usize,
    shape: (usize, usize),
    built: Option<(u64, fedge_learn::Predictor)>,
}

impl BurnTeacher {
    /// A teacher of architecture `kind` over `classes` classes taking `shape` (rows, cols)
    /// images.
    pub fn new(kind: ModelKind, classes: usize, shape: (usize, usize)) -> Self {
        Self { kind, classes, shape, built: None }
    }
}

impl crate::inference::Teacher for BurnTeacher {
    fn input_shape(&self) -> (usize, usize) {
        self.shape
    }

    fn answer(
        &mut self,
        version: u64,
        params: &fedge_core::ModelParams,
        images: &[&[u8]],
    ) -> Result<Vec<Vec<f32>>, String> {
        if self.built.as_ref().is_none_or(|(v, _)| *v != version) {
            let p = fedge_learn::Predictor::new(self.kind, params, BackendKind::Flex).map_err(|e| e.to_string())?;
            self.built = Some((version, p));
        }
        let (_, p) = self.built.as_ref().expect("built above");
        let out = p.predict_batch(images, self.shape.0, self.shape.1);
        debug_assert!(out.iter().all(|o| o.probabilities.len() == self.classes));
        Ok(out.into_iter().map(|o| o.probabilities).collect())
    }
}

/// A regional aggregator's medium-tier model on the CPU (fedge-learn's flex backend).
struct TierPredictor {
    predictor: fedge_learn::Predictor,
    shape: (usize, usize),
}

impl crate::server::TierModel for TierPredictor {
    fn classify(&mut self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String> {
        let out = self.predictor.predict_batch(images, self.shape.0, self.shape.1);
        Ok(out.into_iter().map(|o| o.probabilities).collect())
    }
}

/// The evaluation task's state: the evaluator, the student being distilled (every K rounds,
/// warm-started from the last), the test split.
/// What follows a round's close: evaluating the new version and distilling it when due.
struct FollowUp {
    coordinator: Arc<Coordinator>,
    auto_promote: bool,
    student: String,
    /// The regional model's architecture, when one is distilled too.
    regional: Option<String>,
}

impl FollowUp {
    /// The latest global version, its round and whether it still needs its evaluation, when it
    /// lacks the evaluation or (distillation due for its round) its student: what a kill
    /// between the close and its follow-up left undone.
    fn interrupted(&self, work: Option<&Work>) -> Option<(u64, u64, bool)> {
        let (version, _) = self.coordinator.global();
        let models = self.coordinator.models();
        let line = models.iter().find(|m| m.version == version && m.role == ModelRole::Global)?;
        if version == 0 {
            return None;
        }
        let evaluate = line.accuracy.is_none();
        let due = work.and_then(|w| w.distiller.as_ref()).is_some_and(|d| line.round % d.every == 0);
        let distilled = models.iter().any(|m| m.role == ModelRole::Student && m.parent == Some(version));
        (evaluate || (due && !distilled)).then_some((version, line.round, evaluate))
    }

    /// Evaluates `version` (`global`) if `evaluate` and distils it if `round` is due, on a
    /// blocking thread; records the evaluation, registers (and maybe promotes) the student.
    /// The evaluation's line for the log; `None` when the evaluation thread failed.
    async fn run(
        &self,
        work: &mut Option<Work>,
        version: u64,
        global: Arc<fedge_core::ModelParams>,
        evaluate: bool,
        round: (u64, bool),
    ) -> Option<String> {
        let mut w = work.take()?;
        let done = tokio::task::spawn_blocking(move || {
            let evaluation = evaluate.then(|| w.evaluator.evaluate(&global, &w.test, 500));
            let distilled = w.distil_if_due(round, &global);
            (w, evaluation, distilled)
        })
        .await;
        let Ok((w, evaluation, distilled)) = done else {
            tracing::error!("evaluation stopped: the evaluation thread failed");
            return None;
        };
        *work = Some(w);
        let line = match evaluation {
            Some(Ok(m)) => {
                self.coordinator.record_evaluation(version, Evaluation { accuracy: m.accuracy, loss: m.loss });
                format!("accuracy {:.2}% loss {:.4}", m.accuracy * 100.0, m.loss)
            }
            Some(Err(e)) => format!("evaluation failed: {e}"),
            None => String::from("(superseded before evaluation)"),
        };
        if let Some((student, regional)) = distilled {
            match student {
                Ok(d) => self.register(version, round.0, d).await,
                Err(e) => tracing::error!("distillation of v{version} failed: {e}"),
            }
            match regional {
                Some(Ok(d)) => self.register_regional(version, round.0, d).await,
                Some(Err(e)) => tracing::error!("distillation of v{version} into a regional model failed: {e}"),
                None => {}
            }
        }
        Some(line)
    }

    /// Registers the regional (medium-tier) model distilled from `version`.
    async fn register_regional(&self, version: u64, round: u64, d: fedge_learn::QuantizedStudent) {
        let Some(architecture) = self.regional.clone() else { return };
        let model = crate::server::NewStudent {
            parent: version,
            round,
            architecture,
            parameters: d.params.numel() as u64,
            accuracy: Some(d.accuracy),
            latency_us: Some(d.student_latency_us),
            blob: d.blob,
        };
        match self.coordinator.register_regional(model).await {
            Ok(rec) => tracing::info!(
                "distilled v{version} into regional model v{} ({}, int8, {} bytes): accuracy {:.2}%",
                rec.version,
                rec.architecture,
                rec.size_bytes,
                d.accuracy * 100.0
            ),
            Err(e) => tracing::error!("cannot register the regional model of v{version}: {e}"),
        }
    }

    /// Registers the student distilled from `version` (promoting it when set to).
    async fn register(&self, version: u64, round: u64, d: fedge_learn::QuantizedStudent) {
        let student = crate::server::NewStudent {
            parent: version,
            round,
            architecture: self.student.clone(),
            parameters: d.params.numel() as u64,
            accuracy: Some(d.accuracy),
            latency_us: Some(d.student_latency_us),
            blob: d.blob,
        };
        match self.coordinator.register_student(student, self.auto_promote).await {
            Ok(rec) => {
                let _ = self.coordinator.set_latency(version, d.teacher_latency_us);
                tracing::info!(
                    "distilled v{version} into student v{} ({}, int8{}, {} bytes): accuracy {:.2}%, {:.1} us per image (teacher {:.1} us){}",
                    rec.version,
                    self.student,
                    if d.sparsity > 0.0 { format!(", {:.0}% pruned", d.sparsity * 100.0) } else { String::new() },
                    rec.size_bytes,
                    d.accuracy * 100.0,
                    d.student_latency_us,
                    d.teacher_latency_us,
                    if self.auto_promote { ", promoted" } else { "" }
                )
            }
            Err(e) => tracing::error!("cannot register the student of v{version}: {e}"),
        }
    }
}

struct Work {
    evaluator: Trainer,
    distiller: Option<Distiller>,
    test: fedge_core::dataset::Dataset,
}

/// Distillation every `every` rounds: the student, the regional model (if one is distilled
/// too), the training split their proxy images are in.
struct Distiller {
    every: u64,
    student: fedge_learn::WarmStudent,
    regional: Option<fedge_learn::WarmStudent>,
    train: std::sync::Arc<fedge_core::dataset::Dataset>,
}

/// What one follow-up distilled: the student and, when configured, the regional model.
type Distilled = (
    Result<fedge_learn::QuantizedStudent, fedge_learn::ConvertError>,
    Option<Result<fedge_learn::QuantizedStudent, fedge_learn::ConvertError>>,
);

impl Work {
    /// Distils `global` if `(round, aggregated)` is due a student.
    fn distil_if_due(
        &mut self,
        (round, aggregated): (u64, bool),
        global: &fedge_core::ModelParams,
    ) -> Option<Distilled> {
        let d = self.distiller.as_mut()?;
        if !aggregated || round % d.every != 0 {
            return None;
        }
        // The batch order is drawn from the OS: nothing here needs to replay.
        let mut rng = <fedge_core::rng::SeededRng as rand::SeedableRng>::from_rng(&mut rand::rng());
        let student = d.student.distil(&mut self.evaluator, global, &d.train, &self.test, &mut rng);
        let regional =
            d.regional.as_mut().map(|r| r.distil(&mut self.evaluator, global, &d.train, &self.test, &mut rng));
        Some((student, regional))
    }
}
