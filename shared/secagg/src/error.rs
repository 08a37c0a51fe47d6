//! The crate's errors: one enum, one line each, so a caller can log any of them as it is.

use thiserror::Error;

/// Everything that can go wrong in a round. Peers' inputs never panic: they come back as one of
/// these.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SecAggError {
    /// `SecAggConfig::validate` refused the configuration.
    #[error("invalid secure-aggregation config: {0}")]
    Config(String),
    /// A Shamir operation refused its input.
    #[error("shamir: {0}")]
    Shamir(String),
    /// A message arrived in a stage that does not take it.
    #[error("message for stage {got} arrived in stage {expected}")]
    WrongStage {
        /// The stage the state machine is in.
        expected: &'static str,
        /// The stage the message belongs to.
        got: &'static str,
    },
    /// A message names a device outside the round, or one not allowed here.
    #[error("device {0} is not a participant here")]
    UnknownDevice(u32),
    /// A device sent a second message for the same stage.
    #[error("device {0} already sent this stage's message")]
    Duplicate(u32),
    /// A device's message is malformed: it is excluded (treated as dropped at this stage).
    #[error("device {device} sent a malformed message ({reason}); excluded")]
    Malformed {
        /// The offending device.
        device: u32,
        /// What was wrong.
        reason: String,
    },
    /// Fewer than `threshold` neighbours can or did reveal shares of a device whose secret is needed.
    #[error("device {device}: {got} shares, the threshold is {need}; the round cannot be unmasked")]
    NotEnoughShares {
        /// The device whose secret could not be reconstructed.
        device: u32,
        /// Shares available.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// Too few neighbours of this device take part for its secrets to be recoverable.
    #[error("device {device}: {got} neighbours take part, the threshold is {need}")]
    NotEnoughNeighbours {
        /// The device.
        device: u32,
        /// Neighbours present.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// The server asked for both the self-mask share and the key share of one device: refused.
    #[error("refused: both the self-mask share and the mask-key share of device {0} were requested")]
    BothSharesRequested(u32),
    /// The client already answered an unmasking request; it answers only once per round.
    #[error("refused: this device already answered an unmasking request this round")]
    AlreadyUnmasked,
    /// A reconstructed mask key does not match the public key its device advertised.
    #[error("device {0}: the reconstructed mask key does not match its advertised public key")]
    WrongKey(u32),
    /// No device survived to the masked-input stage: there is nothing to sum.
    #[error("no device survived to be summed")]
    NoSurvivors,
    /// An input vector has the wrong length or a non-finite value.
    #[error("input: {0}")]
    Input(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, SecAggError>;
