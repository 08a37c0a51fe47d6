//! Many devices per launch in a simulation (`devices_per_launch`): a round's devices trained in
//! groups, their models stacked, give the run that training them one by one gives (the same
//! decisions, the global model to float rounding), on every backend the build has.

use fedge_learn::{BackendKind, ModelKind};
use fedge_sim::run::Quiet;
use fedge_sim::{SimConfig, run};

/// 30 devices of unequal size (Dirichlet non-IID: short last batches, schedules of different
/// lengths), 12 a round, 10% dropouts, FedProx's proximal term, clipping.
fn config(backend: BackendKind, model: ModelKind, devices_per_launch: usize) -> SimConfig {
    SimConfig {
        devices: 30,
        fraction: 0.4,
        rounds: 3,
        epochs: 2,
        batch_size: 10,
        model,
        backend,
        partition: fedge_sim::config::PartitionKind::Dirichlet,
        alpha: 0.5,
        dropout: 0.1,
        clip_norm: Some(5.0),
        strategy: "fedprox".into(),
        strategy_options: fedge_engine::StrategyOptions { proximal_mu: Some(0.01), ..Default::default() },
        local_examples: Some(120),
        workers: 2,
        seed: 11,
        devices_per_launch,
        ..SimConfig::default()
    }
}

fn backends() -> Vec<BackendKind> {
    let mut b = vec![BackendKind::Flex];
    if BackendKind::Wgpu.available() {
        b.push(BackendKind::Wgpu);
    }
    b
}

#[test]
fn devices_per_launch_give_the_run_of_one_device_at_a_time() {
    for backend in backends() {
        // The 2NN (the CNN's stacked form is checked member by member in fedge-learn's group
        // tests, on flex and wgpu).
        let model = ModelKind::TwoNn;
        let one = run(&config(backend, model, 1), None, &mut Quiet).unwrap();
        let four = run(&config(backend, model, 4), None, &mut Quiet).unwrap();
        assert_eq!(one.rounds.len(), four.rounds.len());
        for (a, b) in one.rounds.iter().zip(&four.rounds) {
            assert_eq!((a.selected, a.results, a.samples), (b.selected, b.results, b.samples), "{backend}");
            assert!((a.train_loss - b.train_loss).abs() < 1e-4, "{backend}: {} vs {}", a.train_loss, b.train_loss);
        }
        let diff = one.global.data().iter().zip(four.global.data()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{backend} {model}: global models differ by {diff}");
        assert!(one.rounds.iter().all(|r| r.aggregated));
    }
}

#[test]
fn devices_per_launch_refuses_what_cannot_be_stacked() {
    let refused = [
        (SimConfig { devices_per_launch: 4, ..SimConfig::default() }, "fused kernels"),
        (SimConfig { devices_per_launch: 0, ..SimConfig::default() }, "1 to 4096"),
        (
            SimConfig {
                devices_per_launch: 4,
                backend: BackendKind::Flex,
                model: ModelKind::LstmSmall,
                ..SimConfig::default()
            },
            "LSTMs",
        ),
    ];
    for (config, says) in refused {
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}
