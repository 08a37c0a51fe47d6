//! The Fedge simulator: hundreds to thousands of virtual devices in one process.
//!
//! It drives the real round engine ([`fedge_engine::RoundEngine`], the coordinator's too) and the
//! edge client's real trainer ([`fedge_edge::EdgeTrainer`]) with a virtual clock and in-memory
//! links: [`config`] says what to run, [`pool`] runs device tasks on a few worker threads that
//! each own one model, [`run`] is the loop and its outputs.

pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod hybrid;
pub mod pool;
pub mod run;

pub use config::{ConfigError, SimConfig};
pub use run::{SimError, SimOutput, run};
