//! The model registry's records: every model the coordinator releases, global teacher or
//! distilled student, as a version with its lineage, metrics, privacy cost, blob hash and a
//! signature by the coordinator's model-signing key.
//!
//! What is signed ([`ModelRecord::signing_payload`]) is every field fixed when the model is
//! registered, in a canonical encoding behind a domain tag: a device that verifies it knows the
//! blob (by its SHA-256) came from its coordinator, as that version, of that architecture,
//! with that epsilon. Accuracy of global models arrives later and is not signed.

use crate::params::ContentHash;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelRole {
    /// The federated global model (the teacher).
    Global,
    /// A student distilled from a global model, for devices to run.
    Student,
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

/// Domain separation for model signatures.
const SIGNING_DOMAIN: &[u8] = b"fedge model record v1\0";

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

    /// The bytes the signature covers: the domain tag and every field fixed at registration.
    pub fn signing_payload(&self) -> Vec<u8> {
        let fixed = (
            self.version,
            self.role,
            self.architecture.as_str(),
            self.format,
            self.parent,
            self.round,
            self.epsilon.map(f64::to_bits),
            self.parameters,
            self.size_bytes,
            self.sha256.0,
            self.created_at,
        );
        let mut out = SIGNING_DOMAIN.to_vec();
        out.extend(crate::codec::encode_value(&fixed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ModelRecord {
        ModelRecord {
            version: 7,
            role: ModelRole::Student,
            architecture: "mlp".into(),
            format: BlobFormat::Int8,
            parent: Some(6),
            round: 6,
            accuracy: Some(0.9),
            latency_us: None,
            epsilon: Some(1.5),
            parameters: 50_890,
            size_bytes: 51_570,
            sha256: ContentHash::of_bytes(b"blob"),
            created_at: 1_800_000_000,
            signature: vec![1, 2, 3],
        }
    }

    #[test]
    fn the_payload_covers_every_fixed_field_but_not_accuracy_or_signature() {
        let r = record();
        let base = r.signing_payload();
        assert!(base.starts_with(SIGNING_DOMAIN));
        let changed = [
            ModelRecord { version: 8, ..r.clone() },
            ModelRecord { role: ModelRole::Global, ..r.clone() },
            ModelRecord { architecture: "2nn".into(), ..r.clone() },
            ModelRecord { format: BlobFormat::F32, ..r.clone() },
            ModelRecord { parent: None, ..r.clone() },
            ModelRecord { round: 5, ..r.clone() },
            ModelRecord { epsilon: Some(1.6), ..r.clone() },
            ModelRecord { size_bytes: 1, ..r.clone() },
            ModelRecord { sha256: ContentHash::of_bytes(b"other"), ..r.clone() },
            ModelRecord { created_at: 1, ..r.clone() },
        ];
        for c in changed {
            assert_ne!(c.signing_payload(), base, "{c:?}");
        }
        assert_eq!(
            ModelRecord { accuracy: None, latency_us: Some(3.0), signature: vec![], ..r }.signing_payload(),
            base
        );
    }
}
