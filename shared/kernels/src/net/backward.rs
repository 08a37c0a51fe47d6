//! The backward pass, layer by layer from the logits' gradient, and where each layer's weight
//! and bias gradients go ([`Sink`]): into the parameters themselves, the fused SGD (proximal)
//! update of a one-thread step ([`Fused`]), or, for one chunk of a batch-split step
//! ([`Gradients`]), a convolution's into gradient buffers ([`super::parallel`] sums the
//! chunks' and applies them) and a dense layer's not computed at all: its input and output
//! gradient rows are kept, and one GEMM over the whole batch's rows updates it afterwards.
//!
//! Each layer first passes the gradient to its input, reading its weights as they were in the
//! forward pass, and only then asks the sink where its weight gradient goes: a fused sink may
//! change the weights from that point on.

use super::layer::{Grad, Layer, Shape, Workspace};
use super::step::{Plan, chunk, chunks, proximal, winograd_applies};
use super::{NetError, conv_winograd};
use crate::conv;
use crate::gemm::{Accumulate, MatMut, MatRef, Threads, matmul};

/// Where one layer's gradients go: `weight += scale * dW` and `bias += scale * db`, or, when
/// `fresh` (the buffers hold a previous step's values), `weight = scale * dW` and likewise.
pub(super) struct Dst<'a> {
    pub(super) weight: &'a mut [f32],
    pub(super) bias: &'a mut [f32],
    pub(super) scale: f32,
    pub(super) fresh: bool,
}

/// The layers a backward pass reads, and the destination of each layer's gradients.
pub(super) trait Sink {
    /// Layer `i` with its pre-step weights.
    fn layer(&self, i: usize) -> &Layer;
    /// Where convolution `i`'s gradients go. Called once per pass, after its input gradient.
    fn dst(&mut self, i: usize) -> Dst<'_>;
    /// Where dense layer `i`'s gradients go, given the `input` rows its weight gradient
    /// multiplies and the output gradient rows `grad`; `None` when the sink keeps the rows
    /// instead. Called once per pass, after the layer's input gradient.
    fn dense(&mut self, i: usize, input: &[f32], grad: &[f32]) -> Option<Dst<'_>>;
    /// Dense layer `i` and its `(learning rate, lr * mu)` when the sink updates the weights in
    /// place and lets [`backward`] interleave the update with the input gradient, block by
    /// block of the weight's rows (one pass over a large weight instead of two).
    fn fused_dense(&mut self, _i: usize) -> Option<(&mut Layer, f32, f32)> {
        None
    }
}

/// Weights below this many floats are updated after their input gradient, not interleaved
/// with it: they stay in cache between the two passes anyway.
const INTERLEAVE_FLOATS: usize = 1 << 16;

/// Rows of a dense weight per interleaved block: 32 rows of the CNN's 512-wide layer are 64 KB
/// (in L2 between the block's two GEMMs), and a 32-row product reads the output gradient in
/// place rather than packing it.
const INTERLEAVE_ROWS: usize = 32;

/// The one-thread step: `W := W - prox * (W - anchor) - lr * dW`, in the weight-gradient GEMM.
pub(super) struct Fused<'a> {
    pub(super) layers: &'a mut [Layer],
    pub(super) learning_rate: f32,
    /// `lr * mu` (see [`proximal`]).
    pub(super) prox: f32,
}

impl Sink for Fused<'_> {
    fn layer(&self, i: usize) -> &Layer {
        &self.layers[i]
    }

    fn dst(&mut self, i: usize) -> Dst<'_> {
        let l = &mut self.layers[i];
        proximal(l, self.prox);
        Dst { weight: &mut l.weight, bias: &mut l.bias, scale: -self.learning_rate, fresh: false }
    }

    fn dense(&mut self, i: usize, _: &[f32], _: &[f32]) -> Option<Dst<'_>> {
        Some(self.dst(i))
    }

    fn fused_dense(&mut self, i: usize) -> Option<(&mut Layer, f32, f32)> {
        Some((&mut self.layers[i], self.learning_rate, self.prox))
    }
}

