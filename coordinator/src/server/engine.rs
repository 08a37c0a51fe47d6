//! The coordinator's engine: synchronous rounds ([`RoundEngine`], the default) or buffered
//! asynchronous aggregation ([`BufferedEngine`], FedBuff: `[fedbuff]` in `coordinator.toml`).
//! Both are the sans-IO engines the simulator drives; this enum gives the round driver and the
//! sessions the calls they share, and the synchronous-only ones (operator settings, privacy
//! budget checks for rounds, students' version numbers, FLTrust's reference) through
//! [`Engine::rounds`] / [`Engine::rounds_mut`].
//!
//! In FedBuff mode the driver's "round" is the open buffer: aggregation `A` (the count of
//! closed buffers plus one) is stored like a round (its results under `(A, device)`, one per
//! device, its close like a round's close), so the store and the crash-safety argument are
//! the synchronous ones. Tasks are not stored: after a restart devices get new ones.

use std::collections::BTreeMap;
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::privacy::PrivacyLedger;
use fedge_core::wire::{DeviceId, ErrorCode, OpenRoundLine, PrivacyBudget, TrainResult};
use fedge_engine::buffered::BufferedEngine;
use fedge_engine::strategy::Strategy;
use fedge_engine::{Evaluation, RoundEngine};

/// Synchronous rounds or FedBuff.
pub(super) enum Engine {
    /// Synchronous rounds (boxed, as is the other: each is large).
    Rounds(Box<RoundEngine<Box<dyn Strategy>>>),
    /// Buffered asynchronous aggregation.
    Buffered(Box<BufferedEngine>),
}

/// A refused result: the wire code and the reason.
pub(super) type Refusal = (ErrorCode, String);

impl Engine {
    /// The synchronous engine, if that is the mode.
    pub(super) fn rounds(&self) -> Option<&RoundEngine<Box<dyn Strategy>>> {
        match self {
            Engine::Rounds(e) => Some(e),
            Engine::Buffered(_) => None,
        }
    }

    /// The synchronous engine, mutably, if that is the mode.
    pub(super) fn rounds_mut(&mut self) -> Option<&mut RoundEngine<Box<dyn Strategy>>> {
        match self {
            Engine::Rounds(e) => Some(e),
            Engine::Buffered(_) => None,
        }
    }

    /// The current global model's version.
    pub(super) fn version(&self) -> u64 {
        match self {
            Engine::Rounds(e) => e.version(),
            Engine::Buffered(e) => e.version(),
        }
    }

    /// The current global model.
    pub(super) fn global(&self) -> &ModelParams {
        match self {
            Engine::Rounds(e) => e.global(),
            Engine::Buffered(e) => e.global(),
        }
    }

    /// Evaluations reported so far, by model version.
    pub(super) fn evaluations(&self) -> &BTreeMap<u64, Evaluation> {
        match self {
            Engine::Rounds(e) => e.evaluations(),
            Engine::Buffered(e) => e.evaluations(),
        }
    }

    /// Records the evaluation of model `version`.
    pub(super) fn handle_evaluation(&mut self, version: u64, evaluation: Evaluation) {
        match self {
            Engine::Rounds(e) => e.handle_evaluation(version, evaluation),
            Engine::Buffered(e) => e.handle_evaluation(version, evaluation),
        }
    }

    /// The privacy ledger under central DP.
    pub(super) fn privacy_ledger(&self) -> Option<&PrivacyLedger> {
        match self {
            Engine::Rounds(e) => e.privacy_ledger(),
            Engine::Buffered(e) => e.ledger(),
        }
    }

    /// Hands out a version number for a distilled student (one sequence with global models).
    pub(super) fn allocate_version(&mut self) -> u64 {
        match self {
            Engine::Rounds(e) => e.allocate_version(),
            Engine::Buffered(e) => e.allocate_version(),
        }
    }

    /// The privacy budget operators see, under central DP.
    pub(super) fn privacy_budget(&self) -> Option<PrivacyBudget> {
        let (p, clip) = match self {
            Engine::Rounds(e) => {
                let p = e.config().privacy.as_ref()?;
                (p, e.clip_norm().unwrap_or(p.clip_norm))
            }
            Engine::Buffered(e) => {
                let p = e.config().privacy.as_ref()?;
                (p, p.clip_norm)
            }
        };
        let ledger = self.privacy_ledger()?;
        Some(PrivacyBudget {
            noise_multiplier: p.noise_multiplier,
            clip_norm: clip,
            delta: ledger.delta(),
            epsilon: ledger.epsilon(),
            target_epsilon: p.target_epsilon,
        })
    }

