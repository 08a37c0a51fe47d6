//! The round engine's unit tests: one engine over a two-weight model, driven by hand.

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

fn layout() -> Arc<ParamLayout> {
    Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2] }]).unwrap())
}

fn params(v: [f32; 2]) -> ModelParams {
    ModelParams::new(layout(), v.to_vec()).unwrap()
}

fn engine(devices: u64, config: EngineConfig) -> RoundEngine<FedAvg> {
    let mut e = RoundEngine::new(config, FedAvg::default(), params([0.0, 0.0])).unwrap();
    for d in 0..devices {
        e.handle_device_available(d);
    }
    e
}

fn cfg(fraction: f64, min: usize) -> EngineConfig {
    EngineConfig { fraction, min_train_clients: min, round_timeout: 10 * S, ..EngineConfig::default() }
}

fn assigned<S: Strategy>(e: &mut RoundEngine<S>) -> Vec<(DeviceId, TrainTask)> {
    let mut out = Vec::new();
    while let Some(ev) = e.poll_event() {
        match ev {
            EngineEvent::Assign { device, task } => out.push((device, task)),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

fn closed<S: Strategy>(e: &mut RoundEngine<S>) -> RoundReport {
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
fn central_dp_keeps_a_ledger_sets_the_clip_and_enforces_the_budget() {
    let privacy =
        CentralDp { noise_multiplier: 1.0, clip_norm: 0.5, adaptive: None, delta: 1e-5, target_epsilon: None };
    let config = EngineConfig { privacy: Some(privacy.clone()), ..cfg(0.25, 1) };
    let strategy = crate::strategy::build(&config, Box::new(derive_rng(1, &[])));
    let mut e = RoundEngine::new(config.clone(), strategy, params([0.0, 0.0])).unwrap();
    for d in 0..8 {
        e.handle_device_available(d);
    }
    let mut eps = Vec::new();
    for round in 1..=3 {
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        assert_eq!(tasks.len(), 2, "q = 2 of 8");
        // Devices are told the clip norm; they add no noise themselves.
        assert!(tasks.iter().all(|(_, t)| t.config.clip_norm == Some(0.5) && t.config.local_dp.is_none()));
        for (d, t) in &tasks {
            e.handle_train_result(S, *d, &result(t, [3.0, 4.0], 10)).unwrap();
        }
        let r = closed(&mut e);
        let p = r.privacy.expect("an aggregated round is accounted");
        assert_eq!((p.round, p.sampling_rate, p.noise_multiplier, p.clip_norm), (round, 0.25, 1.0, 0.5));
        let want = fedge_core::privacy::epsilon(0.25, 1.0, round, 1e-5).unwrap().epsilon;
        assert!((p.epsilon - want).abs() < 1e-12);
        eps.push(p.epsilon);
    }
    assert_eq!(e.privacy_ledger().unwrap().entries().len(), 3);

    // A budget that fits one more round but not two.
    let four = fedge_core::privacy::epsilon(0.25, 1.0, 4, 1e-5).unwrap().epsilon;
    let five = fedge_core::privacy::epsilon(0.25, 1.0, 5, 1e-5).unwrap().epsilon;
    assert!(eps[2] < four && four < five);
    let target = (four + five) / 2.0;
    let budget = EngineConfig { privacy: Some(CentralDp { target_epsilon: Some(target), ..privacy }), ..config };
    let strategy = crate::strategy::build(&budget, Box::new(derive_rng(1, &[])));
    let mut b = RoundEngine::new(budget, strategy, params([0.0, 0.0])).unwrap();
    for d in 0..8 {
        b.handle_device_available(d);
    }
    let entries = e.privacy_ledger().unwrap().entries().to_vec();
    b.restore_ledger(entries).unwrap();
    assert!(b.check_budget(1).is_ok());
    match b.check_budget(3) {
        Err(StartError::TooManyRounds { rounds: 3, fits: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    b.start_round(S).unwrap();
    for (d, t) in assigned(&mut b) {
        b.handle_train_result(S, d, &result(&t, [0.1, 0.1], 1)).unwrap();
    }
    assert!(closed(&mut b).privacy.is_some());
    let err = b.start_round(2 * S).unwrap_err();
    assert!(matches!(err, StartError::Budget { round: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("past the target"), "{err}");
    assert!(b.poll_event().is_none(), "a refused round assigns nothing");
}

#[test]
fn one_device_cannot_take_over_or_break_the_model() {
    // A claim of u64::MAX samples (twice: the sum would overflow) weighs the configured bound.
    let mut e = engine(3, EngineConfig { max_samples_per_result: 100, ..cfg(1.0, 3) });
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [1.0, 0.0], 100)).unwrap();
    e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 1.0], u64::MAX)).unwrap();
    e.handle_train_result(S, tasks[2].0, &result(&tasks[2].1, [0.0, 1.0], u64::MAX)).unwrap();
    let r = closed(&mut e);
    assert_eq!((r.outcome, r.samples), (RoundOutcome::Aggregated, 300));
    let g = e.global().data().to_vec();
    assert!((g[0] - 1.0 / 3.0).abs() < 1e-6 && (g[1] - 2.0 / 3.0).abs() < 1e-6, "{g:?}");

    // With a clip norm the server clips, whatever the device says it did: a delta of norm
    // 5e30 moves the model by at most the clip norm (weighted like any other).
    let clip = TrainConfig { clip_norm: Some(1.0), ..TrainConfig::sgd(1, 10, 0.1) };
    let mut e = engine(2, EngineConfig { train: clip, ..cfg(1.0, 2) });
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3e30, 4e30], 10)).unwrap();
    e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 0.0], 10)).unwrap();
    assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
    let g = e.global().data().to_vec();
    assert!((g[0] - 0.3).abs() < 1e-6 && (g[1] - 0.4).abs() < 1e-6, "{g:?}");

    // Without clipping, deltas near f32::MAX that would carry the model past it are refused
    // as a whole: the round fails, the model stays usable.
    let mut e = RoundEngine::new(cfg(1.0, 1), FedAvg::default(), params([f32::MAX, 0.0])).unwrap();
    e.handle_device_available(0);
    e.start_round(S).unwrap();
    let tasks = assigned(&mut e);
    e.handle_train_result(S, 0, &result(&tasks[0].1, [f32::MAX, 0.0], 10)).unwrap();
    let r = closed(&mut e);
    assert!(matches!(&r.outcome, RoundOutcome::Failed(m) if m.contains("non-finite")), "{r:?}");
    assert_eq!((e.version(), e.global().data()), (0, &[f32::MAX, 0.0][..]));
}

