//! Byzantine devices: a seeded subset of the fleet that misbehaves every round it is selected.
//!
//! `attack` names what the attackers do and `attackers` what fraction of the devices they are
//! (`round(attackers * devices)` of them, chosen from the run seed on their own stream,
//! [`stream::ATTACKERS`]). Attackers send well-formed updates: the round engine checks them as
//! it checks every upload and is not told who attacks. Kinds:
//!
//! - `sign-flip`: trains honestly, sends `-attack_scale * delta` (`attack_scale` 1 by default:
//!   the negated update);
//! - `scale`: model replacement (Bhagoji et al. 2019, Bagdasaryan et al. 2020): trains
//!   honestly, sends `attack_scale * delta` (10 by default);
//! - `noise`: sends N(0, `attack_noise_std`^2) per coordinate (std 1 by default), seeded per
//!   round and device ([`stream::ATTACK_NOISE`]);
//! - `label-flip`: trains on its own examples with every label `y` read as `classes - 1 - y`;
//! - `little-is-enough` (Baruch et al. 2019, the non-omniscient variant): the round's
//!   attackers collude: from their honestly trained deltas they take the per-coordinate mean
//!   mu and standard deviation sigma (the sample one, divided by f - 1; 0 for a single
//!   attacker, who then sends the mean) and each sends `mu - z * sigma`, where
//!   `s = floor(n / 2 + 1) - f` and `z = Phi^-1((n - s) / n)`, n the devices selected in the
//!   round and f the attackers among them (`attack_z` overrides z). When the attackers are
//!   so many that `s < 1`, s is taken as 1.
//!
//! The clock ([`crate::clock`]) collects a round's results before delivering any when an attack
//! is set, hands the attackers' deltas to [`Attack::apply`], then delivers in the same order at
//! the same virtual times.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::DeviceId;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};

use crate::config::SimConfig;

/// What the attackers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Send the negated (times `attack_scale`) honest update.
    SignFlip,
    /// Send the honest update times `attack_scale` (model replacement).
    Scale,
    /// Send Gaussian noise.
    Noise,
    /// Train on flipped labels.
    LabelFlip,
    /// Collude: send `mu - z * sigma` of the attackers' honest updates (Baruch et al. 2019).
    LittleIsEnough,
}

impl AttackKind {
    /// Every kind, by its name.
    pub const ALL: [(&'static str, AttackKind); 5] = [
        ("sign-flip", AttackKind::SignFlip),
        ("scale", AttackKind::Scale),
        ("noise", AttackKind::Noise),
        ("label-flip", AttackKind::LabelFlip),
        ("little-is-enough", AttackKind::LittleIsEnough),
    ];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).map_or("?", |(n, _)| n)
    }

    /// `attack_scale` when the config leaves it out: 1 for `sign-flip` (the update negated),
    /// 10 for `scale`; the other kinds ignore it.
    pub fn default_scale(self) -> f64 {
        match self {
            AttackKind::Scale => 10.0,
            _ => 1.0,
        }
    }
}

impl std::fmt::Display for AttackKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttackKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|&(_, k)| k).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown attack `{s}` (expected {})", names.join(", "))
        })
    }
}

/// Default of `attack_noise_std`.
pub const DEFAULT_NOISE_STD: f64 = 1.0;

/// Checks the attack keys of `c`; the first problem, in one line.
pub(crate) fn validate(c: &SimConfig) -> Result<(), String> {
    if !(c.attackers >= 0.0 && c.attackers < 1.0) {
        return Err(format!("attackers must be in [0, 1), got {}", c.attackers));
    }
    match (c.attack, c.attackers > 0.0) {
        (Some(kind), false) => return Err(format!("attack `{kind}` needs attackers > 0 (a fraction of the devices)")),
        (None, true) => {
            return Err(format!("attackers = {} needs an attack (attack = \"sign-flip\", ...)", c.attackers));
        }
        _ => {}
    }
    if c.attack.is_some() && attacker_count(c.devices, c.attackers) == 0 {
        return Err(format!("attackers = {} of {} devices rounds to no attacker", c.attackers, c.devices));
    }
    if let Some(s) = c.attack_scale
        && !s.is_finite()
    {
        return Err(format!("attack_scale must be finite, got {s}"));
    }
    if !(c.attack_noise_std >= 0.0 && c.attack_noise_std.is_finite()) {
        return Err(format!("attack_noise_std must be zero or positive and finite, got {}", c.attack_noise_std));
    }
    if let Some(z) = c.attack_z
        && !z.is_finite()
    {
        return Err(format!("attack_z must be finite, got {z}"));
    }
    Ok(())
}

