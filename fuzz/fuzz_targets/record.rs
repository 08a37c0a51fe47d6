//! Durable records and signed objects read back from disk or a peer: registry records,
//! promotions and quantised student blobs decode without panicking, and a quantised model
//! that decodes also dequantises without panicking.
#![no_main]

use fedge_core::codec;
use fedge_core::quant::QuantizedModel;
use fedge_core::registry::{ModelRecord, Promotion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = codec::decode_record::<ModelRecord>(data) {
        let _ = r.signing_payload();
    }
    if let Ok(p) = codec::decode_value::<Promotion>(data) {
        assert_eq!(codec::decode_value::<Promotion>(&codec::encode_value(&p)).unwrap(), p);
    }
    if let Ok(q) = codec::decode_value::<QuantizedModel>(data) {
        let _ = q.dequantize();
    }
});