fn with_strategy(name: &str, options: StrategyOptions, base: EngineConfig) -> Result<EngineConfig, ConfigError> {
    let mut c = base;
    c.set_strategy(name, &options)?;
    c.validate()?;
    Ok(c)
}

#[test]
fn a_robust_rule_outvotes_an_attacker_that_takes_fedavg_over() {
    // Four honest devices send (1, 1); one sends (-1000, 1000) with an honest-looking claim.
    let run = |name: &str| {
        let config = with_strategy(name, StrategyOptions::default(), cfg(1.0, 5)).unwrap();
        let strategy = crate::strategy::build(&config, Box::new(derive_rng(1, &[])));
        let mut e = RoundEngine::new(config, strategy, params([0.0, 0.0])).unwrap();
        (0..5).for_each(|d| e.handle_device_available(d));
        e.start_round(S).unwrap();
        for (i, (device, task)) in assigned(&mut e).into_iter().enumerate() {
            let delta = if i == 2 { [-1000.0, 1000.0] } else { [1.0, 1.0] };
            e.handle_train_result(S, device, &result(&task, delta, 10)).unwrap();
        }
        assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated, "{name}");
        e.global().data().to_vec()
    };
    assert_eq!(run("fedavg"), [-199.2, 200.8]);
    for name in ["median", "trimmed-mean", "krum", "multi-krum"] {
        assert_eq!(run(name), [1.0, 1.0], "{name}");
    }
    // Norm bounding brings the attacker to the median norm, sqrt 2: (-1, 1) beside four (1, 1).
    assert_eq!(run("norm-bound"), [0.6, 1.0]);
    // Centered clipping bounds its pull to the radius (the median distance) over n.
    let g = run("centered-clip");
    assert!(g[0] > 0.5 && g[0] < 1.0 && g[1] >= 1.0 && g[1] < 1.5, "{g:?}");
}

