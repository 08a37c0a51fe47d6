//! A small feed-forward classifier trained by fused minibatch SGD: "same" convolutions with
//! ReLU and 2x2 max-pooling, then dense layers, softmax cross-entropy.
//!
//! One [`Net`] owns its parameters and every buffer a step needs, allocated for the largest
//! batch seen and reused: a simulator worker keeps one for its whole life. A training step is
//! forward (convolutions as one whole-batch im2col + GEMM each, or Winograd's 36 GEMMs where it
//! applies, see [`ConvAlgorithm`]; bias, ReLU and pooling in one pass), the loss gradient, then
//! backward layer by layer, where each layer first passes the gradient to its input and then
//! updates its own weights in the same GEMM that computes their gradient
//! (`W := W - lr * X^T dY`): no gradient tensor is ever stored. (A Winograd layer sums its
//! weight gradient over the batch in the transform domain, `36 x C_in x C_out`, and updates
//! the weights from it once.)
//!
//! A proximal step (FedProx, [`Net::train_step_proximal`]) also pulls every parameter towards
//! an anchor ([`Net::set_anchor`]): `W := W - lr * (grad + mu * (W - anchor))`, both terms at
//! the pre-step weights. Each layer applies `mu`'s part after it has passed the gradient to its
//! input and before its weight GEMM, which reads only activations and output gradients, so the
//! step is exactly that formula (up to float rounding) at one extra pass over the parameters.
//!
//! That is the step on one thread ([`Threads::One`], what a simulator worker uses: nothing is
//! spawned). A net given `T > 1` threads ([`Threads::Rayon`]) splits a training step's batch
//! into `T` chunks trained side by side, each with its own workspace, and applies the summed
//! gradients once (`net/parallel.rs`: the design, determinism and memory); the step equals the
//! one-thread step up to float rounding. Scoring and logits split each GEMM by rows instead.
//!
//! Activations are NHWC. Weights are `[fan_in, fan_out]` row-major: a convolution's rows are
//! `(ky * k + kx) * c_in + ci` (the im2col order of [`crate::conv`]), a dense layer after a
//! convolution reads its input in NHWC order.

use crate::conv::Geometry;
use crate::gemm::Threads;
use crate::winograd::ConvAlgorithm;

mod backward;
mod conv_winograd;
mod layer;
mod parallel;
mod spec;
mod step;

use layer::{Layer, Shape, Workspace};
use step::CHUNK_BYTES;

pub use spec::{LayerSpec, NetError, NetSpec, Scores};

/// A network with its parameters and buffers. See the module docs.
pub struct Net {
    height: usize,
    width: usize,
    channels: usize,
    layers: Vec<Layer>,
    threads: Threads,
    chunk_bytes: usize,
    conv_algorithm: ConvAlgorithm,
    ws: Workspace,
    /// A batch-split step's further workspaces and gradient buffers (empty until one runs).
    par: parallel::Replicas,
    /// The least forward work (multiply-adds) of a batch that is split over threads.
    split_min_macs: usize,
}

impl Net {
    /// A network of `spec` with all parameters zero; [`Net::set_layer`] loads real ones.
    pub fn new(spec: &NetSpec, threads: Threads) -> Result<Self, NetError> {
        let (mut h, mut w, mut c) = (spec.height, spec.width, spec.channels);
        let mut flat: Option<usize> = None; // set once a dense layer has flattened the input
        let mut layers = Vec::with_capacity(spec.layers.len());
        if h == 0 || w == 0 || c == 0 || spec.layers.is_empty() {
            return Err(NetError::Spec("empty input or no layers".into()));
        }
        for (i, l) in spec.layers.iter().enumerate() {
            let shape = match *l {
                LayerSpec::ConvReluPool { out_channels, kernel } => {
                    if flat.is_some() {
                        return Err(NetError::Spec(format!("layer {i}: convolution after a dense layer")));
                    }
                    if kernel % 2 == 0 || out_channels == 0 || h % 2 != 0 || w % 2 != 0 {
                        return Err(NetError::Spec(format!(
                            "layer {i}: needs an odd kernel, channels, and an even {h}x{w} input"
                        )));
                    }
                    let g = Geometry { h, w, c, k: kernel };
                    (h, w, c) = (h / 2, w / 2, out_channels);
                    Shape::Conv { g, out_channels }
                }
                LayerSpec::Dense { outputs, relu } => {
                    let inputs = flat.unwrap_or(h * w * c);
                    if outputs == 0 {
                        return Err(NetError::Spec(format!("layer {i}: no outputs")));
                    }
                    flat = Some(outputs);
                    Shape::Dense { inputs, outputs, relu }
                }
            };
            layers.push(Layer {
                weight: vec![0.0; shape.fan_in() * shape.fan_out()],
                bias: vec![0.0; shape.fan_out()],
                anchor_weight: Vec::new(),
                anchor_bias: Vec::new(),
                shape,
            });
        }
        if !matches!(layers.last().map(|l| l.shape), Some(Shape::Dense { relu: false, .. })) {
            return Err(NetError::Spec("the last layer must be dense without ReLU (the logits)".into()));
        }
        Ok(Self {
            height: spec.height,
            width: spec.width,
            channels: spec.channels,
            layers,
            threads,
            chunk_bytes: CHUNK_BYTES,
            conv_algorithm: ConvAlgorithm::default(),
            ws: Workspace::default(),
            par: parallel::Replicas::default(),
            split_min_macs: parallel::SPLIT_MIN_MACS,
        })
    }