/// `round(fraction * devices)`.
pub fn attacker_count(devices: usize, fraction: f64) -> usize {
    ((fraction * devices as f64).round() as usize).min(devices)
}

/// The attackers among devices `0..devices`: `round(fraction * devices)` of them, drawn from
/// `seed` on [`stream::ATTACKERS`] (so the same seed always picks the same devices, and no
/// other random choice of the run moves).
pub fn choose_attackers(seed: u64, devices: usize, fraction: f64) -> BTreeSet<DeviceId> {
    let mut ids: Vec<DeviceId> = (0..devices as DeviceId).collect();
    ids.shuffle(&mut derive_rng(seed, &[stream::ATTACKERS]));
    ids.truncate(attacker_count(devices, fraction));
    ids.into_iter().collect()
}

/// z of "A Little Is Enough" for `n` devices in the round, `f` of them attackers:
/// `s = floor(n / 2 + 1) - f` (at least 1), `z = Phi^-1((n - s) / n)`. 0 when `n < 2`.
pub fn little_is_enough_z(n: usize, f: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let s = (n / 2 + 1).saturating_sub(f).max(1);
    let p = (n - s.min(n)) as f64 / n as f64;
    let z = Normal::standard().inverse_cdf(p.clamp(0.0, 1.0));
    if z.is_finite() { z } else { 0.0 }
}

/// The run's attack: its kind, parameters and attackers.
#[derive(Debug, Clone)]
pub struct Attack {
    kind: AttackKind,
    scale: f64,
    noise_std: f64,
    z: Option<f64>,
    seed: u64,
    attackers: BTreeSet<DeviceId>,
    /// `label-flip`: the attackers' examples with flipped labels.
    flipped: Option<Flipped>,
}

/// A copy of the attackers' examples only (made once per run) with flipped labels, and each
/// attacker's indices into it.
#[derive(Debug, Clone)]
struct Flipped {
    data: Arc<Dataset>,
    indices: BTreeMap<DeviceId, Arc<Vec<usize>>>,
}

/// An attack as the run's summary records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttackSummary {
    /// The kind.
    pub kind: AttackKind,
    /// The configured fraction of attackers.
    pub fraction: f64,
    /// How many devices attack.
    pub attackers: usize,
    /// Which.
    pub attacker_ids: Vec<DeviceId>,
}

impl Attack {
    /// The attack `config` asks for (None without `attack`); `train` and `device_data` (each
    /// device's examples) are read for `label-flip`.
    pub fn from_config(
        config: &SimConfig,
        train: &Dataset,
        device_data: &BTreeMap<DeviceId, Arc<Vec<usize>>>,
    ) -> Option<Self> {
        let kind = config.attack?;
        let attackers = choose_attackers(config.seed, config.devices, config.attackers);
        let flipped = (kind == AttackKind::LabelFlip).then(|| flip_labels(train, device_data, &attackers));
        Some(Self {
            kind,
            scale: config.attack_scale.unwrap_or(kind.default_scale()),
            noise_std: config.attack_noise_std,
            z: config.attack_z,
            seed: config.seed,
            attackers,
            flipped,
        })
    }

    /// The kind.
    pub fn kind(&self) -> AttackKind {
        self.kind
    }

    /// The attacking devices.
    pub fn attackers(&self) -> &BTreeSet<DeviceId> {
        &self.attackers
    }

    /// Whether `device` attacks.
    pub fn is_attacker(&self, device: DeviceId) -> bool {
        self.attackers.contains(&device)
    }

    /// For a `label-flip` attacker, the dataset with its flipped examples and its indices there.
    pub fn flipped_data(&self, device: DeviceId) -> Option<(Arc<Dataset>, Arc<Vec<usize>>)> {
        let f = self.flipped.as_ref()?;
        Some((f.data.clone(), f.indices.get(&device)?.clone()))
    }

