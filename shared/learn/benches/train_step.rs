//! Local training speed on the CPU: one epoch of 100 examples in minibatches of 10, i.e. 10 SGD
//! steps, for each McMahan model, on the fused kernels (`cpu`) and on burn's flex backend.
//! `fedge-sim bench-train` measures the same against PyTorch.
//!
//! `cargo bench -p fedge-learn --bench train_step`. Divide by 10 for one step.

#![allow(missing_docs)] // criterion_main! generates an undocumented main

use criterion::{Criterion, criterion_group, criterion_main};
use fedge_core::dataset::embedded;
use fedge_core::rng::derive_rng;
use fedge_core::wire::TrainConfig;
use fedge_learn::{BackendKind, ModelKind, Trainer};

fn bench(c: &mut Criterion) {
    let data = embedded::mnist_subset().unwrap();
    let idx: Vec<usize> = (0..100).collect();
    let config = TrainConfig::sgd(1, 10, 0.01);
    let mut g = c.benchmark_group("train_10_steps_b10");
    g.sample_size(20);
    for backend in [BackendKind::Cpu, BackendKind::Flex] {
        for kind in [ModelKind::TwoNn, ModelKind::Cnn] {
            let mut t = Trainer::new(kind, 10, backend).unwrap();
            let start = t.initial_params(0);
            let mut rng = derive_rng(0, &[]);
            g.bench_function(format!("{kind}/{backend}"), |b| {
                b.iter(|| t.train(&start, &data.train, &idx, &config, &mut rng).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
