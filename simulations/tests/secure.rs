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
            &["--secure-aggregation", "--clip-norm", "1", "--dp-dropout-tolerance", "0.1"],
            "dp_dropout_tolerance needs noise_multiplier",
        ),
        (
            &["--secure-aggregation", "--clip-norm", "1", "--noise-multiplier", "1", "--dp-dropout-tolerance", "0.95"],
            "dp_dropout_tolerance must be in [0, 0.9], got 0.95",
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

/// Distributed DP: every device adds N(0, sigma^2) with sigma = z C / sqrt(n_min), n_min =
/// ceil(0.8 * 20) = 16, so the sum of 20 carries z sqrt(20 / 16) and the mean over the 20
/// selected has noise of standard deviation z C sqrt(20 / 16) / 20 per coordinate. The same
/// round without noise (every weight is 1, so both means divide the same sum by 20) differs
/// from it by exactly that noise plus quantisation; the ledger charges what was carried.
#[test]
fn distributed_dp_sums_carry_the_stated_noise_and_the_ledger_charges_it() {
    let z = 1.0;
    let noisy = SimConfig { noise_multiplier: Some(z), ..config(true, 1, 5) };
    let dp = run(&noisy, None, &mut Quiet).unwrap();
    let quiet = run(&config(true, 1, 5), None, &mut Quiet).unwrap();
    let diff: Vec<f64> = dp.global.data().iter().zip(quiet.global.data()).map(|(a, b)| f64::from(a - b)).collect();
    let n = diff.len() as f64;
    let mean = diff.iter().sum::<f64>() / n;
    let std = (diff.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let carried = z * (20.0f64 / 16.0).sqrt();
    let want = carried * f64::from(CLIP) / 20.0;
    // 199,210 coordinates: the sample std is within 1% of the true one (quantisation adds
    // 1e-6 at most).
    assert!((std / want - 1.0).abs() < 0.01, "noise std {std}, want {want}");
    assert!(mean.abs() < 5.0 * want / n.sqrt(), "noise mean {mean}");
    let row = &dp.rounds[0];
    assert!(row.aggregated && row.results == 20, "{row:?}");
    let eps = fedge_core::privacy::epsilon(1.0, carried, 1, 1e-5).unwrap().epsilon;
    assert!((row.epsilon.unwrap() - eps).abs() < 1e-9, "{:?} vs {eps}", row.epsilon);
    assert_eq!(dp.summary.sampling_rate, Some(1.0));
    // Fewer survivors than it was sized for: 10% drop before training and at each stage, and
    // the ledger charges the smaller noise the survivors carried.
    let dropping = SimConfig { dropout: 0.1, dp_dropout_tolerance: Some(0.0), ..noisy };
    let o = run(&dropping, None, &mut Quiet).unwrap();
    let r = &o.rounds[0];
    assert!(r.aggregated && r.results < 20, "{r:?}");
    let carried = z * (r.results as f64 / 20.0).sqrt();
    let eps = fedge_core::privacy::epsilon(1.0, carried, 1, 1e-5).unwrap().epsilon;
    assert!((r.epsilon.unwrap() - eps).abs() < 1e-9, "{:?} vs {eps}", r.epsilon);
}
