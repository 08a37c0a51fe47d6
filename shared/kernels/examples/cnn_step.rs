//! Samples/s of one CNN training step (McMahan et al.'s MNIST CNN, random data, one thread
//! unless `--threads` says more) with each convolution algorithm, alternating in one process,
//! best of each: the A/B of `fedge_kernels::ConvAlgorithm`, or of thread counts (`--threads
//! 1,2`: each variant at each count, `Threads::Rayon(n)` for n > 1, the batch split). Also
//! the process's CPU time per sample (Linux), which a busy machine disturbs less than the
//! wall clock: a split step's extra work shows there.
//! `cargo run --release -p fedge-kernels --example cnn_step -- [batch ...] [--rounds N] [--seconds S] [--variant ALGO[:CHUNK_BYTES] ...] [--threads N,...]`
use fedge_kernels::{ConvAlgorithm, Net, NetSpec, Threads};
use std::time::Instant;

fn main() {
    let mut batches = Vec::new();
    let (mut rounds, mut seconds) = (4usize, 1.0f64);
    let mut variants: Vec<(ConvAlgorithm, Option<usize>)> = Vec::new();
    let mut thread_counts = vec![1usize];
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
            "--threads" => {
                let v = args.next().expect("--threads N,...");
                thread_counts = v.split(',').map(|n| n.parse().expect("a thread count")).collect();
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
        let mut nets: Vec<(String, Net, (f64, f64))> = variants
            .iter()
            .flat_map(|&v| thread_counts.iter().map(move |&t| (v, t)))
            .map(|((algo, bytes), t)| {
                let mut net = Net::new(&spec, if t > 1 { Threads::Rayon(t) } else { Threads::One }).unwrap();
                net.set_conv_algorithm(algo);
                if let Some(bytes) = bytes {
                    net.set_chunk_bytes(bytes);
                }
                let name = format!("{algo:?}{} threads {t}", bytes.map_or(String::new(), |b| format!(" chunk {b}")));
                (name, net, (0.0, f64::INFINITY))
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
            for (_, net, (best, cpu_best)) in &mut nets {
                let (start, cpu0) = (Instant::now(), cpu_seconds());
                let mut steps = 0;
                while start.elapsed().as_secs_f64() < seconds {
                    net.train_step(&images, &labels, 0.01).unwrap();
                    steps += 1;
                }
                *best = best.max((steps * batch) as f64 / start.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
                    *cpu_best = cpu_best.min((b - a) / (steps * batch) as f64);
                }
            }
        }
        let (base, cpu_base) = nets[0].2;
        for (name, _, (best, cpu)) in &nets {
            println!(
                "batch {batch:>3} {name}: {best:>7.0} samples/s ({:.2}x), {:.0} us CPU a sample ({:.2}x)",
                best / base,
                cpu * 1e6,
                cpu / cpu_base
            );
        }
    }
}

/// The process's user + system CPU seconds so far (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
