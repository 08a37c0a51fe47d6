//! FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
//! Decentralized Data". The next model is the current one plus the sample-weighted mean of the
//! devices' deltas, scaled by a server learning rate (1.0 is the paper's algorithm).

use fedge_core::ModelParams;
use fedge_core::aggregate::{AggregateError, WeightedMean};

use super::{Contribution, Strategy};

/// Federated averaging, weighted by each device's sample count.
#[derive(Debug, Clone)]
pub struct FedAvg {
    /// Step size applied to the mean delta (1.0 = plain FedAvg).
    pub server_learning_rate: f32,
    acc: Option<WeightedMean>,
}

impl Default for FedAvg {
    fn default() -> Self {
        Self { server_learning_rate: 1.0, acc: None }
    }
}

impl FedAvg {
    /// FedAvg stepping `server_learning_rate` times the mean delta.
    pub fn with_server_lr(server_learning_rate: f32) -> Self {
        Self { server_learning_rate, acc: None }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn begin_round(&mut self, _round: u64, global: &ModelParams, _expected: usize) {
        self.acc = Some(WeightedMean::new(global.layout().clone()));
    }

    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.acc.as_ref().ok_or(AggregateError::Empty)?.check(c.delta, c.num_samples as f64)
    }

    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        let acc = self.acc.as_mut().ok_or(AggregateError::Empty)?;
        acc.add_scaled(c.delta, c.num_samples as f64, c.clip_scale)
    }

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &ModelParams,
        _failures: usize,
    ) -> Result<ModelParams, AggregateError> {
        let mean = self.acc.take().ok_or(AggregateError::Empty)?.finish()?;
        let mut next = global.clone();
        next.add_scaled(&mean, self.server_learning_rate)?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::{ParamLayout, TensorSpec};
    use std::sync::Arc;

    #[test]
    fn averages_deltas_by_samples_onto_global() {
        let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![2] }]).unwrap());
        let p = |v: &[f32]| ModelParams::new(layout.clone(), v.to_vec()).unwrap();
        let global = p(&[1.0, 1.0]);
        let mut s = FedAvg::default();
        s.begin_round(1, &global, 2);
        s.accumulate(Contribution { delta: &p(&[1.0, 0.0]), num_samples: 30, clipped: false, clip_scale: 1.0 })
            .unwrap();
        s.accumulate(Contribution { delta: &p(&[-1.0, 4.0]), num_samples: 10, clipped: false, clip_scale: 1.0 })
            .unwrap();
        let next = s.aggregate_train(1, &global, 0).unwrap();
        assert_eq!(next.data(), &[1.5, 2.0]);
        // Nothing accumulated: an error, not a silent copy of the global model.
        s.begin_round(2, &next, 2);
        assert_eq!(s.aggregate_train(2, &next, 3), Err(AggregateError::Empty));
    }
}
