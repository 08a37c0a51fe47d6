//! Durable coordinator state: model versions, round count and the device registry.
//!
//! Model parameters are stored content-addressed as files (`blobs/<sha256>.bin`, the encoded
//! `Model` message, written to a temporary name, synced and renamed) before the redb
//! transaction that references them commits, so a crash at any point leaves either the old
//! state or the new one, never a reference to a missing blob. redb commits are durable when
//! `commit` returns.
//!
//! Not yet stored: the updates of an open round (a restart loses the round in progress, not a
//! completed one).

use std::io::Write;
use std::path::{Path, PathBuf};

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::params::ContentHash;
use fedge_core::wire::{DeviceId, Message};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use thiserror::Error;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MODELS: TableDefinition<u64, &[u8]> = TableDefinition::new("models");
const DEVICES: TableDefinition<&str, u64> = TableDefinition::new("devices");

/// Storage failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// File system trouble.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The database failed.
    #[error("state database: {0}")]
    Db(String),
    /// A stored model does not match its hash.
    #[error("model blob {0} is corrupt")]
    Corrupt(String),
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The model of the latest version, as stored.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Model version.
    pub version: u64,
    /// Last round closed.
    pub last_round: u64,
    /// The parameters (hash checked).
    pub params: ModelParams,
}

/// The coordinator's state folder.
pub struct Store {
    db: Database,
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |cause| StoreError::Io { path: dir.to_path_buf(), cause };
        std::fs::create_dir_all(dir.join("blobs")).map_err(io)?;
        let db = Database::create(dir.join("state.redb")).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(META).map_err(db_err)?;
            tx.open_table(MODELS).map_err(db_err)?;
            tx.open_table(DEVICES).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Self { db, dir: dir.to_path_buf() })
    }

    fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join("blobs").join(format!("{hash}.bin"))
    }

    /// Records model `version` (after round `round`): its blob first, then the reference.
    pub fn save_model(&self, version: u64, round: u64, params: &ModelParams) -> Result<(), StoreError> {
        let hash = params.content_hash();
        let path = self.blob_path(&hash);
        if !path.exists() {
            let bytes = codec::encode(&Message::Model { version, hash, params: params.clone() });
            let tmp = path.with_extension("tmp");
            let io = |cause| StoreError::Io { path: tmp.clone(), cause };
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(|cause| StoreError::Io { path: path.clone(), cause })?;
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MODELS).map_err(db_err)?.insert(version, &hash.0[..]).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            meta.insert("version", version).map_err(db_err)?;
            meta.insert("last_round", round).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The latest stored model version, if any, read back and hash-checked.
    pub fn latest(&self) -> Result<Option<Restored>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        let Some(version) = meta.get("version").map_err(db_err)?.map(|v| v.value()) else { return Ok(None) };
        let last_round = meta.get("last_round").map_err(db_err)?.map_or(0, |v| v.value());
        let models = tx.open_table(MODELS).map_err(db_err)?;
        let hash_bytes =
            models.get(version).map_err(db_err)?.ok_or_else(|| StoreError::Db(format!("no model {version}")))?;
        let hash = ContentHash(hash_bytes.value().try_into().map_err(|_| StoreError::Db("bad hash length".into()))?);
        let path = self.blob_path(&hash);
        let bytes = std::fs::read(&path).map_err(|cause| StoreError::Io { path: path.clone(), cause })?;
        match codec::decode(&bytes) {
            Ok(Message::Model { params, .. }) if params.content_hash() == hash => {
                Ok(Some(Restored { version, last_round, params }))
            }
            _ => Err(StoreError::Corrupt(hash.to_string())),
        }
    }

    /// Stored model versions and their hashes, oldest first.
    pub fn models(&self) -> Result<Vec<(u64, ContentHash)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MODELS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let hash = v.value().try_into().map_err(|_| StoreError::Db("bad hash length".into()))?;
            out.push((k.value(), ContentHash(hash)));
        }
        Ok(out)
    }

    /// The numeric id of the device with certificate id `name`, assigned on first sight and
    /// stable across restarts.
    pub fn device_id(&self, name: &str) -> Result<DeviceId, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut t = tx.open_table(DEVICES).map_err(db_err)?;
            let existing = t.get(name).map_err(db_err)?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    let id = t.len().map_err(db_err)?;
                    t.insert(name, id).map_err(db_err)?;
                    id
                }
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(id)
    }

    /// All registered devices, by certificate id.
    pub fn devices(&self) -> Result<Vec<(String, DeviceId)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(DEVICES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::{ParamLayout, TensorSpec};
    use std::sync::Arc;

    fn params(x: f32) -> ModelParams {
        let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![3] }]).unwrap());
        ModelParams::new(layout, vec![x, x + 1.0, x + 2.0]).unwrap()
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.latest().unwrap().is_none());
            assert_eq!(s.device_id("a").unwrap(), 0);
            assert_eq!(s.device_id("b").unwrap(), 1);
            s.save_model(0, 0, &params(0.0)).unwrap();
            s.save_model(1, 1, &params(1.0)).unwrap();
            s.save_model(2, 3, &params(2.0)).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let r = s.latest().unwrap().unwrap();
        assert_eq!((r.version, r.last_round), (2, 3));
        assert_eq!(r.params, params(2.0));
        assert_eq!(s.models().unwrap().len(), 3);
        assert_eq!(s.device_id("b").unwrap(), 1);
        assert_eq!(s.device_id("c").unwrap(), 2);
    }

    #[test]
    fn a_damaged_blob_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.save_model(1, 1, &params(5.0)).unwrap();
        let blob = s.blob_path(&params(5.0).content_hash());
        let mut bytes = std::fs::read(&blob).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        std::fs::write(&blob, bytes).unwrap();
        assert!(matches!(s.latest(), Err(StoreError::Corrupt(_))));
    }
}
