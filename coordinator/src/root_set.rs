//! The server's root set for FLTrust (`strategy = "fltrust"`): clean training examples the
//! coordinator holds itself, on which it trains each round's model with the devices' local
//! settings to get the reference update every device's update is scored against. The
//! coordinator's own copy of the training split provides them (`fedge-coordinator serve` takes
//! the `root_examples` just before the distillation proxy set at its tail).

use std::sync::Arc;

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::TrainConfig;
use fedge_learn::{BackendKind, ModelKind, Trainer};

use crate::server::RootTrainer;

/// Examples `indices` of `data`, trained on with the fast CPU path.
pub struct RootSet {
    trainer: Trainer,
    data: Arc<Dataset>,
    indices: Vec<usize>,
    seed: u64,
}

impl RootSet {
    /// A root set of `indices` of `data` for models of kind `model`; batch orders come from
    /// `seed` and the model version. Refuses an empty set or an index outside `data`.
    pub fn new(model: ModelKind, data: Arc<Dataset>, indices: Vec<usize>, seed: u64) -> Result<Self, String> {
        if indices.is_empty() {
            return Err("FLTrust's root set is empty".into());
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= data.len()) {
            return Err(format!("root set example {i} is outside the {} training examples", data.len()));
        }
        let trainer = Trainer::new(model, data.num_classes, BackendKind::Cpu).map_err(|e| e.to_string())?;
        Ok(Self { trainer, data, indices, seed })
    }

    /// The `n` examples before the last `skip` of `data` (the proxy set), or why not.
    pub fn tail_indices(data: &Dataset, n: usize, skip: usize) -> Result<Vec<usize>, String> {
        match n.checked_add(skip).and_then(|held| data.len().checked_sub(held)) {
            Some(start) if start > 0 => Ok((start..start + n).collect()),
            _ => Err(format!(
                "root_examples {n} (with {skip} proxy examples) leave no training example of {}",
                data.len()
            )),
        }
    }
}

impl RootTrainer for RootSet {
    fn reference(&mut self, version: u64, global: &ModelParams, config: &TrainConfig) -> Result<ModelParams, String> {
        let mut rng = derive_rng(self.seed, &[stream::REFERENCE, version]);
        let trained =
            self.trainer.train(global, &self.data, &self.indices, config, &mut rng).map_err(|e| e.to_string())?;
        trained.params.delta_from(global).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_set_is_taken_before_the_proxy_set_and_refused_when_it_leaves_nothing() {
        let data = fedge_core::dataset::embedded::mnist_subset().unwrap().train;
        let n = data.len();
        assert_eq!(RootSet::tail_indices(&data, 3, 10).unwrap(), vec![n - 13, n - 12, n - 11]);
        assert_eq!(RootSet::tail_indices(&data, 3, 0).unwrap(), vec![n - 3, n - 2, n - 1]);
        let e = RootSet::tail_indices(&data, n, 0).unwrap_err();
        assert_eq!(e, format!("root_examples {n} (with 0 proxy examples) leave no training example of {n}"));
        assert!(RootSet::tail_indices(&data, usize::MAX, 1).is_err(), "no overflow");
        let data = Arc::new(data);
        assert!(RootSet::new(ModelKind::TwoNn, data.clone(), vec![], 1).is_err());
        assert!(RootSet::new(ModelKind::TwoNn, data.clone(), vec![n], 1).err().unwrap().contains("outside"));
        // The reference is deterministic for a version and differs between versions.
        let mut root = RootSet::new(ModelKind::TwoNn, data, (0..50).collect(), 1).unwrap();
        let global = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Cpu).unwrap().initial_params(1);
        let config = TrainConfig {
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.05,
            clip_norm: None,
            local_dp: None,
            proximal_mu: None,
        };
        let a = root.reference(3, &global, &config).unwrap();
        assert_eq!(a, root.reference(3, &global, &config).unwrap());
        assert_ne!(a, root.reference(4, &global, &config).unwrap());
        assert!(a.l2_norm() > 0.0);
    }
}
