use super::*;
use fedge_engine::StrategyConfig;

fn err(toml: &str) -> String {
    match SimConfig::from_toml(toml) {
        Err((line, reason)) => format!("line {line}: {reason}"),
        Ok(c) => c.validate().unwrap_err().to_string(),
    }
}

#[test]
fn defaults_are_valid_and_files_override_them() {
    SimConfig::default().validate().unwrap();
    let c = SimConfig::from_toml("devices = 7\nmodel = \"cnn\"\npartition = \"shards\"\nclip_norm = 1.5").unwrap();
    assert_eq!((c.devices, c.model, c.partition, c.clip_norm), (7, ModelKind::Cnn, PartitionKind::Shards, Some(1.5)));
    assert_eq!(c.rounds, SimConfig::default().rounds);
    let c = SimConfig::from_toml("strategy = \"fedadam\"\n[strategy_options]\nserver_lr = 0.03\ntau = 0.01").unwrap();
    let e = c.engine_config().unwrap();
    assert_eq!(e.strategy, StrategyConfig::parse("fedadam", &c.strategy_options).unwrap());
    assert!(matches!(e.strategy, StrategyConfig::FedOpt { server_lr: 0.03, tau: 0.01, .. }));
}

#[test]
fn attack_keys_parse_from_a_file() {
    let c = SimConfig::from_toml(
        "attack = \"little-is-enough\"\nattackers = 0.2\nattack_z = 1.5\nattack_scale = 3.0\nattack_noise_std = 0.5",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.attack, Some(AttackKind::LittleIsEnough));
    assert_eq!((c.attackers, c.attack_z, c.attack_scale, c.attack_noise_std), (0.2, Some(1.5), Some(3.0), 0.5));
    for (name, kind) in AttackKind::ALL {
        let c = SimConfig::from_toml(&format!("attack = \"{name}\"\nattackers = 0.3")).unwrap();
        assert_eq!(c.attack, Some(kind));
        c.validate().unwrap();
    }
}

