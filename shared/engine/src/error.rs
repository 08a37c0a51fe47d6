//! Why the engine refuses: a reconfiguration, a round start, a result, a resumed round.

use fedge_core::aggregate::AggregateError;
use fedge_core::wire::{DeviceId, ErrorCode};
use thiserror::Error;

use crate::config::ConfigError;

/// Why the configuration cannot change now.
#[derive(Debug, Error, PartialEq)]
pub enum ReconfigureError {
    /// A round is open.
    #[error("round {0} is in progress; change settings between rounds")]
    Busy(u64),
    /// The new settings are invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Why a model made elsewhere cannot become the global model ([`crate::RoundEngine::adopt`]).
#[derive(Debug, Error, PartialEq)]
pub enum AdoptError {
    /// A round is open.
    #[error("round {0} is in progress; a model can be adopted only between rounds")]
    Busy(u64),
    /// The model has another layout than the global one.
    #[error("the model's layout (names and shapes) is not the global model's")]
    Layout,
    /// The model holds NaN or infinite values.
    #[error("the model holds NaN or infinite values")]
    NotFinite,
    /// The strategy carries state tied to the model it would replace.
    #[error("strategy {0} carries state between rounds; it cannot follow a model made elsewhere (use fedavg)")]
    Stateful(&'static str),
}

/// Why a round cannot start.
#[derive(Debug, Error, PartialEq)]
pub enum StartError {
    /// A round is in progress.
    #[error("round {0} is still in progress")]
    Busy(u64),
    /// Too few devices to reach the quorum.
    #[error("{available} devices available, {needed} needed")]
    NotEnoughDevices {
        /// Devices available.
        available: usize,
        /// Devices the quorum needs.
        needed: usize,
    },
    /// The strategy would hold more of the round's updates in memory than allowed.
    #[error(
        "{strategy} holds every update of a round: {updates} sampled devices need {mb} MiB, more than max_buffer_mb = {max_mb}; sample fewer devices or raise max_buffer_mb"
    )]
    Buffer {
        /// The strategy.
        strategy: &'static str,
        /// Devices sampled.
        updates: usize,
        /// MiB their updates would take.
        mb: u64,
        /// The bound.
        max_mb: u64,
    },
    /// Asked for more rounds than the privacy budget allows.
    #[error(
        "privacy budget: {rounds} rounds would take epsilon from {spent:.4} to {would:.4}, past the target {target} (delta {delta:e}); {fits} rounds fit"
    )]
    TooManyRounds {
        /// Rounds asked for.
        rounds: u64,
        /// Rounds that fit.
        fits: u64,
        /// Epsilon spent so far.
        spent: f64,
        /// Epsilon after all the rounds asked for.
        would: f64,
        /// The budget.
        target: f64,
        /// The delta.
        delta: f64,
    },
    /// The round would spend more privacy than the budget allows.
    #[error(
        "privacy budget: round {round} would take epsilon from {spent:.4} to {would:.4}, past the target {target} (delta {delta:e})"
    )]
    Budget {
        /// The round refused.
        round: u64,
        /// Epsilon spent so far.
        spent: f64,
        /// Epsilon after the round.
        would: f64,
        /// The budget.
        target: f64,
        /// The delta.
        delta: f64,
    },
}

/// Why a result was refused. The device is told [`RejectReason::code`].
#[derive(Debug, Error, PartialEq)]
pub enum RejectReason {
    /// No round is open, or the result is for another round or model version.
    #[error("stale result: round {got_round} version {got_version}, current round {round} version {version}")]
    Stale {
        /// Round in the result.
        got_round: u64,
        /// Model version in the result.
        got_version: u64,
        /// Current round (0 if none is open).
        round: u64,
        /// Current model version.
        version: u64,
    },
    /// The device was not selected for this round.
    // The refusal goes to the device itself: no internal number in it (the coordinator's logs
    // name the device by its certificate id).
    #[error("this device was not selected for this round")]
    NotSelected(DeviceId),
    /// The device already answered this round; the first answer stands.
    #[error("this device already answered this round; the first answer stands")]
    Duplicate(DeviceId),
    /// Wrong shape or non-finite values.
    #[error("invalid update: {0}")]
    Invalid(AggregateError),
    /// A securely aggregated sum the engine cannot take (empty, or under a strategy that needs
    /// each update: a robust rule, central DP).
    #[error("secure aggregate refused: {0}")]
    Secure(String),
}

impl RejectReason {
    /// The wire error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Stale { .. } => ErrorCode::StaleModel,
            Self::NotSelected(_) => ErrorCode::NotSelected,
            Self::Duplicate(_) => ErrorCode::Duplicate,
            Self::Invalid(_) | Self::Secure(_) => ErrorCode::InvalidUpdate,
        }
    }
}

/// Why a stored round cannot be resumed.
#[derive(Debug, Error, PartialEq)]
pub enum ResumeError {
    /// A round is already open.
    #[error("round {0} is already open")]
    Busy(u64),
    /// The stored round was for another model version.
    #[error("stored round trained from model version {stored}, but the current version is {current}")]
    Version {
        /// Version in the stored round.
        stored: u64,
        /// Current version.
        current: u64,
    },
    /// The stored round does not follow the last closed one.
    #[error("stored round {stored} does not follow the last closed round {last}")]
    Sequence {
        /// The stored open round.
        stored: u64,
        /// The last round closed.
        last: u64,
    },
    /// A stored update does not fit the round.
    #[error("stored update of device {device}: {reason}")]
    Update {
        /// The device.
        device: DeviceId,
        /// Why it was refused.
        reason: RejectReason,
    },
}
