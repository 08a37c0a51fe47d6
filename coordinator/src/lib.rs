//! The Fedge coordinator.
//!
//! [`engine`] is the round engine: a sans-IO state machine that samples devices, hands out
//! training tasks, collects results until every selected device answered or the deadline
//! passed, aggregates through a [`strategy::Strategy`], and emits the next model version. It
//! has no sockets and no clock: `now` is passed in, events are polled out. The simulator
//! drives it today; the QUIC server will drive the same engine.

pub mod engine;
pub mod strategy;

pub use engine::{EngineConfig, EngineEvent, RejectReason, RoundEngine, RoundOutcome, RoundReport};
pub use strategy::{FedAvg, Strategy};
