//! The deployed (inference) model: the promoted, distilled, int8 student the coordinator
//! tells devices to run.
//!
//! A device learns the promoted version from `NoTask`, fetches its signed registry record
//! (`DeployedRequest`) and its blob (`BlobChunkRequest` chunks), and uses it only when the
//! signature verifies with the fleet's `model-signing.pub`, the blob's SHA-256 matches the
//! signed record and the blob decodes to a consistent quantised model. Then it writes
//! `v<N>.blob` and `v<N>.record` and switches `current` with a rename, so a crash leaves the
//! old version or the new one, never half. The previous version stays on disk (a rollback to
//! it needs no download); older ones are deleted. Anything that fails is refused, said in the
//! log and the status, and the device keeps running what it had.
//!
//! Which version to run comes as a signed, numbered [`Promotion`]: a device follows one only
//! when its signature verifies and its number is higher than the last one it followed
//! (`promotion`, kept beside the models), so an old instruction replayed cannot move it back
//! to an older model (a rollback attack); a rollback is a new promotion with a new number.

use std::path::{Path, PathBuf};

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::registry::{ModelRecord, Promotion};
use fedge_core::wire::Message;
use fedge_net::{BlobError, ModelKey, SignatureError};
use thiserror::Error;

use crate::download::{Chunk, DownloadError, fetch_resumable};
use crate::link::{ConnectError, Link};

/// Largest deployable blob accepted (students are tens of kilobytes).
pub const MAX_BLOB_BYTES: u64 = 64 << 20;

/// Why a deployed model was refused.
#[derive(Debug, Error)]
pub enum DeployError {
    /// No public key configured: nothing can be verified, so nothing is deployed.
    #[error("no model public key configured (model_key): refusing unverifiable models")]
    NoKey,
    /// A promotion's signature is missing or wrong.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The record's signature, the blob's hash or the model in it does not hold.
    #[error(transparent)]
    Verify(#[from] BlobError),
    /// The blob is not a usable model.
    #[error("blob of v{0} is not a valid model: {1}")]
    Blob(u64, String),
    /// The coordinator answered something else.
    #[error("coordinator: {0}")]
    Refused(String),
    /// The link failed.
    #[error(transparent)]
    Link(#[from] ConnectError),
    /// The state folder could not be written.
    #[error("state folder: {0}")]
    Storage(String),
    /// A promotion numbered no higher than one already followed: replayed or out of date.
    #[error(
        "promotion #{sequence} (v{version}) is not newer than #{followed} (v{followed_version}) already followed: refusing to move back (a replayed or stale instruction; a rollback is a new, higher-numbered promotion)"
    )]
    Stale {
        /// The promotion's number.
        sequence: u64,
        /// The version it names.
        version: u64,
        /// The number followed last.
        followed: u64,
        /// The version that one named.
        followed_version: u64,
    },
}

/// Whether to follow `p` after `followed` (the last promotion followed, verified): its signature
/// must verify with `key` and its number must be higher (or the same promotion again).
pub fn check_promotion(p: &Promotion, followed: Option<&Promotion>, key: &ModelKey) -> Result<(), DeployError> {
    key.verify_promotion(p)?;
    match followed {
        Some(f) if p.sequence < f.sequence || (p.sequence == f.sequence && p.version != f.version) => {
            Err(DeployError::Stale {
                sequence: p.sequence,
                version: p.version,
                followed: f.sequence,
                followed_version: f.version,
            })
        }
        _ => Ok(()),
    }
}

/// The last promotion followed, kept in `dir/promotion`, if it is there and verifies.
pub fn load_promotion(dir: &Path, key: &ModelKey) -> Option<Promotion> {
    let p: Promotion = codec::decode_value(&std::fs::read(dir.join("promotion")).ok()?).ok()?;
    key.verify_promotion(&p).ok().map(|()| p)
}

/// Keeps `p` as the last promotion followed (written to a temporary file, synced, renamed).
pub fn save_promotion(dir: &Path, p: &Promotion) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_synced(&dir.join("promotion"), &codec::encode_value(p))
}

impl From<DownloadError> for DeployError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::Link(e) => Self::Link(e),
            DownloadError::Storage(s) => Self::Storage(s),
            other => Self::Refused(other.to_string()),
        }
    }
}

/// A verified deployed model.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// Its signed record.
    pub record: ModelRecord,
    /// Its parameters, dequantised.
    pub params: ModelParams,
}

/// Checks `blob` against a record signed by `key` and decodes it.
pub fn verify(record: &ModelRecord, blob: &[u8], key: &ModelKey) -> Result<Deployed, DeployError> {
    let params = fedge_net::open_blob(record, blob, key)?;
    Ok(Deployed { record: record.clone(), params })
}

