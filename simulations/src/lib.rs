//! The Fedge simulator: hundreds to thousands of virtual devices in one process.
//!
//! It drives the real round engine ([`fedge_engine::RoundEngine`], the coordinator's too) and the
//! edge client's real trainer ([`fedge_edge::EdgeTrainer`]) with a virtual clock and in-memory
//! links: [`config`] says what to run, [`devices`] how fast each virtual device computes and
//! transfers, [`pool`] runs device tasks on a few worker threads that each own one model,
//! [`clock`] runs one round in virtual time (results reach the engine in arrival order, the
//! engine's deadline enforced), [`run`] is the loop and its outputs, [`attack`] makes a seeded subset of the
//! devices Byzantine, [`plot`] draws runs' accuracy, loss and epsilon per round, [`secure`] runs secure aggregation
//! (SecAgg+) among a round's reporting devices so the engine sees only their sum.

pub mod attack;
pub mod bench;
pub mod clock;
pub mod config;
pub mod data;
pub mod demo;
pub mod devices;
mod distill;
pub mod gpu_bench;
pub mod hybrid_experiment;
pub mod plot;
pub mod pool;
pub mod privacy_args;
mod processes;
pub mod run;
pub mod run_args;
pub mod secure;
pub mod shard;
pub mod strategy_args;

pub use config::{SimConfig, SimConfigError};
pub use run::{SimError, SimOutput, run};
