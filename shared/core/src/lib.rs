//! Fedge's pure core.
//!
//! Everything here is plain computation over plain data: flat named parameter tensors
//! ([`params`]), the wire messages and their codec ([`wire`], [`codec`]), FedAvg aggregation
//! maths ([`aggregate`]), differential privacy mechanisms and accounting ([`privacy`]), dataset readers
//! ([`dataset`]) and partitioners ([`partition`]).
//!
//! Architecture invariant: this crate has no async runtime, no sockets, no clock and no burn.
//! Randomness is always injected by the caller as a seeded RNG, so every result is reproducible.

pub mod aggregate;
pub mod codec;
pub mod config_file;
pub mod dataset;
pub mod escalation;
pub mod inference_cost;
pub mod params;
pub mod partition;
pub mod privacy;
pub mod prune;
pub mod quant;
pub mod registry;
pub mod rng;
pub mod routing;
pub mod wire;

pub use params::{ModelParams, ParamLayout, ParamsError, TensorSpec};
