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
    /// Under distributed DP: the Gaussian noise the sum carries, as a multiple of the clip
    /// norm (what the ledger charges; `None` without DP).
    pub noise_multiplier: Option<f64>,
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
        match (&self.config.privacy, self.config.distributed_dp, aggregate.noise_multiplier) {
            (Some(_), false, _) => {
                return secure("central DP clips and noises each update; it does not take a sum (use distributed DP)");
            }
            (Some(_), true, None) => return secure("distributed DP: the sum must say what noise it carries"),
            (Some(_), true, Some(z)) if !(z.is_finite() && z > 0.0) => {
                return secure(&format!("distributed DP: the sum carries noise multiplier {z}"));
            }
            (None, _, Some(_)) => return secure("the sum carries noise but this round has no DP to account it"),
            _ => {}
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
        open.carried_noise = aggregate.noise_multiplier;
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
        SecureAggregate { devices: devices.to_vec(), mean_delta: params(mean), samples, noise_multiplier: None }
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

    #[test]
    fn distributed_dp_takes_only_sums_and_charges_the_noise_they_carry() {
        let privacy = Some(CentralDp {
            noise_multiplier: 1.0,
            clip_norm: 0.5,
            adaptive: None,
            delta: 1e-5,
            target_epsilon: None,
        });
        let config = EngineConfig { privacy, distributed_dp: true, ..cfg(0.3, 1) };
        config.validate().unwrap();
        // The strategy a configuration builds adds no noise of its own.
        let strategy = crate::strategy::build(&config, Box::new(fedge_core::rng::derive_rng(1, &[])));
        let mut e = RoundEngine::new(config.clone(), strategy, params([0.0, 0.0])).unwrap();
        for d in 0..10 {
            e.handle_device_available(d);
        }
        e.start_round(S).unwrap();
        let tasks = assigned(&mut e);
        let chosen: Vec<DeviceId> = tasks.iter().map(|(d, _)| *d).collect();
        // A plain result is refused: it carries no noise.
        let plain = fedge_core::wire::TrainResult {
            round: 1,
            model_version: 0,
            num_samples: 1,
            train_loss: 0.1,
            delta: params([0.1, 0.1]),
            clipped: true,
        };
        assert!(matches!(e.handle_train_result(S, chosen[0], &plain), Err(RejectReason::Secure(_))));
        // A sum must say what noise it carries.
        assert!(matches!(e.handle_secure_aggregate(S, 1, &agg(&chosen, [0.0; 2], 3)), Err(RejectReason::Secure(_))));
        let bad = SecureAggregate { noise_multiplier: Some(f64::NAN), ..agg(&chosen, [0.0; 2], 3) };
        assert!(matches!(e.handle_secure_aggregate(S, 1, &bad), Err(RejectReason::Secure(_))));
        // The mean is taken as it is (no server noise); the ledger charges z = 0.8 at q = 3/10.
        let noisy = SecureAggregate { noise_multiplier: Some(0.8), ..agg(&chosen, [0.25, -0.5], 3) };
        e.handle_secure_aggregate(S, 1, &noisy).unwrap();
        let r = closed(&mut e);
        assert_eq!(e.global().data(), &[0.25, -0.5]);
        let p = r.privacy.expect("the released model is accounted");
        assert_eq!((p.noise_multiplier, p.sampling_rate, p.clip_norm), (0.8, 0.3, 0.5));
        let want = fedge_core::privacy::epsilon(0.3, 0.8, 1, 1e-5).unwrap().epsilon;
        assert!((p.epsilon - want).abs() < 1e-12);
        // Without DP a sum may not claim noise; distributed DP without noise settings is refused.
        let mut plain_engine = engine(10, cfg(0.3, 1));
        plain_engine.start_round(S).unwrap();
        let chosen: Vec<DeviceId> = assigned(&mut plain_engine).into_iter().map(|(d, _)| d).collect();
        let claims = SecureAggregate { noise_multiplier: Some(1.0), ..agg(&chosen, [0.0; 2], 3) };
        assert!(matches!(plain_engine.handle_secure_aggregate(S, 1, &claims), Err(RejectReason::Secure(_))));
        assert!(EngineConfig { distributed_dp: true, ..cfg(0.3, 1) }.validate().is_err());
    }
}
