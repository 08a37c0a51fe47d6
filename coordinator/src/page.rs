//! The read-only operator page: one HTML document, a stylesheet and a small script, all
//! embedded in the binary (no build step, no external asset), and the JSON the script polls
//! every second and a half (`GET /api/status`). [`crate::web`] serves them and checks the
//! token.
//!
//! The JSON is what the operator commands print, side by side: `status` is `round status
//! --json`, `devices` is `devices list --json`, `models` is `models list --json` (the same
//! functions of [`crate::print`] build them), plus `now`, the coordinator's Unix time in
//! seconds, against which the page shows how long ago devices were last seen.

use crate::print;
use crate::server::Coordinator;
use crate::web::Response;

const HTML: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/page.js");
const STYLE: &str = include_str!("page/page.css");

/// What the page may load and do: its own script, style and JSON only.
const CSP: &str = "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn response(content_type: &'static str, body: &str) -> Response {
    Response {
        status: "200 OK",
        content_type,
        headers: vec!["Cache-Control: no-store", CSP],
        body: body.as_bytes().to_vec(),
    }
}

/// The page (`GET /`).
pub fn html() -> Response {
    response("text/html; charset=utf-8", HTML)
}

/// Its script (`GET /page.js`).
pub fn script() -> Response {
    response("text/javascript; charset=utf-8", SCRIPT)
}

/// Its stylesheet (`GET /page.css`).
pub fn style() -> Response {
    response("text/css; charset=utf-8", STYLE)
}

/// The page's data: status, devices and models as the operator commands print them.
pub fn status_json(c: &Coordinator) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serde_json::json!({
        "now": now,
        "status": print::status_json(&c.status()),
        "devices": print::devices_json(&c.devices()),
        "models": print::models_json(&c.models()),
    })
}

/// `GET /api/status`.
pub fn api_status(c: &Coordinator) -> Response {
    response("application/json", &status_json(c).to_string())
}
