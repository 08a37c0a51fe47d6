//! A small pool of worker threads, each owning one model instance.
//!
//! Virtual devices are only data indices and a little state; a job names the device, its task
//! and its examples, and any free worker runs it on its own [`EdgeTrainer`]. Each job derives
//! its random streams from the run seed, the round and the device, so which worker runs it
//! (and in which order jobs finish) never changes the numbers.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::{DeviceId, TrainTask};
use fedge_edge::{EdgeTrainer, TaskOutcome, TrainError};
use fedge_learn::{BackendError, BackendKind, ModelKind};

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

/// Worker threads sharing one job queue.
pub struct Pool {
    jobs: Option<Sender<Job>>,
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
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let handles = (0..workers.max(1))
            .map(|i| {
                let (job_rx, done_tx, data) = (job_rx.clone(), done_tx.clone(), data.clone());
                std::thread::Builder::new()
                    .name(format!("fedge-worker-{i}"))
                    .spawn(move || {
                        let mut trainer = EdgeTrainer::new(kind, num_classes, backend).expect("backend checked above");
                        loop {
                            let job = match job_rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            let Ok(job) = job else { return };
                            let round = job.task.round;
                            let mut train_rng = derive_rng(seed, &[stream::LOCAL_TRAIN, round, job.device]);
                            let mut noise_rng = derive_rng(seed, &[stream::DEVICE_NOISE, round, job.device]);
                            let outcome = trainer.run_task(
                                &job.task,
                                &job.global,
                                job.data.as_deref().unwrap_or(&data),
                                &job.indices,
                                &mut train_rng,
                                &mut noise_rng,
                            );
                            if done_tx.send(Done { seq: job.seq, device: job.device, outcome }).is_err() {
                                return;
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
        self.jobs.as_ref().expect("pool is open").send(job).expect("workers are alive");
    }

    /// Waits for the next finished job.
    pub fn next_done(&self) -> Done {
        self.done.recv().expect("a worker panicked")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
