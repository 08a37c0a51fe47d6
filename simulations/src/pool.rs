//! A small pool of worker threads, each owning one model instance.
//!
//! Virtual devices are only data indices and a little state; a job names the device, its task
//! and its examples, and any free worker runs it on its own [`EdgeTrainer`]. Each job derives
//! its random streams from the run seed, the round and the device, so which worker runs it
//! (and in which order jobs finish) never changes the numbers.
//!
//! With devices per launch (`devices_per_launch > 1`), the caller submits a round's jobs in
//! groups ([`Pool::submit_group`], its composition fixed by the caller, so the numbers still do
//! not depend on the workers): a worker trains a group's models stacked in one set of launches
//! a step ([`fedge_edge::trainer::run_group`]) and reports each job as it would alone.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::{DeviceId, TrainTask};
use fedge_edge::trainer::{GroupJob, run_group};
use fedge_edge::{EdgeTrainer, TaskOutcome, TrainError};
use fedge_learn::{BackendError, BackendKind, GroupError, GroupTrainer, ModelKind};

/// One device's training job.
pub struct Job {
    /// Position in the round's selection order (results are applied in this order).
    pub seq: usize,
    /// The virtual device.
    pub device: DeviceId,
    /// What to do.
    pub task: TrainTask,
    /// The global model the task names.
    pub global: Arc<ModelParams>,
    /// The device's examples.
    pub indices: Arc<Vec<usize>>,
    /// The dataset `indices` point into when not the pool's (a label-flip attacker's copy).
    pub data: Option<Arc<Dataset>>,
}

/// A finished job.
pub struct Done {
    /// The job's `seq`.
    pub seq: usize,
    /// The job's device.
    pub device: DeviceId,
    /// The outcome.
    pub outcome: Result<TaskOutcome, TrainError>,
}

/// What a worker takes from the queue.
enum Work {
    /// One device.
    One(Job),
    /// Devices trained in one launch (one round's: the same global model and settings).
    Group(Vec<Job>),
}

