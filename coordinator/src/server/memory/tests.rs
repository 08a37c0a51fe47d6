//! The coordinator's device sessions driven in memory: rounds, deadlines, superseded
//! sessions and refusals, with no socket and no sleep.

use std::sync::Arc;
use std::time::Duration;

use fedge_core::wire::{ErrorCode, InferRequest, Message, OperatorCommand, TrainResult, TrainTask};
use fedge_core::{ModelParams, ParamLayout, TensorSpec};
use fedge_engine::{EngineConfig, RoundOutcome};

use super::{MemoryDevice, MemoryFleet};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A small model of two tensors.
fn initial() -> ModelParams {
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec { name: "w".into(), shape: vec![2, 3] },
            TensorSpec { name: "b".into(), shape: vec![3] },
        ])
        .expect("a valid layout"),
    );
    let values = (0..layout.numel()).map(|i| 0.1 * i as f32 - 0.3).collect();
    ModelParams::new(layout, values).expect("values fit the layout")
}

/// Every available device sampled, at least `min` results needed, rounds of [`TIMEOUT`].
fn config(min: usize) -> EngineConfig {
    EngineConfig { fraction: 1.0, min_train_clients: min, round_timeout: TIMEOUT, ..EngineConfig::default() }
}

/// A delta of the model's layout, different for each `seed`.
fn delta(seed: f32) -> ModelParams {
    let model = initial();
    let values = (0..model.numel()).map(|i| seed * (i as f32 + 1.0) - 0.5 * seed * seed).collect();
    ModelParams::new(model.layout().clone(), values).expect("values fit the layout")
}

fn upload(task: &TrainTask, num_samples: u64, delta: ModelParams) -> Message {
    Message::TrainResult(TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples,
        train_loss: 0.5,
        delta,
        clipped: false,
    })
}

async fn task_of(fleet: &MemoryFleet, device: &MemoryDevice) -> TrainTask {
    match fleet.request(device, Message::TaskRequest { running: None }).await {
        Message::TrainTask(task) => task,
        other => panic!("expected a task, got {other:?}"),
    }
}

fn assert_close(got: &ModelParams, want: &[f32]) {
    assert_eq!(got.data().len(), want.len());
    for (i, (g, w)) in got.data().iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-6, "value {i}: got {g}, want {w}");
    }
}

fn error_code(reply: &Message) -> ErrorCode {
    match reply {
        Message::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_full_round_aggregates_the_sample_weighted_mean_of_the_deltas() {
    let fleet = MemoryFleet::new(config(3), initial()).expect("a valid configuration");
    let devices: Vec<MemoryDevice> = ["a", "b", "c"].iter().map(|n| fleet.connect(n)).collect();
    fleet.start_rounds(1);
    assert_eq!(fleet.open_round(), Some(1));

    let uploads = [(1.0, 10u64), (-2.0, 30), (0.5, 60)];
    for (device, &(seed, samples)) in devices.iter().zip(&uploads) {
        let task = task_of(&fleet, device).await;
        assert_eq!((task.round, task.model_version), (1, 0));
        match fleet.request(device, Message::ModelRequest { version: Some(task.model_version) }).await {
            Message::Model { version, hash, params } => {
                assert_eq!(version, 0);
                assert_eq!(hash, task.model_hash, "the model downloaded is the one the task names");
                assert_eq!(params.content_hash(), hash);
                assert_eq!(params, initial());
            }
            other => panic!("expected the model, got {other:?}"),
        }
        assert_eq!(fleet.request(device, upload(&task, samples, delta(seed))).await, Message::Ack { round: 1 });
    }

    assert_eq!(fleet.open_round(), None, "three results of three close the round");
    let reports = fleet.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome, RoundOutcome::Aggregated);
    assert_eq!((reports[0].results, reports[0].samples), (3, 100));

    // FedAvg, server learning rate 1: initial + sum(n_i * delta_i) / sum(n_i).
    let total: f64 = uploads.iter().map(|&(_, n)| n as f64).sum();
    let want: Vec<f32> = (0..initial().numel())
        .map(|i| {
            let mean: f64 =
                uploads.iter().map(|&(seed, n)| n as f64 * f64::from(delta(seed).data()[i])).sum::<f64>() / total;
            (f64::from(initial().data()[i]) + mean) as f32
        })
        .collect();
    let (version, global) = fleet.coordinator().global();
    assert_eq!(version, 1);
    assert_close(&global, &want);

    match fleet.request(&devices[0], Message::ModelRequest { version: None }).await {
        Message::Model { version, hash, params } => {
            assert_eq!(version, 1);
            assert_eq!(hash, global.content_hash());
            assert_close(&params, &want);
        }
        other => panic!("expected the new model, got {other:?}"),
    }
    // The same version in chunks, put back together, is the same `Model` message.
    let mut bytes = Vec::new();
    loop {
        let asked = Message::ModelChunkRequest { version: 1, offset: bytes.len() as u64, max_len: 40 };
        match fleet.request(&devices[1], asked).await {
            Message::ModelChunk { version: 1, offset, total_len, bytes: part, .. } => {
                assert_eq!(offset, bytes.len() as u64);
                assert!(!part.is_empty() && part.len() <= 40);
                bytes.extend_from_slice(&part);
                if bytes.len() as u64 == total_len {
                    break;
                }
            }
            other => panic!("expected a chunk, got {other:?}"),
        }
    }
    match fedge_core::codec::decode(&bytes) {
        Ok(Message::Model { version: 1, params, .. }) => assert_close(&params, &want),
        other => panic!("the chunks do not make model v1: {other:?}"),
    }
    match fleet.request(&devices[2], Message::TaskRequest { running: None }).await {
        Message::NoTask { model_version, .. } => assert_eq!(model_version, 1),
        other => panic!("no round is open: expected no task, got {other:?}"),
    }
}

#[tokio::test]
async fn a_round_waits_for_its_deadline_then_closes_with_a_straggler() {
    let mut config = config(2);
    config.accept_failures = true;
    let fleet = MemoryFleet::new(config, initial()).expect("a valid configuration");
    let (a, b, silent) = (fleet.connect("a"), fleet.connect("b"), fleet.connect("silent"));
    fleet.start_rounds(1);
    let silent_task = task_of(&fleet, &silent).await;
    for (device, seed) in [(&a, 1.0), (&b, 3.0)] {
        let task = task_of(&fleet, device).await;
        assert_eq!(fleet.request(device, upload(&task, 20, delta(seed))).await, Message::Ack { round: 1 });
    }

    fleet.advance(TIMEOUT - Duration::from_secs(1));
    assert_eq!(fleet.open_round(), Some(1), "two of three answered and the deadline has not passed");
    assert!(fleet.reports().is_empty());

    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.open_round(), None, "the deadline closed the round");
    let reports = fleet.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome, RoundOutcome::Aggregated, "two results meet the quorum of two");
    assert_eq!(reports[0].results, 2);
    assert_eq!(reports[0].stragglers, vec![silent.id()]);
    assert_eq!(fleet.coordinator().global().0, 1);

    let late = fleet.request(&silent, upload(&silent_task, 20, delta(2.0))).await;
    assert_eq!(error_code(&late), ErrorCode::StaleModel, "the round it was for is closed");
    assert_eq!(fleet.coordinator().global().0, 1, "the late upload changed nothing");
}

