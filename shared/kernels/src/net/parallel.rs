//! One training step on several threads by splitting the batch: a [`Net`] asked for `T > 1`
//! threads ([`Threads::Rayon`]) cuts a batch of `B >= 2` examples into `min(T, B)` contiguous
//! chunks (sizes differing by at most one) and runs forward and backward for each chunk as a
//! task of rayon's global pool (the whole step runs inside the pool), with single-threaded
//! GEMMs and a workspace of its own. Then it applies the SGD (proximal) update once:
//!
//! - a convolution's weight and bias gradients went into the chunk's gradient buffers; they are
//!   summed in chunk order and applied (`w -= prox * (w - anchor) + lr * sum`);
//! - a dense layer's weight gradient was never formed: each chunk copied its input rows and
//!   output-gradient rows into its rows of batch-wide buffers, and the update is the one-thread
//!   step's own fused GEMM over the whole batch (`W -= lr * X^T dY`), split by rows of `W` over
//!   the `T` threads. The MNIST CNN's 3136 x 512 layer (97% of its parameters) is thus read
//!   and written once a step, as on one thread, rather than summed from `T` gradient copies.
//!
//! Splitting each GEMM by rows instead (what [`Threads::Rayon`] does to a forward pass) leaves
//! the small GEMMs of a training step (Winograd's 36 per pass, a batch of 10's dense layers)
//! too small to share; whole chunks share well. What does not scale: every chunk reads each
//! dense weight twice (forward, input gradient), so at a small batch, where that layer is
//! memory-bound, it gains less than the convolutions.
//!
//! The loss is the batch mean, so each chunk's logits' gradient is divided by the whole batch
//! `B`, not by the chunk's size: the chunks' gradients then add up to the batch's, unequal
//! chunks included. Sums run in a fixed order whichever thread ran which chunk (chunk order;
//! batch rows in order in the dense GEMM), so a step's result depends on `B` and `T` alone and
//! is the same run to run and on any pool; it equals the one-thread step's up to float rounding.
//!
//! Memory beyond a one-thread net, allocated on the first split step and reused (grown, never
//! shrunk): `T - 1` workspaces (chunk 0 uses the net's own, which is then sized for a chunk,
//! not the batch); `T` gradient buffers for the convolutions' parameters only (52 K floats for
//! the CNN); one batch-wide copy of each dense layer's input and output-gradient rows
//! (`B x (3136 + 512 + 512 + 10)` floats for the CNN: 1 MiB at `B = 64`).

use super::backward::{Gradients, Rows, add_column_sums, backward};
use super::layer::{Grad, Layer, Shape, Workspace};
use super::step::{Plan, forward, loss_gradient, proximal, reserve, score_chunks};
use super::{Net, NetError};
use crate::gemm::{Accumulate, MatMut, MatRef, Threads, matmul};

/// The buffers of batch-split steps beyond the net's own workspace.
#[derive(Default)]
pub(super) struct Replicas {
    /// The workspaces of chunks 1, 2, ... (chunk 0 uses the net's).
    workspaces: Vec<Workspace>,
    /// Per chunk, per layer: the chunk's share of a convolution's weight and bias gradients
    /// (empty for a dense layer).
    grads: Vec<Vec<Grad>>,
    /// Per layer: a dense layer's input rows and output gradient rows for the whole batch, the
    /// chunks' one after the other (empty for a convolution).
    rows: Vec<(Vec<f32>, Vec<f32>)>,
    /// Column sums (a dense layer's bias gradient).
    sums: Vec<f32>,
}

/// The default of [`Net::set_split_work`].
pub(super) const SPLIT_MIN_MACS: usize = 25_000_000;

/// Into how many chunks `net` splits a step or scoring of `batch` examples, given as `units`
/// (examples for a step, chunks for scoring): 1 (no split, the fused one-thread step) on
/// `Threads::One` or when the batch's forward work is below the net's split threshold.
pub(super) fn split_for(net: &Net, batch: usize, units: usize) -> usize {
    if batch.saturating_mul(net.forward_macs()) < net.split_min_macs {
        return 1;
    }
    split_threads(net.threads, units)
}

