//! Aggregation strategies, in Flower's vocabulary: a strategy folds the round's training
//! results into the next global model. One file per algorithm, each citing its paper.

mod dp_fedavg;
mod fedavg;

pub use dp_fedavg::DpFedAvg;
pub use fedavg::FedAvg;

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;

/// One device's accepted contribution to a round.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    /// The device's delta (trained minus starting weights).
    pub delta: &'a ModelParams,
    /// Examples the device trained on.
    pub num_samples: u64,
    /// Whether the device's clipping scaled the delta down.
    pub clipped: bool,
    /// The factor the engine's own clipping scales the delta by (1.0 when it is within the
    /// clip norm or none is set): the server never trusts a device to have clipped.
    pub clip_scale: f64,
}

/// How a round's results become the next global model. Results are streamed in one at a time
/// so memory stays at one model whatever the number of devices.
pub trait Strategy: Send {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Starts aggregating a round whose devices trained from `global`; `expected` results are
    /// wanted (the fixed denominator of DP averaging).
    fn begin_round(&mut self, round: u64, global: &ModelParams, expected: usize);

    /// The clip norm devices must apply this round, when the strategy sets it (central DP).
    fn clip_norm(&self) -> Option<f64> {
        None
    }

    /// What [`Self::accumulate`] would refuse, checked without folding anything in (so a
    /// driver can make a result durable before it counts).
    fn check(&self, contribution: Contribution<'_>) -> Result<(), AggregateError>;

    /// Folds in one result. On error the result is not counted and the aggregate is untouched.
    fn accumulate(&mut self, contribution: Contribution<'_>) -> Result<(), AggregateError>;

    /// Produces the next global model from `global` and everything accumulated; `failures` is
    /// the number of selected devices that failed or did not answer (data, not an error).
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ModelParams,
        failures: usize,
    ) -> Result<ModelParams, AggregateError>;
}

impl<S: Strategy + ?Sized> Strategy for Box<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn begin_round(&mut self, round: u64, global: &ModelParams, expected: usize) {
        (**self).begin_round(round, global, expected)
    }
    fn clip_norm(&self) -> Option<f64> {
        (**self).clip_norm()
    }
    fn check(&self, contribution: Contribution<'_>) -> Result<(), AggregateError> {
        (**self).check(contribution)
    }
    fn accumulate(&mut self, contribution: Contribution<'_>) -> Result<(), AggregateError> {
        (**self).accumulate(contribution)
    }
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ModelParams,
        failures: usize,
    ) -> Result<ModelParams, AggregateError> {
        (**self).aggregate_train(round, global, failures)
    }
}

/// The strategy an engine configuration calls for: [`DpFedAvg`] under central DP (noise drawn
/// from `noise_rng`), else [`FedAvg`].
pub fn for_config(config: &crate::EngineConfig, noise_rng: Box<dyn rand::Rng + Send>) -> Box<dyn Strategy> {
    match &config.privacy {
        Some(p) => {
            let adaptive = p.adaptive.and_then(|a| fedge_core::privacy::AdaptiveClip::new(a, p.clip_norm).ok());
            Box::new(DpFedAvg::new(p.noise_multiplier, p.clip_norm, adaptive, noise_rng))
        }
        None => Box::new(FedAvg::default()),
    }
}
