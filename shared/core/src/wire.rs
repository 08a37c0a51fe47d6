//! Wire messages between coordinator and devices (protocol version [`PROTOCOL_VERSION`]).
//!
//! These are plain data; [`crate::codec`] turns them into bytes and back. Parameter tensors
//! travel as their layout followed by one raw little-endian `f32` block, never element by
//! element.

use crate::params::{ContentHash, ModelParams};

/// Version of the message set below. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 9;

/// Stable identifier of a device.
pub type DeviceId = u64;

/// Hyper-parameters of one local training task.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct TrainConfig {
    /// Passes over the local data (E).
    pub epochs: u32,
    /// Local minibatch size (B).
    pub batch_size: u32,
    /// SGD learning rate.
    pub learning_rate: f32,
    /// L2 bound the device clips its delta to, if any.
    pub clip_norm: Option<f32>,
    /// Local DP: the device adds Gaussian noise to its clipped delta, calibrated with the
    /// analytic Gaussian mechanism so that the delta alone is (epsilon, delta)-DP (needs
    /// `clip_norm`).
    pub local_dp: Option<LocalDp>,
    /// FedProx's mu (Li et al. 2020): the local objective gains `mu/2 * ||w - w_global||^2`,
    /// which keeps the device near the model the task started from. `None` or 0 = plain local
    /// SGD; must be finite and not negative.
    pub proximal_mu: Option<f32>,
}

impl TrainConfig {
    /// Plain minibatch SGD: no clipping, no noise, no proximal term.
    pub fn sgd(epochs: u32, batch_size: u32, learning_rate: f32) -> Self {
        Self { epochs, batch_size, learning_rate, clip_norm: None, local_dp: None, proximal_mu: None }
    }
}

/// A device-level (epsilon, delta) guarantee each device enforces on its own upload.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDp {
    /// Epsilon of one upload.
    pub epsilon: f64,
    /// Delta of one upload.
    pub delta: f64,
}

/// The coordinator asks a device to train from a model version.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct TrainTask {
    /// Round number, from 1.
    pub round: u64,
    /// Version of the global model to start from.
    pub model_version: u64,
    /// Content hash of that model, so the device can check what it holds.
    pub model_hash: ContentHash,
    /// How to train.
    pub config: TrainConfig,
    /// Secure aggregation: the update goes into a SecAgg+ sum instead of a `TrainResult`
    /// (`SecureReady`, then `SecurePoll`/`SecureSend` until the session ends).
    pub secure: Option<SecureTask>,
}

/// What a device needs to enter its update into a secure sum: the public cap on the samples
/// its weight may claim (`fedge_secagg::weighting`) and, under distributed DP, its noise; the
/// clip is the task's `clip_norm`.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct SecureTask {
    /// `W`: a device weighs `min(num_samples, W) / W`.
    pub weight_cap: u64,
    /// Distributed DP: the standard deviation of the Gaussian noise the device adds to each
    /// coordinate of its clipped update (its share of the sum's noise); every device then
    /// weighs 1.
    pub noise_std: Option<f64>,
}

/// A device's answer to a [`TrainTask`].
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct TrainResult {
    /// The task's round.
    pub round: u64,
    /// The model version the device trained from.
    pub model_version: u64,
    /// Local examples trained on: the update's FedAvg weight.
    pub num_samples: u64,
    /// Mean training loss over the last local epoch.
    pub train_loss: f32,
    /// Trained weights minus the starting weights, clipped and noised as the task asked.
    pub delta: ModelParams,
    /// Whether clipping scaled the delta down (the bit adaptive clipping counts).
    pub clipped: bool,
}

/// Typed error codes a peer can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum ErrorCode {
    /// The message could not be decoded.
    Malformed,
    /// The message exceeds the size limit.
    TooLarge,
    /// The update is for a model version that is not current.
    StaleModel,
    /// The device was not selected for this round.
    NotSelected,
    /// The update was already received.
    Duplicate,
    /// The update has the wrong shape or non-finite values.
    InvalidUpdate,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The peer's certificate does not allow this.
    Unauthorized,
    /// The coordinator cannot take this now (e.g. its state could not be written); nothing was
    /// recorded: retry later.
    Unavailable,
    /// The device sent more inference requests than its rate allows; retry later.
    RateLimited,
    /// An inference input is not an image of the size the model takes.
    InvalidInput,
}

/// What a device tells the coordinator about itself when it connects.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct Capabilities {
    /// Compute backend it trains on (`flex`, `wgpu`).
    pub backend: String,
    /// Memory it may use for training, in MiB.
    pub memory_mb: u32,
    /// Whether it is charging.
    pub charging: bool,
    /// Whether its network is unmetered.
    pub unmetered: bool,
    /// Local training examples.
    pub num_samples: u64,
}

