//! PNG input, as `fedge-edge predict --png` and the device's inference server
//! (`Content-Type: image/png`) hand it over: decoding never panics, never allocates past its
//! limits (`-malloc_limit_mb`), and an image that decodes becomes exactly one 28x28 input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pixels) = fedge_edge::predict::decode_png(data) {
        assert_eq!(pixels.len(), 28 * 28);
    }
});
