//! The batch-split step (`net/parallel.rs`) against the one-thread fused step: the CNN (both
//! convolution algorithms) and the 2NN, even and odd splits, plain and proximal, several steps;
//! repeatability, independence from the pool's size, and batches smaller than the threads.

use rand::{RngExt, SeedableRng};

use super::{anchor_away, cnn, params, relative_error};
use crate::ConvAlgorithm::{Im2col, Winograd};
use crate::{LayerSpec, Net, NetSpec, Threads};

/// A split step against the one-thread step, relative to the magnitude of each tensor's total
/// change over the steps (and for the loss, to the loss): the chunks' gradients are summed in
/// another order than the one-thread GEMM's, so they differ by float rounding, which later
/// steps carry on. Measured up to 9.3e-6 over these runs; the bound leaves a margin.
const SPLIT_TOLERANCE: f64 = 5e-5;

/// McMahan et al.'s 2NN (784-200-200-10) with random weights.
fn two_nn(seed: u64) -> Net {
    let dense = |outputs, relu| LayerSpec::Dense { outputs, relu };
    let spec = NetSpec {
        height: 28,
        width: 28,
        channels: 1,
        layers: vec![dense(200, true), dense(200, true), dense(10, false)],
    };
    let mut net = Net::new(&spec, Threads::One).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..net.num_layers() {
        let s = (6.0 / net.weight_shape(i).0 as f32).sqrt();
        let (w, b) = net.layer(i);
        let w: Vec<f32> = (0..w.len()).map(|_| rng.random_range(-s..s)).collect();
        let b: Vec<f32> = (0..b.len()).map(|_| rng.random_range(-0.05f32..0.1)).collect();
        net.set_layer(i, &w, &b).unwrap();
    }
    net
}

/// The three nets under test, each built twice from one seed, splitting every batch they can
/// (the default threshold would leave the 2NN's small batches whole).
fn nets(which: usize) -> (&'static str, Net) {
    let (name, mut net) = match which {
        0 => ("CNN Winograd", cnn(Winograd, 50)),
        1 => ("CNN im2col", cnn(Im2col, 50)),
        _ => ("2NN", two_nn(51)),
    };
    net.set_split_work(0);
    (name, net)
}

fn batch(net: &Net, n: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10u8)).collect();
    let images: Vec<f32> = (0..n * net.input_len()).map(|_| rng.random_range(-1.0f32..2.0)).collect();
    (images, labels)
}

/// Every layer's weight and bias.
type Params = Vec<(Vec<f32>, Vec<f32>)>;

/// `steps` steps of a batch of `n` (a new batch each step): the losses and the parameters.
fn train(net: &mut Net, n: usize, mu: f32, steps: usize) -> (Vec<f32>, Params) {
    let losses = (0..steps)
        .map(|s| {
            let (images, labels) = batch(net, n, 60 + s as u64);
            net.train_step_proximal(&images, &labels, 0.05, mu).unwrap()
        })
        .collect();
    (losses, params(net))
}

#[test]
fn a_two_thread_step_matches_the_one_thread_step() {
    let mut worst = 0.0f64;
    for which in 0..3 {
        for (n, mu) in [(10, 0.0f32), (11, 0.0), (64, 0.0), (11, 0.5)] {
            let (name, mut one) = nets(which);
            let (_, mut two) = nets(which);
            two.set_threads(Threads::Rayon(2));
            if mu != 0.0 {
                anchor_away(&mut one);
                anchor_away(&mut two);
            }
            let start = params(&one);
            let (l1, p1) = train(&mut one, n, mu, 3);
            let (l2, p2) = train(&mut two, n, mu, 3);
            for (s, (a, b)) in l1.iter().zip(&l2).enumerate() {
                let e = ((a - b) / a).abs() as f64;
                assert!(e <= SPLIT_TOLERANCE, "{name} batch {n} mu {mu} step {s}: loss {a} vs {b}");
                worst = worst.max(e);
            }
            for (layer, ((x, y), s)) in p1.iter().zip(&p2).zip(&start).enumerate() {
                for (what, (x, y, s)) in [("weight", (&x.0, &y.0, &s.0)), ("bias", (&x.1, &y.1, &s.1))] {
                    let d1: Vec<f32> = x.iter().zip(s).map(|(a, b)| a - b).collect();
                    let d2: Vec<f32> = y.iter().zip(s).map(|(a, b)| a - b).collect();
                    let e = relative_error(&d2, &d1);
                    assert!(e <= SPLIT_TOLERANCE, "{name} batch {n} mu {mu} layer {layer} {what}: off by {e:e}");
                    worst = worst.max(e);
                }
            }
        }
    }
    eprintln!("worst relative difference, two threads against one: {worst:e}");
}

