//! The device's local inference server: JSON over HTTP on a loopback port, so apps in any
//! language can ask the device (`fedge-edge serve-inference`).
//!
//! - `POST /predict`: one image, as JSON `{"pixels": [784 bytes], "private": false}`, or the
//!   raw 784 bytes (`application/octet-stream`) or a PNG (`image/png`) with `?private=true`
//!   when it must not leave the device. Answers with the fields of
//!   [`HybridAnswer`](crate::hybrid::HybridAnswer) (class, confidence, answered_by,
//!   model_version, latency_ms, verified, fallback, ...).
//! - `GET /corrections/{id}?wait_ms=N`: a speculative answer's correction, waiting up to N ms
//!   for it.
//! - `GET /status`: policy, calibration, whether the coordinator is reachable, and the metrics.
//! - `GET /metrics`: the same metrics for Prometheus.
//!
//! A web page open in the device's browser can send requests to loopback, so the server
//! answers only what such a page cannot forge without the browser asking first: a request must
//! name its body's type (`application/json`, `application/octet-stream` and `image/png` all need
//! a CORS preflight, which this server never grants; a missing type is refused, not taken as
//! JSON), and its `Host` must be `localhost` or an IP address (a DNS name pointing at 127.0.0.1,
//! DNS rebinding, is refused). Each connection must send its headers within
//! [`ServeOptions::header_timeout`] and finish each request within
//! [`ServeOptions::request_timeout`], and at most [`ServeOptions::max_connections`] are open at
//! once (more are closed at accept).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::cloud::CloudError;
use crate::hybrid::{Correction, HybridPredictor, Request};
use crate::predict::PredictError;

/// Corrections kept for clients to collect.
const KEPT: usize = 10_000;
/// Largest request body (a PNG of a photo is allowed; it is resized).
const MAX_BODY: usize = 8 << 20;

enum Slot {
    Pending(Arc<Notify>),
    Done(Result<Correction, CloudError>),
}

#[derive(Clone)]
struct App {
    predictor: Arc<HybridPredictor>,
    corrections: Arc<Mutex<BTreeMap<u64, Slot>>>,
}

/// The router of the inference server over `predictor`.
pub fn router(predictor: Arc<HybridPredictor>) -> Router {
    let app = App { predictor, corrections: Arc::new(Mutex::new(BTreeMap::new())) };
    Router::new()
        .route("/predict", post(predict))
        .route("/corrections/{id}", get(correction))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(only_local_hosts))
        .with_state(app)
}

/// Limits of the inference server's connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a connection has to send a request's headers (also how long an idle keep-alive
    /// connection stays open).
    pub header_timeout: Duration,
    /// Time a request has from its headers to its answer (the body included; a correction's
    /// long poll waits at most 30 s).
    pub request_timeout: Duration,
    /// Connections open at once; more are closed as they are accepted.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { header_timeout: Duration::from_secs(10), request_timeout: Duration::from_secs(60), max_connections: 64 }
    }
}

/// Serves `router(predictor)` on `listener` with the default [`ServeOptions`] until the task
/// is dropped.
pub async fn serve(listener: tokio::net::TcpListener, predictor: Arc<HybridPredictor>) -> std::io::Result<()> {
    serve_with(listener, predictor, ServeOptions::default()).await
}

