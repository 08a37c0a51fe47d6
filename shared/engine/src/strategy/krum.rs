//! Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning
//! with Adversaries: Byzantine Tolerant Gradient Descent".
//!
//! With `n` updates of which up to `f` may be Byzantine (the rule needs `n >= 2f + 3`), each
//! update's score is the sum of its squared distances to its `n - f - 2` nearest neighbours.
//! Krum takes the update with the lowest score (ties: the earliest to arrive); Multi-Krum
//! averages the `m` lowest-scoring ones (default `m = n - f`), one vote each. `f` defaults to
//! the most the round tolerates, `floor((n - 3) / 2)`. Holds every update of the round
//! ([`super::buffer`]) and computes the `n (n - 1) / 2` pairwise distances: `O(n^2 d)` time.
//!
//! With bucketing ([`super::bucketing`], buckets of `s`) the rule runs, as in Karimireddy et
//! al. 2022, on the `n' = ceil(n / s)` bucket means: `n` is `n'`, `f` counts Byzantine buckets
//! (default `floor((n' - 3) / 2)`; the round needs `n' >= 2f + 3`) and `m` counts buckets. A
//! configured `f` of Byzantine devices stays a safe bound, since one device spoils at most one
//! bucket.

use fedge_core::aggregate::AggregateError;

use super::buffer::{BufferedRule, UpdateBuffer, sq_dist};

/// Krum (`select: None`) or Multi-Krum.
#[derive(Debug, Clone, Copy)]
pub struct Krum {
    byzantine: Option<usize>,
    select: Option<Option<usize>>,
}

impl Krum {
    /// Krum tolerating `byzantine` devices (`None`: as many as the round allows).
    pub fn single(byzantine: Option<usize>) -> Self {
        Self { byzantine, select: None }
    }

    /// Multi-Krum averaging `select` updates (`None`: n - f).
    pub fn multi(byzantine: Option<usize>, select: Option<usize>) -> Self {
        Self { byzantine, select: Some(select) }
    }
}

/// Each update's score for `f` Byzantine devices: the sum of its squared distances to its
/// `n - f - 2` nearest neighbours.
fn scores(u: &[Vec<f32>], f: usize) -> Vec<f64> {
    let n = u.len();
    let mut dist = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d = sq_dist(&u[i], &u[j]);
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let neighbours = n - f - 2;
    (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i * n + j]).collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect()
}

impl BufferedRule for Krum {
    fn name(&self) -> &'static str {
        if self.select.is_some() { "multi-krum" } else { "krum" }
    }

    fn step(&mut self, buffer: &UpdateBuffer) -> Result<Vec<f32>, AggregateError> {
        let rule = self.name();
        let got = buffer.updates().len();
        let f = self.byzantine.unwrap_or(got.saturating_sub(3) / 2);
        let n = buffer.need(rule, 2 * f + 3)?;
        let updates = buffer.updates();
        let scores = scores(updates, f);
        let mut order: Vec<usize> = (0..n).collect();
        // Stable: equal scores keep arrival order.
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let m = match self.select {
            None => 1,
            Some(select) => select.unwrap_or(n - f).min(n),
        };
        let mut step = vec![0.0f64; updates[0].len()];
        for &i in &order[..m] {
            step.iter_mut().zip(&updates[i]).for_each(|(s, &v)| *s += f64::from(v));
        }
        Ok(step.iter().map(|s| (s / m as f64) as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::buffer::Buffered;
    use super::super::testing::{Case, check};
    use super::*;

    #[test]
    fn check_krum() {
        let cases: &[Case] = &[
            // f = 1, n = 5: 2 neighbours each. Scores: 0 -> 1+1=2 ({1,2}), 1 -> 1+4=5, 2 -> 1+4=5,
            // 3 -> 16+25=41... the cluster's centre (index 0) wins.
            ("centre of the cluster", &[&[0.0], &[1.0], &[-1.0], &[5.0], &[100.0]], Ok(&[0.0])),
            ("ties: the earliest", &[&[1.0], &[1.0], &[1.0], &[1.0], &[1.0]], Ok(&[1.0])),
            (
                "fewer than 2f + 3",
                &[&[1.0], &[2.0], &[3.0], &[4.0]],
                Err(AggregateError::TooFew { rule: "krum", needed: 5, got: 4 }),
            ),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| Buffered::new(Krum::single(Some(1))), cases);
        // Default f = floor((n - 3) / 2) = 1 for n = 5 or 6.
        check(
            || Buffered::new(Krum::single(None)),
            &[("default f", &[&[0.0], &[1.0], &[-1.0], &[5.0], &[100.0]], Ok(&[0.0]))],
        );
        check(
            || Buffered::new(Krum::single(None)),
            &[("two results", &[&[0.0], &[1.0]], Err(AggregateError::TooFew { rule: "krum", needed: 3, got: 2 }))],
        );
    }

    #[test]
    fn check_multi_krum() {
        let five: &[&[f32]] = &[&[0.0, 0.0], &[1.0, 0.0], &[-1.0, 0.0], &[0.0, 3.0], &[50.0, 50.0]];
        // f = 1: m = n - f = 4 lowest scores averaged. Scores (2 neighbours): 0: 1+1=2, 1: 1+4=5,
        // 2: 1+4=5, 3: 9+10=19, 4: far. Mean of the first four: (0, 0.75).
        check(|| Buffered::new(Krum::multi(Some(1), None)), &[("n - f", five, Ok(&[0.0, 0.75]))]);
        // m = 3: the three lowest, (0, 0).
        check(|| Buffered::new(Krum::multi(Some(1), Some(3))), &[("m = 3", five, Ok(&[0.0, 0.0]))]);
        check(
            || Buffered::new(Krum::multi(Some(2), None)),
            &[("fewer than 2f + 3", five, Err(AggregateError::TooFew { rule: "multi-krum", needed: 7, got: 5 }))],
        );
    }
}
