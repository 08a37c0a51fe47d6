//! Dataset files (IDX, plain or gzip'd) as a user or a download hands them over: reading never
//! panics, and what reads back has as many values as its dimensions say.
#![no_main]

use fedge_core::dataset::idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for read in [idx::read(data), idx::read_gz_bytes(data)] {
        if let Ok(a) = read {
            assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
    }
});
