//! A convolution layer's three passes by Winograd F(2x2, 5x5) ([`crate::winograd`]): forward,
//! and backward with the input gradient and the weight gradient, which [`apply`] takes to the
//! weights (the fused SGD update) or to a gradient buffer.

use super::NetError;
use super::backward::Dst;
use super::layer::{Layer, WinogradBuffers};
use super::step::chunks;
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
    grow(&mut b.scratch, scratch_len(g.w, wide).max(filter_scratch_len(n)));
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
/// into `input_grad` (when there is one to pass), the weight gradient summed over the batch in
/// the transform domain into `b.du`, the bias gradient into `bias_grad`; [`apply`] takes them
/// to their destination. One pass over the chunks computes both gradients, the input's from
/// `weight` (transformed before the loop).
#[allow(clippy::too_many_arguments, reason = "one pass over the workspace's disjoint buffers")]
pub(super) fn backward(
    weight: &[f32],
    (g, co): (Geometry, usize),
    batch: usize,
    per_chunk: usize,
    (input, grad, winners): (&[f32], &[f32], &[u8]),
    mut input_grad: Option<&mut [f32]>,
    conv_grad: &mut [f32],
    b: &mut WinogradBuffers,
    bias_grad: &mut Vec<f32>,
    threads: Threads,
) -> Result<(), NetError> {
    let (ci, n) = (g.c, g.c * co);
    let per = (g.h / 2) * (g.w / 2) * co;
    if input_grad.is_some() {
        // The input gradient convolves with the kernel turned 180 degrees, channels swapped.
        filter_transform(n, weight, true, &mut b.u, &mut b.scratch);
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
    Ok(())
}

/// Takes the gradients [`backward`] left (`b.du`, `bias_grad`; `n = c_in * c_out`) to `d`.
pub(super) fn apply(n: usize, b: &mut WinogradBuffers, bias_grad: &[f32], d: Dst<'_>) {
    if d.fresh {
        d.weight.fill(0.0);
    }
    filter_gradient(n, &b.du, d.scale, d.weight, &mut b.scratch);
    if d.fresh {
        d.bias.iter_mut().zip(bias_grad).for_each(|(b, s)| *b = d.scale * s);
    } else {
        d.bias.iter_mut().zip(bias_grad).for_each(|(b, s)| *b += d.scale * s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::matmul_reference;
    use crate::net::layer::Shape;
    use rand::{RngExt, SeedableRng};

    fn random(n: usize, rng: &mut impl rand::Rng, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    }

    /// Error bound relative to a tensor's magnitude: F(2x2, 5x5) in f32 against f64 GEMMs
    /// measured up to 7e-6 (the weight step, a sum over every tile); 3x margin.
    const TOLERANCE: f64 = 2e-5;

    /// Largest `|a - b|` over the largest `|b|`.
    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
        a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale
    }

    /// Each pass of the layer against im2col with f64 GEMMs (`matmul_reference`), relative to
    /// each tensor's magnitude: the pooled output, the input gradient, and the weight and bias
    /// steps of a proximal SGD step (mu = 0 and mu > 0), whole batch and ragged chunks.
    #[test]
    fn the_three_passes_match_im2col() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(40);
        let mut worst = [0.0f64; 4];
        for (g, co, batch, per_chunk) in [
            (Geometry { h: 14, w: 14, c: 32, k: 5 }, 64, 3, 2),
            (Geometry { h: 14, w: 14, c: 32, k: 5 }, 64, 1, 4),
            (Geometry { h: 6, w: 10, c: 5, k: 5 }, 7, 4, 3),
            (Geometry { h: 2, w: 4, c: 4, k: 5 }, 3, 2, 1),
        ] {
            for prox in [0.0f32, 0.05] {
                let (n, per, rows) = (g.patch() * co, (g.h / 2) * (g.w / 2) * co, batch * g.h * g.w);
                let s = (3.0 / g.patch() as f32).sqrt();
                let mut l = Layer {
                    shape: Shape::Conv { g, out_channels: co },
                    weight: random(n, &mut rng, -s, s),
                    bias: random(co, &mut rng, -0.1, 0.1),
                    anchor_weight: random(n, &mut rng, -s, s),
                    anchor_bias: random(co, &mut rng, -0.1, 0.1),
                };
                let input = random(batch * g.image(), &mut rng, -1.0, 1.0);
                // Forward by im2col.
                let mut cols = vec![0.0; rows * g.patch()];
                conv::im2col(g, batch, &input, &mut cols);
                let mut conv_out = vec![0.0; rows * co];
                matmul_reference(
                    MatMut::new(&mut conv_out, rows, co),
                    MatRef::new(&cols, rows, g.patch()),
                    MatRef::new(&l.weight, g.patch(), co),
                    Accumulate::Overwrite,
                    1.0,
                );
                let (mut want, mut winners) = (vec![0.0; batch * per], vec![0u8; batch * per]);
                conv::relu_pool(g.h, g.w, co, batch, &conv_out, &l.bias, &mut want, &mut winners);
                // Forward by Winograd.
                let mut b = WinogradBuffers::default();
                reserve(&mut b, g, co, per_chunk);
                let (mut got, mut got_winners) = (vec![f32::NAN; batch * per], vec![0u8; batch * per]);
                let mut scratch = vec![f32::NAN; per_chunk * g.h * g.w * co];
                let threads = Threads::One;
                forward(
                    &l,
                    (g, co),
                    batch,
                    per_chunk,
                    &input,
                    &mut got,
                    &mut got_winners,
                    &mut scratch,
                    &mut b,
                    threads,
                )
                .unwrap();
                let e = relative_error(&got, &want);
                assert!(e < TOLERANCE, "{g:?}: forward off by {e:e}");
                worst[0] = worst[0].max(e);
                // Backward by im2col (the reference's winners for both).
                let grad = random(batch * per, &mut rng, -1.0, 1.0);
                let mut conv_grad = vec![0.0; rows * co];
                conv::relu_pool_backward(g.h, g.w, co, batch, &grad, &winners, &mut conv_grad);
                let mut cols_grad = vec![0.0; rows * g.patch()];
                matmul_reference(
                    MatMut::new(&mut cols_grad, rows, g.patch()),
                    MatRef::new(&conv_grad, rows, co),
                    MatRef::new(&l.weight, g.patch(), co).t(),
                    Accumulate::Overwrite,
                    1.0,
                );
                let mut want_input_grad = vec![0.0; batch * g.image()];
                conv::col2im(g, batch, &cols_grad, &mut want_input_grad);
                let mut weight_grad = vec![0.0; n];
                matmul_reference(
                    MatMut::new(&mut weight_grad, g.patch(), co),
                    MatRef::new(&cols, rows, g.patch()).t(),
                    MatRef::new(&conv_grad, rows, co),
                    Accumulate::Overwrite,
                    1.0,
                );
                let lr = 0.1f32;
                let step = |w: &[f32], a: &[f32], grad: &[f32]| -> Vec<f32> {
                    w.iter().zip(a).zip(grad).map(|((w, a), g)| -prox * (w - a) - lr * g).collect()
                };
                let want_weight_step = step(&l.weight, &l.anchor_weight, &weight_grad);
                let bias_grad: Vec<f32> = (0..co)
                    .map(|j| conv_grad.iter().skip(j).step_by(co).map(|&v| v as f64).sum::<f64>() as f32)
                    .collect();
                let want_bias_step = step(&l.bias, &l.anchor_bias, &bias_grad);
                // Backward by Winograd.
                let (w0, b0) = (l.weight.clone(), l.bias.clone());
                let mut input_grad = vec![f32::NAN; batch * g.image()];
                let mut sums = Vec::new();
                backward(
                    &l.weight,
                    (g, co),
                    batch,
                    per_chunk,
                    (&input, &grad, &winners),
                    Some(&mut input_grad),
                    &mut scratch,
                    &mut b,
                    &mut sums,
                    threads,
                )
                .unwrap();
                // The fused update as `Net` does it: the proximal pull, then the gradient.
                crate::net::step::proximal(&mut l, prox);
                let d = Dst { weight: &mut l.weight, bias: &mut l.bias, scale: -lr, fresh: false };
                apply(g.c * co, &mut b, &sums, d);
                let weight_step: Vec<f32> = l.weight.iter().zip(&w0).map(|(a, b)| a - b).collect();
                let bias_step: Vec<f32> = l.bias.iter().zip(&b0).map(|(a, b)| a - b).collect();
                for (k, (got, want, what)) in [
                    (&input_grad, &want_input_grad, "input gradient"),
                    (&weight_step, &want_weight_step, "weight step"),
                    (&bias_step, &want_bias_step, "bias step"),
                ]
                .into_iter()
                .enumerate()
                {
                    let e = relative_error(got, want);
                    assert!(
                        e < TOLERANCE,
                        "{g:?} batch {batch} chunks of {per_chunk} prox {prox}: {what} off by {e:e}"
                    );
                    worst[1 + k] = worst[1 + k].max(e);
                }
            }
        }
        eprintln!(
            "worst relative errors: output {:e}, input gradient {:e}, weight step {:e}, bias step {:e}",
            worst[0], worst[1], worst[2], worst[3]
        );
    }
}
