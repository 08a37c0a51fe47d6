//! The engine's input for secure aggregation: the round's results arrive as one sum, never one
//! by one.
//!
//! With secure aggregation (`fedge-secagg`) the server learns only the sum of the devices'
//! (sample-weighted, clipped, quantised) deltas. The driver runs that protocol among the
//! round's reporting devices and hands the engine a [`SecureAggregate`]: the weighted mean
//! delta it decoded, the total weight, and which devices it holds. The engine folds it into
//! the strategy as a single contribution of that weight, so FedAvg (a weighted mean of one
//! item is the item), the server optimisers and FedProx apply it unchanged. Strategies that
//! need each update (the robust rules) and central DP (whose strategy clips and counts each
//! update) refuse it.

use std::collections::BTreeSet;
use std::time::Duration;

use fedge_core::ModelParams;
use fedge_core::wire::DeviceId;

use super::RoundEngine;
use crate::error::RejectReason;
use crate::strategy::{Contribution, Strategy};

/// A round's results as secure aggregation delivers them: their weighted mean, not them.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureAggregate {
    /// The devices whose deltas the sum holds (each selected and pending in the round).
    pub devices: Vec<DeviceId>,
    /// `sum_i w_i delta_i / sum_i w_i` over those devices.
    pub mean_delta: ModelParams,
    /// `sum_i w_i`, the samples the mean stands for.
    pub samples: u64,
}

