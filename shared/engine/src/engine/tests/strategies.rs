//! The engine with its strategies: central DP (the ledger, the clip, the budget), robust rules
//! against an attacker, strategies chosen by name and checked, a failed aggregation undone.

use super::*;

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
fn bucketing_through_the_engine_is_seeded_by_the_engine_seed() {
    // Six devices with spread-out updates, two rounds: bucket means depend on the permutation,
    // which depends only on the engine's seed and the round.
    let run = |name: &str, bucket_size: usize, seed: u64| {
        let options = StrategyOptions { bucket_size: Some(bucket_size), ..StrategyOptions::default() };
        let config = with_strategy(name, options, EngineConfig { seed, ..cfg(1.0, 6) }).unwrap();
        let strategy = crate::strategy::build(&config, Box::new(derive_rng(1, &[])));
        let mut e = RoundEngine::new(config, strategy, params([0.0, 0.0])).unwrap();
        (0..6).for_each(|d| e.handle_device_available(d));
        for _ in 0..2 {
            e.start_round(S).unwrap();
            for (device, task) in assigned(&mut e) {
                let d = device as f32;
                e.handle_train_result(S, device, &result(&task, [d * d, 5.0 - 2.0 * d], 1 + device)).unwrap();
            }
            assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated, "{name}");
        }
        e.global().data().to_vec()
    };
    for name in ["median", "trimmed-mean", "krum", "multi-krum", "norm-bound", "centered-clip"] {
        assert_eq!(run(name, 2, 3), run(name, 2, 3), "{name}: the same seed, the same model");
        assert_eq!(run(name, 1, 3), run(name, 1, 4), "{name}: no buckets, nothing drawn");
    }
    let medians: Vec<Vec<f32>> = (0..6).map(|seed| run("median", 2, seed)).collect();
    assert!(medians.iter().any(|m| *m != medians[0]), "seeds permute differently: {medians:?}");
    // One bucket of all six: the sample-weighted mean, whatever the seed (two rounds of it).
    let w: f32 = (0..6u64).map(|d| (1 + d) as f32).sum();
    let mean = |f: fn(f32) -> f32| 2.0 * (0..6u64).map(|d| (1 + d) as f32 * f(d as f32)).sum::<f32>() / w;
    let want = [mean(|d| d * d), mean(|d| 5.0 - 2.0 * d)];
    for seed in 0..3 {
        let got = run("median", 6, seed);
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4), "{got:?} {want:?}");
    }
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

#[test]
fn fltrust_rounds_wait_for_the_servers_reference_and_resume_with_it() {
    let options = StrategyOptions::default();
    let config =
        EngineConfig { strategy: crate::strategy::StrategyConfig::parse("fltrust", &options).unwrap(), ..cfg(1.0, 2) };
    let make = || {
        let strategy = crate::strategy::build(&config, Box::new(derive_rng(1, &[])));
        let mut e = RoundEngine::new(config.clone(), strategy, params([0.0, 0.0])).unwrap();
        for d in 0..3 {
            e.handle_device_available(d);
        }
        e
    };
    let mut e = make();
    assert_eq!(e.wanted_reference(), None, "no round open");
    e.start_round(S).unwrap();
    assert_eq!(e.wanted_reference(), Some((1, 0)));
    let tasks = assigned(&mut e);
    // Two honest devices and one sign-flipping, boosted attacker.
    let deltas = [[1.0, 1.0], [2.0, 0.0], [-100.0, -100.0]];
    for ((d, t), delta) in tasks.iter().zip(deltas) {
        e.handle_train_result(2 * S, *d, &result(t, delta, 10)).unwrap();
    }
    // Every device answered, but the round waits for the reference.
    assert!(e.poll_event().is_none());
    assert_eq!(e.current_round(), Some(1));
    // A reference for another round or of the wrong shape is refused; the round keeps waiting.
    assert!(e.handle_reference(3 * S, 2, &params([1.0, 0.0])).unwrap_err().to_string().contains("round 2 is not open"));
    let wrong = ModelParams::new(
        Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![3] }]).unwrap()),
        vec![1.0; 3],
    )
    .unwrap();
    assert!(e.handle_reference(3 * S, 1, &wrong).is_err());
    assert_eq!(e.wanted_reference(), Some((1, 0)));
    // Reference (1, 0), norm 1: (1, 1) scores 1/sqrt2 and becomes (1, 1)/sqrt2; (2, 0) scores
    // 1 and becomes (1, 0); the attacker scores 0. Step = (s (s, s) + (1, 0)) / (s + 1).
    e.handle_reference(3 * S, 1, &params([1.0, 0.0])).unwrap();
    let r = closed(&mut e);
    assert_eq!(r.outcome, RoundOutcome::Aggregated);
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let want = [(s * s + 1.0) / (s + 1.0), s * s / (s + 1.0)];
    let got = e.global().data();
    assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{got:?} vs {want:?}");

    // Without a reference by the deadline the round fails and the model stays.
    let before = e.global().clone();
    e.start_round(4 * S).unwrap();
    for (d, t) in assigned(&mut e) {
        e.handle_train_result(5 * S, d, &result(&t, [1.0, 0.0], 1)).unwrap();
    }
    e.handle_timeout(4 * S + config.round_timeout);
    let r = closed(&mut e);
    assert!(matches!(&r.outcome, RoundOutcome::Failed(m) if m.contains("never came")), "{:?}", r.outcome);
    assert_eq!(e.global(), &before);

    // After a restart a resumed round folds its stored updates in and waits for a reference.
    let mut e = make();
    let accepted: Vec<(DeviceId, TrainResult)> = {
        let mut first = make();
        first.start_round(S).unwrap();
        assigned(&mut first).into_iter().zip(deltas).map(|((d, t), delta)| (d, result(&t, delta, 10))).collect()
    };
    e.resume_round(S, stored(1, 0, &[0, 1, 2], 3, 3), &accepted).unwrap();
    assert!(assigned(&mut e).is_empty(), "every device had answered");
    assert_eq!(e.wanted_reference(), Some((1, 0)));
    e.handle_reference(2 * S, 1, &params([1.0, 0.0])).unwrap();
    assert_eq!(closed(&mut e).outcome, RoundOutcome::Aggregated);
    assert!((e.global().data()[0] - want[0]).abs() < 1e-6);
}
