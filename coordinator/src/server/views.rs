//! What operators see: the coordinator's status (model, rounds, privacy budget) and the
//! model versions with their lineage, metrics and deployment. Stored lists and blob sizes
//! are read from disk with the state lock released.

use std::collections::{BTreeMap, BTreeSet};

use fedge_core::params::ContentHash;
use fedge_core::registry::ModelRole;
use fedge_core::wire::{DeviceId, ModelLine, RoundLine, Status};

use super::Coordinator;

impl Coordinator {
    /// The state operators see.
    pub fn status(&self) -> Status {
        // A region's link and tier have their own locks: read before the state lock.
        let connected = self.upstream_link.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let regional_model = self.regional_model();
        let (status, params) = {
            let s = self.lock();
            let engine = &s.rounds.engine;
            let names: BTreeMap<DeviceId, &String> = s.fleet.ids.iter().map(|(k, v)| (*v, k)).collect();
            let evals = engine.evaluations();
            let privacy = engine.privacy_budget();
            let version = s.rounds.version();
            let open_round = engine.open_round_line(self.now());
            let upstream = self.is_region().then(|| {
                let job = s.upstream.as_ref();
                Box::new(fedge_core::wire::UpstreamLine {
                    connected,
                    root_round: job.map(|j| j.task.root_round),
                    root_version: job.map(|j| j.task.root_version),
                    adopted_as: job.map(|j| j.task.base),
                    uploaded: job.is_some_and(|j| j.uploaded),
                    regional_model,
                })
            });
            let secure = s
                .rounds
                .secure_round
                .as_ref()
                .filter(|r| engine.current_round() == Some(r.round()))
                .map(|r| Box::new(r.line(self.now())));
            let status = Status {
                open_round,
                privacy,
                upstream,
                secure,
                model_version: version,
                model_hash: ContentHash([0; 32]),
                current_round: engine.current_round(),
                rounds_left: s.rounds.rounds_left,
                devices_connected: s
                    .fleet
                    .connected
                    .iter()
                    .filter_map(|d| names.get(d).map(|n| n.to_string()))
                    .collect(),
                devices_known: s.fleet.ids.len() as u64,
                rounds: s
                    .rounds
                    .history
                    .iter()
                    .map(|r| RoundLine {
                        accuracy: r
                            .failed_reason
                            .is_none()
                            .then(|| evals.get(&r.model_version).map(|e| e.accuracy))
                            .flatten(),
                        ..r.clone()
                    })
                    .collect(),
            };
            (status, s.downloads.model(version).expect("the published version is kept"))
        };
        // Hashing a model is no work for the lock.
        Status { model_hash: params.content_hash(), ..status }
    }

    /// The model versions kept (all stored ones with a store, else the last few in memory).
    pub fn models(&self) -> Vec<ModelLine> {
        let stored = self.store.as_ref().map(|st| st.models());
        let (mut lines, unregistered) = {
            let s = self.lock();
            let evals = s.rounds.engine.evaluations();
            let kept: Vec<(u64, ContentHash)> = match stored {
                Some(Ok(stored)) => stored,
                _ => s.downloads.models().iter().map(|(v, p)| (*v, p.content_hash())).collect(),
            };
            let epsilon: BTreeMap<u64, f64> =
                s.rounds.history.iter().filter_map(|r| r.privacy.map(|p| (r.model_version, p.epsilon))).collect();
            let round_of: BTreeMap<u64, u64> = s.rounds.history.iter().map(|r| (r.model_version, r.round)).collect();
            let running: BTreeMap<u64, u64> =
                s.fleet.versions_running().into_iter().filter_map(|(v, n)| v.map(|v| (v, n))).collect();
            let registry = &s.registry.records;
            let promoted = s.registry.promotions.last().copied();
            let previous: Vec<Option<u64>> =
                std::iter::once(None).chain(kept.iter().map(|(v, _)| Some(*v))).take(kept.len()).collect();
            let mut lines: Vec<ModelLine> = kept
                .into_iter()
                .zip(previous)
                .map(|((version, hash), parent)| match registry.get(&version).filter(|r| r.role == ModelRole::Global) {
                    Some(r) => ModelLine {
                        version,
                        hash,
                        accuracy: evals.get(&version).map(|e| e.accuracy),
                        latency_us: r.latency_us,
                        epsilon: r.epsilon.or_else(|| epsilon.get(&version).copied()),
                        role: r.role,
                        architecture: r.architecture.clone(),
                        parent: r.parent.or(parent),
                        round: r.round,
                        parameters: r.parameters,
                        size_bytes: r.size_bytes,
                        created_at: r.created_at,
                        signed: !r.signature.is_empty(),
                        promoted: promoted == Some(version),
                        devices_running: running.get(&version).copied().unwrap_or(0),
                    },
                    None => ModelLine {
                        version,
                        hash,
                        accuracy: evals.get(&version).map(|e| e.accuracy),
                        latency_us: None,
                        epsilon: epsilon.get(&version).copied(),
                        role: ModelRole::Global,
                        architecture: s.registry.architecture.clone(),
                        parent,
                        round: round_of.get(&version).copied().unwrap_or(0),
                        parameters: s.rounds.engine.global().numel() as u64,
                        // Filled in below, from the store's blob, with the lock released.
                        size_bytes: 0,
                        created_at: 0,
                        signed: false,
                        promoted: false,
                        devices_running: 0,
                    },
                })
                .collect();
            lines.extend(registry.values().filter(|r| r.role != ModelRole::Global).map(|r| ModelLine {
                version: r.version,
                hash: r.sha256,
                accuracy: r.accuracy,
                latency_us: r.latency_us,
                epsilon: r.epsilon,
                role: r.role,
                architecture: r.architecture.clone(),
                parent: r.parent,
                round: r.round,
                parameters: r.parameters,
                size_bytes: r.size_bytes,
                created_at: r.created_at,
                signed: !r.signature.is_empty(),
                promoted: promoted == Some(r.version),
                devices_running: running.get(&r.version).copied().unwrap_or(0),
            }));
            // Global versions without a global record (a region numbers its own versions apart
            // from the root's records it relays: a number may name one of each).
            let unregistered: BTreeSet<u64> = lines
                .iter()
                .filter(|l| l.role == ModelRole::Global)
                .map(|l| l.version)
                .filter(|v| registry.get(v).is_none_or(|r| r.role != ModelRole::Global))
                .collect();
            (lines, unregistered)
        };
        if let Some(store) = &self.store {
            for line in lines.iter_mut().filter(|l| l.role == ModelRole::Global && unregistered.contains(&l.version)) {
                line.size_bytes = store.model_blob_size(&line.hash).unwrap_or(0);
            }
        }
        lines.sort_by_key(|l| l.version);
        lines
    }
}
