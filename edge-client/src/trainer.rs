//! A device's training step, from task to upload-ready result.

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::params::ContentHash;
use fedge_core::privacy::{ClipOutcome, PrivacyError, add_gaussian_noise, calibrate_analytic_gaussian, clip_l2};
use fedge_core::wire::{TrainResult, TrainTask};
use fedge_learn::{BackendError, BackendKind, ConvertError, GroupTrainer, Member, ModelKind, TrainOutput, Trainer};
use thiserror::Error;

/// Why a task could not be done.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The model held is not the one the task names.
    #[error("model hash mismatch: task wants {want}, device holds {have}")]
    ModelMismatch {
        /// Hash in the task.
        want: String,
        /// Hash of the model given.
        have: String,
    },
    /// The device has no examples.
    #[error("no local data to train on")]
    NoData,
    /// The model does not fit this device's architecture.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The task's local DP parameters are invalid (or lack a clip norm).
    #[error("local DP: {0}")]
    LocalDp(String),
    /// The task's FedProx mu is negative, NaN or infinite.
    #[error("invalid task: proximal mu must be finite and not negative, got {0}")]
    ProximalMu(f32),
    /// A group of devices trained in one launch could not be ([`run_group`]).
    #[error("devices trained in one launch: {0}")]
    Group(String),
    /// Training produced NaN or infinite weights (diverged).
    #[error("training diverged (non-finite weights); try a smaller learning rate")]
    Diverged,
}

/// A finished task.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// What to upload.
    pub result: TrainResult,
    /// What clipping did, if the task asked for it.
    pub clip: Option<ClipOutcome>,
    /// Standard deviation of the local DP noise added, if any.
    pub noise_std: Option<f64>,
    /// SGD steps taken.
    pub steps: usize,
}

/// One device-side trainer: a model instance reused for every task it runs.
pub struct EdgeTrainer {
    trainer: Trainer,
}

impl EdgeTrainer {
    /// A trainer for `kind` on `backend`.
    pub fn new(kind: ModelKind, num_classes: usize, backend: BackendKind) -> Result<Self, BackendError> {
        Ok(Self { trainer: Trainer::new(kind, num_classes, backend)? })
    }

    /// The underlying learner (for evaluation and initial parameters).
    pub fn learner(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// Runs `task` from `global` on examples `indices` of `data`. `train_rng` orders batches;
    /// `noise_rng` draws the privacy noise.
    pub fn run_task<R: rand::Rng + ?Sized>(
        &mut self,
        task: &TrainTask,
        global: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        train_rng: &mut R,
        noise_rng: &mut R,
    ) -> Result<TaskOutcome, TrainError> {
        let noise_std = check(task, &global.content_hash(), indices)?;
        let out = self.trainer.train(global, data, indices, &task.config, train_rng)?;
        finish(task, global, out, indices.len(), noise_std, noise_rng)
    }
}

/// One device of a group trained in one launch ([`run_group`]).
pub struct GroupJob<'a, R: rand::Rng + ?Sized> {
    /// Its task (every job of a group is of one round: the same global model and settings).
    pub task: &'a TrainTask,
    /// Its examples.
    pub indices: &'a [usize],
    /// Orders its batches.
    pub train_rng: &'a mut R,
    /// Draws its privacy noise.
    pub noise_rng: &'a mut R,
}

