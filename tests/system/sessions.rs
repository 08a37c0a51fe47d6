//! A device's session with a running coordinator: a quick restart, a revocation, a device gone
//! silent, bad input over the wire.

use std::sync::Arc;
use std::time::Duration;

use fedge_coordinator::certs::Role;
use fedge_coordinator::server::Coordinator;
use fedge_core::wire::{ErrorCode, Message};
use fedge_edge::link::Link;
use fedge_engine::{EngineConfig, RoundOutcome};
use fedge_learn::{BackendKind, ModelKind, Trainer};
use fedge_tests::harness::{
    caps, device_tls, embedded_train, fleet, initial_2nn, issue_devices, join, one_epoch, serve, spawn_client,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_device_restart_leaves_it_connected_and_the_fleet_training() {
    let (_dir, ca) = fleet();
    let train = embedded_train();
    let initial = initial_2nn(1);
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

/// A device that has read its Welcome is in the fleet: a round started at once counts it. The
/// Welcome used to go out before the coordinator registered the device, and a round started in
/// between left it out (a loaded CI machine once waited forever for such a device's task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcomed_device_is_in_the_fleet_before_its_hello_returns() {
    let (_dir, ca) = fleet();
    let config = EngineConfig { fraction: 1.0, train: one_epoch(None), ..EngineConfig::default() };
    let coordinator = Coordinator::new(config, initial_2nn(1)).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let mut links = Vec::new();
    for i in 0..64 {
        let name = format!("dev-{i}");
        ca.issue(Role::Device, &name, 1).unwrap();
        let (link, _) = join(addr, &ca, &name, 100).await;
        // Checked the moment the Welcome is read, with nothing in between.
        let devices = coordinator.devices();
        assert!(devices.iter().any(|d| d.id == name && d.connected), "{name} not registered yet: {devices:?}");
        assert_eq!(coordinator.connected(), i + 1);
        links.push(link);
    }
    coordinator.start_rounds(1);
    for link in &links {
        match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
            Message::TrainTask(t) => assert_eq!(t.round, 1),
            other => panic!("every welcomed device is in the round: {other:?}"),
        }
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_on_a_running_coordinator_is_cut_off_and_refused() {
    let (_dir, ca) = fleet();
    let initial = initial_2nn(1);
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
    let tls = device_tls(&ca, "dev-0");
    let again = async {
        let link = Link::connect(addr, "localhost", &tls).await?;
        link.hello(caps(1)).await
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), again).await.unwrap().is_err(), "refused on reconnect");
    // The other device is untouched.
    assert!(other.request(&ask).await.is_ok());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_goes_silent_does_not_hold_the_round_past_its_deadline() {
    let (_dir, ca) = fleet();
    let train = embedded_train();
    let initial = initial_2nn(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(2),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    issue_devices(&ca, &["ok-0", "ok-1", "silent"]);
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

    let (_dir, ca) = fleet();
    let initial = initial_2nn(1);
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