fn blob_path(dir: &Path, v: u64) -> PathBuf {
    dir.join(format!("v{v}.blob"))
}

fn record_path(dir: &Path, v: u64) -> PathBuf {
    dir.join(format!("v{v}.record"))
}

/// Reads version `v` from `dir` and verifies it again.
pub fn load(dir: &Path, v: u64, key: &ModelKey) -> Option<Deployed> {
    load_checked(dir, v, key).ok()
}

/// Reads version `v` from `dir` and verifies it again; why not, if it fails.
fn load_checked(dir: &Path, v: u64, key: &ModelKey) -> Result<Deployed, String> {
    let read = |path: PathBuf| std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()));
    let record: ModelRecord =
        codec::decode_value(&read(record_path(dir, v))?).map_err(|e| format!("record of v{v} unreadable: {e}"))?;
    if record.version != v {
        return Err(format!("the record in v{v}.record names v{}", record.version));
    }
    let blob = read(blob_path(dir, v))?;
    verify(&record, &blob, key).map_err(|e| e.to_string())
}

/// The deployed model to run, and whether it is a fallback.
pub struct Current {
    /// The verified model.
    pub deployed: Deployed,
    /// Set when the version `current` names failed verification and the previous version
    /// kept beside it runs instead: what failed, in words.
    pub fallback: Option<String>,
}

/// The version `dir/current` names (not verified: a cheap check for a change).
pub fn current_version(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("current")).ok()?.trim().parse().ok()
}

/// The version `dir/current` names, verified; if it fails verification (a tampered or damaged
/// file), the previous verified version kept beside it, saying so (logged, and in
/// [`Current::fallback`]). `None` when no version there verifies.
pub fn load_current(dir: &Path, key: &ModelKey) -> Option<Current> {
    let v: u64 = std::fs::read_to_string(dir.join("current")).ok()?.trim().parse().ok()?;
    let why = match load_checked(dir, v, key) {
        Ok(deployed) => return Some(Current { deployed, fallback: None }),
        Err(why) => why,
    };
    // The other versions kept (install keeps the one replaced), newest first.
    let mut kept: Vec<u64> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.strip_suffix(".record")?.parse().ok())
        .filter(|&k| k != v)
        .collect();
    kept.sort_unstable_by(|a, b| b.cmp(a));
    let Some(deployed) = kept.into_iter().find_map(|k| load(dir, k, key)) else {
        tracing::error!("the deployed model v{v} failed verification ({why}) and no earlier verified version is kept");
        return None;
    };
    let fallback = format!(
        "the deployed model v{v} failed verification ({why}); running the previous verified version v{}",
        deployed.record.version
    );
    tracing::warn!("{fallback}");
    Some(Current { deployed, fallback: Some(fallback) })
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Verifies `blob` against `record` (signed by `key`) and makes it current in `dir`, keeping
/// the version it replaces: how a model obtained out of band (sideloaded) is deployed.
pub fn install_verified(
    dir: &Path,
    record: &ModelRecord,
    blob: &[u8],
    key: &ModelKey,
) -> Result<Deployed, DeployError> {
    let d = verify(record, blob, key)?;
    install(dir, &d, blob).map_err(|e| DeployError::Storage(e.to_string()))?;
    Ok(d)
}

