//! Partitioners: how a dataset's examples are spread over virtual devices.
//!
//! All are seeded and deterministic. [`Partition::Iid`] shuffles and deals evenly;
//! [`Partition::Shards`] is the pathological non-IID split of McMahan et al. 2017 (sort by label,
//! cut into shards, give each device a few); [`Partition::Dirichlet`] draws each class's spread
//! over devices from Dirichlet(alpha) (Hsu et al. 2019): small alpha, strong skew;
//! [`Partition::Natural`] keeps a dataset's own clients (Shakespeare's speaking roles, LEAF).

use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};
use thiserror::Error;

use crate::rng::SeededRng;

/// How to split examples over devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Uniformly at random, equal sizes (within one).
    Iid,
    /// Sort by label, cut into `devices * shards_per_device` equal shards, deal shards at random.
    Shards {
        /// Shards each device receives (2 in the paper).
        shards_per_device: usize,
    },
    /// Per class, proportions over devices drawn from a symmetric Dirichlet(alpha).
    Dirichlet {
        /// Concentration: 0.1 is very skewed, 100 is nearly IID.
        alpha: f64,
    },
    /// The dataset's own clients (`TrainTest::natural`): one device per client, or a seeded
    /// sample of `devices` clients when there are more (LEAF samples users the same way).
    Natural,
}

/// Why a partition is impossible.
#[derive(Debug, Error, PartialEq)]
pub enum PartitionError {
    /// Zero devices.
    #[error("number of devices must be at least 1")]
    NoDevices,
    /// Fewer examples than devices (IID) or than shards.
    #[error("cannot cut {samples} samples into {parts} {what}: more {what} than samples")]
    TooFewSamples {
        /// Examples available.
        samples: usize,
        /// Parts asked for.
        parts: usize,
        /// `devices` or `shards`.
        what: &'static str,
    },
    /// Zero shards per device.
    #[error("shards per device must be at least 1")]
    NoShards,
    /// Alpha not positive and finite.
    #[error("dirichlet alpha must be positive and finite, got {0}")]
    BadAlpha(f64),
    /// A natural partition of a dataset without natural clients.
    #[error("the natural partition needs a dataset with its own clients (shakespeare); use iid, shards or dirichlet")]
    NotNatural,
    /// More devices than natural clients.
    #[error("{devices} devices but the dataset has only {clients} natural clients")]
    TooFewClients {
        /// Devices asked for.
        devices: usize,
        /// Clients the dataset has.
        clients: usize,
    },
    /// A natural split given a client list of the wrong length.
    #[error("{owners} client numbers for {samples} examples")]
    OwnersMismatch {
        /// Client numbers given.
        owners: usize,
        /// Examples.
        samples: usize,
    },
}

/// Example indices of each device.
pub type Assignment = Vec<Vec<usize>>;

impl Partition {
    /// Splits the examples with `labels` over `devices` devices (a natural partition needs
    /// [`Partition::split_with`]).
    pub fn split(&self, labels: &[u8], devices: usize, rng: &mut SeededRng) -> Result<Assignment, PartitionError> {
        self.split_with(labels, None, devices, rng)
    }