    /// The open round's progress (FedBuff: the open buffer's: devices training, results in
    /// it, results it needs; no deadline).
    pub(super) fn open_round_line(&self, now: Duration) -> Option<OpenRoundLine> {
        match self {
            Engine::Rounds(e) => e.open_round().map(|o| OpenRoundLine {
                round: o.round,
                selected: o.chosen.len() as u64,
                wanted: o.target as u64,
                reporting: o.results as u64,
                deadline_in_ms: u64::try_from(o.deadline.saturating_sub(now).as_millis()).unwrap_or(u64::MAX),
            }),
            Engine::Buffered(e) => Some(OpenRoundLine {
                round: e.aggregations() + 1,
                selected: e.in_flight() as u64,
                wanted: e.config().buffer_size as u64,
                reporting: e.buffered() as u64,
                deadline_in_ms: 0,
            }),
        }
    }

    /// A device connected.
    pub(super) fn handle_device_available(&mut self, device: DeviceId) {
        match self {
            Engine::Rounds(e) => e.handle_device_available(device),
            Engine::Buffered(e) => e.handle_device_available(device),
        }
    }

    /// A participant whose task stands until the deadline went away (a regional aggregator;
    /// FedBuff, which takes none, frees the task).
    pub(super) fn handle_device_away(&mut self, now: Duration, device: DeviceId) {
        match self {
            Engine::Rounds(e) => e.handle_device_away(device),
            Engine::Buffered(e) => e.handle_device_gone(now, device),
        }
    }

    /// Makes participant `device` a regional aggregator whose results may claim up to
    /// `max_samples` (synchronous rounds only: FedBuff takes no aggregators).
    pub(super) fn set_sample_cap(&mut self, device: DeviceId, max_samples: Option<u64>) {
        if let Engine::Rounds(e) = self {
            e.set_sample_cap(device, max_samples);
        }
    }

    /// Why a regional aggregator cannot take part here, if it cannot.
    pub(super) fn aggregator_refusal(&self) -> Option<String> {
        match self {
            Engine::Buffered(_) => Some(
                "this coordinator runs FedBuff: regional aggregators take part in synchronous rounds only".into(),
            ),
            Engine::Rounds(e) if e.config().privacy.is_some() => Some(
                "this coordinator runs central DP, whose noise is calibrated to one device's clipped update; a regional aggregator's mean speaks for many devices (use local DP on the devices, or no regions)".into(),
            ),
            Engine::Rounds(_) => None,
        }
    }

    /// A device went away.
    pub(super) fn handle_device_gone(&mut self, now: Duration, device: DeviceId) {
        match self {
            Engine::Rounds(e) => e.handle_device_gone(now, device),
            Engine::Buffered(e) => e.handle_device_gone(now, device),
        }
    }

    /// What [`Self::handle_train_result`] would refuse, checked without changing anything.
    pub(super) fn check_train_result(&self, device: DeviceId, result: &TrainResult) -> Result<(), Refusal> {
        match self {
            Engine::Rounds(e) => e.check_train_result(device, result).map_err(|r| (r.code(), r.to_string())),
            Engine::Buffered(e) => {
                e.check_train_result(device, result).map(|_| ()).map_err(|r| (r.code(), r.to_string()))
            }
        }
    }

    /// A device's result, accepted or refused.
    pub(super) fn handle_train_result(
        &mut self,
        now: Duration,
        device: DeviceId,
        result: &TrainResult,
    ) -> Result<(), Refusal> {
        match self {
            Engine::Rounds(e) => e.handle_train_result(now, device, result).map_err(|r| (r.code(), r.to_string())),
            Engine::Buffered(e) => e.handle_train_result(now, device, result).map_err(|r| (r.code(), r.to_string())),
        }
    }

    /// A result was refused: whether the device's task still stands. In a round it does (the
    /// device may answer again); FedBuff ends a task whose result is too stale or invalid (it
    /// is handed the refused result to do so), and the driver must stop handing it out.
    pub(super) fn refused(&mut self, now: Duration, device: DeviceId, result: &TrainResult) -> bool {
        match self {
            Engine::Rounds(_) => true,
            Engine::Buffered(e) => {
                let _ = e.handle_train_result(now, device, result);
                e.holds_task(device)
            }
        }
    }

    /// The round (synchronous) or aggregation (FedBuff) an accepted result is stored under:
    /// the open round is the result's own; the open buffer is the one after those closed.
    pub(super) fn storage_round(&self, result: &TrainResult) -> u64 {
        match self {
            Engine::Rounds(_) => result.round,
            Engine::Buffered(e) => e.aggregations() + 1,
        }
    }

    /// The open round (synchronous) or buffer (FedBuff).
    pub(super) fn current_round(&self) -> Option<u64> {
        match self {
            Engine::Rounds(e) => e.current_round(),
            Engine::Buffered(e) => Some(e.aggregations() + 1),
        }
    }
}
