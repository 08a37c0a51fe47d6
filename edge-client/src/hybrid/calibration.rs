//! How the device answers (`HybridConfig`, `[inference]` in `edge.toml`) and the escalation
//! threshold of each model version, calibrated on held-out images.

use std::path::PathBuf;

use fedge_core::escalation::{ConfidenceMeasure, PolicyKind, calibrate_threshold, escalates};
use fedge_core::routing::{self, RouteRule};
use serde::{Deserialize, Serialize};

use crate::predict::{LocalModel, PredictError};

/// How the device answers (`[inference]` in `edge.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridConfig {
    /// `local-only`, `cascade`, `speculative` or `cloud-first`.
    pub policy: PolicyKind,
    /// How confidence is read: `max-softmax`, `margin` or `entropy`.
    pub confidence: ConfidenceMeasure,
    /// Share of requests the calibrated threshold sends to the cloud.
    pub target_rate: f64,
    /// Longest wait for the cloud's answer, milliseconds; then the local answer stands.
    pub cloud_timeout_ms: u64,
    /// Held-out images (from the test split of the device's dataset) calibrated on.
    pub calibration_examples: usize,
    /// Where `fedge-edge run` also serves local inference (JSON over HTTP), if anywhere.
    pub listen: Option<std::net::SocketAddr>,
    /// Rules that change the target rate with the device's live conditions (`[[inference.rules]]`,
    /// first match wins; none matching: `target_rate`). Shipped: metered link, or battery
    /// below 20% and not charging, escalate 2%.
    pub rules: Vec<RouteRule>,
    /// The file the integrator writes the device's conditions to (`metered`,
    /// `battery_percent`, `charging`), if any.
    pub conditions_file: Option<PathBuf>,
    /// Cloud answers kept on the device (LRU, per teacher version); 0: no cache.
    pub cache_entries: usize,
    /// What one escalation costs (any unit: money, a quota), for per-request budgets. None:
    /// escalations are not priced and no budget applies.
    pub cloud_call_cost: Option<f64>,
    /// The budget of a request that names none (`max_cost`); None: unlimited.
    pub max_cost_per_request: Option<f64>,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Cascade,
            confidence: ConfidenceMeasure::MaxSoftmax,
            target_rate: 0.1,
            cloud_timeout_ms: 1000,
            calibration_examples: 1000,
            listen: None,
            rules: routing::default_rules(),
            conditions_file: None,
            cache_entries: 1024,
            cloud_call_cost: None,
            max_cost_per_request: None,
        }
    }
}

impl HybridConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.target_rate) {
            return Err(format!("inference target_rate must be in [0, 1], got {}", self.target_rate));
        }
        if self.cloud_timeout_ms == 0 || self.calibration_examples == 0 {
            return Err("inference cloud_timeout_ms and calibration_examples must be at least 1".into());
        }
        for (key, v) in [("cloud_call_cost", self.cloud_call_cost), ("max_cost_per_request", self.max_cost_per_request)]
        {
            if let Some(v) = v {
                check_cost(key, v)?;
            }
        }
        routing::validate(&self.rules)
    }
}

/// A cost or budget must be a finite number, not negative.
pub fn check_cost(what: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 { Ok(()) } else { Err(format!("{what} must be a finite number >= 0, got {v}")) }
}

/// The escalation threshold of one model version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The model version it belongs to.
    pub model_version: u64,
    /// How confidence is read.
    pub confidence: ConfidenceMeasure,
    /// The rate it was calibrated for.
    pub target_rate: f64,
    /// Answers less confident than this escalate.
    pub threshold: f32,
    /// Held-out images it was calibrated on.
    pub examples: usize,
    /// The escalation rate on them.
    pub calibration_rate: f64,
    /// The threshold for each rate the rules name (the default's first).
    pub thresholds: Vec<RateThreshold>,
}

/// The threshold calibrated for one target rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateThreshold {
    /// The target rate.
    pub target_rate: f64,
    /// Answers less confident than this escalate under it.
    pub threshold: f32,
    /// The escalation rate on the held-out images.
    pub calibration_rate: f64,
}

impl Calibration {
    /// The threshold calibrated for `rate` (the default's when it was not calibrated).
    pub fn threshold_for(&self, rate: f64) -> f32 {
        self.thresholds.iter().find(|t| t.target_rate == rate).map_or(self.threshold, |t| t.threshold)
    }
}

/// Held-out images (28x28 greyscale) to calibrate on.
#[derive(Debug, Clone, Default)]
pub struct CalibrationSet {
    images: Vec<Vec<u8>>,
}

impl CalibrationSet {
    /// `n` images of `data` drawn without replacement with `seed` (a test split is often
    /// ordered; a random sample is not).
    pub fn sample(data: &fedge_core::dataset::Dataset, n: usize, seed: u64) -> Self {
        use rand::seq::SliceRandom;
        let mut idx: Vec<usize> = (0..data.len()).collect();
        idx.shuffle(&mut fedge_core::rng::derive_rng(seed, &[0xca1]));
        idx.truncate(n);
        Self { images: idx.into_iter().map(|i| data.image(i).to_vec()).collect() }
    }

    /// The images given.
    pub fn from_images(images: Vec<Vec<u8>>) -> Self {
        Self { images }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

/// Calibrates `model`'s threshold on `set` for `config`'s measure and rate.
pub fn calibrate(model: &LocalModel, set: &CalibrationSet, config: &HybridConfig) -> Result<Calibration, PredictError> {
    let mut scores = Vec::with_capacity(set.len());
    for im in &set.images {
        scores.push(config.confidence.score(&model.classify(im)?.probabilities));
    }
    let mut thresholds = Vec::new();
    for target_rate in routing::rates(config.target_rate, &config.rules) {
        let threshold =
            calibrate_threshold(&scores, target_rate).map_err(|e| PredictError::Input(format!("calibration: {e}")))?;
        let rate = scores.iter().filter(|&&s| escalates(s, threshold)).count() as f64 / scores.len() as f64;
        thresholds.push(RateThreshold { target_rate, threshold, calibration_rate: rate });
    }
    let default = thresholds[0];
    Ok(Calibration {
        model_version: model.version(),
        confidence: config.confidence,
        target_rate: config.target_rate,
        threshold: default.threshold,
        examples: scores.len(),
        calibration_rate: default.calibration_rate,
        thresholds,
    })
}
