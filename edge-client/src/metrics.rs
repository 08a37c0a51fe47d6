//! The device's inference metrics: per-path latency histograms, escalations, fallbacks and
//! local/cloud agreement, in the Prometheus text format (`GET /metrics` of the inference
//! server) and as a JSON snapshot with recent percentiles (`GET /status`, `status.json`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Path {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// The routes an answer can take (the bounded label set of `routes{route}`).
pub const ROUTES: [&str; 10] = [
    "confident",
    "kept-local",
    "escalated",
    "cached",
    "offline",
    "private",
    "over-budget",
    "fallback",
    "local-only",
    "cloud-first",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// Recent latencies kept per path for the snapshot's percentiles.
const RECENT: usize = 4096;
/// Recent escalation decisions kept to watch the live rate against the calibrated target.
const DECISIONS: usize = 1000;
/// Decisions needed before the live rate is compared with the target.
const DRIFT_MIN: usize = 500;

/// The last [`DECISIONS`] escalation decisions, how many were "unsure", and the rate the
/// threshold was calibrated for.
#[derive(Default)]
struct Decisions {
    window: VecDeque<bool>,
    unsure: usize,
    target: f64,
}

impl Decisions {
    fn rate(&self) -> Option<f64> {
        (!self.window.is_empty()).then(|| self.unsure as f64 / self.window.len() as f64)
    }
}

/// Which way an answer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerPath {
    /// The local model.
    Local,
    /// The coordinator's teacher.
    Cloud,
}

impl AnswerPath {
    fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cloud => "cloud",
        }
    }
}

