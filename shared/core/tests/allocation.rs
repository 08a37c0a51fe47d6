//! Fuzzing regressions about memory (`fuzz/`): input that announces a large size must not make
//! the readers allocate it before the bytes are there. An instrumented global allocator
//! (`stats_alloc`) counts the bytes allocated while each input is read.

use std::alloc::System;
use std::sync::Mutex;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// One measurement at a time (tests run on several threads).
static MEASURING: Mutex<()> = Mutex::new(());

/// The bytes allocated (in all, not net) while `f` runs.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let _one = MEASURING.lock().unwrap_or_else(|p| p.into_inner());
    let region = Region::new(GLOBAL);
    let out = f();
    (out, region.change().bytes_allocated)
}

#[test]
fn an_idx_header_announcing_a_gigabyte_does_not_allocate_it() {
    // u8, two dimensions of 32,768: 1 GiB announced, no values.
    let header = [0, 0, 0x08, 2, 0, 0, 0x80, 0, 0, 0, 0x80, 0];
    let (read, largest) = allocated_by(|| fedge_core::dataset::idx::read(&header[..]));
    assert!(read.unwrap_err().contains("truncated"));
    assert!(largest <= 2 << 20, "allocated {largest} bytes for a 12-byte input");
}

#[test]
fn a_short_message_announcing_a_long_vector_does_not_allocate_it() {
    // A `ModelChunk` whose byte string announces 200 MB: refused by the codec's limit.
    let mut bytes = fedge_core::codec::encode(&fedge_core::wire::Message::ModelChunk {
        version: 1,
        hash: fedge_core::params::ContentHash([0; 32]),
        total_len: 1,
        offset: 0,
        bytes: Vec::new(),
    });
    bytes.pop(); // the empty byte string's length, one zero byte
    bytes.extend([253]); // a u64 length follows
    bytes.extend(200_000_000u64.to_le_bytes());
    let (decoded, largest) = allocated_by(|| fedge_core::codec::decode(&bytes));
    assert!(decoded.is_err());
    assert!(largest <= 1 << 20, "allocated {largest} bytes for a {}-byte input", bytes.len());
}

#[test]
fn a_quantised_model_announcing_a_huge_tensor_does_not_allocate_it() {
    use fedge_core::TensorSpec;
    use fedge_core::quant::{QTensor, QuantizedModel};
    // Found by the `record` fuzz target: the specs announce 2^40 values, none are stored.
    let q = QuantizedModel {
        specs: vec![TensorSpec { name: "w".into(), shape: vec![1 << 20, 1 << 20] }],
        tensors: vec![QTensor::F32(Vec::new())],
    };
    let (dequantized, allocated) = allocated_by(|| q.dequantize());
    assert!(dequantized.is_err());
    assert!(allocated <= 1 << 20, "allocated {allocated} bytes for an empty tensor");
}
