//! A [`Net`](super::Net)'s insides: each layer with its shapes resolved and its parameters
//! ([`Layer`], [`Shape`]), the buffers a step reuses ([`Workspace`]) and a batch-split step's
//! gradients ([`Grad`]).

use crate::conv::Geometry;

/// A layer with its shapes resolved.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    Conv { g: Geometry, out_channels: usize },
    Dense { inputs: usize, outputs: usize, relu: bool },
}

impl Shape {
    pub(super) fn fan_in(&self) -> usize {
        match *self {
            Shape::Conv { g, .. } => g.patch(),
            Shape::Dense { inputs, .. } => inputs,
        }
    }

    pub(super) fn fan_out(&self) -> usize {
        match *self {
            Shape::Conv { out_channels, .. } => out_channels,
            Shape::Dense { outputs, .. } => outputs,
        }
    }

    /// Elements of one example's output.
    pub(super) fn output(&self) -> usize {
        match *self {
            Shape::Conv { g, out_channels } => (g.h / 2) * (g.w / 2) * out_channels,
            Shape::Dense { outputs, .. } => outputs,
        }
    }
}

pub(super) struct Layer {
    pub(super) shape: Shape,
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    /// The proximal anchor of `weight` and `bias` (empty until [`Net::set_anchor`]).
    pub(super) anchor_weight: Vec<f32>,
    pub(super) anchor_bias: Vec<f32>,
}

/// One layer's weight and bias gradients (or one chunk's share of them), laid out as the
/// layer's parameters.
pub(super) struct Grad {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

/// Buffers for batches of up to `capacity` examples.
#[derive(Default)]
pub(super) struct Workspace {
    pub(super) capacity: usize,
    /// `acts[0]` the input, `acts[i + 1]` layer `i`'s output (after ReLU and pooling).
    pub(super) acts: Vec<Vec<f32>>,
    /// The im2col matrix of one chunk of a convolution's batch.
    pub(super) cols: Vec<f32>,
    /// Per layer: the pooling winners of a convolution (empty for dense layers).
    pub(super) winners: Vec<Vec<u8>>,
    /// A chunk's pre-pooling convolution output, then its gradient.
    pub(super) conv: Vec<f32>,
    /// Column-matrix gradient of a chunk's convolution input.
    pub(super) cols_grad: Vec<f32>,
    /// Activation gradients, ping-ponged between layers.
    pub(super) grad: [Vec<f32>; 2],
    /// Column sums of a layer's output gradient (its bias gradient).
    pub(super) bias_grad: Vec<f32>,
    /// The Winograd layers' transform-domain buffers (empty when none runs Winograd).
    pub(super) wino: WinogradBuffers,
}

/// Buffers of a Winograd convolution ([`crate::winograd`]) for one chunk of a batch.
#[derive(Default)]
pub(super) struct WinogradBuffers {
    /// Transformed data: `[xi][tile][channel]`.
    pub(super) v: Vec<f32>,
    /// GEMM results, or the transformed output gradient: `[xi][tile][channel]`.
    pub(super) m: Vec<f32>,
    /// Transformed kernels: `[xi][ci][co]`.
    pub(super) u: Vec<f32>,
    /// The weight gradient in the transform domain, summed over the chunks: `[xi][ci][co]`.
    pub(super) du: Vec<f32>,
    /// The transforms' scratch.
    pub(super) scratch: Vec<f32>,
}
