//! A round of SecAgg+ over a network whose devices ask and the server answers (the device
//! protocol: a device polls, the server never calls it): [`ServerSession`] wraps [`Server`]
//! with the round's participants, stage deadlines and the answer each device gets when it asks;
//! [`ClientSession`] wraps [`Client`] with the device's input. Both are sans-IO: time is passed
//! in, messages are returned.
//!
//! The server freezes the participants (the devices that trained: ids `0..m` in the order
//! given) and walks the four stages. A stage closes when every device it waits for has sent its
//! message, or at its deadline (`stage_timeout` after it opened); a device that has not sent by
//! then has dropped at that stage. A device learns where the round is by polling
//! ([`ServerSession::poll`]): the message it must answer, [`ServerMessage::Wait`], or
//! [`ServerMessage::Finished`]. A device's messages are checked to be its own: the `device`
//! field of each must be the id the session gave the authenticated peer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bincode::{Decode, Encode};

use crate::client::Client;
use crate::config::SecAggConfig;
use crate::error::{Result, SecAggError};
use crate::messages::{
    AdvertiseKeys, ForwardedShares, MaskedInput, NeighbourKeys, ShareKeys, UnmaskRequest, UnmaskResponse,
};
use crate::server::{Aggregate, Server};

/// A device's message in a session.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ClientMessage {
    /// Stage 0.
    Advertise(AdvertiseKeys),
    /// Stage 1.
    Shares(ShareKeys),
    /// Stage 2.
    Masked(MaskedInput),
    /// Stage 3.
    Unmask(UnmaskResponse),
}

impl ClientMessage {
    /// The id the message says it is from.
    pub fn device(&self) -> u32 {
        match self {
            Self::Advertise(m) => m.device,
            Self::Shares(m) => m.device,
            Self::Masked(m) => m.device,
            Self::Unmask(m) => m.device,
        }
    }
}

/// What the server answers a device that polls.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum ServerMessage {
    /// Nothing to do yet: poll again.
    Wait,
    /// Take part as `id` in the round of `config` and `seed`: advertise keys.
    Begin {
        /// The round's public parameters.
        config: SecAggConfig,
        /// The round seed (the graph, key derivation).
        seed: [u8; 32],
        /// This device's id in the round.
        id: u32,
    },
    /// Stage 1: the neighbours' keys; share yours.
    Keys(NeighbourKeys),
    /// Stage 2: the shares routed to you; send your masked input.
    Shares(ForwardedShares),
    /// Stage 3: who is summed and who dropped; reveal shares.
    Unmask(UnmaskRequest),
    /// The session is over for this device; `summed` says whether its input is in the sum.
    Finished {
        /// Whether its input is in the sum.
        summed: bool,
    },
}

/// The stage the server is in, with what each device gets when it asks.
#[derive(Debug)]
enum Phase {
    Advertise,
    Share(BTreeMap<u32, NeighbourKeys>),
    Mask(BTreeMap<u32, ForwardedShares>),
    Unmask(UnmaskRequest, BTreeSet<u32>),
    Done(std::result::Result<Aggregate, SecAggError>),
}

/// The server's side of one round over a network.
pub struct ServerSession {
    server: Server,
    config: SecAggConfig,
    seed: [u8; 32],
    /// Id `i` is `peers[i]`.
    peers: Vec<u64>,
    ids: BTreeMap<u64, u32>,
    phase: Phase,
    /// Devices that sent this stage's message.
    sent: BTreeSet<u32>,
    deadline: Duration,
    stage_timeout: Duration,
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerSession({} devices, {:?})", self.peers.len(), self.stage_name())
    }
}

