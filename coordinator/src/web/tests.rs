//! The listener's routing, token check and request parsing, and the page's JSON, without a
//! socket (the socket loop is exercised by `coordinator/tests/operator_page.rs`).

use std::sync::Arc;

use fedge_core::{ModelParams, ParamLayout, TensorSpec};
use fedge_engine::EngineConfig;

use super::*;

const TOKEN: &str = "s3cret-token-0123456789";

fn coordinator() -> Arc<Coordinator> {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2, 3] }]).unwrap());
    let initial = ModelParams::new(layout, vec![0.5; 6]).unwrap();
    Coordinator::new(EngineConfig::default(), initial).unwrap()
}

fn site(token: Option<&str>) -> Site {
    let c = coordinator();
    Site::new(c.metrics(), Some(c), token.map(str::to_string))
}

fn get(site: &Site, head: &str) -> Response {
    site.respond(head.as_bytes()).0
}

fn status(site: &Site, target: &str, auth: Option<&str>) -> &'static str {
    let auth = auth.map_or(String::new(), |a| format!("\r\nAuthorization: {a}"));
    get(site, &format!("GET {target} HTTP/1.1\r\nHost: x{auth}")).status
}

#[test]
fn the_json_is_what_the_operator_commands_print() {
    let c = coordinator();
    c.start_rounds(2);
    let v: serde_json::Value = serde_json::from_slice(&crate::page::api_status(&c).body).unwrap();
    assert_eq!(v["status"], crate::print::status_json(&c.status()));
    assert_eq!(v["devices"], crate::print::devices_json(&c.devices()));
    assert_eq!(v["models"], crate::print::models_json(&c.models()));
    assert!(v["now"].as_u64().unwrap() > 1_600_000_000);
    let s = &v["status"];
    assert_eq!(s["model_version"], 0);
    assert_eq!(s["rounds_left"], 2);
    // Two rounds wanted, no device to run them.
    assert_eq!(s["phase"], "waiting for devices");
    assert!(s["open_round"].is_null());
    assert_eq!(v["models"][0]["version"], 0);
    assert_eq!(v["models"][0]["signed"], false);
}

#[test]
fn without_a_token_everything_is_served_on_loopback() {
    let site = site(None);
    let page = get(&site, "GET / HTTP/1.1\r\nHost: x");
    assert_eq!(page.status, "200 OK");
    assert_eq!(page.content_type, "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(&page.body).contains("<script src=\"page.js\">"));
    assert!(page.headers.iter().any(|h| h.starts_with("Content-Security-Policy: default-src 'none'")));
    let api = get(&site, "GET /api/status HTTP/1.1\r\nHost: x");
    assert_eq!((api.status, api.content_type), ("200 OK", "application/json"));
    let metrics = get(&site, "GET /metrics HTTP/1.1\r\nHost: x");
    assert!(String::from_utf8_lossy(&metrics.body).contains("fedge_model_version"));
    assert_eq!(get(&site, "GET /page.js HTTP/1.1").content_type, "text/javascript; charset=utf-8");
    assert_eq!(get(&site, "GET /page.css HTTP/1.1").content_type, "text/css; charset=utf-8");
}

#[test]
fn with_a_token_the_page_and_its_json_need_it_and_metrics_do_not() {
    let site = site(Some(TOKEN));
    for target in ["/", "/index.html", "/api/status"] {
        assert_eq!(status(&site, target, None), "401 Unauthorized", "{target}");
        assert_eq!(status(&site, target, Some("Bearer wrong-token-0123456789")), "401 Unauthorized");
        assert_eq!(status(&site, target, Some(&format!("Basic {TOKEN}"))), "401 Unauthorized");
        assert_eq!(status(&site, &format!("{target}?token={TOKEN}x"), None), "401 Unauthorized");
        assert_eq!(status(&site, target, Some(&format!("Bearer {TOKEN}"))), "200 OK", "{target}");
        assert_eq!(status(&site, target, Some(&format!("bearer  {TOKEN} "))), "200 OK", "{target}");
        assert_eq!(status(&site, &format!("{target}?token={TOKEN}"), None), "200 OK", "{target}");
        assert_eq!(status(&site, &format!("{target}?a=1&token={TOKEN}"), None), "200 OK", "{target}");
    }
    let refused = get(&site, "GET /api/status HTTP/1.1");
    assert!(refused.headers.contains(&"WWW-Authenticate: Bearer"));
    assert!(!String::from_utf8_lossy(&refused.body).contains('{'), "no data without the token");
    // Prometheus scrapes as before; the script and style hold no data.
    for target in ["/metrics", "/page.js", "/page.css"] {
        assert_eq!(status(&site, target, None), "200 OK", "{target}");
    }
}

