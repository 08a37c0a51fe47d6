//! The round engine's unit tests: one engine over a two-weight model, driven by hand. The
//! round's life here; the engine with its strategies and central DP in `tests/strategies.rs`.

mod strategies;

use super::*;
use crate::config::CentralDp;
use crate::strategy::{FedAvg, StrategyOptions};
use fedge_core::wire::{ErrorCode, LocalDp, TrainConfig};
use fedge_core::{ParamLayout, TensorSpec};
use std::sync::Arc;

const S: Duration = Duration::from_secs(1);

fn stored(round: u64, model_version: u64, chosen: &[DeviceId], target: usize, population: usize) -> StoredRound<'_> {
    StoredRound { round, model_version, chosen, target, population }
}

pub(crate) fn layout() -> Arc<ParamLayout> {
    Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2] }]).unwrap())
}

pub(crate) fn params(v: [f32; 2]) -> ModelParams {
    ModelParams::new(layout(), v.to_vec()).unwrap()
}

pub(crate) fn engine(devices: u64, config: EngineConfig) -> RoundEngine<FedAvg> {
    let mut e = RoundEngine::new(config, FedAvg::default(), params([0.0, 0.0])).unwrap();
    for d in 0..devices {
        e.handle_device_available(d);
    }
    e
}

pub(crate) fn cfg(fraction: f64, min: usize) -> EngineConfig {
    EngineConfig { fraction, min_train_clients: min, round_timeout: 10 * S, ..EngineConfig::default() }
}

pub(crate) fn assigned<S: Strategy>(e: &mut RoundEngine<S>) -> Vec<(DeviceId, TrainTask)> {
    let mut out = Vec::new();
    while let Some(ev) = e.poll_event() {
        match ev {
            EngineEvent::Assign { device, task } => out.push((device, task)),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

pub(crate) fn closed<S: Strategy>(e: &mut RoundEngine<S>) -> RoundReport {
    match e.poll_event() {
        Some(EngineEvent::RoundClosed(r)) => r,
        other => panic!("expected RoundClosed, got {other:?}"),
    }
}

fn result(task: &TrainTask, delta: [f32; 2], n: u64) -> TrainResult {
    TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: n,
        train_loss: 0.5,
        delta: params(delta),
        clipped: false,
    }
}

#[test]
fn a_round_samples_collects_and_aggregates() {
    let mut e = engine(10, cfg(0.3, 1));
    assert_eq!(e.start_round(S), Ok(1));
    let tasks = assigned(&mut e);
    assert_eq!(tasks.len(), 3);
    assert!(
        tasks.iter().all(|(_, t)| t.round == 1 && t.model_version == 0 && t.model_hash == e.global().content_hash())
    );
    for (i, (d, t)) in tasks.iter().enumerate() {
        assert!(e.poll_event().is_none());
        e.handle_train_result(2 * S, *d, &result(t, [i as f32, 1.0], 10 * (i as u64 + 1))).unwrap();
    }
    let r = closed(&mut e);
    assert_eq!((r.round, r.model_version, r.results, r.failures, r.samples), (1, 1, 3, 0, 60));
    assert_eq!(r.outcome, RoundOutcome::Aggregated);
    assert_eq!(r.closed_at, 2 * S);
    // Weighted mean of deltas (0,1)x10, (1,1)x20, (2,1)x30 = (80/60, 1).
    assert_eq!(e.global().data(), &[80.0 / 60.0, 1.0]);
    assert_eq!(e.version(), 1);
    assert_eq!(r.model_hash, e.global().content_hash());
}

#[test]
fn bad_results_are_refused_with_their_code() {
    let mut e = engine(4, cfg(0.5, 1));
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    let (d, t) = tasks[0].clone();
    let unselected = (0..4).find(|x| tasks.iter().all(|(s, _)| s != x)).unwrap();
    let stale = TrainResult { model_version: 7, ..result(&t, [0.0; 2], 1) };
    let wrong_round = TrainResult { round: 9, ..result(&t, [0.0; 2], 1) };
    let nan = result(&t, [f32::NAN, 0.0], 1);
    let wrong_shape = TrainResult {
        delta: ModelParams::new(
            Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![3] }]).unwrap()),
            vec![0.0; 3],
        )
        .unwrap(),
        ..result(&t, [0.0; 2], 1)
    };
    let check = |e: &mut RoundEngine<FedAvg>, dev, r: &TrainResult, code| {
        assert_eq!(e.handle_train_result(S, dev, r).unwrap_err().code(), code);
    };
    check(&mut e, d, &stale, ErrorCode::StaleModel);
    check(&mut e, d, &wrong_round, ErrorCode::StaleModel);
    check(&mut e, unselected, &result(&t, [0.0; 2], 1), ErrorCode::NotSelected);
    check(&mut e, d, &nan, ErrorCode::InvalidUpdate);
    check(&mut e, d, &wrong_shape, ErrorCode::InvalidUpdate);
    // None of that disturbed the round: the good result is accepted, then a repeat refused.
    e.handle_train_result(S, d, &result(&t, [2.0, 2.0], 1)).unwrap();
    check(&mut e, d, &result(&t, [9.0, 9.0], 1), ErrorCode::Duplicate);
    e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 0.0], 1)).unwrap();
    assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
    assert_eq!(e.global().data(), &[1.0, 1.0], "first upload wins, bad ones ignored");
    // After the round, a late result is stale.
    check(&mut e, d, &result(&t, [0.0; 2], 1), ErrorCode::StaleModel);
}

