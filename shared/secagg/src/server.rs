//! The server's side of a round, as a state machine: it collects each stage's messages, tracks
//! who is still in, routes the encrypted shares, asks for unmasking and removes the masks.
//!
//! Per stage, `receive_*` takes one device's message (an `Err` names a message that was refused;
//! a malformed one excludes its sender, as if it had dropped at that stage) and `finish_*` closes
//! the stage (the caller decides when: all arrived, or a timeout) and returns the messages to
//! send. Survivor sets: `U1` advertised, `U2` shared keys, `U3` sent masked inputs; the summed
//! set `S` is `U3` less the devices some survivor reported for malformed shares.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};

use crate::client::add_into;
use crate::config::SecAggConfig;
use crate::error::{Result, SecAggError};
use crate::graph::Graph;
use crate::masks::{self, CIPHERTEXT_LEN, PAIR_MASK, SELF_MASK};
use crate::messages::Stage;
use crate::messages::{
    AdvertiseKeys, EncryptedShare, ForwardedShares, MaskedInput, NeighbourKeys, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};
use crate::quantise::{dequantise_mean, dequantise_sum};
use crate::shamir::{self, Share};

/// The round's result: the sum of the survivors' quantised inputs mod `2^modulus_bits` (the
/// true integer sum, by `validate`'s width rule), and who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// Coordinate-wise sum of the survivors' quantised vectors.
    pub sum: Vec<u64>,
    /// The devices summed, sorted.
    pub survivors: Vec<u32>,
}

impl Aggregate {
    /// The f32 sum of the survivors' inputs.
    pub fn sum_f32(&self, config: &SecAggConfig) -> Vec<f32> {
        dequantise_sum(config, &self.sum, self.survivors.len())
    }

    /// The f32 mean of the survivors' inputs.
    pub fn mean_f32(&self, config: &SecAggConfig) -> Vec<f32> {
        dequantise_mean(config, &self.sum, self.survivors.len())
    }
}

/// The server's round state.
pub struct Server {
    config: SecAggConfig,
    round_seed: [u8; 32],
    graph: Graph,
    stage: Stage,
    /// U1: advertised keys.
    keys: BTreeMap<u32, AdvertiseKeys>,
    /// U2: each sharer's encrypted shares.
    shares: BTreeMap<u32, Vec<EncryptedShare>>,
    /// U3: masked inputs, and each one's rejected neighbours.
    masked: BTreeMap<u32, MaskedInput>,
    survivors: BTreeSet<u32>,
    dropped: BTreeSet<u32>,
    responses: BTreeMap<u32, UnmaskResponse>,
}

fn malformed(device: u32, reason: impl Into<String>) -> SecAggError {
    SecAggError::Malformed { device, reason: reason.into() }
}

impl Server {
    /// The server of the round `round_seed` of `config`.
    pub fn new(config: &SecAggConfig, round_seed: [u8; 32]) -> Result<Self> {
        config.validate()?;
        Ok(Server {
            graph: Graph::harary(config.n_devices, config.degree, &round_seed),
            config: config.clone(),
            round_seed,
            stage: Stage::Advertise,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            masked: BTreeMap::new(),
            survivors: BTreeSet::new(),
            dropped: BTreeSet::new(),
            responses: BTreeMap::new(),
        })
    }

