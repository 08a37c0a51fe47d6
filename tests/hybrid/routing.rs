//! Routing by live conditions and the cache of cloud answers, over real QUIC: a repeated hard
//! input escalates once per teacher version; a metered link (from the conditions file) spends
//! the 2% rule's threshold, and flipping the file back restores the 10% one without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_coordinator::inference::InferenceConfig;
use fedge_edge::cloud::{Cloud, CloudTarget};
use fedge_edge::hybrid::{CalibrationSet, HybridConfig, HybridPredictor, Source};
use fedge_tests::harness;

use super::{Fleet, answered, burn_teacher, coordinator, fleet, models, online, request};

fn predictor(f: &Fleet, state: &Path, addr: std::net::SocketAddr, config: HybridConfig) -> HybridPredictor {
    let set = CalibrationSet::sample(&models().test, 1000, 5);
    let target = CloudTarget { addr, server_name: "localhost".into(), tls: f.tls() };
    let cloud = Cloud::connect(target, Duration::from_millis(config.cloud_timeout_ms));
    HybridPredictor::new(config, state.to_path_buf(), f.key.clone(), set, cloud).unwrap()
}

fn unlimited() -> InferenceConfig {
    InferenceConfig { rate_per_sec: 1e4, burst: 1e4, ..Default::default() }
}

