//! A secure round in a shard: its devices whose results the replay's sum holds enter the root's
//! secure sum one by one, as members of the shard's relay session (see [`crate::shard`]).

use std::time::Duration;

use fedge_core::wire::{DeviceId, ErrorCode, Message, SecureTask, TrainResult, TrainTask};
use fedge_edge::link::Link;
use fedge_secagg::{ClientSession, ServerMessage};

use super::worker::Step;

/// How often a shard asks where the session is while all its members wait.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A round's members: each device's SecAgg client, made once (kept across reconnections:
/// the root knows a member by the shard's certificate and its id, not by the connection).
pub(crate) struct Members {
    /// The round.
    pub round: u64,
    /// The model version they trained from.
    model_version: u64,
    /// Each member's id and client.
    sessions: Vec<(DeviceId, ClientSession)>,
    /// Whether they have entered and the session is over for every one.
    done: bool,
}

/// How a round's members fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entered {
    /// Members in the root's sum.
    pub summed: usize,
    /// Members the session ended without.
    pub not_summed: usize,
}

impl Members {
    /// The members of `task`'s round: `results`, each weighed and clipped as a device does it
    /// ([`fedge_secagg::weighting::weighted_input`]) with the task's public weight cap.
    pub(crate) fn new(
        task: &TrainTask,
        secure: SecureTask,
        results: Vec<(DeviceId, TrainResult)>,
    ) -> Result<Self, String> {
        let clip = task.config.clip_norm.ok_or("a secure round without clip_norm")?;
        if secure.noise_std.is_some() {
            return Err("the root asks for distributed DP noise, which a sharded run does not add".into());
        }
        let sessions = results
            .into_iter()
            .map(|(device, r)| {
                let input =
                    fedge_secagg::weighting::weighted_input(r.delta.data(), r.num_samples, secure.weight_cap, clip);
                (device, ClientSession::new(input, rand::random()))
            })
            .collect();
        Ok(Self { round: task.round, model_version: task.model_version, sessions, done: false })
    }

    /// Whether the session is over for every member.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// How many there are.
    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Enters the members into the root's sum over `link`: says ready (again after a
    /// reconnection: answered `Duplicate` then), then polls and answers for each member until
    /// every one is finished. A refused member is logged and counted as not summed.
    pub(crate) fn enter(
        &mut self,
        rt: &tokio::runtime::Runtime,
        link: &Link,
        log: &mut dyn FnMut(String),
    ) -> Result<Entered, Step> {
        let round = self.round;
        let request = |msg: &Message| rt.block_on(link.request(msg)).map_err(|e| Step::Link(e.to_string()));
        let ids: Vec<u64> = self.sessions.iter().map(|(d, _)| *d).collect();
        let ready = Message::SecureReady { round, model_version: self.model_version, members: Some(ids) };
        match request(&ready)? {
            Message::Ack { .. } | Message::Error { code: ErrorCode::Duplicate, .. } => {}
            Message::Error { code, message } => {
                log(format!("round {round}: the root did not take this shard's members ({code:?}): {message}"));
                self.done = true;
                return Ok(Entered { summed: 0, not_summed: self.len() });
            }
            other => return Err(Step::Link(format!("unexpected answer to SecureReady: {other:?}"))),
        }
        let mut refused = vec![false; self.sessions.len()];
        loop {
            let mut moved = false;
            for (i, (member, session)) in self.sessions.iter_mut().enumerate() {
                if refused[i] || session.finished().is_some() {
                    continue;
                }
                let step = match request(&Message::SecurePoll { round, member: Some(*member) })? {
                    Message::SecureStep { round: r, step } if r == round => step,
                    Message::Error { code: ErrorCode::StaleModel, .. } => ServerMessage::Finished { summed: false },
                    Message::Error { code, message } => {
                        log(format!("round {round}: member {member} refused ({code:?}): {message}"));
                        refused[i] = true;
                        continue;
                    }
                    other => return Err(Step::Link(format!("unexpected answer to SecurePoll: {other:?}"))),
                };
                moved |= step != ServerMessage::Wait;
                match session.on(step) {
                    Ok(Some(msg)) => match request(&Message::SecureSend { round, member: Some(*member), msg })? {
                        Message::Ack { .. } => {}
                        Message::Error { code, message } => {
                            log(format!(
                                "round {round}: the root refused member {member}'s message ({code:?}): {message}"
                            ));
                        }
                        other => return Err(Step::Link(format!("unexpected answer to SecureSend: {other:?}"))),
                    },
                    Ok(None) => {}
                    Err(e) => {
                        log(format!("round {round}: member {member} stops: {e}"));
                        refused[i] = true;
                    }
                }
            }
            let done = self.sessions.iter().zip(&refused).all(|((_, s), r)| *r || s.finished().is_some());
            if done {
                self.done = true;
                let summed = self.sessions.iter().filter(|(_, s)| s.finished() == Some(true)).count();
                return Ok(Entered { summed, not_summed: self.len() - summed });
            }
            if !moved {
                std::thread::sleep(POLL_EVERY);
            }
        }
    }
}
