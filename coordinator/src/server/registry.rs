//! The model registry: deployable model versions (every global version, and the int8
//! students distilled from them), signed, stored before they are published; the promotion
//! history (the last is what devices should run) and rollback.
//!
//! Students get a version from the engine's one sequence (`allocate_version`); their blob is
//! durable in the blob store before the redb record that names it. A global version's blob is
//! its encoded `Model` message, the very bytes the store keeps and devices download.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole, Promotion};

use super::{Coordinator, Ordered};
use crate::blobs::{BlobError, BlobStore};
use crate::certs::ModelSigner;
use crate::store::{EncodedModel, Store, StoreError};

/// The registry's part of the coordinator's state.
#[derive(Default)]
pub(super) struct Registry {
    /// Registered (deployable) models by version.
    pub(super) records: BTreeMap<u64, ModelRecord>,
    /// Promotion history; the last is what devices should run.
    pub(super) promotions: Vec<u64>,
    /// The latest promotion, numbered and signed: what `NoTask` carries to devices.
    pub(super) latest: Option<Promotion>,
    /// Signs registered models (none: models are registered unsigned and devices refuse them).
    pub(super) signer: Option<Arc<ModelSigner>>,
    /// Where registry blobs live (none: in memory only).
    pub(super) blob_store: Option<BlobStore>,
    /// Architecture of the global model, for the registry.
    pub(super) architecture: String,
}

/// A distilled, quantised model to register: a student for devices, or a medium-tier model
/// for regional aggregators.
#[derive(Debug, Clone)]
pub struct NewStudent {
    /// The global version it was distilled from.
    pub parent: u64,
    /// The round that produced the parent.
    pub round: u64,
    /// Its architecture.
    pub architecture: String,
    /// Its parameter count.
    pub parameters: u64,
    /// Its test accuracy (as devices run it), if measured.
    pub accuracy: Option<f64>,
    /// Its median single-image inference time, microseconds, if measured.
    pub latency_us: Option<f64>,
    /// The encoded quantised model.
    pub blob: Vec<u8>,
}

/// Why a model could not be registered, promoted or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such registered version.
    #[error("no registered model v{0}")]
    Unknown(u64),
    /// Not a model for devices.
    #[error("v{0} is a global (teacher) model, not a distilled student: devices run students")]
    NotDeployable(u64),
    /// Nothing to roll back to.
    #[error("nothing to roll back to: {0} promotion(s) so far")]
    NoPrevious(usize),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blob store failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// The registration of a global version, decided under the state lock and written without it.
pub(super) struct GlobalPlan {
    version: u64,
    round: u64,
    epsilon: Option<f64>,
    parent: Option<u64>,
    parameters: u64,
    architecture: String,
    signer: Option<Arc<ModelSigner>>,
}

impl Registry {
    /// Takes back what a previous run stored.
    pub(super) fn restore(
        &mut self,
        records: BTreeMap<u64, ModelRecord>,
        promotions: Vec<u64>,
        latest: Option<Promotion>,
        blobs: BlobStore,
    ) {
        self.records = records;
        self.promotions = promotions;
        self.latest = latest;
        self.blob_store = Some(blobs);
    }

    /// How to register global version `version` (trained in `round`), unless it already is.
    pub(super) fn plan_global(
        &self,
        version: u64,
        round: u64,
        epsilon: Option<f64>,
        parameters: u64,
    ) -> Option<GlobalPlan> {
        if self.records.contains_key(&version) {
            return None;
        }
        let parent =
            self.records.values().rev().find(|r| r.role == ModelRole::Global && r.version < version).map(|r| r.version);
        Some(GlobalPlan {
            version,
            round,
            epsilon,
            parent,
            parameters,
            architecture: self.architecture.clone(),
            signer: self.signer.clone(),
        })
    }
}

