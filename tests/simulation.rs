//! End-to-end simulations on real data: the round engine, the edge trainer and burn together.

use fedge_sim::config::{PartitionKind, SimConfig};
use fedge_sim::run::Quiet;
use fedge_tests::shared_data_dir;

fn small(rounds: u64) -> SimConfig {
    SimConfig { devices: 50, fraction: 0.1, rounds, epochs: 2, workers: 2, ..SimConfig::default() }
}

#[test]
fn short_simulation_learns_far_above_chance() {
    let out = fedge_sim::run(&small(3), None, &mut Quiet).unwrap();
    assert_eq!(out.rounds.len(), 3);
    assert_eq!(out.summary.model_version, 3);
    let acc: Vec<f64> = out.rounds.iter().map(|r| r.accuracy.unwrap()).collect();
    assert!(acc[2] > 0.75, "accuracy {acc:?}");
    assert!(out.rounds.iter().all(|r| r.selected == 5 && r.results == 5 && r.samples == 5 * 200));
    assert_eq!(out.summary.parameters, 199_210);
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: u64, workers: usize| {
        let out = dir.path().join(name);
        let c = SimConfig { seed, workers, partition: PartitionKind::Dirichlet, alpha: 0.5, ..small(3) };
        let o = fedge_sim::run(&c, Some(&out), &mut Quiet).unwrap();
        (std::fs::read(out.join("rounds.csv")).unwrap(), o.summary.model_hash)
    };
    let a = run("a", 7, 2);
    let b = run("b", 7, 3);
    let c = run("c", 8, 2);
    assert_eq!(a, b, "same seed, different worker count: same CSV and model");
    assert_ne!(a.0, c.0);
    assert_eq!(
        String::from_utf8(a.0).unwrap().lines().next().unwrap(),
        "round,accuracy,loss,train_loss,model_version,selected,results,failures,samples,aggregated,virtual_start_s,virtual_duration_s,clip_norm,epsilon,mean_staleness,max_staleness,attackers"
    );
}

fn dp(rounds: u64) -> SimConfig {
    SimConfig {
        devices: 100,
        fraction: 0.1,
        rounds,
        epochs: 1,
        workers: 2,
        clip_norm: Some(1.0),
        noise_multiplier: Some(1.0),
        ..SimConfig::default()
    }
}

#[test]
fn central_dp_reports_the_accountants_epsilon_each_round_and_stops_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = fedge_sim::run(&dp(3), Some(dir.path()), &mut Quiet).unwrap();
    for (i, r) in out.rounds.iter().enumerate() {
        // q = 10 devices per round / 100.
        let want = fedge_core::privacy::epsilon(0.1, 1.0, i as u64 + 1, 1e-5).unwrap().epsilon;
        assert!((r.epsilon.unwrap() - want).abs() < 1e-12, "round {}: {:?} vs {want}", r.round, r.epsilon);
        assert_eq!(r.clip_norm, Some(1.0));
    }
    assert_eq!(out.summary.epsilon, out.rounds[2].epsilon);
    assert_eq!(out.summary.sampling_rate, Some(0.1));
    let csv = std::fs::read_to_string(dir.path().join("rounds.csv")).unwrap();
    let last = csv.lines().last().unwrap();
    // clip_norm, epsilon, the (empty, sync mode) staleness columns, attackers.
    assert!(last.ends_with(&format!(",1.0,{},,,0", out.rounds[2].epsilon.unwrap())), "{last}");

    // A budget between the epsilon of round 2 and of round 3: the run stops after round 2.
    let budget = (out.rounds[1].epsilon.unwrap() + out.rounds[2].epsilon.unwrap()) / 2.0;
    let stopped = fedge_sim::run(&SimConfig { target_epsilon: Some(budget), ..dp(3) }, None, &mut Quiet).unwrap();
    assert_eq!(stopped.rounds.len(), 2);
    assert!(stopped.summary.epsilon.unwrap() <= budget);

    // The noise is really added: a vanishing multiplier gives another model.
    let quiet = fedge_sim::run(&SimConfig { noise_multiplier: Some(1e-6), ..dp(3) }, None, &mut Quiet).unwrap();
    assert_ne!(quiet.summary.model_hash, out.summary.model_hash);
    assert!(quiet.summary.epsilon.unwrap() > 1e6, "z = 1e-6 buys no privacy");
}

