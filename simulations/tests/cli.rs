//! The `fedge-sim` binary as a user runs it.

use std::path::Path;
use std::process::Command;

fn sim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-sim")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn run_writes_csv_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (ok, stdout, stderr) =
        sim(&["run", "--rounds", "2", "--devices", "20", "--epochs", "1", "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("round 1/2") && stdout.contains("final accuracy"), "{stdout}");
    assert!(stdout.contains("20 devices over 10000 embedded examples"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in ["final_accuracy", "rounds", "devices", "wall_seconds"] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(summary["rounds"], 2);
    assert_eq!(summary["devices"], 20);
    assert!(out.join("partition.json").is_file());
}

#[test]
fn json_prints_only_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = sim(&[
        "run",
        "--json",
        "--rounds",
        "1",
        "--devices",
        "10",
        "--epochs",
        "1",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["final_accuracy"].as_f64().unwrap() > 0.1);
}

#[test]
fn bad_input_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let unknown = cfg("unknown.toml", "rounds = 2\nlearning_rate = 0.1\n");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let fetch_hint = format!("get it with `fedge-sim fetch-data --out {}`", empty.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--config".into(), unknown], "line 2: unknown field `learning_rate`"),
        (vec!["--config".into(), dir.path().join("nope.toml").to_str().unwrap().into()], "cannot read config"),
        (vec!["--fraction".into(), "0".into()], "fraction must be in (0, 1]"),
        (vec!["--batch-size".into(), "0".into()], "batch size must be at least 1"),
        (vec!["--partition".into(), "shards".into(), "--devices".into(), "6000".into()], "more shards than samples"),
        (
            vec!["--dataset".into(), "mnist".into(), "--data-dir".into(), empty.to_str().unwrap().into()],
            "train-images-idx3-ubyte[.gz]: no such file",
        ),
        (vec!["--dataset".into(), "mnist".into(), "--data-dir".into(), empty.to_str().unwrap().into()], &fetch_hint),
        (vec!["--backend".into(), "wgpu".into()], "not compiled in"),
        (vec!["--upload-mbps=-1".into()], "speed.upload_mbps must be positive and finite, got -1"),
        (vec!["--compute-samples-per-s".into(), "NaN".into()], "speed.compute_samples_per_s must be positive"),
        (vec!["--round-timeout-s".into(), "0".into()], "round_timeout_s must be 0.001 to 604800 seconds (a week)"),
        (vec!["--straggler-fraction".into(), "1.5".into()], "speed.straggler_fraction must be in [0, 1]"),
        (
            vec!["--attack".into(), "evil".into(), "--attackers".into(), "0.2".into()],
            "unknown attack `evil` (expected sign-flip, scale, noise, label-flip, little-is-enough)",
        ),
        (
            vec!["--attack".into(), "noise".into(), "--attackers".into(), "1".into()],
            "attackers must be in [0, 1), got 1",
        ),
        (vec!["--attack".into(), "scale".into()], "attack `scale` needs attackers > 0"),
        (vec!["--attackers".into(), "0.3".into()], "attackers = 0.3 needs an attack"),
        (
            vec!["--attack".into(), "noise".into(), "--attackers".into(), "0.3".into(), "--attack-noise-std=-1".into()],
            "attack_noise_std must be zero or positive and finite, got -1",
        ),
        (
            vec![
                "--attack".into(),
                "scale".into(),
                "--attackers".into(),
                "0.3".into(),
                "--attack-scale".into(),
                "inf".into(),
            ],
            "attack_scale must be finite, got inf",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["run".to_string(), "--out".into(), dir.path().join("o").to_str().unwrap().into()];
        args.extend(extra.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = sim(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{extra:?}: not one line: {stderr}");
        assert!(stderr.matches("idx3-ubyte").count() <= 1, "{extra:?}: names the file twice: {stderr}");
    }
}

#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let c = fedge_sim::SimConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        c.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert!(n >= 5);
    // The default config file is exactly the built-in default.
    let d =
        fedge_sim::SimConfig::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml")).unwrap();
    assert_eq!(d, fedge_sim::SimConfig::default());
}

#[test]
fn demo_runs_the_real_system_over_loopback() {
    let (ok, stdout, stderr) = sim(&["demo", "--devices", "3", "--rounds", "2", "--json"]);
    assert!(ok, "{stderr}");
    let rounds: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rounds.len(), 2);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1);
        assert_eq!(r["model_version"], i as u64 + 1);
        assert_eq!(r["devices_reporting"], 3);
        assert!(r["accuracy"].as_f64().unwrap() > 0.5, "{r}");
    }
    // The coordinator distilled the last model; the signed int8 student runs on all 3 devices.
    let s = &rounds[1]["student"];
    assert_eq!(s["version"], 3, "the next number in the one version sequence: {s}");
    assert_eq!((s["signed"].as_bool(), s["devices_running"].as_u64()), (Some(true), Some(3)), "{s}");
    assert!(s["size_bytes"].as_u64().unwrap() < 796_993 / 4);
    assert!(s["accuracy"].as_f64().unwrap() > 0.5, "{s}");
    assert!(s["latency_us"].as_f64().unwrap() > 0.0, "{s}");
}

/// `demo --secure-aggregation`: the devices enter their updates into a SecAgg+ sum through the
/// coordinator process; every round sums all three, and the models score what the plain
/// demo's do, quantisation aside. Refused with regions.
#[test]
fn demo_with_secure_aggregation_matches_the_plain_demo() {
    let run = |extra: &[&str]| {
        let mut args = vec!["demo", "--devices", "3", "--rounds", "2", "--json"];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = sim(&args);
        assert!(ok, "{stderr}");
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout).unwrap()
    };
    let (plain, secure) = (run(&[]), run(&["--secure-aggregation"]));
    for (p, s) in plain.iter().zip(&secure) {
        assert_eq!(s["devices_reporting"], 3, "{s}");
        let (a, b) = (p["accuracy"].as_f64().unwrap(), s["accuracy"].as_f64().unwrap());
        assert!((a - b).abs() < 0.01, "round {}: {a} plain vs {b} secure", s["round"]);
    }
    let (ok, _, stderr) = sim(&["demo", "--devices", "4", "--regions", "2", "--secure-aggregation"]);
    assert!(!ok && stderr.contains("--secure-aggregation needs at least 2 devices and no regions"), "{stderr}");
}

