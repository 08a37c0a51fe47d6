//! Durable coordinator state: model versions, the open round and its accepted updates, the
//! operator's settings, evaluations and the device registry.
//!
//! Model parameters are stored content-addressed as files (`blobs/<sha256>.bin`, the encoded
//! `Model` message, written to a temporary name, synced and renamed) before the redb
//! transaction that references them commits, so a crash at any point leaves either the old
//! state or the new one, never a reference to a missing blob. redb commits are durable
//! (fsync'd) when `commit` returns, so an update is acknowledged only after
//! [`Store::save_update`] returned.
//!
//! A round's life in the store: [`Store::begin_round`] records the round and its selection,
//! [`Store::save_update`] each accepted update, and [`Store::close_round`] in one transaction
//! records the new model version (if the round aggregated), advances the round count and
//! drops the round's updates. A restart between the first and the last finds the open round
//! and its updates in [`Restored::open`].

use std::io::Write;
use std::path::{Path, PathBuf};

use bincode::{Decode, Encode};
use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::params::ContentHash;
use fedge_core::registry::{ModelRecord, Promotion};
use fedge_core::wire::{DeviceId, Message, RoundLine, TrainResult};
use fedge_engine::Evaluation;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use thiserror::Error;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const MODELS: TableDefinition<u64, &[u8]> = TableDefinition::new("models");
const EVALUATIONS: TableDefinition<u64, (f64, f64)> = TableDefinition::new("evaluations");
const ROUNDS: TableDefinition<u64, &[u8]> = TableDefinition::new("rounds");
const UPDATES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("updates");
const DEVICES: TableDefinition<&str, u64> = TableDefinition::new("devices");
/// Registered (deployable) model versions: version -> encoded `ModelRecord`.
const REGISTRY: TableDefinition<u64, &[u8]> = TableDefinition::new("registry");

const OPEN_ROUND: &str = "open_round";
const SETTINGS: &str = "settings";
/// A regional aggregator's task from its root ([`UpstreamTask`]).
const UPSTREAM: &str = "upstream";
/// The strategy's server state saved with the latest model version (encoded
/// [`StoredServerState`]).
const SERVER_STATE: &str = "server_state";
/// Promotion history (encoded `Vec<u64>`, last = promoted now).
const PROMOTIONS: &str = "promotions";
/// The latest signed promotion (encoded `Promotion`), written with the history.
const PROMOTION: &str = "promotion";

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
    /// A stored record cannot be read.
    #[error("stored {0} is unreadable")]
    Record(&'static str),
    /// Model blobs without the database that numbers them: starting fresh would reuse version
    /// numbers for other content (devices cache by version).
    #[error(
        "{} holds {blobs} model blob(s) but its state.redb is missing or empty: refusing to start a new fleet at v0 beside them (version numbers would be reused); restore state.redb from a backup, or move the folder away to start anew",
        dir.display()
    )]
    LostDatabase {
        /// The state folder.
        dir: PathBuf,
        /// Blobs found.
        blobs: usize,
    },
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

// Records are encoded by the codec (the one place that knows the byte format), read back
// under its record limit.
fn encode_record<T: Encode>(value: &T) -> Vec<u8> {
    codec::encode_value(value)
}

fn decode_record<T: Decode<()>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    codec::decode_record(bytes).map_err(|_| StoreError::Record(what))
}