#[test]
fn adaptive_clipping_moves_the_clip_and_local_dp_runs() {
    let adaptive = fedge_core::privacy::AdaptiveClipConfig {
        target_quantile: 0.5,
        learning_rate: 0.2,
        count_noise_fraction: 0.05,
    };
    // 10 devices a round: the paper's m/20 is too little count noise to fit in z = 1.
    let err = SimConfig { clip_norm: Some(100.0), adaptive_clip: Some(adaptive), ..dp(3) }.validate().unwrap_err();
    assert!(err.to_string().contains("count noise"), "{err}");
    // 50 devices a round: count noise std 2.5, and the clip's steps show through it.
    let c = SimConfig {
        clip_norm: Some(30.0),
        noise_multiplier: Some(0.05),
        adaptive_clip: Some(adaptive),
        fraction: 0.5,
        ..dp(3)
    };
    let out = fedge_sim::run(&c, None, &mut Quiet).unwrap();
    assert!(out.rounds.iter().all(|r| r.results == 50), "{:?}", out.rounds);
    let clips: Vec<f64> = out.rounds.iter().map(|r| r.clip_norm.unwrap()).collect();
    // Every delta is far below 30, so the clip shrinks each round by about exp(-0.2 * 0.5).
    assert_eq!(clips[0], 30.0);
    assert!(clips[1] < 100.0 && clips[2] < clips[1], "{clips:?}");

    let local = SimConfig { noise_multiplier: None, local_epsilon: Some(8.0), ..dp(2) };
    let out = fedge_sim::run(&local, None, &mut Quiet).unwrap();
    assert_eq!(out.rounds.len(), 2);
    assert!(out.rounds.iter().all(|r| r.epsilon.is_none() && r.aggregated));
}

#[test]
fn a_thousand_devices_with_dropouts_and_noise() {
    let c = SimConfig {
        devices: 1000,
        fraction: 0.02,
        rounds: 5,
        dropout: 0.3,
        clip_norm: Some(5.0),
        noise_multiplier: Some(0.01),
        workers: 2,
        ..SimConfig::default()
    };
    let out = fedge_sim::run(&c, None, &mut Quiet).unwrap();
    assert_eq!(out.partition.sizes.len(), 1000);
    assert!(out.partition.sizes.iter().all(|&s| s == 10));
    for r in &out.rounds {
        assert_eq!(r.selected, 20);
        assert_eq!(r.results + r.failures, 20);
    }
    assert!(out.rounds.iter().map(|r| r.failures).sum::<usize>() > 10, "30% dropout over 5x20 devices");
    assert!(out.summary.final_accuracy > 0.4, "{}", out.summary.final_accuracy);
}

#[test]
fn pathological_shards_on_real_mnist() {
    let c = SimConfig {
        dataset: fedge_core::dataset::DatasetName::Mnist,
        data_dir: shared_data_dir(),
        partition: PartitionKind::Shards,
        devices: 100,
        rounds: 1,
        epochs: 1,
        workers: 2,
        ..SimConfig::default()
    };
    let out = fedge_sim::run(&c, None, &mut Quiet).unwrap();
    // 200 shards of 300: every device has 600 examples from 2 shards; a shard straddles at
    // most one label boundary, so a device sees at most 4 labels and most see 1 or 2.
    assert!(out.partition.sizes.iter().all(|&s| s == 600));
    assert!(out.partition.label_histograms.iter().all(|h| h.iter().filter(|&&n| n > 0).count() <= 4));
    assert!(out.partition.mean_labels_per_device() < 2.3, "{}", out.partition.mean_labels_per_device());
    assert_eq!(out.rounds[0].samples, 6000);
}

#[test]
fn more_shards_than_samples_is_a_clear_error() {
    let c = SimConfig { devices: 1000, partition: PartitionKind::Shards, shards_per_device: 20, ..small(1) };
    let err = fedge_sim::run(&c, None, &mut Quiet).unwrap_err().to_string();
    assert_eq!(err, "partition: cannot cut 10000 samples into 20000 shards: more shards than samples");
}

