//! The round's public neighbour graph: a Harary graph on a seeded permutation of the devices.
//!
//! As in SecAgg+ (Bell et al. 2020, section 3.2), devices are placed on a cycle in an order drawn
//! from the round seed every party knows, and each is joined to the `degree / 2` nearest on
//! either side, plus the diametrically opposite one when `degree` is odd (`n` is then even:
//! `SecAggConfig::validate` checks). Every device has exactly `degree` neighbours;
//! `degree = n - 1` is the complete graph (Bonawitz et al. 2017).

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

/// Neighbour lists of every device, each sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    neighbours: Vec<Vec<u32>>,
}

impl Graph {
    /// The Harary graph `H(degree, n)` over the permutation drawn from `round_seed`. `degree` is
    /// capped at `n - 1`; an odd `degree` with an odd `n` gets `degree + 1` (validate refuses it).
    pub fn harary(n: u32, degree: u32, round_seed: &[u8; 32]) -> Self {
        let n_us = n as usize;
        let mut order: Vec<u32> = (0..n).collect();
        let seed: [u8; 32] =
            Sha256::new().chain_update(b"fedge-secagg/v1 graph").chain_update(round_seed).finalize().into();
        order.shuffle(&mut ChaCha20Rng::from_seed(seed));
        let degree = degree.min(n.saturating_sub(1)) as usize;
        // Odd degree: the opposite device when n is even; one more on each side when n is odd.
        let opposite = !degree.is_multiple_of(2) && n_us.is_multiple_of(2);
        let reach = if opposite { degree / 2 } else { degree.div_ceil(2) };
        let mut neighbours = vec![Vec::new(); n_us];
        for pos in 0..n_us {
            let mut set = BTreeSet::new();
            for d in 1..=reach {
                set.insert(order[(pos + d) % n_us]);
                set.insert(order[(pos + n_us - d) % n_us]);
            }
            if opposite {
                set.insert(order[(pos + n_us / 2) % n_us]);
            }
            set.remove(&order[pos]);
            neighbours[order[pos] as usize] = set.into_iter().collect();
        }
        Graph { neighbours }
    }

    /// Devices in the graph.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether the graph has no devices.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }

    /// The sorted neighbours of `device` (empty for a device outside the graph).
    pub fn neighbours(&self, device: u32) -> &[u32] {
        self.neighbours.get(device as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether `a` and `b` are neighbours.
    pub fn adjacent(&self, a: u32, b: u32) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_symmetric_and_seeded() {
        for (n, k) in [(10, 4), (10, 5), (11, 4), (40, 12), (7, 6), (8, 7), (2, 1)] {
            let g = Graph::harary(n, k, &[9; 32]);
            for u in 0..n {
                assert_eq!(g.neighbours(u).len(), k as usize, "n {n} k {k} device {u}");
                assert!(!g.adjacent(u, u));
                for &v in g.neighbours(u) {
                    assert!(g.adjacent(v, u), "symmetric");
                }
            }
        }
        let (a, b) = (Graph::harary(20, 6, &[1; 32]), Graph::harary(20, 6, &[2; 32]));
        assert_eq!(a, Graph::harary(20, 6, &[1; 32]), "same seed, same graph");
        assert_ne!(a, b, "another seed, another graph");
        assert!(a.neighbours(99).is_empty());
    }

    #[test]
    fn connected() {
        let g = Graph::harary(40, 4, &[3; 32]);
        let mut seen = BTreeSet::from([0u32]);
        let mut stack = vec![0u32];
        while let Some(u) = stack.pop() {
            for &v in g.neighbours(u) {
                if seen.insert(v) {
                    stack.push(v);
                }
            }
        }
        assert_eq!(seen.len(), 40);
    }
}