/// Makes `d` current in `dir`, keeping the version it replaces and deleting older ones.
fn install(dir: &Path, d: &Deployed, blob: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let v = d.record.version;
    let previous: Option<u64> = std::fs::read_to_string(dir.join("current")).ok().and_then(|s| s.trim().parse().ok());
    write_synced(&blob_path(dir, v), blob)?;
    write_synced(&record_path(dir, v), &codec::encode_value(&d.record))?;
    write_synced(&dir.join("current"), format!("{v}\n").as_bytes())?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep =
            [v].into_iter().chain(previous).any(|k| name == format!("v{k}.blob") || name == format!("v{k}.record"));
        if !keep && (name.ends_with(".blob") || name.ends_with(".record")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Fetches, verifies and installs promoted version `v` (from disk when it is still there,
/// as after a rollback).
pub async fn fetch(link: &Link, v: u64, key: &ModelKey, dir: Option<&Path>) -> Result<Deployed, DeployError> {
    if let Some(dir) = dir
        && let Some(d) = load(dir, v, key)
    {
        let blob = std::fs::read(blob_path(dir, v)).map_err(|e| DeployError::Storage(e.to_string()))?;
        install(dir, &d, &blob).map_err(|e| DeployError::Storage(e.to_string()))?;
        return Ok(d);
    }
    let record = match link.request(&Message::DeployedRequest { version: v }).await? {
        Message::Deployed(r) if r.version == v => r,
        Message::Error { message, .. } => return Err(DeployError::Refused(message)),
        other => return Err(DeployError::Refused(format!("unexpected answer {other:?}"))),
    };
    // Check the signature before spending bandwidth on the blob.
    key.verify(&record)?;
    if record.size_bytes > MAX_BLOB_BYTES {
        return Err(DeployError::Blob(v, format!("{} bytes is more than a device takes", record.size_bytes)));
    }
    // Resumable: the bytes go to `v<N>-<sha256>.part` as they arrive, and a later attempt
    // (after a dropped connection or a restart) continues from its length.
    let sha256 = record.sha256;
    let ask = |offset| async move {
        let ask = Message::BlobChunkRequest { version: v, offset, max_len: crate::download::CHUNK_BYTES };
        match link.request(&ask).await? {
            Message::BlobChunk { version, total_len, offset: o, bytes }
                if version == v && o == offset && total_len == record.size_bytes =>
            {
                Ok(Chunk { id: sha256, total_len, bytes })
            }
            Message::Error { message, .. } => Err(DeployError::Refused(message)),
            other => Err(DeployError::Refused(format!("bad blob chunk {other:?}"))),
        }
    };
    let blob = fetch_resumable(dir, &format!("v{v}-"), record.size_bytes, ask).await?;
    // Whatever the verdict, the part file has served: a bad one must not be resumed.
    if let Some(p) = &blob.file {
        let _ = std::fs::remove_file(p);
    }
    let blob = blob.bytes;
    let d = verify(&record, &blob, key)?;
    if let Some(dir) = dir {
        install(dir, &d, &blob).map_err(|e| DeployError::Storage(e.to_string()))?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::params::ContentHash;
    use fedge_core::quant::QuantizedModel;
    use fedge_core::registry::{BlobFormat, ModelRole};
    use fedge_core::{ParamLayout, TensorSpec};
    use std::sync::Arc;

    /// A record and blob "signed" by a key we hold: ring makes the key pair.
    fn signed() -> (ModelRecord, Vec<u8>, ModelKey, ring::signature::Ed25519KeyPair) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let key = ModelKey::from_raw(pair.public_key().as_ref()).unwrap();
        let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![4, 3] }]).unwrap());
        let params = ModelParams::new(layout, (0..12).map(|i| i as f32 / 7.0 - 0.5).collect()).unwrap();
        let blob = codec::encode_value(&QuantizedModel::quantize(&params));
        let mut record = ModelRecord {
            parent: Some(4),
            round: 4,
            ..ModelRecord::of_blob(5, ModelRole::Student, "mlp", BlobFormat::Int8, 12, &blob)
        };
        record.signature = pair.sign(&record.signing_payload()).as_ref().to_vec();
        (record, blob, key, pair)
    }

    #[test]
    fn only_a_signed_promotion_numbered_higher_than_the_last_followed_is_followed() {
        let (_, _, key, pair) = signed();
        let promotion = |sequence, version| {
            let mut p = Promotion { sequence, version, signature: Vec::new() };
            p.signature = pair.sign(&p.signing_payload()).as_ref().to_vec();
            p
        };
        let (first, second) = (promotion(10, 5), promotion(20, 7));
        assert!(check_promotion(&first, None, &key).is_ok());
        assert!(check_promotion(&second, Some(&first), &key).is_ok());
        // The same promotion again (a restart, the next check-in) is fine.
        assert!(check_promotion(&second, Some(&second), &key).is_ok());
        // Replayed: the older instruction cannot take the device back to v5.
        let stale = check_promotion(&first, Some(&second), &key).unwrap_err();
        assert!(matches!(stale, DeployError::Stale { sequence: 10, version: 5, followed: 20, followed_version: 7 }));
        assert!(stale.to_string().contains("refusing to move back"), "{stale}");
        // One number naming two versions is not believed either.
        assert!(matches!(check_promotion(&promotion(20, 5), Some(&second), &key), Err(DeployError::Stale { .. })));
        // A rollback is a new promotion: a higher number, back to v5.
        assert!(check_promotion(&promotion(30, 5), Some(&second), &key).is_ok());
        // Unsigned, forged (the number raised after signing) or signed by another key: refused.
        let unsigned = Promotion { signature: Vec::new(), ..promotion(40, 5) };
        assert!(matches!(
            check_promotion(&unsigned, Some(&second), &key),
            Err(DeployError::Signature(SignatureError::UnsignedPromotion { sequence: 40, version: 5 }))
        ));
        let raised = Promotion { sequence: 50, ..promotion(40, 5) };
        assert!(matches!(
            check_promotion(&raised, Some(&second), &key),
            Err(DeployError::Signature(SignatureError::BadPromotion { .. }))
        ));
        let (_, _, other_key, _) = signed();
        assert!(check_promotion(&promotion(60, 5), None, &other_key).is_err());
        // Kept on disk and read back only while it verifies.
        let dir = tempfile::tempdir().unwrap();
        save_promotion(dir.path(), &second).unwrap();
        assert_eq!(load_promotion(dir.path(), &key), Some(second));
        assert_eq!(load_promotion(dir.path(), &other_key), None);
    }

    #[test]
    fn a_flipped_byte_or_a_bad_signature_is_refused() {
        let (record, blob, key, _) = signed();
        let ok = verify(&record, &blob, &key).unwrap();
        assert_eq!(ok.params.numel(), 12);
        let mut flipped = blob.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        assert!(matches!(verify(&record, &flipped, &key), Err(DeployError::Verify(BlobError::Hash { .. }))));
        let unsigned = ModelRecord { signature: Vec::new(), ..record.clone() };
        assert!(matches!(
            verify(&unsigned, &blob, &key),
            Err(DeployError::Verify(BlobError::Signature(SignatureError::Unsigned(5))))
        ));
        let (_, _, other_key, _) = signed();
        assert!(matches!(
            verify(&record, &blob, &other_key),
            Err(DeployError::Verify(BlobError::Signature(SignatureError::Bad(5))))
        ));
    }

    #[test]
    fn an_f32_global_model_deploys_too() {
        let (record, _, key, pair) = signed();
        let params = verify(&record, &signed_blob(), &key).unwrap().params;
        let blob = codec::encode(&Message::Model { version: 9, hash: params.content_hash(), params: params.clone() });
        let mut r = ModelRecord {
            version: 9,
            role: ModelRole::Global,
            format: BlobFormat::F32,
            size_bytes: blob.len() as u64,
            sha256: ContentHash::of_bytes(&blob),
            ..record
        };
        r.signature = pair.sign(&r.signing_payload()).as_ref().to_vec();
        assert_eq!(verify(&r, &blob, &key).unwrap().params, params);
        // An int8 blob under an f32 record does not decode as a model.
        let wrong = codec::encode_value(&QuantizedModel::quantize(&params));
        let mut w = ModelRecord { size_bytes: wrong.len() as u64, sha256: ContentHash::of_bytes(&wrong), ..r };
        w.signature = pair.sign(&w.signing_payload()).as_ref().to_vec();
        assert!(matches!(verify(&w, &wrong, &key), Err(DeployError::Verify(BlobError::Model(9, _)))));
    }

    fn signed_blob() -> Vec<u8> {
        signed().1
    }

    #[test]
    fn install_keeps_the_previous_version_and_survives_a_reload() {
        let (record, blob, key, pair) = signed();
        let dir = tempfile::tempdir().unwrap();
        let d = verify(&record, &blob, &key).unwrap();
        install(dir.path(), &d, &blob).unwrap();
        let mut r6 = ModelRecord { version: 6, ..record.clone() };
        r6.signature = pair.sign(&r6.signing_payload()).as_ref().to_vec();
        let mut r7 = ModelRecord { version: 7, ..record.clone() };
        r7.signature = pair.sign(&r7.signing_payload()).as_ref().to_vec();
        install(dir.path(), &verify(&r6, &blob, &key).unwrap(), &blob).unwrap();
        install(dir.path(), &verify(&r7, &blob, &key).unwrap(), &blob).unwrap();
        let current = load_current(dir.path(), &key).unwrap();
        assert_eq!((current.deployed.record.version, current.fallback), (7, None));
        assert!(load(dir.path(), 6, &key).is_some(), "the previous version is kept");
        assert!(load(dir.path(), 5, &key).is_none(), "older ones are deleted");
        // A tampered blob is not loaded: the previous verified version runs, and says why.
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        std::fs::write(blob_path(dir.path(), 7), &tampered).unwrap();
        let current = load_current(dir.path(), &key).unwrap();
        assert_eq!(current.deployed.record.version, 6);
        let why = current.fallback.unwrap();
        assert!(why.contains("v7 failed verification") && why.contains("hashes to"), "{why}");
        assert!(why.contains("previous verified version v6"), "{why}");
        // A record whose signature was tampered with too; and nothing left that verifies.
        std::fs::write(blob_path(dir.path(), 6), b"garbage").unwrap();
        assert!(load_current(dir.path(), &key).is_none());
    }
}