#[test]
fn distillation_gives_a_small_int8_student_close_to_the_teacher() {
    let c = SimConfig { rounds: 10, workers: 2, distill_every: Some(5), proxy_examples: 3000, ..SimConfig::default() };
    let out = fedge_sim::run(&c, None, &mut Quiet).unwrap();
    let s = &out.summary;
    // 3000 of the 10,000 embedded training images are the proxy set, not device data.
    assert_eq!(out.partition.sizes.iter().sum::<usize>(), 7000);
    let (teacher, student) = (s.teacher_accuracy.unwrap(), s.student_accuracy.unwrap());
    assert_eq!(teacher, s.final_accuracy);
    assert_eq!(s.student_parameters, Some(101_770));
    // Size target: at most a quarter of the teacher's bytes (int8 MLP vs f32 2NN: about 6.5%).
    assert!(s.student_bytes.unwrap() * 4 <= s.teacher_bytes.unwrap(), "{:?} vs {:?}", s.student_bytes, s.teacher_bytes);
    // Accuracy: within 1.5 points of the teacher on this short run (docs/benchmarks.md has
    // the full figures); int8 within half a point of the f32 student.
    assert!(student > teacher - 0.015, "student {student} vs teacher {teacher}");
    assert!((student - s.student_f32_accuracy.unwrap()).abs() < 0.005);
}

/// Issue 13: a device too slow for the deadline misses the round in simulation exactly as the
/// round engine decides when the coordinator's deadline timer drives it: results due by the
/// deadline, then `handle_timeout` at the deadline, then the late one. With a quorum of 1 the
/// round aggregates without the slow device; with a quorum of every device it fails.
#[test]
fn issue_13_a_slow_device_misses_the_deadline_as_the_engine_decides() {
    use fedge_core::codec;
    use fedge_core::wire::{DeviceId, Message, TrainResult};
    use fedge_engine::{EngineEvent, RoundEngine, RoundOutcome, RoundReport, strategy};
    use fedge_sim::devices::SpeedModel;
    use std::time::Duration;

    for quorum in [1, 10] {
        let c = SimConfig {
            devices: 10,
            fraction: 1.0,
            rounds: 2,
            epochs: 1,
            workers: 2,
            min_train_clients: quorum,
            round_timeout_s: 30.0,
            speed: SpeedModel { straggler_fraction: 0.1, straggler_slowdown: 100.0, ..SpeedModel::default() },
            ..SimConfig::default()
        };
        let speeds = c.speed.draw(c.devices, c.seed);
        let slow: Vec<DeviceId> = (0..c.devices as DeviceId).filter(|&d| speeds[d as usize].straggler).collect();
        assert_eq!(slow.len(), 1);
        let out = fedge_sim::run(&c, None, &mut Quiet).unwrap();
        assert_eq!(out.traces.len(), 2);

        // The same events, fed to a fresh engine directly.
        let layout = out.global.layout().clone();
        let initial = fedge_core::ModelParams::zeros(layout.clone());
        let model_bytes =
            codec::encode(&Message::Model { version: 0, hash: initial.content_hash(), params: initial.clone() }).len()
                as u64;
        let config = c.engine_config().unwrap();
        let noise = Box::new(fedge_core::rng::derive_rng(c.seed, &[fedge_core::rng::stream::SERVER_NOISE]));
        let strategy = strategy::build(&config, noise);
        let mut engine = RoundEngine::new(config, strategy, initial).unwrap();
        for d in 0..c.devices as DeviceId {
            engine.handle_device_available(d);
        }
        let mut now = Duration::ZERO;
        for trace in &out.traces {
            assert_eq!(trace.start, now);
            let round = engine.start_round(now).unwrap();
            let mut due = Vec::new();
            while let Some(EngineEvent::Assign { device, task }) = engine.poll_event() {
                let samples = out.partition.sizes[device as usize] as u64;
                let at = now + speeds[device as usize].round_trip(model_bytes, samples);
                let result = TrainResult {
                    round,
                    model_version: task.model_version,
                    num_samples: samples,
                    train_loss: 0.5,
                    delta: fedge_core::ModelParams::zeros(layout.clone()),
                    clipped: false,
                };
                due.push((at, device, result));
            }
            let deadline = engine.poll_timeout().unwrap();
            assert_eq!(deadline, trace.deadline);
            assert_eq!(deadline, now + Duration::from_secs(30));
            // The coordinator: results as they come until the deadline, then its timer fires.
            for (at, device, result) in due.iter().filter(|d| d.0 <= deadline) {
                engine.handle_train_result(*at, *device, result).unwrap();
            }
            engine.handle_timeout(deadline);
            for (at, device, result) in due.iter().filter(|d| d.0 > deadline) {
                assert!(engine.handle_train_result(*at, *device, result).is_err(), "late: refused");
                assert_eq!(*device, slow[0]);
            }
            let Some(EngineEvent::RoundClosed(direct)) = engine.poll_event() else { panic!("round closed") };
            // Everything but what the (different) deltas and losses change.
            let strip = |r: &RoundReport| RoundReport { model_hash: direct.model_hash, train_loss: 0.0, ..r.clone() };
            assert_eq!(strip(&trace.report), strip(&direct));
            assert_eq!(trace.report.stragglers, slow);
            assert_eq!((trace.report.results, trace.report.closed_at), (9, deadline));
            assert_eq!(trace.report.outcome == RoundOutcome::Aggregated, quorum == 1, "{:?}", trace.report.outcome);
            // The simulator delivered the same arrivals, in time order, the slow one refused.
            let mut want: Vec<(Duration, DeviceId)> = due.iter().map(|d| (d.0, d.1)).collect();
            want.sort();
            let got: Vec<(Duration, DeviceId)> = trace.arrivals.iter().map(|a| (a.at, a.device)).collect();
            assert_eq!(got, want);
            assert!(trace.arrivals.iter().all(|a| a.accepted == (a.device != slow[0])));
            now = direct.closed_at;
        }
        let row = &out.rounds[1];
        assert_eq!((row.results, row.failures, row.virtual_start_s, row.virtual_duration_s), (9, 1, 30.0, 30.0));
        assert_eq!(out.summary.virtual_seconds, 60.0);
    }
}

