//! FedBuff in the coordinator: buffered asynchronous aggregation over QUIC, its open buffer
//! surviving a restart.

use std::time::Duration;

use fedge_coordinator::server::Coordinator;
use fedge_coordinator::store::Store;
use fedge_core::wire::{Message, TrainResult};
use fedge_engine::RoundOutcome;
use fedge_engine::buffered::{AsyncConfig, StalenessWeight};
use fedge_tests::harness::{
    embedded_train, fleet, initial_2nn, issue_devices, join, one_epoch, serve, spawn_devices, stop,
};

/// FedBuff with buffers of two results, at most three devices training, staleness up to 10.
fn buffers_of_two(staleness: StalenessWeight) -> AsyncConfig {
    AsyncConfig {
        buffer_size: 2,
        max_concurrency: 3,
        max_staleness: 10,
        staleness,
        train: one_epoch(None),
        seed: 1,
        ..AsyncConfig::default()
    }
}

/// A FedBuff coordinator on the state folder `state` (a fresh 2NN of seed 1 when it holds none).
fn fedbuff_on(state: &std::path::Path, config: AsyncConfig) -> std::sync::Arc<Coordinator> {
    Coordinator::with_store_fedbuff(config, Duration::from_secs(60), initial_2nn(1), Store::open(state).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_aggregates_every_k_results_and_its_open_buffer_survives_a_restart() {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["dev-a", "dev-b", "dev-c", "probe"]);
    let train = embedded_train();
    let state = dir.path().join("state");
    let config = buffers_of_two(StalenessWeight::Polynomial { exponent: 0.5 });
    let start = |config: AsyncConfig| fedbuff_on(&state, config);

    // Three devices, three aggregations of two results each: each a new version.
    let coordinator = start(config.clone());
    let (addr, server) = serve(&coordinator, &ca);
    let clients = spawn_devices(addr, &ca, &["dev-a", "dev-b", "dev-c"], &train).await;
    coordinator.start_rounds(3);
    tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(3)).await.expect("3 aggregations");
    let reports = coordinator.reports();
    assert_eq!(
        reports.iter().map(|r| (r.round, r.model_version, r.results)).collect::<Vec<_>>(),
        [(1, 1, 2), (2, 2, 2), (3, 3, 2)]
    );
    assert!(reports.iter().all(|r| r.outcome == RoundOutcome::Aggregated));
    let status = coordinator.status();
    assert_eq!((status.model_version, status.rounds_left), (3, 0));
    // No more aggregations were asked for: no new task, and the next buffer holds nothing yet.
    let open = status.open_round.expect("the open buffer");
    assert_eq!((open.round, open.wanted, open.reporting), (4, 2, 0));
    // A distilled student takes the next version number; the next global version skips it.
    let student = fedge_coordinator::server::NewStudent {
        parent: 3,
        round: 3,
        architecture: "mlp".into(),
        parameters: 101_770,
        accuracy: None,
        latency_us: None,
        blob: b"a student's blob".to_vec(),
    };
    assert_eq!(coordinator.register_student(student, false).await.unwrap().version, 4);
    stop(&coordinator, server, clients).await;
    drop(coordinator);

    // One result acknowledged into buffer 4, then the coordinator goes away.
    let coordinator = start(config.clone());
    let (addr, server) = serve(&coordinator, &ca);
    let (link, _) = join(addr, &ca, "probe", 100).await;
    coordinator.start_rounds(1);
    let next_task = || fedge_tests::harness::task_of(&link);
    let first = next_task().await;
    assert_eq!(first.model_version, 3);
    // An invalid result ends its task: the device is handed a new one, not the old again.
    let mut nan = fedge_core::ModelParams::zeros(initial_2nn(1).layout().clone());
    nan.data_mut()[0] = f32::NAN;
    let bad = TrainResult {
        round: first.round,
        model_version: 3,
        num_samples: 10,
        train_loss: 0.3,
        delta: nan,
        clipped: false,
    };
    assert!(matches!(link.request(&Message::TrainResult(bad)).await.unwrap(), Message::Error { .. }));
    let task = next_task().await;
    assert_ne!(task.round, first.round, "the refused task is not handed out again");
    let zero = fedge_core::ModelParams::zeros(initial_2nn(1).layout().clone());
    let result = TrainResult {
        round: task.round,
        model_version: 3,
        num_samples: 10,
        train_loss: 0.3,
        delta: zero,
        clipped: false,
    };
    assert!(matches!(link.request(&Message::TrainResult(result.clone())).await.unwrap(), Message::Ack { .. }));
    // One result per device per buffer: the probe gets no second task.
    assert!(matches!(link.request(&Message::TaskRequest { running: None }).await.unwrap(), Message::NoTask { .. }));
    link.connection.close(0u32.into(), b"bye");
    drop(link);
    stop(&coordinator, server, Vec::new()).await;
    drop(coordinator);

    // Restarted: the buffer comes back with the probe's result; one more device completes it
    // into version 5 (4 is the student's, still taken after the restart).
    let coordinator = start(config);
    let status = coordinator.status();
    let open = status.open_round.expect("the open buffer");
    assert_eq!((status.model_version, status.rounds_left, open.round, open.reporting), (3, 1, 4, 1));
    let (addr, server) = serve(&coordinator, &ca);
    let clients = spawn_devices(addr, &ca, &["dev-a"], &train).await;
    tokio::time::timeout(Duration::from_secs(60), coordinator.wait_for_rounds(1)).await.expect("aggregation 4");
    let r = &coordinator.reports()[0];
    assert_eq!((r.round, r.model_version, r.results, &r.outcome), (4, 5, 2, &RoundOutcome::Aggregated));
    assert_eq!(coordinator.status().rounds.len(), 4, "every aggregation is in the history");
    stop(&coordinator, server, clients).await;
}

