//! Key derivation, the mask PRG and the share encryption: the protocol's uses of the primitives.
//!
//! - Pairwise mask seed `s_uv = HKDF-SHA256(salt = round seed, ikm = X25519(s_u^SK, s_v^PK),
//!   info = "fedge-secagg/v1 mask" || min(u,v) || max(u,v))`, the same for `u` and `v`.
//! - Share-encryption key `c_uv`: the same from the encryption key pair, info "... enc".
//! - PRG: ChaCha20 keyed with a 32-byte seed, a nonce naming the use (self mask or pairwise),
//!   keystream read as little-endian u64 words reduced mod `2^b` (uniform, as `2^b` divides
//!   `2^64`).
//! - Shares: ChaCha20-Poly1305 under `c_uv`, nonce `from || to || 0` (each direction of a pair
//!   encrypts once per round, so nonces never repeat under a key), the round seed, sender and
//!   recipient as associated data.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::shamir::{LIMBS, Share};

/// The PRG's use: the device's self mask.
pub const SELF_MASK: u8 = 1;
/// The PRG's use: a pairwise mask.
pub const PAIR_MASK: u8 = 2;

/// Plaintext of one encrypted share pair: two shares' values.
pub const PLAINTEXT_LEN: usize = 2 * LIMBS * 8;
/// Ciphertext length: plaintext plus the 16-byte Poly1305 tag.
pub const CIPHERTEXT_LEN: usize = PLAINTEXT_LEN + 16;

fn derive(
    secret: &StaticSecret,
    their_public: &[u8; 32],
    round_seed: &[u8; 32],
    info: &[u8],
    a: u32,
    b: u32,
) -> Option<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return None; // a low-order public key: refuse
    }
    let (lo, hi) = (a.min(b), a.max(b));
    let hk = Hkdf::<Sha256>::new(Some(round_seed), shared.as_bytes());
    let mut out = [0u8; 32];
    hk.expand_multi_info(&[info, &lo.to_le_bytes(), &hi.to_le_bytes()], &mut out).ok()?;
    Some(out)
}

/// The pairwise mask seed of devices `a` and `b` (`None` for a degenerate public key).
pub fn pair_seed(
    mask_secret: &StaticSecret,
    their_mask_pk: &[u8; 32],
    round_seed: &[u8; 32],
    a: u32,
    b: u32,
) -> Option<[u8; 32]> {
    derive(mask_secret, their_mask_pk, round_seed, b"fedge-secagg/v1 mask", a, b)
}

/// The share-encryption key of devices `a` and `b` (`None` for a degenerate public key).
pub fn enc_key(
    enc_secret: &StaticSecret,
    their_enc_pk: &[u8; 32],
    round_seed: &[u8; 32],
    a: u32,
    b: u32,
) -> Option<[u8; 32]> {
    derive(enc_secret, their_enc_pk, round_seed, b"fedge-secagg/v1 enc", a, b)
}

/// `len` words of the PRG keyed by `seed` for `use_`, each reduced by `ring_mask`.
pub fn prg(seed: &[u8; 32], use_: u8, len: usize, ring_mask: u64) -> Vec<u64> {
    let mut nonce = [0u8; 12];
    nonce[0] = use_;
    let mut cipher = ChaCha20::new(seed.into(), &nonce.into());
    let mut buf = vec![0u8; len * 8];
    cipher.apply_keystream(&mut buf);
    buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) & ring_mask).collect()
}

fn aad(round_seed: &[u8; 32], from: u32, to: u32) -> Vec<u8> {
    [b"fedge-secagg/v1 shares".as_slice(), round_seed, &from.to_le_bytes(), &to.to_le_bytes()].concat()
}

fn nonce(from: u32, to: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    n
}

/// Encrypts the share pair (self-mask seed share, mask-key share) from `from` to `to`.
pub fn seal(key: &[u8; 32], round_seed: &[u8; 32], from: u32, to: u32, b: &Share, s: &Share) -> Vec<u8> {
    let plain: Vec<u8> = b.y.iter().chain(&s.y).flat_map(|v| v.to_le_bytes()).collect();
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = aad(round_seed, from, to);
    // Encryption fails only for messages beyond 2^38 bytes.
    cipher.encrypt(&nonce(from, to).into(), Payload { msg: &plain, aad: &aad }).unwrap_or_default()
}

/// Decrypts a share pair sent from `from` to `to` (whose point is `to + 1`); `None` when the
/// ciphertext does not authenticate or has the wrong length.
pub fn open(key: &[u8; 32], round_seed: &[u8; 32], from: u32, to: u32, ciphertext: &[u8]) -> Option<(Share, Share)> {
    if ciphertext.len() != CIPHERTEXT_LEN {
        return None;
    }
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = aad(round_seed, from, to);
    let plain = cipher.decrypt(&nonce(from, to).into(), Payload { msg: ciphertext, aad: &aad }).ok()?;
    let words: Vec<u64> = plain.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    let x = u64::from(to) + 1;
    let mut b = Share { x, y: [0; LIMBS] };
    let mut s = Share { x, y: [0; LIMBS] };
    b.y.copy_from_slice(words.get(..LIMBS)?);
    s.y.copy_from_slice(words.get(LIMBS..2 * LIMBS)?);
    Some((b, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_agree_and_shares_round_trip() {
        let (su, sv) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
        let (pu, pv) = (PublicKey::from(&su).to_bytes(), PublicKey::from(&sv).to_bytes());
        let seed = [7u8; 32];
        assert_eq!(pair_seed(&su, &pv, &seed, 3, 8), pair_seed(&sv, &pu, &seed, 8, 3));
        assert_ne!(pair_seed(&su, &pv, &seed, 3, 8), enc_key(&su, &pv, &seed, 3, 8));
        assert_eq!(pair_seed(&su, &[0u8; 32], &seed, 3, 8), None, "low-order key refused");
        let k = enc_key(&su, &pv, &seed, 3, 8).unwrap();
        let b = Share { x: 9, y: [1, 2, 3, 4, 5] };
        let s = Share { x: 9, y: [6, 7, 8, 9, 10] };
        let mut c = seal(&k, &seed, 3, 8, &b, &s);
        assert_eq!(c.len(), CIPHERTEXT_LEN);
        assert_eq!(open(&k, &seed, 3, 8, &c), Some((b, s)));
        assert_eq!(open(&k, &seed, 8, 3, &c), None, "bound to direction");
        assert_eq!(open(&k, &[8u8; 32], 3, 8, &c), None, "bound to round");
        c[5] ^= 1;
        assert_eq!(open(&k, &seed, 3, 8, &c), None);
        assert_eq!(open(&k, &seed, 3, 8, &c[1..]), None);
    }

    #[test]
    fn prg_is_deterministic_and_reduced() {
        let a = prg(&[1; 32], SELF_MASK, 100, (1 << 20) - 1);
        assert_eq!(a, prg(&[1; 32], SELF_MASK, 100, (1 << 20) - 1));
        assert_ne!(a, prg(&[1; 32], PAIR_MASK, 100, (1 << 20) - 1));
        assert!(a.iter().all(|&w| w < 1 << 20));
        assert_eq!(prg(&[1; 32], SELF_MASK, 3, u64::MAX).len(), 3);
    }
}
