//! A convolution layer's three passes by Winograd F(2x2, 5x5) ([`crate::winograd`]): forward,
//! and backward with the input gradient, the weight gradient and the (proximal) SGD update.

use super::NetError;
use super::layer::{Layer, WinogradBuffers};
use super::step::{chunks, proximal};
use crate::conv::{self, Geometry};
use crate::gemm::{Accumulate, MatMut, MatRef, Threads, matmul};
use crate::winograd::{
    POSITIONS, filter_gradient, filter_scratch_len, filter_transform, grad_transform, input_transform,
    output_transform, scratch_len, tiles,
};

/// Images per chunk for a Winograd layer: its transformed data and GEMM results (the two
/// per-image buffers) within `bytes`.
pub(super) fn chunk(g: Geometry, out_channels: usize, bytes: usize) -> usize {
    (bytes / (POSITIONS * tiles(g.h, g.w) * (g.c + out_channels) * 4)).max(1)
}

/// Sizes `b` for chunks of `per_chunk` images of a layer of geometry `g` (grows only).
pub(super) fn reserve(b: &mut WinogradBuffers, g: Geometry, out_channels: usize, per_chunk: usize) {
    let rows = per_chunk * tiles(g.h, g.w);
    let (wide, n) = (g.c.max(out_channels), g.c * out_channels);
    let grow = |v: &mut Vec<f32>, len: usize| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    };
    grow(&mut b.v, POSITIONS * rows * wide);
    grow(&mut b.m, POSITIONS * rows * wide);
    grow(&mut b.u, POSITIONS * n);
    grow(&mut b.du, POSITIONS * n);
    grow(&mut b.scratch, scratch_len(wide).max(filter_scratch_len(n)));
}

/// The layer's output for `batch` images of `input`: bias, ReLU and pooling into `output`, the
/// pooling winners into `winners`, chunk by chunk (`conv` holds a chunk's pre-pooling output).
#[allow(clippy::too_many_arguments, reason = "one pass over the workspace's disjoint buffers")]
pub(super) fn forward(
    l: &Layer,
    (g, co): (Geometry, usize),
    batch: usize,
    per_chunk: usize,
    input: &[f32],
    output: &mut [f32],
    winners: &mut [u8],
    conv: &mut [f32],
    b: &mut WinogradBuffers,
    threads: Threads,
) -> Result<(), NetError> {
    let n = g.c * co;
    let per = (g.h / 2) * (g.w / 2) * co;
    filter_transform(n, &l.weight, false, &mut b.u, &mut b.scratch);
    for (b0, nb) in chunks(batch, per_chunk) {
        let rows = nb * tiles(g.h, g.w);
        input_transform(g.h, g.w, g.c, nb, &input[b0 * g.image()..], &mut b.v, &mut b.scratch);
        for xi in 0..POSITIONS {
            matmul(
                MatMut::new(&mut b.m[xi * rows * co..], rows, co),
                MatRef::new(&b.v[xi * rows * g.c..], rows, g.c),
                MatRef::new(&b.u[xi * n..], g.c, co),
                Accumulate::Overwrite,
                1.0,
                threads,
            )?;
        }
        output_transform(g.h, g.w, co, nb, &b.m, conv, &mut b.scratch);
        conv::relu_pool(g.h, g.w, co, nb, conv, &l.bias, &mut output[b0 * per..], &mut winners[b0 * per..]);
    }
    Ok(())
}

/// Backward through the layer from its pooled output's gradient `grad`: the input's gradient
/// into `input_grad` (when there is one to pass), then `W -= lr * dW` and the bias likewise,
/// after the proximal pull `prox` (see [`proximal`]). One pass over the chunks computes both
/// gradients: the input's from the pre-step weights (transformed before the loop), the
/// weights' summed in the transform domain and applied once at the end.
#[allow(clippy::too_many_arguments, reason = "one pass over the workspace's disjoint buffers")]
pub(super) fn backward(
    l: &mut Layer,
    (g, co): (Geometry, usize),
    batch: usize,
    per_chunk: usize,
    (input, grad, winners): (&[f32], &[f32], &[u8]),
    mut input_grad: Option<&mut [f32]>,
    conv_grad: &mut [f32],
    b: &mut WinogradBuffers,
    bias_grad: &mut Vec<f32>,
    (learning_rate, prox): (f32, f32),
    threads: Threads,
) -> Result<(), NetError> {
    let (ci, n) = (g.c, g.c * co);
    let per = (g.h / 2) * (g.w / 2) * co;
    if input_grad.is_some() {
        // The input gradient convolves with the kernel turned 180 degrees, channels swapped.
        filter_transform(n, &l.weight, true, &mut b.u, &mut b.scratch);
    }
    bias_grad.clear();
    bias_grad.resize(co, 0.0);
    for (b0, nb) in chunks(batch, per_chunk) {
        let rows = nb * tiles(g.h, g.w);
        let conv_grad = &mut conv_grad[..nb * g.h * g.w * co];
        conv::relu_pool_backward(g.h, g.w, co, nb, &grad[b0 * per..], &winners[b0 * per..], conv_grad);
        if let Some(input_grad) = input_grad.as_deref_mut() {
            input_transform(g.h, g.w, co, nb, conv_grad, &mut b.v, &mut b.scratch);
            for xi in 0..POSITIONS {
                matmul(
                    MatMut::new(&mut b.m[xi * rows * ci..], rows, ci),
                    MatRef::new(&b.v[xi * rows * co..], rows, co),
                    MatRef::new(&b.u[xi * n..], ci, co).t(),
                    Accumulate::Overwrite,
                    1.0,
                    threads,
                )?;
            }
            output_transform(g.h, g.w, ci, nb, &b.m, &mut input_grad[b0 * g.image()..], &mut b.scratch);
        }
        input_transform(g.h, g.w, ci, nb, &input[b0 * g.image()..], &mut b.v, &mut b.scratch);
        grad_transform(g.h, g.w, co, nb, conv_grad, &mut b.m, &mut b.scratch);
        let acc = if b0 == 0 { Accumulate::Overwrite } else { Accumulate::Scaled(1.0) };
        for xi in 0..POSITIONS {
            matmul(
                MatMut::new(&mut b.du[xi * n..], ci, co),
                MatRef::new(&b.v[xi * rows * ci..], rows, ci).t(),
                MatRef::new(&b.m[xi * rows * co..], rows, co),
                acc,
                1.0,
                threads,
            )?;
        }
        for row in conv_grad.chunks_exact(co) {
            bias_grad.iter_mut().zip(row).for_each(|(s, g)| *s += g);
        }
    }
    proximal(l, prox);
    filter_gradient(n, &b.du, -learning_rate, &mut l.weight, &mut b.scratch);
    l.bias.iter_mut().zip(bias_grad.iter()).for_each(|(b, s)| *b -= learning_rate * s);
    Ok(())
}
