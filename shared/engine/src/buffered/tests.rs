//! The buffered engine's unit tests: one engine over a two-weight model, driven by hand, with
//! hand-computed expectations.

use super::*;
use crate::CentralDp;
use fedge_core::wire::TrainConfig;
use fedge_core::{ParamLayout, TensorSpec};
use std::sync::Arc;

const S: Duration = Duration::from_secs(1);

fn layout(n: usize) -> Arc<ParamLayout> {
    Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap())
}

fn params(v: [f32; 2]) -> ModelParams {
    ModelParams::new(layout(2), v.to_vec()).unwrap()
}

fn cfg(buffer_size: usize, max_concurrency: usize, max_staleness: u64, staleness: StalenessWeight) -> AsyncConfig {
    AsyncConfig { buffer_size, max_concurrency, max_staleness, staleness, ..AsyncConfig::default() }
}

fn noise() -> Box<dyn rand::Rng + Send> {
    Box::new(derive_rng(7, &[]))
}

fn engine(devices: u64, config: AsyncConfig) -> BufferedEngine {
    let mut e = BufferedEngine::new(config, params([0.0, 0.0]), noise()).unwrap();
    for d in 0..devices {
        e.handle_device_available(d);
    }
    e
}

/// Every task the engine hands out now (and no report).
fn assigned(e: &mut BufferedEngine) -> Vec<(DeviceId, TrainTask)> {
    let mut out = Vec::new();
    while let Some(ev) = e.poll_event() {
        match ev {
            AsyncEvent::Assign { device, task } => out.push((device, task)),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
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

fn report(e: &mut BufferedEngine) -> AggregationReport {
    match e.poll_event() {
        Some(AsyncEvent::Aggregated(r)) => r,
        other => panic!("expected a report, got {other:?}"),
    }
}

#[test]
fn staleness_weights_match_their_formulas() {
    let poly = |exponent| StalenessWeight::Polynomial { exponent };
    let hinge = |a, b| StalenessWeight::Hinge { a, b };
    let cases = [
        (StalenessWeight::Constant, 0, 1.0),
        (StalenessWeight::Constant, 1000, 1.0),
        (poly(0.5), 0, 1.0),
        (poly(0.5), 3, 0.5), // 1 / sqrt(4)
        (poly(0.5), 8, 1.0 / 3.0),
        (poly(1.0), 1, 0.5),
        (poly(2.0), 3, 1.0 / 16.0),
        (poly(0.0), 50, 1.0),
        (hinge(10.0, 4), 0, 1.0),
        (hinge(10.0, 4), 4, 1.0),
        (hinge(10.0, 4), 5, 1.0 / 11.0),
        (hinge(10.0, 4), 6, 1.0 / 21.0),
        (hinge(1.0, 0), 3, 0.25),
        (StalenessWeight::default(), 3, 0.5),
    ];
    for (w, s, want) in cases {
        let got = w.weight(s);
        assert!((got - want).abs() < 1e-12, "{w:?} at {s}: {got}, want {want}");
    }
}

/// Advances the engine to version 3 with zero deltas while device `x` keeps a task on
/// version 0 and device `y` one on version 2; returns their tasks and a task `z` on version 3.
#[allow(clippy::type_complexity)]
fn stale_scene(e: &mut BufferedEngine) -> [(DeviceId, TrainTask); 3] {
    let mut held: Vec<(DeviceId, TrainTask)> = Vec::new();
    let (mut x, mut y) = (None, None);
    while e.version() < 3 {
        held.extend(assigned(e));
        if x.is_none() {
            x = Some(held.remove(0));
        }
        if y.is_none()
            && let Some(i) = held.iter().position(|(_, t)| t.model_version == 2)
        {
            y = Some(held.remove(i));
        }
        let (d, t) = held.remove(0);
        let before = e.version();
        e.handle_train_result(S, d, &result(&t, [0.0, 0.0], 1)).unwrap();
        if e.version() != before {
            assert_eq!(report(e).outcome, RoundOutcome::Aggregated);
        }
    }
    assert_eq!(e.global().data(), &[0.0, 0.0]);
    assert_eq!(e.buffered(), 0);
    let z = assigned(e).into_iter().find(|(_, t)| t.model_version == 3).expect("a free slot at version 3");
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!((x.1.model_version, y.1.model_version), (0, 2));
    [z, y, x]
}

#[test]
fn an_aggregation_of_three_stale_results_is_the_hand_computed_weighted_mean() {
    // K = 3 results: z fresh (s = 0), y one version old (s = 1), x three old (s = 3); deltas
    // [1, 0] x 10 samples, [0, 2] x 20, [3, 3] x 10; eta_g = 2.
    // next = 2 * (10 w0 [1,0] + 20 w1 [0,2] + 10 w3 [3,3]) / 40.
    let cases = [
        // w = 1, 1, 1: ([10, 0] + [0, 40] + [30, 30]) / 40 = [1, 1.75].
        (StalenessWeight::Constant, [2.0, 3.5]),
        // w = 1, 1/2, 1/4: ([10, 0] + [0, 20] + [7.5, 7.5]) / 40 = [0.4375, 0.6875].
        (StalenessWeight::Polynomial { exponent: 1.0 }, [0.875, 1.375]),
        // w = 1, 1, 1/3 (a = 1, b = 1: 1 / (1 (3 - 1) + 1)): ([10, 0] + [0, 40] + [10, 10]) / 40.
        (StalenessWeight::Hinge { a: 1.0, b: 1 }, [1.0, 2.5]),
    ];
    for (weight, want) in cases {
        let mut e = engine(5, AsyncConfig { server_lr: 2.0, ..cfg(3, 3, 3, weight) });
        let [z, y, x] = stale_scene(&mut e);
        e.handle_train_result(10 * S, z.0, &result(&z.1, [1.0, 0.0], 10)).unwrap();
        e.handle_train_result(11 * S, y.0, &result(&y.1, [0.0, 2.0], 20)).unwrap();
        assert_eq!(e.version(), 3, "{weight:?}: not before the K-th result");
        e.handle_train_result(12 * S, x.0, &result(&x.1, [3.0, 3.0], 10)).unwrap();
        let r = report(&mut e);
        assert_eq!(e.version(), 4);
        let got = e.global().data();
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{weight:?}: {got:?} != {want:?}");
        assert_eq!((r.model_version, r.results, r.samples, r.max_staleness, r.at), (4, 3, 40, 3, 12 * S));
        assert!((r.mean_staleness - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.train_loss, 0.5);
        assert_eq!(r.outcome, RoundOutcome::Aggregated);
        assert_eq!(r.model_hash, e.global().content_hash());
    }
}

#[test]
fn a_result_older_than_max_staleness_is_refused_and_frees_the_device() {
    let mut e = engine(5, cfg(3, 3, 2, StalenessWeight::Constant));
    let [_, _, x] = stale_scene(&mut e);
    let before = e.in_flight();
    let err = e.handle_train_result(S, x.0, &result(&x.1, [1.0, 1.0], 10)).unwrap_err();
    assert_eq!(err, AsyncRejectReason::TooStale { staleness: 3, max: 2 });
    assert_eq!(err.code(), ErrorCode::StaleModel);
    assert_eq!(e.in_flight(), before - 1, "the task ended");
    assert!(!e.holds_task(x.0));
    assert_eq!(e.buffered(), 0);
    // Answered once: a second copy is a duplicate.
    let again = e.handle_train_result(S, x.0, &result(&x.1, [1.0, 1.0], 10)).unwrap_err();
    assert_eq!(again, AsyncRejectReason::Duplicate(x.1.round));
}

#[test]
fn concurrency_is_capped_and_a_slot_frees_per_answer() {
    let mut e = engine(10, cfg(10, 3, 5, StalenessWeight::Constant));
    let first = assigned(&mut e);
    assert_eq!(first.len(), 3);
    assert_eq!(e.in_flight(), 3);
    let devices: BTreeSet<DeviceId> = first.iter().map(|(d, _)| *d).collect();
    assert_eq!(devices.len(), 3, "distinct devices");
    assert!(first.iter().enumerate().all(|(i, (_, t))| t.round == i as u64 + 1 && t.model_version == 0));
    e.handle_train_result(S, first[0].0, &result(&first[0].1, [1.0, 0.0], 1)).unwrap();
    let next = assigned(&mut e);
    assert_eq!(next.len(), 1);
    assert!(!devices.contains(&next[0].0) || next[0].0 == first[0].0, "never a device still training");
    e.handle_train_failure(S, first[1].0);
    assert_eq!(assigned(&mut e).len(), 1);
    // Fewer free devices than slots: all of them, and no more.
    let mut small = engine(2, cfg(10, 5, 5, StalenessWeight::Constant));
    assert_eq!(assigned(&mut small).len(), 2);
    small.handle_device_gone(S, 0);
    assert_eq!(small.in_flight(), 1);
    assert!(assigned(&mut small).is_empty(), "device 0 is gone");
}

#[test]
fn the_version_advances_once_per_k_results() {
    let mut e = engine(20, cfg(4, 6, 10, StalenessWeight::default()));
    let mut versions = Vec::new();
    for i in 0..12 {
        let (d, t) = assigned(&mut e).remove(0);
        e.handle_train_result(i * S, d, &result(&t, [0.1, -0.1], 5)).unwrap();
        versions.push(e.version());
        if (i + 1) % 4 == 0 {
            let r = report(&mut e);
            assert_eq!((r.model_version, r.results, r.samples), (e.version(), 4, 20));
        }
    }
    assert_eq!(versions, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]);
}

#[test]
fn results_from_devices_without_that_task_are_refused() {
    let mut e = engine(4, cfg(2, 2, 5, StalenessWeight::Constant));
    let tasks = assigned(&mut e);
    let (d, t) = &tasks[0];
    let idle = (0..4).find(|i| tasks.iter().all(|(d, _)| d != i)).unwrap();
    let cases = [
        (idle, result(t, [1.0, 1.0], 1), AsyncRejectReason::NotTasked(idle)),
        (99, result(t, [1.0, 1.0], 1), AsyncRejectReason::NotTasked(99)),
        (
            *d,
            TrainResult { round: t.round + 7, ..result(t, [1.0, 1.0], 1) },
            AsyncRejectReason::WrongTask { got_task: t.round + 7, got_version: 0, task: t.round, version: 0 },
        ),
        (
            *d,
            TrainResult { model_version: 1, ..result(t, [1.0, 1.0], 1) },
            AsyncRejectReason::WrongTask { got_task: t.round, got_version: 1, task: t.round, version: 0 },
        ),
    ];
    for (device, r, want) in cases {
        assert_eq!(e.handle_train_result(S, device, &r), Err(want));
    }
    assert_eq!(e.in_flight(), 2, "refusals for another task end nothing");
    // Wrong shape, then NaN: the synchronous engine's checks, and the task ends.
    let wrong = TrainResult { delta: ModelParams::zeros(layout(3)), ..result(t, [0.0, 0.0], 1) };
    assert_eq!(e.handle_train_result(S, *d, &wrong), Err(AsyncRejectReason::Invalid(AggregateError::LayoutMismatch)));
    let (d2, t2) = &tasks[1];
    let nan = result(t2, [f32::NAN, 0.0], 1);
    let err = e.handle_train_result(S, *d2, &nan).unwrap_err();
    assert!(matches!(err, AsyncRejectReason::Invalid(AggregateError::NonFinite(0))), "{err}");
    assert_eq!(err.code(), ErrorCode::InvalidUpdate);
    assert_eq!((e.in_flight(), e.buffered(), e.version()), (0, 0, 0));
}

#[test]
fn claims_are_capped_and_deltas_clipped_as_in_the_synchronous_engine() {
    let mut config = cfg(2, 2, 5, StalenessWeight::Constant);
    config.max_samples_per_result = 10;
    config.train.clip_norm = Some(1.0);
    let mut e = engine(2, config);
    let tasks = assigned(&mut e);
    // [3, 4] (norm 5) clipped to [0.6, 0.8], claiming 10^9 samples (counts 10); [0, 0] x 10.
    e.handle_train_result(S, tasks[0].0, &result(&tasks[0].1, [3.0, 4.0], 1_000_000_000)).unwrap();
    e.handle_train_result(S, tasks[1].0, &result(&tasks[1].1, [0.0, 0.0], 10)).unwrap();
    assert_eq!(report(&mut e).samples, 20);
    let got = e.global().data();
    assert!((got[0] - 0.3).abs() < 1e-6 && (got[1] - 0.4).abs() < 1e-6, "{got:?}");
}

#[test]
fn seeded_engines_task_the_same_devices() {
    let order = |seed| {
        let mut e = engine(50, AsyncConfig { seed, ..cfg(2, 4, 5, StalenessWeight::Constant) });
        let mut out = Vec::new();
        for _ in 0..10 {
            let (d, t) = assigned(&mut e).remove(0);
            out.push(d);
            let before = e.version();
            e.handle_train_result(S, d, &result(&t, [0.0, 0.0], 1)).unwrap();
            if e.version() != before {
                report(&mut e);
            }
        }
        out
    };
    assert_eq!(order(7), order(7));
    assert_ne!(order(7), order(8));
}

#[test]
fn bad_configs_are_refused_in_one_line() {
    let d = AsyncConfig::default();
    let cases: [(AsyncConfig, &str); 12] = [
        (AsyncConfig { buffer_size: 0, ..d.clone() }, "buffer_size must be 1 to"),
        (AsyncConfig { max_concurrency: 0, ..d.clone() }, "max_concurrency must be 1 to"),
        (AsyncConfig { server_lr: 0.0, ..d.clone() }, "server_lr must be positive"),
        (AsyncConfig { server_lr: f64::NAN, ..d.clone() }, "server_lr must be positive"),
        (
            AsyncConfig { staleness: StalenessWeight::Polynomial { exponent: -1.0 }, ..d.clone() },
            "staleness exponent must be in [0, 1e6], got -1",
        ),
        (
            AsyncConfig { staleness: StalenessWeight::Hinge { a: f64::INFINITY, b: 1 }, ..d.clone() },
            "hinge slope a must be in",
        ),
        (AsyncConfig { max_samples_per_result: 0, ..d.clone() }, "max_samples_per_result must be at least 1"),
        (AsyncConfig { train: TrainConfig { epochs: 0, ..d.train }, ..d.clone() }, "epochs must be at least 1"),
        (
            AsyncConfig {
                train: TrainConfig {
                    clip_norm: Some(1.0),
                    local_dp: Some(fedge_core::wire::LocalDp { epsilon: 1.0, delta: 1e-5 }),
                    ..d.train
                },
                ..d.clone()
            },
            "local DP is not offered in asynchronous (FedBuff) mode",
        ),
        (
            AsyncConfig {
                privacy: Some(CentralDp {
                    adaptive: Some(fedge_core::privacy::AdaptiveClipConfig {
                        target_quantile: 0.5,
                        learning_rate: 0.2,
                        count_noise_fraction: 0.05,
                    }),
                    ..dp(1.0, None)
                }),
                train: TrainConfig { clip_norm: Some(1.0), ..d.train },
                ..d.clone()
            },
            "adaptive clipping is not offered",
        ),
        (
            AsyncConfig {
                privacy: Some(dp(1.0, None)),
                train: TrainConfig { clip_norm: Some(1.0), ..d.train },
                server_lr: 2.0,
                ..d.clone()
            },
            "server_lr must be 1",
        ),
        (
            AsyncConfig {
                privacy: Some(dp(-1.0, None)),
                train: TrainConfig { clip_norm: Some(1.0), ..d.train },
                ..d.clone()
            },
            "invalid privacy settings",
        ),
    ];
    for (c, want) in cases {
        let got = c.validate().unwrap_err().to_string();
        assert!(got.contains(want), "{got}");
        assert!(!got.contains('\n'));
        assert!(BufferedEngine::new(c, params([0.0, 0.0]), noise()).is_err());
    }
    d.validate().unwrap();
}

fn dp(z: f64, target_epsilon: Option<f64>) -> CentralDp {
    CentralDp { noise_multiplier: z, clip_norm: 1.0, adaptive: None, delta: 1e-5, target_epsilon }
}

fn dp_cfg(buffer_size: usize, z: f64, target_epsilon: Option<f64>, staleness: StalenessWeight) -> AsyncConfig {
    AsyncConfig {
        buffer_size,
        max_concurrency: 10,
        max_staleness: 10,
        staleness,
        train: TrainConfig { clip_norm: Some(1.0), ..AsyncConfig::default().train },
        privacy: Some(dp(z, target_epsilon)),
        ..AsyncConfig::default()
    }
}

/// DP-FedBuff by hand, noise tiny so the arithmetic shows: each delta clipped to C = 1 by the
/// server, scaled by its staleness weight, counted once whatever its sample claim, and the sum
/// divided by K.
#[test]
fn under_dp_each_delta_is_clipped_weighted_counted_once_and_divided_by_k() {
    let mut e = engine(3, dp_cfg(2, 1e-9, None, StalenessWeight::Polynomial { exponent: 1.0 }));
    let t = assigned(&mut e);
    assert_eq!(t.len(), 3);
    // Fresh: norm 5 -> clipped to (0.6, 0.8); 1000 samples weigh no more than 1.
    e.handle_train_result(S, t[0].0, &result(&t[0].1, [3.0, 4.0], 1000)).unwrap();
    e.handle_train_result(S, t[1].0, &result(&t[1].1, [0.5, 0.0], 1)).unwrap();
    let r = report(&mut e);
    assert_eq!((r.model_version, r.outcome.clone()), (1, RoundOutcome::Aggregated));
    let g = e.global().data().to_vec();
    assert!((g[0] - 0.55).abs() < 1e-6 && (g[1] - 0.4).abs() < 1e-6, "{g:?}"); // ((0.6 + 0.5) / 2, 0.8 / 2)
    // One Gaussian release at q = 1 so far.
    let one = fedge_core::privacy::PrivacyLedger::new(1e-5).unwrap().preview(1.0, 1e-9, 1).unwrap().epsilon;
    assert_eq!(r.epsilon, Some(one));
    // Stale by one (w = 1/2): (2, 0) clips to (1, 0), then halves; the next result is fresh.
    let stale = t[2].clone();
    let next = assigned(&mut e);
    e.handle_train_result(2 * S, stale.0, &result(&stale.1, [2.0, 0.0], 5)).unwrap();
    let (d, task) = next.iter().find(|(d, _)| *d != stale.0).unwrap().clone();
    e.handle_train_result(2 * S, d, &result(&task, [0.0, 0.2], 5)).unwrap();
    let r = report(&mut e);
    assert_eq!(r.model_version, 2);
    let g = e.global().data().to_vec();
    assert!((g[0] - 0.8).abs() < 1e-6 && (g[1] - 0.5).abs() < 1e-6, "{g:?}"); // + (0.5 / 2, 0.2 / 2)
    assert_eq!(e.ledger().unwrap().entries().len(), 2);
}

/// The noise is there: with z = 1 and K = 1, the step is the clipped delta plus N(0, 1) per
/// coordinate, so over many aggregations the steps' spread is about 1.
#[test]
fn under_dp_the_noise_has_the_stated_scale() {
    let mut e = engine(1, AsyncConfig { max_staleness: 1000, ..dp_cfg(1, 1.0, None, StalenessWeight::Constant) });
    let mut sq = 0.0f64;
    let n = 400;
    for _ in 0..n {
        let before = e.global().data().to_vec();
        let (d, task) = assigned(&mut e).pop().unwrap();
        e.handle_train_result(S, d, &result(&task, [0.0, 0.0], 1)).unwrap();
        report(&mut e);
        let after = e.global().data();
        sq += after.iter().zip(&before).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
    }
    let std = (sq / (2 * n) as f64).sqrt();
    assert!((0.9..1.1).contains(&std), "noise std {std}");
}

/// Under DP a device with a result in the open buffer is not tasked again until it is
/// aggregated (one device moves one release by at most C); without DP it is.
#[test]
fn under_dp_a_device_contributes_once_per_buffer() {
    for private in [true, false] {
        let mut c = dp_cfg(3, 1e-9, None, StalenessWeight::Constant);
        if !private {
            c.privacy = None;
        }
        let mut e = engine(2, c);
        let t = assigned(&mut e);
        assert_eq!(t.len(), 2);
        e.handle_train_result(S, t[0].0, &result(&t[0].1, [0.1, 0.0], 1)).unwrap();
        let again: Vec<DeviceId> = assigned(&mut e).into_iter().map(|(d, _)| d).collect();
        assert_eq!(again.contains(&t[0].0), !private, "private {private}: {again:?}");
        if private {
            // The other device's result fills the buffer only with a third device: none, so
            // after its result both wait and nothing is tasked.
            e.handle_train_result(S, t[1].0, &result(&t[1].1, [0.1, 0.0], 1)).unwrap();
            assert!(assigned(&mut e).is_empty());
            assert_eq!(e.buffered(), 2);
        }
    }
}

/// The ledger charges each aggregation as a Gaussian release at q = 1, and a budget stops the
/// engine before the aggregation that would pass it: no more tasks, late results refused.
#[test]
fn under_dp_the_budget_stops_before_the_aggregation_that_would_pass_it() {
    let ledger = fedge_core::privacy::PrivacyLedger::new(1e-5).unwrap();
    let z = 2.0;
    let (e3, e4) = (ledger.preview(1.0, z, 3).unwrap().epsilon, ledger.preview(1.0, z, 4).unwrap().epsilon);
    let target = (e3 + e4) / 2.0;
    let mut e = engine(4, AsyncConfig { max_staleness: 1000, ..dp_cfg(1, z, Some(target), StalenessWeight::Constant) });
    let mut held = Vec::new();
    for i in 0..3u64 {
        let mut t = assigned(&mut e);
        held.append(&mut t);
        let (d, task) = held.remove(0);
        e.handle_train_result(S * (i as u32 + 1), d, &result(&task, [0.1, 0.0], 1)).unwrap();
        let r = report(&mut e);
        assert_eq!(r.model_version, i + 1);
    }
    assert!((e.epsilon().unwrap() - e3).abs() < 1e-9, "{:?} vs {e3}", e.epsilon());
    assert_eq!(e.budget_spent(), Some((e.epsilon().unwrap(), target)));
    assert!(assigned(&mut e).is_empty(), "no task past the budget");
    let (d, task) = held.remove(0);
    let err = e.handle_train_result(4 * S, d, &result(&task, [0.1, 0.0], 1)).unwrap_err();
    assert!(matches!(err, AsyncRejectReason::BudgetSpent { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::NotSelected);
    assert_eq!((e.version(), e.ledger().unwrap().entries().len()), (3, 3));
}

#[test]
fn a_restored_engine_refilled_with_the_stored_buffer_aggregates_as_the_first_would() {
    // One engine runs a buffer of 3 straight through; another is killed after two results
    // and restored from what a driver stores (the version, the aggregations, the buffered results).
    let config = AsyncConfig { one_per_device: true, ..cfg(3, 3, 5, StalenessWeight::Polynomial { exponent: 0.5 }) };
    let mut straight = engine(3, config.clone());
    // Version 1 first: the restored engine starts from a version and aggregation count > 0.
    let first = assigned(&mut straight);
    for (d, t) in &first {
        straight.handle_train_result(S, *d, &result(t, [0.1, 0.1], 10)).unwrap();
    }
    assert_eq!(report(&mut straight).aggregation, 1);
    let second = assigned(&mut straight);
    assert_eq!(second.len(), 3);
    let deltas = [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]];
    // What the driver stored: the results acknowledged into the open buffer.
    let mut stored = Vec::new();
    for ((d, t), delta) in second.iter().zip(deltas).take(2) {
        let r = result(t, delta, 10);
        straight.handle_train_result(2 * S, *d, &r).unwrap();
        stored.push((*d, r));
    }
    let mut restored = BufferedEngine::restore(config.clone(), straight.global().clone(), 1, 1, noise()).unwrap();
    for d in 0..3 {
        restored.handle_device_available(d);
    }
    restored.refill(2 * S, &stored).unwrap();
    assert_eq!((restored.buffered(), restored.aggregations(), restored.version()), (2, 1, 1));
    // One per device: only the third device gets a task, and the same device again is refused.
    let tasks = assigned(&mut restored);
    assert_eq!(tasks.iter().map(|(d, _)| *d).collect::<Vec<_>>(), vec![second[2].0]);
    assert!(matches!(restored.refill(2 * S, &stored[..1]), Err((_, AsyncRejectReason::Duplicate(_)))));
    let (d, t) = (&second[2].0, &second[2].1);
    straight.handle_train_result(3 * S, *d, &result(t, deltas[2], 10)).unwrap();
    restored.handle_train_result(3 * S, *d, &result(&tasks[0].1, deltas[2], 10)).unwrap();
    let (a, b) = (report(&mut straight), report(&mut restored));
    assert_eq!((a.aggregation, b.aggregation), (2, 2));
    assert_eq!(straight.global(), restored.global());
    assert_eq!((a.model_hash, a.results, a.samples), (b.model_hash, b.results, b.samples));
}

#[test]
fn refill_refuses_what_could_not_have_been_accepted() {
    let config = cfg(5, 5, 2, StalenessWeight::Constant);
    let mut e = BufferedEngine::restore(config, params([0.0, 0.0]), 4, 4, noise()).unwrap();
    let at = |version, delta: [f32; 2]| TrainResult {
        round: 1,
        model_version: version,
        num_samples: 1,
        train_loss: 0.1,
        delta: params(delta),
        clipped: false,
    };
    assert!(matches!(
        e.refill(S, &[(1, at(1, [0.0, 0.0]))]),
        Err((1, AsyncRejectReason::TooStale { staleness: 3, max: 2 }))
    ));
    assert!(matches!(e.refill(S, &[(1, at(5, [0.0, 0.0]))]), Err((1, AsyncRejectReason::TooStale { .. }))));
    assert!(matches!(e.refill(S, &[(2, at(4, [f32::NAN, 0.0]))]), Err((2, AsyncRejectReason::Invalid(_)))));
    assert_eq!(e.buffered(), 0);
    e.refill(S, &[(1, at(3, [1.0, 1.0])), (2, at(4, [1.0, 1.0]))]).unwrap();
    assert_eq!(e.buffered(), 2);
}

#[test]
fn with_tasking_off_no_task_is_handed_out_and_results_still_count() {
    let mut e = engine(4, cfg(2, 4, 5, StalenessWeight::Constant));
    let tasks = assigned(&mut e);
    assert_eq!(tasks.len(), 4);
    e.set_tasking(false);
    let (d, t) = &tasks[0];
    e.handle_train_result(S, *d, &result(t, [1.0, 0.0], 1)).unwrap();
    assert!(e.poll_event().is_none(), "a slot is free but tasking is off");
    let (d, t) = &tasks[1];
    e.handle_train_result(S, *d, &result(t, [1.0, 0.0], 1)).unwrap();
    assert_eq!(report(&mut e).outcome, RoundOutcome::Aggregated);
    assert!(e.poll_event().is_none());
    e.set_tasking(true);
    assert_eq!(assigned(&mut e).len(), 2);
}

#[test]
fn student_versions_take_numbers_but_not_staleness() {
    let mut e = engine(3, cfg(1, 3, 5, StalenessWeight::Constant));
    let tasks = assigned(&mut e);
    let (d0, t0) = &tasks[0];
    e.handle_train_result(S, *d0, &result(t0, [1.0, 0.0], 1)).unwrap();
    assert_eq!(report(&mut e).model_version, 1);
    // A student takes version 2; the next aggregation is version 3. A result from the current
    // version (none since) has staleness 0 with a student on the books.
    assert_eq!(e.allocate_version(), 2);
    assert_eq!(e.staleness(1), 0);
    let (d1, t1) = &tasks[1];
    e.handle_train_result(S, *d1, &result(t1, [1.0, 0.0], 1)).unwrap();
    let r = report(&mut e);
    assert_eq!((r.aggregation, r.model_version), (2, 3));
    // Trained from version 0 with two aggregations since (versions 1 and 3): staleness 2,
    // not 3.
    let (d2, t2) = &tasks[2];
    e.handle_train_result(S, *d2, &result(t2, [1.0, 0.0], 1)).unwrap();
    let r = report(&mut e);
    assert_eq!((r.model_version, r.max_staleness), (4, 2));
    // After a restart the student's number stays taken and skipped.
    let mut restored =
        BufferedEngine::restore(cfg(1, 3, 5, StalenessWeight::Constant), e.global().clone(), 4, 3, noise()).unwrap();
    restored.reserve_versions_through(5, [2, 5]);
    assert_eq!(restored.allocate_version(), 6);
}
