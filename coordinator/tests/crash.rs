//! Crash safety, for real: a `fedge-coordinator serve` process is killed with SIGKILL in the
//! middle of a round and started again on the same state folder. The round resumes: updates
//! acknowledged before the kill are kept (and not counted twice), the device that had not
//! answered reconnects, gets the same task, and the round completes with exactly the model
//! the three updates define.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, model, task_of, update};
use fedge_core::wire::{ErrorCode, Message, TrainResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_loses_no_acknowledged_update() {
    let names = ["dev-0", "dev-1", "dev-2"];
    let fleet = Fleet::new(&names, 3);

    // First life: all three devices are selected; two upload and are acknowledged.
    let first = fleet.start();
    let links = fleet.join_all(&names, &first).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let mut tasks = Vec::new();
    for link in &links {
        tasks.push(task_of(link).await);
    }
    assert!(tasks.iter().all(|t| (t.round, t.model_version) == (1, 0)));
    let initial = model(&links[0], 0).await;
    let updates: Vec<TrainResult> = (0..3).map(|i| update(&tasks[i], &initial, i)).collect();
    for i in 0..2 {
        let reply = links[i].request(&Message::TrainResult(updates[i].clone())).await.unwrap();
        assert_eq!(reply, Message::Ack { round: 1 }, "{}", first.log());
    }
    first.kill();
    drop(links);

    // Second life, same state folder.
    let second = fleet.start();
    let links = fleet.join_all(&names, &second).await;
    assert!(second.log().contains("resumed round 1 with 2 of 3 updates"), "{}", second.log());
    // The acknowledged updates were kept: sending one again is a duplicate, not a second vote.
    match links[0].request(&Message::TrainResult(updates[0].clone())).await.unwrap() {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Duplicate),
        other => panic!("unexpected {other:?}"),
    }
    // Devices that answered get no task; the one that had not gets the same task again.
    assert!(matches!(links[1].request(&Message::TaskRequest { running: None }).await.unwrap(), Message::NoTask { .. }));
    assert_eq!(task_of(&links[2]).await, tasks[2]);
    let reply = links[2].request(&Message::TrainResult(updates[2].clone())).await.unwrap();
    assert_eq!(reply, Message::Ack { round: 1 });

    // The round completes from all three updates: v1 = v0 + (10*0.001 + 20*0.002 + 30*0.003) / 60.
    let deadline = Instant::now() + Duration::from_secs(30);
    let v1 = loop {
        match links[1].request(&Message::TaskRequest { running: None }).await.unwrap() {
            Message::NoTask { model_version: 1, .. } => break model(&links[1], 1).await,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("round 1 did not close: {other:?}\n{}", second.log()),
        }
    };
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003) / 60.0;
    for (a, b) in v1.data().iter().zip(initial.data()) {
        assert!((*a as f64 - (*b as f64 + step)).abs() < 1e-6, "{a} vs {b} + {step}");
    }
    let status: serde_json::Value = serde_json::from_str(&fleet.operator(&["round", "list", "--json"])).unwrap();
    assert_eq!(status[0]["round"], 1);
    assert_eq!(status[0]["model_version"], 1);
    assert_eq!(status[0]["devices_reporting"], 3);
}

/// Issue 13, one path for each update: an acknowledged update is stored as the very bytes the
/// device sent (the encoded `TrainResult` frame), not decoded and encoded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_stored_as_the_bytes_the_device_sent() {
    let names = ["dev-0", "dev-1"];
    let fleet = Fleet::new(&names, 2);
    let coordinator = fleet.start();
    let links = fleet.join_all(&names, &coordinator).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let task = task_of(&links[0]).await;
    let sent = Message::TrainResult(update(&task, &model(&links[0], task.model_version).await, 0));
    let reply = links[0].request(&sent).await.unwrap();
    assert_eq!(reply, Message::Ack { round: task.round }, "{}", coordinator.log());
    coordinator.kill();
    drop(links);

    let store = fedge_coordinator::store::Store::open(&fleet.state).unwrap();
    let id = store.devices().unwrap().into_iter().find(|(name, _)| name == "dev-0").unwrap().1;
    let stored = store.update_bytes(task.round, id).unwrap().expect("the acknowledged update is stored");
    assert_eq!(stored, fedge_core::codec::encode(&sent));
}

