//! Inference on the coordinator: the teacher (the current global model) answers the hard cases
//! devices escalate, over their existing QUIC connections.
//!
//! Two plain parts and a thin shell:
//! - [`TokenBucket`] / [`RateLimiter`]: the per-device rate limit, with `now` passed in;
//! - [`Teacher`]: the model seam (fedge-learn behind it in `service.rs`; nothing here knows burn);
//! - [`InferenceService`]: a tokio task that gathers requests from every device for a short
//!   window (or until a batch is full), answers them in one forward pass on a blocking thread,
//!   and hands each device its answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fedge_core::ModelParams;
use fedge_core::wire::{ErrorCode, InferAnswer, InferRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// How the coordinator answers inference requests (`[inference]` in `coordinator.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Whether devices may escalate to the coordinator at all.
    pub enabled: bool,
    /// How long the first request of a batch waits for others, milliseconds. 0: no waiting;
    /// a batch is whatever queued while the teacher was busy with the previous one (low
    /// latency when idle, batches under load).
    pub window_ms: u64,
    /// Most requests answered in one forward pass.
    pub max_batch: usize,
    /// Requests per second each device may send, sustained.
    pub rate_per_sec: f64,
    /// Requests a device may send at once after a quiet spell.
    pub burst: f64,
    /// Requests waiting for the teacher before new ones are turned away.
    pub queue: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self { enabled: true, window_ms: 0, max_batch: 64, rate_per_sec: 200.0, burst: 400.0, queue: 4096 }
    }
}

impl InferenceConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.queue == 0 {
            return Err("inference max_batch and queue must be at least 1".into());
        }
        if !(self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0 && self.burst.is_finite() && self.burst >= 1.0) {
            return Err(format!(
                "inference rate_per_sec must be positive and burst at least 1 (got {} and {})",
                self.rate_per_sec, self.burst
            ));
        }
        if self.window_ms > 10_000 {
            return Err(format!("inference window_ms {} is over 10 s", self.window_ms));
        }
        Ok(())
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: f64, burst: f64, now: Duration) -> Self {
        Self { rate, burst, tokens: burst, last: now }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn try_take(&mut self, now: Duration) -> Result<(), Duration> {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// One token bucket per device.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, TokenBucket>,
}

impl RateLimiter {
    /// `rate` requests a second per device, bursts of `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst, buckets: HashMap::new() }
    }

    /// Whether `device` may send a request at `now`.
    pub fn check(&mut self, device: &str, now: Duration) -> Result<(), InferError> {
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(device.to_string()).or_insert_with(|| TokenBucket::new(rate, burst, now));
        bucket
            .try_take(now)
            .map_err(|wait| InferError::RateLimited { rate: self.rate, retry_after_ms: wait.as_millis().max(1) as u64 })
    }
}

/// Why an inference request was not answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// The device is over its rate.
    #[error("over the inference rate limit of {rate} requests/s per device; retry in {retry_after_ms} ms")]
    RateLimited {
        /// The limit.
        rate: f64,
        /// When a request would be taken again.
        retry_after_ms: u64,
    },
    /// The input is not an image the teacher takes.
    #[error("{0}")]
    Input(String),
    /// The coordinator cannot answer now (no teacher, queue full, teacher failed).
    #[error("{0}")]
    Unavailable(String),
}

impl InferError {
    /// The wire code the device is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Input(_) => ErrorCode::InvalidInput,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// The model that answers escalated requests: probabilities for a batch of images.
pub trait Teacher: Send + 'static {
    /// The image size it takes (rows, cols).
    fn input_shape(&self) -> (usize, usize);

