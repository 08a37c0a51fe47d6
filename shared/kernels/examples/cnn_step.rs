//! Samples/s of one CNN training step (McMahan et al.'s MNIST CNN, random data, one thread)
//! with each convolution algorithm, alternating in one process, best of each: the A/B of
//! `fedge_kernels::ConvAlgorithm`.
//! `cargo run --release -p fedge-kernels --example cnn_step -- [batch ...] [--rounds N] [--seconds S] [--only im2col|winograd]`
use fedge_kernels::{ConvAlgorithm, LayerSpec, Net, NetSpec, Threads};
use std::time::Instant;

fn main() {
    let mut batches = Vec::new();
    let (mut rounds, mut seconds) = (4usize, 1.0f64);
    let mut algos = vec![ConvAlgorithm::Im2col, ConvAlgorithm::Winograd];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            // One algorithm only (for a profiler).
            "--only" => {
                algos = match args.next().as_deref() {
                    Some("im2col") => vec![ConvAlgorithm::Im2col],
                    Some("winograd") => vec![ConvAlgorithm::Winograd],
                    _ => panic!("--only im2col|winograd"),
                }
            }
            b => batches.push(b.parse::<usize>().expect("a batch size")),
        }
    }
    if batches.is_empty() {
        batches = vec![10, 64];
    }
    let spec = NetSpec {
        height: 28,
        width: 28,
        channels: 1,
        layers: vec![
            LayerSpec::ConvReluPool { out_channels: 32, kernel: 5 },
            LayerSpec::ConvReluPool { out_channels: 64, kernel: 5 },
            LayerSpec::Dense { outputs: 512, relu: true },
            LayerSpec::Dense { outputs: 10, relu: false },
        ],
    };
    // A cheap deterministic generator: the data's values do not matter to the speed.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for batch in batches {
        let mut nets: Vec<(ConvAlgorithm, Net, f64)> = algos
            .iter()
            .copied()
            .map(|algo| {
                let mut net = Net::new(&spec, Threads::One).unwrap();
                net.set_conv_algorithm(algo);
                (algo, net, 0.0)
            })
            .collect();
        for i in 0..nets[0].1.num_layers() {
            let (fan_in, _) = nets[0].1.weight_shape(i);
            let s = (6.0 / fan_in as f32).sqrt();
            let w: Vec<f32> = (0..nets[0].1.layer(i).0.len()).map(|_| (next() * 2.0 - 1.0) * s).collect();
            let b = vec![0.01; nets[0].1.layer(i).1.len()];
            for (_, net, _) in &mut nets {
                net.set_layer(i, &w, &b).unwrap();
            }
        }
        let images: Vec<f32> = (0..batch * 784).map(|_| next()).collect();
        let labels: Vec<u8> = (0..batch).map(|i| (i % 10) as u8).collect();
        for _ in 0..rounds {
            for (_, net, best) in &mut nets {
                let start = Instant::now();
                let mut steps = 0;
                while start.elapsed().as_secs_f64() < seconds {
                    net.train_step(&images, &labels, 0.01).unwrap();
                    steps += 1;
                }
                *best = best.max((steps * batch) as f64 / start.elapsed().as_secs_f64());
            }
        }
        let base = nets[0].2;
        for (algo, _, best) in &nets {
            println!("batch {batch:>3} {algo:?}: {best:>7.0} samples/s ({:.2}x)", best / base);
        }
    }
}
