//! Verifying model signatures on devices: Ed25519 over a registry record's signing payload
//! (see [`fedge_core::registry`]), with the coordinator's public key from `model-signing.pub`.

use std::path::Path;

use fedge_core::registry::{ModelRecord, Promotion};
use thiserror::Error;

/// Why a model's signature does not hold.
#[derive(Debug, Error, PartialEq)]
pub enum SignatureError {
    /// The public key file is missing or not 32 bytes of hex.
    #[error("model public key {0}: {1}")]
    Key(String, String),
    /// The record carries no signature.
    #[error("model v{0} is unsigned")]
    Unsigned(u64),
    /// The signature does not verify.
    #[error("model v{0} has a bad signature")]
    Bad(u64),
    /// A promotion carries no signature.
    #[error("promotion #{sequence} (v{version}) is unsigned")]
    UnsignedPromotion {
        /// Its sequence number.
        sequence: u64,
        /// The version it names.
        version: u64,
    },
    /// A promotion's signature does not verify.
    #[error("promotion #{sequence} (v{version}) has a bad signature")]
    BadPromotion {
        /// Its sequence number.
        sequence: u64,
        /// The version it names.
        version: u64,
    },
}

/// Why a registry blob cannot be used ([`open_blob`]).
#[derive(Debug, Error, PartialEq)]
pub enum BlobError {
    /// The record's signature is missing or wrong.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The blob does not match the signed record.
    #[error("blob of v{version} hashes to {got}, the signed record says {want}")]
    Hash {
        /// The version.
        version: u64,
        /// From the record.
        want: String,
        /// Computed.
        got: String,
    },
    /// The blob is not a usable model.
    #[error("blob of v{0} is not a valid model: {1}")]
    Model(u64, String),
}

/// Checks `blob` against `record`, signed by `key`, and decodes it to parameters (an int8
/// blob dequantised): what a device does with a deployed student and a regional aggregator
/// with its medium-tier model.
pub fn open_blob(record: &ModelRecord, blob: &[u8], key: &ModelKey) -> Result<fedge_core::ModelParams, BlobError> {
    use fedge_core::codec;
    use fedge_core::registry::BlobFormat;
    key.verify(record)?;
    let got = fedge_core::params::ContentHash::of_bytes(blob);
    if got != record.sha256 {
        return Err(BlobError::Hash { version: record.version, want: record.sha256.to_string(), got: got.to_string() });
    }
    let bad = |e: String| BlobError::Model(record.version, e);
    let params = match record.format {
        BlobFormat::Int8 => codec::decode_value::<fedge_core::quant::QuantizedModel>(blob)
            .map_err(|e| bad(e.to_string()))?
            .dequantize()
            .map_err(|e| bad(e.to_string()))?,
        BlobFormat::F32 => match codec::decode(blob) {
            Ok(fedge_core::wire::Message::Model { params, .. }) => params,
            _ => return Err(bad("not an encoded model".into())),
        },
    };
    if params.numel() as u64 != record.parameters {
        return Err(bad(format!("{} parameters, record says {}", params.numel(), record.parameters)));
    }
    Ok(params)
}

/// An Ed25519 public key that model records must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelKey([u8; 32]);

impl ModelKey {
    /// From raw bytes.
    pub fn from_raw(bytes: &[u8]) -> Result<Self, SignatureError> {
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignatureError::Key("(raw)".into(), format!("{} bytes, not 32", bytes.len())))?;
        Ok(Self(raw))
    }

    /// Reads `model-signing.pub` (64 hex digits).
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        let err = |m: String| SignatureError::Key(path.display().to_string(), m);
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return Err(err("expected 64 hex digits".into()));
        }
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| err(e.to_string()))?;
        }
        Ok(Self(raw))
    }

    /// Checks `record.signature` over its signing payload.
    pub fn verify(&self, record: &ModelRecord) -> Result<(), SignatureError> {
        if record.signature.is_empty() {
            return Err(SignatureError::Unsigned(record.version));
        }
        self.holds(&record.signing_payload(), &record.signature).map_err(|()| SignatureError::Bad(record.version))
    }

    /// Checks `promotion.signature` over its signing payload.
    pub fn verify_promotion(&self, promotion: &Promotion) -> Result<(), SignatureError> {
        let (sequence, version) = (promotion.sequence, promotion.version);
        if promotion.signature.is_empty() {
            return Err(SignatureError::UnsignedPromotion { sequence, version });
        }
        self.holds(&promotion.signing_payload(), &promotion.signature)
            .map_err(|()| SignatureError::BadPromotion { sequence, version })
    }

    fn holds(&self, payload: &[u8], signature: &[u8]) -> Result<(), ()> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(payload, signature)
            .map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_key_files_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("fedge-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.pub");
        // 64 bytes that are not 64 hex digits: multi-byte characters straddling a digit pair
        // (slicing those used to panic), letters past f, too short.
        for text in [format!("a{}b", "é".repeat(31)), "zz".repeat(32), "ab".into()] {
            std::fs::write(&path, &text).unwrap();
            assert!(matches!(ModelKey::read(&path), Err(SignatureError::Key(..))), "{text:?}");
        }
        std::fs::write(&path, "0f".repeat(32)).unwrap();
        assert!(ModelKey::read(&path).is_ok());
        assert!(ModelKey::read(&dir.join("missing")).is_err());
        assert!(ModelKey::from_raw(&[0; 31]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
