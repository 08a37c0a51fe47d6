//! Fedge's integration tests: one binary, one module per area.

mod data;
mod hostile;
mod hybrid;
mod layering;
mod manifests;
mod recovery;
mod simulation;
mod strategies;
mod system;
mod transport;
