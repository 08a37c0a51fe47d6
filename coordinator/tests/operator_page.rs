//! Issue 18, the operator page in a real browser: a `fedge-coordinator serve` process with a
//! metrics listener behind a `page_token` and three devices runs two rounds and opens a third;
//! headless Chromium loads `/?token=...`, runs its script (which polls `/api/status` with the
//! token as a bearer token) and dumps the DOM it rendered, which must show what `round status
//! --json` reports. A screenshot is kept as a build
//! artifact (`$CARGO_TARGET_TMPDIR/operator-page.png`, printed).
//!
//! Chromium is required, not optional: the test fails, saying how to install it, when it is
//! missing (`.ci/run` installs it). `FEDGE_CHROMIUM` names another binary.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::browser::{browse, chromium, text_of};
use common::{Fleet, model, task_of, update};
use fedge_core::wire::Message;

const TOKEN: &str = "operator-page-test-token-0123";

/// A plain HTTP GET on the page's listener, with the page's token when given: status line and
/// body.
fn http_get(addr: &str, target: &str, token: Option<&str>) -> Option<(String, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

fn round_status(fleet: &Fleet) -> serde_json::Value {
    serde_json::from_str(&fleet.operator(&["round", "status", "--json"])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_in_a_browser_what_round_status_reports() {
    let browser = chromium();
    let started = Instant::now();
    let names = ["phone-a", "phone-b", "tablet-c"];
    let fleet = Fleet::new(&names, 3);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let page = format!("127.0.0.1:{port}");
    fleet.configure(&format!(
        "metrics_listen = \"{page}\"\npage_token = \"{TOKEN}\"\nclip_norm = 0.05\nnoise_multiplier = 1.1\n\
         target_epsilon = 40.0\n"
    ));
    let coordinator = fleet.start();
    let links = fleet.join_all(&names, &coordinator).await;

    // Two rounds, every device reporting (a device's next task comes once the round before
    // closed), each evaluated.
    fleet.operator(&["round", "start", "--rounds", "2"]);
    let initial = model(&links[0], 0).await;
    for round in 1..=2u64 {
        for (i, link) in links.iter().enumerate() {
            let task = task_of(link).await;
            assert_eq!(task.round, round);
            let reply = link.request(&Message::TrainResult(update(&task, &initial, i))).await.unwrap();
            assert_eq!(reply, Message::Ack { round }, "{}", coordinator.log());
        }
    }
    common::wait_for_version(&links[0], 2, Duration::from_secs(60), &coordinator).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while round_status(&fleet)["rounds"][1]["accuracy"].is_null() {
        assert!(Instant::now() < deadline, "round 2 never evaluated\n{}", coordinator.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A third round open, one of three reporting.
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let task = task_of(&links[1]).await;
    assert_eq!(task.round, 3);
    let reply = links[1].request(&Message::TrainResult(update(&task, &initial, 1))).await.unwrap();
    assert_eq!(reply, Message::Ack { round: 3 });
    let status = round_status(&fleet);
    assert_eq!(status["open_round"]["devices_reporting"], 1, "{status}");
    let table = fleet.operator(&["round", "status"]);
    assert!(table.contains("round 3 open: 1 of 3 wanted reporting (3 selected), deadline in "), "{table}");
    assert!(table.lines().nth(4).is_some_and(|l| l.trim_end().ends_with(" s")), "rounds with their duration: {table}");

    // The JSON the page polls is what the CLI prints; it needs the token, /metrics does not.
    assert_eq!(http_get(&page, "/api/status", None).unwrap().0, "HTTP/1.1 401 Unauthorized");
    assert_eq!(http_get(&page, "/", None).unwrap().0, "HTTP/1.1 401 Unauthorized");
    assert_eq!(http_get(&page, "/metrics", None).unwrap().0, "HTTP/1.1 200 OK");
    let (line, body) = http_get(&page, "/api/status", Some(TOKEN)).expect("the page's listener answers");
    assert_eq!(line, "HTTP/1.1 200 OK");
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in ["model_version", "rounds", "devices_connected", "devices_known", "privacy", "phase"] {
        assert_eq!(api["status"][key], status[key], "{key}");
    }
    assert_eq!(api["devices"].as_array().unwrap().len(), 3);
    assert_eq!(http_get(&page, "/nope", Some(TOKEN)).unwrap().0, "HTTP/1.1 404 Not Found");

    // The browser: the DOM after the script ran (the page opened with its token, which the
    // script sends on as a bearer token).
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{page}/?token={TOKEN}");
    let t = Instant::now();
    let dom = tokio::task::spawn_blocking({
        let (profile, url) = (profile.path().to_path_buf(), url.clone());
        move || browse(&profile, &url, &["--dump-dom"])
    })
    .await
    .unwrap();
    eprintln!("chromium ({}) dumped the DOM in {:.1} s", browser.display(), t.elapsed().as_secs_f64());
    let rounds = status["rounds"].as_array().unwrap();
    let accuracy = rounds.iter().rev().find_map(|r| r["accuracy"].as_f64()).unwrap();
    assert_eq!(text_of(&dom, "model-version"), status["model_version"].to_string(), "{dom}");
    assert_eq!(text_of(&dom, "rounds-done"), rounds.len().to_string());
    assert_eq!(text_of(&dom, "last-accuracy"), format!("{:.2}%", accuracy * 100.0));
    assert_eq!(text_of(&dom, "devices-connected"), status["devices_connected"].as_array().unwrap().len().to_string());
    assert_eq!(text_of(&dom, "devices-known"), "3");
    assert_eq!(text_of(&dom, "phase"), "training");
    assert_eq!(text_of(&dom, "round-title"), "Round 3");
    assert_eq!(text_of(&dom, "round-detail"), "1 of 3 wanted reporting (3 selected)");
    assert!(text_of(&dom, "deadline").ends_with(" s") || text_of(&dom, "deadline").contains("min"));
    let epsilon = status["privacy"]["epsilon"].as_f64().unwrap();
    assert_eq!(text_of(&dom, "epsilon-left"), format!("ε {:.3} left", 40.0 - epsilon));
    assert!(text_of(&dom, "updated").starts_with("updated "), "the script polled: {dom}");
    for name in names {
        assert!(dom.contains(&format!("<td>{name}</td>")), "device {name} listed");
    }
    // Every model version listed, the global ones as such.
    assert_eq!(dom.matches("<td>global</td>").count(), api["models"].as_array().unwrap().len(), "{dom}");
    // The charts were drawn: one point per round and series with a value.
    assert!(dom.matches("<circle").count() >= 2 * rounds.len(), "{dom}");

    // The screenshot, kept for people to look at.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-page.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let (profile, shot) = (profile.path().to_path_buf(), shot.clone());
        move || browse(&profile, &url, &[&format!("--screenshot={}", shot.display()), "--window-size=1280,900"])
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot at {}", shot.display());
    eprintln!(
        "screenshot: {} ({} KiB); test took {:.1} s",
        shot.display(),
        png.len() / 1024,
        started.elapsed().as_secs_f64()
    );
}

/// Off loopback without a `page_token` the coordinator does not start, and says why in a line.
#[test]
fn a_page_off_loopback_without_a_token_refuses_to_start() {
    let fleet = Fleet::new(&["phone-a"], 1);
    fleet.configure("metrics_listen = \"0.0.0.0:0\"\n");
    let mut coordinator = fleet.start();
    let status = coordinator.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = coordinator.log();
    let line = log.lines().find(|l| l.contains("page_token")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("metrics_listen 0.0.0.0:0 is not a loopback address"), "{line}");
}
