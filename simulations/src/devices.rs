//! How fast the simulated devices are: a seeded model of each device's compute speed,
//! bandwidth and latency, and the virtual time a round trip takes.
//!
//! Each device gets its speeds once per run, drawn from the run's seed (stream
//! [`stream::DEVICE_SPEED`]): compute speed in samples per second and download and upload
//! bandwidths, each log-normal around a median (`sigma` 0: every device the same), and
//! `straggler_fraction` of the devices (rounded, chosen at random) `straggler_slowdown` times
//! slower at everything but latency. A device's result reaches the coordinator at
//!
//! ```text
//! round start + latency + model bytes / download  +  samples x epochs / compute  +  latency + model bytes / upload
//! ```
//!
//! (an update has the model's shape, so both transfers carry the encoded model's size).

use std::time::Duration;

use fedge_core::rng::{derive_rng, stream};
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// The speed model: the `[speed]` table of a simulator configuration. The defaults make every
/// device equal and quick enough that no round of a shipped configuration comes near the
/// default deadline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeedModel {
    /// Median local training speed, examples per second (one example of one epoch).
    pub compute_samples_per_s: f64,
    /// Log-normal sigma of the compute speed across devices (0: all at the median).
    pub compute_sigma: f64,
    /// Median download bandwidth, megabits per second.
    pub download_mbps: f64,
    /// Median upload bandwidth, megabits per second.
    pub upload_mbps: f64,
    /// Log-normal sigma of both bandwidths across devices (drawn independently).
    pub bandwidth_sigma: f64,
    /// One-way latency added to each transfer, milliseconds (the same for every device).
    pub latency_ms: f64,
    /// Fraction of the devices (rounded) that are stragglers, in [0, 1].
    pub straggler_fraction: f64,
    /// How many times slower a straggler computes, downloads and uploads (at least 1).
    pub straggler_slowdown: f64,
}

impl Default for SpeedModel {
    fn default() -> Self {
        Self {
            compute_samples_per_s: 1000.0,
            compute_sigma: 0.0,
            download_mbps: 20.0,
            upload_mbps: 5.0,
            bandwidth_sigma: 0.0,
            latency_ms: 50.0,
            straggler_fraction: 0.0,
            straggler_slowdown: 10.0,
        }
    }
}

/// One device's speeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSpeed {
    /// Examples trained per second.
    pub samples_per_s: f64,
    /// Download bandwidth, bits per second.
    pub download_bps: f64,
    /// Upload bandwidth, bits per second.
    pub upload_bps: f64,
    /// One-way latency, seconds.
    pub latency_s: f64,
    /// Whether the model made this device a straggler.
    pub straggler: bool,
}

