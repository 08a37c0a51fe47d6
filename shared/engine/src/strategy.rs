//! Aggregation strategies, in Flower's vocabulary: a strategy folds the round's training
//! results into the next global model. One file per algorithm, each citing its paper;
//! [`choice`] names them and checks their parameters, [`build`] makes the one a configuration
//! asks for.
//!
//! - averaging: [`FedAvg`], [`DpFedAvg`] (central DP), [`FedProx`] (the proximal term runs on
//!   the devices);
//! - server optimisers on the averaged delta ([`FedOpt`]): [`FedAvgM`], [`FedAdagrad`],
//!   [`FedAdam`], [`FedYogi`];
//! - robust rules: [`Median`], [`TrimmedMean`], [`Krum`] (and Multi-Krum), [`NormBound`],
//!   [`CenteredClip`], [`FlTrust`] (scores updates against the server's own update on a
//!   clean root set), the first five optionally on bucket means ([`Bucketing`], Karimireddy et al.
//!   2022) instead of the raw updates.
//!
//! Memory: FedAvg, DP-FedAvg, FedProx, the server optimisers and norm bounding with a fixed
//! bound stream (one model, plus one or two moment vectors for the optimisers). The median,
//! the trimmed mean, Krum, centered clipping, FLTrust and norm bounding at the median norm hold
//! every update of the round, `4 d` bytes each (so does norm bounding with a bound when it
//! buckets; FLTrust holds the reference too);
//! the engine refuses to start a round whose sampled devices could need more than
//! `max_buffer_mb`. Bucketing holds nothing more: it averages the held updates in place.
//!
//! With central DP: the server optimisers and FedProx post-process (or precede) DP-FedAvg's
//! noised mean, so the accountant's charge is unchanged. The robust rules combine updates
//! jointly (a median, a selection, a radius set by the round), so one device can move their
//! output by more than `C / m`, the sensitivity the accountant assumes: they are refused with
//! central DP. With local DP every rule is post-processing of private uploads and allowed.

pub mod bucketing;
pub mod buffer;
mod centered_clip;
pub mod choice;
mod dp_fedavg;
mod fedadagrad;
mod fedadam;
mod fedavg;
mod fedavgm;
mod fedopt;
mod fedprox;
mod fedyogi;
mod fltrust;
mod krum;
mod median;
mod norm_bound;
#[cfg(test)]
mod testing;
mod trimmed_mean;

pub use bucketing::Bucketing;
pub use buffer::{Buffered, BufferedRule};
pub use centered_clip::CenteredClip;
pub use choice::{FedOptKind, StrategyConfig, StrategyOptions, TrustNorm};
pub use dp_fedavg::DpFedAvg;
pub use fedadagrad::FedAdagrad;
pub use fedadam::FedAdam;
pub use fedavg::FedAvg;
pub use fedavgm::FedAvgM;
pub use fedopt::{Adaptive, FedOpt, SecondMoment, ServerOptimizer};
pub use fedprox::FedProx;
pub use fedyogi::FedYogi;
pub use fltrust::FlTrust;
pub use krum::Krum;
pub use median::Median;
pub use norm_bound::NormBound;
pub use trimmed_mean::TrimmedMean;

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

    /// FedProx's mu devices must apply this round, when the strategy sets it.
    fn proximal_mu(&self) -> Option<f32> {
        None
    }

    /// Whether the strategy holds every update of the round (it cannot stream).
    fn holds_updates(&self) -> bool {
        false
    }

    /// Whether the open round still needs the server's reference update (FLTrust) before it
    /// can aggregate; the driver computes it on its root set and hands it over with
    /// [`crate::RoundEngine::handle_reference`].
    fn wants_reference(&self) -> bool {
        false
    }

    /// The server's reference update for the open round (trained from its global model on
    /// the root set). Refused, and the round still waiting, when it does not fit the model.
    fn set_reference(&mut self, _reference: &ModelParams) -> Result<(), AggregateError> {
        Err(AggregateError::Reference(format!("{} takes no reference update", self.name())))
    }

    /// State the strategy carries from round to round (optimiser moments, a centre), to be
    /// saved with each model version; `None` when it carries none.
    fn server_state(&self) -> Option<ServerState> {
        None
    }

    /// Restores state saved by [`Self::server_state`] after a restart. Refuses state saved
    /// by another strategy.
    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        Err(AggregateError::State(format!("{} keeps no state; this state is {}'s", self.name(), state.strategy)))
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
    fn proximal_mu(&self) -> Option<f32> {
        (**self).proximal_mu()
    }
    fn holds_updates(&self) -> bool {
        (**self).holds_updates()
    }
    fn wants_reference(&self) -> bool {
        (**self).wants_reference()
    }
    fn set_reference(&mut self, reference: &ModelParams) -> Result<(), AggregateError> {
        (**self).set_reference(reference)
    }
    fn server_state(&self) -> Option<ServerState> {
        (**self).server_state()
    }
    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        (**self).restore_server_state(state)
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