/// A result acknowledged into the next buffer right after an aggregation survives a restart;
/// and a stored buffered result the restarted coordinator's configuration refuses (here:
/// `max_staleness` lowered between runs) is dropped with a warning, and forgotten: the
/// coordinator starts, the buffer resumes without it, and a later start does not see it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_result_the_new_configuration_refuses_is_dropped_not_the_start() {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["late", "b", "c"]);
    let state = dir.path().join("state");
    let config = buffers_of_two(StalenessWeight::Constant);
    let start = |config: AsyncConfig| fedbuff_on(&state, config);
    let coordinator = start(config.clone());
    let (addr, server) = serve(&coordinator, &ca);
    let mut links = Vec::new();
    for name in ["late", "b", "c"] {
        links.push(join(addr, &ca, name, 10).await.0);
    }
    coordinator.start_rounds(2);
    let task_of = |i: usize| fedge_tests::harness::task_of(&links[i]);
    let tasks = [task_of(0).await, task_of(1).await, task_of(2).await];
    assert!(tasks.iter().all(|t| t.model_version == 0));
    let zero = || fedge_core::ModelParams::zeros(initial_2nn(1).layout().clone());
    let result = |t: &fedge_core::wire::TrainTask| TrainResult {
        round: t.round,
        model_version: t.model_version,
        num_samples: 10,
        train_loss: 0.3,
        delta: zero(),
        clipped: false,
    };
    // b and c fill buffer 1 (version 1); late's result, trained on v0, lands in buffer 2.
    for i in [1, 2, 0] {
        let reply = links[i].request(&Message::TrainResult(result(&tasks[i]))).await.unwrap();
        assert!(matches!(reply, Message::Ack { .. }), "{reply:?}");
    }
    let open = coordinator.status().open_round.unwrap();
    assert_eq!((coordinator.status().model_version, open.round, open.reporting), (1, 2, 1));
    for link in links {
        link.connection.close(0u32.into(), b"bye");
    }
    stop(&coordinator, server, Vec::new()).await;
    drop(coordinator);

    // Restarted as it was: late's acknowledged result is back in buffer 2 (the buffer was
    // recorded before buffer 1's close was written, and that close must not erase it).
    let coordinator = start(config.clone());
    let open = coordinator.status().open_round.unwrap();
    assert_eq!((open.round, open.reporting), (2, 1), "an acknowledged result survives the restart");
    drop(coordinator);

    // Restarted with max_staleness 0: late's result (staleness 1) is dropped, the start is not.
    let coordinator = start(AsyncConfig { max_staleness: 0, ..config.clone() });
    let status = coordinator.status();
    let open = status.open_round.unwrap();
    assert_eq!((status.model_version, open.round, open.reporting), (1, 2, 0));
    drop(coordinator);
    // And forgotten: with the old setting back it does not return.
    let coordinator = start(config);
    let open = coordinator.status().open_round.unwrap();
    assert_eq!((open.round, open.reporting), (2, 0));
}
