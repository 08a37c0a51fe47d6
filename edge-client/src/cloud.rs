//! The device's line to the coordinator's teacher: an inference-only QUIC session, kept open
//! in the background and reconnected with backoff, so a request never waits on a connection
//! attempt. Offline is a state, not an error the caller waits for: [`Cloud::online`] says
//! whether asking makes sense, and [`Cloud::ask`] is bounded by a timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedge_core::wire::{Capabilities, ErrorCode, InferAnswer, InferRequest, Message, SessionPurpose};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::link::{DeviceTls, Link};

/// Why the cloud gave no answer.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum CloudError {
    /// No connection to the coordinator now.
    #[error("offline: the coordinator cannot be reached")]
    Offline,
    /// No answer within the timeout.
    #[error("no answer from the coordinator within {0} ms")]
    Timeout(u64),
    /// The coordinator refused (rate limit, bad input, not serving inference).
    #[error("coordinator refused ({code:?}): {message}")]
    Refused {
        /// Typed reason.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The request failed on the wire.
    #[error("link: {0}")]
    Link(String),
}

impl CloudError {
    /// A short reason for answers and metrics: `offline`, `timeout`, `rate-limited`,
    /// `refused` or `link`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Timeout(_) => "timeout",
            Self::Refused { code: ErrorCode::RateLimited, .. } => "rate-limited",
            Self::Refused { .. } => "refused",
            Self::Link(_) => "link",
        }
    }
}

/// Where the coordinator is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct CloudTarget {
    /// Coordinator address.
    pub addr: SocketAddr,
    /// Name in its certificate.
    pub server_name: String,
    /// The device's TLS material.
    pub tls: DeviceTls,
}

/// What the device learns from its requests: the smoothed round trip and the teacher's
/// version.
#[derive(Default)]
struct Learned {
    /// Smoothed round trip, seconds (as TCP's SRTT: each new sample weighs 1/8).
    srtt: Mutex<Option<f64>>,
    /// The latest teacher (global model) version heard of: the `Welcome` of each session and
    /// every answer's `model_version` (0: none yet).
    teacher: AtomicU64,
}

impl Learned {
    fn rtt(&self, took: Duration) {
        let mut s = self.srtt.lock().unwrap_or_else(|p| p.into_inner());
        let x = took.as_secs_f64();
        *s = Some(s.map_or(x, |s| s + (x - s) / 8.0));
    }

    fn teacher(&self, version: u64) {
        self.teacher.fetch_max(version, Ordering::Relaxed);
    }
}

/// A background-maintained inference session (or none: always offline).
pub struct Cloud {
    link: Arc<Mutex<Option<Arc<Link>>>>,
    timeout: Duration,
    task: Option<JoinHandle<()>>,
    learned: Arc<Learned>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Cloud {
    /// No coordinator: every request stays local.
    pub fn offline() -> Self {
        Self { link: Arc::new(Mutex::new(None)), timeout: Duration::ZERO, task: None, learned: Arc::default() }
    }

    /// Keeps an inference session to `target` open from now on (within a tokio runtime);
    /// requests wait at most `timeout` for an answer.
    pub fn connect(target: CloudTarget, timeout: Duration) -> Self {
        let link = Arc::new(Mutex::new(None));
        let learned = Arc::new(Learned::default());
        let task = tokio::spawn(keep_connected(target, link.clone(), learned.clone()));
        Self { link, timeout, task: Some(task), learned }
    }

    /// The smoothed round trip of this session's requests (inference answers and pings), if
    /// any was measured.
    pub fn rtt(&self) -> Option<Duration> {
        let s = *self.learned.srtt.lock().unwrap_or_else(|p| p.into_inner());
        s.map(Duration::from_secs_f64)
    }

    /// The latest teacher version the device has heard of (`Welcome` at each session open, and
    /// every answer), if any.
    pub fn teacher_version(&self) -> Option<u64> {
        Some(self.learned.teacher.load(Ordering::Relaxed)).filter(|&v| v > 0)
    }

    /// Tells the session of a teacher version learned elsewhere (e.g. the training session's
    /// `NoTask`); versions only move forward.
    pub fn heard_of_teacher(&self, version: u64) {
        self.learned.teacher(version);
    }

    fn current(&self) -> Option<Arc<Link>> {
        let mut l = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if l.as_ref().is_some_and(|k| k.connection.close_reason().is_some()) {
            *l = None;
        }
        l.clone()
    }

    /// Whether a session is open now.
    pub fn online(&self) -> bool {
        self.current().is_some()
    }

    /// Waits up to `limit` for a session (for one-shot commands that start offline).
    pub async fn wait_online(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.online() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.online()
    }

    /// Asks the teacher to classify a `rows` x `cols` image.
    pub async fn ask(&self, pixels: &[u8], rows: usize, cols: usize) -> Result<InferAnswer, CloudError> {
        let request = InferRequest { rows: rows as u32, cols: cols as u32, pixels: pixels.to_vec() };
        ask_on(self.current(), self.timeout, request, self.learned.clone()).await
    }

    /// [`Self::ask`] for a 28x28 image, as a future that owns what it needs (to run on its
    /// own task).
    pub fn ask_owned(&self, pixels: Vec<u8>) -> impl Future<Output = Result<InferAnswer, CloudError>> + Send + 'static {
        let request = InferRequest { rows: crate::predict::ROWS as u32, cols: crate::predict::COLS as u32, pixels };
        ask_on(self.current(), self.timeout, request, self.learned.clone())
    }

