//! Secure aggregation over QUIC (issue 16): a round's devices enter their updates into a
//! SecAgg+ sum through the coordinator, which learns only the sum. The global model is the
//! FedAvg of the devices that made it into the sum (to quantisation), a device that goes
//! silent after saying it is ready is left out at the stage's deadline, and a plain upload is
//! refused.

use std::sync::Arc;
use std::time::Duration;

use fedge_coordinator::server::{Coordinator, SecureSettings};
use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::wire::{ErrorCode, Message, SessionPurpose, TrainConfig, TrainResult, TrainTask};
use fedge_engine::{EngineConfig, RoundOutcome};
use fedge_tests::harness::{
    device_updates, embedded_train, fleet, growing_slice, initial_2nn, issue_devices, join, serve, spawn_client,
};

/// One full-batch step (the update does not depend on the order of the examples), clipped.
fn task_config() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 200,
        learning_rate: 0.1,
        clip_norm: Some(1.0),
        local_dp: None,
        proximal_mu: None,
    }
}

/// `global` plus the sample-weighted mean of devices `0..n`'s updates, each trained here.
fn fedavg(global: &ModelParams, n: usize, train: &Dataset) -> (ModelParams, u64) {
    let task = TrainTask {
        round: 1,
        model_version: 0,
        model_hash: global.content_hash(),
        config: task_config(),
        secure: None,
    };
    let (mut sum, mut samples) = (vec![0f64; global.numel()], 0u64);
    for r in device_updates(global, &task, train, n) {
        for (s, d) in sum.iter_mut().zip(r.delta.data()) {
            *s += f64::from(*d) * r.num_samples as f64;
        }
        samples += r.num_samples;
    }
    let data = global.data().iter().zip(&sum).map(|(g, s)| g + (s / samples as f64) as f32).collect();
    (ModelParams::new(global.layout().clone(), data).unwrap(), samples)
}