    /// Every class's probability for each of `images` under `params` (global version
    /// `version`; an implementation may keep the model it built for a version).
    fn answer(&mut self, version: u64, params: &ModelParams, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String>;
}

/// Where the current teacher parameters come from (`None`: gone, e.g. the coordinator stopped).
pub type ModelSource = Arc<dyn Fn() -> Option<(u64, Arc<ModelParams>)> + Send + Sync>;

struct Job {
    pixels: Vec<u8>,
    reply: oneshot::Sender<Result<InferAnswer, InferError>>,
}

/// Counters of what the service did.
#[derive(Debug, Default)]
pub struct InferenceCounts {
    /// Requests answered.
    pub answered: AtomicU64,
    /// Forward passes run.
    pub batches: AtomicU64,
}

/// The batching inference service (a tokio task; cheap handles).
pub struct InferenceService {
    tx: mpsc::Sender<Job>,
    shape: (usize, usize),
    counts: Arc<InferenceCounts>,
    observe: Option<Arc<dyn Fn(usize, Duration) + Send + Sync>>,
}

impl InferenceService {
    /// Starts the service on the current tokio runtime: `teacher` answers with the model
    /// `model` returns at each batch.
    pub fn spawn(config: InferenceConfig, teacher: Box<dyn Teacher>, model: ModelSource) -> Self {
        let (tx, rx) = mpsc::channel(config.queue);
        let shape = teacher.input_shape();
        let counts = Arc::new(InferenceCounts::default());
        tokio::spawn(batch_loop(config, teacher, model, rx, counts.clone()));
        Self { tx, shape, counts, observe: None }
    }

    /// The image size the teacher takes (rows, cols).
    pub fn input_shape(&self) -> (usize, usize) {
        self.shape
    }

    /// Calls `observe(batch size, time from request to answer)` for every answered request
    /// (metrics).
    pub fn with_observer(mut self, observe: Arc<dyn Fn(usize, Duration) + Send + Sync>) -> Self {
        self.observe = Some(observe);
        self
    }

    /// What the service did so far.
    pub fn counts(&self) -> &InferenceCounts {
        &self.counts
    }

