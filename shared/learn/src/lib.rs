//! Everything burn in Fedge, in one place.
//!
//! The McMahan et al. 2017 models ([`model`]), turning dataset examples into tensors
//! ([`batch`]), local SGD training and evaluation ([`train`]), the exact conversion between burn
//! modules and flat [`fedge_core::ModelParams`] ([`convert`]), the choice of compute backend
//! at run time ([`backend`]), and the fast CPU path that trains the same models with
//! `fedge-kernels`' fused step ([`fast`]).
//!
//! Architecture invariant: this is the only crate that depends on burn. The round engine,
//! aggregation and privacy maths see flat parameters only; the edge client, the simulator and
//! (later) the coordinator's distillation and evaluation call in here.

pub mod backend;
pub mod batch;
pub mod convert;
pub mod distill;
pub mod fast;
pub mod group;
pub mod infer;
pub mod model;
pub mod train;

pub use backend::{BackendError, BackendKind};
pub use convert::ConvertError;
pub use distill::{DistillConfig, DistillData, QuantizedStudent, WarmStudent};
pub use fast::FastNet;
pub use fedge_kernels::{ConvAlgorithm, Threads};
pub use group::{GroupError, GroupTrainer, Member};
pub use infer::{Prediction, Predictor, PredictorError};
pub use model::{Model, ModelKind};
pub use train::{EvalMetrics, TrainOutput, Trainer};

/// The backends this build's tests run on: burn-flex always, wgpu too when it is compiled in
/// (`--features wgpu`; the machine then needs a Vulkan, Metal or DX12 driver: CI installs
/// Mesa's lavapipe). The same tests run on each.
#[cfg(test)]
pub(crate) fn test_backends() -> Vec<BackendKind> {
    let mut backends = vec![BackendKind::Flex];
    if cfg!(feature = "wgpu") {
        backends.push(BackendKind::Wgpu);
    }
    backends
}