/// Secure aggregation with stages of `stage_secs`, clip 1, steps of 2^-20, weights out of 200.
fn settings(stage_secs: u64, noise: Option<fedge_secagg::weighting::DistributedNoise>) -> SecureSettings {
    SecureSettings {
        stage_timeout: Duration::from_secs(stage_secs),
        degree: None,
        threshold: None,
        scale: 1_048_576.0,
        weight_cap: 200,
        clip: 1.0,
        noise,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_is_the_fedavg_of_the_devices_in_its_sum() {
    let (_dir, ca) = fleet();
    let names = ["s0", "s1", "s2", "s3", "s4", "quiet"];
    issue_devices(&ca, &names);
    let train = embedded_train();
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 4,
        accept_failures: true,
        round_timeout: Duration::from_secs(120),
        train: task_config(),
        seed: 3,
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial_2nn(1)).unwrap();
    let settings = settings(3, None);
    coordinator.set_secure_aggregation(settings).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let mut clients = Vec::new();
    for (k, name) in names[..5].iter().enumerate() {
        let (link, _) = join(addr, &ca, name, growing_slice(k).len() as u64).await;
        clients.push(spawn_client(link, &train, growing_slice(k), 1, k as u64).1);
    }
    // A device that says it is ready and is never heard from again.
    let (quiet, _) = join(addr, &ca, "quiet", 50).await;

    let (_, global0) = coordinator.global();
    coordinator.start_rounds(1);
    let task = fedge_tests::harness::task_of(&quiet).await;
    assert_eq!(task.secure.map(|s| s.weight_cap), Some(200), "the task says the round is secure");
    // Its plain upload is refused: nothing leaves a device unmasked in a secure round.
    let plain = TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: 50,
        train_loss: 1.0,
        delta: ModelParams::zeros(global0.layout().clone()),
        clipped: false,
    };
    match quiet.request(&Message::TrainResult(plain)).await.unwrap() {
        Message::Error { code: ErrorCode::InvalidUpdate, message } => assert!(message.contains("secure"), "{message}"),
        other => panic!("{other:?}"),
    }
    let ready = Message::SecureReady { round: task.round, model_version: task.model_version, members: None };
    assert!(matches!(quiet.request(&ready).await.unwrap(), Message::Ack { .. }));
    assert!(matches!(quiet.request(&ready).await.unwrap(), Message::Error { code: ErrorCode::Duplicate, .. }));
    // Operators see the session wait at its first stage for the silent device.
    let started = std::time::Instant::now();
    let line = loop {
        let status = coordinator.status();
        match status.secure.clone() {
            Some(l) if l.stage == "advertise" && l.answered == 5 => break (l, status),
            // Still training, or advertising: the stage closes 3 s after it opened.
            Some(l)
                if (l.stage == "ready" || l.stage == "advertise") && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((line.0.round, line.0.participants), (1, 6));
    let mut text = Vec::new();
    fedge_coordinator::print::print_status(&mut text, &line.1, false).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("secure aggregation: round 1 stage advertise: 5 of 6 devices answered"), "{text}");
    assert_eq!(fedge_coordinator::print::status_json(&line.1)["secure"]["stage"], "advertise");

    tokio::time::timeout(Duration::from_secs(60), coordinator.wait_for_rounds(1)).await.expect("round 1 closes");
    assert!(coordinator.status().secure.is_none(), "no round is open");
    let report = &coordinator.reports()[0];
    let (want, samples) = fedavg(&global0, 5, &train);
    assert_eq!(report.outcome, RoundOutcome::Aggregated);
    assert_eq!((report.results, report.failures, report.samples), (5, 1, samples));
    assert!(report.train_loss.is_nan(), "no device's loss is revealed");
    let (v1, global1) = coordinator.global();
    assert_eq!(v1, 1);
    let diff = global1.data().iter().zip(want.data()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // Stochastic rounding to steps of 2^-20 of five weighted inputs, divided by their weight.
    assert!(diff < 1e-4, "the secure round's model is {diff} from the FedAvg of its five devices");
    // The silent device learns that it is not in the sum.
    match quiet.request(&Message::SecurePoll { round: 1, member: None }).await.unwrap() {
        Message::SecureStep { step: fedge_secagg::ServerMessage::Finished { summed: false }, .. } => {}
        other => panic!("{other:?}"),
    }
    server.abort();
    for c in clients {
        c.abort();
    }
    let _: Arc<Coordinator> = coordinator;
}

/// What needs each update, or acts on each one, refuses secure aggregation at start.
#[test]
fn robust_rules_central_dp_and_fedbuff_refuse_secure_aggregation() {
    let settings = settings(3, None);
    let median = EngineConfig {
        strategy: fedge_engine::StrategyConfig::Median { bucket_size: 1 },
        train: task_config(),
        ..EngineConfig::default()
    };
    let e = Coordinator::new(median, initial_2nn(1)).unwrap().set_secure_aggregation(settings).unwrap_err();
    assert!(e.contains("needs every update"), "{e}");
    let keys = fedge_tests::harness::dp_keys(10, 0.05, 1.0);
    let dp = EngineConfig { train: keys.train(), privacy: keys.central_dp(), ..EngineConfig::default() };
    let e = Coordinator::new(dp, initial_2nn(1)).unwrap().set_secure_aggregation(settings).unwrap_err();
    assert!(e.contains("central DP"), "{e}");
    let plain = Coordinator::new(EngineConfig { train: task_config(), ..EngineConfig::default() }, initial_2nn(1));
    plain.unwrap().set_secure_aggregation(settings).unwrap();
}

/// Distributed DP over the wire: each of five devices adds N(0, (z C / 2)^2) (any `n_min = 4`
/// shares make `z C`) before masking; the coordinator divides the sum by the five selected,
/// and its ledger charges what the five shares carry, `z sqrt(5/4)`. The model moved by the
/// mean of the clipped updates plus noise of exactly that size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_over_the_wire_noises_the_sum_as_configured() {
    let (_dir, ca) = fleet();
    let names = ["d0", "d1", "d2", "d3", "d4"];
    issue_devices(&ca, &names);
    let train = embedded_train();
    let z = 0.5;
    let keys = fedge_tests::harness::dp_keys(200, 0.1, z);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 5,
        accept_failures: true,
        round_timeout: Duration::from_secs(120),
        train: keys.train(),
        privacy: keys.central_dp(),
        distributed_dp: true,
        seed: 3,
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial_2nn(1)).unwrap();
    let noise = fedge_secagg::weighting::DistributedNoise { noise_multiplier: z, dropout_tolerance: 0.2 };
    let settings = settings(10, Some(noise));
    coordinator.set_secure_aggregation(settings).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let mut clients = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let (link, _) = join(addr, &ca, name, growing_slice(k).len() as u64).await;
        clients.push(spawn_client(link, &train, growing_slice(k), 1, k as u64).1);
    }
    let (_, global0) = coordinator.global();
    coordinator.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(60), coordinator.wait_for_rounds(1)).await.expect("round 1 closes");
    let report = &coordinator.reports()[0];
    assert_eq!((report.outcome.clone(), report.results), (RoundOutcome::Aggregated, 5));
    let charged = report.privacy.expect("the ledger charged the round");
    let carried = z * (5.0f64 / 4.0).sqrt();
    assert!((charged.noise_multiplier - carried).abs() < 1e-9, "{charged:?}");
    assert!(charged.epsilon > 0.0 && charged.epsilon.is_finite());
    // The clean part: the five clipped updates, each weighing 1, over the five selected.
    let task = TrainTask {
        round: 1,
        model_version: 0,
        model_hash: global0.content_hash(),
        config: keys.train(),
        secure: None,
    };
    let mut clean = vec![0f64; global0.numel()];
    for r in device_updates(&global0, &task, &train, 5) {
        for (c, d) in clean.iter_mut().zip(r.delta.data()) {
            *c += f64::from(*d) / 5.0;
        }
    }
    let (_, global1) = coordinator.global();
    let residual: Vec<f64> = global1
        .data()
        .iter()
        .zip(global0.data())
        .zip(&clean)
        .map(|((g1, g0), c)| f64::from(*g1) - f64::from(*g0) - c)
        .collect();
    let n = residual.len() as f64;
    let mean = residual.iter().sum::<f64>() / n;
    let std = (residual.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n).sqrt();
    // N(0, (z C sqrt(5/4) / 5)^2) a coordinate: 199,210 of them pin it to well within 2%.
    let want = carried * 1.0 / 5.0;
    assert!((std / want - 1.0).abs() < 0.02, "noise std {std}, want {want}");
    assert!(mean.abs() < 5.0 * want / n.sqrt(), "noise mean {mean}");
    server.abort();
    for c in clients {
        c.abort();
    }
}

