//! One training step on several threads by splitting the batch: a [`Net`] asked for `T > 1`
//! threads ([`Threads::Rayon`]) cuts a batch of `B >= 2` examples into `min(T, B)` contiguous
//! chunks (sizes differing by at most one), runs forward and backward for each chunk as a task
//! of rayon's global pool with single-threaded GEMMs and its own workspace, each chunk's weight
//! and bias gradients into its own buffers; then sums the chunks' gradients and applies the SGD
//! (proximal) update once, that pass itself split over the parameters, `T` parts.
//!
//! Splitting each GEMM by rows instead (what [`Threads::Rayon`] does to a forward pass) leaves
//! the small GEMMs of a training step (Winograd's 36 per pass, a batch of 10's dense layers)
//! too small to share; whole chunks share well.
//!
//! The loss is the batch mean, so each chunk's logits' gradient is divided by the whole batch
//! `B`, not by the chunk's size: the chunks' gradients then add up to the batch's, unequal
//! chunks included. The sum runs in chunk order for every parameter, whichever thread ran
//! which chunk, so a step's result depends on `B` and `T` alone and is the same run to run; it
//! equals the one-thread step's up to float rounding (the sums are associated differently).
//!
//! Memory: chunk 0 uses the net's own workspace (sized for a chunk, not the batch); each further
//! chunk has a workspace of its own, and every chunk a gradient buffer the size of the
//! parameters: `T - 1` workspaces and `T` parameter-sized buffers beyond a one-thread net, all
//! allocated on the first split step and reused (they grow, never shrink).

use rayon::prelude::*;

use super::backward::{Gradients, backward};
use super::layer::{Grad, Layer, Workspace};
use super::step::{Plan, forward, loss_gradient, reserve};
use super::{Net, NetError};
use crate::gemm::Threads;

/// The buffers of batch-split steps beyond the net's own workspace.
#[derive(Default)]
pub(super) struct Replicas {
    /// The workspaces of chunks 1, 2, ... (chunk 0 uses the net's).
    workspaces: Vec<Workspace>,
    /// Per chunk, per layer: the chunk's share of the batch's weight and bias gradients.
    grads: Vec<Vec<Grad>>,
}

/// Into how many chunks a training step on `threads` splits a batch of `batch` examples (1: no
/// split, the fused one-thread step; `Threads::One` never splits).
pub(super) fn split_threads(threads: Threads, batch: usize) -> usize {
    let t = match threads {
        Threads::One => 1,
        Threads::Rayon(0) => rayon::current_num_threads(),
        Threads::Rayon(t) => t,
    };
    t.min(batch).max(1)
}

/// `(first, count)` of chunk `k` of `t` contiguous chunks of `0..batch`, the first
/// `batch % t` one example longer.
fn bounds(batch: usize, t: usize, k: usize) -> (usize, usize) {
    let (q, r) = (batch / t, batch % t);
    (k * q + k.min(r), q + usize::from(k < r))
}

/// A training step of `net` on `images`/`labels` (already checked) split into `t >= 2` chunks;
/// `(learning_rate, mu)` as [`Net::train_step_proximal`] (the anchor already checked). Returns
/// the batch's mean loss.
pub(super) fn train_step(
    net: &mut Net,
    images: &[f32],
    labels: &[u8],
    (learning_rate, mu): (f32, f32),
    t: usize,
) -> Result<f32, NetError> {
    let batch = labels.len();
    let plan = Plan { threads: Threads::One, ..net.plan() };
    let (len, classes, n) = (plan.input_len, net.classes(), net.layers.len());
    let (layers, par) = (&mut net.layers, &mut net.par);
    if par.workspaces.len() < t - 1 {
        par.workspaces.resize_with(t - 1, Workspace::default);
    }
    if par.grads.len() < t {
        par.grads.resize_with(t, Vec::new);
    }
    for grads in &mut par.grads[..t] {
        if grads.len() != n {
            *grads = layers
                .iter()
                .map(|l| Grad { weight: vec![0.0; l.weight.len()], bias: vec![0.0; l.bias.len()] })
                .collect();
        }
    }
    let shared: &[Layer] = layers;
    let jobs: Vec<_> = std::iter::once(&mut net.ws).chain(&mut par.workspaces).zip(&mut par.grads).take(t).collect();
    let losses = jobs
        .into_par_iter()
        .with_max_len(1)
        .enumerate()
        .map(|(k, (ws, grads))| {
            let (b0, nb) = bounds(batch, t, k);
            let (images, labels) = (&images[b0 * len..(b0 + nb) * len], &labels[b0..b0 + nb]);
            reserve(shared, ws, plan, nb);
            ws.acts[0][..images.len()].copy_from_slice(images);
            forward(shared, ws, plan, nb)?;
            let loss = loss_gradient(ws, n, classes, labels, batch);
            backward(&mut Gradients { layers: shared, grads }, n, ws, plan, nb)?;
            Ok(loss)
        })
        .collect::<Result<Vec<f64>, NetError>>()?;
    update(layers, &mut par.grads[..t], learning_rate, learning_rate * mu);
    Ok((losses.iter().sum::<f64>() / batch as f64) as f32)
}

