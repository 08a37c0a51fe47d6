//! Hybrid inference on the device: answer with the local (deployed, distilled) model, escalate
//! what it is unsure of to the coordinator's teacher, keep answering when offline.
//!
//! The decisions are fedge-core's ([`fedge_core::escalation`]); this is their shell: the local
//! model and its calibration (per model version, redone when the deployed model changes), the
//! [`Cloud`] session, speculative corrections, and the metrics of each path.
//!
//! A request never fails because the coordinator is away: when the policy wants the cloud and
//! the cloud cannot answer (offline, timeout, rate limit), the local answer is returned with
//! `verified: false` and the reason in `fallback`. A `private` request is answered locally and
//! its input is never sent; so is one whose cloud call would cost more than its budget
//! (`max_cost`, or the configured `max_cost_per_request`, against `cloud_call_cost`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fedge_core::escalation::{Policy, PolicyKind, Route, escalates};
use fedge_core::routing::{self, Conditions, Verdict};
use fedge_core::wire::InferAnswer;
use fedge_net::ModelKey;
use tokio::sync::oneshot;

use crate::cloud::Cloud;
use crate::metrics::{AnswerPath, InferenceMetrics};
use crate::predict::{COLS, LocalModel, PredictError, ROWS, check_input};

mod answer;
mod cache;
mod calibration;
mod conditions;

pub use answer::{Correction, HybridAnswer, Opinion, Request, Source};
pub use cache::{AnswerCache, CacheKey, CachedAnswer};
pub use calibration::{Calibration, CalibrationSet, HybridConfig, RateThreshold, calibrate, check_cost};
pub use conditions::{ConditionsSource, parse as parse_conditions};

/// The running local model and its calibration.
struct Loaded {
    model: LocalModel,
    calibration: Calibration,
    /// The version `deployed/current` named when it was loaded (another one than the model's
    /// when that version failed verification and the previous one runs instead).
    current: Option<u64>,
}

/// Answers requests under a policy, with the deployed model of a state folder.
pub struct HybridPredictor {
    config: HybridConfig,
    state_dir: PathBuf,
    key: ModelKey,
    set: CalibrationSet,
    local: RwLock<Option<Arc<Loaded>>>,
    cloud: Cloud,
    metrics: Arc<InferenceMetrics>,
    next_id: AtomicU64,
    /// Whether the drift warning was given (for the running model).
    drifting: std::sync::atomic::AtomicBool,
    conditions: ConditionsSource,
    cache: Arc<Mutex<AnswerCache>>,
}