/// A round whose ready phase ends with one device ready cannot sum anything: it fails, and the
/// ready device learns it was not summed instead of waiting for a session that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ready_device_is_told_the_round_went_without_it() {
    let (_dir, ca) = fleet();
    issue_devices(&ca, &["r0", "r1"]);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        accept_failures: true,
        round_timeout: Duration::from_secs(14),
        train: task_config(),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial_2nn(1)).unwrap();
    let settings = settings(3, None);
    coordinator.set_secure_aggregation(settings).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let (ready, _) = join(addr, &ca, "r0", 50).await;
    let (_idle, _) = join(addr, &ca, "r1", 50).await;
    coordinator.start_rounds(1);
    let task = fedge_tests::harness::task_of(&ready).await;
    let hello = Message::SecureReady { round: task.round, model_version: task.model_version, members: None };
    assert!(matches!(ready.request(&hello).await.unwrap(), Message::Ack { .. }));
    let poll = Message::SecurePoll { round: task.round, member: None };
    assert!(matches!(
        ready.request(&poll).await.unwrap(),
        Message::SecureStep { step: fedge_secagg::ServerMessage::Wait, .. }
    ));
    // The ready phase ends 4 x 3 s before the 14 s deadline, with one device ready.
    let started = std::time::Instant::now();
    loop {
        match ready.request(&poll).await.unwrap() {
            Message::SecureStep { step: fedge_secagg::ServerMessage::Finished { summed }, .. } => {
                assert!(!summed);
                break;
            }
            Message::SecureStep { step: fedge_secagg::ServerMessage::Wait, .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the ready phase never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), coordinator.wait_for_rounds(1)).await.expect("round 1 closes");
    assert!(matches!(coordinator.reports()[0].outcome, RoundOutcome::Failed(_)));
    server.abort();
}

