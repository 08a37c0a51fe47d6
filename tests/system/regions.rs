//! Hierarchical aggregation over QUIC: a root, two regional aggregators (coordinators with an
//! upstream, joined with aggregator certificates) and six devices. The global model equals the
//! flat FedAvg of the same six updates, round after round. (A region killed with SIGKILL
//! mid-round: `coordinator/tests/regions.rs`, with real processes.)

use std::sync::Arc;
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::server::{Coordinator, Upstream};
use fedge_coordinator::store::Store;
use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::wire::{ErrorCode, Message, OperatorCommand, TrainConfig, TrainTask};
use fedge_edge::EdgeTrainer;
use fedge_engine::{EngineConfig, RoundOutcome};
use fedge_learn::{BackendKind, ModelKind};
use fedge_tests::harness::{
    ClientTask, device_updates, embedded_train, fleet, growing_slice, initial_2nn, issue_devices, join, operator,
    serve, spawn_client,
};

/// One full-batch step: a device's update does not depend on the order of its examples, so the
/// flat reference below matches the fleet's to float rounding.
fn task_config() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 200,
        learning_rate: 0.1,
        clip_norm: Some(5.0),
        local_dp: None,
        proximal_mu: None,
    }
}

/// `global` plus the sample-weighted mean of the six devices' updates on task `round`, each
/// trained here as a device would.
fn flat_fedavg(global: &ModelParams, round: u64, version: u64, train: &Dataset) -> (ModelParams, u64) {
    let task = TrainTask {
        round,
        model_version: version,
        model_hash: global.content_hash(),
        config: task_config(),
        secure: None,
    };
    let (mut sum, mut samples) = (vec![0f64; global.numel()], 0u64);
    for r in device_updates(global, &task, train, 6) {
        for (s, d) in sum.iter_mut().zip(r.delta.data()) {
            *s += f64::from(*d) * r.num_samples as f64;
        }
        samples += r.num_samples;
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / samples as f64) as f32).collect();
    let mut next = global.clone();
    next.add_scaled(&ModelParams::new(global.layout().clone(), mean).unwrap(), 1.0).unwrap();
    (next, samples)
}

/// A coordinator with default settings on state folder `dir/name`, starting from a 2NN of `seed`.
fn plain(dir: &std::path::Path, name: &str, seed: u64) -> Arc<Coordinator> {
    Coordinator::with_store(EngineConfig::default(), initial_2nn(seed), Store::open(&dir.join(name)).unwrap()).unwrap()
}

/// The root at `root` as aggregator `name` (its certificate issued by `ca`) reaches it.
fn upstream_of(ca: &CertDir, name: &str, root: std::net::SocketAddr) -> Upstream {
    let cert = ca.dir().join(format!("aggregators/{name}"));
    Upstream::new(root, "localhost", &ca.ca_pem(), &cert.with_extension("pem"), &cert.with_extension("key")).unwrap()
}

/// The fleet's model-signing key.
fn model_key(ca: &CertDir) -> fedge_net::ModelKey {
    fedge_net::ModelKey::read(&ca.dir().join("model-signing.pub")).unwrap()
}

