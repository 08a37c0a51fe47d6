//! The real system on loopback: a coordinator and edge clients over QUIC with mutual TLS,
//! training a real model on real data.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::server::Coordinator;
use fedge_coordinator::transport::Listener;
use fedge_core::dataset::{Dataset, embedded};
use fedge_core::partition::Partition;
use fedge_core::rng::derive_rng;
use fedge_core::wire::{Capabilities, ErrorCode, Message, OperatorCommand, TrainConfig, Welcome};
use fedge_edge::EdgeTrainer;
use fedge_edge::client::{ClientError, DeviceStatus, EdgeClient};
use fedge_edge::transport::{DeviceTls, Link};
use fedge_engine::EngineConfig;
use fedge_engine::RoundOutcome;
use fedge_learn::{BackendKind, ModelKind, Trainer};
use tokio::task::JoinHandle;

/// One local epoch of SGD in minibatches of 10, clipped to `clip_norm` if given.
pub(crate) fn one_epoch(clip_norm: Option<f32>) -> TrainConfig {
    TrainConfig { epochs: 1, batch_size: 10, learning_rate: 0.05, clip_norm, local_dp: None, proximal_mu: None }
}

/// Waits until the device sessions of a stopped coordinator have noticed their closed
/// connections and let go of it (so its store can be opened again).
pub(crate) async fn released(coordinator: &Arc<Coordinator>) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while Arc::strong_count(coordinator) > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stopped coordinator is released");
}

/// Serves `coordinator` on a free loopback port.
pub(crate) fn serve(coordinator: &Arc<Coordinator>, ca: &CertDir) -> (SocketAddr, JoinHandle<()>) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), ca).unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(coordinator.clone().serve(listener)))
}

/// Connects with the device certificate `name` (already issued by `ca`) and says Hello.
pub(crate) async fn join(addr: SocketAddr, ca: &CertDir, name: &str, num_samples: u64) -> (Link, Welcome) {
    let tls = DeviceTls {
        ca: ca.ca_pem(),
        cert: ca.dir().join(format!("devices/{name}.pem")),
        key: ca.dir().join(format!("devices/{name}.key")),
    };
    let link = Link::connect(addr, "localhost", &tls).await.unwrap();
    let caps = Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples };
    let welcome = link.hello(caps).await.unwrap();
    (link, welcome)
}

pub(crate) type ClientTask = JoinHandle<Result<(), ClientError>>;