    /// A bare round trip on the session (`Ping`/`Pong`): the network's share of an escalation.
    pub async fn ping(&self) -> Result<Duration, CloudError> {
        let started = Instant::now();
        match request_on(self.current(), self.timeout, &Message::Ping { nonce: 7 }).await? {
            Message::Pong { nonce: 7 } => {
                let took = started.elapsed();
                self.learned.rtt(took);
                Ok(took)
            }
            _ => Err(CloudError::Link("unexpected answer to a ping".into())),
        }
    }
}

/// One request on `link` within `timeout`; an `Error` answer becomes [`CloudError::Refused`].
async fn request_on(link: Option<Arc<Link>>, timeout: Duration, msg: &Message) -> Result<Message, CloudError> {
    let link = link.ok_or(CloudError::Offline)?;
    match tokio::time::timeout(timeout, link.request(msg)).await {
        Err(_) => Err(CloudError::Timeout(timeout.as_millis() as u64)),
        Ok(Err(e)) => Err(CloudError::Link(e.to_string())),
        Ok(Ok(Message::Error { code, message })) => Err(CloudError::Refused { code, message }),
        Ok(Ok(answer)) => Ok(answer),
    }
}

async fn ask_on(
    link: Option<Arc<Link>>,
    timeout: Duration,
    request: InferRequest,
    learned: Arc<Learned>,
) -> Result<InferAnswer, CloudError> {
    let started = Instant::now();
    match request_on(link, timeout, &Message::InferRequest(request)).await? {
        Message::InferAnswer(a) => {
            learned.rtt(started.elapsed());
            learned.teacher(a.model_version);
            Ok(a)
        }
        _ => Err(CloudError::Link("unexpected answer to an inference request".into())),
    }
}

async fn keep_connected(target: CloudTarget, slot: Arc<Mutex<Option<Arc<Link>>>>, learned: Arc<Learned>) {
    let caps = Capabilities { backend: "flex".into(), memory_mb: 0, charging: false, unmetered: false, num_samples: 0 };
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let link = Link::connect(target.addr, &target.server_name, &target.tls).await?;
            let welcome = link.hello_for(caps.clone(), SessionPurpose::Inference).await?;
            Ok::<_, crate::link::ConnectError>((link, welcome.model_version))
        };
        match attempt.await {
            Ok((link, version)) => {
                learned.teacher(version);
                failures = 0;
                let link = Arc::new(link);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
                link.connection.closed().await;
                slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!("inference: cannot reach the coordinator ({e}); answering locally");
                }
                failures += 1;
            }
        }
        // 100 ms doubling to 5 s.
        let wait = (100u64 << failures.min(6)).min(5_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}