/// First message on a connection, device to coordinator. The device's id is not in it: the
/// coordinator takes it from the device's certificate.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// What the device can do.
    pub capabilities: Capabilities,
    /// What the connection is for.
    pub purpose: SessionPurpose,
}

/// What a device connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, bincode::Encode, bincode::Decode)]
pub enum SessionPurpose {
    /// Training (and inference): the device is available for rounds while connected.
    #[default]
    Train,
    /// Inference only (e.g. a device's local inference server): never sampled for rounds.
    Inference,
    /// Training for the devices an aggregator hosts (a simulation shard): in secure rounds it
    /// enters each of them into the sum as a member (`SecureReady.members`), so a coordinator
    /// that aggregates securely takes it (it refuses a region, whose mean is not a masked
    /// update). Only an aggregator certificate may open such a session.
    Relay,
}

/// A device asks the coordinator's (teacher) model to classify one image.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct InferRequest {
    /// Image height.
    pub rows: u32,
    /// Image width.
    pub cols: u32,
    /// Greyscale pixels, row-major, 0-255 (`rows * cols` bytes).
    pub pixels: Vec<u8>,
}

/// The coordinator's answer to an [`InferRequest`].
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct InferAnswer {
    /// The most likely class.
    pub class: u32,
    /// Its probability.
    pub confidence: f32,
    /// Every class's probability.
    pub probabilities: Vec<f32>,
    /// The global model version that answered.
    pub model_version: u64,
    /// How many requests were answered in the same batch.
    pub batch_size: u32,
    /// Which tier answered.
    pub tier: AnswerTier,
}

