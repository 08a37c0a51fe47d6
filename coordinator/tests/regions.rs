//! Hierarchical aggregation, crash safety at the region: a regional aggregator (a
//! `fedge-coordinator serve` process whose `coordinator.toml` has an `[upstream]` table) is
//! killed with SIGKILL in the middle of its round and started again on the same state. Its
//! round resumes with the updates it acknowledged, it finds the root's task again (the root
//! holds a region's task while it is away), and the root's round completes with exactly the
//! model the region's three updates define.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fleet, model, task_of, update};
use fedge_coordinator::certs::Role;
use fedge_coordinator::listener::Listener;
use fedge_coordinator::server::Coordinator;
use fedge_coordinator::store::Store;
use fedge_core::wire::{Message, TrainResult};
use fedge_engine::{EngineConfig, RoundOutcome};
use fedge_learn::{BackendKind, ModelKind, Trainer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_killed_mid_round_completes_the_roots_round_after_a_restart() {
    let names = ["a0", "a1", "a2"];
    let fleet = Fleet::new(&names, 3);
    let aggregator = fleet.ca.issue(Role::Aggregator, "east", 1).unwrap();

    // The root, in this process: one participant (the region) makes a round.
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let root_config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 1,
        accept_failures: false,
        round_timeout: Duration::from_secs(300),
        ..EngineConfig::default()
    };
    let root =
        Coordinator::with_store(root_config, initial.clone(), Store::open(&fleet.dir.path().join("root")).unwrap())
            .unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &fleet.ca).unwrap();
    let root_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(Arc::clone(&root).serve(listener));
    // The operator page on loopback (no token needed there), before the [upstream] table.
    let page_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let page = format!("127.0.0.1:{page_port}");
    fleet.configure(&format!("metrics_listen = \"{page}\"\n"));
    fleet.configure(&format!(
        "[upstream]\naddress = \"{root_addr}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        fleet.ca.ca_pem(),
        aggregator.cert,
        aggregator.key
    ));

    // First life of the region: its three devices get the root's task (v0, adopted as the
    // region's v1); two answer and are acknowledged.
    let first = fleet.start();
    let links = fleet.join_all(&names, &first).await;
    root.start_rounds(1);
    let mut tasks = Vec::new();
    for link in &links {
        tasks.push(task_of(link).await);
    }
    assert!(tasks.iter().all(|t| (t.round, t.model_version) == (1, 1)), "{tasks:?}\n{}", first.log());
    let adopted = model(&links[0], 1).await;
    assert_eq!(adopted, initial, "the region trains on the root's model");
    let updates: Vec<TrainResult> = (0..3).map(|i| update(&tasks[i], &adopted, i)).collect();
    for i in 0..2 {
        let reply = links[i].request(&Message::TrainResult(updates[i].clone())).await.unwrap();
        assert_eq!(reply, Message::Ack { round: 1 }, "{}", first.log());
    }
    first.kill();
    drop(links);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(root.reports().is_empty(), "the root's round waits for the region");

    // Second life: the round resumes, the third device answers, the region uploads.
    let second = fleet.start();
    let links = fleet.join_all(&names, &second).await;
    assert_eq!(task_of(&links[2]).await, tasks[2], "{}", second.log());
    let reply = links[2].request(&Message::TrainResult(updates[2].clone())).await.unwrap();
    assert_eq!(reply, Message::Ack { round: 1 }, "{}", second.log());
    tokio::time::timeout(Duration::from_secs(60), root.wait_for_rounds(1))
        .await
        .unwrap_or_else(|_| panic!("the root's round did not complete\n{}", second.log()));
    let log = second.log();
    assert!(log.contains("resumed round 1 with 2 of 3 updates"), "{log}");
    assert!(log.contains("resuming the root's round 1"), "{log}");

    // The root's v1 is v0 + (10*0.001 + 20*0.002 + 30*0.003) / 60 in every weight: the three
    // updates, each counted once, weighted by their samples (60 in all).
    let report = &root.reports()[0];
    assert_eq!((report.outcome.clone(), report.results, report.samples), (RoundOutcome::Aggregated, 1, 60));
    let (version, v1) = root.global();
    assert_eq!(version, 1);
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003) / 60.0;
    for (a, b) in v1.data().iter().zip(initial.data()) {
        assert!((f64::from(*a) - (f64::from(*b) + step)).abs() < 1e-6, "{a} vs {b} + {step}");
    }
    // The region's operator sees its standing with the root.
    let status: serde_json::Value = serde_json::from_str(&fleet.operator(&["round", "status", "--json"])).unwrap();
    let up = &status["upstream"];
    assert_eq!((up["connected"].as_bool(), up["root_round"].as_u64()), (Some(true), Some(1)), "{status}");
    assert_eq!((up["adopted_as"].as_u64(), up["uploaded"].as_bool()), (Some(1), Some(true)), "{status}");
    // And so does its operator page, in a browser.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{page}/");
    let dom = tokio::task::spawn_blocking(move || common::browser::browse(profile.path(), &url, &["--dump-dom"]))
        .await
        .unwrap();
    let line = common::browser::text_of(&dom, "upstream");
    assert_eq!(line, "Region: root connected; root round 1 on root v0 (as v1), result acknowledged", "{dom}");
    server.abort();
}