/// The first image from `from` on that the device escalates.
async fn next_hard(p: &HybridPredictor, from: usize) -> usize {
    for i in from..models().test.len() {
        if p.predict(request(i, false)).await.unwrap().escalated {
            return i;
        }
    }
    panic!("no image escalates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_hard_input_escalates_once_per_teacher_version() {
    let f = fleet();
    harness::issue_devices(&f.ca, &["dev-b"]);
    let (c, addr) = coordinator(&f, unlimited(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let config = HybridConfig { target_rate: 0.2, cloud_timeout_ms: 10_000, ..HybridConfig::default() };
    let p = predictor(&f, &state, addr, config);
    online(&p).await;
    let (v1, _) = c.global();

    let hard = next_hard(&p, 0).await;
    let calls = answered(&c);
    let again = p.predict(request(hard, false)).await.unwrap();
    assert_eq!((again.answered_by, again.escalated, again.verified), (Source::Cloud, false, true));
    assert_eq!(again.route_reason, format!("cached cloud answer (teacher v{v1})"));
    assert_eq!(again.model_version, v1);
    assert_eq!(answered(&c), calls, "the second time costs no cloud call");
    // A private request for the same input is never answered from the cache.
    let private = p.predict(request(hard, true)).await.unwrap();
    assert_eq!((private.answered_by, private.route_reason.as_str()), (Source::Local, "private"));
    let m = p.metrics().snapshot();
    assert_eq!((m["cache"]["hits"].as_u64(), m["routes"]["cached"].as_u64()), (Some(1), Some(1)));
    assert!(p.metrics().encode().contains("fedge_edge_inference_cache_hits_total 1"));

    // The coordinator publishes a new teacher: one round with a training device.
    let clients = harness::spawn_devices(addr, &f.ca, &["dev-b"], &harness::embedded_train()).await;
    c.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(120), c.wait_for_rounds(1)).await.expect("a round closes");
    let (v2, _) = c.global();
    assert!(v2 > v1);
    // The device hears of v2 with its next cloud answer (another hard input); from then on the
    // cached v1 answers are gone and the same input escalates again.
    let other = next_hard(&p, hard + 1).await;
    assert_eq!(p.cloud().teacher_version(), Some(v2), "after image {other}");
    let calls = answered(&c);
    let third = p.predict(request(hard, false)).await.unwrap();
    assert_eq!((third.answered_by, third.escalated, third.model_version), (Source::Cloud, true, v2));
    assert!(third.route_reason.starts_with("escalated: below threshold for 20%"), "{}", third.route_reason);
    assert_eq!(answered(&c), calls + 1);
    let fourth = p.predict(request(hard, false)).await.unwrap();
    assert_eq!(fourth.route_reason, format!("cached cloud answer (teacher v{v2})"));
    assert_eq!(answered(&c), calls + 1);
    for t in clients {
        t.abort();
    }
}

fn write(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metered_link_spends_the_two_percent_rule_until_the_file_says_otherwise() {
    let f = fleet();
    let (c, addr) = coordinator(&f, unlimited(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let file = f.dir.path().join("conditions.toml");
    write(&file, "metered = true\nbattery_percent = 80\ncharging = false\n");
    // The shipped rules; no cache, so every escalation is a cloud call.
    let config = HybridConfig {
        conditions_file: Some(file.clone()),
        cache_entries: 0,
        cloud_timeout_ms: 10_000,
        ..HybridConfig::default()
    };
    let p = predictor(&f, &state, addr, config);
    online(&p).await;
    let cal = p.calibration().unwrap();
    let (t10, t2) = (cal.threshold, cal.threshold_for(0.02));
    assert!(t2 < t10, "2% escalates fewer than 10%: {t2} vs {t10}");

    // Runs images `range`; checks each against `threshold` and returns (escalated, kept local
    // by the rule).
    let run = |range: std::ops::Range<usize>, threshold: f32, rate: f64, why: &'static str| {
        let p = &p;
        async move {
            let (mut escalated, mut kept) = (0, 0);
            for i in range {
                let a = p.predict(request(i, false)).await.unwrap();
                let score = a.score.unwrap();
                assert_eq!((a.threshold, a.target_rate), (Some(threshold), Some(rate)), "image {i}");
                assert_eq!(a.escalated, score < threshold, "image {i}: {}", a.route_reason);
                if a.escalated {
                    escalated += 1;
                    let want = format!("escalated: below threshold for {:.0}% ({why})", rate * 100.0);
                    assert_eq!(a.route_reason, want);
                } else if score < t10 {
                    kept += 1;
                    assert_eq!(a.route_reason, format!("kept local: {why}, budget {:.0}%", rate * 100.0));
                } else {
                    assert_eq!(a.route_reason, "confident");
                }
            }
            (escalated, kept)
        }
    };
    let n = 300;
    let before = answered(&c);
    let (metered, kept) = run(0..n, t2, 0.02, "metered link").await;
    assert_eq!(answered(&c) - before, metered as u64, "one cloud call per escalation");
    assert!(kept > 0, "some answers the 10% rule would send stay local on the metered link");
    assert_eq!(p.metrics().snapshot()["routes"]["kept-local"].as_u64(), Some(kept as u64));

    // The link turns unmetered and the device is plugged in: the 10% rule, no restart.
    write(&file, "metered = false\ncharging = true\nbattery_percent = 18\n");
    let (home, kept) = run(0..n, t10, 0.1, "unmetered, charging").await;
    assert_eq!(kept, 0);
    assert!(home > metered, "unmetered escalates more: {home} vs {metered} of {n}");
    assert!((0.03..=0.25).contains(&(home as f64 / n as f64)), "{home} of {n} for 10%");

    // Unplugged at 18%: the battery rule; a bad file keeps the last good state.
    write(&file, "metered = false\ncharging = false\nbattery_percent = 18\n");
    run(0..50, t2, 0.02, "battery below 20%, not charging").await;
    write(&file, "metered = maybe\n");
    run(0..20, t2, 0.02, "battery below 20%, not charging").await;
    let m = p.metrics().snapshot();
    assert_eq!(Some(answered(&c) - before), m["routes"]["escalated"].as_u64(), "every escalation was one cloud call");
}

/// Per-request cost budgets: an escalation dearer than the request's budget (its own `max_cost`
/// or the configured default) is answered locally, says why, and costs no cloud call; a request
/// that can afford it escalates; a cached answer costs nothing and is given even over budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_cost_budget_stays_on_the_device() {
    let f = fleet();
    let (c, addr) = coordinator(&f, unlimited(), burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let config = HybridConfig {
        target_rate: 0.2,
        cloud_timeout_ms: 10_000,
        cloud_call_cost: Some(0.002),
        max_cost_per_request: Some(0.001),
        ..HybridConfig::default()
    };
    let p = predictor(&f, &state, addr, config);
    online(&p).await;
    // Under the default budget (0.001 < 0.002) nothing escalates: find an input that would.
    let calls = answered(&c);
    let mut hard = None;
    for i in 0..models().test.len() {
        let a = p.predict(request(i, false)).await.unwrap();
        assert!(!a.escalated && a.answered_by == Source::Local, "{a:?}");
        if a.fallback == Some("over-budget") {
            assert!(!a.verified);
            assert_eq!(a.route_reason, "over budget: a cloud call costs 0.002, this request allows 0.001");
            hard = Some(i);
            break;
        }
    }
    let hard = hard.expect("some input is unsure enough to want the cloud");
    assert_eq!(answered(&c), calls, "no cloud call over budget");
    // The request's own budget wins over the default: 0.005 affords the call.
    let rich = fedge_edge::hybrid::Request { max_cost: Some(0.005), ..request(hard, false) };
    let a = p.predict(rich.clone()).await.unwrap();
    assert_eq!((a.answered_by, a.escalated, a.verified), (Source::Cloud, true, true));
    assert_eq!(answered(&c), calls + 1);
    // Now cached: the same input under the small budget gets the cloud's answer for free.
    let a = p.predict(request(hard, false)).await.unwrap();
    assert_eq!(a.answered_by, Source::Cloud);
    assert!(a.route_reason.starts_with("cached cloud answer"), "{}", a.route_reason);
    assert_eq!(answered(&c), calls + 1);
    let m = p.metrics().snapshot();
    assert_eq!(m["routes"]["over-budget"].as_u64(), Some(1));
    assert!(p.metrics().encode().contains("route=\"over-budget\""));
}

#[test]
fn impossible_costs_are_refused() {
    for (cost, budget) in [(Some(-1.0), None), (Some(f64::NAN), None), (None, Some(f64::INFINITY))] {
        let c = HybridConfig { cloud_call_cost: cost, max_cost_per_request: budget, ..HybridConfig::default() };
        let err = c.validate().unwrap_err();
        assert!(err.contains("must be a finite number >= 0"), "{err}");
    }
}
