//! Centered clipping: Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine
//! Robust Optimization". Starting from the centre `v` (the previous round's aggregate step:
//! history, zero in the first round), each of `L` iterations moves it by the mean of the
//! updates' offsets from it, each offset clipped to radius `tau`:
//!
//! `v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)`.
//!
//! An attacker moves `v` by at most `tau / n` per iteration, whatever it sends. `tau` defaults
//! to the median distance of the updates to the current centre (recomputed each iteration), so
//! it follows the honest majority's spread without tuning. One vote per device. The centre is
//! server state: it is saved with every model version and restored after a restart. Holds every
//! update of the round ([`super::buffer`]).

use fedge_core::aggregate::AggregateError;

use super::ServerState;
use super::buffer::{BufferedRule, UpdateBuffer, median_f64, sq_dist};

/// Centered clipping around the previous step.
#[derive(Debug, Clone)]
pub struct CenteredClip {
    radius: Option<f64>,
    iters: u32,
    centre: Vec<f32>,
}

impl CenteredClip {
    /// Clips to `radius` (`None`: the median distance) for `iters` iterations.
    pub fn new(radius: Option<f64>, iters: u32) -> Self {
        Self { radius, iters: iters.max(1), centre: Vec::new() }
    }
}

impl BufferedRule for CenteredClip {
    fn name(&self) -> &'static str {
        "centered-clip"
    }

    fn step(&mut self, buffer: &UpdateBuffer) -> Result<Vec<f32>, AggregateError> {
        let updates = buffer.updates();
        let n = updates.len();
        let d = updates[0].len();
        let mut v: Vec<f64> = match self.centre.len() == d {
            true => self.centre.iter().map(|&c| f64::from(c)).collect(),
            false => vec![0.0; d],
        };
        for _ in 0..self.iters {
            let centre: Vec<f32> = v.iter().map(|&c| c as f32).collect();
            let dists: Vec<f64> = updates.iter().map(|u| sq_dist(u, &centre).sqrt()).collect();
            let tau = self.radius.unwrap_or_else(|| median_f64(&mut dists.clone()));
            let mut moved = vec![0.0f64; d];
            for (u, &dist) in updates.iter().zip(&dists) {
                let w = if dist > tau { tau / dist } else { 1.0 } / n as f64;
                moved.iter_mut().zip(u).zip(&centre).for_each(|((m, &x), &c)| *m += w * f64::from(x - c));
            }
            v.iter_mut().zip(&moved).for_each(|(c, m)| *c += m);
        }
        Ok(v.iter().map(|&c| c as f32).collect())
    }

    fn taken(&mut self, step: &[f32]) {
        self.centre = step.to_vec();
    }

    fn server_state(&self) -> Option<ServerState> {
        Some(ServerState { strategy: self.name().into(), vectors: vec![self.centre.clone()] })
    }

    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        let [centre] =
            state.take(self.name(), 1)?.try_into().map_err(|_| AggregateError::State("one vector".into()))?;
        self.centre = centre;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Strategy;
    use super::super::buffer::Buffered;
    use super::super::testing::{Case, check, contribution, params};
    use super::*;

    #[test]
    fn check_one_iteration_from_zero() {
        let cases: &[Case] = &[
            // tau = 1: (3, 4) -> (0.6, 0.8); (0, 1) and (0.5, 0) stay. Mean (1.1/3, 1.8/3).
            ("far update clipped", &[&[3.0, 4.0], &[0.0, 1.0], &[0.5, 0.0]], Ok(&[1.1 / 3.0, 0.6])),
            ("all equal within", &[&[0.5, 0.0], &[0.5, 0.0]], Ok(&[0.5, 0.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| Buffered::new(CenteredClip::new(Some(1.0), 1)), cases);
    }

    #[test]
    fn check_median_radius() {
        let cases: &[Case] = &[
            // Distances 1, 2, 100 from 0: tau = 2; (100) -> 2. Mean (1 + 2 + 2) / 3.
            ("median distance", &[&[1.0], &[2.0], &[100.0]], Ok(&[5.0 / 3.0])),
            ("ties", &[&[2.0], &[2.0], &[-2.0]], Ok(&[2.0 / 3.0])),
        ];
        check(|| Buffered::new(CenteredClip::new(None, 1)), cases);
    }

    #[test]
    fn iterations_and_history_move_the_centre_towards_the_majority() {
        let global = params(&[0.0]);
        let mut s = Buffered::new(CenteredClip::new(None, 5));
        let round = |s: &mut Buffered<CenteredClip>, r| {
            s.begin_round(r, &global, 5);
            for v in [1.0, 1.1, 0.9, 1.0, -50.0] {
                s.accumulate(contribution(&params(&[v]), 1)).unwrap();
            }
            s.aggregate_train(r, &global, 0).unwrap().data()[0]
        };
        let first = round(&mut s, 1);
        let second = round(&mut s, 2);
        assert!(
            first > 0.5 && (second - 1.0).abs() < (first - 1.0).abs() && (second - 1.0).abs() < 0.05,
            "{first} {second}"
        );
        // The centre survives a restart.
        let mut restored = Buffered::new(CenteredClip::new(None, 5));
        restored.restore_server_state(s.server_state().unwrap()).unwrap();
        let mut again = Buffered::new(CenteredClip::new(None, 5));
        again.restore_server_state(s.server_state().unwrap()).unwrap();
        assert_eq!(round(&mut restored, 3), round(&mut s, 3));
        assert!(again.restore_server_state(ServerState { strategy: "fedadam".into(), vectors: vec![] }).is_err());
    }
}
