//! The coordinator's HTTP listener (`metrics_listen`): Prometheus metrics (`GET /metrics`)
//! and the read-only operator page (`GET /`, its script and style, and the JSON it polls,
//! `GET /api/status`; see [`crate::page`]).
//!
//! It speaks just enough HTTP/1.1 for a browser, a Prometheus scraper or `curl`: one request
//! per connection, its head bounded in size ([`MAX_HEAD`]) and time ([`HEAD_TIMEOUT`]), no
//! body read, at most [`MAX_CONNECTIONS`] at once. The page and its JSON need the `page_token`, when one is set, as
//! `Authorization: Bearer TOKEN` or `?token=TOKEN`; a listener off loopback must have one
//! ([`check_listen`]). `/metrics` never needs it (as before the page existed), nor do the page's
//! script and style, which hold no data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::server::Coordinator;

/// The longest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 8192;
/// How long a client has to send its request head before the connection is dropped.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections served at once; more are closed unanswered until some finish.
pub const MAX_CONNECTIONS: usize = 64;
/// The fewest characters a page token may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// What the listener serves.
pub struct Site {
    metrics: Arc<Metrics>,
    /// The coordinator the page shows (none: only `/metrics`).
    coordinator: Option<Arc<Coordinator>>,
    /// The token the page and its JSON need, if any.
    token: Option<String>,
}

/// An answer: status line, content type, extra headers and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code and reason, `200 OK`.
    pub status: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// More header lines, each without its CRLF.
    pub headers: Vec<&'static str>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, content_type, headers: Vec::new(), body: body.into() }
    }

    fn text(status: &'static str, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }

    /// The response as bytes on the wire (the body left out for `HEAD`).
    pub fn to_bytes(&self, with_body: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
             X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        for h in &self.headers {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if with_body {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Whether a listener on `addr` may serve the page with `token`: off loopback a valid token
/// is required; a token, when given, must be long enough and URL-safe. The error is one line.
pub fn check_listen(addr: SocketAddr, token: Option<&str>) -> Result<(), String> {
    match token {
        None if !addr.ip().is_loopback() => Err(format!(
            "metrics_listen {addr} is not a loopback address: set page_token in coordinator.toml \
             (the operator page off loopback needs a token)"
        )),
        None => Ok(()),
        Some(t) if t.len() < MIN_TOKEN_LEN => {
            Err(format!("page_token is too short: at least {MIN_TOKEN_LEN} characters"))
        }
        Some(t) if !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) => {
            Err("page_token may hold only A-Z a-z 0-9 - . _ ~".into())
        }
        Some(_) => Ok(()),
    }
}

/// Whether `a` and `b` are equal, in a time that depends only on their lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A parsed request head: method, path, query and the bearer token sent, if any.
#[derive(Debug, PartialEq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    bearer: Option<&'a str>,
}

/// Parses a complete request head; `None` if it is not one.
fn parse(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let bearer = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| {
            let value = value.trim();
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    Some(Request { method, path, query, bearer })
}

impl Site {
    /// Serves `metrics`, and the page of `coordinator` when given, behind `token` if set.
    pub fn new(metrics: Arc<Metrics>, coordinator: Option<Arc<Coordinator>>, token: Option<String>) -> Self {
        Self { metrics, coordinator, token }
    }

    /// Whether `request` carries the token (or none is needed).
    fn authorized(&self, request: &Request<'_>) -> bool {
        let Some(token) = &self.token else { return true };
        let from_query = request.query.split('&').find_map(|kv| kv.strip_prefix("token="));
        [request.bearer, from_query].into_iter().flatten().any(|t| same(t.as_bytes(), token.as_bytes()))
    }

    /// The answer to the request head `head` (everything up to its blank line), and whether
    /// to send its body (not for `HEAD`).
    pub fn respond(&self, head: &[u8]) -> (Response, bool) {
        let Some(request) = parse(head) else {
            return (Response::text("400 Bad Request", "bad request\n"), true);
        };
        let with_body = request.method != "HEAD";
        if request.method != "GET" && request.method != "HEAD" {
            let mut r = Response::text("405 Method Not Allowed", "only GET\n");
            r.headers.push("Allow: GET, HEAD");
            return (r, true);
        }
        let page = self.coordinator.as_ref();
        let response = match (request.path, page) {
            ("/metrics", _) => {
                Response::new("200 OK", "text/plain; version=0.0.4; charset=utf-8", self.metrics.encode())
            }
            ("/page.js", Some(_)) => crate::page::script(),
            ("/page.css", Some(_)) => crate::page::style(),
            ("/" | "/index.html" | "/api/status", Some(_)) if !self.authorized(&request) => {
                let mut r = Response::text(
                    "401 Unauthorized",
                    "this page needs its token: open /?token=TOKEN or send Authorization: Bearer TOKEN\n",
                );
                r.headers.push("WWW-Authenticate: Bearer");
                r
            }
            ("/" | "/index.html", Some(_)) => crate::page::html(),
            ("/api/status", Some(c)) => crate::page::api_status(c),
            _ => Response::text("404 Not Found", "not found: try GET /metrics or GET /\n"),
        };
        (response, with_body)
    }

    /// Answers requests on `listener` until the task is dropped, at most [`MAX_CONNECTIONS`]
    /// at a time.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // Full: the new connection is dropped (closed) at once.
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let site = self.clone();
            tokio::spawn(async move {
                site.connection(stream).await;
                drop(slot);
            });
        }
    }

    /// One connection: reads a bounded head, answers it, closes.
    async fn connection(self: Arc<Self>, mut stream: tokio::net::TcpStream) {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(HEAD_TIMEOUT, async {
            loop {
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    head.truncate(end);
                    return true;
                }
                if head.len() >= MAX_HEAD {
                    return false;
                }
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let (response, with_body) = match read {
            Ok(true) => {
                let site = self.clone();
                let answer = tokio::task::spawn_blocking(move || site.respond(&head)).await;
                answer.unwrap_or_else(|_| (Response::text("500 Internal Server Error", "internal error\n"), true))
            }
            Ok(false) if head.len() >= MAX_HEAD => (Response::text("431 Request Header Fields Too Large", ""), true),
            // Closed before a whole head, or too slow: nothing to answer.
            _ => return,
        };
        let _ = stream.write_all(&response.to_bytes(with_body)).await;
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
