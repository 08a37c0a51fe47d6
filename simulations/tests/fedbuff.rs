//! `mode = "fedbuff"` end to end: the buffered asynchronous engine, the real trainer and the
//! virtual clock on the embedded dataset (2NN, 20 devices).

use std::process::Command;

use fedge_sim::config::Mode;
use fedge_sim::devices::SpeedModel;
use fedge_sim::run::Quiet;
use fedge_sim::{SimConfig, run};

/// Heavy-tailed compute (log-normal sigma 1: the slowest of 20 devices several times slower
/// than the median) and compute dominating the transfers.
fn heavy_tailed() -> SpeedModel {
    SpeedModel { compute_samples_per_s: 200.0, compute_sigma: 1.0, ..SpeedModel::default() }
}

/// 5 updates per round (sync) or per aggregation (fedbuff, 5 training at once): the same
/// concurrency and the same number of device updates either way.
fn config(mode: Mode, seed: u64) -> SimConfig {
    SimConfig {
        devices: 20,
        fraction: 0.25,
        rounds: 6,
        epochs: 1,
        workers: 2,
        seed,
        speed: heavy_tailed(),
        mode,
        buffer_size: 5,
        max_concurrency: 5,
        ..SimConfig::default()
    }
}

#[test]
fn fedbuff_learns_and_a_seeded_run_is_reproducible_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let go = |name: &str, c: &SimConfig| {
        let out = dir.path().join(name);
        let o = run(c, Some(&out), &mut Quiet).unwrap();
        (o, std::fs::read_to_string(out.join("rounds.csv")).unwrap())
    };
    let (a, csv_a) = go("a", &config(Mode::Fedbuff, 3));
    let (b, csv_b) = go("b", &SimConfig { workers: 1, ..config(Mode::Fedbuff, 3) });
    let (c, csv_c) = go("c", &config(Mode::Fedbuff, 4));
    assert_eq!(csv_a, csv_b, "same seed, other worker count: same rounds.csv");
    assert_eq!(a.summary.model_hash, b.summary.model_hash);
    assert_eq!(a.summary.virtual_seconds, b.summary.virtual_seconds);
    assert_ne!(csv_a, csv_c, "another seed, another run");
    assert_ne!(a.summary.model_hash, c.summary.model_hash);

    assert_eq!(a.rounds.len(), 6);
    assert_eq!(a.summary.model_version, 6);
    assert!(a.rounds.iter().enumerate().all(|(i, r)| r.model_version == i as u64 + 1 && r.results == 5));
    assert!(a.rounds.iter().all(|r| r.samples == 5 * 500 && r.aggregated));
    assert!(a.rounds.iter().all(|r| r.mean_staleness.is_some() && r.max_staleness.is_some()));
    assert_eq!(a.rounds[0].max_staleness, Some(0), "the first K results all trained on version 0");
    assert!(a.rounds.iter().any(|r| r.max_staleness > Some(0)), "later ones are stale: {:?}", a.rounds);
    let times: Vec<f64> = a.rounds.iter().map(|r| r.virtual_start_s + r.virtual_duration_s).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let acc: Vec<f64> = a.rounds.iter().map(|r| r.accuracy.unwrap()).collect();
    assert!(acc[5] > 0.75, "accuracy {acc:?} (chance is 0.1)");
    assert!(acc[5] > acc[0], "accuracy {acc:?}");
    let header = csv_a.lines().next().unwrap();
    assert!(header.ends_with(",epsilon,mean_staleness,max_staleness,attackers"), "{header}");
    assert_eq!(a.summary.strategy, "fedbuff");
}

/// The point of FedBuff: nobody waits for the slowest device of a round. With the same
/// heavy-tailed fleet, the same concurrency (5) and the same number of device updates (30),
/// the buffered run ends sooner in virtual time.
#[test]
fn fedbuff_reaches_the_same_number_of_updates_sooner_than_sync() {
    let sync = run(&config(Mode::Sync, 3), None, &mut Quiet).unwrap();
    let fedbuff = run(&config(Mode::Fedbuff, 3), None, &mut Quiet).unwrap();
    let updates = |o: &fedge_sim::SimOutput| o.rounds.iter().map(|r| r.results).sum::<usize>();
    assert_eq!((updates(&sync), updates(&fedbuff)), (30, 30));
    let (s, f) = (sync.summary.virtual_seconds, fedbuff.summary.virtual_seconds);
    assert!(f < 0.8 * s, "fedbuff {f} virtual s, sync {s}");
    // And it still learns about as well per update.
    assert!(fedbuff.summary.final_accuracy > sync.summary.final_accuracy - 0.1);
}

#[test]
fn the_mode_and_its_keys_are_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = [
        "run",
        "--mode",
        "fedbuff",
        "--devices",
        "10",
        "--rounds",
        "2",
        "--epochs",
        "1",
        "--buffer-size",
        "3",
        "--max-concurrency",
        "4",
        "--max-staleness",
        "5",
        "--staleness",
        "hinge",
        "--hinge-a",
        "2",
        "--hinge-b",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_fedge-sim")).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("buffer K = 3, at most 4 devices training, staleness weight hinge (max 5)"), "{stdout}");
    assert!(stdout.contains("aggregation 2/2"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["config"]["mode"], "fedbuff");
    assert_eq!(summary["config"]["staleness"], "hinge");
    assert_eq!(summary["model_version"], 2);
    let bad = Command::new(env!("CARGO_BIN_EXE_fedge-sim")).args(["run", "--mode", "async"]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("unknown mode `async`"), "{err}");
}

/// DP-FedBuff end to end: every aggregation charged as one Gaussian release (q = 1), epsilon per
/// row equal to the accountant's for that many releases, and a budget that stops the run before
/// the aggregation that would pass it.
#[test]
fn dp_fedbuff_charges_each_aggregation_and_stops_at_the_budget() {
    let ledger = fedge_core::privacy::PrivacyLedger::new(1e-5).unwrap();
    let z = 3.0;
    let at = |n: u64| ledger.preview(1.0, z, n).unwrap().epsilon;
    let target = (at(4) + at(5)) / 2.0;
    let c = SimConfig {
        clip_norm: Some(1.0),
        noise_multiplier: Some(z),
        target_epsilon: Some(target),
        rounds: 10,
        ..config(Mode::Fedbuff, 2)
    };
    let o = run(&c, None, &mut Quiet).unwrap();
    assert_eq!(o.rounds.len(), 4, "the fifth aggregation would pass the budget");
    for (i, r) in o.rounds.iter().enumerate() {
        let want = at(i as u64 + 1);
        assert!((r.epsilon.unwrap() - want).abs() < 1e-9, "row {i}: {:?} vs {want}", r.epsilon);
    }
    assert!((o.summary.epsilon.unwrap() - at(4)).abs() < 1e-9);
    assert_eq!(o.summary.sampling_rate, Some(1.0));
    // Noise this size swamps four small steps: the model moved, and it is not the plain run's.
    let plain = run(&SimConfig { rounds: 4, ..config(Mode::Fedbuff, 2) }, None, &mut Quiet).unwrap();
    assert_ne!(o.summary.model_hash, plain.summary.model_hash);
}
