//! Streaming FedAvg throughput beside a plain memcpy of the same bytes, and the wire codec.
//!
//! `cargo bench -p fedge-core --bench aggregate`. Criterion prints each as GB/s of update bytes
//! (4 bytes per parameter); docs/benchmarks.md records the ratio to memcpy.

#![allow(missing_docs)] // criterion_main! generates an undocumented main

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedge_core::aggregate::WeightedMean;
use fedge_core::codec;
use fedge_core::wire::{Message, TrainResult};
use fedge_core::{ModelParams, ParamLayout, TensorSpec};

fn params(n: usize) -> ModelParams {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap());
    ModelParams::new(layout, (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect()).unwrap()
}

fn bench(c: &mut Criterion) {
    for (model, n) in [("2nn", 199_210usize), ("cnn", 1_663_370)] {
        let update = params(n);
        let mut g = c.benchmark_group(format!("aggregate/{model}"));
        g.throughput(Throughput::Bytes(4 * n as u64));
        let mut dst = vec![0f32; n];
        g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(update.data()))));
        let mut acc = WeightedMean::new(update.layout().clone());
        g.bench_function("fedavg_add", |b| b.iter(|| acc.add(black_box(&update), 600.0).unwrap()));
        let msg = Message::TrainResult(TrainResult {
            round: 1,
            model_version: 1,
            num_samples: 600,
            train_loss: 0.1,
            delta: update.clone(),
            clipped: false,
        });
        g.bench_function("encode", |b| b.iter(|| codec::encode(black_box(&msg))));
        let bytes = codec::encode(&msg);
        g.bench_function("decode", |b| b.iter(|| codec::decode(black_box(&bytes)).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