impl DeviceSpeed {
    /// From the start of a round to its result reaching the coordinator: download the model
    /// (`model_bytes`), train on `samples` examples (examples x epochs), upload an update of the
    /// same size. Saturates at [`Duration::MAX`] for absurdly slow devices.
    pub fn round_trip(&self, model_bytes: u64, samples: u64) -> Duration {
        let bits = model_bytes as f64 * 8.0;
        let secs = self.latency_s
            + bits / self.download_bps
            + samples as f64 / self.samples_per_s
            + self.latency_s
            + bits / self.upload_bps;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

impl SpeedModel {
    /// Checks every value; the message names the key (`speed.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("compute_samples_per_s", self.compute_samples_per_s),
            ("download_mbps", self.download_mbps),
            ("upload_mbps", self.upload_mbps),
        ];
        for (key, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("speed.{key} must be positive and finite, got {v}"));
            }
        }
        for (key, v) in [("compute_sigma", self.compute_sigma), ("bandwidth_sigma", self.bandwidth_sigma)] {
            if !(0.0..=10.0).contains(&v) {
                return Err(format!("speed.{key} must be in [0, 10], got {v}"));
            }
        }
        if !(self.latency_ms >= 0.0 && self.latency_ms.is_finite()) {
            return Err(format!("speed.latency_ms must be zero or positive and finite, got {}", self.latency_ms));
        }
        if !(0.0..=1.0).contains(&self.straggler_fraction) {
            return Err(format!("speed.straggler_fraction must be in [0, 1], got {}", self.straggler_fraction));
        }
        if !(self.straggler_slowdown >= 1.0 && self.straggler_slowdown.is_finite()) {
            return Err(format!(
                "speed.straggler_slowdown must be at least 1 and finite, got {}",
                self.straggler_slowdown
            ));
        }
        Ok(())
    }

    /// The speeds of `devices` devices, drawn from `seed`: the same seed and model give the
    /// same fleet. Index = device id.
    pub fn draw(&self, devices: usize, seed: u64) -> Vec<DeviceSpeed> {
        let mut rng = derive_rng(seed, &[stream::DEVICE_SPEED]);
        let mut fleet: Vec<DeviceSpeed> = (0..devices)
            .map(|_| {
                // Three draws per device whatever the sigmas, so one key does not shift another.
                let mut lognormal = |median: f64, sigma: f64| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    median * (sigma * z).exp()
                };
                DeviceSpeed {
                    samples_per_s: lognormal(self.compute_samples_per_s, self.compute_sigma),
                    download_bps: lognormal(self.download_mbps * 1e6, self.bandwidth_sigma),
                    upload_bps: lognormal(self.upload_mbps * 1e6, self.bandwidth_sigma),
                    latency_s: self.latency_ms / 1e3,
                    straggler: false,
                }
            })
            .collect();
        let stragglers = (self.straggler_fraction * devices as f64).round() as usize;
        if stragglers > 0 {
            let mut ids: Vec<usize> = (0..devices).collect();
            ids.shuffle(&mut rng);
            for &d in &ids[..stragglers.min(devices)] {
                let s = &mut fleet[d];
                s.samples_per_s /= self.straggler_slowdown;
                s.download_bps /= self.straggler_slowdown;
                s.upload_bps /= self.straggler_slowdown;
                s.straggler = true;
            }
        }
        fleet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_equal_devices_and_a_round_trip_adds_up() {
        let fleet = SpeedModel::default().draw(5, 1);
        assert!(fleet.iter().all(|d| *d == fleet[0] && !d.straggler));
        // 1 MB each way at 20 and 5 Mbps, 2000 examples at 1000/s, two latencies of 50 ms.
        let t = fleet[0].round_trip(1_000_000, 2000);
        assert!((t.as_secs_f64() - (0.4 + 2.0 + 1.6 + 0.1)).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn draws_are_seeded_and_stragglers_are_counted() {
        let m = SpeedModel { compute_sigma: 0.5, bandwidth_sigma: 0.5, straggler_fraction: 0.25, ..Default::default() };
        assert_eq!(m.draw(40, 3), m.draw(40, 3));
        assert_ne!(m.draw(40, 3), m.draw(40, 4));
        let fleet = m.draw(40, 3);
        assert_eq!(fleet.iter().filter(|d| d.straggler).count(), 10);
        assert!(fleet.windows(2).any(|w| w[0].samples_per_s != w[1].samples_per_s));
        let slow = SpeedModel { compute_samples_per_s: 1e-300, ..Default::default() }.draw(1, 0);
        assert_eq!(slow[0].round_trip(10, 10), Duration::MAX);
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = [
            SpeedModel { compute_samples_per_s: -1.0, ..Default::default() },
            SpeedModel { upload_mbps: f64::NAN, ..Default::default() },
            SpeedModel { download_mbps: f64::INFINITY, ..Default::default() },
            SpeedModel { compute_sigma: -0.1, ..Default::default() },
            SpeedModel { latency_ms: f64::NAN, ..Default::default() },
            SpeedModel { straggler_fraction: 1.5, ..Default::default() },
            SpeedModel { straggler_slowdown: 0.5, ..Default::default() },
        ];
        for m in bad {
            assert!(m.validate().is_err(), "{m:?}");
        }
        SpeedModel::default().validate().unwrap();
    }
}
