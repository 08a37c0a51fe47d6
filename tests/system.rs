//! The real system on loopback: a coordinator and edge clients over QUIC with mutual TLS,
//! training a real model on real data. The fleet comes from `fedge_tests::harness`; one module
//! per concept below.

mod deployment;
mod fedbuff;
mod privacy;
mod regions;
mod restarts;
mod secure;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use fedge_coordinator::certs::Role;
use fedge_coordinator::server::Coordinator;
use fedge_core::dataset::embedded;
use fedge_core::partition::Partition;
use fedge_core::rng::derive_rng;
use fedge_core::wire::{ErrorCode, Message, OperatorCommand};
use fedge_engine::{EngineConfig, RoundOutcome};
use fedge_learn::{BackendKind, ModelKind, Trainer};
use fedge_tests::harness::{fleet, http_get, join, one_epoch, operator, serve, spawn_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_three_rounds_over_quic() {
    let (_dir, ca) = fleet();
    let data = embedded::mnist_subset().unwrap();
    let train = Arc::new(data.train);
    let mut evaluator = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let initial = evaluator.initial_params(1);
    let before = evaluator.evaluate(&initial, &data.test, 500).unwrap().accuracy;

    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 5,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(Some(10.0)),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let metrics_tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_tcp.local_addr().unwrap();
    let site = fedge_coordinator::web::Site::new(coordinator.metrics(), None, None);
    let metrics = tokio::spawn(std::sync::Arc::new(site).serve(metrics_tcp));

    let parts = Partition::Iid.split(&train.labels[..2000], 5, &mut derive_rng(1, &[])).unwrap();
    let mut statuses = Vec::new();
    let mut clients = Vec::new();
    for (i, indices) in parts.into_iter().enumerate() {
        let name = format!("dev-{i}");
        ca.issue(Role::Device, &name, 1).unwrap();
        let (link, welcome) = join(addr, &ca, &name, indices.len() as u64).await;
        assert_eq!(welcome.device_id, name);
        let (status, task) = spawn_client(link, &train, indices, 7, i as u64);
        statuses.push(status);
        clients.push(task);
    }

    // A device certificate cannot run operator commands.
    let device_cert = ca.issue(Role::Device, "intruder", 1).unwrap();
    let as_device = fedge_net::RequestClient::connect(
        addr,
        "localhost",
        fedge_net::client_config(&ca.ca_pem(), &device_cert.cert, &device_cert.key).unwrap(),
    )
    .await
    .unwrap();
    let refused = as_device
        .request(&Message::Operator(OperatorCommand::StartRounds {
            rounds: 3,
            fraction: None,
            min_train_clients: None,
            deadline_secs: None,
        }))
        .await
        .unwrap();
    assert!(matches!(refused, Message::Error { code: ErrorCode::Unauthorized, .. }), "{refused:?}");
    as_device.close().await;
    assert_eq!(coordinator.status().rounds_left, 0);
    assert!(coordinator.reports().is_empty());

    // An operator starts three rounds.
    let operator = operator(addr, &ca, "alice").await;
    // Impossible settings are refused in one line and start nothing (and, out of range, used to
    // overflow and panic, or queue rounds that could never start).
    let start = |rounds, fraction, min_train_clients, deadline_secs| {
        Message::Operator(OperatorCommand::StartRounds { rounds, fraction, min_train_clients, deadline_secs })
    };
    for (bad, want) in [
        (start(3, Some(0.0), None, None), "fraction"),
        (start(3, None, None, Some(u64::MAX)), "round deadline must be"),
        (start(3, None, None, Some(0)), "round deadline must be"),
        (start(3, None, Some(u64::MAX), None), "min_train_clients must be 1 to"),
        (start(u64::MAX, None, None, None), "rounds must be 0 to"),
    ] {
        match operator.request(&bad).await.unwrap() {
            Message::Error { message, .. } => {
                assert!(message.contains(want) && !message.contains('\n'), "{message}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
        assert_eq!(coordinator.status().rounds_left, 0);
    }
    let start = OperatorCommand::StartRounds {
        rounds: 3,
        fraction: Some(1.0),
        min_train_clients: Some(5),
        deadline_secs: Some(60),
    };
    match operator.request(&Message::Operator(start)).await.unwrap() {
        Message::Status(st) => assert!(st.current_round == Some(1) || st.rounds_left == 3, "{st:?}"),
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(240), coordinator.wait_for_rounds(3)).await.expect("3 rounds in time");
    let reports = coordinator.reports();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.outcome, RoundOutcome::Aggregated, "{r:?}");
        assert_eq!((r.round, r.model_version, r.results), (i as u64 + 1, i as u64 + 1, 5));
        assert_eq!(r.samples, 2000);
    }
    let (version, global) = coordinator.global();
    assert_eq!(version, 3);
    let after = evaluator.evaluate(&global, &data.test, 500).unwrap().accuracy;
    assert!(after > before + 0.3 && after > 0.7, "accuracy {before} -> {after}");
    coordinator.record_evaluation(3, fedge_engine::Evaluation { accuracy: after, loss: 0.0 });
    match operator.request(&Message::Operator(OperatorCommand::Status)).await.unwrap() {
        Message::Status(st) => {
            assert_eq!((st.model_version, st.rounds.len(), st.rounds_left), (3, 3, 0));
            assert_eq!(st.model_hash, global.content_hash());
            assert_eq!(st.devices_connected.len(), 5);
            assert_eq!(st.rounds[2].accuracy, Some(after));
            assert!(st.rounds.iter().all(|r| r.results == 5 && r.failed_reason.is_none()));
        }
        other => panic!("{other:?}"),
    }
    match operator.request(&Message::Operator(OperatorCommand::Devices)).await.unwrap() {
        Message::Devices(d) => {
            let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
            assert_eq!(ids, ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"], "the refused intruder is not registered");
            assert!(d.iter().all(|d| d.connected));
            let caps = d.iter().map(|d| d.capabilities.clone().expect("told at Hello")).collect::<Vec<_>>();
            assert!(caps.iter().all(|c| c.backend == "flex" && c.num_samples == 400), "{caps:?}");
        }
        other => panic!("{other:?}"),
    }
    match operator.request(&Message::Operator(OperatorCommand::Models)).await.unwrap() {
        Message::Models(m) => {
            assert_eq!(m.iter().map(|m| m.version).collect::<Vec<_>>(), [0, 1, 2, 3]);
            assert_eq!(m[3].hash, global.content_hash());
            assert_eq!(m[3].accuracy, Some(after));
        }
        other => panic!("{other:?}"),
    }

    // Every device ends on the final model, verified by hash.
    let final_hash = global.content_hash();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let done = statuses.iter().all(|s| {
                let s = s.lock().unwrap();
                s.model_version == Some(3) && s.model_hash == Some(final_hash) && s.acked == 3
            });
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("devices converge on the final model");

    // The Prometheus endpoint tells the same story.
    let page = http_get(metrics_addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    let value = |name: &str| -> f64 {
        let line = page.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{page}"));
        line[name.len()..].trim().parse().unwrap()
    };
    assert_eq!(value("fedge_rounds_total{outcome=\"aggregated\"}"), 3.0);
    assert_eq!(value("fedge_updates_accepted_total"), 15.0);
    assert_eq!(value("fedge_update_latency_seconds_count"), 15.0);
    assert_eq!(value("fedge_devices_connected"), 5.0);
    assert_eq!(value("fedge_model_version"), 3.0);
    assert_eq!(value("fedge_rejections_total{code=\"Unauthorized\"}"), 1.0, "the intruder's operator command");
    let model_bytes = 4.0 * 199_210.0;
    assert!(value("fedge_bytes_sent_total") > 5.0 * 4.0 * model_bytes, "5 devices fetched versions 0 to 3");
    assert!(value("fedge_bytes_received_total") > 15.0 * model_bytes, "15 updates");
    assert!(http_get(metrics_addr, "/").await.starts_with("HTTP/1.1 404"));

    metrics.abort();
    server.abort();
    for c in clients {
        c.abort();
    }
}
