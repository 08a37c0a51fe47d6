//! Secure aggregation through a real `fedge-coordinator serve` process: a round's session is
//! cut by SIGKILL after its first stage; the coordinator, started again on its state folder,
//! resumes the round, its devices enter a new session with fresh keys, and the round closes
//! with the FedAvg of their updates, which the coordinator never saw one by one.

mod common;

use std::time::Duration;

use common::{Fleet, model, task_of, update, wait_for_version};
use fedge_core::wire::{Message, TrainTask};
use fedge_edge::link::Link;
use fedge_secagg::{ClientSession, ServerMessage};

/// Device `i` enters `task`'s update into the round's secure sum: ready, then polls and
/// answers until the session is over for it (or, with `stages`, until it has sent that many
/// stage messages). Returns whether it was summed.
async fn enter(link: &Link, task: &TrainTask, i: usize, like: &fedge_core::ModelParams, stages: usize) -> Option<bool> {
    let result = update(task, like, i);
    let secure = task.secure.expect("a secure task");
    let clip = task.config.clip_norm.expect("clip_norm");
    let input =
        fedge_secagg::weighting::weighted_input(result.delta.data(), result.num_samples, secure.weight_cap, clip);
    let ready = Message::SecureReady { round: task.round, model_version: task.model_version, members: None };
    assert!(matches!(link.request(&ready).await.unwrap(), Message::Ack { .. }));
    let mut session = ClientSession::new(input, [i as u8 + 1; 32]);
    let mut sent = 0;
    for _ in 0..2000 {
        let step = match link.request(&Message::SecurePoll { round: task.round, member: None }).await.unwrap() {
            Message::SecureStep { step, .. } => step,
            other => panic!("device {i}: {other:?}"),
        };
        let waiting = step == ServerMessage::Wait;
        if let Some(msg) = session.on(step).unwrap() {
            let reply = link.request(&Message::SecureSend { round: task.round, member: None, msg }).await.unwrap();
            assert!(matches!(reply, Message::Ack { .. }), "{reply:?}");
            sent += 1;
            if sent == stages {
                return None;
            }
        }
        if let Some(summed) = session.finished() {
            return Some(summed);
        }
        if waiting {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("the session never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_cut_by_sigkill_completes_after_a_restart() {
    let names = ["dev-0", "dev-1", "dev-2"];
    let fleet = Fleet::new(&names, 3);
    // Weights of 1/3, 2/3 and 1 (the devices have 10, 20, 30 examples): fine after quantising.
    fleet.configure("clip_norm = 10.0\nsecure_aggregation = true\nsecagg_stage_secs = 20\nsecagg_weight_cap = 30\n");

    // First life: every device advertises its keys, then the coordinator is killed.
    let mut first = fleet.start();
    let links = fleet.join_all(&names, &first).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let mut tasks = Vec::new();
    for link in &links {
        tasks.push(task_of(link).await);
    }
    assert!(tasks.iter().all(|t| t.secure.is_some_and(|s| s.weight_cap == 30)), "{tasks:?}");
    let initial = model(&links[0], 0).await;
    let cut = futures_join(&links, &tasks, &initial, 1).await;
    assert!(cut.iter().all(Option::is_none));
    assert!(first.log().contains("secure session of 3 participants"), "{}", first.log());
    first.sigkill();
    drop(links);

    // Second life: the round resumes with nothing stored of the session; each device has its
    // task again, trains (here: the same update) and enters a new session.
    let second = fleet.start();
    let links = fleet.join_all(&names, &second).await;
    assert!(second.log().contains("resumed round 1 with 0 of 3 updates"), "{}", second.log());
    let mut again = Vec::new();
    for link in &links {
        again.push(task_of(link).await);
    }
    assert_eq!(again, tasks);
    let summed = tokio::spawn({
        let (links, again, initial) = (links, again.clone(), initial.clone());
        async move { (futures_join(&links, &again, &initial, usize::MAX).await, links) }
    })
    .await;
    let (summed, links) = summed.unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    assert_eq!(summed, [Some(true); 3]);
    wait_for_version(&links[0], 1, Duration::from_secs(30), &second).await;
    let v1 = model(&links[0], 1).await;
    // v1 = v0 + (10*0.001 + 20*0.002 + 30*0.003) / 60, to quantisation (steps of 10/2^20).
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003) / 60.0;
    for (a, b) in v1.data().iter().zip(initial.data()) {
        assert!((*a as f64 - (*b as f64 + step)).abs() < 1e-4, "{a} vs {b} + {step}");
    }
    let rounds: serde_json::Value = serde_json::from_str(&fleet.operator(&["round", "list", "--json"])).unwrap();
    assert_eq!(rounds[0]["devices_reporting"], 3);
}

/// The three devices at once (a session's stages wait for all of them).
async fn futures_join(
    links: &[Link],
    tasks: &[TrainTask],
    like: &fedge_core::ModelParams,
    stages: usize,
) -> Vec<Option<bool>> {
    let (a, b, c) = tokio::join!(
        enter(&links[0], &tasks[0], 0, like, stages),
        enter(&links[1], &tasks[1], 1, like, stages),
        enter(&links[2], &tasks[2], 2, like, stages)
    );
    vec![a, b, c]
}

/// Devices dropping at later stages, through a real `serve` process: device 4 leaves after
/// sharing its keys (before its masked input: not summed, its pairwise masks removed with its
/// neighbours' shares), device 5 after sending its masked input (summed: its self mask is
/// rebuilt from its neighbours' shares). Each stage that waits for one of them closes at its
/// deadline, and the model is the FedAvg of devices 0 to 3 and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_dropping_at_later_stages_are_left_out_or_unmasked_by_their_neighbours() {
    let names = ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4", "dev-5"];
    let fleet = Fleet::new(&names, 4);
    let text =
        std::fs::read_to_string(&fleet.config).unwrap().replace("accept_failures = false", "accept_failures = true");
    std::fs::write(&fleet.config, text).unwrap();
    fleet.configure("clip_norm = 10.0\nsecure_aggregation = true\nsecagg_stage_secs = 2\nsecagg_weight_cap = 60\n");
    let coordinator = fleet.start();
    let links = fleet.join_all(&names, &coordinator).await;
    fleet.operator(&["round", "start", "--rounds", "1"]);
    let mut tasks = Vec::new();
    for link in &links {
        tasks.push(task_of(link).await);
    }
    let initial = model(&links[0], 0).await;
    // Stage messages each sends before going quiet: all four, all four, ..., two, three.
    let stages = [usize::MAX, usize::MAX, usize::MAX, usize::MAX, 2, 3];
    let (a, b, c, d, e, f) = tokio::join!(
        enter(&links[0], &tasks[0], 0, &initial, stages[0]),
        enter(&links[1], &tasks[1], 1, &initial, stages[1]),
        enter(&links[2], &tasks[2], 2, &initial, stages[2]),
        enter(&links[3], &tasks[3], 3, &initial, stages[3]),
        enter(&links[4], &tasks[4], 4, &initial, stages[4]),
        enter(&links[5], &tasks[5], 5, &initial, stages[5]),
    );
    assert_eq!([a, b, c, d], [Some(true); 4], "{}", coordinator.log());
    assert_eq!((e, f), (None, None));
    wait_for_version(&links[0], 1, Duration::from_secs(30), &coordinator).await;
    // Device 5 learns it was summed although it left before unmasking; device 4 that it was not.
    for (i, summed) in [(4, false), (5, true)] {
        match links[i].request(&Message::SecurePoll { round: 1, member: None }).await.unwrap() {
            Message::SecureStep { step: ServerMessage::Finished { summed: s }, .. } => {
                assert_eq!(s, summed, "device {i}")
            }
            other => panic!("device {i}: {other:?}"),
        }
    }
    let v1 = model(&links[0], 1).await;
    // Devices 0-3 and 5: (10*0.001 + 20*0.002 + 30*0.003 + 40*0.004 + 60*0.006) / 160.
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003 + 40.0 * 0.004 + 60.0 * 0.006) / 160.0;
    for (x, y) in v1.data().iter().zip(initial.data()) {
        assert!((*x as f64 - (*y as f64 + step)).abs() < 1e-4, "{x} vs {y} + {step}");
    }
    assert!(coordinator.log().contains("secure sum of 5 of 6 participants (5 devices)"), "{}", coordinator.log());
}
