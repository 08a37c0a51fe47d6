use super::*;

fn small() -> SimConfig {
    SimConfig { devices: 12, rounds: 2, clip_norm: Some(10.0), ..SimConfig::default() }
}

#[test]
fn a_shard_hosts_the_devices_congruent_to_its_index() {
    let h = Hosted::new(1, 4).unwrap();
    let hosted: Vec<u64> = (0..12).filter(|&d| h.hosts(d)).collect();
    assert_eq!(hosted, [1, 5, 9]);
    assert!((0..12).all(|d| !h.replay_only().hosts(d)));
    // Every device on exactly one shard.
    let shards: Vec<Hosted> = (0..4).map(|i| Hosted::new(i, 4).unwrap()).collect();
    assert!((0..100).all(|d| shards.iter().filter(|s| s.hosts(d)).count() == 1));
    assert!(matches!(Hosted::new(4, 4), Err(ShardError::Index { index: 4, count: 4 })));
    assert!(matches!(Hosted::new(0, 0), Err(ShardError::Index { .. })));
}

#[test]
fn what_needs_every_update_is_refused_by_name() {
    assert!(check_shardable(&small()).is_ok());
    assert!(check_shardable(&SimConfig { secure_aggregation: true, ..small() }).is_ok());
    let cases: Vec<(SimConfig, &str)> = vec![
        (SimConfig { strategy: "median".into(), ..small() }, "strategy `median`"),
        (SimConfig { noise_multiplier: Some(1.0), clip_norm: Some(1.0), ..small() }, "central DP"),
        (
            SimConfig { secure_aggregation: true, noise_multiplier: Some(1.0), clip_norm: Some(1.0), ..small() },
            "distributed DP",
        ),
        (SimConfig { mode: Mode::Fedbuff, ..small() }, "fedbuff"),
        (SimConfig { distill_every: Some(1), ..small() }, "distill_every"),
        (SimConfig { target_accuracy: Some(0.9), ..small() }, "target_accuracy"),
        (SimConfig { clip_norm: None, ..small() }, "set clip_norm"),
    ];
    for (config, says) in cases {
        let e = check_shardable(&config).expect_err(says).to_string();
        assert!(e.contains("a sharded run") && e.contains(says), "{e}");
    }
}

#[test]
fn the_root_config_is_a_coordinator_config_with_the_simulations_settings() {
    let config = SimConfig {
        strategy: "fedavgm".into(),
        strategy_options: fedge_engine::StrategyOptions { server_momentum: Some(0.5), ..Default::default() },
        clip_norm: Some(2.5),
        lr: 0.05,
        ..small()
    };
    let place = RootPlace {
        listen: "0.0.0.0:4433",
        certs_dir: Path::new("/certs"),
        state_dir: Path::new("/state"),
        round_timeout_secs: 900,
    };
    let text = root_config(&config, 4, &place).unwrap();
    let root: fedge_coordinator::config::ServeConfig = fedge_core::config_file::parse_toml(&text).unwrap();
    assert_eq!(root.seed, root_seed(&config));
    assert_eq!((root.fraction, root.min_train_clients, root.accept_failures), (1.0, 4, false));
    assert_eq!(
        (root.epochs, root.batch_size, root.lr, root.clip_norm),
        (config.epochs, config.batch_size, 0.05, Some(2.5))
    );
    assert_eq!(root.strategy, "fedavgm");
    assert_eq!(root.strategy_options.server_momentum, Some(0.5));
    assert_eq!(root.round_timeout_secs, 900);
    assert_eq!(root.model, config.model.to_string());
    // The root's version 0 is the simulation's initial model.
    let mut t = fedge_learn::Trainer::new(config.model, 10, fedge_learn::BackendKind::Cpu).unwrap();
    let sim = t.initial_params(derive_rng(config.seed, &[stream::INIT]).random());
    assert_eq!(t.initial_params(root.seed).content_hash(), sim.content_hash());
    assert!(root_config(&SimConfig { strategy: "krum".into(), ..small() }, 4, &place).is_err());
}

#[test]
fn the_roots_tasks_carry_the_simulations_training_settings() {
    let place = RootPlace {
        listen: "127.0.0.1:4433",
        certs_dir: Path::new("c"),
        state_dir: Path::new("s"),
        round_timeout_secs: 60,
    };
    let configs = [
        small(),
        SimConfig { strategy: "fedprox".into(), ..small() },
        SimConfig {
            strategy: "fedadam".into(),
            strategy_options: fedge_engine::StrategyOptions {
                server_lr: Some(0.03),
                tau: Some(0.01),
                ..Default::default()
            },
            ..small()
        },
        SimConfig { local_epsilon: Some(20.0), delta: 1e-6, clip_norm: Some(1.5), ..small() },
        SimConfig { secure_aggregation: true, secagg_degree: Some(4), ..small() },
    ];
    for config in configs {
        let text = root_config(&config, 3, &place).unwrap();
        let root: fedge_coordinator::config::ServeConfig = fedge_core::config_file::parse_toml(&text).unwrap();
        assert_eq!(root.secure_aggregation, config.secure_aggregation);
        if config.secure_aggregation {
            // The weights' cap is the simulation's: the largest device's examples (12 devices
            // share the embedded set), not the engine's 100,000.
            let largest = crate::run::load_data(&config).unwrap().train.len().div_ceil(12) as u64;
            assert_eq!(root.secagg_weight_cap, largest);
            assert_eq!(root.secagg_degree, Some(4));
            assert!(4 * root.secagg_stage_secs < root.round_timeout_secs);
        }
        let (ours, theirs) = (config.engine_config().unwrap(), root.engine().unwrap());
        // What a shard checks each task against, and what the root's strategy does.
        assert_eq!(theirs.train, ours.train, "{}", config.strategy);
        assert_eq!(theirs.strategy, ours.strategy, "{}", config.strategy);
    }
}
