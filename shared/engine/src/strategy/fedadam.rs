//! FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2. With the round's
//! mean delta `Delta`: `m <- beta1 m + (1 - beta1) Delta`, `v <- beta2 v + (1 - beta2) Delta^2`,
//! `w <- w + eta m / (sqrt(v) + tau)`, `v` starting at `tau^2`, no bias correction (the paper's
//! algorithm; defaults eta 0.01, beta1 0.9, beta2 0.99, tau 1e-3).

use fedge_core::aggregate::AggregateError;

use super::fedopt::{ServerOptimizer, adaptive_step, pair, sized};

/// Adam on the server.
#[derive(Debug, Clone)]
pub struct FedAdam {
    server_lr: f32,
    beta1: f32,
    beta2: f32,
    tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdam {
    /// Step size eta, moment decays beta1 and beta2, adaptivity tau.
    pub fn new(server_lr: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        let f = |x: f64| x as f32;
        Self { server_lr: f(server_lr), beta1: f(beta1), beta2: f(beta2), tau: f(tau), m: Vec::new(), v: Vec::new() }
    }
}

impl ServerOptimizer for FedAdam {
    fn name(&self) -> &'static str {
        "fedadam"
    }

    fn step(&mut self, delta: &mut [f32]) {
        sized(&mut self.m, delta.len(), 0.0);
        sized(&mut self.v, delta.len(), self.tau * self.tau);
        let b2 = self.beta2;
        self.v.iter_mut().zip(delta.iter()).for_each(|(v, d)| *v = b2 * *v + (1.0 - b2) * d * d);
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
