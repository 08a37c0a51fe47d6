//! Central differential privacy in the running system: the ledger shown, stamped on models,
//! enforced, and rebuilt after a restart.

use std::time::Duration;

use fedge_coordinator::certs::Role;
use fedge_coordinator::server::Coordinator;
use fedge_core::wire::{Message, OperatorCommand};
use fedge_engine::EngineConfig;
use fedge_tests::harness::{embedded_train, fleet, initial_2nn, issue_devices, one_epoch, serve, spawn_devices, stop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_ledger_is_shown_stamped_enforced_and_survives_a_restart() {
    use fedge_coordinator::store::Store;
    use fedge_core::privacy::epsilon;
    use fedge_engine::CentralDp;

    let (dir, ca) = fleet();
    let state = dir.path().join("state");
    let train = embedded_train();
    let initial = initial_2nn(1);
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
    issue_devices(&ca, &names);
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
        let clients = spawn_devices(addr, &ca, &names, &train).await;
        let operator = fedge_net::RequestClient::connect(addr, "localhost", op_config.clone()).await.unwrap();
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
        stop(&coordinator, server, clients).await;
    }

    // After a restart the ledger is rebuilt from the stored rounds: the budget still binds.
    let coordinator = Coordinator::with_store(config, initial, Store::open(&state).unwrap()).unwrap();
    let p = coordinator.status().privacy.unwrap();
    assert!((p.epsilon - two).abs() < 1e-12);
    let (addr, server) = serve(&coordinator, &ca);
    let clients = spawn_devices(addr, &ca, &names, &train).await;
    let operator = fedge_net::RequestClient::connect(addr, "localhost", op_config).await.unwrap();
    match operator.request(&start(1)).await.unwrap() {
        Message::Error { message, .. } => assert!(message.contains("privacy budget"), "{message}"),
        other => panic!("{other:?}"),
    }
    server.abort();
    for c in clients {
        c.abort();
    }
}
