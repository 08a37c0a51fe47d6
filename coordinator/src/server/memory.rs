//! The in-memory harness (tests only): drives the coordinator's device sessions with no
//! sockets and no real time. A [`MemoryFleet`] runs the very code a QUIC session runs
//! (`handle_connected`, `device_request`, `handle_disconnected`, and `handle_deadline` as the
//! deadline timer would call it) on a coordinator whose clock moves only by
//! [`MemoryFleet::advance`]. Requests are encoded with the wire codec, as a device sends them,
//! and the answers decoded back, so what a test sees is what a device would read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::wire::{Capabilities, DeviceId, Message};
use fedge_engine::{ConfigError, EngineConfig, RoundReport};

use super::Coordinator;
use super::clock::Clock;
use super::downloads::Reply;
use crate::listener::Closer;

mod tests;

/// A coordinator (memory only, manual clock) and the sessions of its devices.
pub(crate) struct MemoryFleet {
    coordinator: Arc<Coordinator>,
}

/// One device session: training, or inference only.
pub(crate) struct MemoryDevice {
    name: String,
    id: DeviceId,
    /// The training session's number (`None`: an inference session).
    session: Option<u64>,
    /// The reasons this session's [`Closer`] was called with.
    closed: Arc<Mutex<Vec<String>>>,
}

impl MemoryDevice {
    /// The reasons the coordinator closed this session with, in order (none: still open).
    pub(crate) fn closed(&self) -> Vec<String> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The device's numeric id.
    pub(crate) fn id(&self) -> DeviceId {
        self.id
    }
}

/// What a harness device says it can do.
fn capabilities() -> Capabilities {
    Capabilities { backend: "memory".into(), memory_mb: 1024, charging: true, unmetered: true, num_samples: 100 }
}

impl MemoryFleet {
    /// A coordinator whose model version 0 is `initial`, on a manual clock at zero.
    pub(crate) fn new(config: EngineConfig, initial: ModelParams) -> Result<Self, ConfigError> {
        let clock = Clock::Manual(Mutex::new(Duration::ZERO));
        Ok(Self { coordinator: Coordinator::with_clock(config, initial, clock)? })
    }

    /// The coordinator driven.
    pub(crate) fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// Device `name` opens a training session (as after a `Hello` for training).
    pub(crate) fn connect(&self, name: &str) -> MemoryDevice {
        self.open(name, true)
    }

    /// Device `name` opens an inference session.
    pub(crate) fn connect_inference(&self, name: &str) -> MemoryDevice {
        self.open(name, false)
    }

    fn open(&self, name: &str, training: bool) -> MemoryDevice {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let closer = {
            let closed = closed.clone();
            Closer::new(move |reason| closed.lock().unwrap_or_else(|p| p.into_inner()).push(reason.to_string()))
        };
        let (id, session) = self
            .coordinator
            .handle_connected(name, training.then(|| (capabilities(), closer)), false)
            .expect("a coordinator in memory always registers a device");
        MemoryDevice { name: name.to_string(), id, session, closed }
    }

    /// `device` sends `message` on its session and reads the answer.
    pub(crate) async fn request(&self, device: &MemoryDevice, message: Message) -> Message {
        let received = codec::encode(&message);
        let request = codec::decode(&received).expect("the codec reads back what it wrote");
        let c = &self.coordinator;
        let reply = match request {
            // A QUIC session answers these on their own task, the same way.
            Message::InferRequest(r) => Reply::Message(match c.infer(&device.name, r).await {
                Ok(a) => Message::InferAnswer(a),
                Err(e) => Message::Error { code: e.code(), message: e.to_string() },
            }),
            other => c.device_request(device.id, &device.name, device.session.is_some(), other, &received).await,
        };
        let bytes = match reply {
            Reply::Message(m) => return m,
            Reply::Encoded(bytes) => bytes.to_vec(),
            Reply::Chunk(mut prefix, model, range) => {
                prefix.extend_from_slice(&model[range]);
                prefix
            }
        };
        codec::decode(&bytes).expect("the coordinator's encoded answers decode")
    }

    /// `device`'s session ends (its connection went away).
    pub(crate) fn disconnect(&self, device: MemoryDevice) {
        if let Some(session) = device.session {
            self.coordinator.handle_disconnected(device.id, session);
        }
    }

    /// Moves the clock by `by`, then times the open round out if its deadline has passed
    /// (what the deadline timer does on a wall clock), again if the next one is due too.
    pub(crate) fn advance(&self, by: Duration) {
        let c = &self.coordinator;
        c.clock.advance(by);
        loop {
            let (due, round) = {
                let s = c.lock();
                (s.rounds.poll_timeout().is_some_and(|at| at <= c.now()), s.rounds.engine.current_round())
            };
            if !due {
                return;
            }
            c.handle_deadline();
            if c.lock().rounds.engine.current_round() == round {
                return;
            }
        }
    }

    /// Asks for `rounds` more rounds (as an operator's `round start` does).
    pub(crate) fn start_rounds(&self, rounds: u64) {
        self.coordinator.start_rounds(rounds);
    }

    /// The round open now, if any.
    pub(crate) fn open_round(&self) -> Option<u64> {
        self.coordinator.lock().rounds.engine.current_round()
    }

    /// Reports of the rounds closed so far.
    pub(crate) fn reports(&self) -> Vec<RoundReport> {
        self.coordinator.reports()
    }
}