#[test]
fn stragglers_are_dropped_at_the_deadline() {
    let mut e = engine(3, cfg(1.0, 2));
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(2 * S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
    e.handle_train_result(3 * S, tasks[1].0, &result(&tasks[1].1, [1.0, 1.0], 5)).unwrap();
    assert_eq!(e.poll_timeout(), Some(11 * S));
    e.handle_timeout(10 * S);
    assert!(e.poll_event().is_none(), "not before the deadline");
    e.handle_timeout(11 * S);
    let r = closed(&mut e);
    assert_eq!(r.stragglers, vec![tasks[2].0]);
    assert_eq!(r.outcome, RoundOutcome::Aggregated);
    assert_eq!(e.global().data(), &[2.0, 2.0]);
    // The straggler's late answer is stale.
    assert!(matches!(
        e.handle_train_result(12 * S, tasks[2].0, &result(&tasks[2].1, [0.0; 2], 1)),
        Err(RejectReason::Stale { .. })
    ));
}

#[test]
fn without_quorum_the_model_stays() {
    let mut e = engine(3, cfg(1.0, 2));
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
    e.handle_train_failure(S, tasks[1].0);
    e.handle_device_gone(S, tasks[2].0);
    let r = closed(&mut e);
    assert!(matches!(r.outcome, RoundOutcome::Failed(ref m) if m.contains("1 results, 2 needed")), "{:?}", r.outcome);
    assert_eq!((r.failures, e.version()), (2, 0));
    assert_eq!(e.global().data(), &[0.0, 0.0]);
    // The next round starts from the same version, without the departed device.
    assert_eq!(e.start_round(2 * S), Ok(2));
    let tasks = assigned(&mut e);
    assert_eq!(tasks.len(), 2);
    assert!(tasks.iter().all(|(_, t)| t.model_version == 0));
}

#[test]
fn failures_fail_the_round_unless_accepted() {
    let mut e = engine(2, EngineConfig { accept_failures: false, ..cfg(1.0, 1) });
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
    e.handle_train_failure(S, tasks[1].0);
    assert!(matches!(closed(&mut e).outcome, RoundOutcome::Failed(_)));
    assert_eq!(e.version(), 0);
}

#[test]
fn failures_beyond_the_bound_fail_the_round() {
    let run = |bound| {
        let mut e = engine(4, EngineConfig { max_failures: Some(bound), ..cfg(1.0, 1) });
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 3.0], 5)).unwrap();
        e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [3.0, 3.0], 5)).unwrap();
        e.handle_train_failure(S, tasks[2].0);
        e.handle_timeout(11 * S); // tasks[3] is late
        closed(&mut e).outcome
    };
    assert_eq!(run(2), RoundOutcome::Aggregated);
    assert!(matches!(run(1), RoundOutcome::Failed(ref m) if m.contains("2 devices failed, at most 1")));
}

#[test]
fn sampling_is_seeded_and_respects_the_quorum() {
    let pick = |seed| {
        let mut e = engine(100, EngineConfig { seed, ..cfg(0.1, 1) });
        e.start_round(S).unwrap();
        assigned(&mut e).into_iter().map(|(d, _)| d).collect::<Vec<_>>()
    };
    assert_eq!(pick(1).len(), 10);
    assert_eq!(pick(1), pick(1));
    assert_ne!(pick(1), pick(2));
    // The quorum lifts the sample size: 10% of 5 devices is 1, but 3 are needed.
    let mut e = engine(5, cfg(0.1, 3));
    e.start_round(S).unwrap();
    assert_eq!(assigned(&mut e).len(), 3);
    assert_eq!(e.start_round(S), Err(StartError::Busy(1)));
    let mut e = engine(2, cfg(0.1, 3));
    assert_eq!(e.start_round(S), Err(StartError::NotEnoughDevices { available: 2, needed: 3 }));
}

