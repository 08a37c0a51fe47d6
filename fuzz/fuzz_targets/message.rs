//! A frame's body as it arrives from a peer: decoding never panics and never allocates far
//! more than the input (run with `-malloc_limit_mb`), a decoded message encodes to bytes that
//! decode to the same message (bincode also accepts longer-than-needed varints, so the bytes
//! themselves may differ: nothing signs or compares received bytes), and its canonical first
//! byte names its frame kind.
#![no_main]

use fedge_core::codec::{self, FrameKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = codec::decode(data) {
        let again = codec::decode(&codec::encode(&message)).expect("an encoded message decodes");
        // Compared through Debug: a NaN in a float field is not equal to itself.
        assert_eq!(format!("{again:?}"), format!("{message:?}"));
        // Its canonical encoding announces its kind. (A longer-than-needed variant index reads
        // as `Unknown`, whose frames get the small limit: no way to a larger one.)
        assert_ne!(FrameKind::of_first_byte(codec::encode(&message)[0]), FrameKind::Unknown);
    }
});