/// Issue 13: virtual time is a function of the seed and the speed model only.
#[test]
fn issue_13_virtual_durations_are_seeded_and_follow_the_speed_model() {
    use fedge_sim::devices::SpeedModel;
    let c = SimConfig {
        devices: 20,
        fraction: 0.5,
        rounds: 2,
        epochs: 1,
        workers: 2,
        speed: SpeedModel { compute_sigma: 0.8, bandwidth_sigma: 0.5, ..SpeedModel::default() },
        ..SimConfig::default()
    };
    let times = |c: &SimConfig| {
        let o = fedge_sim::run(c, None, &mut Quiet).unwrap();
        for t in &o.traces {
            // Everyone answered in time: the round closed with the last arrival.
            assert_eq!(t.report.closed_at, t.arrivals.iter().map(|a| a.at).max().unwrap());
            assert!(t.arrivals.windows(2).all(|w| w[0].at <= w[1].at), "delivered in time order");
        }
        let rows: Vec<(f64, f64)> = o.rounds.iter().map(|r| (r.virtual_start_s, r.virtual_duration_s)).collect();
        (rows, o.summary.virtual_seconds)
    };
    let a = times(&c);
    assert_eq!(a, times(&SimConfig { workers: 1, ..c.clone() }), "same seed, same virtual times");
    assert_eq!(a.0[1].0, a.0[0].1, "round 2 starts when round 1 closed");
    assert_ne!(a, times(&SimConfig { seed: 1, ..c.clone() }));
    let slower = times(&SimConfig { speed: SpeedModel { compute_samples_per_s: 100.0, ..c.speed }, ..c.clone() });
    assert!(slower.1 > a.1 + 10.0, "{slower:?} vs {a:?}");
    let wider = times(&SimConfig { speed: SpeedModel { upload_mbps: 50.0, ..c.speed }, ..c.clone() });
    assert!(wider.1 < a.1, "{wider:?} vs {a:?}");
}
