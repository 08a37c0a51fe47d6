//! FLTrust: Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via
//! Trust Bootstrapping" (NDSS). The server trains the round's global model on a small clean
//! *root set* of its own and scores each device's update `g_i` by how far it points the same
//! way as that reference update `g_0`:
//!
//! `TS_i = ReLU(cos(g_i, g_0))`, `step = sum_i TS_i (||g_0|| / ||g_i||) g_i / sum_i TS_i`.
//!
//! An update pointing away from the reference counts for nothing (sign-flip, label-flip
//! updates that undo what the root set teaches); every update is rescaled to the reference's
//! norm, so boosting (model replacement) or noise buys no magnitude. One vote per device:
//! sample counts are not used (a device's claim of many examples is exactly what an attacker
//! would inflate). A zero update has no direction and scores 0.
//!
//! The reference comes from the driver ([`crate::RoundEngine::handle_reference`]): the round
//! opens at once, devices train while the server trains on its root set, and the round does
//! not close on its results until the reference is in (at its deadline it fails without one).
//! Memory: the round's updates are held until it aggregates, `4 d` bytes each
//! ([`super::buffer`]; bounded by `max_buffer_mb` when the round starts); the reference is one
//! model more. Like the other robust rules it is
//! refused with central DP (one device moves the weights of the others' votes).
//!
//! `fltrust_norm = "median"` rescales every update to the median norm of the round's updates
//! instead of the reference's (an honest device's norm while fewer than half attack): the
//! reference then only scores directions, and the step size no longer depends on how many
//! local steps the root set's size makes (a large root set gives a sharper direction and, with
//! the paper's rescaling, a longer step than any device's). Not the paper's rule; measured
//! beside it in docs/simulations.md.
//!
//! The root set is the server's: how the simulator and the coordinator pick it (and how large
//! it is, `root_examples`) is theirs. The paper's root set is 100 examples drawn like the
//! training data; the reference is trained with the devices' own local settings (epochs, batch
//! size, learning rate), so that its norm, which every update is rescaled to, is a device's.

use fedge_core::ModelParams;
use fedge_core::aggregate::AggregateError;

use super::buffer::{UpdateBuffer, median_f64, sq_norm};
use super::choice::TrustNorm;
use super::{Contribution, Strategy};

/// Trust-scored, normalised averaging.
#[derive(Debug)]
pub struct FlTrust {
    norm: TrustNorm,
    buffer: UpdateBuffer,
    reference: Option<Vec<f32>>,
}

impl FlTrust {
    /// A rule waiting for each round's reference, rescaling updates to `norm`.
    pub fn new(norm: TrustNorm) -> Self {
        Self { norm, buffer: UpdateBuffer::default(), reference: None }
    }
}