/// Issue 14: a kill between a round's close and its follow-up (evaluation, distillation) no
/// longer loses them for good: the restarted coordinator finds the latest version without its
/// student (or evaluation) and finishes it. Killed right after the round's last update is
/// acknowledged (its close is durable by then), long before a distillation can finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_right_after_a_close_still_gets_its_evaluation_and_student() {
    let names = ["dev-0", "dev-1"];
    let fleet = Fleet::new(&names, 2);
    fleet.configure("distill_every = 1\nproxy_examples = 200\n[distill]\nepochs = 1\n");
    let first = fleet.start();
    let links = fleet.join_all(&names, &first).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let tasks = [task_of(&links[0]).await, task_of(&links[1]).await];
    let initial = model(&links[0], 0).await;
    for (i, task) in tasks.iter().enumerate() {
        let reply = links[i].request(&Message::TrainResult(update(task, &initial, i))).await.unwrap();
        assert_eq!(reply, Message::Ack { round: 1 }, "{}", first.log());
    }
    first.kill();
    drop(links);
    let before = fedge_coordinator::store::Store::open(&fleet.state).unwrap();
    assert!(
        before.registry().unwrap().iter().all(|r| r.role != fedge_core::registry::ModelRole::Student),
        "the kill came after the student was registered: nothing to test"
    );
    drop(before);

    let second = fleet.start();
    let _link = fleet.join("dev-0", &second).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let models: serde_json::Value = serde_json::from_str(&fleet.operator(&["models", "list", "--json"])).unwrap();
        let models = models.as_array().unwrap();
        let v1 = models.iter().find(|m| m["version"] == 1 && m["role"] == "global");
        let student = models.iter().find(|m| m["role"] == "student" && m["parent"] == 1);
        if let (Some(v1), Some(student)) = (v1, student) {
            assert!(v1["accuracy"].as_f64().is_some(), "{v1}");
            assert!(student["signed"] == true && student["accuracy"].as_f64().is_some(), "{student}");
            break;
        }
        assert!(Instant::now() < deadline, "no student of v1 after the restart\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(second.log().contains("finishing what a restart interrupted for v1"), "{}", second.log());
}

/// Issue 20: `[distill] sparsity` prunes the coordinator's students. A real `serve` process
/// distils after one round with 80% of the student's weights pruned; the registered student is
/// signed, encoded sparse (well under the dense MLP's 102,964 bytes) and said to be pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_ships_pruned_students_when_told_to() {
    let names = ["dev-0", "dev-1"];
    let fleet = Fleet::new(&names, 2);
    fleet.configure("distill_every = 1\nproxy_examples = 200\n[distill]\nepochs = 3\nsparsity = 0.8\n");
    let coordinator = fleet.start();
    let links = fleet.join_all(&names, &coordinator).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let tasks = [task_of(&links[0]).await, task_of(&links[1]).await];
    let initial = model(&links[0], 0).await;
    for (i, task) in tasks.iter().enumerate() {
        let reply = links[i].request(&Message::TrainResult(update(task, &initial, i))).await.unwrap();
        assert_eq!(reply, Message::Ack { round: 1 }, "{}", coordinator.log());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let student = loop {
        let models: serde_json::Value = serde_json::from_str(&fleet.operator(&["models", "list", "--json"])).unwrap();
        if let Some(s) = models.as_array().unwrap().iter().find(|m| m["role"] == "student") {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "no student\n{}", coordinator.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(student["signed"] == true, "{student}");
    let bytes = student["size_bytes"].as_u64().unwrap();
    assert!(bytes < 60_000, "a student pruned to 80% takes {bytes} bytes");
    assert!(coordinator.log().contains("int8, 80% pruned"), "{}", coordinator.log());
}