/// A dense layer's input gradient `next = grad * W^T` and its fused update `W := W - prox *
/// (W - anchor) - lr * input^T * grad`, block by block of `W`'s rows: each block's slice of
/// the input gradient from the block as the forward pass saw it, then the block's update. The
/// same products per element as the two whole-matrix GEMMs, so the same results bit for bit.
#[allow(clippy::too_many_arguments, reason = "one layer's pass over disjoint buffers")]
fn interleaved_dense(
    l: &mut Layer,
    (learning_rate, prox): (f32, f32),
    (inputs, outputs, batch): (usize, usize, usize),
    input: &[f32],
    grad: &[f32],
    next: &mut [f32],
    block: &mut Vec<f32>,
    sums: &mut Vec<f32>,
) -> Result<(), NetError> {
    let (x, dy) = (MatRef::new(input, batch, inputs), MatRef::new(grad, batch, outputs));
    for r0 in (0..inputs).step_by(INTERLEAVE_ROWS) {
        let rows = INTERLEAVE_ROWS.min(inputs - r0);
        let w = &mut l.weight[r0 * outputs..(r0 + rows) * outputs];
        // Borrowed scratch: grown, never shrunk (its owner sized it for its own use).
        if block.len() < batch * rows {
            block.resize(batch * rows, 0.0);
        }
        let block = &mut block[..batch * rows];
        matmul(
            MatMut::new(block, batch, rows),
            dy,
            MatRef::new(w, rows, outputs).t(),
            Accumulate::Overwrite,
            1.0,
            Threads::One,
        )?;
        for (dst, src) in next.chunks_exact_mut(inputs).zip(block.chunks_exact(rows)) {
            dst[r0..r0 + rows].copy_from_slice(src);
        }
        if prox != 0.0 {
            let a = &l.anchor_weight[r0 * outputs..(r0 + rows) * outputs];
            w.iter_mut().zip(a).for_each(|(w, a)| *w -= prox * (*w - a));
        }
        matmul(
            MatMut::new(w, rows, outputs),
            x.columns(r0, rows).t(),
            dy,
            Accumulate::Scaled(1.0),
            -learning_rate,
            Threads::One,
        )?;
    }
    if prox != 0.0 {
        l.bias.iter_mut().zip(&l.anchor_bias).for_each(|(b, a)| *b -= prox * (*b - a));
    }
    add_column_sums(&mut l.bias, grad, -learning_rate, false, sums);
    Ok(())
}

/// One chunk of a batch-split step: the layers are shared and read-only; each convolution's
/// gradient (of the whole batch's mean loss, restricted to the chunk's examples) overwrites its
/// buffer in `grads`; each dense layer's input and output gradient rows are copied into the
/// chunk's rows of the batch-wide `rows[i]`.
pub(super) struct Gradients<'a> {
    pub(super) layers: &'a [Layer],
    pub(super) grads: &'a mut [Grad],
    pub(super) rows: Vec<Option<Rows<'a>>>,
}

/// A chunk's share of a dense layer's batch-wide input rows and output gradient rows.
pub(super) struct Rows<'a> {
    pub(super) input: &'a mut [f32],
    pub(super) grad: &'a mut [f32],
}

impl Sink for Gradients<'_> {
    fn layer(&self, i: usize) -> &Layer {
        &self.layers[i]
    }

    fn dst(&mut self, i: usize) -> Dst<'_> {
        let g = &mut self.grads[i];
        Dst { weight: &mut g.weight, bias: &mut g.bias, scale: 1.0, fresh: true }
    }

    fn dense(&mut self, i: usize, input: &[f32], grad: &[f32]) -> Option<Dst<'_>> {
        match self.rows.get_mut(i) {
            Some(Some(rows)) => {
                rows.input.copy_from_slice(&input[..rows.input.len()]);
                rows.grad.copy_from_slice(&grad[..rows.grad.len()]);
                None
            }
            _ => Some(self.dst(i)),
        }
    }
}

