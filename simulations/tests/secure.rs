//! `secure_aggregation = true` end to end: SecAgg+ among each round's reporting devices, the
//! real engine and trainer on the embedded dataset (2NN, 20 devices).

use std::process::Command;

use fedge_sim::run::Quiet;
use fedge_sim::secure::DEFAULT_LEVELS_PER_CLIP;
use fedge_sim::{SimConfig, run};

const CLIP: f32 = 1.0;

/// Every device every round (500 examples each, so every weight is 1).
fn config(secure: bool, rounds: u64, seed: u64) -> SimConfig {
    SimConfig {
        devices: 20,
        fraction: 1.0,
        rounds,
        epochs: 1,
        workers: 2,
        seed,
        clip_norm: Some(CLIP),
        secure_aggregation: secure,
        ..SimConfig::default()
    }
}

/// One round from the same model: the devices' deltas are the same, so the two global models
/// differ only by quantisation. With `m` devices of weight 1, scale `s` and clip `C`, each
/// summed coordinate is off by less than `m / s` (stochastic rounding moves each device's by
/// less than one step), the summed weight `m C` too, so the mean's coordinate `j` is off by
/// less than `C (m / s)(1 + |mean_j| / C) / (m C - m / s)`.
#[test]
fn one_round_equals_the_plain_run_within_the_quantisation_bound() {
    let plain = run(&config(false, 1, 5), None, &mut Quiet).unwrap();
    let secure = run(&config(true, 1, 5), None, &mut Quiet).unwrap();
    let (rp, rs) = (&plain.rounds[0], &secure.rounds[0]);
    assert!(rp.aggregated && rs.aggregated);
    assert_eq!((rp.results, rs.results, rs.samples), (20, 20, 20 * 500));
    assert!(rs.train_loss.is_nan(), "no device's loss is revealed");
    let (m, s, c) = (20.0f64, f64::from(DEFAULT_LEVELS_PER_CLIP / CLIP), f64::from(CLIP));
    let (mut worst, mut differ) = (0.0f64, 0);
    for (&a, &b) in plain.global.data().iter().zip(secure.global.data()) {
        // The plain model's step is the plain mean; f32 rounding of the model adds a little.
        let bound = c * (m / s) * (1.0 + f64::from(a).abs() / c) / (m * c - m / s) + 1e-6;
        let err = f64::from(a - b).abs();
        assert!(err <= bound, "coordinate off by {err}, bound {bound}");
        worst = worst.max(err / bound);
        differ += usize::from(a != b);
    }
    assert!(differ > 0, "quantisation changes something");
    assert!(worst > 0.0 && worst <= 1.0, "{worst}");
}

#[test]
fn secure_runs_learn_like_plain_ones_and_are_reproducible_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let go = |name: &str, c: &SimConfig| {
        let out = dir.path().join(name);
        let o = run(c, Some(&out), &mut Quiet).unwrap();
        (o, std::fs::read_to_string(out.join("rounds.csv")).unwrap())
    };
    let (a, csv_a) = go("a", &config(true, 3, 7));
    let (b, csv_b) = go("b", &SimConfig { workers: 1, ..config(true, 3, 7) });
    let (p, _) = go("p", &config(false, 3, 7));
    assert_eq!(csv_a, csv_b, "same seed, other worker count: same rounds.csv");
    assert_eq!(a.summary.model_hash, b.summary.model_hash);
    assert_ne!(a.summary.model_hash, p.summary.model_hash);
    assert!(a.rounds.iter().all(|r| r.aggregated && r.results == 20));
    let (acc_s, acc_p) = (a.summary.final_accuracy, p.summary.final_accuracy);
    assert!(acc_s > 0.75 && (acc_s - acc_p).abs() < 0.01, "secure {acc_s}, plain {acc_p}");
}

/// Devices drop before training and between each SecAgg stage (10% each). Most rounds still
/// aggregate their survivors and the model learns; a round in which some summed or dropped
/// device keeps fewer than `t` share holders fails as a whole (`NotEnoughShares`: with 20
/// devices, degree 14, threshold 8, seed 11 that is round 2), as it would in the field.
#[test]
fn dropouts_between_stages_still_aggregate() {
    let c = SimConfig { dropout: 0.1, ..config(true, 4, 11) };
    let o = run(&c, None, &mut Quiet).unwrap();
    let before: usize = o.traces.iter().map(|t| t.dropped.len()).sum();
    let failed: usize = o.rounds.iter().filter(|r| r.aggregated).map(|r| r.failures).sum();
    let aggregated_before: usize =
        o.traces.iter().zip(&o.rounds).filter(|(_, r)| r.aggregated).map(|(t, _)| t.dropped.len()).sum();
    assert!(failed > aggregated_before, "devices dropped during SecAgg: {failed} failures, {before} before training");
    assert!(o.rounds.iter().all(|r| r.results + r.failures == 20), "{:?}", o.rounds);
    assert!(o.rounds.iter().filter(|r| r.aggregated && r.results < 20).count() >= 3, "{:?}", o.rounds);
    assert!(o.summary.final_accuracy > 0.7, "{}", o.summary.final_accuracy);
}

#[test]
fn refused_combinations_fail_in_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["--secure-aggregation"], "secure_aggregation needs clip_norm"),
        (
            &["--secure-aggregation", "--clip-norm", "1", "--strategy", "trimmed-mean"],
            "strategy `trimmed-mean` needs each update",
        ),
        (
            &["--secure-aggregation", "--clip-norm", "1", "--noise-multiplier", "1"],
            "central DP with secure_aggregation",
        ),
        (&["--secure-aggregation", "--clip-norm", "1", "--mode", "fedbuff"], "mode = \"fedbuff\""),
        (&["--secagg-degree", "4"], "secagg_degree needs secure_aggregation = true"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_fedge-sim")).arg("run").args(*args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
    }
}
