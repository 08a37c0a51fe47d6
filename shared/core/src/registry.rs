//! The model registry's records: every model the coordinator releases, global teacher or
//! distilled student, as a version with its lineage, metrics, privacy cost, blob hash and a
//! signature by the coordinator's model-signing key.
//!
//! What is signed ([`ModelRecord::signing_payload`]) is every field fixed when the model is
//! registered, in a canonical encoding behind a domain tag: a device that verifies it knows the
//! blob (by its SHA-256) came from its coordinator, as that version, of that architecture,
//! with that epsilon. Accuracy of global models arrives later and is not signed. That encoding
//! is defined in [`crate::codec`], the one module that knows the byte format (so this module
//! stays below the codec: `codec` -> `wire` -> `registry`, never back).

use crate::params::ContentHash;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelRole {
    /// The federated global model (the teacher).
    Global,
    /// A student distilled from a global model, for devices to run.
    Student,
    /// A medium-tier model distilled from a global model (larger than a student), for regional
    /// aggregators to answer their devices' escalations with.
    Regional,
}

/// How the blob's numbers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobFormat {
    /// An encoded `Model` message of `f32` parameters.
    F32,
    /// An encoded [`crate::quant::QuantizedModel`].
    Int8,
}

/// One registered model version.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct ModelRecord {
    /// Version number, unique across roles and increasing.
    pub version: u64,
    /// Teacher or student.
    pub role: ModelRole,
    /// Architecture name (`2nn`, `cnn`, `mlp`).
    pub architecture: String,
    /// Storage format of the blob.
    pub format: BlobFormat,
    /// The version it was made from (a student's teacher, a global model's predecessor).
    pub parent: Option<u64>,
    /// Training round that produced it (or its teacher).
    pub round: u64,
    /// Test accuracy, when evaluated.
    pub accuracy: Option<f64>,
    /// Median single-image inference time on the coordinator (one thread), microseconds, when
    /// measured. Like accuracy, not signed.
    pub latency_us: Option<f64>,
    /// Epsilon spent to make it (central DP), if accounted.
    pub epsilon: Option<f64>,
    /// Parameters.
    pub parameters: u64,
    /// Bytes of the blob.
    pub size_bytes: u64,
    /// SHA-256 of the blob.
    pub sha256: ContentHash,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Ed25519 signature of [`Self::signing_payload`] by the model-signing key.
    pub signature: Vec<u8>,
}

impl ModelRecord {
    /// An unsigned record of `blob` (its size and SHA-256), made now by the caller's clock
    /// (`created_at`); lineage, round and metrics empty for the caller to fill in.
    pub fn of_blob(
        version: u64,
        role: ModelRole,
        architecture: &str,
        format: BlobFormat,
        parameters: u64,
        blob: &[u8],
    ) -> Self {
        Self {
            version,
            role,
            architecture: architecture.to_string(),
            format,
            parent: None,
            round: 0,
            accuracy: None,
            latency_us: None,
            epsilon: None,
            parameters,
            size_bytes: blob.len() as u64,
            sha256: ContentHash::of_bytes(blob),
            created_at: 0,
            signature: Vec::new(),
        }
    }
}

/// The instruction to run registered `version`, numbered (each `promote` and each `rollback`
/// takes a higher number than any before it) and signed by the model-signing key over
/// [`Self::signing_payload`]. A device moves only to a promotion numbered higher than the last
/// one it followed, so an old instruction replayed (a coordinator restored from an old backup,
/// a stale mirror) cannot take it back to an older model: only a new, signed rollback can.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Promotion {
    /// Strictly increasing over the fleet's promotions: the coordinator's clock in milliseconds
    /// since the Unix epoch, or one more than the previous number if that is higher.
    pub sequence: u64,
    /// The registered version devices should run.
    pub version: u64,
    /// Ed25519 signature of [`Self::signing_payload`] by the model-signing key (empty when the
    /// coordinator has no signing key: devices then refuse it).
    pub signature: Vec<u8>,
}
