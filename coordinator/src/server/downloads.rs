//! Downloads: the global model versions kept for devices (the last few) with their encoded
//! `Model` messages, the registered versions' blobs, and the answers to model and blob
//! requests, whole or chunked (one chunk slicer for both).
//!
//! Nothing is encoded or read from disk under the state lock: a version's bytes are encoded
//! once when its round closes (shared with the store), and a request for bytes not in memory
//! is prepared first ([`Coordinator::prepare_download`]) with the lock released.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use fedge_core::ModelParams;
use fedge_core::params::ContentHash;
use fedge_core::registry::BlobFormat;
use fedge_core::wire::{ErrorCode, Message};

use super::{Coordinator, State};
use crate::metrics::Metrics;
use crate::store::EncodedModel;

/// Largest chunk of a model download sent at once.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;

/// How many global versions are kept for devices still fetching them.
const KEEP_VERSIONS: usize = 4;
/// How many registered versions' blobs are kept in memory: the least recently used goes first
/// (a device asking for every old version in turn cannot make us hold them all; an evicted
/// one is read from disk again when asked for).
pub(super) const KEEP_BLOBS: usize = 8;

/// What devices can download, in memory.
pub(super) struct DownloadCache {
    /// Global versions kept, by version.
    models: BTreeMap<u64, Arc<ModelParams>>,
    /// Their `Model` messages, encoded once and sent to every device.
    encoded: BTreeMap<u64, EncodedModel>,
    /// Registered versions' blobs (kept when registered in this run or first sent), each with
    /// when it was last used; at most [`KEEP_BLOBS`].
    blobs: BTreeMap<u64, (Arc<Vec<u8>>, u64)>,
    /// The clock of `blobs`' last uses.
    uses: u64,
}

impl DownloadCache {
    /// A cache holding global version `version`.
    pub(super) fn new(version: u64, params: Arc<ModelParams>) -> Self {
        Self { models: BTreeMap::from([(version, params)]), encoded: BTreeMap::new(), blobs: BTreeMap::new(), uses: 0 }
    }

    /// The parameters of global version `v`, if kept.
    pub(super) fn model(&self, v: u64) -> Option<Arc<ModelParams>> {
        self.models.get(&v).cloned()
    }

    /// Global versions kept.
    pub(super) fn models(&self) -> &BTreeMap<u64, Arc<ModelParams>> {
        &self.models
    }

    /// The encoded `Model` message of version `v`, if encoded.
    pub(super) fn encoded(&self, v: u64) -> Option<EncodedModel> {
        self.encoded.get(&v).cloned()
    }

    /// A new global version and its bytes.
    pub(super) fn publish(&mut self, params: Arc<ModelParams>, model: EncodedModel) {
        self.models.entry(model.version).or_insert(params);
        self.encoded.insert(model.version, model);
    }

    /// The bytes of a version kept (ignored if the version is not).
    pub(super) fn keep_encoded(&mut self, model: EncodedModel) {
        if self.models.contains_key(&model.version) {
            self.encoded.entry(model.version).or_insert(model);
        }
    }

    /// The blob of registered version `v`, now the most recently used; the least recently
    /// used goes when more than [`KEEP_BLOBS`] are kept.
    pub(super) fn keep_blob(&mut self, v: u64, blob: Arc<Vec<u8>>) {
        self.uses += 1;
        self.blobs.insert(v, (blob, self.uses));
        while self.blobs.len() > KEEP_BLOBS {
            let Some(oldest) = self.blobs.iter().min_by_key(|(_, (_, used))| *used).map(|(v, _)| *v) else { break };
            self.blobs.remove(&oldest);
        }
    }

    /// Whether registered version `v`'s blob is in memory; marks it used.
    pub(super) fn use_blob(&mut self, v: u64) -> bool {
        self.uses += 1;
        match self.blobs.get_mut(&v) {
            Some((_, used)) => {
                *used = self.uses;
                true
            }
            None => false,
        }
    }

    /// Forgets all but the last few global versions.
    pub(super) fn prune(&mut self) {
        while self.models.len() > KEEP_VERSIONS {
            if let Some((old, _)) = self.models.pop_first() {
                self.encoded.remove(&old);
            }
        }
    }

    /// The encoded version `v`. Versions are encoded when published or ahead of the request
    /// by [`Coordinator::prepare_download`], so the encoding here (under the lock) is only a
    /// fallback that the request paths do not reach.
    fn encoded_or_encode(&mut self, v: u64) -> Option<EncodedModel> {
        if let Some(kept) = self.encoded.get(&v) {
            return Some(kept.clone());
        }
        let model = EncodedModel::new(v, self.models.get(&v)?);
        self.encoded.insert(v, model.clone());
        Some(model)
    }
}

/// The one chunk slicer: the bytes to send of a `len`-byte download for a request at
/// `offset` of at most `max_len` bytes (and at most [`MAX_CHUNK_BYTES`]); `None` past the end.
pub(super) fn chunk(len: usize, offset: u64, max_len: u32) -> Option<Range<usize>> {
    if offset > len as u64 {
        return None;
    }
    let start = offset as usize;
    let end = start + (max_len.min(MAX_CHUNK_BYTES) as usize).min(len - start);
    Some(start..end)
}

/// An answer to a device: a message, one already encoded, or a model chunk (its encoded
/// prefix, then a range of an encoded model sent without copying).
pub(super) enum Reply {
    Message(Message),
    Encoded(Arc<Vec<u8>>),
    Chunk(Vec<u8>, Arc<Vec<u8>>, Range<usize>),
}

