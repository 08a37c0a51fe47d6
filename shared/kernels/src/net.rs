//! A small feed-forward classifier trained by fused minibatch SGD: "same" convolutions with
//! ReLU and 2x2 max-pooling, then dense layers, softmax cross-entropy.
//!
//! One [`Net`] owns its parameters and every buffer a step needs, allocated for the largest
//! batch seen and reused: a simulator worker keeps one for its whole life. A training step is
//! forward (convolutions as one whole-batch im2col + GEMM each, bias, ReLU and pooling in one
//! pass), the loss gradient, then backward layer by layer, where each layer first passes the
//! gradient to its input and then updates its own weights in the same GEMM that computes their
//! gradient (`W := W - lr * X^T dY`): no gradient tensor is ever stored.
//!
//! A proximal step (FedProx, [`Net::train_step_proximal`]) also pulls every parameter towards
//! an anchor ([`Net::set_anchor`]): `W := W - lr * (grad + mu * (W - anchor))`, both terms at
//! the pre-step weights. Each layer applies `mu`'s part after it has passed the gradient to its
//! input and before its weight GEMM, which reads only activations and output gradients, so the
//! step is exactly that formula (up to float rounding) at one extra pass over the parameters.
//!
//! Activations are NHWC. Weights are `[fan_in, fan_out]` row-major: a convolution's rows are
//! `(ky * k + kx) * c_in + ci` (the im2col order of [`crate::conv`]), a dense layer after a
//! convolution reads its input in NHWC order.

use thiserror::Error;

use crate::conv::{self, Geometry};
use crate::gemm::{Accumulate, MatMut, MatRef, MatmulError, Threads, matmul};

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

/// A layer with its shapes resolved.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Conv { g: Geometry, out_channels: usize },
    Dense { inputs: usize, outputs: usize, relu: bool },
}

impl Shape {
    fn fan_in(&self) -> usize {
        match *self {
            Shape::Conv { g, .. } => g.patch(),
            Shape::Dense { inputs, .. } => inputs,
        }
    }

    fn fan_out(&self) -> usize {
        match *self {
            Shape::Conv { out_channels, .. } => out_channels,
            Shape::Dense { outputs, .. } => outputs,
        }
    }

    /// Elements of one example's output.
    fn output(&self) -> usize {
        match *self {
            Shape::Conv { g, out_channels } => (g.h / 2) * (g.w / 2) * out_channels,
            Shape::Dense { outputs, .. } => outputs,
        }
    }
}

struct Layer {
    shape: Shape,
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The proximal anchor of `weight` and `bias` (empty until [`Net::set_anchor`]).
    anchor_weight: Vec<f32>,
    anchor_bias: Vec<f32>,
}