/// What a strategy carries between rounds, as saved with a model version.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    /// The strategy that saved it.
    pub strategy: String,
    /// Its vectors (moments, a centre), each empty before first use or one model long.
    pub vectors: Vec<Vec<f32>>,
}

impl ServerState {
    /// The vectors, if `strategy` saved them and there are `count`.
    pub fn take(self, strategy: &str, count: usize) -> Result<Vec<Vec<f32>>, AggregateError> {
        if self.strategy != strategy {
            return Err(AggregateError::State(format!("saved by {}, not {strategy}", self.strategy)));
        }
        if self.vectors.len() != count {
            return Err(AggregateError::State(format!("{} vectors, {strategy} keeps {count}", self.vectors.len())));
        }
        Ok(self.vectors)
    }
}

/// The strategy an engine configuration calls for, noise for central DP drawn from
/// `noise_rng`, a robust rule's buckets permuted from the configuration's seed and the round.
/// [`crate::EngineConfig::validate`] has refused the combinations this cannot build
/// faithfully (a robust rule under central DP).
pub fn build(config: &crate::EngineConfig, noise_rng: Box<dyn rand::Rng + Send>) -> Box<dyn Strategy> {
    let averaging = |server_lr: f64, noise_rng| -> Box<dyn Strategy> {
        match &config.privacy {
            // Distributed DP: the devices' noise is in the sum already.
            Some(_) if config.distributed_dp => Box::new(FedAvg::with_server_lr(server_lr as f32)),
            Some(p) => {
                let adaptive = p.adaptive.and_then(|a| fedge_core::privacy::AdaptiveClip::new(a, p.clip_norm).ok());
                Box::new(DpFedAvg::new(p.noise_multiplier, p.clip_norm, adaptive, noise_rng))
            }
            None => Box::new(FedAvg::with_server_lr(server_lr as f32)),
        }
    };
    let buckets = |size| Bucketing::new(size, config.seed);
    match config.strategy {
        StrategyConfig::FedAvg { server_lr } => averaging(server_lr, noise_rng),
        StrategyConfig::FedAvgM { server_lr, momentum } => {
            Box::new(FedOpt::new(averaging(1.0, noise_rng), FedAvgM::new(server_lr, momentum)))
        }
        StrategyConfig::FedOpt { kind, server_lr, beta1, beta2, tau } => {
            let inner = averaging(1.0, noise_rng);
            match kind {
                FedOptKind::Adagrad => Box::new(FedOpt::new(inner, FedAdagrad::new(server_lr, beta1, 0.0, tau))),
                FedOptKind::Adam => Box::new(FedOpt::new(inner, FedAdam::new(server_lr, beta1, beta2, tau))),
                FedOptKind::Yogi => Box::new(FedOpt::new(inner, FedYogi::new(server_lr, beta1, beta2, tau))),
            }
        }
        StrategyConfig::FedProx { mu } => Box::new(FedProx::new(averaging(1.0, noise_rng), mu)),
        StrategyConfig::Median { bucket_size } => Box::new(Buffered::bucketed(Median, buckets(bucket_size))),
        StrategyConfig::TrimmedMean { fraction, bucket_size } => {
            Box::new(Buffered::bucketed(TrimmedMean::new(fraction), buckets(bucket_size)))
        }
        StrategyConfig::Krum { byzantine, select: None, bucket_size } => {
            Box::new(Buffered::bucketed(Krum::single(byzantine), buckets(bucket_size)))
        }
        StrategyConfig::Krum { byzantine, select: Some(select), bucket_size } => {
            Box::new(Buffered::bucketed(Krum::multi(byzantine, select), buckets(bucket_size)))
        }
        StrategyConfig::NormBound { bound, bucket_size } => {
            Box::new(NormBound::new(bound).with_bucketing(buckets(bucket_size)))
        }
        StrategyConfig::CenteredClip { radius, iters, bucket_size } => {
            Box::new(Buffered::bucketed(CenteredClip::new(radius, iters), buckets(bucket_size)))
        }
        StrategyConfig::FlTrust { norm, .. } => Box::new(FlTrust::new(norm)),
    }
}
