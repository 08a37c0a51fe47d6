//! Shamir secret sharing of 32-byte secrets over GF(p), p = 2^61 - 1 (a Mersenne prime).
//!
//! A secret is cut into [`LIMBS`] = 5 little-endian limbs of 7 bytes (56 bits, below p; the last
//! limb holds the remaining 4 bytes), and each limb is shared with its own random polynomial of
//! degree `threshold - 1`, all evaluated at the same point. A share is the point `x` (nonzero,
//! below p: device id + 1 in this crate) and one field element per limb.

use bincode::{Decode, Encode};
use rand::{Rng, RngExt};

use crate::error::{Result, SecAggError};

/// The field's prime, 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per share: 32 bytes in 7-byte limbs.
pub const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

/// One share of a 32-byte secret: the evaluation point and one value per limb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Share {
    /// Evaluation point, in `1..P`.
    pub x: u64,
    /// The limbs' polynomials evaluated at `x`, each below `P`.
    pub y: [u64; LIMBS],
}

fn bad<T>(s: impl Into<String>) -> Result<T> {
    Err(SecAggError::Shamir(s.into()))
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // both < 2^61: no overflow
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    let w = u128::from(a) * u128::from(b);
    let s = ((w & u128::from(P)) + (w >> 61)) as u64; // 2^61 = 1 mod p
    if s >= P { s - P } else { s }
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (i, chunk) in secret.chunks(LIMB_BYTES).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

fn unlimbs(l: &[u64; LIMBS]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(LIMB_BYTES).enumerate() {
        if l[i] >> (8 * chunk.len()) != 0 {
            return bad("the reconstructed value is not a secret (limb out of range): wrong shares");
        }
        chunk.copy_from_slice(&l[i].to_le_bytes()[..chunk.len()]);
    }
    Ok(out)
}

/// Checks a share's point and values are field elements and the point is not the secret's (0).
pub fn check_share(s: &Share) -> Result<()> {
    if s.x == 0 || s.x >= P {
        return bad(format!("share point {} is outside 1..p", s.x));
    }
    if s.y.iter().any(|&y| y >= P) {
        return bad(format!("share at {} has a value outside the field", s.x));
    }
    Ok(())
}

/// Splits `secret` into one share per point of `xs` (distinct, in `1..P`); any `threshold` of
/// them reconstruct it, fewer say nothing about it.
pub fn split<R: Rng + ?Sized>(secret: &[u8; 32], threshold: usize, xs: &[u64], rng: &mut R) -> Result<Vec<Share>> {
    if threshold == 0 || threshold > xs.len() {
        return bad(format!("threshold {threshold} with {} points", xs.len()));
    }
    for (i, &x) in xs.iter().enumerate() {
        check_share(&Share { x, y: [0; LIMBS] })?;
        if xs[..i].contains(&x) {
            return bad(format!("duplicate point {x}"));
        }
    }
    // coeffs[l][d]: limb l's polynomial, degree d; coefficient 0 is the limb.
    let coeffs: Vec<Vec<u64>> = limbs(secret)
        .iter()
        .map(|&s| std::iter::once(s).chain((1..threshold).map(|_| rng.random_range(0..P))).collect())
        .collect();
    Ok(xs
        .iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (yl, c) in y.iter_mut().zip(&coeffs) {
                *yl = c.iter().rev().fold(0, |acc, &k| add(mul(acc, x), k)); // Horner
            }
            Share { x, y }
        })
        .collect())
}

/// The polynomial through `points` (distinct x), evaluated at `z`, limb by limb.
fn interpolate(points: &[Share], z: u64) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (j, pj) in points.iter().enumerate() {
        let (mut num, mut den) = (1u64, 1u64);
        for (m, pm) in points.iter().enumerate() {
            if m != j {
                num = mul(num, sub(z, pm.x));
                den = mul(den, sub(pj.x, pm.x));
            }
        }
        let l = mul(num, inv(den));
        for (o, &y) in out.iter_mut().zip(&pj.y) {
            *o = add(*o, mul(l, y));
        }
    }
    out
}

