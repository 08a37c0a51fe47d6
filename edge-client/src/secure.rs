//! The device's side of secure aggregation (`TrainTask.secure`): instead of uploading its
//! update, the device enters it into the round's SecAgg+ sum.
//!
//! It weighs and clips the delta as FedAvg under SecAgg needs ([`fedge_secagg::weighting`]),
//! says `SecureReady`, then polls the coordinator (`SecurePoll`) and answers each stage
//! (`SecureSend`) with a [`ClientSession`] seeded from the OS's randomness, until the session is
//! over for it. The update itself never leaves the device unmasked. An honest device answers
//! one unmasking request per session and refuses one asking for both of a neighbour's secrets
//! (`fedge_secagg::Client`).

use std::time::Duration;

use fedge_core::wire::{ErrorCode, Message, SecureTask, TrainResult, TrainTask};
use fedge_secagg::ClientSession;

use crate::link::{ConnectError, Link};

/// How often a device asks where the session is while it waits.
const POLL_EVERY: Duration = Duration::from_millis(40);

/// A device gives up a session that has not moved on for this long (a coordinator's stage
/// closes long before: `secagg_stage_secs` is at most an hour).
const GIVE_UP_AFTER: Duration = Duration::from_secs(2 * 3600);

/// How a device's part in a secure sum ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureOutcome {
    /// Its update is in the round's sum.
    Summed,
    /// The session ended without it (it dropped, was excluded, or the round failed).
    NotSummed,
    /// The coordinator refused it (why).
    Refused(String),
}

/// Enters `result` (of `task`, whose `secure` is `secure`) into the round's secure sum over
/// `link`. A broken link is an error (the caller reconnects; the session goes on without it).
pub async fn enter_sum(
    link: &Link,
    task: &TrainTask,
    secure: SecureTask,
    result: &TrainResult,
) -> Result<SecureOutcome, ConnectError> {
    let round = task.round;
    let Some(clip) = task.config.clip_norm else {
        return Ok(SecureOutcome::Refused("a secure round without clip_norm".into()));
    };
    let input = match secure.noise_std {
        None => {
            fedge_secagg::weighting::weighted_input(result.delta.data(), result.num_samples, secure.weight_cap, clip)
        }
        Some(sigma) => noised_input(result.delta.data(), clip, sigma)?,
    };
    match link.request(&Message::SecureReady { round, model_version: task.model_version, members: None }).await? {
        Message::Ack { .. } => {}
        Message::Error { code, message } => return Ok(SecureOutcome::Refused(format!("{code:?}: {message}"))),
        _ => return Err(ConnectError::Unexpected),
    }
    let mut session = ClientSession::new(input, rand::random());
    let mut moved = tokio::time::Instant::now();
    loop {
        if moved.elapsed() > GIVE_UP_AFTER {
            return Ok(SecureOutcome::Refused("the secure session stopped moving".into()));
        }
        let step = match link.request(&Message::SecurePoll { round, member: None }).await? {
            Message::SecureStep { round: r, step } if r == round => step,
            Message::Error { code: ErrorCode::StaleModel, .. } => return Ok(SecureOutcome::NotSummed),
            Message::Error { code, message } => return Ok(SecureOutcome::Refused(format!("{code:?}: {message}"))),
            _ => return Err(ConnectError::Unexpected),
        };
        let waiting = step == fedge_secagg::ServerMessage::Wait;
        if !waiting {
            moved = tokio::time::Instant::now();
        }
        match session.on(step) {
            Ok(Some(msg)) => match link.request(&Message::SecureSend { round, member: None, msg }).await? {
                Message::Ack { .. } => {}
                Message::Error { code, message } => {
                    tracing::warn!(
                        "round {round}: the coordinator refused this device's secure message ({code:?}): {message}"
                    );
                }
                _ => return Err(ConnectError::Unexpected),
            },
            Ok(None) => {}
            // An honest device stops rather than answer what it must not.
            Err(e) => return Ok(SecureOutcome::Refused(format!("this device refused the session: {e}"))),
        }
        match session.finished() {
            Some(true) => return Ok(SecureOutcome::Summed),
            Some(false) => return Ok(SecureOutcome::NotSummed),
            None if waiting => tokio::time::sleep(POLL_EVERY).await,
            None => {}
        }
    }
}

/// Distributed DP: the delta clipped to `clip`, weighing 1, plus this device's share of the
/// noise, N(0, sigma^2) a coordinate from the OS's randomness, kept within the session's
/// per-coordinate bound `clip + 8 sigma` (past it with probability about 1e-15).
fn noised_input(delta: &[f32], clip: f32, sigma: f64) -> Result<Vec<f32>, ConnectError> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(ConnectError::Refused {
            code: ErrorCode::Malformed,
            message: format!("a noise standard deviation of {sigma}"),
        });
    }
    let mut v = fedge_secagg::weighting::weighted_input(delta, 1, 1, clip);
    let weight = v.pop().expect("weighted_input ends with the weight");
    let mut rng = <fedge_core::rng::SeededRng as rand::SeedableRng>::from_rng(&mut rand::rng());
    fedge_core::privacy::noise::add_gaussian_noise(&mut v, sigma, &mut rng);
    let bound = clip + (8.0 * sigma) as f32;
    v.iter_mut().for_each(|x| *x = x.clamp(-bound, bound));
    v.push(weight);
    Ok(v)
}
