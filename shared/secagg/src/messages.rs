//! The protocol's messages, plain data with bincode derives so a wire protocol can carry them.
//!
//! Stage 0 `AdvertiseKeys` (device -> server), `NeighbourKeys` (server -> device); stage 1
//! `ShareKeys` (device -> server), `ForwardedShares` (server -> device); stage 2 `MaskedInput`
//! (device -> server), `UnmaskRequest` (server -> device); stage 3 `UnmaskResponse`.

use bincode::{Decode, Encode};

use crate::shamir::Share;

/// Stage 0: a device's two X25519 public keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AdvertiseKeys {
    /// The sender.
    pub device: u32,
    /// Public key of the pairwise-mask key pair (`s_u^PK`).
    pub mask_pk: [u8; 32],
    /// Public key of the share-encryption key pair (`c_u^PK`).
    pub enc_pk: [u8; 32],
}

/// Server to one device: the keys of its neighbours that advertised.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NeighbourKeys {
    /// One entry per neighbour still in the round.
    pub neighbours: Vec<AdvertiseKeys>,
}

/// One share pair, encrypted from `from` to `to`; the server routes it without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EncryptedShare {
    /// The sharer.
    pub from: u32,
    /// The recipient.
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext of the two shares' values.
    pub ciphertext: Vec<u8>,
}

/// Stage 1: a device's encrypted share pairs, one per neighbour that advertised.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareKeys {
    /// The sender.
    pub device: u32,
    /// One per neighbour in its `NeighbourKeys`.
    pub shares: Vec<EncryptedShare>,
}

/// Server to one device: the share pairs its neighbours sent it (their senders are the
/// neighbours it masks with).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ForwardedShares {
    /// Share pairs addressed to the device.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2: a device's masked, quantised input. On the wire its words are packed at the width
/// of the largest (at least 8 bits): `b` bits a coordinate for a ring of `2^b`, where bincode's
/// varints would spend 5 bytes on a 28-bit word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    /// The sender.
    pub device: u32,
    /// `x + PRG(b) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv) mod 2^b`.
    pub masked: Vec<u64>,
    /// Neighbours whose forwarded shares were malformed: not masked with, to be excluded.
    pub rejected: Vec<u32>,
}

/// Bits a word of `words` needs, at least 8 (so a decoder allocates at most 8 bytes a byte).
fn packed_width(words: &[u64]) -> u8 {
    let max = words.iter().copied().max().unwrap_or(0);
    (64 - max.leading_zeros()).max(8) as u8
}

/// `words` at `width` bits each, little-endian, the last byte padded with zeros.
fn pack(words: &[u64], width: u8) -> Vec<u8> {
    let width = u32::from(width);
    let mut out = vec![0u8; (words.len() * width as usize).div_ceil(8)];
    let mut bit = 0usize;
    for &w in words {
        for i in 0..width {
            if w >> i & 1 == 1 {
                out[bit / 8] |= 1 << (bit % 8);
            }
            bit += 1;
        }
    }
    out
}

/// The `len` words of `width` bits in `bytes` (whose length the caller checked).
fn unpack(bytes: &[u8], width: u8, len: usize) -> Vec<u64> {
    let width = usize::from(width);
    (0..len)
        .map(|k| {
            let mut w = 0u64;
            for i in 0..width {
                let bit = k * width + i;
                w |= u64::from(bytes[bit / 8] >> (bit % 8) & 1) << i;
            }
            w
        })
        .collect()
}

impl Encode for MaskedInput {
    fn encode<E: bincode::enc::Encoder>(&self, e: &mut E) -> Result<(), bincode::error::EncodeError> {
        self.device.encode(e)?;
        let width = packed_width(&self.masked);
        width.encode(e)?;
        (self.masked.len() as u64).encode(e)?;
        pack(&self.masked, width).encode(e)?;
        self.rejected.encode(e)
    }
}

impl<Context> Decode<Context> for MaskedInput {
    fn decode<D: bincode::de::Decoder<Context = Context>>(d: &mut D) -> Result<Self, bincode::error::DecodeError> {
        use bincode::error::DecodeError;
        let device = u32::decode(d)?;
        let width = u8::decode(d)?;
        if !(8..=64).contains(&width) {
            return Err(DecodeError::Other("a masked input's word width is not 8 to 64 bits"));
        }
        let len = u64::decode(d)?;
        let bytes = Vec::<u8>::decode(d)?;
        let expected = len.checked_mul(u64::from(width)).map(|bits| bits.div_ceil(8));
        if expected != Some(bytes.len() as u64) {
            return Err(DecodeError::Other("a masked input's packed words do not fill its bytes"));
        }
        let masked = unpack(&bytes, width, len as usize);
        let rejected = Vec::<u32>::decode(d)?;
        Ok(Self { device, masked, rejected })
    }
}
bincode::impl_borrow_decode!(MaskedInput);

