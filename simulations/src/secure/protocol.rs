//! One round of SecAgg+ among the devices whose results arrived: the devices' side prepares
//! and masks their updates, the server's side sees only decoded messages and the final sum.
//! Every message crosses [`wire`] (bincode, as the network would carry it) and is counted.

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use fedge_core::ModelParams;
use fedge_core::rng::derive_rng;
use fedge_core::wire::{DeviceId, TrainResult};
use fedge_engine::SecureAggregate;
use fedge_secagg::{Aggregate, Client, SecAggConfig, Server};
use rand::RngExt;

use super::SecureSetup;

/// The rng stream of secure aggregation (round seeds, device entropy, stage dropouts); apart
/// from fedge-core's streams, which are small numbers.
const STREAM: u64 = 0x5ec_a66;

/// Bytes one device sent and received over the four stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Device to server.
    pub sent: u64,
    /// Server to device.
    pub received: u64,
}

/// What a round of secure aggregation produced.
#[derive(Debug)]
pub struct Secured {
    /// The survivors' weighted mean, for the engine.
    pub aggregate: SecureAggregate,
    /// Reporting devices not summed (dropped between stages, or excluded).
    pub dropped: Vec<DeviceId>,
    /// Each reporting device's traffic, in arrival order.
    pub traffic: Vec<Traffic>,
}

/// A round whose secure aggregation failed: why, and the traffic spent.
#[derive(Debug)]
pub struct Failed {
    /// One line.
    pub reason: String,
    /// Each reporting device's traffic, in arrival order.
    pub traffic: Vec<Traffic>,
}

/// Encodes `msg` as it would cross the network, counts its bytes, decodes it.
pub fn wire<T: Encode + Decode<()>>(msg: &T, bytes: &mut u64) -> Result<T, String> {
    let cfg = bincode::config::standard();
    let encoded = bincode::encode_to_vec(msg, cfg).map_err(|e| e.to_string())?;
    *bytes += encoded.len() as u64;
    bincode::decode_from_slice(&encoded, cfg).map(|(m, _)| m).map_err(|e| e.to_string())
}

/// The devices' side: their SecAgg clients and the vectors they will mask. Consumes the plain
/// results; nothing here is readable by the server's side.
struct Devices {
    clients: Vec<Client>,
    inputs: Vec<Vec<f32>>,
    alive: Vec<bool>,
}

impl Devices {
    /// Each device's vector `(w clip(delta), w C)` with `w = min(n, W) / W`, its client seeded
    /// from the run's seed, the round and its device id. Under distributed DP every device
    /// weighs 1 and adds its share of the noise, N(0, sigma^2) per coordinate (drawn from its
    /// own seeded stream), within the protocol's per-coordinate bound.
    fn new(
        setup: &SecureSetup,
        config: &SecAggConfig,
        round: u64,
        seed: [u8; 32],
        batch: Vec<(DeviceId, TrainResult)>,
        sigma: Option<f64>,
    ) -> Result<Self, String> {
        let (mut clients, mut inputs) = (Vec::new(), Vec::new());
        let bound = config.clip;
        for (i, (device, result)) in batch.into_iter().enumerate() {
            let entropy: [u8; 32] = derive_rng(setup.seed, &[STREAM, round, 1, device]).random();
            clients.push(Client::new(config, seed, i as u32, entropy).map_err(|e| e.to_string())?);
            let w = match sigma {
                Some(_) => 1.0,
                None => result.num_samples.min(setup.weight_cap) as f64 / setup.weight_cap as f64,
            };
            let norm = result.delta.l2_norm();
            let c = f64::from(setup.clip);
            let clip = if norm > c { c / norm } else { 1.0 };
            let mut v: Vec<f32> = result.delta.data().iter().map(|&x| (f64::from(x) * clip * w) as f32).collect();
            if let Some(sigma) = sigma {
                let mut rng = derive_rng(setup.seed, &[STREAM, round, 3, device]);
                fedge_core::privacy::noise::add_gaussian_noise(&mut v, sigma, &mut rng);
                // Past 8 sigma (probability 1e-15 a value): kept inside the ring's bound.
                v.iter_mut().for_each(|x| *x = x.clamp(-bound, bound));
            }
            v.push((w * c) as f32);
            inputs.push(v);
        }
        let alive = vec![true; clients.len()];
        Ok(Devices { clients, inputs, alive })
    }

    /// Devices drop after a stage, each with probability `p` (one draw per device, seeded).
    fn drop_some(&mut self, p: f64, seed: u64, round: u64, stage: u64) {
        let mut rng = derive_rng(seed, &[STREAM, round, 2, stage]);
        for a in &mut self.alive {
            let gone = rng.random::<f64>() < p;
            *a &= !gone;
        }
    }
}