/// Runs a 2NN edge client over `link` on examples `indices` of `train`.
pub(crate) fn spawn_client(
    link: Link,
    train: &Arc<Dataset>,
    indices: Vec<usize>,
    seed: u64,
    device: u64,
) -> (Arc<Mutex<DeviceStatus>>, ClientTask) {
    let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let mut client = EdgeClient::new(link, trainer, train.clone(), indices, seed);
    (client.status(), tokio::spawn(async move { client.run(device).await }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_three_rounds_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
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
    let metrics = tokio::spawn(fedge_coordinator::metrics::serve(metrics_tcp, coordinator.metrics()));

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
    let as_device = fedge_net::Client::connect(
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
    let op_cert = ca.issue(Role::Operator, "alice", 1).unwrap();
    let operator = fedge_net::Client::connect(
        addr,
        "localhost",
        fedge_net::client_config(&ca.ca_pem(), &op_cert.cert, &op_cert.key).unwrap(),
    )
    .await
    .unwrap();
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

/// A plain HTTP/1.1 GET; the whole response.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: fedge\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_device_restart_leaves_it_connected_and_the_fleet_training() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let train = Arc::new(embedded::mnist_subset().unwrap().train);
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 1,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    ca.issue(Role::Device, "dev-0", 1).unwrap();
    let (old, _) = join(addr, &ca, "dev-0", 100).await;
    // The device restarts: the new process says hello before the old connection is gone,
    // then the old one ends.
    let (new, _) = join(addr, &ca, "dev-0", 100).await;
    old.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(coordinator.connected(), 1, "the newest session counts");
    assert!(coordinator.devices().iter().any(|d| d.id == "dev-0" && d.connected), "{:?}", coordinator.devices());
    let (_status, client) = spawn_client(new, &train, (0..100).collect(), 7, 0);
    coordinator.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(60), coordinator.wait_for_rounds(1)).await.expect("the round runs");
    let r = &coordinator.reports()[0];
    assert_eq!((&r.outcome, r.results), (&RoundOutcome::Aggregated, 1), "{r:?}");
    client.abort();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_on_a_running_coordinator_is_cut_off_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let coordinator = Coordinator::new(EngineConfig::default(), initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    ca.issue(Role::Device, "dev-0", 1).unwrap();
    ca.issue(Role::Device, "dev-1", 1).unwrap();
    let (link, _) = join(addr, &ca, "dev-0", 100).await;
    let (other, _) = join(addr, &ca, "dev-1", 100).await;
    let ask = Message::TaskRequest { running: None };
    assert!(link.request(&ask).await.is_ok());
    // `certs revoke` while the coordinator runs: the live connection (kept open by
    // keep-alives) is closed within seconds, and the certificate is refused from then on.
    ca.revoke(Role::Device, "dev-0").unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        while link.request(&ask).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(cut.is_ok(), "the revoked device still gets answers");
    let tls = DeviceTls {
        ca: ca.ca_pem(),
        cert: ca.dir().join("devices/dev-0.pem"),
        key: ca.dir().join("devices/dev-0.key"),
    };
    let again = async {
        let link = Link::connect(addr, "localhost", &tls).await?;
        let caps =
            Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples: 1 };
        link.hello(caps).await
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), again).await.unwrap().is_err(), "refused on reconnect");
    // The other device is untouched.
    assert!(other.request(&ask).await.is_ok());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_goes_silent_does_not_hold_the_round_past_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let data = embedded::mnist_subset().unwrap();
    let train = Arc::new(data.train);
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(2),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    for name in ["ok-0", "ok-1", "silent"] {
        ca.issue(Role::Device, name, 1).unwrap();
    }
    let mut clients = Vec::new();
    for i in 0..2 {
        let (link, _) = join(addr, &ca, &format!("ok-{i}"), 100).await;
        clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
    }
    // The silent device connects, takes its task, and never answers (but stays connected).
    let (silent, _) = join(addr, &ca, "silent", 100).await;
    while coordinator.connected() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    coordinator.start_rounds(1);
    let (mut send, mut recv) = silent.connection.open_bi().await.unwrap();
    fedge_net::write_message(&mut send, &fedge_core::wire::Message::TaskRequest { running: None }).await.unwrap();
    let task = fedge_net::read_message(&mut recv).await.unwrap();
    assert!(matches!(task, fedge_core::wire::Message::TrainTask(_)), "{task:?}");

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), coordinator.wait_for_rounds(1)).await.expect("round closes");
    let waited = started.elapsed();
    let r = &coordinator.reports()[0];
    assert_eq!(r.outcome, RoundOutcome::Aggregated);
    assert_eq!((r.results, r.stragglers.len()), (2, 1));
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
    server.abort();
    for c in clients {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_the_wire_gets_typed_errors_and_harms_nothing() {
    use fedge_core::ModelParams;
    use fedge_core::wire::TrainResult;

    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 1,
        round_timeout: Duration::from_secs(60),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial.clone()).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    ca.issue(Role::Device, "bad", 1).unwrap();
    let (link, _) = join(addr, &ca, "bad", 10).await;
    coordinator.start_rounds(1);
    let task = match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
        Message::TrainTask(t) => t,
        other => panic!("{other:?}"),
    };
    let result = |delta: ModelParams| TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: 10,
        train_loss: 0.1,
        delta,
        clipped: false,
    };
    let code_of = |m: Message| match m {
        Message::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    };

    // Raw frames: garbage bytes, and a length prefix far over the limit.
    for (frame, want) in [
        (vec![3, 0, 0, 0, 0xff, 0xfe, 0xfd], ErrorCode::Malformed),
        ((u32::MAX).to_le_bytes().to_vec(), ErrorCode::TooLarge),
    ] {
        let (mut send, mut recv) = link.connection.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let _ = send.finish();
        match fedge_net::read_message(&mut recv).await {
            Ok(m) => assert_eq!(code_of(m), want),
            Err(e) => panic!("no answer to a bad frame: {e}"),
        }
    }
    // NaN, wrong shape, stale version.
    let mut nan = initial.clone();
    nan.data_mut()[7] = f32::NAN;
    let wrong_shape = {
        use fedge_core::params::{ParamLayout, TensorSpec};
        let layout = ParamLayout::new(vec![TensorSpec { name: "fc.weight".into(), shape: vec![10, 10] }]).unwrap();
        ModelParams::zeros(Arc::new(layout))
    };
    // Larger than the model: refused by its frame's length, before it is read.
    let larger = Trainer::new(ModelKind::Cnn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let zero = ModelParams::zeros(initial.layout().clone());
    let stale = TrainResult { model_version: 9, ..result(zero.clone()) };
    for (msg, want) in [
        (Message::TrainResult(result(nan)), ErrorCode::InvalidUpdate),
        (Message::TrainResult(result(wrong_shape)), ErrorCode::InvalidUpdate),
        (Message::TrainResult(result(larger)), ErrorCode::TooLarge),
        (Message::TrainResult(stale), ErrorCode::StaleModel),
        (
            Message::Welcome(fedge_core::wire::Welcome {
                protocol_version: 1,
                device_id: "x".into(),
                model_version: 0,
            }),
            ErrorCode::Malformed,
        ),
    ] {
        assert_eq!(code_of(link.request(&msg).await.unwrap()), want);
    }
    assert!(coordinator.reports().is_empty(), "nothing bad closed the round");
    // A good result is acknowledged; the same device again is a duplicate, and stale now.
    match link.request(&Message::TrainResult(result(zero.clone()))).await.unwrap() {
        Message::Ack { round } => assert_eq!(round, 1),
        other => panic!("{other:?}"),
    }
    let again = code_of(link.request(&Message::TrainResult(result(zero))).await.unwrap());
    assert!(matches!(again, ErrorCode::Duplicate | ErrorCode::StaleModel), "{again:?}");
    let (version, global) = coordinator.global();
    assert_eq!(version, 1);
    assert_eq!(global.content_hash(), initial.content_hash(), "a zero delta leaves the model as it was");
    // Every refusal is counted by its code.
    let page = coordinator.metrics().encode();
    for code in ["Malformed", "TooLarge", "InvalidUpdate", "StaleModel"] {
        assert!(page.contains(&format!("fedge_rejections_total{{code=\"{code}\"}}")), "{code} in\n{page}");
    }
    assert!(page.contains("fedge_rejections_total{code=\"InvalidUpdate\"} 2"), "{page}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_last_model_version() {
    use fedge_coordinator::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    let state = dir.path().join("state");
    let data = embedded::mnist_subset().unwrap();
    let train = Arc::new(data.train);
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    let names = ["dev-a", "dev-b"];
    for name in names {
        ca.issue(Role::Device, name, 1).unwrap();
    }

    // First life: two rounds.
    let (hash_before, known_before) = {
        let coordinator =
            Coordinator::with_store(config.clone(), initial.clone(), Store::open(&state).unwrap()).unwrap();
        let (addr, server) = serve(&coordinator, &ca);
        let mut clients = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (link, _) = join(addr, &ca, name, 100).await;
            clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
        }
        coordinator.start_rounds(2);
        tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(2)).await.expect("2 rounds");
        let (version, global) = coordinator.global();
        assert_eq!(version, 2);
        server.abort();
        for c in clients {
            c.abort();
            let _ = c.await;
        }
        let _ = server.await;
        let result = (global.content_hash(), coordinator.status().devices_known);
        // Wait for the device sessions to notice the closed connections and let go.
        released(&coordinator).await;
        result
    };
    assert_eq!(known_before, 2);

    // Second life, same state folder, a different initial model offered: the stored one wins.
    let other_initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(99);
    let coordinator = Coordinator::with_store(config, other_initial, Store::open(&state).unwrap()).unwrap();
    let (version, global) = coordinator.global();
    assert_eq!(version, 2);
    assert_eq!(global.content_hash(), hash_before);
    let st = coordinator.status();
    assert_eq!((st.devices_known, st.model_version, st.model_hash), (2, 2, hash_before));
    // The next round is round 3 and builds version 3 from version 2.
    let (addr, server) = serve(&coordinator, &ca);
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, welcome) = join(addr, &ca, name, 100).await;
        assert_eq!(welcome.model_version, 2);
        clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
    }
    coordinator.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(1)).await.expect("round 3");
    let r = &coordinator.reports()[0];
    assert_eq!((r.round, r.model_version, r.results), (3, 3, 2));
    assert_eq!(coordinator.status().devices_known, 2, "the same devices, not new ones");
    server.abort();
    for c in clients {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_download_resumes_from_the_bytes_on_disk_and_refuses_damage() {
    use fedge_edge::download::{DownloadError, fetch_model};

    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    ca.issue(Role::Device, "dev-a", 1).unwrap();
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(3);
    let coordinator = Coordinator::new(EngineConfig::default(), initial.clone()).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let (link, _) = join(addr, &ca, "dev-a", 10).await;

    // A first attempt that got 100,000 bytes before the connection dropped.
    let cut = 100_000u64;
    let (hash, total_len, head) =
        match link.request(&Message::ModelChunkRequest { version: 0, offset: 0, max_len: cut as u32 }).await.unwrap() {
            Message::ModelChunk { hash, total_len, offset: 0, bytes, .. } => (hash, total_len, bytes),
            other => panic!("unexpected {other:?}"),
        };
    assert_eq!((hash, head.len() as u64), (initial.content_hash(), cut));
    assert!(total_len > 4 * 199_210, "the 2NN's weights are all there");
    let state = dir.path().join("device");
    std::fs::create_dir_all(&state).unwrap();
    let part = state.join(format!("model-v0-{hash}.part"));
    std::fs::write(&part, &head).unwrap();

    // The download continues where it stopped and verifies the whole model.
    let d = fetch_model(&link, 0, Some(&state)).await.unwrap();
    assert_eq!((d.resumed_from, d.fetched), (cut, total_len - cut));
    assert_eq!(d.params, initial);
    assert_eq!(std::fs::metadata(d.file.as_ref().unwrap()).unwrap().len(), total_len);
    std::fs::remove_file(d.file.unwrap()).unwrap();

    // A damaged part (one flipped byte in the weights) is refused and deleted; the next attempt
    // starts from scratch and succeeds.
    let mut bad = head.clone();
    bad[99_000] ^= 0x20;
    std::fs::write(&part, &bad).unwrap();
    assert!(matches!(fetch_model(&link, 0, Some(&state)).await, Err(DownloadError::BadModel { .. })));
    assert!(!part.exists(), "the damaged part is gone");
    let d = fetch_model(&link, 0, Some(&state)).await.unwrap();
    assert_eq!((d.resumed_from, d.fetched, d.params.content_hash()), (0, total_len, hash));

    // Without a state folder the download happens in memory; nonsense offsets are refused.
    assert_eq!(fetch_model(&link, 0, None).await.unwrap().params, initial);
    let past = Message::ModelChunkRequest { version: 0, offset: total_len + 1, max_len: 10 };
    assert!(matches!(link.request(&past).await.unwrap(), Message::Error { code: ErrorCode::Malformed, .. }));
    let unknown = Message::ModelChunkRequest { version: 9, offset: 0, max_len: 10 };
    assert!(matches!(link.request(&unknown).await.unwrap(), Message::Error { code: ErrorCode::StaleModel, .. }));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_ledger_is_shown_stamped_enforced_and_survives_a_restart() {
    use fedge_coordinator::store::Store;
    use fedge_core::privacy::epsilon;
    use fedge_engine::CentralDp;

    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    let state = dir.path().join("state");
    let train = Arc::new(embedded::mnist_subset().unwrap().train);
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    // Two devices, both sampled: q = 1. The budget fits two rounds, not three.
    let (two, three) = (epsilon(1.0, 2.0, 2, 1e-5).unwrap().epsilon, epsilon(1.0, 2.0, 3, 1e-5).unwrap().epsilon);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(Some(1.0)),
        privacy: Some(CentralDp {
            noise_multiplier: 2.0,
            clip_norm: 1.0,
            adaptive: None,
            delta: 1e-5,
            target_epsilon: Some((two + three) / 2.0),
        }),
        ..EngineConfig::default()
    };
    let names = ["dev-a", "dev-b"];
    for name in names {
        ca.issue(Role::Device, name, 1).unwrap();
    }
    let op_cert = ca.issue(Role::Operator, "alice", 1).unwrap();
    let op_config = fedge_net::client_config(&ca.ca_pem(), &op_cert.cert, &op_cert.key).unwrap();
    let start = |rounds| {
        Message::Operator(OperatorCommand::StartRounds {
            rounds,
            fraction: None,
            min_train_clients: None,
            deadline_secs: None,
        })
    };

    {
        let coordinator =
            Coordinator::with_store(config.clone(), initial.clone(), Store::open(&state).unwrap()).unwrap();
        let (addr, server) = serve(&coordinator, &ca);
        let mut clients = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (link, _) = join(addr, &ca, name, 100).await;
            clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
        }
        let operator = fedge_net::Client::connect(addr, "localhost", op_config.clone()).await.unwrap();
        // Asking for three rounds is refused up front, saying how far it would go.
        match operator.request(&start(3)).await.unwrap() {
            Message::Error { message, .. } => {
                assert!(message.contains("privacy budget") && message.contains("2 rounds fit"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(coordinator.status().rounds_left, 0);
        assert!(matches!(operator.request(&start(2)).await.unwrap(), Message::Status(_)));
        tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(2)).await.expect("2 rounds");
        let st = coordinator.status();
        let p = st.privacy.expect("central DP status");
        assert!((p.epsilon - two).abs() < 1e-12, "{} vs {two}", p.epsilon);
        assert_eq!((p.noise_multiplier, p.clip_norm, p.delta), (2.0, 1.0, 1e-5));
        for (i, r) in st.rounds.iter().enumerate() {
            let e = r.privacy.expect("each released round is in the ledger");
            assert_eq!((e.round, e.sampling_rate, e.noise_multiplier), (i as u64 + 1, 1.0, 2.0));
        }
        // Each model version carries the epsilon spent to make it.
        match operator.request(&Message::Operator(OperatorCommand::Models)).await.unwrap() {
            Message::Models(m) => {
                assert_eq!(
                    m.iter().map(|m| m.epsilon).collect::<Vec<_>>(),
                    [None, st.rounds[0].privacy.map(|p| p.epsilon), Some(p.epsilon)]
                );
            }
            other => panic!("{other:?}"),
        }
        // One more round would pass the budget.
        match operator.request(&start(1)).await.unwrap() {
            Message::Error { message, .. } => assert!(message.contains("0 rounds fit"), "{message}"),
            other => panic!("{other:?}"),
        }
        operator.close().await;
        server.abort();
        for c in clients {
            c.abort();
            let _ = c.await;
        }
        let _ = server.await;
        released(&coordinator).await;
    }

    // After a restart the ledger is rebuilt from the stored rounds: the budget still binds.
    let coordinator = Coordinator::with_store(config, initial, Store::open(&state).unwrap()).unwrap();
    let p = coordinator.status().privacy.unwrap();
    assert!((p.epsilon - two).abs() < 1e-12);
    let (addr, server) = serve(&coordinator, &ca);
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, _) = join(addr, &ca, name, 100).await;
        clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
    }
    let operator = fedge_net::Client::connect(addr, "localhost", op_config).await.unwrap();
    match operator.request(&start(1)).await.unwrap() {
        Message::Error { message, .. } => assert!(message.contains("privacy budget"), "{message}"),
        other => panic!("{other:?}"),
    }
    server.abort();
    for c in clients {
        c.abort();
    }
}

/// Waits until every status satisfies `pred`.
async fn until_all(statuses: &[Arc<Mutex<DeviceStatus>>], what: &str, pred: impl Fn(&DeviceStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !statuses.iter().all(|s| pred(&s.lock().unwrap())) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "devices did not reach: {what}; {:?}",
            statuses.iter().map(|s| s.lock().unwrap().clone()).collect::<Vec<_>>()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_students_reach_devices_signed_and_rollback_moves_them_back() {
    use fedge_coordinator::store::Store;
    use fedge_core::codec;
    use fedge_core::quant::QuantizedModel;
    use fedge_net::ModelKey;

    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    let state = dir.path().join("state");
    let train = Arc::new(embedded::mnist_subset().unwrap().train);
    let initial = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(1);
    let mut students = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
    let mut blob = |seed| codec::encode_value(&QuantizedModel::quantize(&students.initial_params(seed)));
    let (b1, b2, b3) = (blob(1), blob(2), blob(3));
    let config = EngineConfig { min_train_clients: 2, train: one_epoch(None), ..EngineConfig::default() };
    let names = ["dev-a", "dev-b"];
    for name in names {
        ca.issue(Role::Device, name, 1).unwrap();
    }
    let key = ModelKey::read(&ca.model_public_key_path()).unwrap();
    let student = |accuracy: Option<f64>, blob: Vec<u8>| fedge_coordinator::server::NewStudent {
        parent: 0,
        round: 0,
        architecture: "mlp".into(),
        parameters: 101_770,
        accuracy,
        latency_us: Some(20.0),
        blob,
    };

    let coordinator = Coordinator::with_store(config.clone(), initial.clone(), Store::open(&state).unwrap()).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let mut statuses = Vec::new();
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, _) = join(addr, &ca, name, 100).await;
        let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let mut client = EdgeClient::new(link, trainer, train.clone(), (i * 100..(i + 1) * 100).collect(), 1)
            .with_state_dir(dir.path().join(format!("edge-{i}")))
            .with_model_key(key.clone());
        statuses.push(client.status());
        clients.push(tokio::spawn(async move { client.run(i as u64).await }));
    }

    // An unsigned model (no signing key set yet) is refused; devices say so and run nothing.
    let unsigned = coordinator.register_student(student(None, b1.clone()), true).await.unwrap();
    assert!(unsigned.signature.is_empty());
    until_all(&statuses, "refuse the unsigned model", |s| {
        s.deploy_error.as_deref().is_some_and(|e| e.contains("unsigned")) && s.deployed_version.is_none()
    })
    .await;

    // Signed students: promoted, fetched, verified, run.
    coordinator.set_signer(ca.model_signer().unwrap(), "2nn");
    let s1 = coordinator.register_student(student(Some(0.5), b2.clone()), true).await.unwrap();
    until_all(&statuses, "run s1", |s| s.deployed_version == Some(s1.version)).await;
    let s2 = coordinator.register_student(student(Some(0.6), b3.clone()), true).await.unwrap();
    assert!(s2.version > s1.version && s1.version > unsigned.version, "one increasing sequence");
    until_all(&statuses, "run s2", |s| s.deployed_version == Some(s2.version)).await;
    // Devices report what they run with their next task request.
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = coordinator.models().into_iter().find(|m| m.version == s2.version).unwrap();
            if line.devices_running == 2 {
                break line;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both devices report s2");
    assert!(line.promoted && line.signed, "{line:?}");
    assert_eq!(coordinator.fleet_versions().get(&Some(s2.version)), Some(&2));

    // The device answers predictions with what it runs (the library behind `fedge-edge predict`).
    let test = embedded::mnist_subset().unwrap().test;
    let local = fedge_edge::predict::LocalModel::load(&dir.path().join("edge-0"), &key).unwrap();
    let answer = local.predict(test.image(0)).unwrap();
    assert_eq!((answer.model_version, answer.answered_by, answer.architecture.as_str()), (s2.version, "local", "mlp"));
    assert!(answer.class < 10 && answer.confidence > 0.0 && answer.confidence <= 1.0);
    assert!(local.predict(&[0u8; 10]).is_err(), "wrong-sized input");
    assert!(fedge_edge::predict::LocalModel::load(&dir.path().join("nowhere"), &key).is_err());
    // Rollback by an operator: devices go back to s1 (still on disk, no download needed).
    let op_cert = ca.issue(Role::Operator, "alice", 1).unwrap();
    let operator = fedge_net::Client::connect(
        addr,
        "localhost",
        fedge_net::client_config(&ca.ca_pem(), &op_cert.cert, &op_cert.key).unwrap(),
    )
    .await
    .unwrap();
    match operator.request(&Message::Operator(OperatorCommand::Rollback)).await.unwrap() {
        Message::Models(m) => assert!(m.iter().any(|m| m.version == s1.version && m.promoted), "{m:?}"),
        other => panic!("{other:?}"),
    }
    until_all(&statuses, "roll back to s1", |s| s.deployed_version == Some(s1.version)).await;
    match operator.request(&Message::Operator(OperatorCommand::Promote { version: 12345 })).await.unwrap() {
        Message::Error { message, .. } => assert!(message.contains("no registered model v12345"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Global versions are registered and signed too (the initial v0 once a signer is set).
    let v0 = coordinator.models().into_iter().find(|m| m.version == 0).unwrap();
    assert!(v0.signed && v0.role == fedge_core::registry::ModelRole::Global && v0.created_at > 0, "{v0:?}");
    operator.close().await;

    server.abort();
    for c in clients {
        c.abort();
        let _ = c.await;
    }
    let _ = server.await;
    released(&coordinator).await;
    drop(coordinator);

    // The registry, its blobs and the promotion history survive a restart.
    let again = Coordinator::with_store(config, initial, Store::open(&state).unwrap()).unwrap();
    assert_eq!(again.promoted(), Some(s1.version));
    let versions: Vec<u64> = again
        .models()
        .iter()
        .filter(|m| m.role == fedge_core::registry::ModelRole::Student)
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, [unsigned.version, s1.version, s2.version]);
    // A new device downloads s1 from the blob store on disk (nothing is in memory now).
    ca.issue(Role::Device, "dev-c", 1).unwrap();
    let (addr, server) = serve(&again, &ca);
    let (link, _) = join(addr, &ca, "dev-c", 100).await;
    let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let mut client = EdgeClient::new(link, trainer, train.clone(), (0..100).collect(), 1)
        .with_state_dir(dir.path().join("edge-c"))
        .with_model_key(key.clone());
    let status = client.status();
    let task = tokio::spawn(async move { client.run(9).await });
    until_all(&[status], "a new device runs s1", |s| s.deployed_version == Some(s1.version)).await;
    server.abort();
    task.abort();
    // The history before s1 survived too.
    assert_eq!(again.rollback().unwrap(), unsigned.version);
    assert!(again.rollback().is_err(), "nothing before the first promotion");
}
