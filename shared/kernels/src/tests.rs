//! The fused step against finite differences of its own loss, on a small net with every layer
//! kind.

use rand::{RngExt, SeedableRng};

use crate::{LayerSpec, Net, NetSpec, Threads};

mod parallel;

fn small() -> (NetSpec, Net) {
    let spec = NetSpec {
        height: 8,
        width: 12,
        channels: 2,
        layers: vec![
            LayerSpec::ConvReluPool { out_channels: 3, kernel: 3 },
            LayerSpec::ConvReluPool { out_channels: 4, kernel: 3 },
            LayerSpec::Dense { outputs: 5, relu: true },
            LayerSpec::Dense { outputs: 3, relu: false },
        ],
    };
    let mut net = Net::new(&spec, Threads::One).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for i in 0..net.num_layers() {
        let (w, b) = net.layer(i);
        let w: Vec<f32> = (0..w.len()).map(|_| rng.random_range(-0.6f32..0.6)).collect();
        let b: Vec<f32> = (0..b.len()).map(|_| rng.random_range(0.0f32..0.3)).collect();
        net.set_layer(i, &w, &b).unwrap();
    }
    (spec, net)
}

fn mean_loss(net: &mut Net, images: &[f32], labels: &[u8]) -> f64 {
    let s = net.score(images, labels, 2).unwrap();
    s.loss_sum / s.examples as f64
}