#[tokio::test]
async fn a_new_training_session_supersedes_the_old_one() {
    let fleet = MemoryFleet::new(config(2), initial()).expect("a valid configuration");
    let (first, b) = (fleet.connect("a"), fleet.connect("b"));
    let second = fleet.connect("a");
    assert_eq!(first.id(), second.id(), "one device, one id");
    assert_eq!(first.closed().len(), 1, "the older session is closed once");
    assert!(first.closed()[0].contains("superseded"), "closed with {:?}", first.closed());
    assert!(second.closed().is_empty() && b.closed().is_empty());

    // The superseded session's end does not take the device away.
    fleet.disconnect(first);
    assert_eq!(fleet.coordinator().connected(), 2);
    fleet.start_rounds(1);
    assert_eq!(fleet.open_round(), Some(1), "both devices are still there for a round of two");
    let task = task_of(&fleet, &second).await;
    assert_eq!(task.round, 1);

    // The newest session's end does.
    fleet.disconnect(second);
    assert_eq!(fleet.coordinator().connected(), 1);
}

#[tokio::test]
async fn sessions_are_refused_what_they_may_not_do() {
    let fleet = MemoryFleet::new(config(2), initial()).expect("a valid configuration");
    let (a, b) = (fleet.connect("a"), fleet.connect("b"));
    let watcher = fleet.connect_inference("a");
    assert!(a.closed().is_empty(), "an inference session supersedes no training session");
    fleet.start_rounds(1);
    let task = task_of(&fleet, &a).await;

    let asked = fleet.request(&watcher, Message::TaskRequest { running: None }).await;
    assert_eq!(error_code(&asked), ErrorCode::Unauthorized, "an inference session asks for no task");
    let uploaded = fleet.request(&watcher, upload(&task, 10, delta(1.0))).await;
    assert_eq!(error_code(&uploaded), ErrorCode::Unauthorized, "nor uploads");
    let inferred =
        fleet.request(&watcher, Message::InferRequest(InferRequest { rows: 1, cols: 1, pixels: vec![0] })).await;
    assert_eq!(error_code(&inferred), ErrorCode::Unavailable, "this coordinator has no teacher");

    let operator = fleet.request(&b, Message::Operator(OperatorCommand::Status)).await;
    assert_eq!(error_code(&operator), ErrorCode::Unauthorized, "a device runs no operator command");

    assert_eq!(fleet.request(&a, upload(&task, 10, delta(1.0))).await, Message::Ack { round: 1 });
    let again = fleet.request(&a, upload(&task, 10, delta(2.0))).await;
    assert_eq!(error_code(&again), ErrorCode::Duplicate, "one update per device and round");
    assert_eq!(fleet.open_round(), Some(1), "the duplicate did not count as b's result");
    assert_eq!(fleet.request(&b, Message::Ping { nonce: 7 }).await, Message::Pong { nonce: 7 });
}
