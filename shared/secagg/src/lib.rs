//! SecAgg+ secure aggregation as a pure, sans-IO library.
//!
//! The server learns the sum of the devices' (quantised) vectors and nothing else about any one
//! of them, even when devices drop out mid-round, as long as enough neighbours of each device
//! stay. This is SecAgg+ (Bell, Bengtsson, Bonawitz, Gascón, Ghazi, Raykova, CCS 2020) over a
//! seeded Harary graph of `degree` neighbours per device; with `degree = n - 1` it is Bonawitz et
//! al. (CCS 2017). The state machines take messages and return messages; moving bytes is the
//! caller's business (docs/secagg.md).
//!
//! Modules: [`config`] (public parameters and their rules), [`quantise`] (fixed point),
//! [`shamir`] (secret sharing over GF(2^61 - 1)), [`graph`] (the neighbour graph), [`masks`]
//! (key derivation, PRG, share encryption), [`messages`], [`client`], [`server`]; over a network
//! where devices poll: [`session`] (participants, stage deadlines, each device's next message);
//! FedAvg's weights inside the sum: [`weighting`].

pub mod client;
pub mod config;
pub mod error;
pub mod graph;
pub mod masks;
pub mod messages;
pub mod quantise;
pub mod server;
pub mod session;
pub mod shamir;
pub mod weighting;

pub use client::Client;
pub use config::SecAggConfig;
pub use error::{Result, SecAggError};
pub use graph::Graph;
pub use messages::*;
pub use quantise::{dequantise_mean, dequantise_sum, quantise};
pub use server::{Aggregate, Server};
pub use session::{ClientMessage, ClientSession, ServerMessage, ServerSession};
pub use shamir::Share;