/// The tier that answered an escalated inference request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerTier {
    /// The root coordinator's teacher (the global model).
    Root,
    /// A regional aggregator's medium-tier model.
    Region,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the coordinator.
    pub protocol_version: u32,
    /// The id the coordinator knows this device by (from its certificate).
    pub device_id: String,
    /// The current global model version.
    pub model_version: u64,
}

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum Message {
    /// Coordinator to device: train.
    TrainTask(TrainTask),
    /// Device to coordinator: the result.
    TrainResult(TrainResult),
    /// Either way: something was refused.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Device to coordinator: who I am and what I can do.
    Hello(Hello),
    /// Coordinator to device: accepted.
    Welcome(Welcome),
    /// Device to coordinator: is there a task for me? Also says which deployed (promoted)
    /// model version the device runs for inference, if any.
    TaskRequest {
        /// The registered version the device runs.
        running: Option<u64>,
    },
    /// Coordinator to device: not now; ask again later. Carries the current model version so
    /// an idle device can keep its model fresh, and the promoted version devices should run.
    NoTask {
        /// When to ask again.
        retry_after_ms: u32,
        /// The current global model version.
        model_version: u64,
        /// The latest promotion (the version devices should run, numbered and signed), if any.
        deployed: Option<crate::registry::Promotion>,
    },
    /// Device to coordinator: the registry record of deployable `version`.
    DeployedRequest {
        /// Which version.
        version: u64,
    },
    /// Coordinator to device: a signed registry record; its blob comes in `BlobChunk`s.
    Deployed(crate::registry::ModelRecord),
    /// Device to coordinator: bytes `offset..offset + max_len` of registered `version`'s blob.
    BlobChunkRequest {
        /// Which version.
        version: u64,
        /// First byte wanted.
        offset: u64,
        /// Most bytes wanted.
        max_len: u32,
    },
    /// Coordinator to device: part of a registered blob (check the whole against the signed
    /// record's SHA-256).
    BlobChunk {
        /// The version.
        version: u64,
        /// Length of the whole blob.
        total_len: u64,
        /// Where these bytes start.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Device to coordinator: send me this model version (`None`: the current one).
    ModelRequest {
        /// Which version.
        version: Option<u64>,
    },
    /// Coordinator to device: a model version, to be checked against its hash before use.
    Model {
        /// The version.
        version: u64,
        /// SHA-256 of the parameters.
        hash: ContentHash,
        /// The parameters.
        params: ModelParams,
    },
    /// Device to coordinator: send bytes `offset..offset + max_len` of the encoded `Model`
    /// message of `version` (a resumable download; the coordinator may send fewer).
    ModelChunkRequest {
        /// Which version.
        version: u64,
        /// First byte wanted.
        offset: u64,
        /// Most bytes wanted.
        max_len: u32,
    },
    /// Coordinator to device: part of the encoded `Model` message of `version`. Once all
    /// `total_len` bytes are in, they decode to a `Model` whose parameters hash to `hash`.
    ModelChunk {
        /// The version.
        version: u64,
        /// SHA-256 of the parameters.
        hash: ContentHash,
        /// Length of the whole encoded message.
        total_len: u64,
        /// Where these bytes start.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Coordinator to device: the result is durable and accepted.
    Ack {
        /// The round it belonged to.
        round: u64,
    },
    /// Operator to coordinator (operator certificates only).
    Operator(OperatorCommand),
    /// Coordinator to operator: the state after the command.
    Status(Status),
    /// Coordinator to operator: the devices.
    Devices(Vec<DeviceLine>),
    /// Coordinator to operator: the model versions.
    Models(Vec<ModelLine>),
    /// Device to coordinator: classify this image with the teacher.
    InferRequest(InferRequest),
    /// Coordinator to device: the teacher's answer.
    InferAnswer(InferAnswer),
    /// Either way: are you there? (answered with `Pong` carrying the same nonce)
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// The answer to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Regional aggregator to root: the registry record of the newest medium-tier model for
    /// regions (answered with `Deployed`, its blob then fetched in `BlobChunk`s).
    RegionalRequest,
    /// Device to coordinator, in a secure round: trained, holding the update for `round` on
    /// `model_version` (answered `Ack`, or an error: the device gives up the round).
    SecureReady {
        /// The task's round.
        round: u64,
        /// The model version it trained from.
        model_version: u64,
        /// `None`: the device itself enters the sum. A relaying aggregator's members instead,
        /// each a participant of its own (their ids are the aggregator's; an empty list: none
        /// of its devices has an update this round, and the session need not wait for it).
        members: Option<Vec<u64>>,
    },
    /// Device to coordinator: where is the secure session of `round` for me? (answered
    /// `SecureStep`, or `Error StaleModel` when the device is not in it).
    SecurePoll {
        /// The round.
        round: u64,
        /// Which of a relaying aggregator's members asks (`None`: the device itself).
        member: Option<u64>,
    },
    /// Coordinator to device: the session's next message for it (`Wait`, `Begin`, a stage's
    /// message, `Finished`).
    SecureStep {
        /// The round.
        round: u64,
        /// The step.
        step: fedge_secagg::ServerMessage,
    },
    /// Device to coordinator: its message for the open stage of `round`'s secure session
    /// (answered `Ack`, or an error naming why it was refused).
    SecureSend {
        /// The round.
        round: u64,
        /// Which of a relaying aggregator's members sends (`None`: the device itself).
        member: Option<u64>,
        /// The message.
        msg: fedge_secagg::ClientMessage,
    },
}

/// What an operator can ask.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum OperatorCommand {
    /// Run this many more rounds, optionally with new round settings (kept for later rounds).
    StartRounds {
        /// How many.
        rounds: u64,
        /// Fraction of connected devices to sample.
        fraction: Option<f64>,
        /// Fewest results a round needs.
        min_train_clients: Option<u64>,
        /// Seconds a round waits for results.
        deadline_secs: Option<u64>,
    },
    /// Just report the state.
    Status,
    /// List the devices ever seen.
    Devices,
    /// List the model versions kept.
    Models,
    /// Make registered version `version` what devices should run.
    Promote {
        /// The version.
        version: u64,
    },
    /// Go back to the version promoted before the current one.
    Rollback,
}

/// One device, as operators see it.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct DeviceLine {
    /// Certificate id.
    pub id: String,
    /// Whether it is connected now.
    pub connected: bool,
    /// What it said of itself when it last connected (this run of the coordinator).
    pub capabilities: Option<Capabilities>,
    /// The deployed version it last said it runs.
    pub running: Option<u64>,
    /// When it last connected or asked for work (this run of the coordinator), in seconds
    /// since the Unix epoch.
    pub last_seen: Option<u64>,
}

/// One model version, as operators see it.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct ModelLine {
    /// Version.
    pub version: u64,
    /// SHA-256 of its parameters.
    pub hash: ContentHash,
    /// Test accuracy, if evaluated.
    pub accuracy: Option<f64>,
    /// Median single-image inference time, microseconds, if measured.
    pub latency_us: Option<f64>,
    /// Epsilon spent by the training run up to this version (central DP), if accounted.
    pub epsilon: Option<f64>,
    /// Global teacher or distilled student.
    pub role: crate::registry::ModelRole,
    /// Architecture name.
    pub architecture: String,
    /// The version it was made from.
    pub parent: Option<u64>,
    /// The round that produced it (or its teacher).
    pub round: u64,
    /// Parameters.
    pub parameters: u64,
    /// Bytes of its blob as it travels.
    pub size_bytes: u64,
    /// Seconds since the Unix epoch (0: not recorded).
    pub created_at: u64,
    /// Whether it carries a model-signing signature.
    pub signed: bool,
    /// Whether it is what devices should run now.
    pub promoted: bool,
    /// Devices that last reported running it.
    pub devices_running: u64,
}

