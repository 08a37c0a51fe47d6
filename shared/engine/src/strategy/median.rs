//! Coordinate-wise median: Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust
//! Distributed Learning: Towards Optimal Statistical Rates". Every coordinate of the next
//! step is the median of that coordinate over the round's updates (the mean of the two middle
//! values for an even count). Each device has one vote, whatever its sample count (a claim
//! the server cannot check). Holds every update of the round ([`super::buffer`]).

use fedge_core::aggregate::AggregateError;

use super::buffer::{BufferedRule, UpdateBuffer, median_of};

/// Coordinate-wise median of the updates.
#[derive(Debug, Default, Clone, Copy)]
pub struct Median;

impl BufferedRule for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn step(&mut self, buffer: &UpdateBuffer) -> Result<Vec<f32>, AggregateError> {
        Ok(buffer.per_coordinate(median_of))
    }
}

#[cfg(test)]
mod tests {
    use super::super::buffer::Buffered;
    use super::super::testing::{Case, check};
    use super::*;

    #[test]
    fn check_median() {
        let cases: &[Case] = &[
            ("odd count", &[&[1.0, -5.0], &[3.0, 0.0], &[100.0, 2.0]], Ok(&[3.0, 0.0])),
            (
                "even count: mean of the middle two",
                &[&[1.0, 0.0], &[2.0, 4.0], &[10.0, 6.0], &[-7.0, 9.0]],
                Ok(&[1.5, 5.0]),
            ),
            ("ties", &[&[2.0], &[2.0], &[5.0]], Ok(&[2.0])),
            ("all equal", &[&[0.5, -0.5], &[0.5, -0.5], &[0.5, -0.5]], Ok(&[0.5, -0.5])),
            ("one update", &[&[4.0, 4.0]], Ok(&[4.0, 4.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| Buffered::new(Median), cases);
    }
}
