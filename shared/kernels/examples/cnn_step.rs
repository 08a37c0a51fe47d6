//! Samples/s of one CNN training step (McMahan et al.'s MNIST CNN, random data, one thread)
//! with each convolution algorithm, alternating in one process, best of each: the A/B of
//! `fedge_kernels::ConvAlgorithm`.
//! `cargo run --release -p fedge-kernels --example cnn_step -- [batch ...] [--rounds N] [--seconds S] [--variant ALGO[:CHUNK_BYTES] ...]`
use fedge_kernels::{ConvAlgorithm, Net, NetSpec, Threads};
use std::time::Instant;

fn main() {
    let mut batches = Vec::new();
    let (mut rounds, mut seconds) = (4usize, 1.0f64);
    let mut variants: Vec<(ConvAlgorithm, Option<usize>)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            // What to compare (default both algorithms): `im2col` or `winograd`, optionally
            // with the chunk size, `winograd:4000000`. One alone suits a profiler.
            "--variant" => {
                let v = args.next().expect("--variant ALGO[:CHUNK_BYTES]");
                let (algo, bytes) = v.split_once(':').map_or((&v[..], None), |(a, b)| (a, b.parse().ok()));
                let algo = match algo {
                    "im2col" => ConvAlgorithm::Im2col,
                    "winograd" => ConvAlgorithm::Winograd,
                    _ => panic!("--variant im2col|winograd[:CHUNK_BYTES]"),
                };
                variants.push((algo, bytes));
            }
            b => batches.push(b.parse::<usize>().expect("a batch size")),
        }
    }
    if variants.is_empty() {
        variants = vec![(ConvAlgorithm::Im2col, None), (ConvAlgorithm::Winograd, None)];
    }
    if batches.is_empty() {
        batches = vec![10, 64];
    }
    let spec = NetSpec::mnist_cnn(10);
    // A cheap deterministic generator: the data's values do not matter to the speed.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for batch in batches {
        let mut nets: Vec<(String, Net, f64)> = variants
            .iter()
            .map(|&(algo, bytes)| {
                let mut net = Net::new(&spec, Threads::One).unwrap();
                net.set_conv_algorithm(algo);
                if let Some(bytes) = bytes {
                    net.set_chunk_bytes(bytes);
                }
                let name = format!("{algo:?}{}", bytes.map_or(String::new(), |b| format!(" chunk {b}")));
                (name, net, 0.0)
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
        for (name, _, best) in &nets {
            println!("batch {batch:>3} {name}: {best:>7.0} samples/s ({:.2}x)", best / base);
        }
    }
}