/// Runs SecAgg+ among `batch` (the round's on-time results, in arrival order) of the
/// `selected` devices of the round: the survivors' weighted mean delta, or why the round's
/// aggregation failed. Under distributed DP the mean is the noised sum over the fixed
/// denominator `selected` (as DP-FedAvg's), and says what noise it carries.
pub fn aggregate(
    setup: &SecureSetup,
    round: u64,
    selected: usize,
    batch: Vec<(DeviceId, TrainResult)>,
) -> Result<Secured, Failed> {
    let ids: Vec<DeviceId> = batch.iter().map(|b| b.0).collect();
    let m = ids.len();
    let mut traffic = vec![Traffic::default(); m];
    let Some(layout) = batch.first().map(|b| b.1.delta.layout().clone()) else {
        return Err(Failed { reason: "no device reported".into(), traffic });
    };
    let d = layout.numel();
    let fail = |reason: String, traffic: Vec<Traffic>| Failed { reason, traffic };
    let selected = selected.max(m);
    let sigma = setup.noise.map(|n| n.device_sigma(selected, f64::from(setup.clip)));
    // Distributed DP: each coordinate is a clipped value plus noise, bounded at C + 8 sigma.
    let bound = setup.clip + sigma.map_or(0.0, |s| (8.0 * s) as f32);
    let config = match setup.round_config_within(m as u32, d + 1, bound) {
        Ok(c) => c,
        Err(e) => return Err(fail(e, traffic)),
    };
    let seed: [u8; 32] = derive_rng(setup.seed, &[STREAM, round, 0]).random();
    let mut devices = match Devices::new(setup, &config, round, seed, batch, sigma) {
        Ok(d) => d,
        Err(e) => return Err(fail(e, traffic)),
    };
    let sum = match run_stages(setup, &config, round, seed, &mut devices, &mut traffic) {
        Ok(s) => s,
        Err(e) => return Err(fail(e, traffic)),
    };
    // The server's side from here: the sum and who is in it.
    let (c, s) = (f64::from(config.clip), f64::from(config.scale));
    let count = sum.survivors.len() as f64;
    let level = |q: u64| q as f64 / s - count * c;
    let (Some(&total), Some(coords)) = (sum.sum.get(d), sum.sum.get(..d)) else {
        return Err(fail(format!("the sum has {} values, not {}", sum.sum.len(), d + 1), traffic));
    };
    let weight = level(total);
    if weight <= 0.0 {
        return Err(fail(format!("the summed weight {weight} is not positive"), traffic));
    }
    let (mean, samples, noise_multiplier) = match setup.noise {
        // Every survivor weighs 1 (its weight coordinate is C); the noised sum over the
        // devices selected, whoever dropped.
        Some(n) => (
            coords.iter().map(|&q| (level(q) / selected as f64) as f32).collect::<Vec<f32>>(),
            sum.survivors.len() as u64,
            Some(n.carried(selected, sum.survivors.len())),
        ),
        None => (
            coords.iter().map(|&q| (level(q) / weight * f64::from(setup.clip)) as f32).collect(),
            (weight / f64::from(setup.clip) * setup.weight_cap as f64).round() as u64,
            None,
        ),
    };
    let survivors: BTreeSet<u32> = sum.survivors.iter().copied().collect();
    let summed: Vec<DeviceId> = sum.survivors.iter().filter_map(|&i| ids.get(i as usize).copied()).collect();
    let dropped = (0..m).filter(|i| !survivors.contains(&(*i as u32))).map(|i| ids[i]).collect();
    let mean_delta =
        ModelParams::new(layout, mean).map_err(|e| Failed { reason: e.to_string(), traffic: traffic.clone() })?;
    Ok(Secured {
        aggregate: SecureAggregate { devices: summed, mean_delta, samples, noise_multiplier },
        dropped,
        traffic,
    })
}

/// The four stages. A device whose own call fails drops there, as it would in the field; a
/// message the server refuses excludes its sender. The server's errors that end the round
/// (too few devices or shares) end it here.
fn run_stages(
    setup: &SecureSetup,
    config: &SecAggConfig,
    round: u64,
    seed: [u8; 32],
    devices: &mut Devices,
    traffic: &mut [Traffic],
) -> Result<Aggregate, String> {
    let e = |e: fedge_secagg::SecAggError| e.to_string();
    let mut server = Server::new(config, seed).map_err(e)?;
    for (i, c) in devices.clients.iter_mut().enumerate() {
        if let Ok(msg) = c.advertise() {
            let _ = server.receive_advertise(wire(&msg, &mut traffic[i].sent)?);
        }
    }
    let keys = server.finish_advertise().map_err(e)?;
    devices.drop_some(setup.dropout, setup.seed, round, 0);
    for (d, msg) in keys {
        let i = d as usize;
        if !devices.alive.get(i).copied().unwrap_or(false) {
            continue;
        }
        let msg = wire(&msg, &mut traffic[i].received)?;
        if let Ok(out) = devices.clients[i].share_keys(&msg) {
            let _ = server.receive_shares(wire(&out, &mut traffic[i].sent)?);
        }
    }
    let shares = server.finish_shares().map_err(e)?;
    devices.drop_some(setup.dropout, setup.seed, round, 1);
    for (d, msg) in shares {
        let i = d as usize;
        if !devices.alive.get(i).copied().unwrap_or(false) {
            continue;
        }
        let msg = wire(&msg, &mut traffic[i].received)?;
        let input = std::mem::take(&mut devices.inputs[i]);
        if let Ok(out) = devices.clients[i].masked_input(&msg, &input) {
            let _ = server.receive_masked_input(wire(&out, &mut traffic[i].sent)?);
        }
    }
    let (request, recipients) = server.finish_masked_inputs().map_err(e)?;
    devices.drop_some(setup.dropout, setup.seed, round, 2);
    for d in recipients {
        let i = d as usize;
        if !devices.alive.get(i).copied().unwrap_or(false) {
            continue;
        }
        let msg = wire(&request, &mut traffic[i].received)?;
        if let Ok(out) = devices.clients[i].unmask(&msg) {
            let _ = server.receive_unmask(wire(&out, &mut traffic[i].sent)?);
        }
    }
    server.finish().map_err(e)
}