    /// Splits the examples with `labels` over `devices` devices; `natural` is the client of each
    /// example where the dataset has its own (what [`Partition::Natural`] deals).
    pub fn split_with(
        &self,
        labels: &[u8],
        natural: Option<&[u32]>,
        devices: usize,
        rng: &mut SeededRng,
    ) -> Result<Assignment, PartitionError> {
        if devices == 0 {
            return Err(PartitionError::NoDevices);
        }
        let n = labels.len();
        match *self {
            Partition::Natural => {
                let owners = natural.ok_or(PartitionError::NotNatural)?;
                if owners.len() != n {
                    return Err(PartitionError::OwnersMismatch { owners: owners.len(), samples: n });
                }
                let clients = owners.iter().copied().max().map_or(0, |m| m as usize + 1);
                if devices > clients {
                    return Err(PartitionError::TooFewClients { devices, clients });
                }
                let mut by_client: Assignment = vec![Vec::new(); clients];
                for (i, &o) in owners.iter().enumerate() {
                    by_client[o as usize].push(i);
                }
                if devices == clients {
                    return Ok(by_client);
                }
                // A seeded sample of clients, kept in the dataset's order.
                let mut chosen: Vec<usize> = (0..clients).collect();
                chosen.shuffle(rng);
                chosen.truncate(devices);
                chosen.sort_unstable();
                Ok(chosen.into_iter().map(|c| std::mem::take(&mut by_client[c])).collect())
            }
            Partition::Iid => {
                if n < devices {
                    return Err(PartitionError::TooFewSamples { samples: n, parts: devices, what: "devices" });
                }
                let mut idx: Vec<usize> = (0..n).collect();
                idx.shuffle(rng);
                let (base, extra) = (n / devices, n % devices);
                let mut out = Vec::with_capacity(devices);
                let mut start = 0;
                for d in 0..devices {
                    let len = base + usize::from(d < extra);
                    out.push(idx[start..start + len].to_vec());
                    start += len;
                }
                Ok(out)
            }
            Partition::Shards { shards_per_device } => {
                if shards_per_device == 0 {
                    return Err(PartitionError::NoShards);
                }
                let shards = devices * shards_per_device;
                if n < shards {
                    return Err(PartitionError::TooFewSamples { samples: n, parts: shards, what: "shards" });
                }
                let size = n / shards;
                let mut by_label: Vec<usize> = (0..n).collect();
                by_label.sort_by_key(|&i| (labels[i], i));
                let mut order: Vec<usize> = (0..shards).collect();
                order.shuffle(rng);
                Ok(order
                    .chunks(shards_per_device)
                    .map(|mine| mine.iter().flat_map(|&s| by_label[s * size..(s + 1) * size].iter().copied()).collect())
                    .collect())
            }
            Partition::Dirichlet { alpha } => {
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(PartitionError::BadAlpha(alpha));
                }
                let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
                let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
                let mut out: Assignment = vec![Vec::new(); devices];
                for c in 0..classes {
                    let mut idx: Vec<usize> = (0..n).filter(|&i| labels[i] as usize == c).collect();
                    idx.shuffle(rng);
                    let w: Vec<f64> = (0..devices).map(|_| gamma.sample(rng)).collect();
                    let total: f64 = w.iter().sum();
                    // Cut points at the cumulative proportions; the last device takes the rest.
                    let mut cum = 0.0;
                    let mut start = 0;
                    for (d, wd) in w.iter().enumerate() {
                        cum += wd / total;
                        let end = if d + 1 == devices {
                            idx.len()
                        } else {
                            ((cum * idx.len() as f64) as usize).min(idx.len())
                        };
                        out[d].extend_from_slice(&idx[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                for v in &mut out {
                    v.sort_unstable();
                }
                Ok(out)
            }
        }
    }
}

/// Sizes and label histograms of an assignment, for the run output.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionReport {
    /// Examples per device.
    pub sizes: Vec<usize>,
    /// Per device, the count of each label.
    pub label_histograms: Vec<Vec<usize>>,
}

impl PartitionReport {
    /// Computes sizes and histograms.
    pub fn new(assignment: &Assignment, labels: &[u8], num_classes: usize) -> Self {
        let sizes = assignment.iter().map(Vec::len).collect();
        let label_histograms = assignment
            .iter()
            .map(|idx| {
                let mut h = vec![0; num_classes];
                for &i in idx {
                    h[labels[i] as usize] += 1;
                }
                h
            })
            .collect();
        Self { sizes, label_histograms }
    }

    /// `(min, mean, max)` device size.
    pub fn size_stats(&self) -> (usize, f64, usize) {
        let min = self.sizes.iter().copied().min().unwrap_or(0);
        let max = self.sizes.iter().copied().max().unwrap_or(0);
        let mean = self.sizes.iter().sum::<usize>() as f64 / self.sizes.len().max(1) as f64;
        (min, mean, max)
    }

    /// Mean number of distinct labels a device holds.
    pub fn mean_labels_per_device(&self) -> f64 {
        let total: usize = self.label_histograms.iter().map(|h| h.iter().filter(|&&c| c > 0).count()).sum();
        total as f64 / self.label_histograms.len().max(1) as f64
    }

    /// Devices that received no example.
    pub fn empty_devices(&self) -> usize {
        self.sizes.iter().filter(|&&s| s == 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;

    /// 6000 labels, 600 of each class, interleaved.
    fn labels() -> Vec<u8> {
        (0..6000).map(|i| (i % 10) as u8).collect()
    }

    fn split(p: Partition, devices: usize, seed: u64) -> Result<Assignment, PartitionError> {
        p.split(&labels(), devices, &mut derive_rng(seed, &[]))
    }

    #[test]
    fn natural_keeps_each_client_whole() {
        // 3 clients: 0 owns examples 0, 1, 5; 1 owns 2; 2 owns 3, 4.
        let owners = [0u32, 0, 1, 2, 2, 0];
        let labels = [0u8; 6];
        let all = Partition::Natural.split_with(&labels, Some(&owners), 3, &mut derive_rng(1, &[])).unwrap();
        assert_eq!(all, vec![vec![0, 1, 5], vec![2], vec![3, 4]]);
        // Two of three: a seeded choice of whole clients, in the dataset's order.
        let two = Partition::Natural.split_with(&labels, Some(&owners), 2, &mut derive_rng(1, &[])).unwrap();
        assert_eq!(two.len(), 2);
        assert!(two.iter().all(|d| all.contains(d)));
        assert_eq!(two, Partition::Natural.split_with(&labels, Some(&owners), 2, &mut derive_rng(1, &[])).unwrap());
        let picks: std::collections::BTreeSet<_> = (0..20)
            .map(|seed| Partition::Natural.split_with(&labels, Some(&owners), 1, &mut derive_rng(seed, &[])).unwrap())
            .collect();
        assert!(picks.len() > 1, "the sample depends on the seed");
        // Refusals.
        let rng = &mut derive_rng(1, &[]);
        assert_eq!(
            Partition::Natural.split_with(&labels, Some(&owners), 4, rng),
            Err(PartitionError::TooFewClients { devices: 4, clients: 3 })
        );
        assert_eq!(Partition::Natural.split(&labels, 2, rng), Err(PartitionError::NotNatural));
        assert_eq!(
            Partition::Natural.split_with(&labels, Some(&owners[..5]), 2, rng),
            Err(PartitionError::OwnersMismatch { owners: 5, samples: 6 })
        );
    }

    fn assert_is_partition(a: &Assignment, n: usize, whole: bool) {
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(all.len(), before, "an example went to two devices");
        if whole {
            assert_eq!(all.len(), n, "examples lost");
        }
    }

    #[test]
    fn iid_is_even_and_mixed() {
        let a = split(Partition::Iid, 7, 1).unwrap();
        assert_is_partition(&a, 6000, true);
        let r = PartitionReport::new(&a, &labels(), 10);
        let (min, _, max) = r.size_stats();
        assert!(max - min <= 1);
        assert!(r.mean_labels_per_device() > 9.9);
    }

    #[test]
    fn shards_give_each_device_few_labels() {
        // 100 devices x 2 shards of 30, as the paper's 200 x 300 scaled down.
        let a = split(Partition::Shards { shards_per_device: 2 }, 100, 1).unwrap();
        assert_is_partition(&a, 6000, true);
        let r = PartitionReport::new(&a, &labels(), 10);
        assert!(r.sizes.iter().all(|&s| s == 60));
        assert!(r.label_histograms.iter().all(|h| h.iter().filter(|&&c| c > 0).count() <= 2));
        assert!(r.mean_labels_per_device() < 2.0);
    }

    #[test]
    fn dirichlet_skew_follows_alpha() {
        let skewed = split(Partition::Dirichlet { alpha: 0.1 }, 50, 1).unwrap();
        let flat = split(Partition::Dirichlet { alpha: 100.0 }, 50, 1).unwrap();
        assert_is_partition(&skewed, 6000, true);
        assert_is_partition(&flat, 6000, true);
        let rs = PartitionReport::new(&skewed, &labels(), 10);
        let rf = PartitionReport::new(&flat, &labels(), 10);
        assert!(rs.mean_labels_per_device() < 5.0, "{}", rs.mean_labels_per_device());
        assert!(rf.mean_labels_per_device() > 9.5, "{}", rf.mean_labels_per_device());
    }

    #[test]
    fn partitions_are_deterministic_per_seed() {
        for p in [Partition::Iid, Partition::Shards { shards_per_device: 2 }, Partition::Dirichlet { alpha: 0.5 }] {
            assert_eq!(split(p, 20, 9).unwrap(), split(p, 20, 9).unwrap());
            assert_ne!(split(p, 20, 9).unwrap(), split(p, 20, 10).unwrap());
        }
    }

    #[test]
    fn impossible_partitions_are_errors() {
        assert_eq!(split(Partition::Iid, 0, 1), Err(PartitionError::NoDevices));
        assert_eq!(
            split(Partition::Iid, 6001, 1),
            Err(PartitionError::TooFewSamples { samples: 6000, parts: 6001, what: "devices" })
        );
        assert_eq!(
            split(Partition::Shards { shards_per_device: 4 }, 2000, 1),
            Err(PartitionError::TooFewSamples { samples: 6000, parts: 8000, what: "shards" })
        );
        assert_eq!(split(Partition::Shards { shards_per_device: 0 }, 2, 1), Err(PartitionError::NoShards));
        assert_eq!(split(Partition::Dirichlet { alpha: 0.0 }, 2, 1), Err(PartitionError::BadAlpha(0.0)));
        assert!(split(Partition::Dirichlet { alpha: f64::NAN }, 2, 1).is_err());
    }
}
