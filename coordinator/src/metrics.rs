//! Operational metrics in the Prometheus text format (served as `GET /metrics` by
//! [`crate::web`]).
//!
//! [`Metrics`] is plain shared state (atomics inside `prometheus-client`'s types) updated by the
//! server as things happen; [`Metrics::encode`] is what a scrape reads.

use std::time::Duration;

use fedge_core::wire::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    code: String,
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    rounds: Family<Outcome, Counter>,
    updates_accepted: Counter,
    rejections: Family<Code, Counter>,
    update_latency: Histogram,
    bytes_sent: Counter,
    bytes_received: Counter,
    inference_answered: Counter,
    inference_batch: Histogram,
    inference_latency: Histogram,
    /// Devices connected now.
    pub devices_connected: Gauge,
    /// Devices ever registered.
    pub devices_known: Gauge,
    /// Current model version.
    pub model_version: Gauge,
    /// 1 once a durable write failed and the coordinator stopped.
    pub storage_failed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedge");
        let rounds = Family::<Outcome, Counter>::default();
        let updates_accepted = Counter::default();
        let rejections = Family::<Code, Counter>::default();
        // 10 ms to ~40 min: from a tiny model on loopback to a slow phone training for a while.
        let update_latency = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let bytes_sent = Counter::default();
        let bytes_received = Counter::default();
        let inference_answered = Counter::default();
        // 1 to 512 requests per forward pass.
        let inference_batch = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        // 0.1 ms to ~3 s.
        let inference_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "inference_answered",
            "Escalated inference requests the teacher answered",
            inference_answered.clone(),
        );
        registry.register(
            "inference_batch_size",
            "Requests answered per teacher forward pass",
            inference_batch.clone(),
        );
        registry.register(
            "inference_latency_seconds",
            "From an inference request's arrival to its answer (batch window included)",
            inference_latency.clone(),
        );
        let devices_connected = Gauge::default();
        let devices_known = Gauge::default();
        let model_version = Gauge::default();
        let storage_failed = Gauge::default();
        registry.register("rounds", "Rounds closed, by outcome (aggregated or failed)", rounds.clone());
        registry.register(
            "updates_accepted",
            "Device updates accepted (durable, acknowledged)",
            updates_accepted.clone(),
        );
        registry.register("rejections", "Requests and updates refused, by error code", rejections.clone());
        registry.register(
            "update_latency_seconds",
            "From a task's assignment to its accepted update",
            update_latency.clone(),
        );
        registry.register("bytes_sent", "Bytes of messages sent to devices", bytes_sent.clone());
        registry.register("bytes_received", "Bytes of messages received from devices", bytes_received.clone());
        registry.register("devices_connected", "Devices connected now", devices_connected.clone());
        registry.register("devices_known", "Devices ever registered", devices_known.clone());
        registry.register("model_version", "Current global model version", model_version.clone());
        registry.register(
            "storage_failed",
            "1 once a durable write failed: the coordinator stopped acknowledging and exits",
            storage_failed.clone(),
        );
        Self {
            registry,
            rounds,
            updates_accepted,
            rejections,
            update_latency,
            bytes_sent,
            bytes_received,
            inference_answered,
            inference_batch,
            inference_latency,
            devices_connected,
            devices_known,
            model_version,
            storage_failed,
        }
    }
}

impl Metrics {
    /// A round closed.
    pub fn round_closed(&self, aggregated: bool) {
        let outcome = if aggregated { "aggregated" } else { "failed" };
        self.rounds.get_or_create(&Outcome { outcome }).inc();
    }

    /// An update was accepted `latency` after its task was assigned.
    pub fn update_accepted(&self, latency: Duration) {
        self.updates_accepted.inc();
        self.update_latency.observe(latency.as_secs_f64());
    }

    /// An inference request was answered in a batch of `batch`, `latency` after it arrived.
    pub fn inference_answered(&self, batch: usize, latency: Duration) {
        self.inference_answered.inc();
        self.inference_batch.observe(batch as f64);
        self.inference_latency.observe(latency.as_secs_f64());
    }

    /// Something a device or operator sent was refused with `code`.
    pub fn rejected(&self, code: ErrorCode) {
        self.rejections.get_or_create(&Code { code: format!("{code:?}") }).inc();
    }

    /// A connection was refused before any message (TLS: unknown CA, revoked, wrong role).
    pub fn rejected_connection(&self) {
        self.rejections.get_or_create(&Code { code: "Connection".into() }).inc();
    }

    /// `n` bytes went out.
    pub fn sent(&self, n: usize) {
        self.bytes_sent.inc_by(n as u64);
    }

    /// `n` bytes came in.
    pub fn received(&self, n: usize) {
        self.bytes_received.inc_by(n as u64);
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