/// Into how many chunks a training step on `threads` splits a batch of `batch` examples (1: no
/// split, the fused one-thread step; `Threads::One` never splits).
fn split_threads(threads: Threads, batch: usize) -> usize {
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

/// Sizes `par` for `t` chunks of a batch of `batch` (grows only).
fn reserve_replicas(par: &mut Replicas, layers: &[Layer], batch: usize, t: usize) {
    if par.workspaces.len() < t - 1 {
        par.workspaces.resize_with(t - 1, Workspace::default);
    }
    if par.grads.len() < t {
        par.grads.resize_with(t, Vec::new);
    }
    for grads in &mut par.grads[..t] {
        if grads.len() != layers.len() {
            *grads = layers
                .iter()
                .map(|l| match l.shape {
                    Shape::Conv { .. } => Grad { weight: vec![0.0; l.weight.len()], bias: vec![0.0; l.bias.len()] },
                    Shape::Dense { .. } => Grad { weight: Vec::new(), bias: Vec::new() },
                })
                .collect();
        }
    }
    par.rows.resize_with(layers.len(), Default::default);
    for (l, (input, grad)) in layers.iter().zip(&mut par.rows) {
        if let Shape::Dense { inputs, outputs, .. } = l.shape {
            if input.len() < batch * inputs {
                input.resize(batch * inputs, 0.0);
            }
            if grad.len() < batch * outputs {
                grad.resize(batch * outputs, 0.0);
            }
        }
    }
}

/// A training step of `net` on `images`/`labels` (already checked) split into `t >= 2` chunks;
/// `(learning_rate, mu)` as [`Net::train_step_proximal`] (the anchor already checked). Returns
/// the batch's mean loss.
///
/// The whole step runs on one of the pool's threads (moved there once if the caller is not
/// one; run in place if it is): the chunks after the first and the dense layers' split GEMMs
/// are then handed between the pool's threads, never to a caller asleep outside the pool.
pub(super) fn train_step(
    net: &mut Net,
    images: &[f32],
    labels: &[u8],
    rates: (f32, f32),
    t: usize,
) -> Result<f32, NetError> {
    rayon::scope(|_| step(net, images, labels, rates, t))
}

fn step(
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
    reserve_replicas(par, layers, batch, t);
    // Each chunk's rows of every dense layer's batch-wide rows.
    let mut chunk_rows: Vec<Vec<Option<Rows<'_>>>> = (0..t).map(|_| Vec::with_capacity(n)).collect();
    for (l, (input, grad)) in layers.iter().zip(&mut par.rows) {
        let Shape::Dense { inputs, outputs, .. } = l.shape else {
            chunk_rows.iter_mut().for_each(|rows| rows.push(None));
            continue;
        };
        let (mut input, mut grad) = (&mut input[..batch * inputs], &mut grad[..batch * outputs]);
        for (k, rows) in chunk_rows.iter_mut().enumerate() {
            let nb = bounds(batch, t, k).1;
            let (mine, rest) = std::mem::take(&mut input).split_at_mut(nb * inputs);
            let (mine_grad, rest_grad) = std::mem::take(&mut grad).split_at_mut(nb * outputs);
            (input, grad) = (rest, rest_grad);
            rows.push(Some(Rows { input: mine, grad: mine_grad }));
        }
    }
    let shared: &[Layer] = layers;
    let chunk = |k: usize, ws: &mut Workspace, grads: &mut [Grad], rows| -> Result<f64, NetError> {
        let (b0, nb) = bounds(batch, t, k);
        let (images, labels) = (&images[b0 * len..(b0 + nb) * len], &labels[b0..b0 + nb]);
        reserve(shared, ws, plan, nb);
        ws.acts[0][..images.len()].copy_from_slice(images);
        forward(shared, ws, plan, nb)?;
        let loss = loss_gradient(ws, n, classes, labels, batch);
        backward(&mut Gradients { layers: shared, grads, rows }, n, ws, plan, nb)?;
        Ok(loss)
    };
    let mut losses: Vec<Result<f64, NetError>> = (0..t).map(|_| Ok(0.0)).collect();
    let mut jobs = std::iter::once(&mut net.ws)
        .chain(&mut par.workspaces)
        .zip(&mut par.grads)
        .zip(chunk_rows)
        .zip(&mut losses)
        .enumerate();
    // Chunk 0 on this thread (with the net's own workspace), the others as tasks of the pool.
    rayon::in_place_scope(|s| {
        let first = jobs.next();
        for (k, (((ws, grads), rows), out)) in jobs {
            let chunk = &chunk;
            s.spawn(move |_| *out = chunk(k, ws, grads, rows));
        }
        if let Some((k, (((ws, grads), rows), out))) = first {
            *out = chunk(k, ws, grads, rows);
        }
    });
    let losses = losses.into_iter().collect::<Result<Vec<f64>, NetError>>()?;
    let prox = learning_rate * mu;
    update(layers, &mut par.grads[..t], learning_rate, prox);
    // The dense layers: the fused step's update, over the whole batch's rows, its GEMM split
    // by rows of the weight over the threads.
    for (l, (input, grad)) in layers.iter_mut().zip(&par.rows) {
        let Shape::Dense { inputs, outputs, .. } = l.shape else {
            continue;
        };
        proximal(l, prox);
        matmul(
            MatMut::new(&mut l.weight, inputs, outputs),
            MatRef::new(input, batch, inputs).t(),
            MatRef::new(grad, batch, outputs),
            Accumulate::Scaled(1.0),
            -learning_rate,
            Threads::Rayon(t),
        )?;
        add_column_sums(&mut l.bias, &grad[..batch * outputs], -learning_rate, false, &mut par.sums);
    }
    Ok((losses.iter().sum::<f64>() / batch as f64) as f32)
}

/// [`Net::score`] on `t >= 2` threads: the chunks of `chunk` examples dealt out in `t`
/// contiguous runs, each scored on a pool thread with its own workspace and single-threaded
/// GEMMs. Every chunk holds the same examples as on one thread, so each example's loss (into
/// `losses`) is the same bit for bit. Returns the count classified correctly.
pub(super) fn score(
    net: &mut Net,
    images: &[f32],
    labels: &[u8],
    chunk: usize,
    t: usize,
    losses: &mut [f64],
) -> Result<usize, NetError> {
    let plan = Plan { threads: Threads::One, ..net.plan() };
    let (len, classes) = (plan.input_len, net.classes());
    if net.par.workspaces.len() < t - 1 {
        net.par.workspaces.resize_with(t - 1, Workspace::default);
    }
    let chunks = labels.len().div_ceil(chunk);
    let (mut images, mut labels, mut losses) = (images, labels, losses);
    let parts: Vec<_> = (0..t)
        .map(|k| {
            let count = (bounds(chunks, t, k).1 * chunk).min(labels.len());
            let (im, im_rest) = images.split_at(count * len);
            let (la, la_rest) = labels.split_at(count);
            let (lo, lo_rest) = std::mem::take(&mut losses).split_at_mut(count);
            (images, labels, losses) = (im_rest, la_rest, lo_rest);
            (im, la, lo)
        })
        .collect();
    let layers: &[Layer] = &net.layers;
    let mut results: Vec<Result<usize, NetError>> = (0..t).map(|_| Ok(0)).collect();
    let jobs = std::iter::once(&mut net.ws).chain(&mut net.par.workspaces).zip(parts).zip(&mut results);
    rayon::scope(|_| {
        rayon::in_place_scope(|s| {
            let mut jobs = jobs;
            let first = jobs.next();
            for ((ws, (im, la, lo)), out) in jobs {
                s.spawn(move |_| *out = score_chunks(layers, ws, plan, classes, (im, la), chunk, lo));
            }
            if let Some(((ws, (im, la, lo)), out)) = first {
                *out = score_chunks(layers, ws, plan, classes, (im, la), chunk, lo);
            }
        })
    });
    results.into_iter().sum()
}

/// `w := w - prox * (w - anchor) - lr * (g_0 + g_1 + ...)` for every parameter of a layer with
/// gradient buffers (the convolutions; a dense layer's are empty), the chunks' gradients summed
/// in chunk order into chunk 0's. On the calling thread: the CNN's convolutions have 52 K
/// parameters, too few to be worth waking another thread.
fn update(layers: &mut [Layer], grads: &mut [Vec<Grad>], learning_rate: f32, prox: f32) {
    let Some((first, rest)) = grads.split_first_mut() else {
        return;
    };
    for (i, (l, g)) in layers.iter_mut().zip(first.iter_mut()).enumerate() {
        let Layer { weight, bias, anchor_weight, anchor_bias, .. } = l;
        for (is_bias, params, anchor, sum) in
            [(false, weight, &*anchor_weight, &mut g.weight), (true, bias, &*anchor_bias, &mut g.bias)]
        {
            if sum.len() != params.len() {
                continue;
            }
            for other in rest.iter() {
                let other = &other[i];
                let other = if is_bias { &other.bias } else { &other.weight };
                sum.iter_mut().zip(other).for_each(|(s, g)| *s += g);
            }
            if prox == 0.0 {
                params.iter_mut().zip(sum.iter()).for_each(|(w, g)| *w -= learning_rate * g);
            } else {
                params.iter_mut().zip(anchor).zip(sum.iter()).for_each(|((w, a), g)| {
                    *w -= prox * (*w - a);
                    *w -= learning_rate * g;
                });
            }
        }
    }
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
