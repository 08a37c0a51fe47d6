//! The Fedge edge client.
//!
//! [`trainer`] is what a device does with a training task: check it holds the model the task
//! names, train locally with [`fedge_learn`], turn the result into a delta, clip and noise it
//! as asked, and package the [`fedge_core::wire::TrainResult`]. The simulator runs this very
//! code for each virtual device; the network client will too. [`transport`] connects to the
//! coordinator over QUIC with the device's certificate; [`download`] fetches model versions in
//! resumable, hash-verified chunks; [`deploy`] fetches, verifies (signature, hash) and installs
//! the promoted inference model.
//!
//! Inference: [`predict`] runs the deployed model; [`hybrid`] answers under a policy
//! (local-only, cascade, speculative, cloud-first) with per-version calibration, escalating
//! through [`cloud`] (an inference session to the coordinator's teacher) and staying local when
//! offline or private; [`metrics`] counts each path; [`http`] serves it all to local apps as
//! JSON over HTTP; [`bench`] measures it.

pub mod bench;
pub mod cloud;
pub mod config;
pub mod deploy;
pub mod download;
pub mod gpu_cache;
pub mod http;
pub mod hybrid;
pub mod link;
pub mod metrics;
pub mod predict;
pub mod secure;
pub mod service;
pub mod trainer;
pub mod work_loop;

pub use trainer::{EdgeTrainer, TaskOutcome, TrainError};
