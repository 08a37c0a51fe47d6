//! Running a [`Net`]: the forward pass, training steps (the backward pass is
//! [`super::backward`]'s, the batch split [`super::parallel`]'s), scoring and logits.

use super::backward::{Fused, backward};
use super::layer::{Layer, Shape, Workspace};
use super::{Net, NetError, Scores, conv_winograd, parallel};
use crate::conv::{self, Geometry};
use crate::gemm::{Accumulate, MatMut, MatRef, Threads, matmul};
use crate::winograd::{self, ConvAlgorithm};

/// What a pass over a workspace needs to know besides the layers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Elements of one input image.
    pub(super) input_len: usize,
    pub(super) conv_algorithm: ConvAlgorithm,
    pub(super) chunk_bytes: usize,
    /// The GEMMs' threads.
    pub(super) threads: Threads,
}

/// Sizes `ws` for batches of up to `batch` examples (grows only).
pub(super) fn reserve(layers: &[Layer], ws: &mut Workspace, plan: Plan, batch: usize) {
    if batch <= ws.capacity {
        return;
    }
    let n = layers.len();
    ws.capacity = batch;
    ws.acts.resize_with(n + 1, Vec::new);
    ws.winners.resize_with(n, Vec::new);
    ws.acts[0].resize(batch * plan.input_len, 0.0);
    let (mut cols, mut conv, mut cols_grad, mut grad) = (0, 0, 0, plan.input_len);
    for (i, l) in layers.iter().enumerate() {
        ws.acts[i + 1].resize(batch * l.shape.output(), 0.0);
        grad = grad.max(l.shape.output());
        if let Shape::Conv { g, out_channels } = l.shape {
            ws.winners[i].resize(batch * l.shape.output(), 0);
            if winograd_applies(plan.conv_algorithm, g) {
                let per_chunk = conv_winograd::chunk(g, out_channels, plan.chunk_bytes).min(batch);
                conv_winograd::reserve(&mut ws.wino, g, out_channels, per_chunk);
                conv = conv.max(per_chunk * g.h * g.w * out_channels);
                continue;
            }
            let rows = chunk(g, plan.chunk_bytes).min(batch) * g.h * g.w;
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

/// Forward pass of `batch` examples already in `ws.acts[0]`; logits end in `ws.acts[last]`.
pub(super) fn forward(layers: &[Layer], ws: &mut Workspace, plan: Plan, batch: usize) -> Result<(), NetError> {
    let threads = plan.threads;
    for (i, l) in layers.iter().enumerate() {
        let (before, after) = ws.acts.split_at_mut(i + 1);
        let (input, output) = (&before[i], &mut after[0]);
        match l.shape {
            Shape::Conv { g, out_channels } if winograd_applies(plan.conv_algorithm, g) => {
                let per_chunk = conv_winograd::chunk(g, out_channels, plan.chunk_bytes);
                conv_winograd::forward(
                    l,
                    (g, out_channels),
                    batch,
                    per_chunk,
                    input,
                    output,
                    &mut ws.winners[i],
                    &mut ws.conv,
                    &mut ws.wino,
                    threads,
                )?;
            }
            Shape::Conv { g, out_channels } => {
                let per = l.shape.output();
                for (b0, nb) in chunks(batch, chunk(g, plan.chunk_bytes)) {
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

/// Softmax cross-entropy of the `labels.len()` examples whose logits are in `ws.acts[layers]`:
/// writes `d(loss)/d(logits) = (softmax - onehot) / total` into `ws.grad[0]` (the gradient of
/// the mean loss over a batch of `total` examples, of which these are some) and returns the
/// examples' summed loss.
pub(super) fn loss_gradient(ws: &mut Workspace, layers: usize, classes: usize, labels: &[u8], total: usize) -> f64 {
    let batch = labels.len();
    let (logits, grad) = (&ws.acts[layers][..batch * classes], &mut ws.grad[0][..batch * classes]);
    let mut loss = 0.0f64;
    for ((z, g), &y) in logits.chunks_exact(classes).zip(grad.chunks_exact_mut(classes)).zip(labels) {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
        loss += (sum.ln() + max - z[y as usize]) as f64;
        for (gj, &zj) in g.iter_mut().zip(z) {
            *gj = (zj - max).exp() / sum / total as f32;
        }
        g[y as usize] -= 1.0 / total as f32;
    }
    loss
}

impl Net {
    /// How this net's passes run, with the net's own GEMM threads.
    pub(super) fn plan(&self) -> Plan {
        Plan {
            input_len: self.input_len(),
            conv_algorithm: self.conv_algorithm,
            chunk_bytes: self.chunk_bytes,
            threads: self.threads,
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

    /// One SGD step on a minibatch: `images` (`labels.len()` NHWC images, `input_len()` values
    /// each) and their labels. Returns the batch's mean cross-entropy before the update.
    ///
    /// With [`Threads::Rayon`] asking for `T > 1` threads and a batch of at least 2, the batch
    /// is split into `min(T, batch)` chunks trained side by side ([`super::parallel`]); the
    /// result equals the one-thread step's up to float rounding, and is the same run to run.
    pub fn train_step(&mut self, images: &[f32], labels: &[u8], learning_rate: f32) -> Result<f32, NetError> {
        self.train_step_proximal(images, labels, learning_rate, 0.0)
    }

    /// One SGD step on the loss plus the proximal term `mu/2 * ||params - anchor||^2` (FedProx):
    /// every weight and bias becomes `w - lr * (grad + mu * (w - anchor))`, with the gradient and
    /// the proximal term both at the pre-step `w`. The anchor is what [`Net::set_anchor`] last
    /// copied; `mu = 0` is exactly [`Net::train_step`] and needs none. Returns the batch's mean
    /// cross-entropy (without the proximal term) before the update. Threads as
    /// [`Net::train_step`].
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
        let split = parallel::split_for(self, batch, batch);
        if split > 1 {
            return parallel::train_step(self, images, labels, (learning_rate, mu), split);
        }
        let plan = self.plan();
        reserve(&self.layers, &mut self.ws, plan, batch);
        self.ws.acts[0][..images.len()].copy_from_slice(images);
        forward(&self.layers, &mut self.ws, plan, batch)?;
        let (n, classes) = (self.layers.len(), self.classes());
        let loss = loss_gradient(&mut self.ws, n, classes, labels, batch);
        let mut sink = Fused { layers: &mut self.layers, learning_rate, prox: learning_rate * mu };
        backward(&mut sink, n, &mut self.ws, plan, batch)?;
        Ok((loss / batch as f64) as f32)
    }

    /// Logits of `labels.len()` images (no training), scored against the labels: summed
    /// cross-entropy and the count classified correctly. Processes any number of examples in
    /// chunks of at most `chunk`; on `T > 1` threads the chunks are dealt out over the threads
    /// when there are several (each chunk's GEMMs split by rows when there is one). The result
    /// does not depend on the thread count.
    pub fn score(&mut self, images: &[f32], labels: &[u8], chunk: usize) -> Result<Scores, NetError> {
        self.check_batch(images, labels)?;
        let chunk = chunk.max(1);
        let mut losses = vec![0.0f64; labels.len()];
        let split = parallel::split_for(self, labels.len(), labels.len().div_ceil(chunk));
        let correct = if split > 1 {
            parallel::score(self, images, labels, chunk, split, &mut losses)?
        } else {
            let (plan, classes) = (self.plan(), self.classes());
            score_chunks(&self.layers, &mut self.ws, plan, classes, (images, labels), chunk, &mut losses)?
        };
        // Summed in example order whichever thread scored which chunk.
        let loss_sum = losses.iter().fold(0.0f64, |s, &l| s + l);
        Ok(Scores { loss_sum, correct, examples: labels.len() })
    }

    /// Logits of `images` (a whole number of images), row by row into `out`.
    pub fn logits(&mut self, images: &[f32], out: &mut Vec<f32>) -> Result<(), NetError> {
        let len = self.input_len();
        if !images.len().is_multiple_of(len) {
            return Err(NetError::Batch(format!("{} values is not a whole number of images", images.len())));
        }
        let batch = images.len() / len;
        let plan = self.plan();
        reserve(&self.layers, &mut self.ws, plan, batch);
        self.ws.acts[0][..images.len()].copy_from_slice(images);
        forward(&self.layers, &mut self.ws, plan, batch)?;
        out.clear();
        out.extend_from_slice(&self.ws.acts[self.layers.len()][..batch * self.classes()]);
        Ok(())
    }
}

/// Bytes of im2col columns a convolution builds at a time: a chunk of the batch whose columns
/// stay in L2 (the CNN's second layer: 627 KB an image).
pub(super) const CHUNK_BYTES: usize = 2 << 20;

/// Images per chunk for a convolution of geometry `g`.
pub(super) fn chunk(g: Geometry, bytes: usize) -> usize {
    (bytes / (g.h * g.w * g.patch() * 4)).max(1)
}

/// Whether a convolution of geometry `g` runs Winograd under `algorithm`.
pub(super) fn winograd_applies(algorithm: ConvAlgorithm, g: Geometry) -> bool {
    algorithm == ConvAlgorithm::Winograd && winograd::applies(g)
}

/// Scores `images`/`labels` in chunks of `chunk` on `ws` (each chunk's GEMMs on `plan`'s
/// threads): each example's cross-entropy into `losses` (as long as `labels`), and the count
/// classified correctly.
pub(super) fn score_chunks(
    layers: &[Layer],
    ws: &mut Workspace,
    plan: Plan,
    classes: usize,
    (images, labels): (&[f32], &[u8]),
    chunk: usize,
    losses: &mut [f64],
) -> Result<usize, NetError> {
    let (len, n) = (plan.input_len, layers.len());
    reserve(layers, ws, plan, chunk.min(labels.len()));
    let mut correct = 0;
    for ((imgs, ys), out) in images.chunks(chunk * len).zip(labels.chunks(chunk)).zip(losses.chunks_mut(chunk)) {
        ws.acts[0][..imgs.len()].copy_from_slice(imgs);
        forward(layers, ws, plan, ys.len())?;
        for ((z, &y), loss) in ws.acts[n].chunks_exact(classes).zip(ys).zip(out) {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
            *loss = (sum.ln() + max - z[y as usize]) as f64;
            let best = z.iter().enumerate().fold(0, |b, (j, &v)| if v > z[b] { j } else { b });
            correct += usize::from(best == y as usize);
        }
    }
    Ok(correct)
}

/// `(first, count)` of consecutive chunks of at most `per` covering `0..batch`.
pub(super) fn chunks(batch: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch).step_by(per).map(move |b0| (b0, per.min(batch - b0)))
}

/// The proximal part of a step: every weight and bias `w -= prox * (w - anchor)`, where
/// `prox = lr * mu` (nothing when it is 0). Called before the layer's gradient update, while
/// its parameters are still the pre-step ones.
pub(super) fn proximal(l: &mut Layer, prox: f32) {
    if prox == 0.0 {
        return;
    }
    for (w, a) in [(&mut l.weight, &l.anchor_weight), (&mut l.bias, &l.anchor_bias)] {
        w.iter_mut().zip(a).for_each(|(w, a)| *w -= prox * (*w - a));
    }
}