#[test]
fn split_steps_are_the_same_run_to_run_and_on_any_pool() {
    for which in [0, 2] {
        for (threads, n) in [(2, 10), (2, 11), (3, 11)] {
            let run = || {
                let (_, mut net) = nets(which);
                net.set_threads(Threads::Rayon(threads));
                train(&mut net, n, 0.0, 2)
            };
            let (a, b) = (run(), run());
            // The same chunks on a pool of one thread: they run one after the other.
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let c = pool.install(run);
            for other in [&b, &c] {
                assert_eq!(
                    a.0.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                    other.0.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
                );
                for (x, y) in a.1.iter().zip(&other.1) {
                    assert!(x.0.iter().zip(&y.0).chain(x.1.iter().zip(&y.1)).all(|(p, q)| p.to_bits() == q.to_bits()));
                }
            }
        }
    }
}

#[test]
fn batches_smaller_than_the_threads_train() {
    for (threads, n) in [(2, 1), (3, 2), (8, 3)] {
        let (_, mut one) = nets(0);
        let (_, mut many) = nets(0);
        many.set_threads(Threads::Rayon(threads));
        let start = params(&one);
        let (l1, p1) = train(&mut one, n, 0.0, 2);
        let (l2, p2) = train(&mut many, n, 0.0, 2);
        assert!(l2.iter().all(|l| l.is_finite()));
        for (a, b) in l1.iter().zip(&l2) {
            assert!(((a - b) / a).abs() as f64 <= SPLIT_TOLERANCE, "{threads} threads, batch {n}: loss {a} vs {b}");
        }
        for ((x, y), s) in p1.iter().zip(&p2).zip(&start) {
            let d1: Vec<f32> = x.0.iter().zip(&s.0).map(|(a, b)| a - b).collect();
            let d2: Vec<f32> = y.0.iter().zip(&s.0).map(|(a, b)| a - b).collect();
            assert!(relative_error(&d2, &d1) <= SPLIT_TOLERANCE, "{threads} threads, batch {n}");
        }
    }
}

#[test]
fn a_split_net_still_scores_and_trains_after_a_batch_change() {
    // Steps of 64, then 11, then 64 again on two threads, then one thread: the buffers sized
    // for one batch serve the next.
    let (_, mut net) = nets(0);
    net.set_threads(Threads::Rayon(2));
    for n in [64, 11, 64] {
        let (images, labels) = batch(&net, n, n as u64);
        assert!(net.train_step(&images, &labels, 0.05).unwrap().is_finite());
    }
    net.set_threads(Threads::One);
    let (images, labels) = batch(&net, 5, 5);
    assert!(net.train_step(&images, &labels, 0.05).unwrap().is_finite());
    assert_eq!(net.score(&images, &labels, 3).unwrap().examples, 5);
}

#[test]
fn scoring_on_several_threads_equals_one_thread_bit_for_bit() {
    // Every net, chunk counts that split evenly and not (7 chunks of 3 and a short one), and
    // fewer chunks than threads: the chunks hold the same examples whichever thread scores them.
    for which in 0..3 {
        let (name, mut net) = nets(which);
        for (n, chunk) in [(22, 3), (40, 8), (5, 8)] {
            let (images, labels) = batch(&net, n, 60 + n as u64);
            net.set_threads(Threads::One);
            let one = net.score(&images, &labels, chunk).unwrap();
            for threads in [2, 3] {
                net.set_threads(Threads::Rayon(threads));
                let split = net.score(&images, &labels, chunk).unwrap();
                assert_eq!(split, one, "{name}: {threads} threads, {n} examples in chunks of {chunk}");
            }
            assert_eq!(one.examples, n);
            assert!(one.loss_sum.is_finite() && one.loss_sum > 0.0);
        }
    }
}

#[test]
fn small_batches_of_a_small_net_are_not_split_by_default() {
    // The 2NN at batch 10 (2 M multiply-adds) stays whole on two threads: the same result as
    // one thread bit for bit. The CNN at batch 10 (123 M) is split: a different rounding.
    let bits = |p: &Params| p.iter().flat_map(|(w, b)| w.iter().chain(b).map(|v| v.to_bits())).collect::<Vec<_>>();
    for (which, split) in [(2, false), (0, true)] {
        let (name, mut one) = nets(which);
        let (_, mut two) = nets(which);
        two.set_split_work(25_000_000);
        two.set_threads(Threads::Rayon(2));
        let (_, p1) = train(&mut one, 10, 0.0, 2);
        let (_, p2) = train(&mut two, 10, 0.0, 2);
        assert_eq!(bits(&p1) != bits(&p2), split, "{name}: split {split} expected");
    }
}
