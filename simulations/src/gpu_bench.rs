//! `fedge-sim bench-gpu`: what a device or a simulation pays on a GPU backend, per model and
//! batch size: the first step of a fresh trainer (kernels compiled, or read from the driver's
//! shader cache: `simulations/bench/gpu/run.sh` runs this twice, with an empty cache and then
//! the one the first run left) and the steady step time after it.
//!
//! Each measurement trains on MNIST-shaped random data (as `fedge-sim bench-train`), through
//! the same `Trainer::train` a device runs: every step uploads its batch, runs forward,
//! cross-entropy, backward and the SGD update, and reads the loss back (a synchronisation).

use std::time::Instant;

use fedge_core::rng::derive_rng;
use fedge_core::wire::TrainConfig;
use fedge_learn::{BackendKind, GroupTrainer, Member, ModelKind, Trainer};

/// One model and batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuRow {
    /// Model.
    pub model: String,
    /// Minibatch size.
    pub batch: usize,
    /// Backend measured.
    pub backend: String,
    /// Whether this was the process's first measurement (its first step also set the GPU up).
    pub process_first: bool,
    /// Milliseconds from a fresh trainer to the end of its first step.
    pub first_step_ms: f64,
    /// Steady milliseconds per step (the median of `repeat` timed runs of `steps` steps).
    pub ms_per_step: f64,
    /// Samples per second at that rate.
    pub samples_per_s: f64,
}

/// Measures `models` x `batches` on `backend`, `steps` steps a run, `repeat` runs.
pub fn run(
    models: &[ModelKind],
    batches: &[usize],
    backend: BackendKind,
    (steps, repeat): (usize, usize),
    mut each: impl FnMut(&GpuRow),
) -> anyhow::Result<Vec<GpuRow>> {
    anyhow::ensure!(steps > 0 && repeat > 0, "steps and repeat must be positive");
    let largest = batches.iter().copied().max().unwrap_or(1);
    ensure_fits(largest * steps, "batch x steps")?;
    let data = crate::bench::random_data(largest * steps, 7);
    let mut rows = Vec::new();
    for &kind in models {
        for &batch in batches {
            let config = TrainConfig::sgd(1, batch as u32, 0.01);
            let started = Instant::now();
            let mut trainer = Trainer::new(kind, 10, backend)?;
            let start = trainer.initial_params(1);
            let first: Vec<usize> = (0..batch).collect();
            trainer.train(&start, &data, &first, &config, &mut derive_rng(1, &[]))?;
            let first_step_ms = started.elapsed().as_secs_f64() * 1e3;
            let all: Vec<usize> = (0..batch * steps).collect();
            let mut times = Vec::with_capacity(repeat);
            for r in 0..repeat {
                let t = Instant::now();
                trainer.train(&start, &data, &all, &config, &mut derive_rng(2 + r as u64, &[]))?;
                times.push(t.elapsed().as_secs_f64() * 1e3 / steps as f64);
            }
            let ms_per_step = median(times);
            let row = GpuRow {
                model: kind.to_string(),
                batch,
                backend: backend.to_string(),
                process_first: rows.is_empty(),
                first_step_ms,
                ms_per_step,
                samples_per_s: batch as f64 * 1e3 / ms_per_step,
            };
            each(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Many devices per launch: `devices` models trained together.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LaunchRow {
    /// Model.
    pub model: String,
    /// Devices trained in one launch.
    pub devices: usize,
    /// Steps each device takes (batch 10).
    pub steps_per_device: usize,
    /// Backend measured.
    pub backend: String,
    /// Examples per second over all the devices (the median of `repeat` runs, after one that
    /// compiles the kernels).
    pub samples_per_s: f64,
}

/// Measures `models` x `devices` per launch on `backend`: each device `steps` steps of batch 10
/// on its own 10 x `steps` examples, all in one [`GroupTrainer`] launch a step.
pub fn run_launches(
    models: &[ModelKind],
    devices: &[usize],
    backend: BackendKind,
    (steps, repeat): (usize, usize),
    mut each: impl FnMut(&LaunchRow),
) -> anyhow::Result<Vec<LaunchRow>> {
    anyhow::ensure!(repeat > 0, "repeat must be positive");
    check_launches(devices, steps)?;
    let largest = devices.iter().copied().max().unwrap_or(1);
    let per = 10 * steps;
    let data = crate::bench::random_data(largest * per, 9);
    let config = TrainConfig::sgd(1, 10, 0.01);
    let mut rows = Vec::new();
    for &kind in models {
        let start = Trainer::new(kind, 10, BackendKind::Flex)?.initial_params(1);
        let mut group = GroupTrainer::new(kind, 10, backend)?;
        for &n in devices {
            let shards: Vec<Vec<usize>> = (0..n).map(|d| (d * per..(d + 1) * per).collect()).collect();
            let mut time_one = |seed: u64| -> anyhow::Result<f64> {
                let mut rngs: Vec<_> = (0..n).map(|d| derive_rng(seed, &[d as u64])).collect();
                let mut members: Vec<Member<'_, _>> =
                    rngs.iter_mut().zip(&shards).map(|(rng, indices)| Member { start: &start, indices, rng }).collect();
                let t = Instant::now();
                group.train(&data, &mut members, &config)?;
                Ok(t.elapsed().as_secs_f64())
            };
            time_one(1)?;
            let times = (0..repeat).map(|r| time_one(2 + r as u64)).collect::<anyhow::Result<Vec<f64>>>()?;
            let row = LaunchRow {
                model: kind.to_string(),
                devices: n,
                steps_per_device: steps,
                backend: backend.to_string(),
                samples_per_s: (n * per) as f64 / median(times),
            };
            each(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Refuses what [`run_launches`] cannot measure (before anything runs): a group of 0 or more
/// than 4,096 devices, no steps, or more examples than [`MAX_EXAMPLES`].
pub fn check_launches(devices: &[usize], steps: usize) -> anyhow::Result<()> {
    anyhow::ensure!(devices.iter().all(|&n| (1..=4096).contains(&n)), "devices must be 1..=4096");
    anyhow::ensure!(steps > 0, "steps must be positive");
    let largest = devices.iter().copied().max().unwrap_or(1);
    ensure_fits(largest.saturating_mul(10 * steps), "devices x 10 x steps")
}

/// The most random examples a measurement makes (784 bytes each: about 160 MB).
const MAX_EXAMPLES: usize = 200_000;

/// Refuses a measurement that would make more than [`MAX_EXAMPLES`] examples.
fn ensure_fits(examples: usize, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(examples <= MAX_EXAMPLES, "{what} is {examples} examples; at most {MAX_EXAMPLES}: lower it");
    Ok(())
}

/// The median of `times` (not empty).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_each_model_and_batch_on_the_cpu() {
        let rows = run(&[ModelKind::TwoNn], &[4, 8], BackendKind::Flex, (3, 2), |_| {}).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].process_first && !rows[1].process_first);
        assert!(rows.iter().all(|r| r.first_step_ms > 0.0 && r.ms_per_step > 0.0 && r.samples_per_s > 0.0));
        assert_eq!((rows[1].batch, rows[1].model.as_str()), (8, "2nn"));
        assert!(run(&[ModelKind::TwoNn], &[4], BackendKind::Flex, (0, 1), |_| {}).is_err());
        let launches = run_launches(&[ModelKind::TwoNn], &[1, 3], BackendKind::Flex, (2, 1), |_| {}).unwrap();
        assert_eq!(launches.iter().map(|r| r.devices).collect::<Vec<_>>(), [1, 3]);
        assert!(launches.iter().all(|r| r.samples_per_s > 0.0));
    }
}
