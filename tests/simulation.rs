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
        "round,accuracy,loss,train_loss,model_version,selected,results,failures,samples,aggregated,virtual_start_s,virtual_duration_s,clip_norm,epsilon"
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
    assert!(last.ends_with(&format!(",1.0,{}", out.rounds[2].epsilon.unwrap())), "{last}");

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
