//! The Fedge coordinator.
//!
//! [`engine`] is the round engine: a sans-IO state machine that samples devices, hands out
//! training tasks, collects results until every selected device answered or the deadline
//! passed, aggregates through a [`strategy::Strategy`], and emits the next model version. It
//! has no sockets and no clock: `now` is passed in, events are polled out. The simulator
//! and the QUIC server ([`server`]) drive the same engine.
//!
//! [`certs`] makes and reads the fleet's certificates; [`transport`] admits only peers with a
//! valid, unrevoked client certificate and tells who they are; [`server`] is the async shell
//! that drives the engine from the network; [`inference`] answers the hard cases devices
//! escalate with the teacher, batched, under a per-device rate limit.

pub mod blobs;
pub mod certs;
pub mod config;
pub mod engine;
pub mod inference;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod strategy;
pub mod transport;

pub use engine::{CentralDp, EngineConfig, EngineEvent, RejectReason, RoundEngine, RoundOutcome, RoundReport};
pub use strategy::{FedAvg, Strategy};
