//! What a [`Net`](super::Net) is built from and reports: the architecture ([`NetSpec`],
//! [`LayerSpec`]), why it fails ([`NetError`]) and its [`Scores`].

use thiserror::Error;

use crate::gemm::MatmulError;

/// One layer of a [`NetSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSpec {
    /// `kernel x kernel` convolution, stride 1, "same" zero padding, bias, ReLU, then 2x2
    /// max-pooling with stride 2.
    ConvReluPool {
        /// Output channels.
        out_channels: usize,
        /// Kernel side (odd).
        kernel: usize,
    },
    /// Fully connected with bias, optionally followed by ReLU.
    Dense {
        /// Output units.
        outputs: usize,
        /// Whether ReLU follows.
        relu: bool,
    },
}

/// An architecture: the input image shape and the layers in order. The last layer's outputs
/// are the class logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Input channels.
    pub channels: usize,
    /// Layers, input to output.
    pub layers: Vec<LayerSpec>,
}

impl NetSpec {
    /// McMahan et al.'s MNIST CNN on 28x28 grey images: two 5x5 convolutions (32 and 64
    /// channels) each with ReLU and 2x2 max-pooling, a 512-unit ReLU layer, `classes` logits.
    pub fn mnist_cnn(classes: usize) -> Self {
        Self {
            height: 28,
            width: 28,
            channels: 1,
            layers: vec![
                LayerSpec::ConvReluPool { out_channels: 32, kernel: 5 },
                LayerSpec::ConvReluPool { out_channels: 64, kernel: 5 },
                LayerSpec::Dense { outputs: 512, relu: true },
                LayerSpec::Dense { outputs: classes, relu: false },
            ],
        }
    }
}

/// Why a network could not be built or run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetError {
    /// The architecture does not fit together.
    #[error("invalid architecture: {0}")]
    Spec(String),
    /// A batch's images or labels do not match the network.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// Parameters of the wrong size.
    #[error("layer {layer}: expected {expected} {what} values, got {got}")]
    Params {
        /// Layer index.
        layer: usize,
        /// `weight` or `bias`.
        what: &'static str,
        /// Values the layer has.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A proximal step before [`Net::set_anchor`].
    #[error("a proximal step needs an anchor (Net::set_anchor)")]
    NoAnchor,
    /// A GEMM refused its operands (a bug: shapes are checked when the net is built).
    #[error(transparent)]
    Matmul(#[from] MatmulError),
}

/// Loss and accuracy counts over a set of examples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    /// Sum of per-example cross-entropy.
    pub loss_sum: f64,
    /// Examples whose highest logit is their label (ties go to the lowest class).
    pub correct: usize,
    /// Examples scored.
    pub examples: usize,
}
