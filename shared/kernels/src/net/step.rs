//! Running a [`Net`]: the forward pass, the fused backward pass and SGD (proximal) update,
//! training steps, scoring and logits.

use super::layer::{Layer, Shape};
use super::{Net, NetError, Scores, conv_winograd};
use crate::conv::{self, Geometry};
use crate::gemm::{Accumulate, MatMut, MatRef, matmul};
use crate::winograd::{self, ConvAlgorithm};

impl Net {
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
                ws.winners[i].resize(batch * l.shape.output(), 0);
                if winograd_applies(self.conv_algorithm, g) {
                    let per_chunk = conv_winograd::chunk(g, out_channels, self.chunk_bytes).min(batch);
                    conv_winograd::reserve(&mut ws.wino, g, out_channels, per_chunk);
                    conv = conv.max(per_chunk * g.h * g.w * out_channels);
                    continue;
                }
                let rows = chunk(g, self.chunk_bytes).min(batch) * g.h * g.w;
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
                Shape::Conv { g, out_channels } if winograd_applies(self.conv_algorithm, g) => {
                    let per_chunk = conv_winograd::chunk(g, out_channels, self.chunk_bytes);
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
                Shape::Conv { g, out_channels } if winograd_applies(self.conv_algorithm, g) => {
                    let per_chunk = conv_winograd::chunk(g, out_channels, self.chunk_bytes);
                    conv_winograd::backward(
                        l,
                        (g, out_channels),
                        batch,
                        per_chunk,
                        (input, grad, &ws.winners[i]),
                        (i > 0).then_some(&mut next[..]),
                        &mut ws.conv,
                        &mut ws.wino,
                        &mut ws.bias_grad,
                        (learning_rate, prox),
                        threads,
                    )?;
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
pub(super) const CHUNK_BYTES: usize = 2 << 20;

/// Images per chunk for a convolution of geometry `g`.
fn chunk(g: Geometry, bytes: usize) -> usize {
    (bytes / (g.h * g.w * g.patch() * 4)).max(1)
}

/// Whether a convolution of geometry `g` runs Winograd under `algorithm`.
fn winograd_applies(algorithm: ConvAlgorithm, g: Geometry) -> bool {
    algorithm == ConvAlgorithm::Winograd && winograd::applies(g)
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

/// `bias -= lr * column sums of grad` (rows of `bias.len()`).
fn sgd_bias(bias: &mut [f32], grad: &[f32], learning_rate: f32, sums: &mut Vec<f32>) {
    sums.clear();
    sums.resize(bias.len(), 0.0);
    for row in grad.chunks_exact(bias.len()) {
        sums.iter_mut().zip(row).for_each(|(s, g)| *s += g);
    }
    bias.iter_mut().zip(sums.iter()).for_each(|(b, s)| *b -= learning_rate * s);
}
