//! FedOpt: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan 2021, "Adaptive
//! Federated Optimization" (Algorithm 2). The round's averaged delta is a pseudo-gradient
//! `-Delta`; a server optimiser turns it into the step the global model takes. The averaging
//! is FedAvg's (DP-FedAvg's under central DP: the optimiser then post-processes an already
//! private mean, so the accountant's charge does not change). The optimisers' moments are
//! server state, saved with every model version and restored after a restart.

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;

use super::{Contribution, ServerState, Strategy};

/// A server optimiser: the update rule applied to the averaged delta.
pub trait ServerOptimizer: Send + std::fmt::Debug {
    /// The strategy's name.
    fn name(&self) -> &'static str;
    /// Turns the round's mean delta into the step added to the global model, in place,
    /// updating the moments (sized to the model on first use).
    fn step(&mut self, delta: &mut [f32]);
    /// The moments, for saving.
    fn moments(&self) -> Vec<Vec<f32>>;
    /// Restores saved moments (as many vectors as [`Self::moments`] returns).
    fn set_moments(&mut self, moments: Vec<Vec<f32>>) -> Result<(), AggregateError>;
}

/// Averaging by `inner`, then a step by `optimizer`.
pub struct FedOpt<O> {
    inner: Box<dyn Strategy>,
    optimizer: O,
}

impl<O: ServerOptimizer> std::fmt::Debug for FedOpt<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedOpt").field("inner", &self.inner.name()).field("optimizer", &self.optimizer).finish()
    }
}

impl<O: ServerOptimizer> FedOpt<O> {
    /// `optimizer` on the mean `inner` (FedAvg or DP-FedAvg, server learning rate 1) makes.
    pub fn new(inner: Box<dyn Strategy>, optimizer: O) -> Self {
        Self { inner, optimizer }
    }
}

impl<O: ServerOptimizer> Strategy for FedOpt<O> {
    fn name(&self) -> &'static str {
        self.optimizer.name()
    }

    fn begin_round(&mut self, round: u64, global: &ModelParams, expected: usize) {
        self.inner.begin_round(round, global, expected);
    }

    fn clip_norm(&self) -> Option<f64> {
        self.inner.clip_norm()
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
        let averaged = self.inner.aggregate_train(round, global, failures)?;
        let mut delta = averaged.delta_from(global)?;
        self.optimizer.step(delta.data_mut());
        // A round the engine then fails (a non-finite model, a step past max_step_norm) gets
        // the moments back from the server state it saved before aggregating.
        let mut next = global.clone();
        next.add_scaled(&delta, 1.0)?;
        Ok(next)
    }

    fn server_state(&self) -> Option<ServerState> {
        Some(ServerState { strategy: self.name().into(), vectors: self.optimizer.moments() })
    }

    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        let n = self.optimizer.moments().len();
        let moments = state.take(self.name(), n)?;
        self.optimizer.set_moments(moments)
    }
}

/// How an adaptive optimiser moves its second moment `v` with the squared delta `g2`: the one
/// line in which FedAdagrad, FedAdam and FedYogi differ (Reddi et al. 2021, Algorithm 2).
pub trait SecondMoment: Send + std::fmt::Debug + Clone {
    /// The strategy's name.
    const NAME: &'static str;
    /// The new `v` from `v`, `g2 = Delta^2` and `beta2`.
    fn update(v: f32, g2: f32, beta2: f32) -> f32;
}

/// Reddi et al.'s adaptive server optimiser: `m <- beta1 m + (1 - beta1) Delta`, `v` by `S`,
/// `w <- w + eta m / (sqrt(v) + tau)`, `v` starting at `tau^2`, no bias correction.
#[derive(Debug, Clone)]
pub struct Adaptive<S> {
    server_lr: f32,
    beta1: f32,
    beta2: f32,
    tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    rule: std::marker::PhantomData<S>,
}

impl<S: SecondMoment> Adaptive<S> {
    /// Step size eta, moment decays beta1 and beta2 (unused by FedAdagrad), adaptivity tau.
    pub fn new(server_lr: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        let f = |x: f64| x as f32;
        Self {
            server_lr: f(server_lr),
            beta1: f(beta1),
            beta2: f(beta2),
            tau: f(tau),
            m: Vec::new(),
            v: Vec::new(),
            rule: std::marker::PhantomData,
        }
    }
}

impl<S: SecondMoment> ServerOptimizer for Adaptive<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn step(&mut self, delta: &mut [f32]) {
        sized(&mut self.m, delta.len(), 0.0);
        sized(&mut self.v, delta.len(), self.tau * self.tau);
        let (b1, b2, eta, tau) = (self.beta1, self.beta2, self.server_lr, self.tau);
        for ((d, m), v) in delta.iter_mut().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
            *v = S::update(*v, *d * *d, b2);
            *m = b1 * *m + (1.0 - b1) * *d;
            *d = eta * *m / (v.sqrt() + tau);
        }
    }

    fn moments(&self) -> Vec<Vec<f32>> {
        vec![self.m.clone(), self.v.clone()]
    }

    fn set_moments(&mut self, moments: Vec<Vec<f32>>) -> Result<(), AggregateError> {
        [self.m, self.v] =
            moments.try_into().map_err(|_| AggregateError::State("expected two moment vectors".into()))?;
        Ok(())
    }
}