fn max_abs_diff(a: &ModelParams, b: &ModelParams) -> f32 {
    a.data().iter().zip(b.data()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A region: a coordinator on its own state, with the region's own settings (which the root's
/// task overrides for training), served and following `root`.
struct Region {
    coordinator: Arc<Coordinator>,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

fn start_region(name: &str, dir: &std::path::Path, ca: &CertDir, root: std::net::SocketAddr) -> Region {
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 3,
        round_timeout: Duration::from_secs(90),
        // Not the root's: its tasks' settings are the ones devices train with.
        train: TrainConfig { learning_rate: 0.01, batch_size: 5, ..task_config() },
        seed: 3,
        ..EngineConfig::default()
    };
    // Another starting model than the root's: the region adopts the root's.
    let coordinator = Coordinator::with_store(config, initial_2nn(99), Store::open(&dir.join(name)).unwrap()).unwrap();
    let (addr, server) = serve(&coordinator, ca);
    let follower = coordinator.follow_upstream(upstream_of(ca, name, root)).unwrap();
    Region { coordinator, addr, server, follower }
}

async fn devices(region: &Region, ca: &CertDir, names: &[(usize, &str)], train: &Arc<Dataset>) -> Vec<ClientTask> {
    let mut out = Vec::new();
    for (k, name) in names {
        let (link, _) = join(region.addr, ca, name, growing_slice(*k).len() as u64).await;
        out.push(spawn_client(link, train, growing_slice(*k), 1, *k as u64).1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_aggregate_exactly_like_a_flat_fleet() {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["a0", "a1", "a2", "b3", "b4", "b5"]);
    ca.issue(Role::Aggregator, "east", 1).unwrap();
    ca.issue(Role::Aggregator, "west", 1).unwrap();
    let train = embedded_train();
    let root_config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        accept_failures: false,
        round_timeout: Duration::from_secs(180),
        train: task_config(),
        // Far below a region's sample total: a region is not capped like a device.
        max_samples_per_result: 50,
        seed: 5,
        ..EngineConfig::default()
    };
    let root =
        Coordinator::with_store(root_config, initial_2nn(1), Store::open(&dir.path().join("root")).unwrap()).unwrap();
    let (root_addr, root_server) = serve(&root, &ca);
    let east = start_region("east", dir.path(), &ca, root_addr);
    let west = start_region("west", dir.path(), &ca, root_addr);
    let east_devices = devices(&east, &ca, &[(0, "a0"), (1, "a1"), (2, "a2")], &train).await;
    let west_devices = devices(&west, &ca, &[(3, "b3"), (4, "b4"), (5, "b5")], &train).await;

    // Round 1: each region runs a round among its three devices and uploads their mean.
    let (v0, global0) = root.global();
    root.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(120), root.wait_for_rounds(1)).await.expect("root round 1");
    let report = &root.reports()[0];
    let (want, samples) = flat_fedavg(&global0, 1, v0, &train);
    assert_eq!((report.outcome.clone(), report.results, report.samples), (RoundOutcome::Aggregated, 2, samples));
    assert_eq!(samples, (0..6).map(|k| growing_slice(k).len() as u64).sum::<u64>());
    let (v1, global1) = root.global();
    assert_eq!(v1, 1);
    let diff = max_abs_diff(&global1, &want);
    assert!(diff < 1e-5, "the hierarchical model is {diff} away from the flat FedAvg");
    // Each region ran one round of three results on the root's model (adopted as its v1).
    for region in [&east, &west] {
        let r = region.coordinator.reports();
        assert_eq!(r.iter().map(|r| (r.round, r.model_version, r.results)).collect::<Vec<_>>(), [(1, 2, 3)]);
    }
    // The root lists the regions under their role's name.
    let names: Vec<String> = root.devices().into_iter().map(|d| d.id).collect();
    assert_eq!(names, ["aggregator:east", "aggregator:west"]);
    // A region's rounds are its root's: an operator cannot start one there.
    let op = operator(east.addr, &ca, "ops").await;
    let start =
        OperatorCommand::StartRounds { rounds: 1, fraction: None, min_train_clients: None, deadline_secs: None };
    match op.request(&Message::Operator(start)).await.unwrap() {
        Message::Error { code: ErrorCode::Malformed, message } => assert!(message.contains("regional aggregator")),
        other => panic!("{other:?}"),
    }
    op.close().await;

    // Round 2, from the new global model: the same equality.
    root.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(120), root.wait_for_rounds(2)).await.expect("root round 2");
    let report = &root.reports()[1];
    let (want, samples) = flat_fedavg(&global1, 2, v1, &train);
    assert_eq!((report.outcome.clone(), report.results, report.samples), (RoundOutcome::Aggregated, 2, samples));
    let (v2, global2) = root.global();
    assert_eq!(v2, 2);
    let diff = max_abs_diff(&global2, &want);
    assert!(diff < 1e-5, "round 2: the hierarchical model is {diff} away from the flat FedAvg");

    for region in [east, west] {
        region.follower.abort();
        region.server.abort();
    }
    root_server.abort();
    for d in east_devices.into_iter().chain(west_devices) {
        d.abort();
    }
}

/// An aggregator may read its root's status (a sharded simulation's recorder takes the rounds'
/// training loss from it), and nothing else an operator may do; a device may not even read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_reads_the_roots_status_and_runs_no_operator_command() {
    use fedge_edge::link::{DeviceTls, Link};
    let (dir, ca) = fleet();
    let root = plain(dir.path(), "root", 1);
    let (addr, server) = serve(&root, &ca);
    let tls = |role, name: &str| {
        let cert = ca.issue(role, name, 1).unwrap();
        DeviceTls { ca: ca.ca_pem(), cert: cert.cert, key: cert.key }
    };
    let aggregator = Link::connect(addr, "localhost", &tls(Role::Aggregator, "shard-0")).await.unwrap();
    aggregator.hello(fedge_tests::harness::caps(0)).await.unwrap();
    match aggregator.request(&Message::Operator(OperatorCommand::Status)).await.unwrap() {
        Message::Status(s) => assert_eq!(s.devices_connected, ["aggregator:shard-0"]),
        other => panic!("{other:?}"),
    }
    let commands = [
        OperatorCommand::StartRounds { rounds: 1, fraction: None, min_train_clients: None, deadline_secs: None },
        OperatorCommand::Devices,
        OperatorCommand::Models,
        OperatorCommand::Rollback,
    ];
    for cmd in commands {
        let answer = aggregator.request(&Message::Operator(cmd.clone())).await.unwrap();
        assert!(matches!(answer, Message::Error { code: ErrorCode::Unauthorized, .. }), "{cmd:?}: {answer:?}");
    }
    let device = Link::connect(addr, "localhost", &tls(Role::Device, "dev-0")).await.unwrap();
    device.hello(fedge_tests::harness::caps(0)).await.unwrap();
    let answer = device.request(&Message::Operator(OperatorCommand::Status)).await.unwrap();
    assert!(matches!(answer, Message::Error { code: ErrorCode::Unauthorized, .. }), "{answer:?}");
    assert_eq!(root.status().rounds_left, 0, "nothing was started");
    server.abort();
}