/// `demo --regions 2`: four devices behind two regional aggregator processes; every round
/// aggregates all four devices' updates through the regions, the root's signed student reaches
/// all four through their regions, and both regions install the regional model.
#[test]
fn demo_with_regions_runs_hierarchical_aggregation_and_three_tiers() {
    let (ok, stdout, stderr) = sim(&["demo", "--devices", "4", "--rounds", "2", "--regions", "2", "--json"]);
    assert!(ok, "{stderr}");
    let rounds: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rounds.len(), 2);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!((r["round"].as_u64(), r["model_version"].as_u64()), (Some(i as u64 + 1), Some(i as u64 + 1)));
        assert_eq!(r["devices_reporting"], 4, "{r}");
        assert!(r["accuracy"].as_f64().unwrap() > 0.5, "{r}");
    }
    let s = &rounds[1]["student"];
    assert_eq!((s["signed"].as_bool(), s["devices_running"].as_u64()), (Some(true), Some(4)), "{s}");
    let m = &rounds[1]["regional"];
    assert_eq!((m["architecture"].as_str(), m["devices_running"].as_u64()), (Some("2nn"), Some(2)), "{m}");
    assert!(m["version"].as_u64() > s["version"].as_u64(), "distilled after the student: {m}");
    // Device 0's hybrid inference over the live tiers: its student answers most, its region some
    // of what it escalates, the root the rest.
    let t = &rounds[1]["tiers"];
    let answered = |tier: &str| t[tier]["answered"].as_u64().unwrap();
    assert_eq!(t["requests"], 500, "{t}");
    assert_eq!(answered("device") + answered("region") + answered("root"), 500, "{t}");
    assert!(answered("device") > 400 && answered("region") > 0 && answered("root") > 0, "{t}");
    let (ok, _, stderr) = sim(&["demo", "--devices", "1", "--regions", "2"]);
    assert!(!ok && stderr.contains("every region needs a device"), "{stderr}");
}