/// The inference metrics of one device.
pub struct InferenceMetrics {
    registry: Registry,
    answers: Family<Path, Counter>,
    latency: Family<Path, Histogram>,
    escalations: Counter,
    fallbacks: Family<Reason, Counter>,
    agreement: Family<Outcome, Counter>,
    threshold: Gauge<f64, std::sync::atomic::AtomicU64>,
    unsure_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    model_version: Gauge,
    routes: Family<RouteLabel, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_entries: Gauge,
    rtt: Gauge<f64, std::sync::atomic::AtomicU64>,
    target_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    requests: AtomicU64,
    decisions: Mutex<Decisions>,
    recent: Mutex<[VecDeque<f64>; 2]>,
    agree: AtomicU64,
    differ: AtomicU64,
    escalated: AtomicU64,
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedge_edge_inference");
        // 10 us to ~5 s.
        let latency =
            Family::<Path, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(1e-5, 2.0, 20)));
        let answers = Family::<Path, Counter>::default();
        let escalations = Counter::default();
        let fallbacks = Family::<Reason, Counter>::default();
        let agreement = Family::<Outcome, Counter>::default();
        let threshold = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let model_version = Gauge::default();
        let unsure_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "recent_unsure_rate",
            "Share of the last 1000 local answers below the threshold (compare with the target rate)",
            unsure_rate.clone(),
        );
        registry.register("answers", "Answers given, by the model that gave them (local or cloud)", answers.clone());
        registry.register(
            "latency_seconds",
            "Time to an answer, by path: local model, or cloud round trip",
            latency.clone(),
        );
        registry.register("escalations", "Requests whose input was sent to the coordinator", escalations.clone());
        registry.register(
            "fallbacks",
            "Requests answered locally although the policy wanted the cloud, by reason",
            fallbacks.clone(),
        );
        registry.register(
            "agreement",
            "Requests both models answered, by whether their classes agree",
            agreement.clone(),
        );
        registry.register("threshold", "Calibrated escalation threshold of the running model", threshold.clone());
        registry.register("model_version", "Registry version of the local model", model_version.clone());
        let routes = Family::<RouteLabel, Counter>::default();
        let (cache_hits, cache_misses, cache_entries) = (Counter::default(), Counter::default(), Gauge::default());
        let rtt = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let target_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "routes",
            "Answers by route: confident, kept-local (by a rule), escalated, cached, offline, private, fallback, local-only, cloud-first",
            routes.clone(),
        );
        registry.register("cache_hits", "Escalations answered from the cache of cloud answers", cache_hits.clone());
        registry.register("cache_misses", "Escalations not in the cache (sent to the cloud)", cache_misses.clone());
        registry.register("cache_entries", "Cloud answers kept in the cache", cache_entries.clone());
        registry.register("rtt_seconds", "Smoothed round trip of requests to the coordinator", rtt.clone());
        registry.register(
            "target_rate",
            "Target escalation rate in force (per the rules and conditions)",
            target_rate.clone(),
        );
        Self {
            routes,
            cache_hits,
            cache_misses,
            cache_entries,
            rtt,
            target_rate,
            registry,
            answers,
            latency,
            escalations,
            fallbacks,
            agreement,
            threshold,
            unsure_rate,
            model_version,
            requests: AtomicU64::new(0),
            decisions: Mutex::new(Decisions::default()),
            recent: Mutex::new([VecDeque::new(), VecDeque::new()]),
            agree: AtomicU64::new(0),
            differ: AtomicU64::new(0),
            escalated: AtomicU64::new(0),
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

impl InferenceMetrics {
    /// A request came in.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// `path` took `took` (the local model's time, or the cloud's round trip).
    pub fn observe(&self, path: AnswerPath, took: Duration) {
        let s = took.as_secs_f64();
        self.latency.get_or_create(&Path { path: path.name() }).observe(s);
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let q = &mut r[path as usize];
        if q.len() == RECENT {
            q.pop_front();
        }
        q.push_back(s * 1e3);
    }

    /// An answer was given by `path`.
    pub fn answered(&self, path: AnswerPath) {
        self.answers.get_or_create(&Path { path: path.name() }).inc();
    }

    /// An input was sent to the coordinator.
    pub fn escalated(&self) {
        self.escalations.inc();
        self.escalated.fetch_add(1, Ordering::Relaxed);
    }

    /// The policy wanted the cloud but the answer stayed local, for `reason`.
    pub fn fell_back(&self, reason: &'static str) {
        self.fallbacks.get_or_create(&Reason { reason }).inc();
    }

    /// An answer took `route` (one of [`ROUTES`]) under target rate `target_rate`.
    pub fn routed(&self, route: &'static str, target_rate: Option<f64>) {
        self.routes.get_or_create(&RouteLabel { route }).inc();
        if let Some(r) = target_rate {
            self.target_rate.set(r);
        }
    }

    /// The cache had (`true`) or did not have the cloud's answer; it now keeps `entries`.
    pub fn cache(&self, hit: bool, entries: usize) {
        if hit { &self.cache_hits } else { &self.cache_misses }.inc();
        self.cache_entries.set(entries as i64);
    }

    /// The smoothed round trip to the coordinator.
    pub fn rtt(&self, rtt: Duration) {
        self.rtt.set(rtt.as_secs_f64());
    }

    /// Both models answered one request.
    pub fn compared(&self, agree: bool) {
        let outcome = if agree { "agree" } else { "differ" };
        self.agreement.get_or_create(&Outcome { outcome }).inc();
        if agree { &self.agree } else { &self.differ }.fetch_add(1, Ordering::Relaxed);
    }

    /// The local answer's confidence was (`true`) or was not below the threshold. Returns the
    /// live rate when it has drifted from the calibrated target: past 3 binomial standard
    /// deviations plus 2 points over the last 1000 decisions (at least 500).
    pub fn decided(&self, unsure: bool) -> Option<f64> {
        let mut d = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        if d.window.len() == DECISIONS && d.window.pop_front() == Some(true) {
            d.unsure -= 1;
        }
        d.window.push_back(unsure);
        d.unsure += usize::from(unsure);
        let n = d.window.len();
        let rate = d.rate().unwrap_or(0.0);
        self.unsure_rate.set(rate);
        let target = d.target;
        let bound = 3.0 * (target * (1.0 - target) / n as f64).sqrt() + 0.02;
        (n >= DRIFT_MIN && (rate - target).abs() > bound).then_some(rate)
    }

    /// A model was loaded and calibrated for `target_rate`.
    pub fn calibrated_for(&self, version: u64, threshold: f32, target_rate: f64) {
        *self.decisions.lock().unwrap_or_else(|p| p.into_inner()) =
            Decisions { window: VecDeque::new(), unsure: 0, target: target_rate };
        self.calibrated(version, threshold);
    }

    /// A model was loaded and calibrated.
    pub fn calibrated(&self, version: u64, threshold: f32) {
        self.model_version.set(version as i64);
        self.threshold.set(if threshold.is_finite() { threshold as f64 } else { f64::NAN });
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Counts, rates and recent latency percentiles (milliseconds) as JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let requests = self.requests.load(Ordering::Relaxed);
        let escalated = self.escalated.load(Ordering::Relaxed);
        let (agree, differ) = (self.agree.load(Ordering::Relaxed), self.differ.load(Ordering::Relaxed));
        let count = |f: &Family<Path, Counter>, path| f.get_or_create(&Path { path }).get();
        let fallbacks: serde_json::Map<String, serde_json::Value> =
            ["offline", "private", "over-budget", "timeout", "rate-limited", "refused", "link"]
                .into_iter()
                .map(|reason| (reason.to_string(), self.fallbacks.get_or_create(&Reason { reason }).get().into()))
                .collect();
        let routes: serde_json::Map<String, serde_json::Value> = ROUTES
            .into_iter()
            .map(|route| (route.to_string(), self.routes.get_or_create(&RouteLabel { route }).get().into()))
            .collect();
        let (recent_unsure, window) = {
            let d = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
            (d.rate(), d.window.len())
        };
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let lat = |q: &VecDeque<f64>| {
            let mut v: Vec<f64> = q.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            serde_json::json!({ "n": v.len(), "p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99) })
        };
        serde_json::json!({
            "requests": requests,
            "answered_local": count(&self.answers, "local"),
            "answered_cloud": count(&self.answers, "cloud"),
            "escalations": escalated,
            "escalation_rate": if requests > 0 { escalated as f64 / requests as f64 } else { 0.0 },
            "fallbacks": fallbacks,
            "routes": routes,
            "cache": { "hits": self.cache_hits.get(), "misses": self.cache_misses.get(), "entries": self.cache_entries.get() },
            "rtt_ms": if self.rtt.get() > 0.0 { Some(self.rtt.get() * 1e3) } else { None },
            "target_rate": self.target_rate.get(),
            "compared": agree + differ,
            "agreement_rate": if agree + differ > 0 { Some(agree as f64 / (agree + differ) as f64) } else { None },
            "recent_unsure_rate": recent_unsure,
            "recent_decisions": window,
            "local_ms": lat(&r[0]),
            "cloud_ms": lat(&r[1]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_flagged_only_when_the_live_rate_leaves_the_target() {
        let m = InferenceMetrics::default();
        m.calibrated_for(1, 0.5, 0.1);
        // On target (one in ten): never flagged.
        assert!((0..2000).all(|i| m.decided(i % 10 == 0).is_none()));
        // Live traffic turns harder: three in ten below the threshold.
        let flagged = (0..1000).filter_map(|i| m.decided(i % 10 < 3)).last();
        assert!(flagged.is_some_and(|r| (r - 0.3).abs() < 0.01), "{flagged:?}");
        assert!((m.snapshot()["recent_unsure_rate"].as_f64().unwrap() - 0.3).abs() < 0.01);
        // A new calibration starts the window again.
        m.calibrated_for(2, 0.6, 0.3);
        assert!((0..400).all(|i| m.decided(i % 10 < 3).is_none()));
    }
}
