//! Seeded, portable randomness.
//!
//! Every random choice in Fedge (device sampling, partitioning, batch order, noise) draws from a
//! [`SeededRng`] derived from the run's seed and a *stream* naming what it is for, so adding a new
//! random consumer never shifts the numbers another one sees. ChaCha8 is portable across
//! platforms and rand versions, unlike `StdRng`.

use rand::SeedableRng;
pub use rand_chacha::ChaCha8Rng as SeededRng;

/// Derives an independent RNG for `stream` (for example `"partition"` or a device/round pair)
/// from a run's `seed`.
pub fn derive_rng(seed: u64, stream: &[u64]) -> SeededRng {
    // SplitMix64 over the seed and each stream word: cheap, well mixed, stable forever.
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut key = [0u8; 32];
    let mut mix = |x: u64| {
        state = state.wrapping_add(x).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut words = [mix(stream.len() as u64), 0, 0, 0];
    for &s in stream {
        words[0] ^= mix(s);
    }
    for i in 1..4 {
        words[i] = mix(words[i - 1]);
    }
    for (chunk, w) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    SeededRng::from_seed(key)
}

/// Well-known stream identifiers, so that two consumers never share a stream by accident.
pub mod stream {
    /// Partitioning the dataset over devices.
    pub const PARTITION: u64 = 1;
    /// Device sampling in the round engine.
    pub const SAMPLING: u64 = 2;
    /// Local training (batch order) of one device in one round: followed by round and device.
    pub const LOCAL_TRAIN: u64 = 3;
    /// Noise added on a device before upload: followed by round and device.
    pub const DEVICE_NOISE: u64 = 4;
    /// Model initialisation.
    pub const INIT: u64 = 5;
    /// Simulated dropouts: followed by the round.
    pub const DROPOUT: u64 = 6;
    /// Central DP noise and adaptive-clipping count noise of a simulated server.
    pub const SERVER_NOISE: u64 = 7;
    /// Batch order of server-side distillation.
    pub const DISTILL: u64 = 8;
    /// Simulated devices' compute and network speeds (drawn once per run).
    pub const DEVICE_SPEED: u64 = 9;
    /// Which simulated devices are Byzantine attackers (drawn once per run).
    pub const ATTACKERS: u64 = 10;
    /// A simulated attacker's noise update: followed by round and device.
    pub const ATTACK_NOISE: u64 = 11;
    /// Which free device the buffered asynchronous engine (FedBuff) tasks next.
    pub const ASYNC_SAMPLING: u64 = 12;
    /// The examples a simulated device trains on when a round may use only some of its own:
    /// followed by round (or task number) and device.
    pub const LOCAL_SAMPLE: u64 = 13;
    /// The test examples a simulation evaluates on when it may use only some (drawn once).
    pub const TEST_SAMPLE: u64 = 14;
    /// Batch order of the server's reference update on its root set (FLTrust): followed by
    /// the round (or the model version, in the coordinator).
    pub const REFERENCE: u64 = 15;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: u64 = derive_rng(7, &[1, 2]).random();
        let b: u64 = derive_rng(7, &[1, 2]).random();
        let c: u64 = derive_rng(7, &[2, 1]).random();
        let d: u64 = derive_rng(8, &[1, 2]).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