/// The oracle entry recorded from dp-accounting for (q, z, steps, delta).
fn oracle_epsilon(q: f64, z: f64, steps: u64, delta: f64) -> (f64, f64) {
    let text = include_str!("../../shared/core/tests/data/privacy_oracle.json");
    let o: serde_json::Value = serde_json::from_str(text).unwrap();
    let c = o["epsilon"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["q"] == q && c["z"] == z && c["steps"] == steps && c["delta"] == delta)
        .expect("case recorded");
    (c["epsilon"].as_f64().unwrap(), c["order"].as_f64().unwrap())
}

#[test]
fn privacy_epsilon_json_matches_dp_accounting() {
    let (ok, stdout, stderr) = sim(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "1.0",
        "--sampling-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-05",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (eps, order) = oracle_epsilon(0.01, 1.0, 1000, 1e-5);
    let got = v["epsilon"].as_f64().unwrap();
    assert!(((got - eps) / eps).abs() < 1e-6, "{got} vs {eps}");
    assert_eq!(v["order"].as_f64().unwrap(), order);
}

#[test]
fn privacy_calibrate_finds_the_noise_for_a_target() {
    let (ok, stdout, stderr) = sim(&[
        "privacy",
        "calibrate",
        "--target-epsilon",
        "3",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.1",
        "--steps",
        "100",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let z = v["noise_multiplier"].as_f64().unwrap();
    assert!(v["epsilon"].as_f64().unwrap() <= 3.0);
    // The recorded dp-accounting calibration for the same question.
    let text = include_str!("../../shared/core/tests/data/privacy_oracle.json");
    let o: serde_json::Value = serde_json::from_str(text).unwrap();
    let want =
        o["calibrate"].as_array().unwrap().iter().find(|c| c["target_epsilon"] == 3.0).unwrap()["noise_multiplier"]
            .as_f64()
            .unwrap();
    assert!(((z - want) / want).abs() < 1e-6, "{z} vs {want}");
}

#[test]
fn privacy_bad_input_is_a_clear_error() {
    for (args, msg) in [
        (["--noise-multiplier", "0", "--sampling-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "noise multiplier"),
        (["--noise-multiplier", "1", "--sampling-rate", "1.5", "--steps", "10", "--delta", "1e-5"], "sampling rate"),
        (["--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "0", "--delta", "1e-5"], "steps"),
        (["--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "10", "--delta", "1"], "delta"),
    ] {
        let mut all = vec!["privacy", "epsilon"];
        all.extend(args);
        let (ok, stdout, stderr) = sim(&all);
        assert!(!ok && stdout.is_empty(), "{args:?} succeeded: {stdout}");
        assert!(stderr.contains(msg) && !stderr.contains("NaN") && !stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn hybrid_cascade_beats_local_and_escalates_near_the_target() {
    let (ok, stdout, stderr) =
        sim(&["hybrid", "--json", "--cost-per-cloud-call", "0.0004", "--cost-per-device-ms", "0.000001"]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let get = |policy: &str, rate: f64| {
        rows.iter().find(|r| r["policy"] == policy && r["target_rate"].as_f64() == Some(rate)).expect("row")
    };
    let acc = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap();
    let local = get("local-only", 0.0);
    assert_eq!(get("cloud-only", 1.0)["escalation_rate"], 1.0);
    for rate in [0.05, 0.1, 0.2] {
        let c = get("cascade", rate);
        // Escalating the least confident answers to the teacher never costs accuracy here.
        assert!(acc(c) >= acc(local), "{c} vs {local}");
        // Calibrated on the even test images, measured on the odd ones.
        let measured = c["escalation_rate"].as_f64().unwrap();
        assert!((measured - rate).abs() < 0.03, "target {rate}: {measured}");
    }
    assert!(local["local_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(local["local_p99_ms"].as_f64().unwrap() >= local["local_p50_ms"].as_f64().unwrap());
    // Priced: cloud-only is 1,000 calls and saves nothing; every other policy pays the local
    // model's mean latency per request plus its escalations.
    let mean_ms = local["local_mean_ms"].as_f64().unwrap();
    let cost = |r: &serde_json::Value| r["cost_per_1000"].as_f64().unwrap();
    let cloud = get("cloud-only", 1.0);
    assert!((cost(cloud) - 0.4).abs() < 1e-12 && cloud["saving"].as_f64().unwrap().abs() < 1e-12);
    for r in &rows {
        let want = if r["policy"] == "cloud-only" {
            0.4
        } else {
            1000.0 * (mean_ms * 1e-6 + r["escalation_rate"].as_f64().unwrap() * 0.0004)
        };
        assert!((cost(r) - want).abs() < 1e-9, "{r}");
        assert!((r["saving"].as_f64().unwrap() - (1.0 - want / 0.4)).abs() < 1e-9, "{r}");
    }
    assert!(get("cascade", 0.1)["saving"].as_f64().unwrap() > 0.8);
}

#[test]
fn hybrid_refuses_a_negative_price_before_training() {
    let (ok, _, stderr) = sim(&["hybrid", "--cost-per-cloud-call=-1"]);
    assert!(!ok);
    assert!(stderr.contains("the cost per cloud call must be a finite number >= 0, got -1"), "{stderr}");
}

#[test]
fn bench_train_prints_a_row_per_configuration() {
    let (ok, stdout, stderr) = sim(&[
        "bench-train",
        "--no-torch",
        "--json",
        "--models",
        "2nn,cnn",
        "--batches",
        "2",
        "--threads",
        "1,2",
        "--seconds",
        "0.01",
        "--repeat",
        "1",
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for r in &rows {
        assert!(r["fedge"].as_f64().unwrap() > 0.0 && r["fedge_workers"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["torch"].is_null());
        assert_eq!(r["backend"], "cpu");
        assert_eq!(r["conv"], "Winograd", "the default");
    }
    // An A/B of the convolution algorithms: a row for each.
    let (ok, stdout, stderr) = sim(&[
        "bench-train",
        "--no-torch",
        "--json",
        "--models",
        "cnn",
        "--batches",
        "2",
        "--threads",
        "1",
        "--conv",
        "im2col,winograd",
        "--seconds",
        "0.01",
        "--repeat",
        "1",
    ]);
    assert!(ok, "{stderr}");
    let convs: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["conv"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(convs, ["Im2col", "Winograd"], "{stdout}");
    let (ok, _, stderr) = sim(&["bench-train", "--no-torch", "--conv", "fft"]);
    assert!(!ok && stderr.contains("unknown convolution algorithm"), "{stderr}");
    let (ok, _, stderr) = sim(&["bench-train", "--no-torch", "--seconds", "0"]);
    assert!(!ok && stderr.contains("--seconds"), "{stderr}");
    // PyTorch's script has no MLP: comparing it with its 2NN would be a wrong baseline.
    let (ok, _, stderr) = sim(&["bench-train", "--models", "mlp", "--torch-python", "python3", "--seconds", "0.01"]);
    assert!(!ok && stderr.contains("--no-torch"), "{stderr}");
}

#[test]
fn hybrid_prunes_the_student_and_sends_it_sparse() {
    let (ok, stdout, stderr) = sim(&["hybrid", "--json", "--prune", "0.8"]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let (dense, pruned): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.get("sparsity").is_none());
    fn local<'a>(rows: &[&'a serde_json::Value]) -> &'a serde_json::Value {
        rows.iter().find(|r| r["policy"] == "local-only").expect("a local-only row")
    }
    let (d, p) = (local(&dense), local(&pruned));
    // 80% of each weight tensor is zero (floor per tensor), and the sparse int8 student is
    // under half the dense one's bytes (a bitmap of one bit a weight plus a fifth of them).
    let s = p["sparsity"].as_f64().unwrap();
    assert!((0.79..=0.8).contains(&s), "{s}");
    let (db, pb) = (d["student_bytes"].as_u64().unwrap(), p["student_bytes"].as_u64().unwrap());
    assert!(pb * 2 < db, "pruned {pb} bytes vs dense {db}");
    // Fine-tuning keeps it close to the dense student; escalation still helps it.
    let acc = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap();
    assert!(acc(p) > acc(d) - 0.05, "pruned {} vs dense {}", acc(p), acc(d));
    let cascade = pruned.iter().find(|r| r["policy"] == "cascade" && r["target_rate"] == 0.1).unwrap();
    assert!(acc(cascade) >= acc(p));
    assert!(pruned.iter().all(|r| r["policy"] != "cloud-only"));
    // A sparsity outside [0, 1) is refused.
    let (ok, _, stderr) = sim(&["hybrid", "--prune", "1.0"]);
    assert!(!ok && stderr.contains("prune sparsity must be in [0, 1), got 1"), "{stderr}");
}

#[test]
fn hybrid_measures_three_tiers_beside_the_two_tier_cascade() {
    let (ok, stdout, stderr) =
        sim(&["hybrid", "--json", "--rounds", "3", "--medium-model", "2nn", "--region-rate", "0.5"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["policies"].as_array().unwrap().iter().any(|r| r["policy"] == "cascade"));
    let t = &report["tiers"];
    assert_eq!(t["medium"], "2nn");
    assert!(t["medium_bytes"].as_u64().unwrap() > 150_000, "an int8 2NN: {t}");
    let l = &t["latency"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert!(f(&l["device_ms"]) > 0.0 && f(&l["region_ms"]) > 0.0 && f(&l["root_ms"]) > 0.0, "{l}");
    assert_eq!((f(&l["region_rtt_ms"]), f(&l["root_rtt_ms"])), (10.0, 60.0));
    let rows = t["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "one row per device rate");
    for r in rows {
        let (d, g, root) = (f(&r["device_share"]), f(&r["region_share"]), f(&r["root_share"]));
        assert!((d + g + root - 1.0).abs() < 1e-9, "{r}");
        // The device sends on what the two-tier cascade would; the region answers some of it.
        assert!((g + root - f(&r["two_tier_root_share"])).abs() < 1e-9, "{r}");
        assert!((f(&r["device_share"]) - (1.0 - f(&r["device_rate"]))).abs() < 0.04, "{r}");
        assert!(root <= g + root && root < f(&r["two_tier_root_share"]) + 1e-12, "{r}");
        // Fewer root calls, so a lower mean latency than sending every escalation to the root.
        assert!(f(&r["mean_latency_ms"]) < f(&r["two_tier_mean_latency_ms"]), "{r}");
    }
}

#[test]
fn hybrid_refuses_impossible_tiers_before_training() {
    for (args, msg) in [
        (&["--medium-model", "2nn", "--region-rate", "1.5"][..], "region rate must be in [0, 1]"),
        (&["--medium-model", "2nn", "--root-rtt-ms=-1"][..], "root round trip must be 0 to"),
        (&["--medium-model", "lstm"][..], "reads text"),
    ] {
        let mut all = vec!["hybrid"];
        all.extend(args);
        let (ok, _, stderr) = sim(&all);
        assert!(!ok && stderr.contains(msg), "{args:?}: {stderr}");
        assert!(!stderr.contains("round 1"), "refused before training: {stderr}");
    }
}