#[test]
fn bad_configs_name_the_problem_in_one_line() {
    let cases = [
        ("devices = 10\ncolour = 3", "line 2: unknown field `colour`"),
        ("fraction = 0.0", "fraction must be in (0, 1], got 0"),
        ("batch_size = 0", "batch size must be at least 1"),
        ("devices = 0", "devices must be at least 1"),
        ("rounds = 0", "rounds must be at least 1"),
        ("model = \"resnet\"", "unknown variant `resnet`"),
        ("lr = -1.0", "learning rate must be positive"),
        ("noise_multiplier = 1.0", "needs a clip norm"),
        ("clip_norm = 1.0\nnoise_multiplier = 0.0", "noise multiplier must be positive"),
        ("clip_norm = 1.0\nnoise_multiplier = 1.0\ndelta = 1.0", "delta must be in (0, 1)"),
        ("clip_norm = 1.0\nlocal_epsilon = -2.0", "epsilon must be positive"),
        ("clip_norm = 1.0\nlocal_epsilon = 2.0\nnoise_multiplier = 1.0", "central or local"),
        ("clip_norm = 1.0\nnoise_multiplier = 1.0\nadaptive_clip = { target_quantile = 1.5 }", "quantile"),
        ("clip_norm = 1.0\nadaptive_clip = { target_quantile = 0.5 }", "needs central DP"),
        ("partition = \"dirichlet\"\nalpha = 0.0", "alpha must be positive"),
        ("dropout = 1.0", "dropout must be in [0, 1)"),
        ("devices = \"many\"", "line 1: invalid type"),
        ("round_timeout_s = 0.0", "round_timeout_s must be 0.001 to 604800 seconds (a week), got 0"),
        ("round_timeout_s = nan", "round_timeout_s must be 0.001 to 604800 seconds (a week), got NaN"),
        ("[speed]\ncompute_samples_per_s = -5.0", "speed.compute_samples_per_s must be positive and finite, got -5"),
        ("[speed]\nupload_mbps = nan", "speed.upload_mbps must be positive and finite, got NaN"),
        ("[speed]\ndownload_mbps = inf", "speed.download_mbps must be positive and finite, got inf"),
        ("[speed]\nlatency_ms = -1.0", "speed.latency_ms must be zero or positive and finite, got -1"),
        ("[speed]\ncompute_sigma = -0.5", "speed.compute_sigma must be in [0, 10], got -0.5"),
        ("[speed]\nstraggler_fraction = 2.0", "speed.straggler_fraction must be in [0, 1], got 2"),
        ("[speed]\nstraggler_slowdown = 0.5", "speed.straggler_slowdown must be at least 1 and finite, got 0.5"),
        ("[speed]\nupload = 5.0", "line 2: unknown field `upload`"),
        ("max_step_norm = -1.0", "max_step_norm must be positive and finite, got -1"),
        ("strategy = \"fedsgd\"", "unknown strategy `fedsgd`; choose one of fedavg, fedavgm"),
        ("strategy = \"krum\"\n[strategy_options]\ntrim_fraction = 0.1", "`trim_fraction` does not apply to krum"),
        ("strategy = \"trimmed-mean\"\n[strategy_options]\ntrim_fraction = 0.6", "trim_fraction must be in [0, 0.5)"),
        ("[strategy_options]\ntrim = 0.1", "line 2: unknown field `trim`"),
        ("[strategy_options]\nbucket_size = 2", "`bucket_size` does not apply to fedavg"),
        ("strategy = \"median\"\n[strategy_options]\nbucket_size = 0", "bucket_size must be 1 to 1000, got 0"),
        ("strategy = \"median\"\nclip_norm = 1.0\nnoise_multiplier = 1.0", "median combines the updates jointly"),
        ("attack = \"evil\"\nattackers = 0.2", "line 1: unknown variant `evil`, expected one of `sign-flip`"),
        ("attack = \"scale\"", "attack `scale` needs attackers > 0"),
        ("attackers = 0.2", "attackers = 0.2 needs an attack"),
        ("attack = \"noise\"\nattackers = 1.0", "attackers must be in [0, 1), got 1"),
        ("attack = \"noise\"\nattackers = nan", "attackers must be in [0, 1), got NaN"),
        ("attack = \"noise\"\nattackers = -0.1", "attackers must be in [0, 1), got -0.1"),
        ("devices = 10\nattack = \"noise\"\nattackers = 0.01", "rounds to no attacker"),
        ("attack = \"scale\"\nattackers = 0.2\nattack_scale = inf", "attack_scale must be finite, got inf"),
        ("attack = \"noise\"\nattackers = 0.2\nattack_noise_std = -1.0", "attack_noise_std must be zero"),
        ("attack = \"noise\"\nattackers = 0.2\nattack_noise_std = nan", "attack_noise_std must be zero"),
        ("attack = \"little-is-enough\"\nattackers = 0.2\nattack_z = nan", "attack_z must be finite"),
        ("mode = \"async\"", "line 1: unknown variant `async`, expected `sync` or `fedbuff`"),
        ("mode = \"fedbuff\"\nbuffer_size = 0", "buffer_size must be 1 to"),
        ("mode = \"fedbuff\"\nmax_concurrency = 0", "max_concurrency must be 1 to"),
        ("mode = \"fedbuff\"\nstaleness_exponent = -1.0", "staleness exponent must be in [0, 1e6]"),
        ("mode = \"fedbuff\"\nstaleness = \"hinge\"\nhinge_a = nan", "hinge slope a must be in"),
        ("mode = \"fedbuff\"\nstaleness = \"cubic\"", "line 2: unknown variant `cubic`"),
        (
            "mode = \"fedbuff\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nadaptive_clip = { target_quantile = 0.5 }",
            "adaptive_clip is not offered with mode = \"fedbuff\"",
        ),
        ("mode = \"fedbuff\"\nnoise_multiplier = 1.0", "needs a clip norm"),
        (
            "mode = \"fedbuff\"\nclip_norm = 1.0\nnoise_multiplier = 1.0\n[strategy_options]\nserver_lr = 2.0",
            "server_lr must be 1",
        ),
        (
            "mode = \"fedbuff\"\nclip_norm = 1.0\nlocal_epsilon = 1.0",
            "local_epsilon is not offered with mode = \"fedbuff\"",
        ),
        ("mode = \"fedbuff\"\nstrategy = \"fedadam\"", "strategy `fedadam` is for mode = \"sync\""),
        ("mode = \"fedbuff\"\ndropout = 0.1", "dropout is not supported with mode = \"fedbuff\""),
    ];
    for (toml, want) in cases {
        let got = err(toml);
        assert!(got.contains(want), "{toml:?}: {got}");
        assert!(!got.contains('\n'), "multi-line error: {got}");
    }
}