    /// Checks `request` and waits for the teacher's answer.
    pub async fn infer(&self, request: InferRequest) -> Result<InferAnswer, InferError> {
        let (rows, cols) = self.shape;
        if (request.rows as usize, request.cols as usize) != (rows, cols) || request.pixels.len() != rows * cols {
            return Err(InferError::Input(format!(
                "a {}x{} image of {} bytes; the teacher takes {rows}x{cols} greyscale images ({} bytes)",
                request.rows,
                request.cols,
                request.pixels.len(),
                rows * cols
            )));
        }
        let (reply, answer) = oneshot::channel();
        let started = Instant::now();
        self.tx.try_send(Job { pixels: request.pixels, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InferError::Unavailable("the inference queue is full".into()),
            mpsc::error::TrySendError::Closed(_) => InferError::Unavailable("the inference service stopped".into()),
        })?;
        let out = answer.await.map_err(|_| InferError::Unavailable("the inference service stopped".into()))?;
        if let (Some(observe), Ok(a)) = (&self.observe, &out) {
            observe(a.batch_size as usize, started.elapsed());
        }
        out
    }
}

async fn batch_loop(
    config: InferenceConfig,
    teacher: Box<dyn Teacher>,
    model: ModelSource,
    mut rx: mpsc::Receiver<Job>,
    counts: Arc<InferenceCounts>,
) {
    let window = Duration::from_millis(config.window_ms);
    let mut teacher = Some(teacher);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while batch.len() < config.max_batch {
            // What is already queued joins at once (no timer: tokio's is 1 ms coarse).
            if let Ok(job) = rx.try_recv() {
                batch.push(job);
                continue;
            }
            if window.is_zero() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let (pixels, replies): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().map(|j| (j.pixels, j.reply)).unzip();
        let Some((version, params)) = model() else {
            for r in replies {
                let _ = r.send(Err(InferError::Unavailable("no teacher model".into())));
            }
            return;
        };
        let Some(mut t) = teacher.take() else { return };
        let run = tokio::task::spawn_blocking(move || {
            let images: Vec<&[u8]> = pixels.iter().map(Vec::as_slice).collect();
            let out = t.answer(version, &params, &images);
            (t, out)
        })
        .await;
        let (t, out) = match run {
            Ok(done) => done,
            Err(e) => {
                // The teacher panicked: answer with an error and stop serving.
                for r in replies {
                    let _ = r.send(Err(InferError::Unavailable(format!("the teacher failed: {e}"))));
                }
                return;
            }
        };
        teacher = Some(t);
        counts.batches.fetch_add(1, Ordering::Relaxed);
        let n = replies.len();
        match out {
            Ok(probs) if probs.len() == n => {
                counts.answered.fetch_add(n as u64, Ordering::Relaxed);
                for (r, p) in replies.into_iter().zip(probs) {
                    let (class, confidence) = p
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or((0, 0.0), |(c, &p)| (c as u32, p));
                    let _ = r.send(Ok(InferAnswer {
                        class,
                        confidence,
                        probabilities: p,
                        model_version: version,
                        batch_size: n as u32,
                        tier: fedge_core::wire::AnswerTier::Root,
                    }));
                }
            }
            Ok(probs) => {
                for r in replies {
                    let _ = r.send(Err(InferError::Unavailable(format!(
                        "the teacher gave {} answers for {n} images",
                        probs.len()
                    ))));
                }
            }
            Err(e) => {
                for r in replies {
                    let _ = r.send(Err(InferError::Unavailable(format!("the teacher failed: {e}"))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_bursts_then_the_rate() {
        let t = |ms: u64| Duration::from_millis(ms);
        let mut b = TokenBucket::new(10.0, 3.0, t(0));
        assert!((0..3).all(|_| b.try_take(t(0)).is_ok()), "a full burst");
        let wait = b.try_take(t(0)).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(b.try_take(t(50)).is_err(), "half a token");
        assert!(b.try_take(t(100)).is_ok(), "one token after 100 ms at 10/s");
        // A long quiet spell saves up no more than the burst.
        assert_eq!((0..10).filter(|_| b.try_take(t(60_000)).is_ok()).count(), 3);
        // Time going backwards (a clock we do not trust) grants nothing.
        assert!(b.try_take(t(1)).is_err());
    }

    #[test]
    fn rate_limits_are_per_device() {
        let mut r = RateLimiter::new(1.0, 2.0);
        let now = Duration::from_secs(5);
        assert!(r.check("a", now).is_ok() && r.check("a", now).is_ok());
        let e = r.check("a", now).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RateLimited);
        assert!(matches!(e, InferError::RateLimited { retry_after_ms: 1000, .. }), "{e:?}");
        assert!(r.check("b", now).is_ok(), "another device has its own bucket");
    }

    struct Echo;
    impl Teacher for Echo {
        fn input_shape(&self) -> (usize, usize) {
            (2, 2)
        }
        fn answer(&mut self, _: u64, _: &ModelParams, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String> {
            // Class = first pixel; the batch size rides in the second probability.
            Ok(images
                .iter()
                .map(|im| {
                    let mut p = vec![0.0; 4];
                    p[im[0] as usize] = 1.0;
                    p
                })
                .collect())
        }
    }

    #[tokio::test]
    async fn requests_within_the_window_share_a_batch_and_bad_shapes_are_refused() {
        let params = Arc::new(ModelParams::zeros(Arc::new(fedge_core::params::ParamLayout::new(vec![]).unwrap())));
        let config = InferenceConfig { window_ms: 200, max_batch: 3, ..InferenceConfig::default() };
        let model: ModelSource = Arc::new(move || Some((7, params.clone())));
        let svc = Arc::new(InferenceService::spawn(config, Box::new(Echo), model));
        let ask = |c: u8| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.infer(InferRequest { rows: 2, cols: 2, pixels: vec![c, 0, 0, 0] }).await })
        };
        let handles: Vec<_> = (0..4).map(|i| ask(i % 4)).collect();
        let mut sizes = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let a = h.await.unwrap().unwrap();
            assert_eq!((a.class, a.model_version), ((i % 4) as u32, 7));
            sizes.push(a.batch_size);
        }
        sizes.sort();
        assert_eq!(sizes, vec![1, 3, 3, 3], "a full batch of 3 goes at once, the 4th waits its window");
        assert_eq!(svc.counts().batches.load(Ordering::Relaxed), 2);
        let e = svc.infer(InferRequest { rows: 2, cols: 2, pixels: vec![0; 5] }).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidInput);
        let e = svc.infer(InferRequest { rows: 1, cols: 4, pixels: vec![0; 4] }).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidInput, "{e}");
    }
}