/// Worker threads sharing one job queue.
pub struct Pool {
    jobs: Option<Sender<Work>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `workers` threads, each building its own trainer for `kind` on `backend`.
    pub fn new(
        workers: usize,
        kind: ModelKind,
        num_classes: usize,
        backend: BackendKind,
        data: Arc<Dataset>,
        seed: u64,
    ) -> Result<Self, BackendError> {
        // Fail here, in the caller's thread, if the backend is unusable.
        backend.device()?;
        let (job_tx, job_rx) = channel::<Work>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let handles = (0..workers.max(1))
            .map(|i| {
                let (job_rx, done_tx, data) = (job_rx.clone(), done_tx.clone(), data.clone());
                std::thread::Builder::new()
                    .name(format!("fedge-worker-{i}"))
                    .spawn(move || {
                        let mut trainer = EdgeTrainer::new(kind, num_classes, backend).expect("backend checked above");
                        let mut group: Option<Result<GroupTrainer, GroupError>> = None;
                        loop {
                            let work = match job_rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            let done: Vec<Done> = match work {
                                Err(_) => return,
                                Ok(Work::One(job)) => {
                                    let (mut train_rng, mut noise_rng) = rngs(seed, &job);
                                    let outcome = trainer.run_task(
                                        &job.task,
                                        &job.global,
                                        job.data.as_deref().unwrap_or(&data),
                                        &job.indices,
                                        &mut train_rng,
                                        &mut noise_rng,
                                    );
                                    vec![Done { seq: job.seq, device: job.device, outcome }]
                                }
                                Ok(Work::Group(jobs)) => {
                                    if group.is_none() {
                                        group = Some(GroupTrainer::new(kind, num_classes, backend));
                                    }
                                    match group.as_mut().expect("made above") {
                                        Ok(group) => train_group(group, &data, jobs, seed),
                                        // A model without a stacked form (SimConfig refuses it
                                        // first): each job fails, named, and the worker goes on.
                                        Err(e) => jobs
                                            .iter()
                                            .map(|j| Done {
                                                seq: j.seq,
                                                device: j.device,
                                                outcome: Err(TrainError::Group(e.to_string())),
                                            })
                                            .collect(),
                                    }
                                }
                            };
                            for d in done {
                                if done_tx.send(d).is_err() {
                                    return;
                                }
                            }
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        Ok(Self { jobs: Some(job_tx), done: done_rx, workers: handles })
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) {
        self.jobs.as_ref().expect("pool is open").send(Work::One(job)).expect("workers are alive");
    }

    /// Queues jobs to be trained in one launch (one round's, on the pool's dataset); each is
    /// reported as a job of its own.
    pub fn submit_group(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let work =
            if jobs.len() == 1 { Work::One(jobs.into_iter().next().expect("one job")) } else { Work::Group(jobs) };
        self.jobs.as_ref().expect("pool is open").send(work).expect("workers are alive");
    }

    /// Waits for the next finished job.
    pub fn next_done(&self) -> Done {
        self.done.recv().expect("a worker panicked")
    }
}

/// Job `job`'s batch and noise streams: the same whoever trains it, alone or in a group.
fn rngs(seed: u64, job: &Job) -> (fedge_core::rng::SeededRng, fedge_core::rng::SeededRng) {
    let round = job.task.round;
    (
        derive_rng(seed, &[stream::LOCAL_TRAIN, round, job.device]),
        derive_rng(seed, &[stream::DEVICE_NOISE, round, job.device]),
    )
}

/// Trains `jobs` (one round's, on `data`) in one launch a step.
fn train_group(group: &mut GroupTrainer, data: &Dataset, jobs: Vec<Job>, seed: u64) -> Vec<Done> {
    let mut streams: Vec<_> = jobs.iter().map(|j| rngs(seed, j)).collect();
    let global = jobs[0].global.clone();
    let mut group_jobs: Vec<GroupJob<'_, fedge_core::rng::SeededRng>> = jobs
        .iter()
        .zip(streams.iter_mut())
        .map(|(j, (train_rng, noise_rng))| GroupJob { task: &j.task, indices: &j.indices, train_rng, noise_rng })
        .collect();
    let outcomes = run_group(group, &global, data, &mut group_jobs);
    jobs.iter().zip(outcomes).map(|(j, outcome)| Done { seq: j.seq, device: j.device, outcome }).collect()
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group for a model without a stacked form fails each job by name; the worker lives on
    /// and trains the next job alone.
    #[test]
    fn a_group_the_model_cannot_stack_fails_its_jobs_not_the_worker() {
        let data = Arc::new(fedge_core::dataset::embedded::mnist_subset().unwrap().train);
        let pool = Pool::new(1, ModelKind::LstmSmall, 80, BackendKind::Flex, data, 0).unwrap();
        let global = Arc::new(ModelParams::zeros(std::sync::Arc::new(fedge_core::ParamLayout::new(vec![]).unwrap())));
        let job = |seq: usize| Job {
            seq,
            device: seq as DeviceId,
            task: TrainTask {
                round: 1,
                model_version: 0,
                model_hash: global.content_hash(),
                config: fedge_core::wire::TrainConfig::sgd(1, 10, 0.1),
                secure: None,
            },
            global: global.clone(),
            indices: Arc::new(vec![0, 1]),
            data: None,
        };
        pool.submit_group(vec![job(0), job(1)]);
        for _ in 0..2 {
            let done = pool.next_done();
            match done.outcome {
                Err(TrainError::Group(why)) => assert!(why.contains("no stacked form"), "{why}"),
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("an LSTM group trained"),
            }
        }
        // The worker is alive: a job alone is answered (refused: the model is not an LSTM's).
        pool.submit(job(2));
        assert_eq!(pool.next_done().seq, 2);
    }
}
