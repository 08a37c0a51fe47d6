//! Registry blobs (distilled, quantised students) behind the `object_store` API, addressed by
//! their SHA-256: the local filesystem under the state folder by default, any object store a URL
//! names otherwise (`file:///srv/fedge/blobs`, or `s3://bucket/prefix` when built with the
//! `s3` feature). Records stay in redb; a record is committed only after its blob is stored,
//! and every read is checked against the hash.

use std::sync::Arc;

use fedge_core::params::ContentHash;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use thiserror::Error;

/// Blob storage failures.
#[derive(Debug, Error)]
pub enum BlobError {
    /// The URL names no store this build supports.
    #[error("blob store `{0}`: {1}")]
    Url(String, String),
    /// The store failed.
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    /// The bytes read back do not hash to their name.
    #[error("blob {0} is corrupt")]
    Corrupt(String),
    /// A local file could not be synced.
    #[error("blob {0}: {1}")]
    Io(String, std::io::Error),
}

/// Content-addressed blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The folder, when the store is the local filesystem (files are synced after writing).
    local: Option<std::path::PathBuf>,
}

impl BlobStore {
    /// Blobs as files under `dir` (created if needed).
    pub fn local(dir: &std::path::Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir).map_err(|e| BlobError::Io(dir.display().to_string(), e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(Self { store: Arc::new(store), prefix: ObjectPath::default(), local: Some(dir.to_path_buf()) })
    }

    /// The store a URL names (`file:///abs/dir`, `memory:///`, `s3://bucket/prefix` with the
    /// `s3` feature).
    pub fn from_url(url: &str) -> Result<Self, BlobError> {
        let parsed = url::Url::parse(url).map_err(|e| BlobError::Url(url.into(), e.to_string()))?;
        if parsed.scheme() == "file" {
            let dir = parsed.to_file_path().map_err(|_| BlobError::Url(url.into(), "not a local path".into()))?;
            return Self::local(&dir);
        }
        let (store, prefix) =
            object_store::parse_url(&parsed).map_err(|e| BlobError::Url(url.into(), e.to_string()))?;
        Ok(Self { store: Arc::from(store), prefix, local: None })
    }

    fn path(&self, hash: &ContentHash) -> ObjectPath {
        self.prefix.clone().join(format!("{hash}.blob"))
    }

    /// Stores `bytes` under their hash (idempotent) and returns it; on the local filesystem the
    /// file is synced before this returns.
    pub async fn put(&self, bytes: Vec<u8>) -> Result<ContentHash, BlobError> {
        let hash = ContentHash::of_bytes(&bytes);
        self.store.put(&self.path(&hash), PutPayload::from(bytes)).await?;
        if let Some(dir) = &self.local {
            let file = dir.join(format!("{hash}.blob"));
            let f = std::fs::File::open(&file).map_err(|e| BlobError::Io(file.display().to_string(), e))?;
            f.sync_all().map_err(|e| BlobError::Io(file.display().to_string(), e))?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(hash)
    }

    /// The blob named `hash`, checked.
    pub async fn get(&self, hash: &ContentHash) -> Result<Vec<u8>, BlobError> {
        let bytes = self.store.get(&self.path(hash)).await?.bytes().await?.to_vec();
        if ContentHash::of_bytes(&bytes) != *hash {
            return Err(BlobError::Corrupt(hash.to_string()));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_round_trip_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let hash = store.put(b"student".to_vec()).await.unwrap();
        assert_eq!(store.get(&hash).await.unwrap(), b"student");
        // Idempotent: the same bytes again are the same blob.
        assert_eq!(store.put(b"student".to_vec()).await.unwrap(), hash);
        // The same folder through a URL.
        let url = format!("file://{}", dir.path().display());
        assert_eq!(BlobStore::from_url(&url).unwrap().get(&hash).await.unwrap(), b"student");
        std::fs::write(dir.path().join(format!("{hash}.blob")), b"tampered").unwrap();
        assert!(matches!(store.get(&hash).await, Err(BlobError::Corrupt(_))));
        assert!(BlobStore::from_url("gopher://x").is_err());
        assert!(store.get(&ContentHash::of_bytes(b"missing")).await.is_err());
    }
}
