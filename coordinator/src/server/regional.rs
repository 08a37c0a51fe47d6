//! The middle of three inference tiers: a regional aggregator answers its devices' escalated
//! requests with a medium-tier model (role `regional` in the root's registry: distilled from
//! the global model, larger than the devices' student, signed and versioned like it), and
//! escalates to its root only what that model is unsure of, at its own calibrated rate.
//!
//! The model arrives from the root: the region's upstream task asks for the newest regional
//! record (`RegionalRequest`), checks its signature with the fleet's model key, fetches its
//! blob in chunks, checks the blob against the record ([`fedge_net::open_blob`]) and builds a
//! classifier (a [`TierBuilder`] the service provides: burn stays out of the server).
//!
//! `escalate_rate` is the share of the region's *requests* it sends on, and what reaches a
//! region is what its devices' students were unsure of, not a sample of all images: the
//! threshold starts calibrated on the region's own unlabelled images (a fraction
//! `escalate_rate` of them below it, [`fedge_core::escalation::calibrate_threshold`]) and, once
//! [`TRAFFIC_WARMUP`] requests came in, follows the scores of the last [`TRAFFIC_WINDOW`]
//! requests, recalibrated every [`RECALIBRATE_EVERY`], so that the rate holds on the traffic.
//!
//! A request the region is sure of is answered here (`AnswerTier::Region`); one it is unsure
//! of goes to the root over the region's aggregator connection and the root's answer
//! (`AnswerTier::Root`) is passed on. When the root cannot be reached the region's own answer
//! stands; before any regional model is installed every request goes to the root, and if the
//! root cannot answer either, the region's teacher does (on its copy of the global model).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fedge_core::ModelParams;
use fedge_core::escalation::{ConfidenceMeasure, calibrate_threshold, escalates};
use fedge_core::registry::ModelRecord;
use fedge_core::wire::{AnswerTier, InferAnswer, InferRequest, Message};

use super::Coordinator;
use crate::inference::InferError;

/// A medium-tier model, ready to classify images (every class's probability per image).
pub trait TierModel: Send {
    /// Every class's probability for each of `images` (the size the region takes).
    fn classify(&mut self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String>;
}

/// Builds a [`TierModel`] from a verified regional record and its parameters.
pub type TierBuilder = Box<dyn Fn(&ModelRecord, &ModelParams) -> Result<Box<dyn TierModel>, String> + Send + Sync>;

/// How a region answers escalations.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// The share of requests the region sends on to its root, calibrated on `calibration`.
    pub escalate_rate: f64,
    /// How confidence is read.
    pub measure: ConfidenceMeasure,
    /// Unlabelled images of the region's kind (each `shape.0 * shape.1` bytes), the
    /// calibration set.
    pub calibration: Vec<Vec<u8>>,
    /// The image size (rows, cols).
    pub shape: (usize, usize),
}

/// What the region's tier did so far.
#[derive(Debug, Default)]
pub struct TierCounts {
    /// Requests the regional model answered.
    pub answered: AtomicU64,
    /// Requests sent on to the root and answered there.
    pub escalated: AtomicU64,
    /// Requests meant for the root that it did not answer (the region's answer stood, or
    /// none was possible).
    pub escalation_failed: AtomicU64,
}

/// The installed regional model.
struct Installed {
    version: u64,
    model: Arc<Mutex<Box<dyn TierModel>>>,
    threshold: f32,
    /// The regional model's scores of the latest requests (at most [`TRAFFIC_WINDOW`]).
    recent: std::collections::VecDeque<f32>,
    /// Requests scored since the threshold was last recalibrated on them.
    since: usize,
}

/// Requests a region scores before its threshold follows its traffic.
pub const TRAFFIC_WARMUP: usize = 20;

/// The latest requests whose scores the threshold is calibrated on.
pub const TRAFFIC_WINDOW: usize = 1000;

/// How often (in requests) the threshold is recalibrated on the traffic.
pub const RECALIBRATE_EVERY: usize = 10;

