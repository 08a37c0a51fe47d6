//! The device's side of a round, as a state machine: each stage takes the server's message and
//! returns the device's reply.
//!
//! Advertise keys -> share keys -> masked input -> unmask, once each, in that order. The device
//! never reveals both the self-mask share and the mask-key share of one neighbour: it answers
//! one unmasking request per round and refuses one that names a device among both the survivors
//! and the dropped.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::SecAggConfig;
use crate::error::{Result, SecAggError};
use crate::graph::Graph;
use crate::masks::{self, PAIR_MASK, SELF_MASK};
use crate::messages::Stage;
use crate::messages::{
    AdvertiseKeys, EncryptedShare, ForwardedShares, MaskedInput, NeighbourKeys, RevealedShare, ShareKeys,
    UnmaskRequest, UnmaskResponse,
};
use crate::quantise::quantise;
use crate::shamir::{self, Share};

/// One device's round state. Its secrets (the self-mask seed `b_u`, the two X25519 secret keys)
/// are drawn from the caller's 32 bytes of entropy, which must be secret and uniformly random
/// (e.g. from the OS): this crate reads no randomness of its own.
pub struct Client {
    config: SecAggConfig,
    round_seed: [u8; 32],
    device: u32,
    graph: Graph,
    rng: ChaCha20Rng,
    self_seed: [u8; 32],
    mask_secret: StaticSecret,
    enc_secret: StaticSecret,
    stage: Stage,
    /// Neighbours that advertised (stage 0's survivors), by id.
    keys: BTreeMap<u32, AdvertiseKeys>,
    /// Share pairs (of `b_v`, of `s_v^SK`) from the neighbours it masked with.
    held: BTreeMap<u32, (Share, Share)>,
}