#[test]
fn reconfigure_between_rounds_only() {
    let mut e = engine(10, cfg(0.1, 1));
    e.reconfigure(|c| c.fraction = 0.5).unwrap();
    assert_eq!(e.reconfigure(|c| c.fraction = 0.0), Err(ReconfigureError::Invalid(ConfigError::Fraction(0.0))));
    e.start_round(S).unwrap();
    assert_eq!(assigned(&mut e).len(), 5);
    assert_eq!(e.reconfigure(|c| c.fraction = 1.0), Err(ReconfigureError::Busy(1)));
    assert_eq!(e.config().fraction, 0.5);
}

#[test]
fn impossible_configs_are_refused() {
    let bad = |c: EngineConfig| RoundEngine::new(c, FedAvg::default(), params([0.0; 2])).err().map(|e| e.to_string());
    let t = EngineConfig::default().train;
    assert!(bad(cfg(0.0, 1)).unwrap().contains("fraction"));
    assert!(bad(cfg(1.5, 1)).unwrap().contains("fraction"));
    assert!(bad(cfg(0.5, 0)).unwrap().contains("min_train_clients"));
    assert!(bad(EngineConfig { train: TrainConfig { batch_size: 0, ..t }, ..cfg(0.5, 1) }).unwrap().contains("batch"));
    assert!(bad(EngineConfig { train: TrainConfig { epochs: 0, ..t }, ..cfg(0.5, 1) }).unwrap().contains("epochs"));
    assert!(
        bad(EngineConfig {
            train: TrainConfig { local_dp: Some(LocalDp { epsilon: 1.0, delta: 1e-5 }), ..t },
            ..cfg(0.5, 1)
        })
        .unwrap()
        .contains("clip")
    );
    assert!(bad(cfg(0.5, 1)).is_none());
}

#[test]
fn over_commitment_closes_the_round_when_enough_have_answered() {
    let mut e = engine(10, EngineConfig { over_commit: 0.5, accept_failures: false, ..cfg(0.2, 1) });
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    assert_eq!(tasks.len(), 3, "2 needed, 50% more sampled");
    assert_eq!(e.open_round().unwrap().target, 2);
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [1.0, 1.0], 1)).unwrap();
    assert!(e.poll_event().is_none());
    e.handle_train_result(S, tasks[2].0, &result(&tasks[2].1, [3.0, 3.0], 1)).unwrap();
    let r = closed(&mut e);
    // The third device was surplus: not a failure, not a straggler, even without
    // accept_failures.
    assert_eq!((r.results, r.failures, r.surplus, r.stragglers.len()), (2, 0, 1, 0));
    assert_eq!(r.outcome, RoundOutcome::Aggregated);
    assert_eq!(e.global().data(), &[2.0, 2.0]);
    // Its late answer is told the round is over.
    assert_eq!(
        e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0; 2], 1)).unwrap_err().code(),
        ErrorCode::StaleModel
    );
    assert!(matches!(
        RoundEngine::new(EngineConfig { over_commit: -0.1, ..cfg(0.2, 1) }, FedAvg::default(), params([0.0; 2])),
        Err(ConfigError::OverCommit(_))
    ));
}

