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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
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
        .with_state(app)
}

/// Serves `router(predictor)` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, predictor: Arc<HybridPredictor>) -> std::io::Result<()> {
    axum::serve(listener, router(predictor)).await
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
}

#[derive(Deserialize)]
struct PredictQuery {
    #[serde(default)]
    private: bool,
}

async fn predict(State(app): State<App>, Query(q): Query<PredictQuery>, headers: HeaderMap, body: Bytes) -> Response {
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let request = if kind.starts_with("application/json") {
        match serde_json::from_slice::<JsonRequest>(&body) {
            Ok(r) => Request { pixels: r.pixels, private: r.private || q.private },
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON request: {e}")),
        }
    } else if kind.starts_with("image/png") {
        match crate::predict::decode_png(&body) {
            Ok(pixels) => Request { pixels, private: q.private },
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    } else if kind.starts_with("application/octet-stream") {
        Request { pixels: body.to_vec(), private: q.private }
    } else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{kind}: send application/json, application/octet-stream or image/png"),
        );
    };
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
