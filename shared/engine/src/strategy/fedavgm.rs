//! FedAvgM: FedAvg with server momentum, Hsu, Qi and Brown 2019, "Measuring the Effects of
//! Non-Identical Data Distribution for Federated Visual Classification". With the round's mean
//! delta `Delta`: `m <- beta m + Delta`, `w <- w + eta m` (defaults eta 1, beta 0.9).

use fedge_core::aggregate::AggregateError;

use super::fedopt::{ServerOptimizer, sized};

/// Server momentum.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    server_lr: f32,
    momentum: f32,
    m: Vec<f32>,
}

impl FedAvgM {
    /// Step size `server_lr`, momentum `momentum` (in [0, 1)).
    pub fn new(server_lr: f64, momentum: f64) -> Self {
        Self { server_lr: server_lr as f32, momentum: momentum as f32, m: Vec::new() }
    }
}

impl ServerOptimizer for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn step(&mut self, delta: &mut [f32]) {
        sized(&mut self.m, delta.len(), 0.0);
        for (d, m) in delta.iter_mut().zip(self.m.iter_mut()) {
            *m = self.momentum * *m + *d;
            *d = self.server_lr * *m;
        }
    }

    fn moments(&self) -> Vec<Vec<f32>> {
        vec![self.m.clone()]
    }

    fn set_moments(&mut self, moments: Vec<Vec<f32>>) -> Result<(), AggregateError> {
        let [m]: [Vec<f32>; 1] = moments.try_into().map_err(|_| AggregateError::State("one moment vector".into()))?;
        self.m = m;
        Ok(())
    }
}