pub use records::{EncodedModel, OpenRound, Restored, RoundRecord, Settings, StoredServerState, UpstreamTask};

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
        let db_path = dir.join("state.redb");
        let empty = std::fs::metadata(&db_path).map_or(true, |m| m.len() == 0);
        if empty {
            let blobs = std::fs::read_dir(dir.join("blobs"))
                .map_err(io)?
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
                .count();
            if blobs > 0 {
                return Err(StoreError::LostDatabase { dir: dir.to_path_buf(), blobs });
            }
        }
        let db = Database::create(db_path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(META).map_err(db_err)?;
            tx.open_table(RECORDS).map_err(db_err)?;
            tx.open_table(MODELS).map_err(db_err)?;
            tx.open_table(EVALUATIONS).map_err(db_err)?;
            tx.open_table(UPDATES).map_err(db_err)?;
            tx.open_table(ROUNDS).map_err(db_err)?;
            tx.open_table(DEVICES).map_err(db_err)?;
            tx.open_table(REGISTRY).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Self { db, dir: dir.to_path_buf() })
    }

    fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join("blobs").join(format!("{hash}.bin"))
    }

    /// Writes the blob of an encoded model version unless it exists; synced before return.
    fn write_blob(&self, model: &EncodedModel) -> Result<(), StoreError> {
        let path = self.blob_path(&model.hash);
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            let io = |cause| StoreError::Io { path: tmp.clone(), cause };
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&model.bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(|cause| StoreError::Io { path: path.clone(), cause })?;
            // The rename itself must survive a power cut: sync the folder.
            if let Ok(d) = std::fs::File::open(self.dir.join("blobs")) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers a model. Its blob must already be durable in the blob store: the record is
    /// what makes it exist.
    pub fn save_registered(&self, record: &ModelRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let bytes = encode_record(record);
            tx.open_table(REGISTRY).map_err(db_err)?.insert(record.version, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The stored encoded `Model` message of global version `version`, if kept.
    pub fn model_bytes(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MODELS).map_err(db_err)?;
        let Some(hash) = t.get(version).map_err(db_err)? else { return Ok(None) };
        let hash = ContentHash(hash.value().try_into().map_err(|_| StoreError::Db("bad hash length".into()))?);
        Ok(std::fs::read(self.blob_path(&hash)).ok())
    }

    /// Size of the stored blob of a global model version, if present.
    pub fn model_blob_size(&self, hash: &ContentHash) -> Option<u64> {
        std::fs::metadata(self.blob_path(hash)).ok().map(|m| m.len())
    }

    /// Every registered model, oldest first.
    pub fn registry(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let mut out = Vec::new();
        for row in tx.open_table(REGISTRY).map_err(db_err)?.iter().map_err(db_err)? {
            out.push(decode_record::<ModelRecord>(row.map_err(db_err)?.1.value(), "registry")?);
        }
        Ok(out)
    }

    /// The promotion history, oldest first (the last is what devices should run).
    pub fn promotions(&self) -> Result<Vec<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let records = tx.open_table(RECORDS).map_err(db_err)?;
        match records.get(PROMOTIONS).map_err(db_err)? {
            Some(v) => decode_record(v.value(), "promotions"),
            None => Ok(Vec::new()),
        }
    }

    /// The latest promotion, numbered and signed, if any was made.
    pub fn promotion(&self) -> Result<Option<Promotion>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let records = tx.open_table(RECORDS).map_err(db_err)?;
        match records.get(PROMOTION).map_err(db_err)? {
            Some(v) => decode_record(v.value(), "promotion").map(Some),
            None => Ok(None),
        }
    }

    /// Replaces the promotion history and the latest promotion, in one transaction.
    pub fn save_promotions(&self, history: &[u64], latest: &Promotion) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut records = tx.open_table(RECORDS).map_err(db_err)?;
            let bytes = encode_record(&history.to_vec());
            records.insert(PROMOTIONS, bytes.as_slice()).map_err(db_err)?;
            let bytes = encode_record(latest);
            records.insert(PROMOTION, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Records model `version` (after round `round`) outside any round: the initial model.
    pub fn save_model(&self, version: u64, round: u64, params: &ModelParams) -> Result<(), StoreError> {
        let model = EncodedModel::new(version, params);
        self.write_blob(&model)?;
        let hash = model.hash;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MODELS).map_err(db_err)?.insert(version, &hash.0[..]).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            meta.insert("version", version).map_err(db_err)?;
            meta.insert("last_round", round).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// A regional aggregator took on its root's task `task`: records `model` (the root's
    /// model, adopted as version `model.version` after round `round`) and the task, and asks
    /// for `rounds_left` rounds, in one transaction (the blob first).
    pub fn adopt_upstream(
        &self,
        model: &EncodedModel,
        round: u64,
        task: &UpstreamTask,
        rounds_left: u64,
    ) -> Result<(), StoreError> {
        self.write_blob(model)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MODELS).map_err(db_err)?.insert(model.version, &model.hash.0[..]).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            meta.insert("version", model.version).map_err(db_err)?;
            meta.insert("last_round", round).map_err(db_err)?;
            meta.insert("rounds_left", rounds_left).map_err(db_err)?;
            tx.open_table(RECORDS).map_err(db_err)?.insert(UPSTREAM, encode_record(task).as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The root's task this regional aggregator last took on, if any.
    pub fn upstream(&self) -> Result<Option<UpstreamTask>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let records = tx.open_table(RECORDS).map_err(db_err)?;
        match records.get(UPSTREAM).map_err(db_err)? {
            Some(v) => Ok(Some(decode_record(v.value(), "upstream task")?)),
            None => Ok(None),
        }
    }

    /// Forgets the root task a regional aggregator stored (the coordinator is no longer one:
    /// its training settings are its own again).
    pub fn forget_upstream(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(RECORDS).map_err(db_err)?.remove(UPSTREAM).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Stored global model `version`, read back and hash-checked, if kept.
    pub fn model(&self, version: u64) -> Result<Option<ModelParams>, StoreError> {
        let Some(bytes) = self.model_bytes(version)? else { return Ok(None) };
        match codec::decode(&bytes) {
            Ok(Message::Model { version: v, hash, params }) if v == version && params.content_hash() == hash => {
                Ok(Some(params))
            }
            _ => Err(StoreError::Corrupt(format!("model v{version}"))),
        }
    }

    /// Records the settings now in force.
    pub fn save_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(RECORDS).map_err(db_err)?.insert(SETTINGS, encode_record(settings).as_slice()).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Records how many requested rounds have not started.
    pub fn set_rounds_left(&self, rounds_left: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?.insert("rounds_left", rounds_left).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Records a round that just opened (and the rounds still to start after it).
    pub fn begin_round(&self, record: &RoundRecord, rounds_left: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(RECORDS)
                .map_err(db_err)?
                .insert(OPEN_ROUND, encode_record(record).as_slice())
                .map_err(db_err)?;
            tx.open_table(META).map_err(db_err)?.insert("rounds_left", rounds_left).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Makes `device`'s accepted update in `round` durable. When this returns, the update
    /// survives a crash and may be acknowledged.
    pub fn save_update(&self, round: u64, device: DeviceId, result: &TrainResult) -> Result<(), StoreError> {
        self.save_update_bytes(round, device, &codec::encode(&Message::TrainResult(result.clone())))
    }

    /// [`Store::save_update`] for an update kept as it arrived: `bytes` is the encoded
    /// `TrainResult` message exactly as the device sent it (it must decode to one; the
    /// coordinator passes the frame it decoded and accepted).
    pub fn save_update_bytes(&self, round: u64, device: DeviceId, bytes: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(UPDATES).map_err(db_err)?.insert((round, device), bytes).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Forgets `device`'s stored update in `round` (one a restarted coordinator refuses).
    pub fn drop_update(&self, round: u64, device: DeviceId) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(UPDATES).map_err(db_err)?.remove((round, device)).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// The stored bytes of `device`'s update in `round`, if there is one.
    pub fn update_bytes(&self, round: u64, device: DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let updates = tx.open_table(UPDATES).map_err(db_err)?;
        Ok(updates.get((round, device)).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Closes round `line.round` in one transaction: records the new model version if it
    /// aggregated (blob first) and the round's summary, advances the round count, forgets the
    /// open round and its updates.
    pub fn close_round(
        &self,
        line: &RoundLine,
        aggregated: Option<(u64, &ModelParams)>,
        rounds_left: u64,
    ) -> Result<(), StoreError> {
        let model = aggregated.map(|(version, params)| EncodedModel::new(version, params));
        self.close_round_encoded(line, model.as_ref(), None, rounds_left)
    }

    /// [`Store::close_round`] with the new model version already encoded (the coordinator
    /// encodes each version once, for the store and for its downloads alike).
    /// `server_state`, when given, is saved with the new version in the same transaction.
    pub fn close_round_encoded(
        &self,
        line: &RoundLine,
        aggregated: Option<&EncodedModel>,
        server_state: Option<&StoredServerState>,
        rounds_left: u64,
    ) -> Result<(), StoreError> {
        let round = line.round;
        if let Some(model) = aggregated {
            self.write_blob(model)?;
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            if let Some(model) = aggregated {
                tx.open_table(MODELS).map_err(db_err)?.insert(model.version, &model.hash.0[..]).map_err(db_err)?;
                meta.insert("version", model.version).map_err(db_err)?;
            }
            meta.insert("last_round", round).map_err(db_err)?;
            meta.insert("rounds_left", rounds_left).map_err(db_err)?;
            tx.open_table(ROUNDS)
                .map_err(db_err)?
                .insert(round, encode_record(&records::StoredRound::from(line)).as_slice())
                .map_err(db_err)?;
            let mut records = tx.open_table(RECORDS).map_err(db_err)?;
            // Only this round's record: FedBuff records the next buffer as soon as one fills,
            // which can be before that buffer's close is written.
            let open =
                records.get(OPEN_ROUND).map_err(db_err)?.map(|v| decode_record::<RoundRecord>(v.value(), "open round"));
            if open.is_none_or(|r| r.is_err() || r.is_ok_and(|r| r.round == round)) {
                records.remove(OPEN_ROUND).map_err(db_err)?;
            }
            if let (Some(_), Some(state)) = (aggregated, server_state) {
                records.insert(SERVER_STATE, encode_record(state).as_slice()).map_err(db_err)?;
            }
            drop(records);
            let mut updates = tx.open_table(UPDATES).map_err(db_err)?;
            updates.retain_in((round, 0)..=(round, u64::MAX), |_, _| false).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Forgets the saved strategy state (the next start begins the strategy afresh, as after
    /// a change of strategy).
    pub fn forget_server_state(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(RECORDS).map_err(db_err)?.remove(SERVER_STATE).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Records the evaluation of model `version`.
    pub fn save_evaluation(&self, version: u64, e: Evaluation) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(EVALUATIONS).map_err(db_err)?.insert(version, (e.accuracy, e.loss)).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Everything stored, if a model was ever stored: the latest version read back and
    /// hash-checked, the open round with its updates, settings and evaluations.
    pub fn latest(&self) -> Result<Option<Restored>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        let Some(version) = meta.get("version").map_err(db_err)?.map(|v| v.value()) else { return Ok(None) };
        let last_round = meta.get("last_round").map_err(db_err)?.map_or(0, |v| v.value());
        let rounds_left = meta.get("rounds_left").map_err(db_err)?.map_or(0, |v| v.value());
        let models = tx.open_table(MODELS).map_err(db_err)?;
        let hash_bytes =
            models.get(version).map_err(db_err)?.ok_or_else(|| StoreError::Db(format!("no model {version}")))?;
        let hash = ContentHash(hash_bytes.value().try_into().map_err(|_| StoreError::Db("bad hash length".into()))?);
        let path = self.blob_path(&hash);
        let bytes = std::fs::read(&path).map_err(|cause| StoreError::Io { path: path.clone(), cause })?;
        let params = match codec::decode(&bytes) {
            Ok(Message::Model { params, .. }) if params.content_hash() == hash => params,
            _ => return Err(StoreError::Corrupt(hash.to_string())),
        };
        let records = tx.open_table(RECORDS).map_err(db_err)?;
        let settings = match records.get(SETTINGS).map_err(db_err)? {
            Some(v) => Some(decode_record::<Settings>(v.value(), "settings")?),
            None => None,
        };
        let server_state = match records.get(SERVER_STATE).map_err(db_err)? {
            // One or two model-sized vectors: the message size limit, not the record one.
            Some(v) => Some(
                codec::decode_value::<StoredServerState>(v.value()).map_err(|_| StoreError::Record("server state"))?,
            ),
            None => None,
        };
        let open = match records.get(OPEN_ROUND).map_err(db_err)? {
            Some(v) => {
                let record: RoundRecord = decode_record(v.value(), "open round")?;
                let updates = tx.open_table(UPDATES).map_err(db_err)?;
                let mut accepted = Vec::new();
                for row in updates.range((record.round, 0)..=(record.round, u64::MAX)).map_err(db_err)? {
                    let (k, v) = row.map_err(db_err)?;
                    match codec::decode(v.value()) {
                        Ok(Message::TrainResult(r)) => accepted.push((k.value().1, r)),
                        _ => return Err(StoreError::Record("update")),
                    }
                }
                Some(OpenRound { record, accepted })
            }
            None => None,
        };
        let mut evaluations = Vec::new();
        for row in tx.open_table(EVALUATIONS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (accuracy, loss) = v.value();
            evaluations.push((k.value(), Evaluation { accuracy, loss }));
        }
        let mut rounds = Vec::new();
        for row in tx.open_table(ROUNDS).map_err(db_err)?.iter().map_err(db_err)? {
            rounds.push(decode_record::<records::StoredRound>(row.map_err(db_err)?.1.value(), "round")?.into());
        }
        Ok(Some(Restored {
            version,
            last_round,
            params,
            rounds_left,
            settings,
            open,
            evaluations,
            rounds,
            server_state,
        }))
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

mod records;
#[cfg(test)]
mod tests;