/// Server to the devices that sent masked inputs: whose self-mask seeds to reveal shares of
/// (`survivors`) and whose mask keys (`dropped`). An honest device refuses if one device is in
/// both.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct UnmaskRequest {
    /// Devices whose masked inputs are summed.
    pub survivors: Vec<u32>,
    /// Devices that shared keys but are not summed.
    pub dropped: Vec<u32>,
}

/// One revealed share of `owner`'s secret.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RevealedShare {
    /// Whose secret this is a share of.
    pub owner: u32,
    /// The share (its point is the revealer's id + 1).
    pub share: Share,
}

/// Stage 3: the shares a device reveals.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct UnmaskResponse {
    /// The sender.
    pub device: u32,
    /// Shares of survivors' self-mask seeds `b_v`.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of dropped devices' mask keys `s_v^SK`.
    pub key_shares: Vec<RevealedShare>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Encode + Decode<()> + PartialEq + std::fmt::Debug>(v: T) {
        let cfg = bincode::config::standard();
        let bytes = bincode::encode_to_vec(&v, cfg).unwrap();
        let (back, used): (T, usize) = bincode::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!((back, used), (v, bytes.len()));
    }

    #[test]
    fn messages_round_trip_through_bincode() {
        let keys = AdvertiseKeys { device: 3, mask_pk: [1; 32], enc_pk: [2; 32] };
        round_trip(keys.clone());
        round_trip(NeighbourKeys { neighbours: vec![keys] });
        let enc = EncryptedShare { from: 1, to: 2, ciphertext: vec![5; 96] };
        round_trip(ShareKeys { device: 1, shares: vec![enc.clone()] });
        round_trip(ForwardedShares { shares: vec![enc] });
        round_trip(MaskedInput { device: 4, masked: vec![u64::MAX, 0, 7], rejected: vec![9] });
        round_trip(UnmaskRequest { survivors: vec![1, 2], dropped: vec![3] });
        let share = RevealedShare { owner: 2, share: Share { x: 5, y: [1, 2, 3, 4, 5] } };
        round_trip(UnmaskResponse { device: 4, self_mask_shares: vec![share.clone()], key_shares: vec![share] });
    }

    #[test]
    fn masked_words_are_packed_at_their_width() {
        let cfg = bincode::config::standard();
        // 1,000 words of 28 bits: 3,500 bytes and a small header, against 5 bytes a varint.
        let words: Vec<u64> = (0..1000u64).map(|i| (i * 2_654_435_761) & ((1 << 28) - 1)).collect();
        let m = MaskedInput { device: 7, masked: words, rejected: vec![1, 3] };
        let bytes = bincode::encode_to_vec(&m, cfg).unwrap();
        assert!(bytes.len() < 3_500 + 20, "{}", bytes.len());
        round_trip(m);
        for words in [vec![], vec![0], vec![255, 1], vec![256], vec![u64::MAX; 3], vec![1 << 63, 5]] {
            round_trip(MaskedInput { device: 0, masked: words, rejected: vec![] });
        }
        // A width out of range, or bytes that do not hold the words claimed, are refused.
        let mut bad =
            bincode::encode_to_vec(&MaskedInput { device: 1, masked: vec![3; 4], rejected: vec![] }, cfg).unwrap();
        assert_eq!(bad[1], 8, "the width follows the device id");
        bad[1] = 7;
        assert!(bincode::decode_from_slice::<MaskedInput, _>(&bad, cfg).is_err());
        bad[1] = 8;
        bad[2] = 5;
        assert!(bincode::decode_from_slice::<MaskedInput, _>(&bad, cfg).is_err());
    }

    #[test]
    fn garbage_does_not_decode_into_a_panic() {
        let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
        for bytes in [vec![], vec![0xff; 7], vec![4, 250, 0, 0, 0, 0, 0, 0, 0, 1]] {
            let _ = bincode::decode_from_slice::<UnmaskResponse, _>(&bytes, cfg);
            let _ = bincode::decode_from_slice::<ShareKeys, _>(&bytes, cfg);
            let _ = bincode::decode_from_slice::<MaskedInput, _>(&bytes, cfg);
        }
    }
}

/// Where a client or the server is in the round (both state machines walk the same stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Advertise,
    ShareKeys,
    MaskedInput,
    Unmask,
    Done,
}

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Advertise => "advertise",
            Stage::ShareKeys => "share keys",
            Stage::MaskedInput => "masked input",
            Stage::Unmask => "unmask",
            Stage::Done => "done",
        }
    }
}