impl<S: Strategy> RoundEngine<S> {
    /// The open round's results, securely aggregated. Each device in `aggregate.devices` counts
    /// as one result; the round closes as [`Self::handle_train_result`] would close it. Refused
    /// without any change: for another round, a device not selected or already answered (or
    /// named twice), no device, under central DP or a strategy that holds every update, or a
    /// mean the strategy refuses (shape, non-finite).
    pub fn handle_secure_aggregate(
        &mut self,
        now: Duration,
        round: u64,
        aggregate: &SecureAggregate,
    ) -> Result<(), RejectReason> {
        let version = self.version;
        let Some(open) = self.open.as_ref().filter(|o| o.round == round) else {
            return Err(RejectReason::Stale {
                got_round: round,
                got_version: version,
                round: self.current_round().unwrap_or(0),
                version,
            });
        };
        let secure = |m: &str| Err(RejectReason::Secure(m.into()));
        if aggregate.devices.is_empty() {
            return secure("it holds no device");
        }
        if self.config.privacy.is_some() {
            return secure("central DP clips and noises each update; it does not take a sum yet");
        }
        if self.strategy.holds_updates() {
            return secure("the strategy needs every update, not their sum");
        }
        let mut seen = BTreeSet::new();
        for &d in &aggregate.devices {
            if !open.chosen.contains(&d) {
                return Err(RejectReason::NotSelected(d));
            }
            if !open.pending.contains(&d) || !seen.insert(d) {
                return Err(RejectReason::Duplicate(d));
            }
        }
        let contribution = Contribution {
            delta: &aggregate.mean_delta,
            num_samples: aggregate.samples.max(1),
            clipped: false,
            clip_scale: 1.0,
        };
        self.strategy.check(contribution).map_err(RejectReason::Invalid)?;
        self.strategy.accumulate(contribution).map_err(RejectReason::Invalid)?;
        let open = self.open.as_mut().expect("checked: a round is open");
        for d in &aggregate.devices {
            open.pending.remove(d);
        }
        open.results += aggregate.devices.len();
        open.samples = open.samples.saturating_add(aggregate.samples);
        // No device's loss is revealed: the report's train_loss is NaN.
        open.loss_sum = f64::NAN;
        self.close_if_done(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assigned, cfg, closed, engine, params};
    use super::*;
    use crate::RoundOutcome;
    use crate::config::{CentralDp, EngineConfig};

    const S: Duration = Duration::from_secs(1);

    fn agg(devices: &[DeviceId], mean: [f32; 2], samples: u64) -> SecureAggregate {
        SecureAggregate { devices: devices.to_vec(), mean_delta: params(mean), samples }
    }

    #[test]
    fn a_sum_closes_the_round_as_its_results_would() {
        let mut e = engine(10, cfg(0.3, 2));
        e.start_round(S).unwrap();
        let chosen: Vec<DeviceId> = assigned(&mut e).into_iter().map(|(d, _)| d).collect();
        e.handle_train_failure(S, chosen[2]);
        e.handle_secure_aggregate(2 * S, 1, &agg(&chosen[..2], [0.5, -1.0], 30)).unwrap();
        let r = closed(&mut e);
        assert_eq!((r.results, r.failures, r.samples, r.model_version), (2, 1, 30, 1));
        assert_eq!(r.outcome, RoundOutcome::Aggregated);
        assert!(r.train_loss.is_nan());
        assert_eq!(e.global().data(), &[0.5, -1.0]);
    }

    #[test]
    fn a_sum_below_the_quorum_fails_the_round_at_the_deadline() {
        let mut e = engine(10, cfg(0.3, 3));
        e.start_round(S).unwrap();
        let chosen: Vec<DeviceId> = assigned(&mut e).into_iter().map(|(d, _)| d).collect();
        e.handle_secure_aggregate(2 * S, 1, &agg(&chosen[..2], [0.5, -1.0], 30)).unwrap();
        assert!(e.poll_event().is_none());
        e.handle_timeout(11 * S);
        let r = closed(&mut e);
        assert!(matches!(r.outcome, RoundOutcome::Failed(_)), "{r:?}");
        assert_eq!((r.stragglers.len(), e.version()), (1, 0));
    }

    #[test]
    fn wrong_sums_are_refused_without_a_change() {
        let mut e = engine(10, cfg(0.3, 1));
        e.start_round(S).unwrap();
        let chosen: Vec<DeviceId> = assigned(&mut e).into_iter().map(|(d, _)| d).collect();
        let stranger = (0..10).find(|d| !chosen.contains(d)).unwrap();
        let refuse =
            |e: &mut RoundEngine<_>, round, a: &SecureAggregate| e.handle_secure_aggregate(S, round, a).unwrap_err();
        assert!(matches!(refuse(&mut e, 2, &agg(&chosen, [0.0; 2], 1)), RejectReason::Stale { .. }));
        assert!(matches!(refuse(&mut e, 1, &agg(&[], [0.0; 2], 1)), RejectReason::Secure(_)));
        assert_eq!(refuse(&mut e, 1, &agg(&[chosen[0], stranger], [0.0; 2], 1)), RejectReason::NotSelected(stranger));
        assert_eq!(refuse(&mut e, 1, &agg(&[chosen[0], chosen[0]], [0.0; 2], 1)), RejectReason::Duplicate(chosen[0]));
        assert!(matches!(refuse(&mut e, 1, &agg(&chosen, [f32::NAN, 0.0], 1)), RejectReason::Invalid(_)));
        assert!(e.poll_event().is_none());
        e.handle_secure_aggregate(S, 1, &agg(&chosen, [1.0, 2.0], 3)).unwrap();
        assert_eq!(closed(&mut e).results, 3);
        assert_eq!(e.global().data(), &[1.0, 2.0]);
    }

    #[test]
    fn central_dp_refuses_a_sum() {
        let privacy = Some(CentralDp {
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            adaptive: None,
            delta: 1e-5,
            target_epsilon: None,
        });
        let mut e = engine(10, EngineConfig { privacy, ..cfg(0.3, 1) });
        e.start_round(S).unwrap();
        let chosen: Vec<DeviceId> = assigned(&mut e).into_iter().map(|(d, _)| d).collect();
        assert!(matches!(e.handle_secure_aggregate(S, 1, &agg(&chosen, [0.0; 2], 1)), Err(RejectReason::Secure(_))));
    }
}
