//! What a hybrid request and its answer are: the request, the model that answered, the
//! local and cloud opinions, a speculative correction.

use fedge_core::escalation::PolicyKind;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::cloud::CloudError;

/// One request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// 28x28 greyscale pixels.
    pub pixels: Vec<u8>,
    /// The input must never leave the device.
    pub private: bool,
    /// The most this answer may cost (the unit of `[inference] cloud_call_cost`): a request
    /// whose cloud call would cost more is answered locally (`route_reason` says so). None: the
    /// configured `max_cost_per_request`, if any.
    pub max_cost: Option<f64>,
}

impl Request {
    /// A request with no privacy flag and no cost limit of its own.
    pub fn new(pixels: Vec<u8>) -> Self {
        Self { pixels, private: false, max_cost: None }
    }
}

/// Which model an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The device's model.
    Local,
    /// The coordinator's teacher (the root's, when the device's coordinator is a regional
    /// aggregator that escalated the request).
    Cloud,
    /// A regional aggregator's medium-tier model (the device's coordinator is a region, which
    /// was sure enough to answer itself).
    Region,
}

impl Source {
    /// Where a coordinator's answer came from, by the tier it names.
    pub fn of_tier(tier: fedge_core::wire::AnswerTier) -> Self {
        match tier {
            fedge_core::wire::AnswerTier::Root => Source::Cloud,
            fedge_core::wire::AnswerTier::Region => Source::Region,
        }
    }
}

/// One model's view of an input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Opinion {
    /// The class.
    pub class: usize,
    /// Its probability.
    pub confidence: f32,
    /// Registry version (local) or global version (cloud) of the model.
    pub model_version: u64,
}

/// The cloud's later answer to a speculative request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correction {
    /// The request it answers.
    pub id: u64,
    /// The teacher's class.
    pub class: usize,
    /// Its probability.
    pub confidence: f32,
    /// Global version of the teacher.
    pub model_version: u64,
    /// Whether it differs from the local answer given (a correction proper).
    pub differs: bool,
    /// From the request to this answer, milliseconds.
    pub latency_ms: f64,
}

/// An answer.
#[derive(Debug, Serialize)]
pub struct HybridAnswer {
    /// Request number (corrections refer to it).
    pub id: u64,
    /// The class.
    pub class: usize,
    /// Its probability under the model that answered.
    pub confidence: f32,
    /// Which model answered.
    pub answered_by: Source,
    /// That model's version (registry version locally, global version in the cloud).
    pub model_version: u64,
    /// The local model's architecture, when it answered.
    pub architecture: Option<String>,
    /// Time to this answer, milliseconds.
    pub latency_ms: f64,
    /// The policy in force.
    pub policy: PolicyKind,
    /// Whether the input was sent to the coordinator.
    pub escalated: bool,
    /// False when the policy wanted the cloud's answer and this is not it (offline, private,
    /// timeout, rate limit), or when a speculative correction is still to come.
    pub verified: bool,
    /// Why the cloud's answer is missing, when the policy wanted it.
    pub fallback: Option<&'static str>,
    /// The local model's view (when it ran).
    pub local: Option<Opinion>,
    /// The local confidence score under the calibrated measure, and the threshold.
    pub score: Option<f32>,
    /// The escalation threshold of the local model.
    pub threshold: Option<f32>,
    /// Why the answer took its route: `confident`, `escalated: below threshold for 10%
    /// (unmetered, charging)`, `kept local: metered link, budget 2%`, `cached cloud answer
    /// (teacher v3)`, `offline`, `private`, ...
    pub route_reason: String,
    /// The target escalation rate in force for this answer (per the rules and conditions).
    pub target_rate: Option<f64>,
    /// A speculative correction will follow.
    pub correction_pending: bool,
    /// Where it will come (speculative only).
    #[serde(skip)]
    pub correction: Option<oneshot::Receiver<Result<Correction, CloudError>>>,
}