/// A regional aggregator cannot join a secure coordinator: its mean is not a device's masked
/// update. It is refused at Hello, saying why; a relaying aggregator (a simulation shard, whose
/// devices enter the sum themselves) is welcome, a device certificate may not relay, and a
/// device may not enter members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_coordinator_refuses_aggregators_at_hello() {
    use fedge_coordinator::certs::Role;
    use fedge_edge::link::{ConnectError, DeviceTls, Link};
    let (_dir, ca) = fleet();
    let cert = ca.issue(Role::Aggregator, "east", 1).unwrap();
    let config = EngineConfig { train: task_config(), fraction: 1.0, ..EngineConfig::default() };
    let coordinator = Coordinator::new(config, initial_2nn(1));
    let coordinator = coordinator.unwrap();
    coordinator.set_secure_aggregation(settings(3, None)).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let link =
        Link::connect(addr, "localhost", &DeviceTls { ca: ca.ca_pem(), cert: cert.cert, key: cert.key }).await.unwrap();
    match link.hello(fedge_tests::harness::caps(0)).await {
        Err(ConnectError::Refused { code: ErrorCode::Unauthorized, message }) => {
            assert!(message.contains("aggregates securely"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(coordinator.devices().is_empty(), "a refused aggregator is not registered");
    let tls = |c: fedge_coordinator::certs::Issued| DeviceTls { ca: ca.ca_pem(), cert: c.cert, key: c.key };
    let shard =
        Link::connect(addr, "localhost", &tls(ca.issue(Role::Aggregator, "shard-0", 1).unwrap())).await.unwrap();
    shard
        .hello_for(fedge_tests::harness::caps(0), SessionPurpose::Relay)
        .await
        .expect("a relaying aggregator is welcome");
    let device = Link::connect(addr, "localhost", &tls(ca.issue(Role::Device, "d0", 1).unwrap())).await.unwrap();
    match device.hello_for(fedge_tests::harness::caps(10), SessionPurpose::Relay).await {
        Err(ConnectError::Refused { code: ErrorCode::Unauthorized, message }) => {
            assert!(message.contains("only an aggregator certificate relays"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // A device, training, tries to enter members: refused, whatever the round.
    let device = Link::connect(addr, "localhost", &tls(ca.issue(Role::Device, "d1", 1).unwrap())).await.unwrap();
    device.hello(fedge_tests::harness::caps(10)).await.unwrap();
    coordinator.start_rounds(1);
    let task = fedge_tests::harness::task_of(&device).await;
    let ready = Message::SecureReady { round: task.round, model_version: task.model_version, members: Some(vec![1]) };
    match device.request(&ready).await.unwrap() {
        Message::Error { code: ErrorCode::Malformed, message } => {
            assert!(message.contains("only a relaying aggregator enters members"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    server.abort();
}

/// A relaying aggregator enters tens of thousands of members in one `SecureReady` (the frame
/// once held only a few thousand); past `MAX_MEMBERS` it is refused by name, not by size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaying_aggregator_enters_tens_of_thousands_of_members_at_once() {
    use fedge_coordinator::certs::Role;
    use fedge_coordinator::server::MAX_MEMBERS;
    use fedge_edge::link::{DeviceTls, Link};
    let (_dir, ca) = fleet();
    let config = EngineConfig { train: task_config(), fraction: 1.0, ..EngineConfig::default() };
    let coordinator = Coordinator::new(config, initial_2nn(1)).unwrap();
    coordinator.set_secure_aggregation(settings(3, None)).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let cert = ca.issue(Role::Aggregator, "shard-0", 1).unwrap();
    let tls = DeviceTls { ca: ca.ca_pem(), cert: cert.cert, key: cert.key };
    let shard = Link::connect(addr, "localhost", &tls).await.unwrap();
    shard.hello_for(fedge_tests::harness::caps(0), SessionPurpose::Relay).await.unwrap();
    // A second participant, so that the session the members enter is a real one.
    ca.issue(Role::Device, "d0", 1).unwrap();
    let (device, _) = fedge_tests::harness::join(addr, &ca, "d0", 10).await;
    coordinator.start_rounds(1);
    let task = fedge_tests::harness::task_of(&shard).await;
    let _ = fedge_tests::harness::task_of(&device).await;
    let ready = |members: std::ops::Range<u64>| Message::SecureReady {
        round: task.round,
        model_version: task.model_version,
        members: Some(members.collect()),
    };
    let too_many = ready(0..MAX_MEMBERS as u64 + 1);
    assert!(fedge_core::codec::encode(&too_many).len() > fedge_net::SMALL_FRAME_BYTES);
    match shard.request(&too_many).await.unwrap() {
        Message::Error { code: ErrorCode::Malformed, message } => assert!(message.contains("at most"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Ids as a shard's devices' are: spread out, so that each takes several bytes.
    let members: Vec<u64> = (0..20_000u64).map(|i| i * 1_000_003).collect();
    let many = Message::SecureReady { round: task.round, model_version: task.model_version, members: Some(members) };
    assert!(fedge_core::codec::encode(&many).len() > fedge_net::SMALL_FRAME_BYTES);
    assert!(matches!(shard.request(&many).await.unwrap(), Message::Ack { .. }));
    let status = coordinator.status();
    let line = status.secure.expect("a secure round is open");
    assert_eq!(line.stage, "ready", "{line:?}");
    server.abort();
}
