//! Models for devices: signed students promoted, fetched, verified and run; rollback; the
//! registry across a restart.

use std::time::Duration;

use fedge_coordinator::server::Coordinator;
use fedge_core::dataset::embedded;
use fedge_core::wire::{Message, OperatorCommand};
use fedge_edge::EdgeTrainer;
use fedge_edge::work_loop::EdgeClient;
use fedge_engine::EngineConfig;
use fedge_learn::{BackendKind, ModelKind, Trainer};
use fedge_tests::harness::{
    embedded_train, fleet, initial_2nn, issue_devices, join, one_epoch, operator, serve, stop, until_all,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_students_reach_devices_signed_and_rollback_moves_them_back() {
    use fedge_coordinator::store::Store;
    use fedge_core::codec;
    use fedge_core::quant::QuantizedModel;
    use fedge_net::ModelKey;

    let (dir, ca) = fleet();
    let state = dir.path().join("state");
    let train = embedded_train();
    let initial = initial_2nn(1);
    let mut students = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
    let mut blob = |seed| codec::encode_value(&QuantizedModel::quantize(&students.initial_params(seed)));
    let (b1, b2, b3) = (blob(1), blob(2), blob(3));
    let config = EngineConfig { min_train_clients: 2, train: one_epoch(None), ..EngineConfig::default() };
    let names = ["dev-a", "dev-b"];
    issue_devices(&ca, &names);
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
    let operator = operator(addr, &ca, "alice").await;
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

    stop(&coordinator, server, clients).await;
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
    issue_devices(&ca, &["dev-c"]);
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
