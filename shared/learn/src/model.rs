//! The two models of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
//! from Decentralized Data", a small on-device student, and LEAF's next-character LSTM, written
//! once for every backend.

mod char_lstm;
mod cnn;
pub(crate) mod mlp;
mod two_nn;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

pub use char_lstm::CharLstm;
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
    /// LEAF's Shakespeare model: 8-dim character embedding, two LSTM layers of 256, dense to
    /// the 80 characters: 819,920 parameters. Text input.
    #[serde(rename = "lstm")]
    Lstm,
    /// The same with LSTM layers of 64 (58,064 parameters), for tests and quick runs.
    #[serde(rename = "lstm-small")]
    LstmSmall,
}

/// Hidden units of each LSTM layer of [`ModelKind::Lstm`] (LEAF's 256).
pub const LSTM_HIDDEN: usize = 256;
/// Hidden units of each LSTM layer of [`ModelKind::LstmSmall`].
pub const LSTM_SMALL_HIDDEN: usize = 64;

impl ModelKind {
    /// Whether the model reads text (character classes, `[batch, steps]`) rather than images.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Lstm | Self::LstmSmall)
    }

    /// This model where only image models will do (the coordinator, devices, students): a
    /// text model is refused with a one-line reason.
    pub fn images_only(self) -> Result<Self, String> {
        if self.is_text() {
            return Err(format!(
                "model `{self}` reads text: only the simulator (`fedge-sim run`) trains it for now; the coordinator and devices take 2nn, cnn or mlp"
            ));
        }
        Ok(self)
    }
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2nn" => Ok(Self::TwoNn),
            "cnn" => Ok(Self::Cnn),
            "mlp" => Ok(Self::Mlp),
            "lstm" => Ok(Self::Lstm),
            "lstm-small" => Ok(Self::LstmSmall),
            other => Err(format!("unknown model `{other}` (expected `2nn`, `cnn`, `mlp`, `lstm` or `lstm-small`)")),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TwoNn => "2nn",
            Self::Cnn => "cnn",
            Self::Mlp => "mlp",
            Self::Lstm => "lstm",
            Self::LstmSmall => "lstm-small",
        })
    }
}

/// Serialises model initialisation (see [`Model::init_seeded`]).
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A model of any architecture; inputs are `[batch, 1, 28, 28]` images or, for the LSTMs,
/// `[batch, steps]` character classes; outputs logits.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "a few instances per process; burn's Module derive wants plain fields")]
pub enum Model {
    /// The 2NN.
    TwoNn(TwoNn),
    /// The CNN.
    Cnn(Cnn),
    /// The student MLP.
    Mlp(Mlp),
    /// A next-character LSTM.
    CharLstm(CharLstm),
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
            ModelKind::Lstm => Self::CharLstm(CharLstm::init(num_classes, LSTM_HIDDEN, device)),
            ModelKind::LstmSmall => Self::CharLstm(CharLstm::init(num_classes, LSTM_SMALL_HIDDEN, device)),
        }
    }

    /// Which architecture this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::TwoNn(_) => ModelKind::TwoNn,
            Self::Cnn(_) => ModelKind::Cnn,
            Self::Mlp(_) => ModelKind::Mlp,
            Self::CharLstm(m) => {
                if m.hidden() == LSTM_HIDDEN {
                    ModelKind::Lstm
                } else {
                    ModelKind::LstmSmall
                }
            }
        }
    }

    /// Logits for a batch of images `[batch, 1, 28, 28]`. A text model reads the values as
    /// character classes, `[batch, 1, 1, steps]` (the callers that hold images check the kind
    /// first; text goes through [`Model::forward_tokens`]).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::TwoNn(m) => m.forward(images.flatten(1, 3)),
            Self::Cnn(m) => m.forward(images),
            Self::Mlp(m) => m.forward(images.flatten(1, 3)),
            Self::CharLstm(m) => m.forward(images.flatten::<2>(1, 3).int()),
        }
    }

    /// Logits for a batch of character classes `[batch, steps]`; an image model reads them as
    /// `[batch, 1, 1, steps]` images (which fails unless `steps` is its input size).
    pub fn forward_tokens(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        match self {
            Self::CharLstm(m) => m.forward(tokens),
            other => {
                let [b, steps] = tokens.dims();
                other.forward(tokens.float().reshape([b, 1, 1, steps]))
            }
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
        assert_eq!(Model::init(ModelKind::Lstm, 80, &device).num_params(), 819_920);
        assert_eq!(Model::init(ModelKind::LstmSmall, 80, &device).num_params(), 58_064);
    }

    #[test]
    fn the_lstm_reads_character_sequences() {
        let device = Device::flex();
        for kind in [ModelKind::Lstm, ModelKind::LstmSmall] {
            let m = Model::init(kind, 80, &device);
            assert_eq!(m.kind(), kind);
            let x = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(vec![3i64; 2 * 80], [2, 80]), &device);
            assert_eq!(m.forward_tokens(x).dims(), [2, 80]);
        }
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
