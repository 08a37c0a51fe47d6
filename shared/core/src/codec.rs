//! The wire codec: bincode 2 (pinned) with a hard size limit, in this one module so it can be
//! swapped.
//!
//! Every length is checked against the limit before anything is allocated: a peer cannot make
//! us reserve more memory than [`MAX_MESSAGE_BYTES`] by lying in a length prefix. Parameter
//! blocks are raw little-endian `f32`.

use std::sync::Arc;

use bincode::de::{Decoder, read::Reader};
use bincode::enc::{Encoder, write::Writer};
use bincode::error::{DecodeError as BinDecodeError, EncodeError};
use bincode::{Decode, Encode};
use thiserror::Error;

use crate::params::{ContentHash, ModelParams, ParamLayout, TensorSpec, extend_f32s_from_le_bytes, f32s_to_le_bytes};
use crate::registry::{ModelRecord, Promotion};
use crate::wire::Message;

/// Largest message accepted: 256 MiB, room for a 64M-parameter model.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Decodes from `bytes` under a limit that grows with them: the containers of a value decoded
/// from `n` bytes may claim at most `max(64 KiB, 8 n)` rounded up to a power of four (8: a
/// `Vec<u64>` of one-byte varints claims 8 bytes per byte read), never more than
/// [`MAX_MESSAGE_BYTES`]. A container is allocated when its length is read, before its
/// elements: under one fixed 256 MiB limit, a 53-byte message announcing a long vector made
/// the decoder allocate hundreds of megabytes before finding the bytes missing (found by the
/// `message` fuzz target).
fn decode_from_slice_bounded<T: Decode<()>>(bytes: &[u8]) -> Result<(T, usize), BinDecodeError> {
    let base = bincode::config::standard().with_little_endian().with_variable_int_encoding();
    macro_rules! tiers {
        ($($limit:literal),*) => {
            $(if bytes.len().saturating_mul(8) <= $limit {
                return bincode::decode_from_slice(bytes, base.with_limit::<$limit>());
            })*
        };
    }
    tiers!(65_536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864);
    bincode::decode_from_slice(bytes, config())
}

/// Why bytes could not be decoded.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// More bytes than the limit.
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// Not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] BinDecodeError),
}

/// Encodes a message.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Reserve the parameter block up front: no regrowth copies for multi-megabyte updates.
    let hint = match msg {
        Message::TrainResult(r) => 4 * r.delta.numel() + 64 * (r.delta.layout().specs().len() + 1),
        Message::Model { params, .. } => 4 * params.numel() + 64 * (params.layout().specs().len() + 2),
        _ => 256,
    };
    let mut out = Vec::with_capacity(hint);
    bincode::encode_into_std_write(msg, &mut out, config()).expect("encoding into a Vec cannot fail");
    out
}

/// Encodes any codec value (a quantised model, a registry record) with the wire settings.
pub fn encode_value<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, config()).expect("encoding into a Vec cannot fail")
}

/// Decodes a value written by [`encode_value`] that must span `bytes` exactly, under the same
/// size limit as messages.
pub fn decode_value<T: Decode<()>>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (value, used) = decode_from_slice_bounded(bytes)?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Largest durable record read back with [`decode_record`] (the coordinator's stored
/// settings and round records): 1 MiB.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

fn record_config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<MAX_RECORD_BYTES>()
}