impl Strategy for FlTrust {
    fn name(&self) -> &'static str {
        "fltrust"
    }

    fn begin_round(&mut self, _round: u64, global: &ModelParams, _expected: usize) {
        self.buffer.begin(global);
        self.reference = None;
    }

    fn holds_updates(&self) -> bool {
        true
    }

    fn wants_reference(&self) -> bool {
        self.reference.is_none()
    }

    fn set_reference(&mut self, reference: &ModelParams) -> Result<(), AggregateError> {
        // The same checks as a device's update: the model's layout, finite values.
        self.buffer.check(Contribution { delta: reference, num_samples: 1, clipped: false, clip_scale: 1.0 })?;
        self.reference = Some(reference.data().to_vec());
        Ok(())
    }

    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.buffer.check(c)
    }

    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.buffer.push(c)
    }

    fn aggregate_train(&mut self, _round: u64, global: &ModelParams, _: usize) -> Result<ModelParams, AggregateError> {
        let reference = self.reference.take().ok_or_else(|| {
            AggregateError::Reference("the server's reference update for this round never came".into())
        })?;
        self.buffer.need("fltrust", 1)?;
        let ref_norm = sq_norm(&reference).sqrt();
        let norms: Vec<f64> = self.buffer.updates().iter().map(|u| sq_norm(u).sqrt()).collect();
        let scale_to = match self.norm {
            TrustNorm::Reference => ref_norm,
            TrustNorm::Median => median_f64(&mut norms.clone()),
        };
        if ref_norm == 0.0 {
            return Err(AggregateError::Reference("the reference update is zero: it scores nothing".into()));
        }
        let mut step = vec![0.0f64; reference.len()];
        let mut trust = 0.0f64;
        for (u, &norm) in self.buffer.updates().iter().zip(&norms) {
            if norm == 0.0 {
                continue;
            }
            let dot: f64 = u.iter().zip(&reference).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let score = (dot / (norm * ref_norm)).max(0.0);
            if score == 0.0 {
                continue;
            }
            trust += score;
            let w = score * scale_to / norm;
            step.iter_mut().zip(u).for_each(|(s, &v)| *s += w * f64::from(v));
        }
        if trust == 0.0 {
            return Err(AggregateError::Reference(format!(
                "none of the {} updates points the reference's way (every trust score is 0)",
                self.buffer.updates().len()
            )));
        }
        let step: Vec<f32> = step.iter().map(|&s| (s / trust) as f32).collect();
        self.buffer.finish(global, &step)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{contribution, params};
    use super::*;

    /// Aggregates `updates` (from a zero model) against `reference`.
    fn run(reference: &[f32], updates: &[&[f32]]) -> Result<Vec<f32>, AggregateError> {
        let global = params(&vec![0.0; reference.len()]);
        let mut s = FlTrust::new(TrustNorm::Reference);
        s.begin_round(1, &global, updates.len());
        assert!(s.wants_reference());
        for u in updates {
            let u = params(u);
            s.check(contribution(&u, 1)).unwrap();
            s.accumulate(contribution(&u, 1)).unwrap();
        }
        s.set_reference(&params(reference))?;
        assert!(!s.wants_reference());
        s.aggregate_train(1, &global, 0).map(|m| m.data().to_vec())
    }

    fn close(got: &[f32], want: &[f32]) -> bool {
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-5 * w.abs().max(1.0))
    }

    #[test]
    fn check_hand_computed_cases() {
        let s2 = std::f32::consts::FRAC_1_SQRT_2;
        type Row<'a> = (&'a str, &'a [f32], &'a [&'a [f32]], Result<&'a [f32], AggregateError>);
        let cases: &[Row] = &[
            // Reference (1, 0), norm 1. (2, 0): cos 1, rescaled to (1, 0). (0, 3): cos 0,
            // dropped. (-5, 0): cos -1, dropped. Step (1, 0).
            (
                "orthogonal and opposite updates count for nothing",
                &[1.0, 0.0],
                &[&[2.0, 0.0], &[0.0, 3.0], &[-5.0, 0.0]],
                Ok(&[1.0, 0.0]),
            ),
            // Reference (2, 0), norm 2. (1, 1): cos 1/sqrt2, rescaled to 2 (1,1)/sqrt2 = (sqrt2, sqrt2).
            // (3, 0): cos 1, rescaled to (2, 0). Step = (s2 (sqrt2, sqrt2) + (2, 0)) / (s2 + 1).
            (
                "weighted by cosine, rescaled to the reference's norm",
                &[2.0, 0.0],
                &[&[1.0, 1.0], &[3.0, 0.0]],
                Ok(&[(1.0 + 2.0) / (s2 + 1.0), 1.0 / (s2 + 1.0)]),
            ),
            // A boosted update (x1000) counts as much as an honest one of the same direction.
            ("boosting buys nothing", &[0.0, 1.0], &[&[0.0, 1000.0], &[0.0, 0.5]], Ok(&[0.0, 1.0])),
            ("all equal updates", &[1.0, 1.0], &[&[2.0, 2.0], &[2.0, 2.0]], Ok(&[1.0, 1.0])),
            // Ties in score: two updates at the same angle on either side average to the reference's direction.
            ("ties", &[1.0, 0.0], &[&[1.0, 1.0], &[1.0, -1.0]], Ok(&[s2, 0.0])),
            // A zero update has no direction.
            ("a zero update is skipped", &[1.0, 0.0], &[&[0.0, 0.0], &[4.0, 0.0]], Ok(&[1.0, 0.0])),
            ("no update", &[1.0, 0.0], &[], Err(AggregateError::Empty)),
        ];
        for (what, reference, updates, want) in cases {
            match (run(reference, updates), want) {
                (Ok(got), Ok(want)) => assert!(close(&got, want), "{what}: got {got:?}, want {want:?}"),
                (got, want) => assert_eq!(got, want.clone().map(<[f32]>::to_vec), "{what}"),
            }
        }
    }

    #[test]
    fn refusals_are_clear() {
        // Every update points away: nothing to trust.
        let e = run(&[1.0, 0.0], &[&[-1.0, 0.0], &[-2.0, 0.1]]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server's reference update: none of the 2 updates points the reference's way (every trust score is 0)"
        );
        let e = run(&[0.0, 0.0], &[&[1.0, 0.0]]).unwrap_err();
        assert!(e.to_string().contains("the reference update is zero"), "{e}");
        // No reference by the close: the round cannot aggregate.
        let global = params(&[0.0]);
        let mut s = FlTrust::new(TrustNorm::Reference);
        s.begin_round(1, &global, 1);
        s.accumulate(contribution(&params(&[1.0]), 1)).unwrap();
        assert!(s.aggregate_train(1, &global, 0).unwrap_err().to_string().contains("never came"));
        // A reference of the wrong shape or with NaN is refused and leaves the rule waiting.
        s.begin_round(2, &global, 1);
        assert_eq!(s.set_reference(&params(&[1.0, 2.0])), Err(AggregateError::LayoutMismatch));
        assert_eq!(s.set_reference(&params(&[f32::NAN])), Err(AggregateError::NonFinite(0)));
        assert!(s.wants_reference());
        // A NaN update is refused like by every rule.
        assert!(s.check(contribution(&params(&[f32::INFINITY]), 1)).is_err());
    }

    #[test]
    fn median_norm_rescales_to_the_rounds_median() {
        let global = params(&[0.0, 0.0]);
        let mut s = FlTrust::new(TrustNorm::Median);
        s.begin_round(1, &global, 3);
        // Norms 1, 3 and 100: median 3. Reference (1, 0): (0, 1) scores 0; (3, 0) scores 1
        // and stays (3, 0); (-100, 0) scores 0. Step (3, 0), whatever the reference's norm.
        for u in [[0.0, 1.0], [3.0, 0.0], [-100.0, 0.0]] {
            s.accumulate(contribution(&params(&u), 1)).unwrap();
        }
        s.set_reference(&params(&[0.01, 0.0])).unwrap();
        assert_eq!(s.aggregate_train(1, &global, 0).unwrap().data(), &[3.0, 0.0]);
        // Ties at the median: (1, 1) and (2, 0) and (0, 2): norms sqrt2, 2, 2, median 2.
        s.begin_round(2, &global, 3);
        for u in [[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]] {
            s.accumulate(contribution(&params(&u), 1)).unwrap();
        }
        s.set_reference(&params(&[1.0, 1.0])).unwrap();
        // Scores 1, s, s (s = 1/sqrt2); rescaled to 2: (sqrt2, sqrt2), (2, 0), (0, 2).
        // Step = ((sqrt2, sqrt2) + s (2, 2)) / (1 + 2 s) = (2 sqrt2 / (1 + sqrt2)) (1, 1).
        let want = 2.0 * std::f32::consts::SQRT_2 / (1.0 + std::f32::consts::SQRT_2);
        let got = s.aggregate_train(2, &global, 0).unwrap();
        assert!(close(got.data(), &[want, want]), "{:?}", got.data());
    }

    #[test]
    fn a_new_round_forgets_the_last_reference() {
        let global = params(&[0.0]);
        let mut s = FlTrust::new(TrustNorm::Reference);
        s.begin_round(1, &global, 1);
        s.set_reference(&params(&[1.0])).unwrap();
        s.accumulate(contribution(&params(&[3.0]), 1)).unwrap();
        assert_eq!(s.aggregate_train(1, &global, 0).unwrap().data(), &[1.0]);
        s.begin_round(2, &global, 1);
        assert!(s.wants_reference());
    }
}
