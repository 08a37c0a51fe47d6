//! FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization in
//! Heterogeneous Networks". Each device minimises its loss plus `mu/2 ||w - w_global||^2`,
//! which keeps devices with skewed data or many local steps near the global model; the task
//! carries `mu` ([`fedge_core::wire::TrainConfig::proximal_mu`]) and the device trainers apply
//! it. The server aggregates as FedAvg (DP-FedAvg under central DP) does.

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;

use super::{Contribution, ServerState, Strategy};

/// FedAvg on the server, the proximal term on the devices.
pub struct FedProx {
    inner: Box<dyn Strategy>,
    mu: f32,
}

impl std::fmt::Debug for FedProx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedProx").field("inner", &self.inner.name()).field("mu", &self.mu).finish()
    }
}

impl FedProx {
    /// Devices apply `mu`; `inner` aggregates.
    pub fn new(inner: Box<dyn Strategy>, mu: f64) -> Self {
        Self { inner, mu: mu as f32 }
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }
    fn begin_round(&mut self, round: u64, global: &ModelParams, expected: usize) {
        self.inner.begin_round(round, global, expected)
    }
    fn clip_norm(&self) -> Option<f64> {
        self.inner.clip_norm()
    }
    fn proximal_mu(&self) -> Option<f32> {
        Some(self.mu)
    }
    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.inner.check(c)
    }
    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.inner.accumulate(c)
    }
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ModelParams,
        failures: usize,
    ) -> Result<ModelParams, AggregateError> {
        self.inner.aggregate_train(round, global, failures)
    }
    fn server_state(&self) -> Option<ServerState> {
        self.inner.server_state()
    }
    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        self.inner.restore_server_state(state)
    }
}