fn random32(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

impl Client {
    /// A device `device` for the round `round_seed` of `config`.
    pub fn new(config: &SecAggConfig, round_seed: [u8; 32], device: u32, entropy: [u8; 32]) -> Result<Self> {
        config.validate()?;
        if device >= config.n_devices {
            return Err(SecAggError::UnknownDevice(device));
        }
        let mut rng = ChaCha20Rng::from_seed(entropy);
        let self_seed = random32(&mut rng);
        let mask_secret = StaticSecret::from(random32(&mut rng));
        let enc_secret = StaticSecret::from(random32(&mut rng));
        Ok(Client {
            graph: Graph::harary(config.n_devices, config.degree, &round_seed),
            config: config.clone(),
            round_seed,
            device,
            rng,
            self_seed,
            mask_secret,
            enc_secret,
            stage: Stage::Advertise,
            keys: BTreeMap::new(),
            held: BTreeMap::new(),
        })
    }

    /// This device's id.
    pub fn device(&self) -> u32 {
        self.device
    }

    fn expect(&self, stage: Stage, got: Stage) -> Result<()> {
        if self.stage == Stage::Done && got == Stage::Unmask {
            return Err(SecAggError::AlreadyUnmasked);
        }
        if self.stage != stage {
            return Err(SecAggError::WrongStage { expected: self.stage.name(), got: got.name() });
        }
        Ok(())
    }

    /// Stage 0: the device's two public keys.
    pub fn advertise(&mut self) -> Result<AdvertiseKeys> {
        self.expect(Stage::Advertise, Stage::Advertise)?;
        self.stage = Stage::ShareKeys;
        Ok(AdvertiseKeys {
            device: self.device,
            mask_pk: PublicKey::from(&self.mask_secret).to_bytes(),
            enc_pk: PublicKey::from(&self.enc_secret).to_bytes(),
        })
    }

    /// Stage 1: Shamir-shares `b_u` and `s_u^SK` among the neighbours that advertised, each
    /// neighbour's pair encrypted to it. Refuses when fewer than `threshold` neighbours remain.
    pub fn share_keys(&mut self, msg: &NeighbourKeys) -> Result<ShareKeys> {
        self.expect(Stage::ShareKeys, Stage::ShareKeys)?;
        let mut keys = BTreeMap::new();
        for k in &msg.neighbours {
            if !self.graph.adjacent(self.device, k.device) {
                return Err(SecAggError::UnknownDevice(k.device));
            }
            if keys.insert(k.device, k.clone()).is_some() {
                return Err(SecAggError::Duplicate(k.device));
            }
        }
        let t = self.config.threshold as usize;
        if keys.len() < t {
            return Err(SecAggError::NotEnoughNeighbours { device: self.device, got: keys.len(), need: t });
        }
        let xs: Vec<u64> = keys.keys().map(|&v| u64::from(v) + 1).collect();
        let b_shares = shamir::split(&self.self_seed, t, &xs, &mut self.rng)?;
        let s_shares = shamir::split(&self.mask_secret.to_bytes(), t, &xs, &mut self.rng)?;
        let mut shares = Vec::with_capacity(keys.len());
        for ((&v, k), (b, s)) in keys.iter().zip(b_shares.iter().zip(&s_shares)) {
            let key = masks::enc_key(&self.enc_secret, &k.enc_pk, &self.round_seed, self.device, v)
                .ok_or_else(|| SecAggError::Malformed { device: v, reason: "degenerate encryption key".into() })?;
            let ciphertext = masks::seal(&key, &self.round_seed, self.device, v, b, s);
            shares.push(EncryptedShare { from: self.device, to: v, ciphertext });
        }
        self.keys = keys;
        self.stage = Stage::MaskedInput;
        Ok(ShareKeys { device: self.device, shares })
    }

    /// Stage 2 from raw input: quantises `input` (stochastic rounding from this device's RNG),
    /// then as [`Client::masked_input_quantised`].
    pub fn masked_input(&mut self, msg: &ForwardedShares, input: &[f32]) -> Result<MaskedInput> {
        self.expect(Stage::MaskedInput, Stage::MaskedInput)?;
        let q = quantise(&self.config, input, &mut self.rng)?;
        self.masked_input_quantised(msg, &q)
    }

    /// Stage 2: keeps the share pairs its neighbours sent (a pair that fails to decrypt or holds
    /// a bad Shamir value is rejected, and its sender named in `rejected`), then masks `q` with
    /// its self mask and the pairwise masks of the neighbours it kept.
    pub fn masked_input_quantised(&mut self, msg: &ForwardedShares, q: &[u64]) -> Result<MaskedInput> {
        self.expect(Stage::MaskedInput, Stage::MaskedInput)?;
        let (len, ring) = (self.config.vector_len, self.config.ring_mask());
        if q.len() != len || q.iter().any(|&v| v > self.config.max_level()) {
            return Err(SecAggError::Input(format!(
                "a quantised vector of {len} values in 0..={}",
                self.config.max_level()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut rejected = Vec::new();
        let mut pairs = Vec::new();
        for EncryptedShare { from, to, ciphertext } in &msg.shares {
            let Some(k) = self.keys.get(from).filter(|_| *to == self.device) else {
                return Err(SecAggError::UnknownDevice(*from));
            };
            if !seen.insert(*from) {
                return Err(SecAggError::Duplicate(*from));
            }
            let opened = masks::enc_key(&self.enc_secret, &k.enc_pk, &self.round_seed, self.device, *from)
                .and_then(|key| masks::open(&key, &self.round_seed, *from, self.device, ciphertext))
                .filter(|(b, s)| shamir::check_share(b).is_ok() && shamir::check_share(s).is_ok());
            let seed = masks::pair_seed(&self.mask_secret, &k.mask_pk, &self.round_seed, self.device, *from);
            match (opened, seed) {
                (Some(pair), Some(seed)) => {
                    self.held.insert(*from, pair);
                    pairs.push((*from, seed));
                }
                _ => rejected.push(*from),
            }
        }
        let t = self.config.threshold as usize;
        if self.held.len() < t {
            return Err(SecAggError::NotEnoughNeighbours { device: self.device, got: self.held.len(), need: t });
        }
        let mut y: Vec<u64> = q.to_vec();
        add_into(&mut y, &masks::prg(&self.self_seed, SELF_MASK, len, ring), ring, true);
        for (v, seed) in pairs {
            add_into(&mut y, &masks::prg(&seed, PAIR_MASK, len, ring), ring, v < self.device);
        }
        self.stage = Stage::Unmask;
        Ok(MaskedInput { device: self.device, masked: y, rejected })
    }

    /// Stage 3: reveals, for each neighbour it holds shares of, the self-mask share if the
    /// neighbour is among `survivors`, the mask-key share if among `dropped`. Answers once;
    /// refuses a request naming any device in both lists.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<UnmaskResponse> {
        self.expect(Stage::Unmask, Stage::Unmask)?;
        self.stage = Stage::Done;
        let survivors: BTreeSet<u32> = req.survivors.iter().copied().collect();
        let dropped: BTreeSet<u32> = req.dropped.iter().copied().collect();
        if let Some(&both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::BothSharesRequested(both));
        }
        let reveal = |set: &BTreeSet<u32>, pick: fn(&(Share, Share)) -> Share| {
            set.iter()
                .filter_map(|v| self.held.get(v).map(|pair| RevealedShare { owner: *v, share: pick(pair) }))
                .collect::<Vec<_>>()
        };
        Ok(UnmaskResponse {
            device: self.device,
            self_mask_shares: reveal(&survivors, |p| p.0),
            key_shares: reveal(&dropped, |p| p.1),
        })
    }
}

/// `y += m` (or `y -= m` when `!plus`) in the ring of mask `ring`.
pub(crate) fn add_into(y: &mut [u64], m: &[u64], ring: u64, plus: bool) {
    for (a, &b) in y.iter_mut().zip(m) {
        *a = if plus { a.wrapping_add(b) } else { a.wrapping_sub(b) } & ring;
    }
}