    /// The round's neighbour graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    fn expect(&self, stage: Stage) -> Result<()> {
        if self.stage != stage {
            return Err(SecAggError::WrongStage { expected: self.stage.name(), got: stage.name() });
        }
        Ok(())
    }

    fn known(&self, device: u32, set: &BTreeMap<u32, impl Sized>, seen: &BTreeMap<u32, impl Sized>) -> Result<()> {
        if !set.contains_key(&device) {
            return Err(SecAggError::UnknownDevice(device));
        }
        if seen.contains_key(&device) {
            return Err(SecAggError::Duplicate(device));
        }
        Ok(())
    }

    /// Stage 0: one device's public keys. Low-order (degenerate) keys are refused.
    pub fn receive_advertise(&mut self, msg: AdvertiseKeys) -> Result<()> {
        self.expect(Stage::Advertise)?;
        if msg.device >= self.config.n_devices {
            return Err(SecAggError::UnknownDevice(msg.device));
        }
        if self.keys.contains_key(&msg.device) {
            return Err(SecAggError::Duplicate(msg.device));
        }
        // Any clamped scalar times a low-order point is the identity: not contributory.
        let probe = StaticSecret::from([0x55; 32]);
        for pk in [msg.mask_pk, msg.enc_pk] {
            if !probe.diffie_hellman(&PublicKey::from(pk)).was_contributory() {
                return Err(malformed(msg.device, "a low-order public key"));
            }
        }
        self.keys.insert(msg.device, msg);
        Ok(())
    }

    /// Closes stage 0: for each device that advertised, the keys of its neighbours that did.
    pub fn finish_advertise(&mut self) -> Result<BTreeMap<u32, NeighbourKeys>> {
        self.expect(Stage::Advertise)?;
        self.stage = Stage::ShareKeys;
        Ok(self
            .keys
            .keys()
            .map(|&u| {
                let neighbours = self.in_u1(u).map(|v| self.keys[&v].clone()).collect();
                (u, NeighbourKeys { neighbours })
            })
            .collect())
    }

    fn in_u1(&self, u: u32) -> impl Iterator<Item = u32> + '_ {
        self.graph.neighbours(u).iter().copied().filter(|v| self.keys.contains_key(v))
    }

    /// Stage 1: one device's encrypted shares, exactly one of the right length to each of its
    /// neighbours that advertised; anything else excludes the device.
    pub fn receive_shares(&mut self, msg: ShareKeys) -> Result<()> {
        self.expect(Stage::ShareKeys)?;
        self.known(msg.device, &self.keys, &self.shares)?;
        let expect: Vec<u32> = self.in_u1(msg.device).collect();
        let mut to: Vec<u32> = msg.shares.iter().map(|s| s.to).collect();
        to.sort_unstable();
        if to != expect {
            return Err(malformed(msg.device, "shares not addressed one to each neighbour"));
        }
        if msg.shares.iter().any(|s| s.from != msg.device || s.ciphertext.len() != CIPHERTEXT_LEN) {
            return Err(malformed(msg.device, "a share with the wrong sender or length"));
        }
        self.shares.insert(msg.device, msg.shares);
        Ok(())
    }

    /// Closes stage 1: for each device that shared, the shares its sharing neighbours sent it.
    pub fn finish_shares(&mut self) -> Result<BTreeMap<u32, ForwardedShares>> {
        self.expect(Stage::ShareKeys)?;
        self.stage = Stage::MaskedInput;
        let mut out: BTreeMap<u32, ForwardedShares> =
            self.shares.keys().map(|&u| (u, ForwardedShares { shares: Vec::new() })).collect();
        for list in self.shares.values() {
            for s in list {
                if let Some(f) = out.get_mut(&s.to) {
                    f.shares.push(s.clone());
                }
            }
        }
        Ok(out)
    }

    /// Stage 2: one device's masked input: the round's length, values in the ring, rejections
    /// naming only its sharing neighbours; anything else excludes the device.
    pub fn receive_masked_input(&mut self, mut msg: MaskedInput) -> Result<()> {
        self.expect(Stage::MaskedInput)?;
        self.known(msg.device, &self.shares, &self.masked)?;
        if msg.masked.len() != self.config.vector_len || msg.masked.iter().any(|&v| v > self.config.ring_mask()) {
            return Err(malformed(msg.device, "masked input of the wrong length or outside the ring"));
        }
        let u = msg.device;
        msg.rejected.sort_unstable();
        msg.rejected.dedup();
        if msg.rejected.iter().any(|v| !self.graph.adjacent(u, *v) || !self.shares.contains_key(v)) {
            return Err(malformed(u, "rejects a device that sent it no shares"));
        }
        self.masked.insert(u, msg);
        Ok(())
    }

    /// Whether `w` masked with `v`: both shared keys, they are neighbours, `w` kept `v`'s shares.
    fn masked_with(&self, w: u32, v: u32) -> bool {
        self.graph.adjacent(w, v)
            && self.shares.contains_key(&v)
            && self.shares.contains_key(&w)
            && self.masked.get(&w).is_none_or(|m| !m.rejected.contains(&v))
    }

    /// Devices in U3 that hold a valid share pair of `owner`.
    fn holders(&self, owner: u32) -> impl Iterator<Item = u32> + '_ {
        self.masked.keys().copied().filter(move |&w| self.masked_with(w, owner))
    }

    /// Closes stage 2: the summed set `S` (masked inputs received, less the devices a survivor
    /// rejected), the dropped set (sharers not summed whose pairwise masks some summed device
    /// carries), and the one unmasking request for every device in U3. Fails, asking for
    /// nothing, when fewer than `threshold` devices in U3 hold shares of a device it needs.
    pub fn finish_masked_inputs(&mut self) -> Result<(UnmaskRequest, Vec<u32>)> {
        self.expect(Stage::MaskedInput)?;
        self.stage = Stage::Done;
        let excluded: BTreeSet<u32> = self.masked.values().flat_map(|m| m.rejected.iter().copied()).collect();
        self.survivors = self.masked.keys().copied().filter(|u| !excluded.contains(u)).collect();
        if self.survivors.is_empty() {
            return Err(SecAggError::NoSurvivors);
        }
        self.dropped = self
            .shares
            .keys()
            .copied()
            .filter(|v| !self.survivors.contains(v) && self.survivors.iter().any(|&w| self.masked_with(w, *v)))
            .collect();
        let t = self.config.threshold as usize;
        for &u in self.survivors.iter().chain(&self.dropped) {
            let got = self.holders(u).count();
            if got < t {
                return Err(SecAggError::NotEnoughShares { device: u, got, need: t });
            }
        }
        self.stage = Stage::Unmask;
        let request = UnmaskRequest {
            survivors: self.survivors.iter().copied().collect(),
            dropped: self.dropped.iter().copied().collect(),
        };
        Ok((request, self.masked.keys().copied().collect()))
    }

    /// Stage 3: one device's revealed shares (each checked when the round finishes; more than
    /// one per neighbour is refused).
    pub fn receive_unmask(&mut self, msg: UnmaskResponse) -> Result<()> {
        self.expect(Stage::Unmask)?;
        self.known(msg.device, &self.masked, &self.responses)?;
        if msg.self_mask_shares.len() + msg.key_shares.len() > self.config.degree as usize {
            return Err(malformed(msg.device, "more revealed shares than it has neighbours"));
        }
        self.responses.insert(msg.device, msg);
        Ok(())
    }

    /// The valid revealed shares of `owner`: from a device that holds them, at its own point,
    /// field values; self-mask shares (`self_mask`) or key shares.
    fn collect(&self, owner: u32, self_mask: bool) -> Vec<Share> {
        self.responses
            .values()
            .filter(|r| self.masked_with(r.device, owner))
            .filter_map(|r| {
                let list = if self_mask { &r.self_mask_shares } else { &r.key_shares };
                list.iter().find(|s| s.owner == owner).map(|s| (r.device, s.share))
            })
            .filter(|(d, s)| s.x == u64::from(*d) + 1 && shamir::check_share(s).is_ok())
            .map(|(_, s)| s)
            .collect()
    }

    fn reconstruct(&self, owner: u32, self_mask: bool) -> Result<[u8; 32]> {
        let shares = self.collect(owner, self_mask);
        let need = self.config.threshold as usize;
        if shares.len() < need {
            return Err(SecAggError::NotEnoughShares { device: owner, got: shares.len(), need });
        }
        shamir::reconstruct(&shares, need)
    }

    /// Closes stage 3: reconstructs the survivors' self-mask seeds and the dropped devices' mask
    /// keys, removes every mask and returns the survivors' sum. Fails when fewer than
    /// `threshold` valid shares of a needed secret arrived, or shares disagree.
    pub fn finish(&mut self) -> Result<Aggregate> {
        self.expect(Stage::Unmask)?;
        self.stage = Stage::Done;
        let (len, ring) = (self.config.vector_len, self.config.ring_mask());
        let mut sum = vec![0u64; len];
        for &w in &self.survivors {
            add_into(&mut sum, &self.masked[&w].masked, ring, true);
            let b = self.reconstruct(w, true)?;
            add_into(&mut sum, &masks::prg(&b, SELF_MASK, len, ring), ring, false);
        }
        for &v in &self.dropped {
            let secret = StaticSecret::from(self.reconstruct(v, false)?);
            if PublicKey::from(&secret).to_bytes() != self.keys[&v].mask_pk {
                return Err(SecAggError::WrongKey(v));
            }
            for &w in self.survivors.iter().filter(|&&w| self.masked_with(w, v)) {
                let seed = masks::pair_seed(&secret, &self.keys[&w].mask_pk, &self.round_seed, v, w)
                    .ok_or(SecAggError::WrongKey(w))?;
                // w added PRG(s_wv) if v < w, subtracted it otherwise: undo that.
                add_into(&mut sum, &masks::prg(&seed, PAIR_MASK, len, ring), ring, v > w);
            }
        }
        Ok(Aggregate { sum, survivors: self.survivors.iter().copied().collect() })
    }
}
