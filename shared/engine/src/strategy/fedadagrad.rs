//! FedAdagrad: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2. With the
//! round's mean delta `Delta`: `m <- beta1 m + (1 - beta1) Delta`, `v <- v + Delta^2`,
//! `w <- w + eta m / (sqrt(v) + tau)`, `v` starting at `tau^2` as in the paper (defaults eta 0.1,
//! beta1 0.9, tau 1e-3).

use fedge_core::aggregate::AggregateError;

use super::fedopt::{ServerOptimizer, adaptive_step, pair, sized};

/// Adagrad on the server.
#[derive(Debug, Clone)]
pub struct FedAdagrad {
    server_lr: f32,
    beta1: f32,
    tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdagrad {
    /// Step size eta, first-moment decay beta1, adaptivity tau.
    pub fn new(server_lr: f64, beta1: f64, tau: f64) -> Self {
        Self { server_lr: server_lr as f32, beta1: beta1 as f32, tau: tau as f32, m: Vec::new(), v: Vec::new() }
    }
}

impl ServerOptimizer for FedAdagrad {
    fn name(&self) -> &'static str {
        "fedadagrad"
    }

    fn step(&mut self, delta: &mut [f32]) {
        sized(&mut self.m, delta.len(), 0.0);
        sized(&mut self.v, delta.len(), self.tau * self.tau);
        self.v.iter_mut().zip(delta.iter()).for_each(|(v, d)| *v += d * d);
        adaptive_step(delta, &mut self.m, &self.v, self.beta1, self.server_lr, self.tau);
    }

    fn moments(&self) -> Vec<Vec<f32>> {
        vec![self.m.clone(), self.v.clone()]
    }

    fn set_moments(&mut self, moments: Vec<Vec<f32>>) -> Result<(), AggregateError> {
        [self.m, self.v] = pair(moments)?;
        Ok(())
    }
}