impl GlobalPlan {
    /// The version's record over its encoded bytes, signed when a signer is set and stored;
    /// the store's error when it cannot be stored.
    pub(super) fn write(self, model: &EncodedModel, store: Option<&Store>) -> Result<ModelRecord, StoreError> {
        let v = self.version;
        let mut record = ModelRecord {
            parent: self.parent,
            round: self.round,
            epsilon: self.epsilon,
            created_at: unix_now(),
            ..ModelRecord::of_blob(
                v,
                ModelRole::Global,
                &self.architecture,
                BlobFormat::F32,
                self.parameters,
                &model.bytes,
            )
        };
        if let Some(signer) = &self.signer
            && let Err(e) = signer.sign(&mut record)
        {
            tracing::error!("cannot sign global model v{v}: {e}");
        }
        if let Some(store) = store {
            store.save_registered(&record)?;
        }
        Ok(record)
    }
}

impl Coordinator {
    /// Signs models registered from now on with `signer`, and names the global model's
    /// architecture in the registry.
    pub fn set_signer(&self, signer: ModelSigner, architecture: &str) {
        let order = self.ordered();
        self.set_signer_ordered(&order, signer, architecture);
        // A state kept by a version before numbered promotions: number the current one.
        let history = {
            let s = self.lock();
            (s.registry.latest.is_none() && !s.registry.promotions.is_empty()).then(|| s.registry.promotions.clone())
        };
        if let Some(history) = history
            && let Err(e) = self.record_promotion(&order, history)
        {
            tracing::error!("cannot number the current promotion: {e}");
        }
    }

    fn set_signer_ordered(&self, _order: &Ordered<'_>, signer: ModelSigner, architecture: &str) {
        // The model this run starts from is a version too.
        let (plan, params, encoded) = {
            let mut s = self.lock();
            s.registry.signer = Some(Arc::new(signer));
            s.registry.architecture = architecture.to_string();
            let v = s.rounds.version();
            let round = s.rounds.history.last().map_or(0, |r| r.round);
            let epsilon = s.rounds.epsilon_of(v);
            let Some(params) = s.downloads.model(v) else { return };
            let plan = s.registry.plan_global(v, round, epsilon, params.numel() as u64);
            (plan, params, s.downloads.encoded(v))
        };
        let Some(plan) = plan else { return };
        let v = plan.version;
        let model = encoded.unwrap_or_else(|| EncodedModel::new(v, &params));
        let record = plan.write(&model, self.store.as_ref());
        if let Err(e) = &record {
            self.storage_failed(format_args!("cannot register global model v{v}"), e);
        }
        let mut s = self.lock();
        s.downloads.keep_encoded(model.clone());
        if let Ok(record) = record {
            s.registry.records.insert(v, record);
            s.downloads.keep_blob(v, model.bytes);
        }
    }

    /// Keeps registry blobs in `blobs` from now on (the default with a store is the local
    /// filesystem under its folder).
    pub fn set_blob_store(&self, blobs: BlobStore) {
        self.lock().registry.blob_store = Some(blobs);
    }

    /// Registers a student distilled from global version `student.parent`: stores its blob,
    /// allocates its version, signs its record, commits it, and promotes it if `promote`.
    /// Returns the record.
    pub async fn register_student(&self, student: NewStudent, promote: bool) -> Result<ModelRecord, RegistryError> {
        self.register_distilled(student, ModelRole::Student, promote).await
    }

    /// Registers a medium-tier model distilled from global version `model.parent`, for
    /// regional aggregators (they fetch the newest with `RegionalRequest`); never promoted to
    /// devices. Returns the record.
    pub async fn register_regional(&self, model: NewStudent) -> Result<ModelRecord, RegistryError> {
        self.register_distilled(model, ModelRole::Regional, false).await
    }

    async fn register_distilled(
        &self,
        student: NewStudent,
        role: ModelRole,
        promote: bool,
    ) -> Result<ModelRecord, RegistryError> {
        let NewStudent { parent, round, architecture, parameters, accuracy, latency_us, blob } = student;
        // The blob is durable before any record names it.
        let blobs = self.lock().registry.blob_store.clone();
        if let Some(b) = &blobs {
            b.put(blob.clone()).await?;
        }
        let order = self.ordered();
        let (version, epsilon, signer) = {
            let mut s = self.lock();
            let epsilon = s.rounds.epsilon_of(parent);
            (s.rounds.engine.allocate_version(), epsilon, s.registry.signer.clone())
        };
        let mut record = ModelRecord {
            parent: Some(parent),
            round,
            accuracy,
            latency_us,
            epsilon,
            created_at: unix_now(),
            ..ModelRecord::of_blob(version, role, &architecture, BlobFormat::Int8, parameters, &blob)
        };
        if let Some(signer) = &signer {
            signer.sign(&mut record).map_err(|e| RegistryError::Sign(e.to_string()))?;
        }
        if let Some(store) = &self.store {
            store
                .save_registered(&record)
                .inspect_err(|e| self.storage_failed(format_args!("cannot register {role:?} model v{version}"), e))?;
        }
        {
            let mut s = self.lock();
            s.registry.records.insert(version, record.clone());
            s.downloads.keep_blob(version, Arc::new(blob));
        }
        if promote {
            self.promote_ordered(&order, version)?;
        }
        self.changed.notify_waiters();
        Ok(record)
    }