/// One part of one parameter tensor: `weight[start..]` (or the bias), its chunk-0 gradient and
/// its anchor (empty when there is no proximal pull).
struct Piece<'a> {
    layer: usize,
    bias: bool,
    start: usize,
    params: &'a mut [f32],
    grad: &'a mut [f32],
    anchor: &'a [f32],
}

/// `w := w - prox * (w - anchor) - lr * (g_0 + g_1 + ...)` for every parameter, the gradients
/// summed in chunk order; each tensor cut into `grads.len()` parts that run in parallel.
fn update<'a>(layers: &'a mut [Layer], grads: &'a mut [Vec<Grad>], learning_rate: f32, prox: f32) {
    let parts = grads.len();
    let Some((first, rest)) = grads.split_first_mut() else {
        return;
    };
    let mut pieces: Vec<Vec<Piece<'a>>> = (0..parts).map(|_| Vec::new()).collect();
    for (i, (l, g)) in layers.iter_mut().zip(first.iter_mut()).enumerate() {
        let Layer { weight, bias, anchor_weight, anchor_bias, .. } = l;
        for (is_bias, params, anchor, grad) in
            [(false, weight, &*anchor_weight, &mut g.weight), (true, bias, &*anchor_bias, &mut g.bias)]
        {
            // Parts of whole cache lines.
            let per = params.len().div_ceil(parts).next_multiple_of(16);
            for (k, (params, grad)) in params.chunks_mut(per).zip(grad.chunks_mut(per)).enumerate() {
                let start = k * per;
                let anchor = if prox == 0.0 { &[][..] } else { &anchor[start..start + params.len()] };
                pieces[k].push(Piece { layer: i, bias: is_bias, start, params, grad, anchor });
            }
        }
    }
    let rest: &'a [Vec<Grad>] = rest;
    pieces.into_par_iter().with_max_len(1).for_each(|pieces| {
        for p in pieces {
            let range = p.start..p.start + p.params.len();
            let other = |g: &'a [Grad]| part(g, p.layer, p.bias, range.clone());
            // g_0 += g_1, ..., g_{T-2}; the last joins the update's pass.
            let Some((last, middle)) = rest.split_last() else {
                continue;
            };
            for g in middle {
                p.grad.iter_mut().zip(other(g)).for_each(|(s, g)| *s += g);
            }
            let sums = p.grad.iter().zip(other(last)).map(|(a, b)| a + b);
            if prox == 0.0 {
                p.params.iter_mut().zip(sums).for_each(|(w, g)| *w -= learning_rate * g);
            } else {
                p.params.iter_mut().zip(p.anchor).zip(sums).for_each(|((w, a), g)| {
                    *w -= prox * (*w - a);
                    *w -= learning_rate * g;
                });
            }
        }
    });
}

/// `range` of layer `layer`'s weight (or bias) gradient in `grads`.
fn part(grads: &[Grad], layer: usize, bias: bool, range: std::ops::Range<usize>) -> &[f32] {
    let g = &grads[layer];
    &(if bias { &g.bias } else { &g.weight })[range]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_batch_and_one_thread_never_splits() {
        assert_eq!(split_threads(Threads::One, 64), 1);
        assert_eq!(split_threads(Threads::Rayon(2), 1), 1);
        assert_eq!(split_threads(Threads::Rayon(3), 2), 2);
        assert_eq!(split_threads(Threads::Rayon(2), 64), 2);
        assert!(split_threads(Threads::Rayon(0), 64) >= 1);
        for (batch, t) in [(10, 2), (11, 2), (11, 3), (64, 5), (2, 2)] {
            let mut next = 0;
            for k in 0..t {
                let (b0, nb) = bounds(batch, t, k);
                assert_eq!(b0, next);
                assert!(nb == batch / t || nb == batch / t + 1);
                next += nb;
            }
            assert_eq!(next, batch);
        }
    }
}