/// Resizes moment `m` to `d` values of `init` when it does not fit (first use).
pub(crate) fn sized(m: &mut Vec<f32>, d: usize, init: f32) {
    if m.len() != d {
        *m = vec![init; d];
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Case, check, contribution, params};
    use super::super::{FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi};
    use super::*;

    fn opt<O: ServerOptimizer>(o: O) -> FedOpt<O> {
        FedOpt::new(Box::new(FedAvg::default()), o)
    }

    #[test]
    fn check_first_round() {
        // Mean delta 3 (and -1 beside it); m = 0.3 (-0.1) after one round for the adaptive ones.
        let two: &[&[f32]] = &[&[2.0, 0.0], &[4.0, -2.0]];
        let cases: &[Case] = &[("two updates", two, Ok(&[3.0, -1.0])), ("no update", &[], Err(AggregateError::Empty))];
        check(|| opt(FedAvgM::new(1.0, 0.9)), cases);
        // eta m / (sqrt(v) + tau): v = tau^2 + 9 (Adagrad), 0.99 tau^2 + 0.01 * 9 (Adam),
        // tau^2 + 0.01 * 9 (Yogi: v < Delta^2, so v grows).
        let adagrad = [0.009_996_667, -0.1 * 0.1 / ((1e-6f64 + 1.0).sqrt() + 1e-3) as f32];
        check(|| opt(FedAdagrad::new(0.1, 0.9, 0.0, 1e-3)), &[("adagrad", two, Ok(&adagrad))]);
        let adam = [0.009_966_723, -0.01 * 0.1 / ((0.99e-6f64 + 0.01).sqrt() + 1e-3) as f32];
        check(|| opt(FedAdam::new(0.01, 0.9, 0.99, 1e-3)), &[("adam", two, Ok(&adam))]);
        let yogi = [0.009_966_722, -0.01 * 0.1 / ((1e-6f64 + 0.01).sqrt() + 1e-3) as f32];
        check(|| opt(FedYogi::new(0.01, 0.9, 0.99, 1e-3)), &[("yogi", two, Ok(&yogi))]);
        // All-equal updates: the mean is the update.
        check(|| opt(FedAvgM::new(0.5, 0.0)), &[("all equal", &[&[2.0], &[2.0]], Ok(&[1.0]))]);
    }

    /// Two rounds from `global`, mean deltas 3 then 1; the second from a restored copy too.
    fn two_rounds<O: ServerOptimizer + Clone>(o: O) -> (f32, f32) {
        let mut s = opt(o.clone());
        let mut global = params(&[0.0]);
        for (r, d) in [(1, 3.0), (2, 1.0)] {
            s.begin_round(r, &global, 1);
            s.accumulate(contribution(&params(&[d]), 1)).unwrap();
            global = s.aggregate_train(r, &global, 0).unwrap();
            if r == 1 {
                // A restart between the rounds: the moments come back from the saved state.
                let mut restored = opt(o.clone());
                restored.restore_server_state(s.server_state().unwrap()).unwrap();
                restored.begin_round(2, &global, 1);
                restored.accumulate(contribution(&params(&[1.0]), 1)).unwrap();
                let again = restored.aggregate_train(2, &global, 0).unwrap().data()[0];
                s.begin_round(2, &global, 1);
                s.accumulate(contribution(&params(&[1.0]), 1)).unwrap();
                let second = s.aggregate_train(2, &global, 0).unwrap().data()[0];
                return (second, again);
            }
        }
        unreachable!()
    }

    #[test]
    fn moments_carry_over_rounds_and_restarts() {
        // FedAvgM: m = 3, then 0.9 * 3 + 1 = 3.7; the model 3 + 3.7.
        assert_eq!(two_rounds(FedAvgM::new(1.0, 0.9)), (6.7, 6.7));
        // FedAdam: round 2 has m = 0.9 * 0.3 + 0.1 = 0.37, v = 0.99 v1 + 0.01.
        let v1 = 0.99e-6f64 + 0.09;
        let step1 = 0.01 * 0.3 / (v1.sqrt() + 1e-3);
        let want = step1 + 0.01 * 0.37 / ((0.99 * v1 + 0.01).sqrt() + 1e-3);
        let (second, again) = two_rounds(FedAdam::new(0.01, 0.9, 0.99, 1e-3));
        assert!((f64::from(second) - want).abs() < 1e-6 && second == again, "{second} {again} {want}");
        // Yogi: v1 = tau^2 + 0.09 < 1 = Delta^2 in round 2, so v grows by (1 - beta2) * 1 = 0.01
        // (additively, where Adam would also decay the old v).
        let v1 = 1e-6f64 + 0.09;
        let want = 0.01 * 0.3 / (v1.sqrt() + 1e-3) + 0.01 * 0.37 / ((v1 + 0.01).sqrt() + 1e-3);
        let (second, again) = two_rounds(FedYogi::new(0.01, 0.9, 0.99, 1e-3));
        assert!((f64::from(second) - want).abs() < 1e-6 && second == again, "{second} {again} {want}");
        // Another strategy's state is refused.
        let mut adam = opt(FedAdam::new(0.01, 0.9, 0.99, 1e-3));
        let yogi_state = opt(FedYogi::new(0.01, 0.9, 0.99, 1e-3)).server_state().unwrap();
        assert!(matches!(adam.restore_server_state(yogi_state), Err(AggregateError::State(_))));
    }
}