/// The region's tier: its configuration, builder, installed model and counts.
pub(super) struct RegionalTier {
    config: TierConfig,
    builder: TierBuilder,
    installed: Mutex<Option<Installed>>,
    counts: TierCounts,
}

impl RegionalTier {
    /// Records the score of a request the regional model `version` answered and returns the
    /// threshold in force for it (recalibrated on the traffic when due), if that model is still
    /// the installed one.
    fn observe(&self, version: u64, score: f32) -> Option<f32> {
        let mut guard = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        let i = guard.as_mut().filter(|i| i.version == version)?;
        if score.is_finite() {
            i.recent.push_back(score);
            if i.recent.len() > TRAFFIC_WINDOW {
                i.recent.pop_front();
            }
            i.since += 1;
        }
        if i.recent.len() >= TRAFFIC_WARMUP && i.since >= RECALIBRATE_EVERY {
            let scores: Vec<f32> = i.recent.iter().copied().collect();
            if let Ok(t) = calibrate_threshold(&scores, self.config.escalate_rate) {
                i.threshold = t;
            }
            i.since = 0;
        }
        Some(i.threshold)
    }

    /// The installed regional model's version, if any.
    pub(super) fn version(&self) -> Option<u64> {
        self.installed.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|i| i.version)
    }
}

/// Most images classified in one call while calibrating.
const CALIBRATION_BATCH: usize = 256;

impl Coordinator {
    /// Makes this regional aggregator answer escalations with the medium-tier model its root
    /// registers (see the module documentation), built by `builder` and calibrated as
    /// `config` says. Call once, before `follow_upstream`; a second call is ignored (false).
    pub fn set_regional_tier(&self, config: TierConfig, builder: TierBuilder) -> Result<bool, String> {
        if !(0.0..=1.0).contains(&config.escalate_rate) {
            return Err(format!("escalate_rate must be in [0, 1], got {}", config.escalate_rate));
        }
        if config.calibration.is_empty() {
            return Err("a regional tier needs calibration images".into());
        }
        let tier = RegionalTier { config, builder, installed: Mutex::new(None), counts: TierCounts::default() };
        Ok(self.tier.set(tier).is_ok())
    }

    /// The teacher version an inference session is told at Hello: this coordinator's `own`
    /// version, or for a regional aggregator the newest root version it heard of (its answers
    /// carry root version numbers: the regional model's, or the root's global model's), so that
    /// a device's answer cache moves on whenever the root has a newer model.
    pub(super) fn teacher_version(&self, own: u64) -> u64 {
        if !self.is_region() {
            return own;
        }
        let regional = self.tier.get().and_then(RegionalTier::version).unwrap_or(0);
        self.root_version.load(Ordering::Relaxed).max(regional)
    }

    /// A regional aggregator heard of its root's model `version`.
    pub(super) fn heard_of_root_version(&self, version: u64) {
        self.root_version.fetch_max(version, Ordering::Relaxed);
    }

    /// What the regional tier did so far (`None`: no tier).
    pub fn tier_counts(&self) -> Option<&TierCounts> {
        self.tier.get().map(|t| &t.counts)
    }

    /// The installed regional model's version and escalation threshold.
    pub fn regional_model(&self) -> Option<(u64, f32)> {
        let tier = self.tier.get()?;
        let installed = tier.installed.lock().unwrap_or_else(|p| p.into_inner());
        installed.as_ref().map(|i| (i.version, i.threshold))
    }

