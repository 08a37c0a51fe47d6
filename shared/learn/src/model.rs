//! The two models of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
//! from Decentralized Data", and a small on-device student, written once for every backend.

mod cnn;
pub(crate) mod mlp;
mod two_nn;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use cnn::Cnn;
pub use mlp::Mlp;
pub use two_nn::TwoNn;

/// Which architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ModelKind {
    /// MLP 784-200-200-10 with ReLU: 199,210 parameters.
    #[default]
    #[serde(rename = "2nn")]
    TwoNn,
    /// 5x5 conv 32, pool, 5x5 conv 64, pool, FC 512, FC 10: 1,663,370 parameters.
    #[serde(rename = "cnn")]
    Cnn,
    /// Student MLP 784-128-10 with ReLU: 101,770 parameters.
    #[serde(rename = "mlp")]
    Mlp,
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2nn" => Ok(Self::TwoNn),
            "cnn" => Ok(Self::Cnn),
            "mlp" => Ok(Self::Mlp),
            other => Err(format!("unknown model `{other}` (expected `2nn`, `cnn` or `mlp`)")),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TwoNn => "2nn",
            Self::Cnn => "cnn",
            Self::Mlp => "mlp",
        })
    }
}

/// Serialises model initialisation (see [`Model::init_seeded`]).
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A model of any architecture; inputs are `[batch, 1, 28, 28]` images, outputs logits.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "a few instances per process; burn's Module derive wants plain fields")]
pub enum Model {
    /// The 2NN.
    TwoNn(TwoNn),
    /// The CNN.
    Cnn(Cnn),
    /// The student MLP.
    Mlp(Mlp),
}

impl Model {
    /// A freshly initialised model on `device` (burn's default initialisers, seeded by the
    /// device's RNG).
    pub fn init(kind: ModelKind, num_classes: usize, device: &Device) -> Self {
        let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
        let model = Self::init_unlocked(kind, num_classes, device);
        // Draw every lazily initialised parameter now, under the lock (see `with_seeded`).
        let _ = crate::convert::params_of(&model);
        model
    }

    /// Runs `f` on a freshly initialised model whose weights depend on `seed` only. The
    /// device's RNG is process-wide and burn draws a parameter's initial values when it is first
    /// read, so seeding, initialising and reading (`f`) all happen under one lock that every
    /// initialisation takes: no model on another thread can draw in between.
    pub fn with_seeded<T>(
        kind: ModelKind,
        num_classes: usize,
        device: &Device,
        seed: u64,
        f: impl FnOnce(&Self) -> T,
    ) -> T {
        let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
        device.seed(seed);
        f(&Self::init_unlocked(kind, num_classes, device))
    }

    fn init_unlocked(kind: ModelKind, num_classes: usize, device: &Device) -> Self {
        match kind {
            ModelKind::TwoNn => Self::TwoNn(TwoNn::init(28 * 28, num_classes, device)),
            ModelKind::Cnn => Self::Cnn(Cnn::init(num_classes, device)),
            ModelKind::Mlp => Self::Mlp(Mlp::init(28 * 28, num_classes, device)),
        }
    }

    /// Which architecture this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::TwoNn(_) => ModelKind::TwoNn,
            Self::Cnn(_) => ModelKind::Cnn,
            Self::Mlp(_) => ModelKind::Mlp,
        }
    }

    /// Logits for a batch of images `[batch, 1, 28, 28]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::TwoNn(m) => m.forward(images.flatten(1, 3)),
            Self::Cnn(m) => m.forward(images),
            Self::Mlp(m) => m.forward(images.flatten(1, 3)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        let device = Device::flex();
        assert_eq!(Model::init(ModelKind::TwoNn, 10, &device).num_params(), 199_210);
        assert_eq!(Model::init(ModelKind::Cnn, 10, &device).num_params(), 1_663_370);
        assert_eq!(Model::init(ModelKind::Mlp, 10, &device).num_params(), 101_770);
    }

    #[test]
    fn forward_shapes() {
        let device = Device::flex();
        for kind in [ModelKind::TwoNn, ModelKind::Cnn, ModelKind::Mlp] {
            let m = Model::init(kind, 10, &device);
            let x = Tensor::<4>::zeros([3, 1, 28, 28], &device);
            assert_eq!(m.forward(x).dims(), [3, 10]);
        }
    }
}
