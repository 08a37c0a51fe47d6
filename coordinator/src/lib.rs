//! The Fedge coordinator.
//!
//! The round engine and the aggregation strategies live in their own pure crate,
//! [`fedge_engine`]: a sans-IO state machine with no sockets and no clock. The simulator and
//! the QUIC server ([`server`]) drive the same engine.
//!
//! [`certs`] makes and reads the fleet's certificates; [`transport`] admits only peers with a
//! valid, unrevoked client certificate and tells who they are; [`server`] is the async shell
//! that drives the engine from the network; [`inference`] answers the hard cases devices
//! escalate with the teacher, batched, under a per-device rate limit. [`operator`] is the
//! operator's client and [`print`] what the operator commands print. [`web`] is the HTTP
//! listener of Prometheus metrics ([`metrics`]) and of the read-only operator page ([`page`]).
//! [`root_set`] trains FLTrust's reference update on the server's own clean examples.

pub mod blobs;
pub mod certs;
pub mod config;
pub mod inference;
pub mod listener;
pub mod metrics;
pub mod operator;
pub mod page;
pub mod print;
pub mod root_set;
pub mod server;
pub mod service;
pub mod store;
pub mod web;
