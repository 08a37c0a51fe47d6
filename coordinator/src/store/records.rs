//! What the store keeps, as types: the operator's settings, a round's record, the strategy's
//! saved state, what a restart finds ([`Restored`]), and a model version encoded once for the
//! store and the download cache ([`EncodedModel`]).

use std::sync::Arc;
use std::time::Duration;

use bincode::{Decode, Encode};
use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::params::ContentHash;
use fedge_core::wire::{DeviceId, Message, RoundLine, TrainResult};
use fedge_engine::{EngineConfig, Evaluation};

/// The round settings an operator changed with `round start --fraction/--min-clients/
/// --deadline`: kept so that a restart does not silently revert them. They take precedence
/// over the configuration file's values.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Settings {
    /// Fraction of devices sampled.
    pub fraction: f64,
    /// Quorum.
    pub min_train_clients: u64,
    /// Round deadline in milliseconds.
    pub round_timeout_ms: u64,
}

impl Settings {
    /// The operator-changeable settings of `c`.
    pub fn of(c: &EngineConfig) -> Self {
        Self {
            fraction: c.fraction,
            min_train_clients: c.min_train_clients as u64,
            round_timeout_ms: c.round_timeout.as_millis() as u64,
        }
    }

    /// Writes these settings into `c`.
    pub fn apply(&self, c: &mut EngineConfig) {
        c.fraction = self.fraction;
        c.min_train_clients = self.min_train_clients as usize;
        c.round_timeout = Duration::from_millis(self.round_timeout_ms);
    }
}

/// A regional aggregator's task from its root: the root's round and model version (with its
/// hash), and the local version that model was adopted as (the base the region's round
/// trains from; its result is the next aggregated version minus this one).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct UpstreamTask {
    /// The root's round.
    pub root_round: u64,
    /// The root's model version the task trains from.
    pub root_version: u64,
    /// Its content hash.
    pub root_hash: ContentHash,
    /// The local version it was adopted as.
    pub base: u64,
    /// The task's training settings: the region's devices train with these (also in a round
    /// resumed after a restart).
    pub train: fedge_core::wire::TrainConfig,
}

/// A round in progress, as recorded when it opened.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Model version its devices train from.
    pub model_version: u64,
    /// Devices selected.
    pub chosen: Vec<DeviceId>,
    /// Results it needs to close early.
    pub target: u64,
    /// Devices available when it was sampled (the privacy sampling rate's population).
    pub population: u64,
}

/// What the aggregation strategy carries between rounds (optimiser moments, a centre), saved
/// in the transaction that records the model version it belongs to.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct StoredServerState {
    /// The model version it was saved with.
    pub version: u64,
    /// The strategy that saved it.
    pub strategy: String,
    /// Its vectors.
    pub vectors: Vec<Vec<f32>>,
}

/// A round that was open when the coordinator stopped.
#[derive(Debug, Clone)]
pub struct OpenRound {
    /// The round as it opened.
    pub record: RoundRecord,
    /// The updates accepted (and acknowledged) before the stop, by device.
    pub accepted: Vec<(DeviceId, TrainResult)>,
}

/// Everything a restart resumes from.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Model version.
    pub version: u64,
    /// Last round closed.
    pub last_round: u64,
    /// The parameters (hash checked).
    pub params: ModelParams,
    /// Rounds the operator asked for that have not started.
    pub rounds_left: u64,
    /// Settings last in force, if an operator or a previous run stored any.
    pub settings: Option<Settings>,
    /// The round in progress, if one was.
    pub open: Option<OpenRound>,
    /// Evaluations of model versions.
    pub evaluations: Vec<(u64, Evaluation)>,
    /// Every closed round, oldest first.
    pub rounds: Vec<RoundLine>,
    /// The strategy's state saved with the latest model version, if any.
    pub server_state: Option<StoredServerState>,
}

/// A global model version encoded once: the `Model` message the store keeps as the version's
/// blob and devices download, with the parameters' hash. Cheap to clone (the bytes are shared).
#[derive(Debug, Clone)]
pub struct EncodedModel {
    /// The model version.
    pub version: u64,
    /// The parameters' content hash (what names the blob).
    pub hash: ContentHash,
    /// The encoded `Model` message.
    pub bytes: Arc<Vec<u8>>,
}

impl EncodedModel {
    /// Encodes `params` as model `version`.
    pub fn new(version: u64, params: &ModelParams) -> Self {
        let hash = params.content_hash();
        let bytes = codec::encode(&Message::Model { version, hash, params: params.clone() });
        Self { version, hash, bytes: Arc::new(bytes) }
    }
}

/// A closed round as the store keeps it: [`RoundLine`] without what is not stored (its
/// duration), so that the stored format does not change with the operator's view.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub(super) struct StoredRound {
    round: u64,
    model_version: u64,
    selected: u64,
    results: u64,
    failures: u64,
    stragglers: u64,
    surplus: u64,
    samples: u64,
    train_loss: f64,
    accuracy: Option<f64>,
    failed_reason: Option<String>,
    privacy: Option<fedge_core::privacy::LedgerEntry>,
}

impl From<&RoundLine> for StoredRound {
    fn from(r: &RoundLine) -> Self {
        Self {
            round: r.round,
            model_version: r.model_version,
            selected: r.selected,
            results: r.results,
            failures: r.failures,
            stragglers: r.stragglers,
            surplus: r.surplus,
            samples: r.samples,
            train_loss: r.train_loss,
            accuracy: r.accuracy,
            failed_reason: r.failed_reason.clone(),
            privacy: r.privacy,
        }
    }
}

impl From<StoredRound> for RoundLine {
    fn from(r: StoredRound) -> Self {
        Self {
            round: r.round,
            model_version: r.model_version,
            selected: r.selected,
            results: r.results,
            failures: r.failures,
            stragglers: r.stragglers,
            surplus: r.surplus,
            samples: r.samples,
            train_loss: r.train_loss,
            accuracy: r.accuracy,
            failed_reason: r.failed_reason,
            privacy: r.privacy,
            duration_ms: None,
        }
    }
}