/// A regional aggregator is refused at Hello, saying why, where its mean cannot be taken as one
/// participant: under central DP (noise calibrated to one device) and in FedBuff mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_under_central_dp_or_fedbuff_refuses_regions_at_hello() {
    use fedge_edge::link::{ConnectError, DeviceTls, Link};
    let (dir, ca) = fleet();
    let cert = ca.issue(Role::Aggregator, "east", 1).unwrap();
    let tls = DeviceTls { ca: ca.ca_pem(), cert: cert.cert, key: cert.key };
    let keys = fedge_tests::harness::dp_keys(10, 0.05, 1.0);
    let dp = EngineConfig { train: keys.train(), privacy: keys.central_dp(), ..EngineConfig::default() };
    let central = Coordinator::with_store(dp, initial_2nn(1), Store::open(&dir.path().join("dp")).unwrap()).unwrap();
    let fedbuff = Coordinator::with_store_fedbuff(
        fedge_engine::AsyncConfig { train: keys.train(), ..fedge_engine::AsyncConfig::default() },
        Duration::from_secs(60),
        initial_2nn(1),
        Store::open(&dir.path().join("fedbuff")).unwrap(),
    )
    .unwrap();
    for (root, why) in [(central, "central DP"), (fedbuff, "FedBuff")] {
        let (addr, server) = serve(&root, &ca);
        let link = Link::connect(addr, "localhost", &tls).await.unwrap();
        match link.hello(fedge_tests::harness::caps(0)).await {
            Err(ConnectError::Refused { code: ErrorCode::Unauthorized, message }) => {
                assert!(message.contains(why), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(root.devices().is_empty(), "a refused aggregator is not registered");
        server.abort();
    }
}

/// The region's medium-tier model for the three-tier test: a 2NN on the CPU.
struct TierPredictor(fedge_learn::Predictor);

impl fedge_coordinator::server::TierModel for TierPredictor {
    fn classify(&mut self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String> {
        Ok(self.0.predict_batch(images, 28, 28).into_iter().map(|p| p.probabilities).collect())
    }
}

/// Device -> region -> root: the region answers escalations with the regional model the root
/// registered (signed, fetched and verified over the region's aggregator link), its threshold
/// calibrated to send on 30% (first on its calibration images, then on its traffic), and passes
/// the root's answers on for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tiers_the_region_answers_what_it_is_sure_of_and_escalates_the_rest_to_the_root() {
    use fedge_coordinator::inference::InferenceConfig;
    use fedge_coordinator::server::{TierBuilder, TierConfig};
    use fedge_coordinator::service::BurnTeacher;
    use fedge_core::quant::QuantizedModel;
    use fedge_core::wire::{AnswerTier, InferRequest};
    use std::sync::atomic::Ordering;

    let (dir, ca) = fleet();
    issue_devices(&ca, &["phone"]);
    ca.issue(Role::Aggregator, "east", 1).unwrap();
    let test = fedge_core::dataset::embedded::mnist_subset().unwrap().test;
    let images: Vec<Vec<u8>> = (0..100).map(|i| test.image(i).to_vec()).collect();

    // The root: a teacher on its global model, and a regional 2NN in its registry.
    let root = plain(dir.path(), "root", 1);
    root.set_signer(ca.model_signer().unwrap(), "2nn");
    root.set_inference(InferenceConfig::default(), Box::new(BurnTeacher::new(ModelKind::TwoNn, 10, (28, 28))));
    let medium = initial_2nn(7);
    let blob = fedge_core::codec::encode_value(&QuantizedModel::quantize(&medium));
    let record = root.register_regional(distilled(&medium, blob)).await.unwrap();
    assert_eq!(record.role, fedge_core::registry::ModelRole::Regional);
    let (root_addr, root_server) = serve(&root, &ca);

    // The region: its tier calibrated on the same 100 images, at 30%.
    let region = plain(dir.path(), "east", 99);
    region.set_inference(InferenceConfig::default(), Box::new(BurnTeacher::new(ModelKind::TwoNn, 10, (28, 28))));
    let builder: TierBuilder = Box::new(|record, params| {
        assert_eq!(record.architecture, "2nn");
        let p = fedge_learn::Predictor::new(ModelKind::TwoNn, params, BackendKind::Flex).map_err(|e| e.to_string())?;
        Ok(Box::new(TierPredictor(p)) as Box<dyn fedge_coordinator::server::TierModel>)
    });
    let tier = TierConfig {
        escalate_rate: 0.3,
        measure: fedge_core::escalation::ConfidenceMeasure::MaxSoftmax,
        calibration: images.clone(),
        shape: (28, 28),
    };
    assert!(region.set_regional_tier(tier, builder).unwrap());
    let (region_addr, region_server) = serve(&region, &ca);
    let follower = region.follow_upstream(upstream_of(&ca, "east", root_addr).with_model_key(model_key(&ca))).unwrap();
    let (version, threshold) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(installed) = region.regional_model() {
                break installed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the region installs the root's regional model");
    assert_eq!(version, record.version);
    // The regional model's scores of the 100 images, computed here: the cold-start threshold is
    // the one that sends 30% of them on.
    let dequantised = QuantizedModel::quantize(&medium).dequantize().unwrap();
    let predictor = fedge_learn::Predictor::new(ModelKind::TwoNn, &dequantised, BackendKind::Flex).unwrap();
    let views: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let scores: Vec<f32> = predictor.predict_batch(&views, 28, 28).iter().map(|p| p.confidence).collect();
    let at_rate = fedge_core::escalation::calibrate_threshold(&scores, 0.3).unwrap();
    assert!((threshold - at_rate).abs() < 1e-5, "{threshold} vs {at_rate}");

    // A device escalates every image to its region. Its inference session is told the teacher
    // version in the root's numbering (here the regional model's, the newest the region knows),
    // not the region's own model version: what a device's answer cache follows.
    let (link, welcome) = join(region_addr, &ca, "phone", 10).await;
    assert_eq!(welcome.model_version, region.global().0, "a training session hears the region's own version");
    let inference =
        fedge_edge::link::Link::connect(region_addr, "localhost", &fedge_tests::harness::device_tls(&ca, "phone"))
            .await
            .unwrap();
    let welcome =
        inference.hello_for(fedge_tests::harness::caps(0), fedge_core::wire::SessionPurpose::Inference).await.unwrap();
    assert_eq!(welcome.model_version, record.version);
    let (mut here, mut up, mut escalated) = (0u64, 0u64, None);
    for (i, image) in images.iter().enumerate() {
        let request = InferRequest { rows: 28, cols: 28, pixels: image.clone() };
        match link.request(&Message::InferRequest(request)).await.unwrap() {
            Message::InferAnswer(a) if a.tier == AnswerTier::Region => {
                assert_eq!(a.model_version, record.version);
                assert!((a.confidence - scores[i]).abs() < 1e-5, "the regional model answered image {i}");
                // Before the threshold follows the traffic, the cold-start one decides.
                if i + 1 < fedge_coordinator::server::TRAFFIC_WARMUP && (scores[i] - threshold).abs() > 1e-5 {
                    assert!(scores[i] > threshold, "image {i} ({}) kept below {threshold}", scores[i]);
                }
                here += 1;
            }
            Message::InferAnswer(a) => {
                assert_eq!((a.tier, a.model_version), (AnswerTier::Root, 0));
                if i + 1 < fedge_coordinator::server::TRAFFIC_WARMUP && (scores[i] - threshold).abs() > 1e-5 {
                    assert!(scores[i] < threshold, "image {i} ({}) sent on above {threshold}", scores[i]);
                }
                up += 1;
                escalated.get_or_insert(i);
            }
            other => panic!("{other:?}"),
        }
    }
    // About 30 of the 100 go to the root, and the threshold now in force is the one the 100
    // requests' own scores give (the traffic window holds all of them).
    assert!((22..=38).contains(&up), "{up} of 100 escalated to the root");
    let (_, now) = region.regional_model().unwrap();
    assert!((now - at_rate).abs() < 1e-5, "the threshold follows the traffic: {now} vs {at_rate}");
    let counts = region.tier_counts().unwrap();
    assert_eq!((counts.answered.load(Ordering::Relaxed), counts.escalated.load(Ordering::Relaxed)), (here, up));
    assert_eq!(root.inference_counts().unwrap().answered.load(Ordering::Relaxed), up, "the root answered the rest");

    // Without the root the region's own answer stands, even for an image it is unsure of.
    root_server.abort();
    follower.abort();
    let _ = follower.await;
    let unsure = escalated.expect("some image escalated");
    let request = InferRequest { rows: 28, cols: 28, pixels: images[unsure].clone() };
    match link.request(&Message::InferRequest(request)).await.unwrap() {
        Message::InferAnswer(a) => assert_eq!((a.tier, a.model_version), (AnswerTier::Region, record.version)),
        other => panic!("{other:?}"),
    }
    assert_eq!(counts.escalation_failed.load(Ordering::Relaxed), 1);
    region_server.abort();
}

/// Devices behind a region deploy the root's students: the region relays the root's signed
/// promotion, with the student's record and blob, and a device connected only to the region
/// fetches, verifies (with the fleet's key: the root signed it) and runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_relays_the_roots_promoted_student_to_its_devices() {
    use fedge_core::quant::QuantizedModel;
    use fedge_edge::work_loop::EdgeClient;
    let (dir, ca) = fleet();
    issue_devices(&ca, &["phone"]);
    ca.issue(Role::Aggregator, "east", 1).unwrap();
    let root = plain(dir.path(), "root", 1);
    root.set_signer(ca.model_signer().unwrap(), "2nn");
    let (root_addr, root_server) = serve(&root, &ca);
    let region = plain(dir.path(), "east", 99);
    let (region_addr, region_server) = serve(&region, &ca);
    let follower = region.follow_upstream(upstream_of(&ca, "east", root_addr).with_model_key(model_key(&ca))).unwrap();

    // The root distils (here: registers) and promotes a student.
    let student = initial_2nn(5);
    let blob = fedge_core::codec::encode_value(&QuantizedModel::quantize(&student));
    let record = root.register_student(distilled(&student, blob), true).await.unwrap();

    // A device connected to the region only.
    let (link, _) = join(region_addr, &ca, "phone", 10).await;
    let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let mut client = EdgeClient::new(link, trainer, embedded_train(), (0..10).collect(), 1)
        .with_state_dir(dir.path().join("phone"))
        .with_model_key(model_key(&ca));
    let status = client.status();
    let device = tokio::spawn(async move { client.run(0).await });
    fedge_tests::harness::until_all(
        std::slice::from_ref(&status),
        "the root's student deployed behind the region",
        |s| s.deployed_version == Some(record.version),
    )
    .await;
    assert_eq!(status.lock().unwrap().deploy_error, None);
    // The region kept what it relays: it is in its registry, as the root signed it.
    let relayed = region.models().into_iter().find(|m| m.version == record.version).expect("relayed");
    assert!(relayed.signed && relayed.promoted, "{relayed:?}");

    device.abort();
    follower.abort();
    region_server.abort();
    root_server.abort();
}

/// A distilled model to register (a 2NN), from its parameters and blob.
fn distilled(params: &ModelParams, blob: Vec<u8>) -> fedge_coordinator::server::NewStudent {
    fedge_coordinator::server::NewStudent {
        parent: 0,
        round: 0,
        architecture: "2nn".into(),
        parameters: params.numel() as u64,
        accuracy: None,
        latency_us: None,
        blob,
    }
}

/// A region whose round outlives the root's (a silent device, a longer deadline) does not lose
/// the root: when the root has moved on to its next round, the region takes that task on as
/// soon as its own round has ended at its deadline, not before, and fetches the new model once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_takes_the_roots_next_task_once_its_own_late_round_ends() {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["silent"]);
    ca.issue(Role::Aggregator, "east", 1).unwrap();
    let quick = |seconds, min| EngineConfig {
        fraction: 1.0,
        min_train_clients: min,
        round_timeout: Duration::from_secs(seconds),
        accept_failures: false,
        ..EngineConfig::default()
    };
    let root =
        Coordinator::with_store(quick(5, 1), initial_2nn(1), Store::open(&dir.path().join("root")).unwrap()).unwrap();
    let (root_addr, root_server) = serve(&root, &ca);
    let region =
        Coordinator::with_store(quick(2, 1), initial_2nn(2), Store::open(&dir.path().join("east")).unwrap()).unwrap();
    let (region_addr, region_server) = serve(&region, &ca);
    let follower = region.follow_upstream(upstream_of(&ca, "east", root_addr)).unwrap();
    // A device that joins the region and never answers: the region's round runs to its deadline.
    let (_silent, _) = join(region_addr, &ca, "silent", 10).await;
    root.start_rounds(2);
    // The region's rounds for the root's round 1 fail at 2 s and 4 s (it tries again while the
    // task stands); the root's round 1 fails at 5 s, while the region's second try runs to 6 s;
    // then the region takes the root's round 2 on.
    let taken = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(u) = region.status().upstream
                && u.root_round == Some(2)
            {
                break u;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the region takes the root's round 2 on");
    assert!(!taken.uploaded);
    let lines = region.status().rounds;
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.failed_reason.is_some()),
        "its rounds for the first task ended at their own deadline before it took the next: {lines:?}"
    );
    let reports = root.reports();
    assert!(reports.first().is_some_and(|r| r.outcome != RoundOutcome::Aggregated), "nobody answered: {reports:?}");
    follower.abort();
    region_server.abort();
    root_server.abort();
}
