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

/// Stage 2: a device's masked, quantised input.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MaskedInput {
    /// The sender.
    pub device: u32,
    /// `x + PRG(b) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv) mod 2^b`.
    pub masked: Vec<u64>,
    /// Neighbours whose forwarded shares were malformed: not masked with, to be excluded.
    pub rejected: Vec<u32>,
}

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
    fn garbage_does_not_decode_into_a_panic() {
        let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
        for bytes in [vec![], vec![0xff; 7], vec![4, 250, 0, 0, 0, 0, 0, 0, 0, 1]] {
            let _ = bincode::decode_from_slice::<UnmaskResponse, _>(&bytes, cfg);
            let _ = bincode::decode_from_slice::<ShareKeys, _>(&bytes, cfg);
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