#[test]
fn the_fused_update_is_minus_lr_times_the_gradient() {
    let (_, mut net) = small();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let labels = [0u8, 2, 1];
    let images: Vec<f32> = (0..labels.len() * net.input_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let before: Vec<(Vec<f32>, Vec<f32>)> =
        (0..net.num_layers()).map(|i| (net.layer(i).0.to_vec(), net.layer(i).1.to_vec())).collect();
    let loss0 = mean_loss(&mut net, &images, &labels);
    let lr = 1e-3;
    let step_loss = net.train_step(&images, &labels, lr).unwrap();
    assert!((step_loss as f64 - loss0).abs() < 1e-5, "{step_loss} vs {loss0}");
    let after: Vec<(Vec<f32>, Vec<f32>)> =
        (0..net.num_layers()).map(|i| (net.layer(i).0.to_vec(), net.layer(i).1.to_vec())).collect();
    // Restore, then check a sample of coordinates of every tensor by central differences.
    let mut checked = 0;
    for layer in 0..net.num_layers() {
        for which in 0..2 {
            let len = if which == 0 { before[layer].0.len() } else { before[layer].1.len() };
            for idx in (0..len).step_by(len.div_ceil(6)) {
                let grad = |t: &(Vec<f32>, Vec<f32>)| if which == 0 { t.0[idx] } else { t.1[idx] };
                let analytic = (grad(&before[layer]) - grad(&after[layer])) as f64 / lr as f64;
                let eps = 5e-4f32;
                let mut at = |delta: f32| {
                    let (mut w, mut b) = before[layer].clone();
                    if which == 0 {
                        w[idx] += delta
                    } else {
                        b[idx] += delta
                    }
                    for (i, (w0, b0)) in before.iter().enumerate() {
                        net.set_layer(i, w0, b0).unwrap();
                    }
                    net.set_layer(layer, &w, &b).unwrap();
                    mean_loss(&mut net, &images, &labels)
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!(
                    (analytic - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                    "layer {layer} {} [{idx}]: analytic {analytic} numeric {numeric}",
                    if which == 0 { "weight" } else { "bias" }
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 35, "{checked}");
}

#[test]
fn bad_batches_are_errors() {
    let (_, mut net) = small();
    let images = vec![0.0; net.input_len() * 2];
    assert!(net.train_step(&images, &[0], 0.1).is_err());
    assert!(net.train_step(&images, &[0, 3], 0.1).is_err());
    assert!(net.score(&images[1..], &[0, 1], 4).is_err());
    assert!(net.set_layer(0, &[1.0], &[0.0; 3]).is_err());
    let bad = NetSpec {
        height: 7,
        width: 7,
        channels: 1,
        layers: vec![LayerSpec::ConvReluPool { out_channels: 2, kernel: 3 }],
    };
    assert!(Net::new(&bad, Threads::One).is_err());
}

#[test]
fn training_is_deterministic_and_lowers_the_loss() {
    let (_, mut a) = small();
    let (_, mut b) = small();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let labels: Vec<u8> = (0..12).map(|i| (i % 3) as u8).collect();
    let images: Vec<f32> = (0..labels.len() * a.input_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let first = mean_loss(&mut a, &images, &labels);
    for _ in 0..40 {
        let la = a.train_step(&images, &labels, 0.05).unwrap();
        let lb = b.train_step(&images, &labels, 0.05).unwrap();
        assert_eq!(la.to_bits(), lb.to_bits());
    }
    let last = mean_loss(&mut a, &images, &labels);
    assert!(last < first * 0.9, "{first} -> {last}");
    for i in 0..a.num_layers() {
        assert_eq!(a.layer(i).0, b.layer(i).0);
    }
}

#[test]
fn chunking_the_batch_changes_nothing_but_rounding() {
    let (_, mut whole) = small();
    let (_, mut chunked) = small();
    chunked.set_chunk_bytes(1); // one image per chunk
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let labels: Vec<u8> = (0..7).map(|i| (i % 3) as u8).collect();
    let images: Vec<f32> = (0..labels.len() * whole.input_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for step in 0..20 {
        let a = whole.train_step(&images, &labels, 0.05).unwrap();
        let b = chunked.train_step(&images, &labels, 0.05).unwrap();
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "step {step}: loss {a} vs {b}");
    }
    for i in 0..whole.num_layers() {
        for (x, y) in whole.layer(i).0.iter().zip(chunked.layer(i).0) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "layer {i}: {x} vs {y}");
        }
    }
}

/// Every layer's weight and bias, copied.
/// Anchors `net` away from its weights (so the proximal term is far from zero), weights kept.
pub(crate) fn anchor_away(net: &mut Net) {
    let before = params(net);
    for (i, (w, b)) in before.iter().enumerate() {
        let shift = |v: &Vec<f32>| -> Vec<f32> { v.iter().map(|x| x * 0.5 - 0.01).collect() };
        net.set_layer(i, &shift(w), &shift(b)).unwrap();
    }
    net.set_anchor();
    for (i, (w, b)) in before.iter().enumerate() {
        net.set_layer(i, w, b).unwrap();
    }
}

pub(crate) fn params(net: &Net) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..net.num_layers()).map(|i| (net.layer(i).0.to_vec(), net.layer(i).1.to_vec())).collect()
}

#[test]
fn a_proximal_step_adds_minus_lr_mu_times_the_distance_to_the_anchor() {
    let (_, mut plain) = small();
    let (_, mut prox) = small();
    let w = params(&prox);
    // Anchor 2 away from every weight and bias (alternating sides), then back to the weights:
    // both nets step from the same w with w - anchor far from 0.
    for (i, (wi, bi)) in w.iter().enumerate() {
        let shift = |v: &Vec<f32>| -> Vec<f32> {
            v.iter().enumerate().map(|(j, x)| if j % 2 == 0 { x - 2.0 } else { x + 2.0 }).collect()
        };
        prox.set_layer(i, &shift(wi), &shift(bi)).unwrap();
    }
    prox.set_anchor();
    let anchor = params(&prox);
    for (i, (wi, bi)) in w.iter().enumerate() {
        prox.set_layer(i, wi, bi).unwrap();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let labels = [1u8, 0, 2, 2];
    let images: Vec<f32> = (0..labels.len() * prox.input_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let (lr, mu) = (0.5f32, 1.0f32);
    let l0 = plain.train_step(&images, &labels, lr).unwrap();
    let l1 = prox.train_step_proximal(&images, &labels, lr, mu).unwrap();
    assert_eq!(l0.to_bits(), l1.to_bits(), "the reported loss is the cross-entropy alone");
    let (after_plain, after_prox) = (params(&plain), params(&prox));
    let mut checked = 0;
    for layer in 0..w.len() {
        let tensors = |t: &Vec<(Vec<f32>, Vec<f32>)>| [t[layer].0.clone(), t[layer].1.clone()];
        let (w, a, p, q) = (tensors(&w), tensors(&anchor), tensors(&after_plain), tensors(&after_prox));
        for which in 0..2 {
            for j in 0..w[which].len() {
                // (w - lr*g - lr*mu*(w - a)) - (w - lr*g) = -lr*mu*(w - a)
                let want = -(lr as f64) * mu as f64 * (w[which][j] as f64 - a[which][j] as f64);
                let got = q[which][j] as f64 - p[which][j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs(),
                    "layer {layer} {} [{j}]: {got} vs {want}",
                    if which == 0 { "weight" } else { "bias" }
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "{checked}");
}

#[test]
fn mu_zero_is_the_plain_step_and_mu_needs_an_anchor() {
    let (_, mut plain) = small();
    let (_, mut zero) = small();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let labels = [2u8, 1, 0];
    let images: Vec<f32> = (0..labels.len() * plain.input_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    assert_eq!(zero.train_step_proximal(&images, &labels, 0.1, 0.5), Err(crate::NetError::NoAnchor));
    for _ in 0..3 {
        let a = plain.train_step(&images, &labels, 0.1).unwrap();
        let b = zero.train_step_proximal(&images, &labels, 0.1, 0.0).unwrap();
        assert_eq!(a.to_bits(), b.to_bits());
    }
    for (x, y) in params(&plain).iter().zip(params(&zero)) {
        assert!(x.0.iter().zip(&y.0).chain(x.1.iter().zip(&y.1)).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

/// McMahan et al.'s MNIST CNN with random weights (scaled by fan-in) and small biases.
pub(crate) fn cnn(algorithm: crate::ConvAlgorithm, seed: u64) -> Net {
    let spec = NetSpec::mnist_cnn(10);
    let mut net = Net::new(&spec, Threads::One).unwrap();
    net.set_conv_algorithm(algorithm);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..net.num_layers() {
        let (fan_in, _) = net.weight_shape(i);
        let s = (6.0 / fan_in as f32).sqrt();
        let (w, b) = net.layer(i);
        let w: Vec<f32> = (0..w.len()).map(|_| rng.random_range(-s..s)).collect();
        let b: Vec<f32> = (0..b.len()).map(|_| rng.random_range(-0.05f32..0.1)).collect();
        net.set_layer(i, &w, &b).unwrap();
    }
    net
}

/// Largest `|a - b|` over the largest `|b|`: the error relative to the tensor's magnitude.
pub(crate) fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let err = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale.max(f64::MIN_POSITIVE)
}

/// Winograd's results against im2col's, relative to each tensor's magnitude: F(2x2, 5x5) in f32
/// measured at most a few 1e-6 here; the bound leaves a margin for other data.
const WINOGRAD_TOLERANCE: f64 = 3e-5;

#[test]
fn winograd_matches_im2col_forward_and_after_a_step() {
    use crate::ConvAlgorithm::{Im2col, Winograd};
    let mut worst = [0.0f64; 3];
    for (batch, chunk_bytes) in [(1, None), (3, None), (10, None), (10, Some(1)), (64, None), (64, Some(64 << 20))] {
        for mu in [0.0f32, 0.5] {
            let (mut slow, mut fast) = (cnn(Im2col, 20), cnn(Winograd, 20));
            if let Some(bytes) = chunk_bytes {
                // One image per chunk, or the whole batch in one.
                fast.set_chunk_bytes(bytes);
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21 + batch as u64);
            let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
            let images: Vec<f32> = (0..batch * slow.input_len()).map(|_| rng.random_range(-1.0f32..2.0)).collect();
            let (mut want, mut got) = (Vec::new(), Vec::new());
            slow.logits(&images, &mut want).unwrap();
            fast.logits(&images, &mut got).unwrap();
            let e = relative_error(&got, &want);
            assert!(e <= WINOGRAD_TOLERANCE, "batch {batch}: logits off by {e:e}");
            worst[0] = worst[0].max(e);
            let before = params(&slow);
            if mu != 0.0 {
                anchor_away(&mut slow);
                anchor_away(&mut fast);
            }
            let lr = 0.1;
            let l0 = slow.train_step_proximal(&images, &labels, lr, mu).unwrap();
            let l1 = fast.train_step_proximal(&images, &labels, lr, mu).unwrap();
            assert!(((l0 - l1) as f64).abs() <= WINOGRAD_TOLERANCE * l0.abs() as f64, "loss {l0} vs {l1}");
            // The step (after - before) of every tensor: the first layer's depends on the
            // second's input gradient, the second's on its weight gradient.
            for (layer, ((s, f), b)) in params(&slow).iter().zip(params(&fast)).zip(&before).enumerate() {
                for (which, (s, f, b)) in [(&s.0, &f.0, &b.0), (&s.1, &f.1, &b.1)].into_iter().enumerate() {
                    let ds: Vec<f32> = s.iter().zip(b).map(|(x, y)| x - y).collect();
                    let df: Vec<f32> = f.iter().zip(b).map(|(x, y)| x - y).collect();
                    let e = relative_error(&df, &ds);
                    assert!(
                        e <= WINOGRAD_TOLERANCE,
                        "batch {batch} mu {mu} layer {layer} {}: step off by {e:e}",
                        ["weight", "bias"][which]
                    );
                    worst[1 + which] = worst[1 + which].max(e);
                }
            }
        }
    }
    eprintln!("worst relative errors: logits {:e}, weight steps {:e}, bias steps {:e}", worst[0], worst[1], worst[2]);
}

#[test]
fn winograd_is_bit_for_bit_repeatable() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(30);
    let labels: Vec<u8> = (0..10).map(|_| rng.random_range(0..10u8)).collect();
    let images: Vec<f32> = (0..labels.len() * 784).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let run = || {
        let mut net = cnn(crate::ConvAlgorithm::Winograd, 31);
        let losses: Vec<u32> = (0..3).map(|_| net.train_step(&images, &labels, 0.05).unwrap().to_bits()).collect();
        (losses, params(&net))
    };
    let (a, b) = (run(), run());
    assert_eq!(a.0, b.0);
    for (x, y) in a.1.iter().zip(&b.1) {
        assert!(x.0.iter().zip(&y.0).chain(x.1.iter().zip(&y.1)).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