impl HybridPredictor {
    /// A predictor over `state_dir`'s deployed model (verified with `key`), calibrated on
    /// `set`, escalating through `cloud`. Loads and calibrates the model now if there is one;
    /// without one every request needs the cloud.
    pub fn new(
        config: HybridConfig,
        state_dir: PathBuf,
        key: ModelKey,
        set: CalibrationSet,
        cloud: Cloud,
    ) -> Result<Self, PredictError> {
        config.validate().map_err(PredictError::Input)?;
        if set.is_empty() {
            return Err(PredictError::Input("no held-out images to calibrate on".into()));
        }
        let me = Self {
            state_dir,
            key,
            set,
            local: RwLock::new(None),
            cloud,
            metrics: Arc::new(InferenceMetrics::default()),
            next_id: AtomicU64::new(1),
            drifting: std::sync::atomic::AtomicBool::new(false),
            conditions: ConditionsSource::new(config.conditions_file.clone()),
            cache: Arc::new(Mutex::new(AnswerCache::new(config.cache_entries))),
            config,
        };
        match me.refresh() {
            Ok(_) | Err(PredictError::NoModel(_)) => Ok(me),
            Err(e) => Err(e),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<InferenceMetrics> {
        &self.metrics
    }

    /// The policy.
    pub fn config(&self) -> &HybridConfig {
        &self.config
    }

    /// The cloud session.
    pub fn cloud(&self) -> &Cloud {
        &self.cloud
    }

    /// The calibration of the running model, if one runs.
    pub fn calibration(&self) -> Option<Calibration> {
        self.loaded().map(|l| l.calibration.clone())
    }

    fn loaded(&self) -> Option<Arc<Loaded>> {
        self.local.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads and calibrates the deployed model if it changed (blocking: tens of
    /// milliseconds); returns the new calibration, `None` when nothing changed.
    pub fn refresh(&self) -> Result<Option<Calibration>, PredictError> {
        let dir = self.state_dir.join("deployed");
        let on_disk = crate::deploy::current_version(&dir);
        let loaded_for = self.loaded().and_then(|l| l.current);
        if on_disk.is_some() && on_disk == loaded_for {
            return Ok(None);
        }
        let model = LocalModel::load(&self.state_dir, &self.key)?;
        let calibration = calibrate(&model, &self.set, &self.config)?;
        self.metrics.calibrated_for(calibration.model_version, calibration.threshold, calibration.target_rate);
        *self.local.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Loaded { model, calibration: calibration.clone(), current: on_disk }));
        self.drifting.store(false, Ordering::Relaxed);
        Ok(Some(calibration))
    }

    /// The conditions now: the integrator's file and the measured round trip.
    pub fn conditions(&self) -> Conditions {
        let mut c = self.conditions.current();
        if let Some(rtt) = self.cloud.rtt() {
            self.metrics.rtt(rtt);
            c.rtt_ms = Some(rtt.as_secs_f64() * 1e3);
        }
        c
    }

    /// The cached cloud answer to `key`, after moving the cache to the teacher version last
    /// heard of.
    fn cached(&self, key: Option<CacheKey>) -> Option<CachedAnswer> {
        let key = key?;
        if self.config.cache_entries == 0 {
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = self.cloud.teacher_version() {
            cache.teacher(v);
        }
        let hit = cache.get(&key);
        self.metrics.cache(hit.is_some(), cache.len());
        hit
    }

    /// Answers one request under the policy (see the module docs).
    pub async fn predict(&self, request: Request) -> Result<HybridAnswer, PredictError> {
        check_input(&request.pixels)?;
        let started = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.metrics.request();
        let policy = self.config.policy;
        let loaded = self.loaded();
        // The local opinion, unless the policy goes to the cloud first (then only on fallback).
        let local = |loaded: &Loaded| -> Result<(Opinion, f32), PredictError> {
            let t = Instant::now();
            let p = loaded.model.classify(&request.pixels)?;
            self.metrics.observe(AnswerPath::Local, t.elapsed());
            let score = self.config.confidence.score(&p.probabilities);
            Ok((Opinion { class: p.class, confidence: p.confidence, model_version: loaded.model.version() }, score))
        };
        let mut mine = match (&loaded, policy.needs_local()) {
            (Some(l), true) => Some(local(l)?),
            _ => None,
        };
        let default_threshold = loaded.as_ref().map(|l| l.calibration.threshold);
        if let (Some((_, score)), Some(t)) = (mine, default_threshold)
            && let Some(rate) = self.metrics.decided(escalates(score, t))
            && !self.drifting.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "inference: {:.1}% of recent answers are below the threshold calibrated for {:.1}%: live inputs differ from the calibration images",
                rate * 100.0,
                self.config.target_rate * 100.0
            );
        }
        // The rate the live conditions allow, and its threshold.
        let choice = routing::choose(self.config.target_rate, &self.config.rules, &self.conditions());
        let threshold = loaded.as_ref().map(|l| l.calibration.threshold_for(choice.target_rate));
        let decide = |online: bool, private: bool| match (&loaded, threshold) {
            (Some(_), Some(t)) => policy.with_threshold(t).route(mine.map(|(_, s)| s), online, private),
            // Without a local model only the cloud can answer: every policy is cloud-first.
            _ => Policy::CloudFirst.route(None, online, private),
        };
        let wanted = decide(true, false);
        let route = decide(self.cloud.online(), request.private);
        // Why, in words and as a metric label.
        let (label, mut reason): (&'static str, String) = match (policy, mine, default_threshold, threshold) {
            (PolicyKind::LocalOnly, ..) => ("local-only", "local-only policy".into()),
            (PolicyKind::Cascade | PolicyKind::Speculative, Some((_, score)), Some(d), Some(t)) => {
                match routing::verdict(score, d, t, &choice) {
                    (Verdict::Confident, r) => ("confident", r),
                    (Verdict::KeptLocal, r) => ("kept-local", r),
                    (Verdict::Escalated, r) => ("escalated", r),
                }
            }
            (_, _, Some(_), _) => ("cloud-first", "cloud-first policy".into()),
            _ => ("cloud-first", "no local model: cloud first".into()),
        };
        let local_reason = if wanted == Route::Local {
            None
        } else if request.private {
            Some("private")
        } else {
            Some("offline")
        };
        let target_rate = (policy != PolicyKind::LocalOnly).then_some(choice.target_rate);
        let answer = |mine: (Opinion, f32), verified: bool, fallback: Option<&'static str>, escalated: bool, why| {
            let (o, score) = mine;
            HybridAnswer {
                id,
                class: o.class,
                confidence: o.confidence,
                answered_by: Source::Local,
                model_version: o.model_version,
                architecture: loaded.as_ref().map(|l| l.model.architecture().to_string()),
                latency_ms: started.elapsed().as_secs_f64() * 1e3,
                policy,
                escalated,
                verified,
                fallback,
                local: Some(o),
                score: Some(score),
                threshold,
                route_reason: why,
                target_rate,
                correction_pending: false,
                correction: None,
            }
        };
        let cloud_answer =
            |class: usize, confidence: f32, (version, tier), escalated: bool, why: String| HybridAnswer {
                id,
                class,
                confidence,
                answered_by: Source::of_tier(tier),
                model_version: version,
                architecture: None,
                latency_ms: started.elapsed().as_secs_f64() * 1e3,
                policy,
                escalated,
                verified: true,
                fallback: None,
                local: mine.map(|(o, _)| o),
                score: mine.map(|(_, s)| s),
                threshold,
                route_reason: why,
                target_rate,
                correction_pending: false,
                correction: None,
            };
        let local_or_fail = |mine: Option<(Opinion, f32)>, loaded: &Option<Arc<Loaded>>| match (mine, loaded) {
            (Some(m), _) => Ok(m),
            (None, Some(l)) => local(l),
            (None, None) => Err(PredictError::NoModel(self.state_dir.join("deployed").display().to_string())),
        };
        // A cloud answer already on the device (never for a private request: it has no key).
        let key = CacheKey::of(&request);
        if route != Route::Local
            && let Some(hit) = self.cached(key)
        {
            self.metrics.routed("cached", target_rate);
            self.metrics.answered(AnswerPath::Cloud);
            let why = format!("cached cloud answer (teacher v{})", hit.model_version);
            return Ok(cloud_answer(hit.class, hit.confidence, (hit.model_version, hit.tier), false, why));
        }
        // A cloud call this request cannot afford: answered locally (a cached answer above cost
        // nothing and was taken).
        let budget = request.max_cost.or(self.config.max_cost_per_request);
        let over_budget = match (self.config.cloud_call_cost, budget) {
            (Some(cost), Some(budget)) if route != Route::Local && cost > budget => {
                Some(format!("over budget: a cloud call costs {cost}, this request allows {budget}"))
            }
            _ => None,
        };
        let (route, local_reason) = match &over_budget {
            Some(_) => (Route::Local, Some("over-budget")),
            None => (route, local_reason),
        };
        let keep = |a: &InferAnswer| {
            if let Some(key) = key.filter(|_| self.config.cache_entries > 0) {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let class = a.class as usize;
                let (confidence, model_version, tier) = (a.confidence, a.model_version, a.tier);
                cache.put(key, CachedAnswer { class, confidence, model_version, tier });
            }
        };
        match route {
            Route::Local => {
                let m = local_or_fail(mine, &loaded).map_err(|e| match (e, local_reason) {
                    (PredictError::NoModel(d), Some(r)) => {
                        PredictError::NoModel(format!("{d}, and the cloud cannot be asked ({r})"))
                    }
                    (e, _) => e,
                })?;
                if let Some(r) = local_reason {
                    self.metrics.fell_back(r);
                    reason = over_budget.clone().unwrap_or_else(|| r.to_string());
                }
                self.metrics.routed(local_reason.unwrap_or(label), target_rate);
                self.metrics.answered(AnswerPath::Local);
                Ok(answer(m, local_reason.is_none(), local_reason, false, reason))
            }
            Route::Cloud => {
                self.metrics.escalated();
                let t = Instant::now();
                match self.cloud.ask(&request.pixels, ROWS, COLS).await {
                    Ok(a) => {
                        self.metrics.observe(AnswerPath::Cloud, t.elapsed());
                        self.metrics.answered(AnswerPath::Cloud);
                        self.metrics.routed(label, target_rate);
                        if let Some((o, _)) = mine {
                            self.metrics.compared(o.class == a.class as usize);
                        }
                        keep(&a);
                        Ok(cloud_answer(a.class as usize, a.confidence, (a.model_version, a.tier), true, reason))
                    }
                    Err(e) => {
                        let fallback = e.reason();
                        if mine.is_none() {
                            mine = loaded.as_ref().map(|l| local(l)).transpose()?;
                        }
                        let m = mine.ok_or_else(|| {
                            PredictError::NoModel(format!("no local model, and the cloud did not answer: {e}"))
                        })?;
                        self.metrics.fell_back(fallback);
                        self.metrics.routed(if fallback == "offline" { "offline" } else { "fallback" }, target_rate);
                        self.metrics.answered(AnswerPath::Local);
                        Ok(answer(m, false, Some(fallback), true, format!("{reason}; cloud failed: {fallback}")))
                    }
                }
            }
            Route::LocalThenCloud => {
                let m = local_or_fail(mine, &loaded)?;
                self.metrics.escalated();
                self.metrics.routed(label, target_rate);
                self.metrics.answered(AnswerPath::Local);
                let (tx, rx) = oneshot::channel();
                let pixels = request.pixels;
                let (metrics, class) = (self.metrics.clone(), m.0.class);
                let ask = self.cloud.ask_owned(pixels);
                let (cache, key) = (self.cache.clone(), key.filter(|_| self.config.cache_entries > 0));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let out = ask.await.map(|a| {
                        metrics.observe(AnswerPath::Cloud, t.elapsed());
                        metrics.compared(a.class as usize == class);
                        if let Some(key) = key {
                            let c = CachedAnswer {
                                class: a.class as usize,
                                confidence: a.confidence,
                                model_version: a.model_version,
                                tier: a.tier,
                            };
                            cache.lock().unwrap_or_else(|p| p.into_inner()).put(key, c);
                        }
                        Correction {
                            id,
                            class: a.class as usize,
                            confidence: a.confidence,
                            model_version: a.model_version,
                            differs: a.class as usize != class,
                            latency_ms: started.elapsed().as_secs_f64() * 1e3,
                        }
                    });
                    if let Err(e) = &out {
                        metrics.fell_back(e.reason());
                    }
                    let _ = tx.send(out);
                });
                let mut a = answer(m, false, None, true, reason);
                a.correction_pending = true;
                a.correction = Some(rx);
                Ok(a)
            }
        }
    }

    /// Watches the state folder for a newly deployed model and recalibrates (every
    /// `every`), until the returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(p) = me.upgrade() else { return };
                match tokio::task::spawn_blocking(move || p.refresh()).await {
                    Ok(Ok(Some(c))) => tracing::info!(
                        "inference: model v{} calibrated: threshold {:.4} for {:.0}% escalation ({:.1}% on {} held-out images)",
                        c.model_version,
                        c.threshold,
                        c.target_rate * 100.0,
                        c.calibration_rate * 100.0,
                        c.examples
                    ),
                    Ok(Ok(None)) | Ok(Err(PredictError::NoModel(_))) => {}
                    Ok(Err(e)) => tracing::warn!("inference: cannot load the deployed model: {e}"),
                    Err(_) => return,
                }
            }
        })
    }
}