#[test]
fn a_resumed_round_keeps_its_accepted_updates_and_reassigns_the_rest() {
    // Life 1: round 1 opens with 3 devices; two answer, then the coordinator "crashes".
    let mut first = engine(3, cfg(1.0, 3));
    first.start_round(S).unwrap();
    let tasks = assigned(&mut first);
    let info = first.open_round().unwrap();
    assert_eq!((info.round, info.model_version, info.chosen.len(), info.target), (1, 0, 3, 3));
    let accepted: Vec<(DeviceId, TrainResult)> =
        vec![(tasks[0].0, result(&tasks[0].1, [1.0, 0.0], 1)), (tasks[1].0, result(&tasks[1].1, [2.0, 0.0], 1))];
    for (d, r) in &accepted {
        first.check_train_result(*d, r).unwrap();
        first.handle_train_result(S, *d, r).unwrap();
    }

    // Life 2: restored at version 0 after round 0, the round reopened from the record.
    let mut e = RoundEngine::restore(cfg(1.0, 3), FedAvg::default(), params([0.0, 0.0]), 0, 0).unwrap();
    e.resume_round(100 * S, stored(1, 0, &info.chosen, info.target, info.population), &accepted).unwrap();
    let again = assigned(&mut e);
    assert_eq!(again.len(), 1, "only the device that had not answered is asked again");
    assert_eq!(again[0].0, tasks[2].0);
    assert_eq!(again[0].1, tasks[2].1, "the same task as before the crash");
    assert_eq!(e.poll_timeout(), Some(110 * S), "a fresh deadline for reconnecting devices");
    // An acknowledged update sent again is a duplicate, not counted twice.
    assert_eq!(e.check_train_result(tasks[0].0, &accepted[0].1).unwrap_err().code(), ErrorCode::Duplicate);
    e.handle_train_result(101 * S, tasks[2].0, &result(&tasks[2].1, [3.0, 0.0], 1)).unwrap();
    let r = closed(&mut e);
    assert_eq!((r.round, r.results, r.model_version), (1, 3, 1));
    assert_eq!(e.global().data(), &[2.0, 0.0], "mean of all three, the two from before the crash included");

    // Stored state that does not fit is refused, leaving no round open.
    let mut e = RoundEngine::restore(cfg(1.0, 3), FedAvg::default(), params([0.0, 0.0]), 0, 0).unwrap();
    assert_eq!(
        e.resume_round(S, stored(2, 0, &info.chosen, 3, 3), &[]),
        Err(ResumeError::Sequence { stored: 2, last: 0 })
    );
    assert_eq!(
        e.resume_round(S, stored(1, 5, &info.chosen, 3, 3), &[]),
        Err(ResumeError::Version { stored: 5, current: 0 })
    );
    let foreign = vec![(99, result(&tasks[0].1, [1.0, 0.0], 1))];
    assert!(matches!(e.resume_round(S, stored(1, 0, &info.chosen, 3, 3), &foreign), Err(ResumeError::Update { .. })));
    assert_eq!(e.current_round(), None);
    assert!(e.poll_event().is_none());
    // All updates stored: the round closes during the resume.
    let all: Vec<(DeviceId, TrainResult)> = tasks.iter().map(|(d, t)| (*d, result(t, [*d as f32, 0.0], 1))).collect();
    e.resume_round(S, stored(1, 0, &info.chosen, 3, 3), &all).unwrap();
    assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
}

#[test]
fn an_adopted_model_is_the_next_version_and_the_next_round_starts_from_it() {
    let mut e = engine(2, EngineConfig { max_samples_per_result: 10, ..cfg(1.0, 2) });
    assert_eq!(e.adopt(params([1.0, 2.0])), Ok(1));
    assert_eq!((e.version(), e.global().data()), (1, &[1.0, 2.0][..]));
    // Version numbers stay one sequence with students.
    assert_eq!(e.allocate_version(), 2);
    assert_eq!(e.adopt(params([3.0, 4.0])), Ok(3));
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    assert!(tasks.iter().all(|(_, t)| t.model_version == 3 && t.model_hash == params([3.0, 4.0]).content_hash()));
    assert_eq!(e.adopt(params([0.0, 0.0])), Err(AdoptError::Busy(1)));
    // A participant speaking for many devices claims their total; a device stays capped.
    e.set_sample_cap(tasks[0].0, Some(1_000));
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [1.0, 0.0], 300)).unwrap();
    e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 1.0], 300)).unwrap();
    let report = closed(&mut e);
    assert_eq!((report.samples, report.model_version), (310, 4));
    let want = [3.0 + 300.0 / 310.0, 4.0 + 10.0 / 310.0];
    assert!(e.global().data().iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{:?}", e.global().data());
    // Refusals change nothing.
    let other = ModelParams::new(
        Arc::new(ParamLayout::new(vec![TensorSpec { name: "v".into(), shape: vec![2] }]).unwrap()),
        vec![0.0; 2],
    )
    .unwrap();
    assert_eq!(e.adopt(other), Err(AdoptError::Layout));
    assert_eq!(e.adopt(params([f32::NAN, 0.0])), Err(AdoptError::NotFinite));
    assert_eq!(e.version(), 4);
    let mut config = cfg(1.0, 1);
    config.set_strategy("fedadam", &StrategyOptions::default()).unwrap();
    let strategy = crate::strategy::build(&config, Box::new(derive_rng(0, &[1])));
    let mut adam = RoundEngine::new(config, strategy, params([0.0, 0.0])).unwrap();
    assert_eq!(adam.adopt(params([1.0, 1.0])), Err(AdoptError::Stateful("fedadam")));
}
