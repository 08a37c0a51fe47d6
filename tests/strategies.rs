//! Aggregation strategies in the running system: chosen by configuration, their server state
//! kept across a coordinator restart.

use std::time::Duration;

use fedge_coordinator::store::Store;
use fedge_engine::{EngineConfig, StrategyOptions};
use fedge_tests::harness::{fleet, issue_devices, life, one_epoch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedadam_moments_survive_a_coordinator_restart() {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["dev-a", "dev-b"]);
    let mut config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    config.set_strategy("fedadam", &StrategyOptions { server_lr: Some(0.01), ..StrategyOptions::default() }).unwrap();

    // Three rounds in one life...
    let straight = life(&config, &dir.path().join("a"), &ca, 3).await;
    // ...equal two rounds, a restart, and one more: the moments came back with version 2
    // (with fresh moments round 3 would take a different step).
    let b = dir.path().join("b");
    assert_eq!(life(&config, &b, &ca, 2).await.version, 2);
    let resumed = life(&config, &b, &ca, 1).await;
    assert_eq!((resumed.version, resumed.hash), (straight.version, straight.hash));

    // The same restart with the moments lost gives another model: the check can fail.
    let c = dir.path().join("c");
    life(&config, &c, &ca, 2).await;
    let db = redb_without_server_state(&c);
    drop(db);
    let forgetful = life(&config, &c, &ca, 1).await;
    assert_eq!(forgetful.version, 3);
    assert_ne!(forgetful.hash, straight.hash);
}

/// Deletes the saved server state from the store in `state` (as a coordinator built before
/// strategies kept any would have left it).
fn redb_without_server_state(state: &std::path::Path) -> Store {
    let store = Store::open(state).unwrap();
    store.forget_server_state().unwrap();
    store
}

#[test]
fn twenty_percent_sign_flip_attackers_break_fedavg_and_not_the_trimmed_mean() {
    use fedge_sim::attack::AttackKind;
    use fedge_sim::config::SimConfig;
    use fedge_sim::run::Quiet;
    // 20 devices, all in every round, 4 of them (20%) sending -5 x their honest update: the
    // attackers' pull outweighs the 16 honest devices' under FedAvg's mean; the trimmed mean
    // drops 20% from each side of every coordinate.
    let run = |strategy: &str, attack: bool| {
        let c = SimConfig {
            devices: 20,
            fraction: 1.0,
            rounds: 5,
            epochs: 1,
            workers: 2,
            seed: 1,
            strategy: strategy.into(),
            attack: attack.then_some(AttackKind::SignFlip),
            attackers: if attack { 0.2 } else { 0.0 },
            attack_scale: attack.then_some(5.0),
            ..SimConfig::default()
        };
        fedge_sim::run(&c, None, &mut Quiet).unwrap().summary.final_accuracy
    };
    let clean = run("fedavg", false);
    let fedavg = run("fedavg", true);
    let trimmed = run("trimmed-mean", true);
    let fltrust = run("fltrust", true);
    // Measured: clean 87.6%, FedAvg attacked 9.4% (chance), trimmed mean attacked 86.2%.
    assert!(clean > 0.8, "clean FedAvg {clean}");
    assert!(fedavg < 0.3, "FedAvg under attack {fedavg}");
    assert!(trimmed > clean - 0.05, "trimmed mean under attack {trimmed} vs clean {clean}");
    // FLTrust, its 100-example root set held out of the embedded training split.
    assert!(fltrust > clean - 0.05, "FLTrust under attack {fltrust} vs clean {clean}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fltrust_over_quic_gives_an_update_against_the_servers_reference_no_weight() {
    use fedge_coordinator::root_set::RootSet;
    use fedge_coordinator::server::{Coordinator, RootTrainer};
    use fedge_core::ModelParams;
    use fedge_core::wire::{Message, TrainResult};
    use fedge_learn::ModelKind;
    use fedge_tests::harness::{embedded_train, initial_2nn, join, serve, spawn_devices, stop};

    let (_dir, ca) = fleet();
    issue_devices(&ca, &["dev-a", "dev-b", "evil"]);
    let train = embedded_train();
    // The server's root set: 100 examples no device trains on (devices take 0..200).
    let root = || RootSet::new(ModelKind::TwoNn, train.clone(), (500..600).collect(), 7).unwrap();
    let initial = initial_2nn(1);
    // One round: two honest devices and one that sends `evil(reference)` (the reference the
    // server will train: the attacker knows the root set, the worst case).
    let round = |strategy: &'static str, evil: fn(&ModelParams) -> ModelParams| {
        let (train, ca, initial) = (train.clone(), &ca, initial.clone());
        async move {
            let mut config = EngineConfig {
                fraction: 1.0,
                min_train_clients: 3,
                round_timeout: Duration::from_secs(60),
                train: one_epoch(None),
                ..EngineConfig::default()
            };
            config.set_strategy(strategy, &StrategyOptions::default()).unwrap();
            let coordinator = Coordinator::new(config, initial.clone()).unwrap();
            if strategy == "fltrust" {
                assert!(coordinator.set_root_trainer(Box::new(root())));
                assert!(!coordinator.set_root_trainer(Box::new(root())), "one root trainer");
            }
            let (addr, server) = serve(&coordinator, ca);
            let (link, _) = join(addr, ca, "evil", 100).await;
            let clients = spawn_devices(addr, ca, &["dev-a", "dev-b"], &train).await;
            coordinator.start_rounds(1);
            let task = match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
                Message::TrainTask(t) => t,
                other => panic!("{other:?}"),
            };
            let reference = root().reference(0, &initial, &task.config).unwrap();
            let result = TrainResult {
                round: task.round,
                model_version: task.model_version,
                num_samples: 100,
                train_loss: 0.1,
                delta: evil(&reference),
                clipped: false,
            };
            assert!(matches!(link.request(&Message::TrainResult(result)).await.unwrap(), Message::Ack { .. }));
            tokio::time::timeout(Duration::from_secs(60), coordinator.wait_for_rounds(1)).await.expect("round 1");
            let (version, global) = coordinator.global();
            assert_eq!(version, 1, "{:?}", coordinator.reports());
            link.connection.close(0u32.into(), b"done");
            drop(link);
            stop(&coordinator, server, clients).await;
            let step = global.delta_from(&initial).unwrap();
            let cos = step.data().iter().zip(reference.data()).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                / (step.l2_norm() * reference.l2_norm());
            (step, cos)
        }
    };
    let flipped = |r: &ModelParams| {
        let mut d = r.clone();
        d.data_mut().iter_mut().for_each(|v| *v *= -5.0);
        d
    };
    let silent = |r: &ModelParams| ModelParams::zeros(r.layout().clone());
    let (against, cos) = round("fltrust", flipped).await;
    let (zero, _) = round("fltrust", silent).await;
    // The flipped, boosted update scored 0: the round is what it is with a zero update (which
    // has no direction and scores 0 too), and it moves the model the reference's way.
    let diff = against.data().iter().zip(zero.data()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-6, "the attacker moved FLTrust's step by {diff}");
    assert!(cos > 0.3, "FLTrust's step against the reference: cosine {cos}");
    // FedAvg takes the same update at face value and steps against the reference.
    let (_, fedavg_cos) = round("fedavg", flipped).await;
    assert!(fedavg_cos < 0.0, "FedAvg's step against the reference: cosine {fedavg_cos}");
}