impl ServerSession {
    /// A session of `config` (whose `n_devices` must be `peers.len()`) among `peers` (the
    /// caller's device ids, given ids `0..m` in this order), opened at `now`.
    pub fn new(
        config: &SecAggConfig,
        seed: [u8; 32],
        peers: Vec<u64>,
        now: Duration,
        stage_timeout: Duration,
    ) -> Result<Self> {
        if peers.len() != config.n_devices as usize {
            return Err(SecAggError::Config(format!("{} peers for {} devices", peers.len(), config.n_devices)));
        }
        let ids: BTreeMap<u64, u32> = peers.iter().enumerate().map(|(i, &p)| (p, i as u32)).collect();
        if ids.len() != peers.len() {
            return Err(SecAggError::Config("a peer is named twice".into()));
        }
        Ok(Self {
            server: Server::new(config, seed)?,
            config: config.clone(),
            seed,
            peers,
            ids,
            phase: Phase::Advertise,
            sent: BTreeSet::new(),
            deadline: now + stage_timeout,
            stage_timeout,
        })
    }

    /// The round's parameters.
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }

    /// The participants, by id.
    pub fn peers(&self) -> &[u64] {
        &self.peers
    }

    /// How many devices answered the open stage so far.
    pub fn answered(&self) -> usize {
        self.sent.len()
    }

    /// The open stage's name (`done` once finished).
    pub fn stage_name(&self) -> &'static str {
        match self.phase {
            Phase::Advertise => "advertise",
            Phase::Share(_) => "share keys",
            Phase::Mask(_) => "masked input",
            Phase::Unmask(..) => "unmask",
            Phase::Done(_) => "done",
        }
    }

    /// The devices this stage waits for.
    fn expected(&self) -> BTreeSet<u32> {
        match &self.phase {
            Phase::Advertise => (0..self.peers.len() as u32).collect(),
            Phase::Share(out) => out.keys().copied().collect(),
            Phase::Mask(out) => out.keys().copied().collect(),
            Phase::Unmask(_, to) => to.clone(),
            Phase::Done(_) => BTreeSet::new(),
        }
    }

    /// What peer `peer` gets when it asks now (`None`: not a participant).
    pub fn poll(&self, peer: u64) -> Option<ServerMessage> {
        let &id = self.ids.get(&peer)?;
        let answered = self.sent.contains(&id);
        let over = ServerMessage::Finished { summed: false };
        Some(match &self.phase {
            Phase::Advertise if answered => ServerMessage::Wait,
            Phase::Advertise => ServerMessage::Begin { config: self.config.clone(), seed: self.seed, id },
            _ if answered => ServerMessage::Wait,
            Phase::Share(out) => out.get(&id).cloned().map_or(over, ServerMessage::Keys),
            Phase::Mask(out) => out.get(&id).cloned().map_or(over, ServerMessage::Shares),
            Phase::Unmask(request, to) if to.contains(&id) => ServerMessage::Unmask(request.clone()),
            Phase::Unmask(..) => over,
            Phase::Done(Ok(agg)) => ServerMessage::Finished { summed: agg.survivors.contains(&id) },
            Phase::Done(Err(_)) => over,
        })
    }

    /// Peer `peer`'s message at `now`. Refused (and the session unchanged) when the peer is not
    /// a participant, the message names another id, is not this stage's, comes twice, or the
    /// server refuses it (a malformed message: the device is then out, as if it had dropped).
    pub fn handle(&mut self, now: Duration, peer: u64, msg: ClientMessage) -> Result<()> {
        let &id = self.ids.get(&peer).ok_or(SecAggError::UnknownDevice(u32::MAX))?;
        if msg.device() != id {
            return Err(SecAggError::Malformed { device: id, reason: format!("signed as device {}", msg.device()) });
        }
        if !self.expected().contains(&id) {
            return Err(SecAggError::UnknownDevice(id));
        }
        if self.sent.contains(&id) {
            return Err(SecAggError::Duplicate(id));
        }
        let taken = match (&self.phase, msg) {
            (Phase::Advertise, ClientMessage::Advertise(m)) => self.server.receive_advertise(m),
            (Phase::Share(_), ClientMessage::Shares(m)) => self.server.receive_shares(m),
            (Phase::Mask(_), ClientMessage::Masked(m)) => self.server.receive_masked_input(m),
            (Phase::Unmask(..), ClientMessage::Unmask(m)) => self.server.receive_unmask(m),
            (_, m) => {
                return Err(SecAggError::WrongStage { expected: self.stage_name(), got: stage_of(&m) });
            }
        };
        // A refused message still counts as this device's turn: it is out of the stage.
        self.sent.insert(id);
        if self.sent.is_superset(&self.expected()) {
            self.advance(now);
        }
        taken
    }

    /// When the open stage closes if not everyone answers (`None` once finished).
    pub fn poll_timeout(&self) -> Option<Duration> {
        (!matches!(self.phase, Phase::Done(_))).then_some(self.deadline)
    }

    /// Time passed: at the deadline the open stage closes with what it has.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.poll_timeout().is_some_and(|d| now >= d) {
            self.advance(now);
        }
    }

    /// The result, once finished: the sum and who is in it, or why the round failed.
    pub fn outcome(&self) -> Option<std::result::Result<&Aggregate, &SecAggError>> {
        match &self.phase {
            Phase::Done(r) => Some(r.as_ref()),
            _ => None,
        }
    }

    /// Closes the open stage and opens the next.
    fn advance(&mut self, now: Duration) {
        let next = match &self.phase {
            Phase::Advertise => self.server.finish_advertise().map(Phase::Share),
            Phase::Share(_) => self.server.finish_shares().map(Phase::Mask),
            Phase::Mask(_) => {
                self.server.finish_masked_inputs().map(|(request, to)| Phase::Unmask(request, to.into_iter().collect()))
            }
            Phase::Unmask(..) => Ok(Phase::Done(self.server.finish())),
            Phase::Done(_) => return,
        };
        self.phase = next.unwrap_or_else(|e| Phase::Done(Err(e)));
        self.sent.clear();
        self.deadline = now + self.stage_timeout;
    }
}