    /// For the summary, with the configured `fraction`.
    pub fn summary(&self, fraction: f64) -> AttackSummary {
        AttackSummary {
            kind: self.kind,
            fraction,
            attackers: self.attackers.len(),
            attacker_ids: self.attackers.iter().copied().collect(),
        }
    }

    /// Turns the honestly trained deltas of round `round`'s attackers (those whose training
    /// succeeded) into what they send. `selected` devices were selected in the round,
    /// `selected_attackers` of them attackers (both counting dropouts).
    pub fn apply(
        &self,
        round: u64,
        selected: usize,
        selected_attackers: usize,
        deltas: &mut [(DeviceId, &mut ModelParams)],
    ) {
        match self.kind {
            AttackKind::SignFlip => scale(deltas, -self.scale),
            AttackKind::Scale => scale(deltas, self.scale),
            AttackKind::Noise => {
                for (device, delta) in deltas.iter_mut() {
                    let mut rng = derive_rng(self.seed, &[stream::ATTACK_NOISE, round, *device]);
                    for x in delta.data_mut() {
                        let g: f64 = StandardNormal.sample(&mut rng);
                        *x = (g * self.noise_std) as f32;
                    }
                }
            }
            AttackKind::LabelFlip => {}
            AttackKind::LittleIsEnough => {
                let z = self.z.unwrap_or_else(|| little_is_enough_z(selected, selected_attackers));
                little_is_enough(deltas, z);
            }
        }
    }
}

fn scale(deltas: &mut [(DeviceId, &mut ModelParams)], by: f64) {
    let by = by as f32;
    for (_, delta) in deltas.iter_mut() {
        delta.data_mut().iter_mut().for_each(|x| *x *= by);
    }
}

/// Replaces every delta by `mu - z * sigma`, per coordinate over the deltas (sigma the sample
/// standard deviation; 0 for one delta).
pub fn little_is_enough(deltas: &mut [(DeviceId, &mut ModelParams)], z: f64) {
    let f = deltas.len();
    let Some(numel) = deltas.first().map(|(_, d)| d.numel()) else { return };
    if deltas.iter().any(|(_, d)| d.numel() != numel) {
        // Not one model's updates: leave them to the engine's checks.
        return;
    }
    let mut sent = vec![0f32; numel];
    for (j, out) in sent.iter_mut().enumerate() {
        let mu = deltas.iter().map(|(_, d)| d.data()[j] as f64).sum::<f64>() / f as f64;
        let sigma = if f > 1 {
            let ss: f64 = deltas.iter().map(|(_, d)| (d.data()[j] as f64 - mu).powi(2)).sum();
            (ss / (f - 1) as f64).sqrt()
        } else {
            0.0
        };
        *out = (mu - z * sigma) as f32;
    }
    for (_, delta) in deltas.iter_mut() {
        delta.data_mut().copy_from_slice(&sent);
    }
}

/// The attackers' examples with labels `y` read as `classes - 1 - y`, and each attacker's
/// indices into that copy (in the same order as its own).
fn flip_labels(
    train: &Dataset,
    device_data: &BTreeMap<DeviceId, Arc<Vec<usize>>>,
    attackers: &BTreeSet<DeviceId>,
) -> Flipped {
    let mut data = Dataset {
        rows: train.rows,
        cols: train.cols,
        images: Vec::new(),
        labels: Vec::new(),
        num_classes: train.num_classes,
    };
    let top = train.num_classes.saturating_sub(1).min(u8::MAX as usize) as u8;
    let mut indices = BTreeMap::new();
    for (&device, own) in device_data.iter().filter(|(d, _)| attackers.contains(d)) {
        let start = data.labels.len();
        for &i in own.iter() {
            data.images.extend_from_slice(train.image(i));
            data.labels.push(top.saturating_sub(train.labels[i]));
        }
        indices.insert(device, Arc::new((start..data.labels.len()).collect()));
    }
    Flipped { data: Arc::new(data), indices }
}

#[cfg(test)]
mod tests;