    /// Builds and calibrates regional model `record` (`params` verified) on a blocking thread,
    /// then installs it. The threshold on success.
    pub(super) async fn install_regional(&self, record: ModelRecord, params: ModelParams) -> Result<f32, String> {
        let Some(tier) = self.tier.get() else { return Err("this region has no inference tier".into()) };
        let model = (tier.builder)(&record, &params)?;
        let calibration = tier.config.calibration.clone();
        let (measure, rate) = (tier.config.measure, tier.config.escalate_rate);
        let (model, threshold) = tokio::task::spawn_blocking(move || {
            let mut model = model;
            let mut scores = Vec::with_capacity(calibration.len());
            for chunk in calibration.chunks(CALIBRATION_BATCH) {
                let images: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
                scores.extend(model.classify(&images)?.iter().map(|p| measure.score(p)));
            }
            let threshold = calibrate_threshold(&scores, rate).map_err(|e| e.to_string())?;
            Ok::<_, String>((model, threshold))
        })
        .await
        .map_err(|e| format!("the calibration thread failed: {e}"))??;
        *tier.installed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Installed {
            version: record.version,
            model: Arc::new(Mutex::new(model)),
            threshold,
            recent: std::collections::VecDeque::new(),
            since: 0,
        });
        Ok(threshold)
    }

    /// A regional aggregator's answer to an escalated request (already rate-limited): the
    /// regional model's when it is sure, else the root's; `None` when this coordinator has no
    /// regional tier, or neither a regional model nor the root could answer (the caller's
    /// teacher, on the region's copy of the global model, answers).
    pub(super) async fn infer_regional(&self, request: &InferRequest) -> Option<Result<InferAnswer, InferError>> {
        let tier = self.tier.get()?;
        let (rows, cols) = tier.config.shape;
        if (request.rows as usize, request.cols as usize) != (rows, cols) || request.pixels.len() != rows * cols {
            return Some(Err(InferError::Input(format!(
                "a {}x{} image of {} bytes; this region takes {rows}x{cols} greyscale images",
                request.rows,
                request.cols,
                request.pixels.len()
            ))));
        }
        let installed = {
            let i = tier.installed.lock().unwrap_or_else(|p| p.into_inner());
            i.as_ref().map(|i| (i.version, i.model.clone(), i.threshold))
        };
        let local = match installed {
            Some((version, model, threshold)) => {
                let pixels = request.pixels.clone();
                let out = tokio::task::spawn_blocking(move || {
                    model.lock().unwrap_or_else(|p| p.into_inner()).classify(&[pixels.as_slice()])
                })
                .await;
                match out {
                    Ok(Ok(mut probs)) if probs.len() == 1 => {
                        let p = probs.pop().expect("one image, one answer");
                        let score = tier.config.measure.score(&p);
                        let answer = answer_of(p, version);
                        let threshold = tier.observe(version, score).unwrap_or(threshold);
                        if !escalates(score, threshold) {
                            tier.counts.answered.fetch_add(1, Ordering::Relaxed);
                            return Some(Ok(answer));
                        }
                        Some(answer)
                    }
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => {
                        tracing::warn!("regional model v{version} failed to answer: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::warn!("regional model v{version}: the inference thread failed: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        match self.escalate_upstream(request).await {
            Ok(answer) => {
                tier.counts.escalated.fetch_add(1, Ordering::Relaxed);
                self.heard_of_root_version(answer.model_version);
                Some(Ok(answer))
            }
            Err(why) => {
                tier.counts.escalation_failed.fetch_add(1, Ordering::Relaxed);
                match local {
                    Some(answer) => {
                        tracing::debug!("the root did not answer an escalation ({why}); the region's answer stands");
                        tier.counts.answered.fetch_add(1, Ordering::Relaxed);
                        Some(Ok(answer))
                    }
                    None => {
                        tracing::debug!("the root did not answer an escalation ({why}); the region's teacher answers");
                        None
                    }
                }
            }
        }
    }

    /// Sends `request` to the root over the region's aggregator connection.
    async fn escalate_upstream(&self, request: &InferRequest) -> Result<InferAnswer, String> {
        let link = self.upstream_link.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(link) = link else { return Err("not connected to the root".into()) };
        match link.request(&Message::InferRequest(request.clone())).await {
            Ok(Message::InferAnswer(a)) => Ok(a),
            Ok(Message::Error { code, message }) => Err(format!("{code:?}: {message}")),
            Ok(_) => Err("an unexpected answer".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The regional model's answer: the most likely class and its probability.
fn answer_of(probabilities: Vec<f32>, version: u64) -> InferAnswer {
    let (class, confidence) =
        probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or((0, 0.0), |(c, &p)| (c as u32, p));
    InferAnswer { class, confidence, probabilities, model_version: version, batch_size: 1, tier: AnswerTier::Region }
}
