//! What goes into and comes out of the engine besides the `handle_*` arguments: the events a
//! driver carries out, the report of a closed round, evaluations, and the open round as a
//! driver stores it and reads it back.

use std::time::Duration;

use fedge_core::params::ContentHash;
use fedge_core::privacy::LedgerEntry;
use fedge_core::wire::{DeviceId, TrainTask};

/// How a round ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundOutcome {
    /// Aggregated into a new model version.
    Aggregated,
    /// Not aggregated; the model is unchanged.
    Failed(String),
}

/// Summary of a closed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    /// Round number.
    pub round: u64,
    /// Model version after the round (unchanged if it failed).
    pub model_version: u64,
    /// Hash of that model.
    pub model_hash: ContentHash,
    /// Devices selected.
    pub selected: usize,
    /// Results accepted.
    pub results: usize,
    /// Devices that reported a failure.
    pub failures: usize,
    /// Selected devices that had not answered at the deadline.
    pub stragglers: Vec<DeviceId>,
    /// Over-committed devices still training when enough results were in: not needed, not
    /// failures.
    pub surplus: usize,
    /// Examples trained on, over accepted results.
    pub samples: u64,
    /// Sample-weighted mean of the devices' training losses.
    pub train_loss: f64,
    /// When the round closed.
    pub closed_at: Duration,
    /// Aggregated or failed.
    pub outcome: RoundOutcome,
    /// Privacy spent (central DP, aggregated rounds only).
    pub privacy: Option<LedgerEntry>,
}

/// What the engine wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Send `task` to `device`.
    Assign {
        /// The device.
        device: DeviceId,
        /// The task.
        task: TrainTask,
    },
    /// The round closed; a new model version exists if it aggregated. Evaluate it and report
    /// back with [`crate::RoundEngine::handle_evaluation`].
    RoundClosed(RoundReport),
}

/// A round read back from durable state, to resume.
#[derive(Debug, Clone, Copy)]
pub struct StoredRound<'a> {
    /// Round number.
    pub round: u64,
    /// Model version its devices train from.
    pub model_version: u64,
    /// Devices selected.
    pub chosen: &'a [DeviceId],
    /// Results it needs to close early.
    pub target: usize,
    /// Devices available when it was sampled.
    pub population: usize,
}

/// The open round, as a driver makes it durable.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenRoundInfo {
    /// Round number.
    pub round: u64,
    /// Model version the devices train from.
    pub model_version: u64,
    /// Devices selected.
    pub chosen: Vec<DeviceId>,
    /// Results the round waits for before closing early (the rest are over-commitment).
    pub target: usize,
    /// Results accepted so far.
    pub results: usize,
    /// Deadline on the engine's clock.
    pub deadline: Duration,
    /// Devices available when it was sampled (the population of the sampling rate).
    pub population: usize,
}

/// Evaluation of a model version on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Fraction correct.
    pub accuracy: f64,
    /// Mean loss.
    pub loss: f64,
}