/// Serves `router(predictor)` on `listener` within `options` until the task is dropped.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    predictor: Arc<HybridPredictor>,
    options: ServeOptions,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower_service::Service;

    let app = router(predictor);
    let slots = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: wait a moment rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: axum::extract::Request<hyper::body::Incoming>| {
                let mut app = app.clone();
                async move {
                    let request = request.map(axum::body::Body::new);
                    match tokio::time::timeout(options.request_timeout, app.call(request)).await {
                        Ok(response) => response,
                        Err(_) => Ok(error(StatusCode::REQUEST_TIMEOUT, "the request took too long")),
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// Refuses a request whose `Host` is neither `localhost` nor an IP address (see the module docs).
async fn only_local_hosts(request: axum::extract::Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if host_allowed(host) {
        next.run(request).await
    } else {
        error(StatusCode::FORBIDDEN, format!("host `{host}` refused: use localhost or an IP address"))
    }
}

/// Whether `host` (a `Host` header: name or address, optional port) is `localhost` or an IP
/// address.
fn host_allowed(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(valid_port) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn valid_port(port: &str) -> bool {
    port.parse::<u16>().is_ok()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(serde_json::json!({ "error": message.to_string() }))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    pixels: Vec<u8>,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    max_cost: Option<f64>,
}

#[derive(Deserialize)]
struct PredictQuery {
    #[serde(default)]
    private: bool,
    #[serde(default)]
    max_cost: Option<f64>,
}

async fn predict(State(app): State<App>, Query(q): Query<PredictQuery>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(kind) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no Content-Type: send application/json, application/octet-stream or image/png",
        );
    };
    let mut request = if kind.starts_with("application/json") {
        match serde_json::from_slice::<JsonRequest>(&body) {
            Ok(r) => Request { pixels: r.pixels, private: r.private || q.private, max_cost: r.max_cost },
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON request: {e}")),
        }
    } else if kind.starts_with("image/png") {
        match crate::predict::decode_png(&body) {
            Ok(pixels) => Request { pixels, private: q.private, max_cost: None },
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    } else if kind.starts_with("application/octet-stream") {
        Request { pixels: body.to_vec(), private: q.private, max_cost: None }
    } else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{kind}: send application/json, application/octet-stream or image/png"),
        );
    };
    // The query's budget applies to every body kind; a JSON body's own is the tighter one.
    request.max_cost = match (request.max_cost, q.max_cost) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(m) = request.max_cost
        && let Err(e) = crate::hybrid::check_cost("max_cost", m)
    {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match app.predictor.predict(request).await {
        Ok(mut a) => {
            if let Some(rx) = a.correction.take() {
                let notify = Arc::new(Notify::new());
                {
                    let mut c = app.corrections.lock().unwrap_or_else(|p| p.into_inner());
                    c.insert(a.id, Slot::Pending(notify.clone()));
                    while c.len() > KEPT {
                        c.pop_first();
                    }
                }
                let (corrections, id) = (app.corrections.clone(), a.id);
                tokio::spawn(async move {
                    let done = rx.await.unwrap_or(Err(CloudError::Link("the correction was dropped".into())));
                    if let Some(slot) = corrections.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                        *slot = Slot::Done(done);
                    }
                    notify.notify_waiters();
                });
            }
            let mut v = serde_json::to_value(&a).expect("answers serialise");
            if a.correction_pending {
                v["correction_url"] = format!("/corrections/{}", a.id).into();
            }
            Json(v).into_response()
        }
        Err(e @ PredictError::Input(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Deserialize)]
struct CorrectionQuery {
    #[serde(default)]
    wait_ms: u64,
}

async fn correction(State(app): State<App>, Path(id): Path<u64>, Query(q): Query<CorrectionQuery>) -> Response {
    let wait = Duration::from_millis(q.wait_ms.min(30_000));
    let look = || -> Option<Result<serde_json::Value, Arc<Notify>>> {
        match app.corrections.lock().unwrap_or_else(|p| p.into_inner()).get(&id)? {
            Slot::Pending(n) => Some(Err(n.clone())),
            Slot::Done(Ok(c)) => Some(Ok(serde_json::json!({ "id": id, "status": "ready", "correction": c }))),
            Slot::Done(Err(e)) => Some(Ok(serde_json::json!({
                "id": id, "status": "failed", "error": e.to_string(), "reason": e.reason()
            }))),
        }
    };
    let pending = serde_json::json!({ "id": id, "status": "pending" });
    match look() {
        None => error(StatusCode::NOT_FOUND, format!("no correction {id} (not speculative, or long collected)")),
        Some(Ok(v)) => Json(v).into_response(),
        Some(Err(notify)) => {
            let notified = notify.notified();
            // Settled between the look and the registration?
            if let Some(Ok(v)) = look() {
                return Json(v).into_response();
            }
            let _ = tokio::time::timeout(wait, notified).await;
            match look() {
                Some(Ok(v)) => Json(v).into_response(),
                _ => Json(pending).into_response(),
            }
        }
    }
}

async fn status(State(app): State<App>) -> Response {
    let p = &app.predictor;
    Json(serde_json::json!({
        "policy": p.config().policy,
        "confidence": p.config().confidence,
        "target_rate": p.config().target_rate,
        "online": p.cloud().online(),
        "calibration": p.calibration(),
        "metrics": p.metrics().snapshot(),
    }))
    .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.predictor.metrics().encode())
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_localhost_and_addresses_are_hosts() {
        for ok in ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:9000", "10.1.2.3:80", "[::1]", "[::1]:8080"] {
            assert!(super::host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:80",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "[::1",
            "[::1]x",
            "127.0.0.1:99999",
            "[evil]:80",
        ] {
            assert!(!super::host_allowed(bad), "{bad}");
        }
    }
}
