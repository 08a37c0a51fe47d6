//! Aggregation strategies, in Flower's vocabulary: a strategy folds the round's training
//! results into the next global model. One file per algorithm, each citing its paper.

mod fedavg;

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
}

/// How a round's results become the next global model. Results are streamed in one at a time
/// so memory stays at one model whatever the number of devices.
pub trait Strategy: Send {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Starts aggregating a round whose devices trained from `global`.
    fn begin_round(&mut self, round: u64, global: &ModelParams);

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