/// The refusal for a version not kept.
pub(super) fn not_kept(v: u64) -> Message {
    Message::Error { code: ErrorCode::StaleModel, message: format!("model version {v} is not kept") }
}

impl State {
    /// The whole encoded model `version` (default: the published one).
    pub(super) fn model_download(&mut self, version: Option<u64>) -> Reply {
        let v = version.unwrap_or_else(|| self.rounds.version());
        match self.downloads.encoded_or_encode(v) {
            Some(model) => Reply::Encoded(model.bytes),
            None => Reply::Message(not_kept(v)),
        }
    }

    /// A chunk of encoded model `version`.
    pub(super) fn model_chunk(&mut self, version: u64, offset: u64, max_len: u32) -> Reply {
        let Some(model) = self.downloads.encoded_or_encode(version) else { return Reply::Message(not_kept(version)) };
        let total = model.bytes.len();
        match chunk(total, offset, max_len) {
            Some(range) => {
                let prefix =
                    fedge_core::codec::model_chunk_prefix(version, model.hash, total as u64, offset, range.len());
                Reply::Chunk(prefix, model.bytes, range)
            }
            None => Reply::Message(Message::Error {
                code: ErrorCode::Malformed,
                message: format!("offset {offset} is past the end of model v{version} ({total} bytes)"),
            }),
        }
    }

    /// A chunk of registered version `version`'s blob.
    pub(super) fn blob_chunk(&self, version: u64, offset: u64, max_len: u32, metrics: &Metrics) -> Message {
        let Some((blob, _)) = self.downloads.blobs.get(&version) else { return not_kept(version) };
        match chunk(blob.len(), offset, max_len) {
            Some(range) => {
                metrics.sent(range.len());
                Message::BlobChunk { version, total_len: blob.len() as u64, offset, bytes: blob[range].to_vec() }
            }
            None => Message::Error {
                code: ErrorCode::Malformed,
                message: format!("offset {offset} is past the end of v{version} ({} bytes)", blob.len()),
            },
        }
    }
}

impl Coordinator {
    /// Brings into memory, with the state lock released, what answering `request` needs:
    /// the encoded model it names, or the registered blob (read from the store or the blob
    /// store, hash-checked).
    pub(super) async fn prepare_download(&self, request: &Message) {
        match request {
            Message::BlobChunkRequest { version, .. } => self.cache_blob(*version).await,
            Message::ModelRequest { version } => {
                let v = version.unwrap_or_else(|| self.lock().rounds.version());
                self.cache_encoded(v);
            }
            Message::ModelChunkRequest { version, .. } => self.cache_encoded(*version),
            _ => {}
        }
    }

    /// Encodes kept global version `v` if it is not encoded yet.
    fn cache_encoded(&self, v: u64) {
        let params = {
            let s = self.lock();
            if s.downloads.encoded.contains_key(&v) {
                return;
            }
            let Some(params) = s.downloads.model(v) else { return };
            params
        };
        let model = EncodedModel::new(v, &params);
        self.lock().downloads.keep_encoded(model);
    }

    /// Reads registered version `v`'s blob from the blob store into memory (hash-checked), if
    /// it is not there yet. A failure is logged; the device is then told the version is not kept.
    async fn cache_blob(&self, v: u64) {
        let (hash, format, blobs) = {
            let mut s = self.lock();
            if s.downloads.use_blob(v) {
                return;
            }
            match (s.registry.records.get(&v), &s.registry.blob_store) {
                (Some(r), Some(b)) => (r.sha256, r.format, b.clone()),
                _ => return,
            }
        };
        // Global versions' blobs are the store's own model files.
        let from_store = match &self.store {
            Some(st) if format == BlobFormat::F32 => st.model_bytes(v).ok().flatten(),
            _ => None,
        };
        let read = match from_store {
            Some(bytes) if ContentHash::of_bytes(&bytes) == hash => Ok(bytes),
            _ => blobs.get(&hash).await,
        };
        match read {
            Ok(bytes) => self.lock().downloads.keep_blob(v, Arc::new(bytes)),
            Err(e) => tracing::error!("cannot read the blob of v{v}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_kept_are_bounded_and_the_least_recently_used_goes() {
        let layout = Arc::new(
            fedge_core::ParamLayout::new(vec![fedge_core::TensorSpec { name: "w".into(), shape: vec![1] }]).unwrap(),
        );
        let mut cache = DownloadCache::new(0, Arc::new(ModelParams::new(layout, vec![0.0]).unwrap()));
        for v in 0..KEEP_BLOBS as u64 {
            cache.keep_blob(v, Arc::new(vec![v as u8]));
        }
        assert!(cache.use_blob(0), "v0 used again: now the most recent");
        for v in 100..103 {
            cache.keep_blob(v, Arc::new(vec![1]));
        }
        assert_eq!(cache.blobs.len(), KEEP_BLOBS);
        let kept: Vec<u64> = cache.blobs.keys().copied().collect();
        assert_eq!(kept, vec![0, 4, 5, 6, 7, 100, 101, 102]);
        assert!(!cache.use_blob(1));
    }

    #[test]
    fn chunks_cover_a_download_and_stop_at_its_end() {
        assert_eq!(chunk(10, 0, 4), Some(0..4));
        assert_eq!(chunk(10, 8, 4), Some(8..10));
        assert_eq!(chunk(10, 10, 4), Some(10..10));
        assert_eq!(chunk(10, 11, 4), None);
        assert_eq!(chunk(10 * MAX_CHUNK_BYTES as usize, 0, u32::MAX), Some(0..MAX_CHUNK_BYTES as usize));
    }
}
