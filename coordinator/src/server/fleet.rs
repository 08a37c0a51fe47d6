//! The fleet: every device ever seen (certificate id to numeric id, stable across restarts
//! with a store), who is connected, what each said it can do and which deployed version it
//! runs.

use std::collections::{BTreeMap, BTreeSet};

use fedge_core::wire::{Capabilities, DeviceId, DeviceLine};

use super::Coordinator;

/// The fleet's part of the coordinator's state.
pub(super) struct Fleet {
    /// Every device ever seen, by certificate id.
    pub(super) ids: BTreeMap<String, DeviceId>,
    /// Devices with a training session open.
    pub(super) connected: BTreeSet<DeviceId>,
    /// What each device said in its `Hello`.
    pub(super) capabilities: BTreeMap<DeviceId, Capabilities>,
    /// The deployed version each device last said it runs.
    pub(super) running: BTreeMap<DeviceId, Option<u64>>,
    /// Each connected device's newest training session: its number and connection. Only that
    /// session's end disconnects the device; an older one, superseded when the device came
    /// back (a quick restart), is closed and its end changes nothing.
    pub(super) sessions: BTreeMap<DeviceId, (u64, crate::listener::Closer)>,
    /// The number the next training session gets.
    pub(super) next_session: u64,
    /// When each device last connected or asked for work, seconds since the Unix epoch.
    pub(super) last_seen: BTreeMap<DeviceId, u64>,
    /// Participants that are regional aggregators (certificate role `aggregator`, fleet name
    /// `aggregator:NAME`).
    pub(super) aggregators: BTreeSet<DeviceId>,
}

impl Fleet {
    /// A fleet of the devices `ids` (none connected).
    pub(super) fn new(ids: BTreeMap<String, DeviceId>) -> Self {
        Self {
            ids,
            connected: BTreeSet::new(),
            capabilities: BTreeMap::new(),
            running: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 0,
            last_seen: BTreeMap::new(),
            aggregators: BTreeSet::new(),
        }
    }

    /// Device `id` was heard from now.
    pub(super) fn seen(&mut self, id: DeviceId) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_seen.insert(id, now);
    }

    /// How many connected devices run each deployed version.
    pub(super) fn versions_running(&self) -> BTreeMap<Option<u64>, u64> {
        let mut out = BTreeMap::new();
        for id in &self.connected {
            *out.entry(self.running.get(id).copied().flatten()).or_insert(0) += 1;
        }
        out
    }
}

impl Coordinator {
    /// How many connected devices run each deployed version (`None`: none yet).
    pub fn fleet_versions(&self) -> BTreeMap<Option<u64>, u64> {
        self.lock().fleet.versions_running()
    }

    /// Every device ever seen, by certificate id.
    pub fn devices(&self) -> Vec<DeviceLine> {
        let s = self.lock();
        let f = &s.fleet;
        f.ids
            .iter()
            .map(|(name, id)| DeviceLine {
                id: name.clone(),
                connected: f.connected.contains(id),
                capabilities: f.capabilities.get(id).cloned(),
                running: f.running.get(id).copied().flatten(),
                last_seen: f.last_seen.get(id).copied(),
            })
            .collect()
    }
}