#[test]
fn strategies_are_chosen_by_name_and_checked_against_privacy_and_memory() {
    let dp = CentralDp { noise_multiplier: 1.0, clip_norm: 1.0, adaptive: None, delta: 1e-5, target_epsilon: None };
    let private = EngineConfig { privacy: Some(dp), ..cfg(1.0, 1) };
    let e = with_strategy("median", StrategyOptions::default(), private.clone()).unwrap_err();
    assert!(e.to_string().starts_with("invalid strategy: median combines the updates jointly"), "{e}");
    for name in ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox"] {
        let c = with_strategy(name, StrategyOptions::default(), private.clone()).unwrap();
        // Under central DP the averaging inside is DP-FedAvg's: the clip is set.
        let s = crate::strategy::build(&c, Box::new(derive_rng(1, &[])));
        let want = if name == "fedavg" { "dp-fedavg" } else { name };
        assert_eq!((s.name(), s.clip_norm()), (want, Some(1.0)));
    }
    let bad = with_strategy("krum", StrategyOptions { tau: Some(1.0), ..StrategyOptions::default() }, cfg(1.0, 1));
    assert!(matches!(bad, Err(ConfigError::Strategy(m)) if m.contains("`tau` does not apply to krum")));

    // 3 devices x 2 floats x 4 bytes fit 1 MiB; a 300,000-value model does not (3.4 MiB).
    let small =
        with_strategy("median", StrategyOptions { max_buffer_mb: Some(1), ..StrategyOptions::default() }, cfg(1.0, 1))
            .unwrap();
    let build = |c: &EngineConfig, initial: ModelParams| {
        let mut e =
            RoundEngine::new(c.clone(), crate::strategy::build(c, Box::new(derive_rng(1, &[]))), initial).unwrap();
        (0..3).for_each(|d| e.handle_device_available(d));
        e
    };
    assert!(build(&small, params([0.0, 0.0])).start_round(S).is_ok());
    let big_layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![300_000] }]).unwrap());
    let err = build(&small, ModelParams::zeros(big_layout.clone())).start_round(S).unwrap_err();
    assert_eq!(err, StartError::Buffer { strategy: "median", updates: 3, mb: 4, max_mb: 1 });
    assert!(err.to_string().contains("raise max_buffer_mb"));
    // FedProx's mu reaches the devices in their tasks; other strategies send none.
    let prox =
        with_strategy("fedprox", StrategyOptions { proximal_mu: Some(0.5), ..StrategyOptions::default() }, cfg(1.0, 1))
            .unwrap();
    let mut e = build(&prox, params([0.0, 0.0]));
    e.start_round(S).unwrap();
    assert!(assigned(&mut e).iter().all(|(_, t)| t.config.proximal_mu == Some(0.5)));
    let mut e = build(&with_strategy("median", StrategyOptions::default(), cfg(1.0, 1)).unwrap(), params([0.0, 0.0]));
    e.start_round(S).unwrap();
    assert!(assigned(&mut e).iter().all(|(_, t)| t.config.proximal_mu.is_none()));
    // A streaming rule has no such bound.
    let fedavg = with_strategy("fedavg", StrategyOptions::default(), cfg(1.0, 1)).unwrap();
    assert!(build(&fedavg, ModelParams::zeros(big_layout)).start_round(S).is_ok());
}

#[test]
fn a_step_past_max_step_norm_fails_the_round_and_leaves_the_strategy_as_it_was() {
    let mut config = EngineConfig { max_step_norm: Some(1.0), ..cfg(1.0, 1) };
    config.set_strategy("fedavgm", &StrategyOptions::default()).unwrap();
    let strategy = crate::strategy::build(&config, Box::new(derive_rng(1, &[])));
    let mut e = RoundEngine::new(config.clone(), strategy, params([0.0, 0.0])).unwrap();
    e.handle_device_available(0);
    let round = |e: &mut RoundEngine<Box<dyn Strategy>>, delta| {
        e.start_round(S).unwrap();
        let (device, task) = assigned(e).remove(0);
        e.handle_train_result(S, device, &result(&task, delta, 10)).unwrap();
        closed(e)
    };
    // A step of norm 5: refused, the model and version stay.
    let r = round(&mut e, [3.0, 4.0]);
    assert!(matches!(&r.outcome, RoundOutcome::Failed(m) if m.contains("more than max_step_norm 1")), "{r:?}");
    assert_eq!((e.version(), e.global().data()), (0, &[0.0, 0.0][..]));
    // The momentum did not keep the refused step: the next round moves by its own delta only.
    assert_eq!(round(&mut e, [0.5, 0.0]).outcome, RoundOutcome::Aggregated);
    assert_eq!(e.global().data(), &[0.5, 0.0]);
    assert_eq!(
        EngineConfig { max_step_norm: Some(f64::NAN), ..cfg(1.0, 1) }.validate().unwrap_err().to_string(),
        "max_step_norm must be positive and finite, got NaN"
    );
}