    fn promote_ordered(&self, order: &Ordered<'_>, version: u64) -> Result<(), RegistryError> {
        let history = {
            let s = self.lock();
            match s.registry.records.get(&version) {
                None => return Err(RegistryError::Unknown(version)),
                Some(r) if r.role != ModelRole::Student => return Err(RegistryError::NotDeployable(version)),
                Some(_) => {}
            }
            let mut history = s.registry.promotions.clone();
            if history.last() != Some(&version) {
                history.push(version);
            }
            history
        };
        self.record_promotion(order, history)
    }

    /// Makes the last of `history` what devices should run: the next numbered promotion, signed,
    /// recorded with the history, then published.
    fn record_promotion(&self, _order: &Ordered<'_>, history: Vec<u64>) -> Result<(), RegistryError> {
        let (mut latest, signer) = {
            let s = self.lock();
            let version = *history.last().expect("a promotion names a version");
            // Numbered by the clock (milliseconds since the epoch), and always past the last
            // number: a coordinator restored from an old backup still issues numbers above
            // everything devices followed before.
            let last = s.registry.latest.as_ref().map_or(0, |p| p.sequence);
            let sequence = last.saturating_add(1).max(unix_now_ms());
            (Promotion { sequence, version, signature: Vec::new() }, s.registry.signer.clone())
        };
        if let Some(signer) = &signer {
            signer.sign_promotion(&mut latest).map_err(|e| RegistryError::Sign(e.to_string()))?;
        }
        if let Some(store) = &self.store {
            store.save_promotions(&history, &latest).inspect_err(|e| {
                self.storage_failed(
                    format_args!("cannot record promotion #{} (v{})", latest.sequence, latest.version),
                    e,
                )
            })?;
        }
        let mut s = self.lock();
        s.registry.promotions = history;
        s.registry.latest = Some(latest);
        Ok(())
    }

    /// Makes registered `version` what devices should run.
    pub fn promote(&self, version: u64) -> Result<(), RegistryError> {
        let order = self.ordered();
        self.promote_ordered(&order, version)
    }

    /// Goes back to the version promoted before the current one; returns it. Devices follow it
    /// because it is a new promotion (the next number, signed), not an old one replayed.
    pub fn rollback(&self) -> Result<u64, RegistryError> {
        let order = self.ordered();
        let mut history = self.lock().registry.promotions.clone();
        if history.len() < 2 {
            return Err(RegistryError::NoPrevious(history.len()));
        }
        history.pop();
        let back = *history.last().expect("two or more before the pop");
        self.record_promotion(&order, history)?;
        Ok(back)
    }

    /// Records a measured inference latency for registered `version` (not signed, like
    /// accuracy).
    pub fn set_latency(&self, version: u64, latency_us: f64) -> Result<(), RegistryError> {
        let _order = self.ordered();
        let record = {
            let mut s = self.lock();
            let Some(record) = s.registry.records.get_mut(&version) else {
                return Err(RegistryError::Unknown(version));
            };
            record.latency_us = Some(latency_us);
            record.clone()
        };
        if let Some(store) = &self.store {
            store
                .save_registered(&record)
                .inspect_err(|e| self.storage_failed(format_args!("cannot record the latency of v{version}"), e))?;
        }
        Ok(())
    }

    /// The latest promotion (numbered and signed), if any.
    pub fn promotion(&self) -> Option<Promotion> {
        self.lock().registry.latest.clone()
    }

    /// The promoted version, if any.
    pub fn promoted(&self) -> Option<u64> {
        self.lock().registry.promotions.last().copied()
    }
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