    /// How many threads a step may use. [`Threads::One`]: the calling thread only (nothing is
    /// spawned). [`Threads::Rayon`]`(T)`, `T > 1` (0: the global pool's size): a training step
    /// splits its batch into up to `T` chunks run on rayon's global pool, single-threaded
    /// kernels each (see `net/parallel.rs`; `T - 1` extra workspaces and `T` parameter-sized
    /// gradient buffers); scoring deals its chunks out over the threads. A batch with less
    /// forward work than [`Net::set_split_work`] says is not split (a step of the 2NN at batch
    /// 10 takes 0.15 ms, less than handing half of it to another thread costs).
    pub fn set_threads(&mut self, threads: Threads) {
        self.threads = threads;
    }

    /// The least forward work, in multiply-adds, of a batch that training or scoring splits over
    /// threads (default 25 million: the CNN's batches of 3 and up, the 2NN's of 126 and up; 0
    /// splits every batch of two or more).
    pub fn set_split_work(&mut self, min_macs: usize) {
        self.split_min_macs = min_macs;
    }

    /// Multiply-adds of one example's forward pass (the convolutions counted directly, not by
    /// the algorithm that computes them).
    pub fn forward_macs(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l.shape {
                layer::Shape::Conv { g, out_channels } => g.h * g.w * g.patch() * out_channels,
                layer::Shape::Dense { inputs, outputs, .. } => inputs * outputs,
            })
            .sum()
    }

    /// How many bytes of im2col columns (or, for a Winograd layer, of transformed data and GEMM
    /// results) a convolution builds at a time (default 2 MiB; the results do not depend on it
    /// beyond float rounding).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
        self.ws = Workspace::default();
        self.par = parallel::Replicas::default();
    }

    /// How the convolutions compute (default [`ConvAlgorithm::Winograd`] where it applies;
    /// the results agree to float rounding).
    pub fn set_conv_algorithm(&mut self, algorithm: ConvAlgorithm) {
        self.conv_algorithm = algorithm;
        self.ws = Workspace::default();
        self.par = parallel::Replicas::default();
    }

    /// How the convolutions compute.
    pub fn conv_algorithm(&self) -> ConvAlgorithm {
        self.conv_algorithm
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of classes (the last layer's outputs).
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.shape.fan_out())
    }

    /// Elements of one input image.
    pub fn input_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Layer `i`'s weight (`[fan_in, fan_out]`, see the module docs) and bias.
    pub fn layer(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.layers[i].weight, &self.layers[i].bias)
    }

    /// Replaces layer `i`'s weight and bias (same layout as [`Net::layer`]).
    pub fn set_layer(&mut self, i: usize, weight: &[f32], bias: &[f32]) -> Result<(), NetError> {
        let l = &mut self.layers[i];
        if weight.len() != l.weight.len() {
            return Err(NetError::Params { layer: i, what: "weight", expected: l.weight.len(), got: weight.len() });
        }
        if bias.len() != l.bias.len() {
            return Err(NetError::Params { layer: i, what: "bias", expected: l.bias.len(), got: bias.len() });
        }
        l.weight.copy_from_slice(weight);
        l.bias.copy_from_slice(bias);
        Ok(())
    }

    /// Makes the current parameters the anchor that [`Net::train_step_proximal`] pulls towards
    /// (FedProx: the model the task started from). Copies them; after the first call the
    /// buffers are reused.
    pub fn set_anchor(&mut self) {
        for l in &mut self.layers {
            l.anchor_weight.clear();
            l.anchor_weight.extend_from_slice(&l.weight);
            l.anchor_bias.clear();
            l.anchor_bias.extend_from_slice(&l.bias);
        }
    }

    /// `(rows, cols)` of layer `i`'s weight matrix.
    pub fn weight_shape(&self, i: usize) -> (usize, usize) {
        (self.layers[i].shape.fan_in(), self.layers[i].shape.fan_out())
    }
}