/// Reconstructs the secret from at least `threshold` shares. The first `threshold` define the
/// polynomials; every further share must lie on them (else the shares are inconsistent, a sign
/// of a lying or corrupted sharer, and the reconstruction is refused).
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32]> {
    if threshold == 0 || shares.len() < threshold {
        return bad(format!("{} shares, the threshold is {threshold}", shares.len()));
    }
    for (i, s) in shares.iter().enumerate() {
        check_share(s)?;
        if shares[..i].iter().any(|o| o.x == s.x) {
            return bad(format!("duplicate point {}", s.x));
        }
    }
    let (base, rest) = shares.split_at(threshold);
    if rest.iter().any(|s| interpolate(base, s.x) != s.y) {
        return bad("inconsistent shares: they do not lie on one polynomial of the threshold's degree");
    }
    unlimbs(&interpolate(base, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn secret(rng: &mut ChaCha20Rng) -> [u8; 32] {
        let mut s = [0u8; 32];
        rng.fill(&mut s);
        s
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
    }

    #[test]
    fn any_t_shares_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let s = secret(&mut rng);
        let xs: Vec<u64> = (1..=7).collect();
        let shares = split(&s, 4, &xs, &mut rng).unwrap();
        // every 4-subset of 7, and all 7
        for mask in 0u32..128 {
            if mask.count_ones() >= 4 {
                let sub: Vec<Share> = (0..7).filter(|i| mask >> i & 1 == 1).map(|i| shares[i]).collect();
                assert_eq!(reconstruct(&sub, 4).unwrap(), s, "subset {mask:b}");
            }
        }
        let all_ones = [0xffu8; 32];
        assert_eq!(reconstruct(&split(&all_ones, 2, &[5, 9], &mut rng).unwrap(), 2).unwrap(), all_ones);
    }

    #[test]
    fn t_minus_one_shares_fit_two_different_secrets() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (s1, s2) = (secret(&mut rng), secret(&mut rng));
        assert_ne!(s1, s2);
        let t = 5;
        let shares = split(&s1, t, &[1, 2, 3, 4, 5, 6], &mut rng).unwrap();
        let seen = &shares[..t - 1];
        assert!(reconstruct(seen, t).is_err(), "t - 1 shares are refused");
        // The t - 1 seen shares plus (0, s2) define a polynomial of degree t - 1 with secret s2;
        // its value at another point completes a valid set of t shares for s2.
        for other in [s1, s2] {
            let mut pts = seen.to_vec();
            pts.push(Share { x: 0, y: limbs(&other) });
            let extra = Share { x: 6, y: interpolate(&pts, 6) };
            let mut set = seen.to_vec();
            set.push(extra);
            assert_eq!(reconstruct(&set, t).unwrap(), other);
        }
    }

    #[test]
    fn bad_points_and_values_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let s = secret(&mut rng);
        assert!(split(&s, 2, &[0, 1], &mut rng).is_err());
        assert!(split(&s, 2, &[1, 1], &mut rng).is_err());
        assert!(split(&s, 2, &[1, P], &mut rng).is_err());
        assert!(split(&s, 3, &[1, 2], &mut rng).is_err());
        assert!(split(&s, 0, &[1, 2], &mut rng).is_err());
        let shares = split(&s, 2, &[1, 2, 3], &mut rng).unwrap();
        let mut zero = shares.clone();
        zero[0].x = 0;
        assert!(reconstruct(&zero, 2).is_err());
        let mut dup = shares.clone();
        dup[1].x = dup[0].x;
        assert!(reconstruct(&dup, 2).is_err());
        let mut big = shares.clone();
        big[0].y[2] = P;
        assert!(reconstruct(&big, 2).is_err());
        let mut lie = shares.clone();
        lie[2].y[0] = add(lie[2].y[0], 1);
        assert!(reconstruct(&lie, 2).is_err(), "an inconsistent extra share is caught");
        assert_eq!(reconstruct(&lie[..2], 2).unwrap(), s);
    }
}
