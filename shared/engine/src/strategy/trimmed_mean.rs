//! Coordinate-wise trimmed mean: Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust
//! Distributed Learning: Towards Optimal Statistical Rates". For every coordinate the
//! `floor(beta n)` largest and smallest of the round's `n` values are dropped and the rest
//! averaged (beta < 1/2, so at least one value stays). One vote per device. Holds every update
//! of the round ([`super::buffer`]).

use fedge_core::aggregate::AggregateError;

use super::buffer::{BufferedRule, UpdateBuffer};

/// Coordinate-wise beta-trimmed mean of the updates.
#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    fraction: f64,
}

impl TrimmedMean {
    /// Trims `fraction` (in [0, 1/2)) of the values from each side.
    pub fn new(fraction: f64) -> Self {
        Self { fraction: fraction.clamp(0.0, 0.499_999) }
    }
}

impl BufferedRule for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn step(&mut self, buffer: &UpdateBuffer) -> Result<Vec<f32>, AggregateError> {
        let n = buffer.updates().len();
        let k = (self.fraction * n as f64).floor() as usize;
        Ok(buffer.per_coordinate(|v| {
            v.sort_unstable_by(f32::total_cmp);
            let kept = &v[k..n - k];
            (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::buffer::Buffered;
    use super::super::testing::{Case, check};
    use super::*;

    #[test]
    fn check_trims_a_fifth_from_each_side() {
        // n = 5, beta = 0.2: one value dropped from each side of every coordinate.
        let cases: &[Case] = &[
            (
                "outliers dropped",
                &[&[1.0, 10.0], &[2.0, -100.0], &[3.0, 20.0], &[4.0, 30.0], &[1000.0, 40.0]],
                Ok(&[3.0, 20.0]),
            ),
            ("ties", &[&[1.0], &[1.0], &[1.0], &[5.0], &[5.0]], Ok(&[7.0 / 3.0])),
            ("all equal", &[&[-2.0], &[-2.0], &[-2.0], &[-2.0], &[-2.0]], Ok(&[-2.0])),
            // n = 4: floor(0.8) = 0 trimmed, the plain mean.
            ("too few to trim", &[&[1.0], &[2.0], &[3.0], &[10.0]], Ok(&[4.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| Buffered::new(TrimmedMean::new(0.2)), cases);
    }

    #[test]
    fn check_trims_more_with_a_larger_fraction() {
        let cases: &[Case] = &[
            // n = 6, beta = 0.4: two from each side, the middle two averaged.
            ("middle two", &[&[9.0], &[-9.0], &[1.0], &[2.0], &[8.0], &[-8.0]], Ok(&[1.5])),
        ];
        check(|| Buffered::new(TrimmedMean::new(0.4)), cases);
        // beta = 0: the plain (unweighted) mean.
        check(|| Buffered::new(TrimmedMean::new(0.0)), &[("mean", &[&[1.0], &[2.0], &[6.0]], Ok(&[3.0]))]);
    }
}