/// Backward through `layers` layers from the logits' gradient in `ws.grad[0]` (`batch`
/// examples), each layer's gradients into `sink`.
pub(super) fn backward(
    sink: &mut impl Sink,
    layers: usize,
    ws: &mut Workspace,
    plan: Plan,
    batch: usize,
) -> Result<(), NetError> {
    let threads = plan.threads;
    let mut cur = 0; // which grad buffer holds d(loss)/d(output of layer i)
    for i in (0..layers).rev() {
        let [g0, g1] = &mut ws.grad;
        let (grad, next) = if cur == 0 { (g0, g1) } else { (g1, g0) };
        let input = &ws.acts[i];
        match sink.layer(i).shape {
            Shape::Dense { inputs, outputs, relu } => {
                let grad = &mut grad[..batch * outputs];
                if relu {
                    for (g, &a) in grad.iter_mut().zip(&ws.acts[i + 1]) {
                        if a <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
                let input = &input[..batch * inputs];
                if i > 0
                    && inputs * outputs >= INTERLEAVE_FLOATS
                    && let Some((l, lr, prox)) = sink.fused_dense(i)
                {
                    let next = &mut next[..batch * inputs];
                    let (block, sums) = (&mut ws.conv, &mut ws.bias_grad);
                    interleaved_dense(l, (lr, prox), (inputs, outputs, batch), input, grad, next, block, sums)?;
                    cur = 1 - cur;
                    continue;
                }
                if i > 0 {
                    matmul(
                        MatMut::new(next, batch, inputs),
                        MatRef::new(grad, batch, outputs),
                        MatRef::new(&sink.layer(i).weight, inputs, outputs).t(),
                        Accumulate::Overwrite,
                        1.0,
                        threads,
                    )?;
                }
                if let Some(d) = sink.dense(i, input, grad) {
                    matmul(
                        MatMut::new(d.weight, inputs, outputs),
                        MatRef::new(input, batch, inputs).t(),
                        MatRef::new(grad, batch, outputs),
                        if d.fresh { Accumulate::Overwrite } else { Accumulate::Scaled(1.0) },
                        d.scale,
                        threads,
                    )?;
                    add_column_sums(d.bias, grad, d.scale, d.fresh, &mut ws.bias_grad);
                }
            }
            Shape::Conv { g, out_channels } if winograd_applies(plan.conv_algorithm, g) => {
                let per_chunk = conv_winograd::chunk(g, out_channels, plan.chunk_bytes);
                conv_winograd::backward(
                    &sink.layer(i).weight,
                    (g, out_channels),
                    batch,
                    per_chunk,
                    (input, grad, &ws.winners[i]),
                    (i > 0).then_some(&mut next[..]),
                    &mut ws.conv,
                    &mut ws.wino,
                    &mut ws.bias_grad,
                    threads,
                )?;
                conv_winograd::apply(g.c * out_channels, &mut ws.wino, &ws.bias_grad, sink.dst(i));
            }
            Shape::Conv { g, out_channels } => {
                let per = (g.h / 2) * (g.w / 2) * out_channels;
                let winners = &ws.winners[i];
                // First the input's gradient, with the weights as they were in the forward
                // pass; then the weights, chunk by chunk (the columns rebuilt per chunk, so
                // they stay in cache and are never stored for the whole batch).
                if i > 0 {
                    let weight = &sink.layer(i).weight;
                    for (b0, nb) in chunks(batch, chunk(g, plan.chunk_bytes)) {
                        let rows = nb * g.h * g.w;
                        let conv_grad = &mut ws.conv[..rows * out_channels];
                        let (grad, winners) = (&grad[b0 * per..], &winners[b0 * per..]);
                        conv::relu_pool_backward(g.h, g.w, out_channels, nb, grad, winners, conv_grad);
                        matmul(
                            MatMut::new(&mut ws.cols_grad, rows, g.patch()),
                            MatRef::new(conv_grad, rows, out_channels),
                            MatRef::new(weight, g.patch(), out_channels).t(),
                            Accumulate::Overwrite,
                            1.0,
                            threads,
                        )?;
                        conv::col2im(g, nb, &ws.cols_grad, &mut next[b0 * g.image()..]);
                    }
                }
                let d = sink.dst(i);
                for (b0, nb) in chunks(batch, chunk(g, plan.chunk_bytes)) {
                    let rows = nb * g.h * g.w;
                    let conv_grad = &mut ws.conv[..rows * out_channels];
                    let (grad, winners) = (&grad[b0 * per..], &winners[b0 * per..]);
                    conv::relu_pool_backward(g.h, g.w, out_channels, nb, grad, winners, conv_grad);
                    conv::im2col(g, nb, &input[b0 * g.image()..], &mut ws.cols);
                    let first = d.fresh && b0 == 0;
                    matmul(
                        MatMut::new(&mut *d.weight, g.patch(), out_channels),
                        MatRef::new(&ws.cols, rows, g.patch()).t(),
                        MatRef::new(conv_grad, rows, out_channels),
                        if first { Accumulate::Overwrite } else { Accumulate::Scaled(1.0) },
                        d.scale,
                        threads,
                    )?;
                    add_column_sums(&mut *d.bias, conv_grad, d.scale, first, &mut ws.bias_grad);
                }
            }
        }
        cur = 1 - cur;
    }
    Ok(())
}

/// `dst += scale * column sums of grad` (rows of `dst.len()`), or `=` when `overwrite`.
pub(super) fn add_column_sums(dst: &mut [f32], grad: &[f32], scale: f32, overwrite: bool, sums: &mut Vec<f32>) {
    sums.clear();
    sums.resize(dst.len(), 0.0);
    for row in grad.chunks_exact(dst.len()) {
        sums.iter_mut().zip(row).for_each(|(s, g)| *s += g);
    }
    if overwrite {
        dst.iter_mut().zip(sums.iter()).for_each(|(d, s)| *d = scale * s);
    } else {
        dst.iter_mut().zip(sums.iter()).for_each(|(d, s)| *d += scale * s);
    }
}