/// One closed round, as operators see it.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct RoundLine {
    /// Round number.
    pub round: u64,
    /// Model version after it.
    pub model_version: u64,
    /// Devices selected.
    pub selected: u64,
    /// Results accepted.
    pub results: u64,
    /// Devices that failed or left.
    pub failures: u64,
    /// Devices past the deadline.
    pub stragglers: u64,
    /// Over-committed devices not needed when the round closed.
    pub surplus: u64,
    /// Examples trained on.
    pub samples: u64,
    /// Mean device training loss.
    pub train_loss: f64,
    /// Test accuracy of the new model, if evaluated.
    pub accuracy: Option<f64>,
    /// Whether it aggregated (else the reason it did not).
    pub failed_reason: Option<String>,
    /// What the round spent under central DP: q, z, C and epsilon so far.
    pub privacy: Option<crate::privacy::LedgerEntry>,
    /// From its start to its close, in milliseconds (rounds started in this run of the
    /// coordinator; not stored).
    pub duration_ms: Option<u64>,
}

/// The open round, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct OpenRoundLine {
    /// Round number.
    pub round: u64,
    /// Devices selected.
    pub selected: u64,
    /// Results it waits for before closing (the rest are over-commitment).
    pub wanted: u64,
    /// Results accepted so far.
    pub reporting: u64,
    /// Milliseconds until its deadline (0: past it).
    pub deadline_in_ms: u64,
}

/// The privacy budget of a coordinator running central DP.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct PrivacyBudget {
    /// Noise multiplier on the sum (z).
    pub noise_multiplier: f64,
    /// Current clip norm (C).
    pub clip_norm: f64,
    /// Delta epsilons are reported at.
    pub delta: f64,
    /// Epsilon spent so far.
    pub epsilon: f64,
    /// The budget, if one is set.
    pub target_epsilon: Option<f64>,
}

/// The coordinator's state, for operators.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct Status {
    /// Current model version.
    pub model_version: u64,
    /// Its hash.
    pub model_hash: ContentHash,
    /// The open round, if any.
    pub current_round: Option<u64>,
    /// Its progress and deadline.
    pub open_round: Option<OpenRoundLine>,
    /// Rounds still to run.
    pub rounds_left: u64,
    /// Devices connected now, by certificate id.
    pub devices_connected: Vec<String>,
    /// Devices ever seen.
    pub devices_known: u64,
    /// Closed rounds, oldest first.
    pub rounds: Vec<RoundLine>,
    /// The privacy budget, when central DP is on.
    pub privacy: Option<PrivacyBudget>,
    /// A regional aggregator's standing with its root.
    pub upstream: Option<Box<UpstreamLine>>,
    /// The open round's secure aggregation, when rounds are secure (boxed: `Message` stays
    /// small).
    pub secure: Option<Box<SecureLine>>,
}

/// The open round's secure aggregation, for operators.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct SecureLine {
    /// The round.
    pub round: u64,
    /// `ready` (devices training and saying they are ready), a SecAgg stage (`advertise`,
    /// `share keys`, `masked input`, `unmask`), `done`, or `none` (the round went without a
    /// session: fewer than 2 devices were ready).
    pub stage: String,
    /// Devices in it: ready so far, or the session's participants.
    pub participants: u64,
    /// Of those, the ones that answered the open stage (in the ready phase: all of them).
    pub answered: u64,
    /// Milliseconds until the open stage (or the ready phase) closes at the latest.
    pub deadline_in_ms: u64,
}

/// A regional aggregator's standing with its root, for operators.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct UpstreamLine {
    /// Whether a session with the root is open.
    pub connected: bool,
    /// The root's round it works on (none: no task taken on yet).
    pub root_round: Option<u64>,
    /// The root's model version that task trains from.
    pub root_version: Option<u64>,
    /// The local version it was adopted as.
    pub adopted_as: Option<u64>,
    /// Whether the task's result reached the root.
    pub uploaded: bool,
    /// The regional model answering escalations, if installed: version and threshold.
    pub regional_model: Option<(u64, f32)>,
}