fn stage_of(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::Advertise(_) => "advertise",
        ClientMessage::Shares(_) => "share keys",
        ClientMessage::Masked(_) => "masked input",
        ClientMessage::Unmask(_) => "unmask",
    }
}

/// The device's side of one round over a network: its input, and its client once the server
/// says begin.
pub struct ClientSession {
    input: Vec<f32>,
    entropy: [u8; 32],
    client: Option<Client>,
    summed: Option<bool>,
}

impl ClientSession {
    /// A device that will mask `input`, with 32 bytes of secret randomness.
    pub fn new(input: Vec<f32>, entropy: [u8; 32]) -> Self {
        Self { input, entropy, client: None, summed: None }
    }

    /// Whether the session is over for this device (and whether it was summed).
    pub fn finished(&self) -> Option<bool> {
        self.summed
    }

    /// The server's answer to a poll: the message to send, if any. An error ends the device's
    /// part (an honest device refuses, e.g., a request for both shares of one neighbour).
    pub fn on(&mut self, msg: ServerMessage) -> Result<Option<ClientMessage>> {
        Ok(Some(match msg {
            ServerMessage::Wait => return Ok(None),
            ServerMessage::Finished { summed } => {
                self.summed = Some(summed);
                self.input = Vec::new();
                return Ok(None);
            }
            ServerMessage::Begin { config, seed, id } => {
                if self.client.is_some() {
                    return Err(SecAggError::Duplicate(id));
                }
                if config.vector_len != self.input.len() {
                    return Err(SecAggError::Input(format!(
                        "the round sums vectors of {}, this device holds {}",
                        config.vector_len,
                        self.input.len()
                    )));
                }
                let mut c = Client::new(&config, seed, id, self.entropy)?;
                let out = c.advertise()?;
                self.client = Some(c);
                ClientMessage::Advertise(out)
            }
            ServerMessage::Keys(k) => ClientMessage::Shares(begun(&mut self.client)?.share_keys(&k)?),
            ServerMessage::Shares(s) => {
                let input = std::mem::take(&mut self.input);
                ClientMessage::Masked(begun(&mut self.client)?.masked_input(&s, &input)?)
            }
            ServerMessage::Unmask(r) => ClientMessage::Unmask(begun(&mut self.client)?.unmask(&r)?),
        }))
    }
}

/// The client, once the session has begun.
fn begun(c: &mut Option<Client>) -> Result<&mut Client> {
    c.as_mut().ok_or(SecAggError::WrongStage { expected: "begin", got: "a stage's message" })
}

#[cfg(test)]
mod tests;
