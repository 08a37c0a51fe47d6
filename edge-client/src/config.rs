//! `edge.toml`: what `fedge-edge run` does. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The edge client's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Name in the coordinator's certificate.
    pub server_name: String,
    /// Fleet CA certificate.
    pub ca: PathBuf,
    /// This device's certificate.
    pub cert: PathBuf,
    /// This device's key.
    pub key: PathBuf,
    /// Where the device keeps its model and status.
    pub state_dir: PathBuf,
    /// Local data: `embedded`, `mnist` or `fashion-mnist`.
    pub dataset: String,
    /// Folder with `mnist/` and `fashion-mnist/`.
    pub data_dir: PathBuf,
    /// Which part of an IID split of the training set is this device's (0-based).
    pub shard: u64,
    /// Into how many parts the training set is split.
    pub shards: u64,
    /// `2nn` or `cnn` (must match the coordinator's).
    pub model: String,
    /// `cpu` (fused CPU kernels, the default), `flex` (burn's CPU backend) or `wgpu`.
    pub backend: String,
    /// Seed of the split and of local training.
    pub seed: u64,
    /// Memory the device offers for training, MiB (reported to the coordinator).
    pub memory_mb: u32,
    /// The fleet's `model-signing.pub`: deployed models must be signed with it (absent: no
    /// deployed model is accepted).
    pub model_key: Option<PathBuf>,
    /// How the device answers predictions (policy, calibration, local server).
    pub inference: crate::hybrid::HybridConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            coordinator: "127.0.0.1:4433".parse().expect("valid address"),
            server_name: "localhost".into(),
            ca: PathBuf::from("certs/fleet/ca.pem"),
            cert: PathBuf::from("certs/fleet/devices/dev-0.pem"),
            key: PathBuf::from("certs/fleet/devices/dev-0.key"),
            state_dir: PathBuf::from("edge-state"),
            dataset: "embedded".into(),
            data_dir: PathBuf::from("data"),
            shard: 0,
            shards: 1,
            model: "2nn".into(),
            backend: "cpu".into(),
            seed: 0,
            memory_mb: 512,
            model_key: None,
            inference: crate::hybrid::HybridConfig::default(),
        }
    }
}