/// The three inference tiers live, from the configuration files alone: a root process that
/// distils a regional 2NN with its student (`regional_model`), and a region process
/// (`[upstream]`, `escalate_rate = 0.5`, calibrated on the last 200 test images) that fetches
/// it, verifies it with the fleet's key and answers half of those images itself, sending the
/// other half on to the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tiers_live_from_the_configuration_files() {
    use fedge_core::wire::{AnswerTier, InferRequest};
    let names = ["a0", "a1"];
    let root = Fleet::new(&names, 1);
    root.configure("distill_every = 1\nproxy_examples = 200\nregional_model = \"2nn\"\n[distill]\nepochs = 1\n");
    let aggregator = root.ca.issue(Role::Aggregator, "east", 1).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let region_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let region_config = root.dir.path().join("region.toml");
    std::fs::write(
        &region_config,
        format!(
            "listen = \"{region_addr}\"\ncerts_dir = {:?}\nstate_dir = {:?}\nmin_train_clients = 2\n\
             [upstream]\naddress = \"{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nescalate_rate = 0.5\ncalibration_examples = 200\n",
            root.certs,
            root.dir.path().join("region-state"),
            root.addr,
            root.ca.ca_pem(),
            aggregator.cert,
            aggregator.key
        ),
    )
    .unwrap();
    let root_process = root.start();
    let region = common::Coordinator::start(&region_config, &root.dir.path().join("region.log"));
    let links = {
        let mut links = Vec::new();
        for name in names {
            links.push(common::join(region_addr, &root.ca, name, &region).await);
        }
        links
    };

    // One round through the region; the root then distils its student and regional model.
    root.operator(&["round", "start", "--rounds", "1"]);
    let tasks = [task_of(&links[0]).await, task_of(&links[1]).await];
    let base = model(&links[0], tasks[0].model_version).await;
    for (i, task) in tasks.iter().enumerate() {
        let reply = links[i].request(&Message::TrainResult(update(task, &base, i))).await.unwrap();
        assert_eq!(reply, Message::Ack { round: task.round }, "{}", region.log());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while !region.log().contains("(2nn) installed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the region installed no regional model\nROOT:\n{}\nREGION:\n{}",
            root_process.log(),
            region.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The device escalates the region's calibration images to the region.
    let test = fedge_core::dataset::embedded::mnist_subset().unwrap().test;
    let (mut here, mut up) = (0, 0);
    for i in test.len() - 200..test.len() {
        let request = InferRequest { rows: 28, cols: 28, pixels: test.image(i).to_vec() };
        match links[0].request(&Message::InferRequest(request)).await.unwrap() {
            Message::InferAnswer(a) if a.tier == AnswerTier::Region => here += 1,
            Message::InferAnswer(a) => {
                assert_eq!(a.model_version, 1, "the root's teacher answers on its global v1");
                up += 1;
            }
            other => panic!("{other:?}\n{}", region.log()),
        }
    }
    assert_eq!(here + up, 200);
    assert!((85..=115).contains(&up), "{up} of 200 went to the root at escalate_rate 0.5");
}