/// Decodes a durable record written by [`encode_value`] (the same byte format) that must span
/// `bytes` exactly, under the smaller [`MAX_RECORD_BYTES`] limit.
pub fn decode_record<T: Decode<()>>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::decode_from_slice(bytes, record_config())?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes one message that must span `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_value(bytes)
}

/// What a frame holds, told from its first byte before the rest has arrived: enough for a
/// reader to choose the frame's size limit before reading (or allocating for) its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `TrainResult`: as large as the model's delta.
    TrainResult,
    /// `InferRequest`: as large as its image.
    InferRequest,
    /// `Model`: a whole model.
    Model,
    /// `ModelChunk` or `BlobChunk`: at most the chunk asked for.
    Chunk,
    /// Operator answers (`Status`, `Devices`, `Models`): grow with history and fleet.
    Listing,
    /// `SecureReady`, `SecureStep` or `SecureSend`: a secure-aggregation stage's message, as
    /// large as a masked update (up to 10 bytes a coordinate), a neighbourhood's keys and shares,
    /// or a relaying aggregator's members (up to 10 bytes each).
    Secure,
    /// Any other message: small, fixed-size fields.
    Small,
    /// No message starts with this byte.
    Unknown,
}

impl FrameKind {
    /// The kind of message whose encoding starts with `first` (bincode writes the variant
    /// index first, as a varint: one byte, for the fewer than 251 variants).
    pub fn of_first_byte(first: u8) -> Self {
        match first {
            1 => Self::TrainResult,
            20 => Self::InferRequest,
            12 => Self::Model,
            10 | 14 => Self::Chunk,
            17..=19 => Self::Listing,
            25 | 27 | 28 => Self::Secure,
            0 | 2..=9 | 11 | 13 | 15 | 16 | 21..=24 | 26 => Self::Small,
            _ => Self::Unknown,
        }
    }
}

/// The encoding of `Message::ModelChunk { version, hash, total_len, offset, bytes }` up to (not
/// including) `bytes` itself, for a chunk of `len` bytes: a sender writes this prefix and then
/// the bytes straight from a buffer it already holds, with no copy into a message.
pub fn model_chunk_prefix(version: u64, hash: ContentHash, total_len: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = encode(&Message::ModelChunk { version, hash, total_len, offset, bytes: Vec::new() });
    // The empty byte string is encoded last, as its length: one zero byte.
    debug_assert_eq!(out.last(), Some(&0));
    out.pop();
    bincode::encode_into_std_write(len as u64, &mut out, config()).expect("encoding into a Vec cannot fail");
    out
}

/// Domain separation for model signatures.
const SIGNING_DOMAIN: &[u8] = b"fedge model record v1\0";

// The canonical signing payload is a byte format, so it lives here rather than in
// `registry.rs` (which the codec, through `wire`, depends on).
impl ModelRecord {
    /// The bytes the signature covers: the domain tag and every field fixed at registration.
    pub fn signing_payload(&self) -> Vec<u8> {
        let fixed = (
            self.version,
            self.role,
            self.architecture.as_str(),
            self.format,
            self.parent,
            self.round,
            self.epsilon.map(f64::to_bits),
            self.parameters,
            self.size_bytes,
            self.sha256.0,
            self.created_at,
        );
        let mut out = SIGNING_DOMAIN.to_vec();
        out.extend(encode_value(&fixed));
        out
    }
}

/// Domain separation for promotion signatures.
const PROMOTION_DOMAIN: &[u8] = b"fedge promotion v1\0";

impl Promotion {
    /// The bytes the signature covers: the domain tag, the sequence number and the version.
    pub fn signing_payload(&self) -> Vec<u8> {
        let mut out = PROMOTION_DOMAIN.to_vec();
        out.extend(encode_value(&(self.sequence, self.version)));
        out
    }
}

const CHUNK: usize = 16 * 1024;

impl Encode for ModelParams {
    fn encode<E: Encoder>(&self, encoder: &mut E) -> Result<(), EncodeError> {
        self.layout().specs().encode(encoder)?;
        (self.numel() as u64).encode(encoder)?;
        let mut buf = vec![0u8; CHUNK * 4];
        for chunk in self.data().chunks(CHUNK) {
            let bytes = &mut buf[..chunk.len() * 4];
            f32s_to_le_bytes(chunk, bytes);
            encoder.writer().write(bytes)?;
        }
        Ok(())
    }
}

impl<Context> Decode<Context> for ModelParams {
    fn decode<D: Decoder<Context = Context>>(decoder: &mut D) -> Result<Self, BinDecodeError> {
        let specs: Vec<TensorSpec> = Vec::decode(decoder)?;
        let layout = ParamLayout::new(specs).map_err(|e| BinDecodeError::OtherString(e.to_string()))?;
        let len = u64::decode(decoder)? as usize;
        if len != layout.numel() {
            return Err(BinDecodeError::OtherString(format!(
                "parameter block has {len} values, layout needs {}",
                layout.numel()
            )));
        }
        // Bounded by the limit before the allocation below.
        decoder.claim_container_read::<f32>(len)?;
        let mut data = Vec::with_capacity(len);
        let mut buf = vec![0u8; CHUNK * 4];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            decoder.reader().read(&mut buf[..n * 4])?;
            extend_f32s_from_le_bytes(&mut data, &buf[..n * 4]);
            left -= n;
        }
        ModelParams::new(Arc::new(layout), data).map_err(|e| BinDecodeError::OtherString(e.to_string()))
    }
}

impl<'de, Context> bincode::BorrowDecode<'de, Context> for ModelParams {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, BinDecodeError> {
        <Self as Decode<Context>>::decode(decoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ContentHash;
    use crate::wire::{ErrorCode, TrainConfig, TrainResult, TrainTask};
    use proptest::prelude::*;

    /// Fuzzing regression (`fuzz/`, target `message`): 53 bytes announcing a vector of
    /// hundreds of megabytes are refused by the limit before anything is allocated (before the
    /// fix the decoder allocated the announced length, then found the bytes missing).
    #[test]
    fn a_short_message_cannot_announce_a_large_allocation() {
        let bytes = [
            12, 2, 105, 249, 206, 31, 125, 223, 104, 180, 107, 130, 54, 107, 191, 107, 130, 54, 107, 191, 222, 103,
            241, 63, 144, 1, 28, 161, 141, 54, 35, 4, 154, 53, 252, 126, 2, 64, 0, 131, 58, 0, 0, 240, 192, 0, 0, 128,
            194, 252, 0, 128, 63,
        ];
        match decode(&bytes) {
            Err(DecodeError::Malformed(BinDecodeError::LimitExceeded)) => {}
            other => panic!("{other:?}"),
        }
        // A real message of every size still decodes (the limit grows with the input).
        for n in [1, 100, 10_000, 3_000_000] {
            let m = Message::Model { version: 1, hash: ContentHash([0; 32]), params: params(n) };
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn frame_kinds_match_the_encoding() {
        use crate::wire::{InferRequest, OperatorCommand};
        let kind = |m: &Message| FrameKind::of_first_byte(encode(m)[0]);
        let result = TrainResult {
            round: 1,
            model_version: 0,
            num_samples: 1,
            train_loss: 0.0,
            delta: params(2),
            clipped: false,
        };
        assert_eq!(kind(&Message::TrainResult(result)), FrameKind::TrainResult);
        let infer = InferRequest { rows: 1, cols: 1, pixels: vec![0] };
        assert_eq!(kind(&Message::InferRequest(infer)), FrameKind::InferRequest);
        let model = Message::Model { version: 1, hash: ContentHash([0; 32]), params: params(2) };
        assert_eq!(kind(&model), FrameKind::Model);
        let chunk =
            Message::ModelChunk { version: 1, hash: ContentHash([0; 32]), total_len: 1, offset: 0, bytes: vec![] };
        assert_eq!(kind(&chunk), FrameKind::Chunk);
        let blob = Message::BlobChunk { version: 1, total_len: 1, offset: 0, bytes: vec![] };
        assert_eq!(kind(&blob), FrameKind::Chunk);
        assert_eq!(kind(&Message::Devices(vec![])), FrameKind::Listing);
        assert_eq!(kind(&Message::Models(vec![])), FrameKind::Listing);
        for small in [
            Message::TaskRequest { running: None },
            Message::Error { code: ErrorCode::Malformed, message: String::new() },
            Message::Ack { round: 1 },
            Message::Operator(OperatorCommand::Status),
            Message::ModelRequest { version: None },
            Message::ModelChunkRequest { version: 1, offset: 0, max_len: 1 },
            Message::DeployedRequest { version: 1 },
            Message::BlobChunkRequest { version: 1, offset: 0, max_len: 1 },
            Message::Ping { nonce: 1 },
            Message::Pong { nonce: 1 },
            Message::NoTask { retry_after_ms: 1, model_version: 0, deployed: None },
            Message::RegionalRequest,
            Message::SecurePoll { round: 1, member: None },
            Message::SecurePoll { round: 1, member: Some(8) },
        ] {
            assert_eq!(kind(&small), FrameKind::Small, "{small:?}");
        }
        // A relaying aggregator's members may run to tens of thousands.
        for ready in [None, Some(vec![4, 8])] {
            let ready = Message::SecureReady { round: 1, model_version: 0, members: ready };
            assert_eq!(kind(&ready), FrameKind::Secure);
        }
        let step = Message::SecureStep { round: 1, step: fedge_secagg::ServerMessage::Wait };
        assert_eq!(kind(&step), FrameKind::Secure);
        let masked = fedge_secagg::MaskedInput { device: 0, masked: vec![1, 2], rejected: vec![] };
        let send = Message::SecureSend { round: 1, member: None, msg: fedge_secagg::ClientMessage::Masked(masked) };
        assert_eq!(kind(&send), FrameKind::Secure);
        assert_eq!(FrameKind::of_first_byte(29), FrameKind::Unknown);
        assert_eq!(FrameKind::of_first_byte(0xff), FrameKind::Unknown);
    }

    fn params(n: usize) -> ModelParams {
        let layout = ParamLayout::new(vec![
            TensorSpec { name: "a.weight".into(), shape: vec![n, 2] },
            TensorSpec { name: "a.bias".into(), shape: vec![2] },
        ])
        .unwrap();
        ModelParams::new(Arc::new(layout), (0..2 * n + 2).map(|i| i as f32 * 0.25 - 3.0).collect()).unwrap()
    }

    fn result(n: usize) -> Message {
        Message::TrainResult(TrainResult {
            round: 3,
            model_version: 2,
            num_samples: 600,
            train_loss: 0.5,
            delta: params(n),
            clipped: true,
        })
    }

    #[test]
    fn round_trips() {
        let msgs = [
            result(1000),
            Message::TrainTask(TrainTask {
                round: 1,
                model_version: 0,
                model_hash: ContentHash([7; 32]),
                config: TrainConfig {
                    epochs: 5,
                    batch_size: 10,
                    learning_rate: 0.1,
                    clip_norm: Some(1.0),
                    local_dp: None,
                    proximal_mu: Some(0.01),
                },
                secure: Some(crate::wire::SecureTask { weight_cap: 600, noise_std: Some(0.25) }),
            }),
            Message::Error { code: ErrorCode::StaleModel, message: "old".into() },
            Message::SecureReady { round: 3, model_version: 2, members: None },
            Message::SecurePoll { round: 3, member: None },
            Message::SecureStep {
                round: 3,
                step: fedge_secagg::ServerMessage::Begin {
                    config: fedge_secagg::weighting::round_config(5, 11, 1.0, 1024.0, None, None).unwrap(),
                    seed: [9; 32],
                    id: 4,
                },
            },
            Message::SecureSend {
                member: None,
                round: 3,
                msg: fedge_secagg::ClientMessage::Advertise(fedge_secagg::AdvertiseKeys {
                    device: 4,
                    mask_pk: [1; 32],
                    enc_pk: [2; 32],
                }),
            },
        ];
        for m in msgs {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn tensors_travel_as_raw_f32() {
        // 2002 values: the encoding is the values' 8008 bytes plus a small header.
        let bytes = encode(&result(1000));
        assert!(bytes.len() >= 8008 && bytes.len() < 8008 + 64, "{}", bytes.len());
    }

    #[test]
    fn a_chunk_prefix_and_its_bytes_are_the_whole_message() {
        let hash = params(3).content_hash();
        for len in [0usize, 1, 250, 251, 65_535, 65_536, 300_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let whole =
                encode(&Message::ModelChunk { version: 7, hash, total_len: 1 << 33, offset: 99, bytes: bytes.clone() });
            let mut parts = model_chunk_prefix(7, hash, 1 << 33, 99, len);
            parts.extend_from_slice(&bytes);
            assert_eq!(parts, whole, "chunk of {len} bytes");
        }
    }

    #[test]
    fn bad_bytes_are_errors() {
        let good = encode(&result(10));
        assert!(matches!(decode(&good[..good.len() - 1]), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(&[good.clone(), vec![0]].concat()), Err(DecodeError::Trailing(1))));
        assert!(matches!(decode(&[200]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn lying_lengths_do_not_allocate() {
        // A TrainResult whose tensor claims 2^40 elements, in a 60-byte message.
        let mut bytes = vec![1u8, 3, 2, 0x00]; // variant, round, version, num_samples
        bytes.extend_from_slice(&0.5f32.to_le_bytes());
        bytes.push(1); // one spec
        bytes.push(1);
        bytes.push(b'x');
        bytes.push(1); // one dim
        bytes.push(253); // u64 follows
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        bytes.push(253);
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
        // Shapes whose product overflows are refused too.
        let mut bytes = vec![1u8, 3, 2, 0x00];
        bytes.extend_from_slice(&0.5f32.to_le_bytes());
        bytes.extend_from_slice(&[1, 1, b'x', 2, 253]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.push(253);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&bytes).is_err());
    }

    #[test]
    fn oversized_input_is_refused_up_front() {
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn corrupting_an_encoding_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut b = encode(&result(20));
            let p = pos % b.len();
            b[p] = byte;
            let _ = decode(&b);
        }
    }
}

#[cfg(test)]
mod signing_tests {
    use super::*;
    use crate::registry::{BlobFormat, ModelRole};

    fn record() -> ModelRecord {
        ModelRecord {
            version: 7,
            role: ModelRole::Student,
            architecture: "mlp".into(),
            format: BlobFormat::Int8,
            parent: Some(6),
            round: 6,
            accuracy: Some(0.9),
            latency_us: None,
            epsilon: Some(1.5),
            parameters: 50_890,
            size_bytes: 51_570,
            sha256: ContentHash::of_bytes(b"blob"),
            created_at: 1_800_000_000,
            signature: vec![1, 2, 3],
        }
    }

    #[test]
    fn the_payload_covers_every_fixed_field_but_not_accuracy_or_signature() {
        let r = record();
        let base = r.signing_payload();
        assert!(base.starts_with(SIGNING_DOMAIN));
        let changed = [
            ModelRecord { version: 8, ..r.clone() },
            ModelRecord { role: ModelRole::Global, ..r.clone() },
            ModelRecord { architecture: "2nn".into(), ..r.clone() },
            ModelRecord { format: BlobFormat::F32, ..r.clone() },
            ModelRecord { parent: None, ..r.clone() },
            ModelRecord { round: 5, ..r.clone() },
            ModelRecord { epsilon: Some(1.6), ..r.clone() },
            ModelRecord { size_bytes: 1, ..r.clone() },
            ModelRecord { sha256: ContentHash::of_bytes(b"other"), ..r.clone() },
            ModelRecord { created_at: 1, ..r.clone() },
        ];
        for c in changed {
            assert_ne!(c.signing_payload(), base, "{c:?}");
        }
        assert_eq!(
            ModelRecord { accuracy: None, latency_us: Some(3.0), signature: vec![], ..r }.signing_payload(),
            base
        );
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_bounded() {
        let record = (7u64, vec![1u64, 2, 3], 0.25f64);
        let bytes = encode_value(&record);
        assert_eq!(decode_record::<(u64, Vec<u64>, f64)>(&bytes).unwrap(), record);
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(decode_record::<(u64, Vec<u64>, f64)>(&trailing), Err(DecodeError::Trailing(1))));
        let big = encode_value(&vec![0u8; MAX_RECORD_BYTES + 1]);
        assert!(decode_record::<Vec<u8>>(&big).is_err(), "over the record limit");
        assert!(decode_value::<Vec<u8>>(&big).is_ok(), "within the message limit");
    }
}
