//! A round driven in memory: every device and the server, with devices dropping at chosen
//! stages and optional tampering with one device's shares. A device whose own call fails
//! (e.g. too few neighbours left) drops there, as it would in the field.

#![allow(dead_code)]

use std::collections::BTreeSet;

use fedge_secagg::{Aggregate, Client, Result, SecAggConfig, SecAggError, Server, ShareKeys};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A round's cast and what goes wrong.
#[derive(Clone)]
pub struct Scenario {
    pub config: SecAggConfig,
    pub seed: u64,
    pub drop_after_advertise: BTreeSet<u32>,
    pub drop_after_share: BTreeSet<u32>,
    pub drop_after_masked: BTreeSet<u32>,
    /// Flip a byte of the ciphertext `from` sends `to`.
    pub corrupt: Option<(u32, u32)>,
    /// Cut a byte off every ciphertext this device sends.
    pub truncate: Option<u32>,
}

/// What happened.
pub struct Outcome {
    pub result: Result<Aggregate>,
    pub inputs: Vec<Vec<u64>>,
    /// Devices whose masked input the server accepted.
    pub u3: BTreeSet<u32>,
    /// Devices whose share messages the server accepted.
    pub u2: BTreeSet<u32>,
}

impl Scenario {
    pub fn new(config: SecAggConfig, seed: u64) -> Self {
        Scenario {
            config,
            seed,
            drop_after_advertise: BTreeSet::new(),
            drop_after_share: BTreeSet::new(),
            drop_after_masked: BTreeSet::new(),
            corrupt: None,
            truncate: None,
        }
    }

    /// Drops `fraction` of the devices (drawn from the seed) after the given stage (0, 1, 2).
    pub fn dropping(mut self, stage: usize, fraction: f64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed ^ 0xd0d0);
        let mut ids: Vec<u32> = (0..self.config.n_devices).collect();
        rand::seq::SliceRandom::shuffle(ids.as_mut_slice(), &mut rng);
        let count = (fraction * f64::from(self.config.n_devices)).round() as usize;
        let set: BTreeSet<u32> = ids[..count].iter().copied().collect();
        match stage {
            0 => self.drop_after_advertise.extend(set),
            1 => self.drop_after_share.extend(set),
            _ => self.drop_after_masked.extend(set),
        }
        self
    }

    pub fn round_seed(&self) -> [u8; 32] {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&self.seed.to_le_bytes());
        s
    }

    pub fn inputs(&self) -> Vec<Vec<u64>> {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed ^ 0x1a1a);
        let max = self.config.max_level();
        (0..self.config.n_devices)
            .map(|_| (0..self.config.vector_len).map(|_| rng.random_range(0..=max)).collect())
            .collect()
    }

    pub fn clients(&self) -> Vec<Client> {
        (0..self.config.n_devices)
            .map(|d| {
                let mut entropy = [0u8; 32];
                entropy[..8].copy_from_slice(&(self.seed.wrapping_mul(1000) + u64::from(d)).to_le_bytes());
                entropy[31] = 0xe5;
                Client::new(&self.config, self.round_seed(), d, entropy).expect("valid config")
            })
            .collect()
    }

    fn tamper(&self, msg: &mut ShareKeys) {
        if let Some((from, to)) = self.corrupt.filter(|(from, _)| *from == msg.device) {
            for s in msg.shares.iter_mut().filter(|s| s.from == from && s.to == to) {
                s.ciphertext[3] ^= 0x40;
            }
        }
        if self.truncate == Some(msg.device) {
            for s in &mut msg.shares {
                s.ciphertext.pop();
            }
        }
    }

    pub fn run(&self) -> Outcome {
        let inputs = self.inputs();
        let mut clients = self.clients();
        let mut server = Server::new(&self.config, self.round_seed()).expect("valid config");
        let (mut u2, mut u3) = (BTreeSet::new(), BTreeSet::new());
        let result = (|| -> Result<Aggregate> {
            for c in &mut clients {
                server.receive_advertise(c.advertise()?)?;
            }
            for (d, keys) in server.finish_advertise()? {
                if self.drop_after_advertise.contains(&d) {
                    continue;
                }
                let Ok(mut msg) = clients[d as usize].share_keys(&keys) else { continue };
                self.tamper(&mut msg);
                if server.receive_shares(msg).is_ok() {
                    u2.insert(d);
                }
            }
            for (d, fwd) in server.finish_shares()? {
                if self.drop_after_share.contains(&d) {
                    continue;
                }
                let Ok(msg) = clients[d as usize].masked_input_quantised(&fwd, &inputs[d as usize]) else { continue };
                if server.receive_masked_input(msg).is_ok() {
                    u3.insert(d);
                }
            }
            let (request, recipients) = server.finish_masked_inputs()?;
            for d in recipients {
                if self.drop_after_masked.contains(&d) {
                    continue;
                }
                server.receive_unmask(clients[d as usize].unmask(&request)?)?;
            }
            server.finish()
        })();
        Outcome { result, inputs, u3, u2 }
    }
}

/// The plain sum mod 2^b of `inputs` over `who`.
pub fn plain_sum(config: &SecAggConfig, inputs: &[Vec<u64>], who: &[u32]) -> Vec<u64> {
    let mut sum = vec![0u64; config.vector_len];
    for &d in who {
        for (s, v) in sum.iter_mut().zip(&inputs[d as usize]) {
            *s = s.wrapping_add(*v) & config.ring_mask();
        }
    }
    sum
}

/// A failure that only a shortage of shares or neighbours explains.
pub fn is_shortage(e: &SecAggError) -> bool {
    matches!(
        e,
        SecAggError::NotEnoughShares { .. } | SecAggError::NotEnoughNeighbours { .. } | SecAggError::NoSurvivors
    )
}

pub fn sparse() -> SecAggConfig {
    SecAggConfig {
        n_devices: 40,
        threshold: 11,
        degree: 20,
        vector_len: 16,
        clip: 1.0,
        scale: 1000.0,
        modulus_bits: 20,
    }
}

pub fn complete() -> SecAggConfig {
    SecAggConfig {
        n_devices: 20,
        threshold: 10,
        degree: 19,
        vector_len: 16,
        clip: 1.0,
        scale: 1000.0,
        modulus_bits: 20,
    }
}
