//! The device's local inference server (JSON over HTTP) over a hybrid predictor: answers,
//! corrections, bounds on slow and excess connections, and `serve_inference` from an edge
//! configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedge_coordinator::inference::InferenceConfig;
use fedge_core::escalation::PolicyKind;

use super::{answered, burn_teacher, coordinator, fleet, models, online};

/// One HTTP/1.1 request; the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, kind: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let code = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_inference_server_answers_json_raw_and_png_with_corrections() {
    let f = fleet();
    let (_c, addr) = coordinator(&f, InferenceConfig::default(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let p = Arc::new(f.predictor(&state, addr, PolicyKind::Speculative, 1.0, 5000));
    online(&p).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = tcp.local_addr().unwrap();
    tokio::spawn(fedge_edge::http::serve(tcp, p.clone()));
    let image = models().test.image(0);

    let json = serde_json::json!({ "pixels": image }).to_string();
    let (code, body) = http(web, "POST", "/predict", "application/json", json.as_bytes()).await;
    assert_eq!(code, 200, "{body}");
    let a: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((a["answered_by"].as_str(), a["correction_pending"].as_bool()), (Some("local"), Some(true)));
    assert!(a["route_reason"].as_str().unwrap().starts_with("escalated: below threshold for 100%"), "{body}");
    for field in ["class", "confidence", "model_version", "latency_ms", "verified", "target_rate"] {
        assert!(!a[field].is_null(), "{field} in {body}");
    }
    let url = format!("{}?wait_ms=20000", a["correction_url"].as_str().unwrap());
    let (code, body) = http(web, "GET", &url, "text/plain", b"").await;
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, c["status"].as_str(), &c["correction"]["id"]), (200, Some("ready"), &a["id"]), "{body}");

    let (code, body) = http(web, "POST", "/predict?private=true", "application/octet-stream", image).await;
    let b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, b["fallback"].as_str(), b["escalated"].as_bool()), (200, Some("private"), Some(false)));
    assert_eq!(b["class"], a["class"], "the same model on the same image");
    assert_eq!(b["route_reason"].as_str(), Some("private"));

    let mut png = Vec::new();
    let img = image::GrayImage::from_raw(28, 28, image.to_vec()).unwrap();
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let (code, body) = http(web, "POST", "/predict?private=true", "image/png", &png).await;
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, &c["class"]), (200, &a["class"]), "{body}");

    for (kind, body, want) in [
        ("application/json", &b"{\"pixels\": [1, 2]}"[..], 400),
        ("application/json", &b"not json"[..], 400),
        ("application/octet-stream", &[0u8; 100][..], 400),
        ("image/png", &b"not a png"[..], 400),
        ("text/plain", &b"hello"[..], 415),
    ] {
        let (code, text) = http(web, "POST", "/predict", kind, body).await;
        assert_eq!(code, want, "{kind}: {text}");
        assert!(text.contains("error"), "{text}");
    }
    // An impossible budget is refused before anything runs.
    let json = serde_json::json!({ "pixels": image, "max_cost": -1.0 }).to_string();
    for (path, kind, body) in [
        ("/predict", "application/json", json.as_bytes()),
        ("/predict?max_cost=nan", "application/octet-stream", image),
        ("/predict?max_cost=-0.5", "application/octet-stream", image),
    ] {
        let (code, text) = http(web, "POST", path, kind, body).await;
        assert_eq!(code, 400, "{path}: {text}");
        assert!(text.contains("max_cost must be a finite number >= 0"), "{text}");
    }
    assert_eq!(http(web, "GET", "/corrections/999999", "text/plain", b"").await.0, 404);
    let (code, body) = http(web, "GET", "/status", "text/plain", b"").await;
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, s["policy"].as_str(), s["online"].as_bool()), (200, Some("speculative"), Some(true)));
    assert_eq!(s["calibration"]["model_version"].as_u64(), Some(1));
    assert_eq!(s["metrics"]["requests"].as_u64(), Some(3));
    let (code, body) = http(web, "GET", "/metrics", "text/plain", b"").await;
    assert!(code == 200 && body.contains("fedge_edge_inference_latency_seconds_bucket"), "{body}");

    // What a web page in the device's browser could send: no Content-Type (a body is not taken
    // as JSON), or a Host that is a DNS name (rebinding).
    let json = serde_json::json!({ "pixels": image }).to_string();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        json.len()
    );
    let answer = raw(web, &[head.as_bytes(), json.as_bytes()].concat()).await;
    assert!(answer.starts_with("HTTP/1.1 415") && answer.contains("no Content-Type"), "{answer}");
    let head = "GET /status HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n";
    let answer = raw(web, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("evil.example"), "{answer}");
    let head = "GET /healthz HTTP/1.1\r\nHost: localhost:1234\r\nConnection: close\r\n\r\n";
    assert!(raw(web, head.as_bytes()).await.starts_with("HTTP/1.1 200"));
}

/// Sends `bytes` on a new connection and reads to its end.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_inference_server_bounds_slow_and_excess_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fleet();
    let (_c, addr) = coordinator(&f, InferenceConfig::default(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let p = Arc::new(f.predictor(&state, addr, PolicyKind::Speculative, 1.0, 5000));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = tcp.local_addr().unwrap();
    let options = fedge_edge::http::ServeOptions {
        header_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(5),
        max_connections: 2,
    };
    tokio::spawn(fedge_edge::http::serve_with(tcp, p, options));

    // Two connections that send half a request and stall hold both slots...
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a third is closed at once, unanswered.
    let head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let third = tokio::time::timeout(Duration::from_secs(2), raw(web, head)).await.expect("closed at once");
    assert!(third.is_empty(), "{third}");
    // The stalled ones are dropped once their header time is up, and the slots are free again.
    for mut s in stalled {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("closed").ok();
    }
    let answer = raw(web, head).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_inference_runs_from_an_edge_config_and_writes_its_status() {
    let f = fleet();
    let (c, addr) = coordinator(&f, InferenceConfig::default(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let tls = f.tls();
    let mut config = fedge_edge::config::EdgeConfig {
        coordinator: addr,
        ca: tls.ca,
        cert: tls.cert,
        key: tls.key,
        state_dir: state.clone(),
        model_key: Some(f.ca.model_public_key_path()),
        ..Default::default()
    };
    config.inference.policy = PolicyKind::CloudFirst;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let ready = |a| {
            let _ = tx.send(a);
        };
        fedge_edge::service::serve_inference(&config, "127.0.0.1:0".parse().unwrap(), ready, std::future::pending())
            .await
    });
    let web = tokio::time::timeout(Duration::from_secs(30), rx).await.unwrap().unwrap();
    let raw = models().test.image(3);
    let mut body = String::new();
    for _ in 0..100 {
        let (code, b) = http(web, "POST", "/predict", "application/octet-stream", raw).await;
        assert_eq!(code, 200, "{b}");
        body = b;
        if body.contains("\"answered_by\":\"cloud\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // the session is still opening
    }
    assert!(body.contains("\"answered_by\":\"cloud\""), "{body}");
    assert!(answered(&c) >= 1);
    let status = state.join("inference-status.json");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"answered_cloud\": 1")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the inference status is written");
    server.abort();
}