/// Buffers for batches of up to `capacity` examples.
#[derive(Default)]
struct Workspace {
    capacity: usize,
    /// `acts[0]` the input, `acts[i + 1]` layer `i`'s output (after ReLU and pooling).
    acts: Vec<Vec<f32>>,
    /// The im2col matrix of one chunk of a convolution's batch.
    cols: Vec<f32>,
    /// Per layer: the pooling winners of a convolution (empty for dense layers).
    winners: Vec<Vec<u8>>,
    /// A chunk's pre-pooling convolution output, then its gradient.
    conv: Vec<f32>,
    /// Column-matrix gradient of a chunk's convolution input.
    cols_grad: Vec<f32>,
    /// Activation gradients, ping-ponged between layers.
    grad: [Vec<f32>; 2],
    /// Column sums of a layer's output gradient (its bias gradient).
    bias_grad: Vec<f32>,
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

/// A network with its parameters and buffers. See the module docs.
pub struct Net {
    height: usize,
    width: usize,
    channels: usize,
    layers: Vec<Layer>,
    threads: Threads,
    chunk_bytes: usize,
    ws: Workspace,
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
            ws: Workspace::default(),
        })
    }

    /// How many threads each GEMM may use.
    pub fn set_threads(&mut self, threads: Threads) {
        self.threads = threads;
    }

    /// How many bytes of im2col columns a convolution builds at a time (default 2 MiB; the
    /// results do not depend on it beyond float rounding).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
        self.ws = Workspace::default();
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

    fn reserve(&mut self, batch: usize) {
        if batch <= self.ws.capacity {
            return;
        }
        let n = self.layers.len();
        let ws = &mut self.ws;
        ws.capacity = batch;
        ws.acts.resize_with(n + 1, Vec::new);
        ws.winners.resize_with(n, Vec::new);
        ws.acts[0].resize(batch * self.height * self.width * self.channels, 0.0);
        let (mut cols, mut conv, mut cols_grad, mut grad) = (0, 0, 0, self.height * self.width * self.channels);
        for (i, l) in self.layers.iter().enumerate() {
            ws.acts[i + 1].resize(batch * l.shape.output(), 0.0);
            grad = grad.max(l.shape.output());
            if let Shape::Conv { g, out_channels } = l.shape {
                let rows = chunk(g, self.chunk_bytes).min(batch) * g.h * g.w;
                ws.winners[i].resize(batch * l.shape.output(), 0);
                cols = cols.max(rows * g.patch());
                conv = conv.max(rows * out_channels);
                if i > 0 {
                    cols_grad = cols_grad.max(rows * g.patch());
                }
            }
        }
        ws.cols.resize(cols, 0.0);
        ws.conv.resize(conv, 0.0);
        ws.cols_grad.resize(cols_grad, 0.0);
        for g in &mut ws.grad {
            g.resize(batch * grad, 0.0);
        }
    }

    fn check_batch(&self, images: &[f32], labels: &[u8]) -> Result<usize, NetError> {
        let batch = labels.len();
        if images.len() != batch * self.input_len() {
            return Err(NetError::Batch(format!(
                "{} image values for {batch} labels of {} each",
                images.len(),
                self.input_len()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&y| y as usize >= self.classes()) {
            return Err(NetError::Batch(format!("label {bad} for {} classes", self.classes())));
        }
        Ok(batch)
    }

    /// Forward pass of `batch` examples already in `acts[0]`; logits end in `acts[last]`.
    fn forward(&mut self, batch: usize) -> Result<(), NetError> {
        let threads = self.threads;
        let ws = &mut self.ws;
        for (i, l) in self.layers.iter().enumerate() {
            let (before, after) = ws.acts.split_at_mut(i + 1);
            let (input, output) = (&before[i], &mut after[0]);
            match l.shape {
                Shape::Conv { g, out_channels } => {
                    let per = l.shape.output();
                    for (b0, nb) in chunks(batch, chunk(g, self.chunk_bytes)) {
                        let rows = nb * g.h * g.w;
                        conv::im2col(g, nb, &input[b0 * g.image()..], &mut ws.cols);
                        matmul(
                            MatMut::new(&mut ws.conv, rows, out_channels),
                            MatRef::new(&ws.cols, rows, g.patch()),
                            MatRef::new(&l.weight, g.patch(), out_channels),
                            Accumulate::Overwrite,
                            1.0,
                            threads,
                        )?;
                        conv::relu_pool(
                            g.h,
                            g.w,
                            out_channels,
                            nb,
                            &ws.conv,
                            &l.bias,
                            &mut output[b0 * per..],
                            &mut ws.winners[i][b0 * per..],
                        );
                    }
                }
                Shape::Dense { inputs, outputs, relu } => {
                    let out = &mut output[..batch * outputs];
                    matmul(
                        MatMut::new(out, batch, outputs),
                        MatRef::new(input, batch, inputs),
                        MatRef::new(&l.weight, inputs, outputs),
                        Accumulate::Overwrite,
                        1.0,
                        threads,
                    )?;
                    for row in out.chunks_exact_mut(outputs) {
                        row.iter_mut().zip(&l.bias).for_each(|(x, b)| *x += b);
                        if relu {
                            row.iter_mut().for_each(|x| *x = x.max(0.0));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One SGD step on a minibatch: `images` (`labels.len()` NHWC images, `input_len()` values
    /// each) and their labels. Returns the batch's mean cross-entropy before the update.
    pub fn train_step(&mut self, images: &[f32], labels: &[u8], learning_rate: f32) -> Result<f32, NetError> {
        self.train_step_proximal(images, labels, learning_rate, 0.0)
    }

    /// One SGD step on the loss plus the proximal term `mu/2 * ||params - anchor||^2` (FedProx):
    /// every weight and bias becomes `w - lr * (grad + mu * (w - anchor))`, with the gradient and
    /// the proximal term both at the pre-step `w`. The anchor is what [`Net::set_anchor`] last
    /// copied; `mu = 0` is exactly [`Net::train_step`] and needs none. Returns the batch's mean
    /// cross-entropy (without the proximal term) before the update.
    pub fn train_step_proximal(
        &mut self,
        images: &[f32],
        labels: &[u8],
        learning_rate: f32,
        mu: f32,
    ) -> Result<f32, NetError> {
        if mu != 0.0
            && self
                .layers
                .iter()
                .any(|l| l.anchor_weight.len() != l.weight.len() || l.anchor_bias.len() != l.bias.len())
        {
            return Err(NetError::NoAnchor);
        }
        let batch = self.check_batch(images, labels)?;
        if batch == 0 {
            return Ok(0.0);
        }
        self.reserve(batch);
        self.ws.acts[0][..images.len()].copy_from_slice(images);
        self.forward(batch)?;
        let n = self.layers.len();
        let classes = self.classes();
        // Softmax cross-entropy: mean loss, and d(loss)/d(logits) = (softmax - onehot) / batch.
        let mut loss = 0.0f64;
        {
            let (logits, grad) = (&self.ws.acts[n][..batch * classes], &mut self.ws.grad[0][..batch * classes]);
            for ((z, g), &y) in logits.chunks_exact(classes).zip(grad.chunks_exact_mut(classes)).zip(labels) {
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
                loss += (sum.ln() + max - z[y as usize]) as f64;
                for (gj, &zj) in g.iter_mut().zip(z) {
                    *gj = (zj - max).exp() / sum / batch as f32;
                }
                g[y as usize] -= 1.0 / batch as f32;
            }
        }
        self.backward(batch, learning_rate, learning_rate * mu)?;
        Ok((loss / batch as f64) as f32)
    }

    /// Backward from the logits' gradient in `grad[0]`, updating every layer's parameters
    /// (with the proximal pull `prox = lr * mu` towards the anchor when it is not 0).
    fn backward(&mut self, batch: usize, learning_rate: f32, prox: f32) -> Result<(), NetError> {
        let threads = self.threads;
        let ws = &mut self.ws;
        let mut cur = 0; // which grad buffer holds d(loss)/d(output of layer i)
        for (i, l) in self.layers.iter_mut().enumerate().rev() {
            let [g0, g1] = &mut ws.grad;
            let (grad, next) = if cur == 0 { (g0, g1) } else { (g1, g0) };
            let input = &ws.acts[i];
            match l.shape {
                Shape::Dense { inputs, outputs, relu } => {
                    let grad = &mut grad[..batch * outputs];
                    if relu {
                        for (g, &a) in grad.iter_mut().zip(&ws.acts[i + 1]) {
                            if a <= 0.0 {
                                *g = 0.0;
                            }
                        }
                    }
                    if i > 0 {
                        matmul(
                            MatMut::new(next, batch, inputs),
                            MatRef::new(grad, batch, outputs),
                            MatRef::new(&l.weight, inputs, outputs).t(),
                            Accumulate::Overwrite,
                            1.0,
                            threads,
                        )?;
                    }
                    proximal(l, prox);
                    matmul(
                        MatMut::new(&mut l.weight, inputs, outputs),
                        MatRef::new(input, batch, inputs).t(),
                        MatRef::new(grad, batch, outputs),
                        Accumulate::Scaled(1.0),
                        -learning_rate,
                        threads,
                    )?;
                    sgd_bias(&mut l.bias, grad, learning_rate, &mut ws.bias_grad);
                }
                Shape::Conv { g, out_channels } => {
                    let per = l.shape.output();
                    let winners = &ws.winners[i];
                    // First the input's gradient, with the weights as they were in the forward
                    // pass; then the weights, chunk by chunk (the columns rebuilt per chunk, so
                    // they stay in cache and are never stored for the whole batch).
                    if i > 0 {
                        for (b0, nb) in chunks(batch, chunk(g, self.chunk_bytes)) {
                            let rows = nb * g.h * g.w;
                            let conv_grad = &mut ws.conv[..rows * out_channels];
                            let (grad, winners) = (&grad[b0 * per..], &winners[b0 * per..]);
                            conv::relu_pool_backward(g.h, g.w, out_channels, nb, grad, winners, conv_grad);
                            matmul(
                                MatMut::new(&mut ws.cols_grad, rows, g.patch()),
                                MatRef::new(conv_grad, rows, out_channels),
                                MatRef::new(&l.weight, g.patch(), out_channels).t(),
                                Accumulate::Overwrite,
                                1.0,
                                threads,
                            )?;
                            conv::col2im(g, nb, &ws.cols_grad, &mut next[b0 * g.image()..]);
                        }
                    }
                    proximal(l, prox);
                    for (b0, nb) in chunks(batch, chunk(g, self.chunk_bytes)) {
                        let rows = nb * g.h * g.w;
                        let conv_grad = &mut ws.conv[..rows * out_channels];
                        let (grad, winners) = (&grad[b0 * per..], &winners[b0 * per..]);
                        conv::relu_pool_backward(g.h, g.w, out_channels, nb, grad, winners, conv_grad);
                        conv::im2col(g, nb, &input[b0 * g.image()..], &mut ws.cols);
                        matmul(
                            MatMut::new(&mut l.weight, g.patch(), out_channels),
                            MatRef::new(&ws.cols, rows, g.patch()).t(),
                            MatRef::new(conv_grad, rows, out_channels),
                            Accumulate::Scaled(1.0),
                            -learning_rate,
                            threads,
                        )?;
                        sgd_bias(&mut l.bias, conv_grad, learning_rate, &mut ws.bias_grad);
                    }
                }
            }
            cur = 1 - cur;
        }
        Ok(())
    }

    /// Logits of `labels.len()` images (no training), scored against the labels: summed
    /// cross-entropy and the count classified correctly. Processes any number of examples in
    /// chunks of at most `chunk`.
    pub fn score(&mut self, images: &[f32], labels: &[u8], chunk: usize) -> Result<Scores, NetError> {
        self.check_batch(images, labels)?;
        let (len, classes, n) = (self.input_len(), self.classes(), self.layers.len());
        let chunk = chunk.max(1);
        self.reserve(chunk.min(labels.len()));
        let mut scores = Scores::default();
        for (imgs, ys) in images.chunks(chunk * len).zip(labels.chunks(chunk)) {
            self.ws.acts[0][..imgs.len()].copy_from_slice(imgs);
            self.forward(ys.len())?;
            for (z, &y) in self.ws.acts[n].chunks_exact(classes).zip(ys) {
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
                scores.loss_sum += (sum.ln() + max - z[y as usize]) as f64;
                let best = z.iter().enumerate().fold(0, |b, (j, &v)| if v > z[b] { j } else { b });
                scores.correct += usize::from(best == y as usize);
            }
            scores.examples += ys.len();
        }
        Ok(scores)
    }

    /// Logits of `images` (a whole number of images), row by row into `out`.
    pub fn logits(&mut self, images: &[f32], out: &mut Vec<f32>) -> Result<(), NetError> {
        let len = self.input_len();
        if !images.len().is_multiple_of(len) {
            return Err(NetError::Batch(format!("{} values is not a whole number of images", images.len())));
        }
        let batch = images.len() / len;
        self.reserve(batch);
        self.ws.acts[0][..images.len()].copy_from_slice(images);
        self.forward(batch)?;
        out.clear();
        out.extend_from_slice(&self.ws.acts[self.layers.len()][..batch * self.classes()]);
        Ok(())
    }
}

/// Bytes of im2col columns a convolution builds at a time: a chunk of the batch whose columns
/// stay in L2 (the CNN's second layer: 627 KB an image).
const CHUNK_BYTES: usize = 2 << 20;

/// Images per chunk for a convolution of geometry `g`.
fn chunk(g: Geometry, bytes: usize) -> usize {
    (bytes / (g.h * g.w * g.patch() * 4)).max(1)
}

/// `(first, count)` of consecutive chunks of at most `per` covering `0..batch`.
fn chunks(batch: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch).step_by(per).map(move |b0| (b0, per.min(batch - b0)))
}

/// The proximal part of a step: every weight and bias `w -= prox * (w - anchor)`, where
/// `prox = lr * mu` (nothing when it is 0). Called before the layer's gradient update, while
/// its parameters are still the pre-step ones.
fn proximal(l: &mut Layer, prox: f32) {
    if prox == 0.0 {
        return;
    }
    for (w, a) in [(&mut l.weight, &l.anchor_weight), (&mut l.bias, &l.anchor_bias)] {
        w.iter_mut().zip(a).for_each(|(w, a)| *w -= prox * (*w - a));
    }
}

/// `bias -= lr * column sums of grad` (rows of `bias.len()`).
fn sgd_bias(bias: &mut [f32], grad: &[f32], learning_rate: f32, sums: &mut Vec<f32>) {
    sums.clear();
    sums.resize(bias.len(), 0.0);
    for row in grad.chunks_exact(bias.len()) {
        sums.iter_mut().zip(row).for_each(|(s, g)| *s += g);
    }
    bias.iter_mut().zip(sums.iter()).for_each(|(b, s)| *b -= learning_rate * s);
}