/// Runs `jobs` from `global` on `group`, their models stacked in one set of launches a step
/// (`fedge_learn::group`): each outcome is what [`EdgeTrainer::run_task`] gives for it alone,
/// to float rounding. A job whose task is refused fails alone; the others train.
pub fn run_group<R: rand::Rng + ?Sized>(
    group: &mut GroupTrainer,
    global: &ModelParams,
    data: &Dataset,
    jobs: &mut [GroupJob<'_, R>],
) -> Vec<Result<TaskOutcome, TrainError>> {
    // One model for the whole group: hashed once.
    let have = global.content_hash();
    let checked: Vec<Result<Option<f64>, TrainError>> = jobs.iter().map(|j| check(j.task, &have, j.indices)).collect();
    let Some(config) = jobs.iter().zip(&checked).find(|(_, c)| c.is_ok()).map(|(j, _)| j.task.config) else {
        // Every job was refused: their refusals.
        return checked.into_iter().filter_map(Result::err).map(Err).collect();
    };
    if let Some(other) = jobs.iter().zip(&checked).find(|(j, c)| c.is_ok() && j.task.config != config) {
        let detail = format!("its tasks differ in their settings ({:?} and {config:?})", other.0.task.config);
        return jobs.iter().map(|_| Err(TrainError::Group(detail.clone()))).collect();
    }
    let mut members: Vec<Member<'_, R>> = jobs
        .iter_mut()
        .zip(&checked)
        .filter(|(_, c)| c.is_ok())
        .map(|(j, _)| Member { start: global, indices: j.indices, rng: &mut *j.train_rng })
        .collect();
    let trained = match group.train(data, &mut members, &config) {
        Ok(outs) => outs,
        Err(e) => return jobs.iter().map(|_| Err(TrainError::Group(e.to_string()))).collect(),
    };
    drop(members);
    let mut outs = trained.into_iter();
    jobs.iter_mut()
        .zip(checked)
        .map(|(j, c)| {
            let noise_std = c?;
            let out = outs.next().expect("one output per member");
            finish(j.task, global, out, j.indices.len(), noise_std, j.noise_rng)
        })
        .collect()
}

/// Checks `task` against the model held and the data: the local DP noise's standard deviation
/// (calibrated before training wastes time), or why the task cannot run.
fn check(task: &TrainTask, have: &ContentHash, indices: &[usize]) -> Result<Option<f64>, TrainError> {
    if *have != task.model_hash {
        return Err(TrainError::ModelMismatch { want: task.model_hash.to_string(), have: have.to_string() });
    }
    if indices.is_empty() {
        return Err(TrainError::NoData);
    }
    if let Some(mu) = task.config.proximal_mu
        && !(mu.is_finite() && mu >= 0.0)
    {
        return Err(TrainError::ProximalMu(mu));
    }
    // Local DP: sensitivity 2C (any two deltas in the ball of radius C differ by at most 2C),
    // noise from the analytic Gaussian mechanism.
    match (task.config.local_dp, task.config.clip_norm) {
        (Some(_), None) => Err(TrainError::LocalDp("local DP needs a clip norm".into())),
        (Some(l), Some(c)) => Ok(Some(
            calibrate_analytic_gaussian(l.epsilon, l.delta, 2.0 * c as f64)
                .map_err(|e: PrivacyError| TrainError::LocalDp(e.to_string()))?,
        )),
        (None, _) => Ok(None),
    }
}

/// The upload-ready result of training `out` for `task` from `global` on `samples` examples:
/// the delta, clipped and noised as the task asks.
fn finish<R: rand::Rng + ?Sized>(
    task: &TrainTask,
    global: &ModelParams,
    out: TrainOutput,
    samples: usize,
    noise_std: Option<f64>,
    noise_rng: &mut R,
) -> Result<TaskOutcome, TrainError> {
    let mut delta = out.params.delta_from(global).map_err(|e| ConvertError::Layout(e.to_string()))?;
    if delta.check_finite().is_err() {
        return Err(TrainError::Diverged);
    }
    let clip = task.config.clip_norm.map(|c| clip_l2(delta.data_mut(), c as f64));
    if let Some(std) = noise_std {
        add_gaussian_noise(delta.data_mut(), std, noise_rng);
    }
    Ok(TaskOutcome {
        result: TrainResult {
            round: task.round,
            model_version: task.model_version,
            num_samples: samples as u64,
            train_loss: out.mean_loss,
            delta,
            clipped: clip.is_some_and(|c| c.clipped()),
        },
        clip,
        noise_std,
        steps: out.steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::dataset::embedded;
    use fedge_core::privacy::l2_norm;
    use fedge_core::rng::derive_rng;
    use fedge_core::wire::{LocalDp, TrainConfig};

    fn task(global: &ModelParams, clip: Option<f32>, local_dp: Option<LocalDp>) -> TrainTask {
        TrainTask {
            round: 4,
            model_version: 3,
            model_hash: global.content_hash(),
            config: TrainConfig {
                epochs: 1,
                batch_size: 10,
                learning_rate: 0.05,
                clip_norm: clip,
                local_dp,
                proximal_mu: None,
            },
            secure: None,
        }
    }

    #[test]
    fn task_yields_a_clipped_delta_for_the_right_version() {
        let data = embedded::mnist_subset().unwrap();
        let mut t = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let global = t.learner().initial_params(1);
        let idx: Vec<usize> = (0..100).collect();
        let run = |t: &mut EdgeTrainer, clip, noise| {
            t.run_task(
                &task(&global, clip, noise),
                &global,
                &data.train,
                &idx,
                &mut derive_rng(1, &[]),
                &mut derive_rng(2, &[]),
            )
            .unwrap()
        };
        let free = run(&mut t, None, None);
        assert_eq!((free.result.round, free.result.model_version, free.result.num_samples), (4, 3, 100));
        assert_eq!(free.steps, 10);
        let norm = free.result.delta.l2_norm();
        assert!(norm > 0.0);
        let clipped = run(&mut t, Some((norm / 4.0) as f32), None);
        assert!(clipped.clip.unwrap().clipped());
        assert!(clipped.result.delta.l2_norm() <= norm / 4.0 * (1.0 + 1e-5));
        assert!(clipped.result.clipped && !free.result.clipped);
        let ldp = LocalDp { epsilon: 4.0, delta: 1e-5 };
        let noised = run(&mut t, Some((norm / 4.0) as f32), Some(ldp));
        let diff: Vec<f32> =
            noised.result.delta.data().iter().zip(clipped.result.delta.data()).map(|(a, b)| a - b).collect();
        // Analytic-Gaussian noise for sensitivity 2C per coordinate: its norm is about
        // sigma * sqrt(d).
        let sigma = calibrate_analytic_gaussian(4.0, 1e-5, 2.0 * (norm / 4.0) as f32 as f64).unwrap();
        assert_eq!(noised.noise_std, Some(sigma));
        let expect = sigma * (diff.len() as f64).sqrt();
        assert!((l2_norm(&diff) / expect - 1.0).abs() < 0.05, "{} vs {expect}", l2_norm(&diff));
        // Local DP without a clip norm, or with a bad epsilon, is refused before training.
        let mut r = derive_rng(0, &[]);
        let mut n = derive_rng(0, &[]);
        let err = t.run_task(&task(&global, None, Some(ldp)), &global, &data.train, &idx, &mut r, &mut n);
        assert!(matches!(err, Err(TrainError::LocalDp(_))));
        let bad = LocalDp { epsilon: 0.0, delta: 1e-5 };
        let err = t.run_task(&task(&global, Some(1.0), Some(bad)), &global, &data.train, &idx, &mut r, &mut n);
        assert!(matches!(err, Err(TrainError::LocalDp(_))));
    }

    #[test]
    fn wrong_model_no_data_or_bad_proximal_mu_is_refused() {
        let data = embedded::mnist_subset().unwrap();
        let mut t = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let global = t.learner().initial_params(1);
        let other = t.learner().initial_params(2);
        let mut r = derive_rng(0, &[]);
        let mut n = derive_rng(0, &[]);
        let err = t.run_task(&task(&other, None, None), &global, &data.train, &[1, 2], &mut r, &mut n).unwrap_err();
        assert!(matches!(err, TrainError::ModelMismatch { .. }));
        let err = t.run_task(&task(&global, None, None), &global, &data.train, &[], &mut r, &mut n).unwrap_err();
        assert!(matches!(err, TrainError::NoData));
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            let mut prox = task(&global, None, None);
            prox.config.proximal_mu = Some(bad);
            let err = t.run_task(&prox, &global, &data.train, &[1, 2], &mut r, &mut n).unwrap_err();
            assert!(matches!(err, TrainError::ProximalMu(_)), "{bad}: {err}");
            assert!(err.to_string().contains("proximal mu"), "{err}");
        }
    }
}