#[test]
fn a_listener_off_loopback_needs_a_sound_token() {
    let lo = "127.0.0.1:9100".parse().unwrap();
    let lo6 = "[::1]:9100".parse().unwrap();
    let any = "0.0.0.0:9100".parse().unwrap();
    assert_eq!(check_listen(lo, None), Ok(()));
    assert_eq!(check_listen(lo6, None), Ok(()));
    let e = check_listen(any, None).unwrap_err();
    assert!(e.contains("not a loopback address") && e.contains("page_token") && !e.contains('\n'), "{e}");
    assert_eq!(check_listen(any, Some(TOKEN)), Ok(()));
    assert!(check_listen(any, Some("short")).unwrap_err().contains("too short"));
    assert!(check_listen(lo, Some("has spaces in it, 0123456789")).unwrap_err().contains("only"));
    assert!(check_listen(any, Some("t%C3%A9t%C3%A9-0123456789")).is_err());
}

#[test]
fn bad_requests_are_answered_without_a_panic() {
    let site = site(None);
    assert_eq!(status(&site, "/nope", None), "404 Not Found");
    assert_eq!(status(&site, "/api/status/x", None), "404 Not Found");
    assert_eq!(get(&site, "POST /api/status HTTP/1.1").status, "405 Method Not Allowed");
    let (head, with_body) = site.respond(b"HEAD / HTTP/1.1");
    assert_eq!(head.status, "200 OK");
    assert!(!with_body);
    let bytes = head.to_bytes(false);
    assert!(bytes.ends_with(b"\r\n\r\n"), "no body for HEAD");
    for bad in
        [&b""[..], b"GET", b"GET /", b"GET / HTTP/1.1 extra", b"GET x HTTP/1.1", b"\xff\xfe / HTTP/1.1", b"GET / SPDY"]
    {
        assert_eq!(site.respond(bad).0.status, "400 Bad Request", "{bad:?}");
    }
    // Headers without a colon, an Authorization with no scheme: ignored, not fatal.
    assert_eq!(get(&site, "GET / HTTP/1.1\r\nnonsense\r\nAuthorization:\r\n: x").status, "200 OK");
    // Only /metrics without a coordinator (the page off).
    let bare = Site::new(Arc::new(Metrics::default()), None, None);
    assert_eq!(status(&bare, "/metrics", None), "200 OK");
    assert_eq!(status(&bare, "/", None), "404 Not Found");
    assert_eq!(status(&bare, "/page.js", None), "404 Not Found");
}

#[test]
fn a_response_is_well_formed() {
    let r = Response::text("404 Not Found", "nope\n");
    let text = String::from_utf8(r.to_bytes(true)).unwrap();
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert!(text.contains("Content-Length: 5\r\n"));
    assert!(text.ends_with("\r\n\r\nnope\n"));
}

#[tokio::test]
async fn oversized_and_slow_heads_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let server = tokio::spawn(Arc::new(site(None)).serve(tcp));
    let ask = |request: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before all of an oversized head is written.
        let _ = s.write_all(&request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 3 * MAX_HEAD));
    assert!(ask(huge).await.starts_with("HTTP/1.1 431 "));
    assert!(ask(b"GET /nope HTTP/1.1\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 404 "));
    let ok = ask(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("\"model_version\":0"), "{ok}");
    // A client that never finishes its head is dropped after HEAD_TIMEOUT (virtual time would
    // not apply to the server's socket; wait the real few seconds once).
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(HEAD_TIMEOUT + Duration::from_secs(5), slow.read_to_end(&mut out)).await;
    assert!(matches!(read, Ok(Ok(0))), "dropped without an answer: {read:?} {out:?}");
    // Past MAX_CONNECTIONS silent clients, a new one is closed at once; once they are gone,
    // requests are answered again.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ask(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await, "", "refused while full");
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ask(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await.starts_with("HTTP/1.1 200 OK") {
        assert!(std::time::Instant::now() < deadline, "never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
}
