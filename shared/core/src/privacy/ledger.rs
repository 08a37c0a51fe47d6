//! The privacy ledger of a training run: one entry per released model version, with the
//! sampling rate, noise multiplier and clip norm of the round and the epsilon spent so far.
//! It can be rebuilt from its entries (that is how the coordinator restores it after a
//! restart) and asked what further rounds would cost before they run.

use super::PrivacyError;
use super::rdp::{EpsilonAt, RdpAccountant, check_delta};

/// What one round spent.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, bincode::Encode, bincode::Decode)]
pub struct LedgerEntry {
    /// The round.
    pub round: u64,
    /// Devices sampled / population (q).
    pub sampling_rate: f64,
    /// Noise std / clip norm on the sum (z).
    pub noise_multiplier: f64,
    /// Clip norm of the round (C).
    pub clip_norm: f64,
    /// Epsilon of the whole run up to and including this round, at the ledger's delta.
    pub epsilon: f64,
}

/// Rounds so far and the accountant behind them.
#[derive(Debug, Clone)]
pub struct PrivacyLedger {
    delta: f64,
    accountant: RdpAccountant,
    entries: Vec<LedgerEntry>,
}

impl PrivacyLedger {
    /// An empty ledger reporting epsilon at `delta`.
    pub fn new(delta: f64) -> Result<Self, PrivacyError> {
        check_delta(delta)?;
        Ok(Self { delta, accountant: RdpAccountant::new(), entries: Vec::new() })
    }

    /// Rebuilds a ledger from recorded entries (their epsilons are recomputed).
    pub fn from_entries(delta: f64, entries: impl IntoIterator<Item = LedgerEntry>) -> Result<Self, PrivacyError> {
        let mut l = Self::new(delta)?;
        for e in entries {
            l.record(e.round, e.sampling_rate, e.noise_multiplier, e.clip_norm)?;
        }
        Ok(l)
    }

    /// The delta epsilons are reported at.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// Entries in round order.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// Epsilon spent so far (zero before any round).
    pub fn epsilon(&self) -> f64 {
        self.entries.last().map_or(0.0, |e| e.epsilon)
    }

    /// Records a released round and returns its entry.
    pub fn record(&mut self, round: u64, q: f64, z: f64, clip: f64) -> Result<LedgerEntry, PrivacyError> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(PrivacyError::ClipNorm(clip));
        }
        self.accountant.compose_subsampled_gaussian(q, z, 1)?;
        let epsilon = self.accountant.epsilon(self.delta)?.epsilon;
        let e = LedgerEntry { round, sampling_rate: q, noise_multiplier: z, clip_norm: clip, epsilon };
        self.entries.push(e);
        Ok(e)
    }

    /// Epsilon if `rounds` more rounds at rate `q` and multiplier `z` were added.
    pub fn preview(&self, q: f64, z: f64, rounds: u64) -> Result<EpsilonAt, PrivacyError> {
        let mut a = self.accountant.clone();
        a.compose_subsampled_gaussian(q, z, rounds)?;
        a.epsilon(self.delta)
    }

    /// How many more rounds at (`q`, `z`) keep epsilon within `target` (searching up to `max`).
    pub fn rounds_within(&self, q: f64, z: f64, target: f64, max: u64) -> Result<u64, PrivacyError> {
        let (mut lo, mut hi) = (0u64, max);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.preview(q, z, mid)?.epsilon <= target { lo = mid } else { hi = mid - 1 }
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_matches_the_accountant_and_rebuilds() {
        let mut l = PrivacyLedger::new(1e-5).unwrap();
        assert_eq!(l.epsilon(), 0.0);
        for r in 1..=10 {
            l.record(r, 0.1, 1.1, 1.0).unwrap();
        }
        let want = super::super::rdp::epsilon(0.1, 1.1, 10, 1e-5).unwrap().epsilon;
        assert!((l.epsilon() - want).abs() < 1e-12);
        assert!(l.entries().windows(2).all(|w| w[0].epsilon < w[1].epsilon));
        let again = PrivacyLedger::from_entries(1e-5, l.entries().to_vec()).unwrap();
        assert_eq!(again.entries(), l.entries());
        let next = l.preview(0.1, 1.1, 5).unwrap().epsilon;
        assert!((next - super::super::rdp::epsilon(0.1, 1.1, 15, 1e-5).unwrap().epsilon).abs() < 1e-12);
        let fit = l.rounds_within(0.1, 1.1, next, 1000).unwrap();
        assert_eq!(fit, 5);
        assert_eq!(l.rounds_within(0.1, 1.1, l.epsilon(), 1000).unwrap(), 0);
        assert!(l.record(11, 0.1, 0.0, 1.0).is_err());
        assert_eq!(l.entries().len(), 10, "a refused record changes nothing");
    }
}
