//! Fedge's round engine and aggregation strategies, pure: no sockets, no clock, no async
//! runtime, no burn.
//!
//! [`RoundEngine`] is a sans-IO state machine that samples devices, hands out training tasks,
//! collects results until every selected device answered or the deadline passed, aggregates
//! through a [`Strategy`], and emits the next model version. `now` is passed in and events are
//! polled out, so the simulator (virtual clock, in-memory links) and the coordinator's QUIC
//! server drive the very same code.
//!
//! - [`engine`](RoundEngine): the state machine (`handle_*` in, `poll_*` out);
//! - [`buffered`]: [`BufferedEngine`], buffered asynchronous aggregation (FedBuff): no rounds,
//!   devices tasked as slots free up, every K results (discounted by staleness) a new version;
//! - [`config`]: [`EngineConfig`], [`CentralDp`], and [`TrainingKeys`], the training and
//!   privacy keys both configuration files share;
//! - [`event`]: what the engine emits and reports, and the open round as a driver stores it;
//! - [`error`]: why it refuses;
//! - [`strategy`]: FedAvg, DP-FedAvg, FedProx, the server optimisers (FedAvgM, FedAdagrad,
//!   FedAdam, FedYogi) and the robust rules (median, trimmed mean, Krum, Multi-Krum, norm
//!   bounding, centered clipping) behind the [`Strategy`] trait, chosen by name.
//!
//! Architecture invariant (checked by `tests/layering.rs` in the `tests` crate): this crate
//! depends on fedge-core and pure crates only; never on tokio, quinn, rustls or burn.

pub mod buffered;
pub mod config;
mod engine;
pub mod error;
pub mod event;
pub mod strategy;

pub use buffered::{
    AggregationReport, AsyncConfig, AsyncConfigError, AsyncEvent, AsyncRejectReason, BufferedEngine, StalenessWeight,
};
pub use config::{CentralDp, ConfigError, EngineConfig, TrainingKeys};
pub use engine::{RoundEngine, SecureAggregate};
pub use error::{AdoptError, ReconfigureError, RejectReason, ResumeError, StartError};
pub use event::{EngineEvent, Evaluation, OpenRoundInfo, RoundOutcome, RoundReport, StoredRound};
pub use strategy::{DpFedAvg, FedAvg, Strategy, StrategyConfig, StrategyOptions};
