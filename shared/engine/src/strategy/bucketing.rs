//! Bucketing: Karimireddy, He and Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous
//! Datasets via Bucketing". On non-IID data honest updates differ, so a robust rule mistakes
//! some of them for outliers. Each round the `n` held updates are randomly permuted and
//! averaged in buckets of `s` (the last one smaller when `s` does not divide `n`:
//! `ceil(n / s)` buckets), and the robust rule sees the bucket means instead: means of `s`
//! honest updates are `s` times less spread, while each Byzantine update still spoils at most
//! one bucket. The paper recommends `s = 2`.
//!
//! Weights: a bucket's mean weighs its members by sample count (equally when they all claim
//! none) and carries the bucket's total samples, so a rule that weighs by samples (norm
//! bounding) sees the same totals, and with `s = 1` every rule is exactly what it is without
//! bucketing (nothing is permuted or averaged). The rules that give one vote per update give
//! one per bucket.
//!
//! Randomness: the permutation is drawn from the engine's seed and the round
//! (`derive_rng(seed, [BUCKETING, round])`), nothing else, so a seeded run buckets the same way
//! every time, a restarted coordinator buckets the round as it would have, and no other
//! random consumer's numbers shift.
//!
//! Memory: nothing is held beyond the rule's [`UpdateBuffer`]. The buffer is bucketed in place
//! once the round is in: each bucket's mean is written over its first member (an `8 d`-byte
//! f64 scratch while summing) and the other members are freed, so the rule then works on
//! `ceil(n / s)` updates (Krum's `n^2` distances shrink `s^2`-fold). The peak, `n` updates,
//! is unchanged: assigning arrivals to buckets as they come would hold only the bucket sums,
//! but the round's final count is unknown until it closes, so the buckets would not be the
//! paper's even ones.

use fedge_core::rng::derive_rng;
use rand::seq::SliceRandom;

use super::buffer::UpdateBuffer;

/// The permutation's stream under the engine's seed. Not in `fedge_core::rng::stream`'s
/// numbering (1, 2, ...), so it cannot meet a stream added there.
const BUCKETING: u64 = 0x6275_636b_6574; // "bucket"

/// How the held updates are bucketed each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucketing {
    size: usize,
    seed: u64,
}

impl Bucketing {
    /// No bucketing: the rule sees every update, in arrival order.
    pub const OFF: Self = Self { size: 1, seed: 0 };

    /// Buckets of `size` updates (0 is taken as 1), permuted from `seed` and the round.
    pub fn new(size: usize, seed: u64) -> Self {
        Self { size: size.max(1), seed }
    }

    /// Updates per bucket.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether it averages anything (`size > 1`).
    pub fn is_on(&self) -> bool {
        self.size > 1
    }

    /// The order in which round `round`'s `n` held updates (by arrival index) fill the buckets.
    pub fn permutation(&self, round: u64, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut derive_rng(self.seed, &[BUCKETING, round]));
        order
    }

    /// Replaces the buffer's updates by round `round`'s bucket means (nothing when off).
    pub fn apply(&self, round: u64, buffer: &mut UpdateBuffer) {
        if self.is_on() {
            let order = self.permutation(round, buffer.updates().len());
            bucket_in_place(buffer, &order, self.size);
        }
    }
}

/// Replaces the held updates, taken in `order` (arrival indices; any index out of range or
/// repeated is skipped), by the sample-weighted means of consecutive runs of `size`, each
/// carrying its run's total samples.
pub(crate) fn bucket_in_place(buffer: &mut UpdateBuffer, order: &[usize], size: usize) {
    let (updates, samples) = buffer.held_mut();
    let mut slots: Vec<Option<(Vec<f32>, u64)>> = updates.drain(..).zip(samples.drain(..)).map(Some).collect();
    let mut permuted = order.iter().filter_map(|&i| slots.get_mut(i).and_then(Option::take)).peekable();
    let mut sum: Vec<f64> = Vec::new();
    while permuted.peek().is_some() {
        let bucket: Vec<(Vec<f32>, u64)> = permuted.by_ref().take(size.max(1)).collect();
        let total = bucket.iter().fold(0u64, |t, (_, s)| t.saturating_add(*s));
        let mut members = bucket.into_iter();
        let Some((mut first, first_samples)) = members.next() else { break };
        let rest: Vec<(Vec<f32>, u64)> = members.collect();
        if !rest.is_empty() {
            // Weights w_i / W in f64 (W summed in f64, so a saturated total cannot tip the
            // weights past 1); equal when the bucket claims no samples at all.
            let weight = |s: u64| if total == 0 { 1.0 } else { s as f64 };
            let whole = weight(first_samples) + rest.iter().map(|(_, s)| weight(*s)).sum::<f64>();
            sum.clear();
            sum.extend(first.iter().map(|&v| weight(first_samples) * f64::from(v)));
            for (u, s) in &rest {
                let w = weight(*s);
                sum.iter_mut().zip(u).for_each(|(acc, &v)| *acc += w * f64::from(v));
            }
            first.iter_mut().zip(&sum).for_each(|(v, acc)| *v = (acc / whole) as f32);
        }
        updates.push(first);
        samples.push(total);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Strategy;
    use super::super::buffer::Buffered;
    use super::super::centered_clip::CenteredClip;
    use super::super::krum::Krum;
    use super::super::median::Median;
    use super::super::norm_bound::NormBound;
    use super::super::testing::{Case, check, contribution, params};
    use super::super::trimmed_mean::TrimmedMean;
    use super::*;
    use fedge_core::aggregate::AggregateError;

    /// The seed the tables below use, and the permutation it gives round 1's four updates.
    const SEED: u64 = 7;

    #[test]
    fn the_permutation_is_seeded_by_seed_and_round() {
        let b = Bucketing::new(2, SEED);
        assert_eq!(b.permutation(1, 4), PERM_4);
        assert_eq!(b.permutation(1, 6), PERM_6);
        assert_eq!(b.permutation(1, 4), Bucketing::new(3, SEED).permutation(1, 4), "size does not enter");
        let rounds: Vec<Vec<usize>> = (1..=8).map(|r| b.permutation(r, 6)).collect();
        assert!(rounds.iter().any(|p| *p != rounds[0]), "rounds differ");
        let seeds: Vec<Vec<usize>> = (1..=8).map(|s| Bucketing::new(2, s).permutation(1, 6)).collect();
        assert!(seeds.iter().any(|p| *p != seeds[0]), "seeds differ");
        for p in rounds.iter().chain(&seeds) {
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..6).collect::<Vec<_>>());
        }
        assert!(b.permutation(1, 0).is_empty());
    }

    /// Round 1's permutation of four updates under [`SEED`] (pinned: a change here changes
    /// every seeded run that buckets).
    const PERM_4: [usize; 4] = [0, 2, 1, 3];
    /// Round 1's permutation of six updates under [`SEED`].
    const PERM_6: [usize; 6] = [0, 2, 5, 3, 4, 1];

    #[test]
    fn check_size_one_is_the_plain_rule() {
        // The median's and Krum's own tables, bucketed by 1: the same answers, in arrival order
        // (Krum's ties go to the earliest).
        let median: &[Case] = &[
            ("odd count", &[&[1.0, -5.0], &[3.0, 0.0], &[100.0, 2.0]], Ok(&[3.0, 0.0])),
            ("even count", &[&[1.0, 0.0], &[2.0, 4.0], &[10.0, 6.0], &[-7.0, 9.0]], Ok(&[1.5, 5.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| Buffered::bucketed(Median, Bucketing::new(1, SEED)), median);
        let krum: &[Case] = &[
            ("centre of the cluster", &[&[0.0], &[1.0], &[-1.0], &[5.0], &[100.0]], Ok(&[0.0])),
            ("ties: the earliest", &[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 0.0], &[0.0, 1.0], &[0.5, 0.5]], Ok(&[1.0, 0.0])),
        ];
        check(|| Buffered::bucketed(Krum::single(Some(1)), Bucketing::new(1, SEED)), krum);
    }

    #[test]
    fn check_buckets_of_two() {
        // Four arrivals a0..a3 in order PERM_4 = [0, 2, 1, 3]: buckets {a0, a2} and {a1, a3}.
        // (0, 4) -> 2 and (2, 8) -> 5. A bound (or radius) of 3 keeps 2 and scales 5 to 3:
        // (2 + 3) / 2 = 2.5 (without buckets: (0 + 2 + 3 + 3) / 4 = 2; buckets in arrival
        // order, 1 and 6 -> 3: 2).
        let four: &[Case] = &[
            ("two bucket means", &[&[0.0], &[2.0], &[4.0], &[8.0]], Ok(&[2.5])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        check(|| NormBound::new(Some(3.0)).with_bucketing(Bucketing::new(2, SEED)), four);
        check(|| Buffered::bucketed(CenteredClip::new(Some(3.0), 1), Bucketing::new(2, SEED)), four);
        // Median and trimmed mean of two bucket means: their mean, (2 + 5) / 2.
        check(|| Buffered::bucketed(Median, Bucketing::new(2, SEED)), &[("median of two", four[0].1, Ok(&[3.5]))]);
        check(
            || Buffered::bucketed(TrimmedMean::new(0.2), Bucketing::new(2, SEED)),
            &[("trimmed mean of two", four[0].1, Ok(&[3.5]))],
        );
        // Six arrivals in order PERM_6 = [0, 2, 5, 3, 4, 1]: buckets {a0, a2}, {a5, a3}, {a4, a1}.
        // (0, 2) -> 1, (-4, 6) -> 1, (20, 10) -> 15: the median is 1 (without buckets the
        // median of the six is (2 + 6) / 2 = 4).
        let six: &[Case] = &[(
            "three bucket means",
            &[&[0.0, 1.0], &[10.0, 1.0], &[2.0, 1.0], &[6.0, 1.0], &[20.0, 1.0], &[-4.0, 1.0]],
            Ok(&[1.0, 1.0]),
        )];
        check(|| Buffered::bucketed(Median, Bucketing::new(2, SEED)), six);
        check(|| Buffered::new(Median), &[("unbucketed", six[0].1, Ok(&[4.0, 1.0]))]);
    }

    #[test]
    fn check_a_bucket_as_large_as_the_round_is_the_weighted_mean() {
        let cases: &[Case] = &[
            ("one bucket", &[&[0.0, 1.0], &[2.0, 3.0], &[4.0, -1.0], &[10.0, 1.0]], Ok(&[4.0, 1.0])),
            ("one update", &[&[4.0, 4.0]], Ok(&[4.0, 4.0])),
            ("no update", &[], Err(AggregateError::Empty)),
        ];
        for size in [4, 5, MAX] {
            check(|| Buffered::bucketed(Median, Bucketing::new(size, SEED)), cases);
            check(|| Buffered::bucketed(TrimmedMean::new(0.4), Bucketing::new(size, SEED)), cases);
        }
    }

    const MAX: usize = super::super::choice::MAX_BUCKET_SIZE;

    /// `updates` with their sample counts through `s`, from a zero model, in round 1.
    fn run(mut s: impl Strategy, updates: &[(&[f32], u64)]) -> Vec<f32> {
        let global = params(&vec![0.0; updates[0].0.len()]);
        s.begin_round(1, &global, updates.len());
        for (u, n) in updates {
            s.accumulate(contribution(&params(u), *n)).unwrap();
        }
        s.aggregate_train(1, &global, 0).unwrap().data().to_vec()
    }

    #[test]
    fn bucket_means_weigh_by_samples_and_carry_the_total() {
        let updates: &[(&[f32], u64)] = &[(&[0.0], 1), (&[2.0], 3), (&[4.0], 1), (&[8.0], 0)];
        // One bucket: (0 * 1 + 2 * 3 + 4 * 1 + 8 * 0) / 5 = 2.
        assert_eq!(run(Buffered::bucketed(Median, Bucketing::new(4, SEED)), updates), [2.0]);
        // Buckets {a0, a2} and {a1, a3} (PERM_4): means (0 * 1 + 4 * 1) / 2 = 2 (total 2) and
        // (2 * 3 + 8 * 0) / 3 = 2 (total 3). Norm bounding at 10 leaves them and weighs them by
        // their totals: 2.
        assert_eq!(run(NormBound::new(Some(10.0)).with_bucketing(Bucketing::new(2, SEED)), updates), [2.0]);
        // With other counts: {a0: 0 x 2, a2: 4 x 2} = 8 / 4 = 2 (total 4), {a1: 2 x 3, a3:
        // 6 x 1} = 12 / 4 = 3 (total 4). A bound of 2.5 scales the second: (4 * 2 + 4 * 2.5) / 8.
        let other: &[(&[f32], u64)] = &[(&[0.0], 2), (&[2.0], 3), (&[4.0], 2), (&[6.0], 1)];
        let got = run(NormBound::new(Some(2.5)).with_bucketing(Bucketing::new(2, SEED)), other);
        assert!((got[0] - 2.25).abs() < 1e-6, "{got:?}");
        // The median norm (2.5 of 3 and 2) bounds it the same way.
        let got = run(NormBound::new(None).with_bucketing(Bucketing::new(2, SEED)), other);
        assert!((got[0] - 2.25).abs() < 1e-6, "{got:?}");
        // No samples claimed in a bucket: its members count equally, it carries 0.
        let none: &[(&[f32], u64)] = &[(&[1.0], 0), (&[3.0], 0)];
        assert_eq!(run(Buffered::bucketed(Median, Bucketing::new(2, SEED)), none), [2.0]);
        let mut b = UpdateBuffer::default();
        b.begin(&params(&[0.0]));
        for (u, n) in [(&[1.0f32][..], 0u64), (&[3.0], 0), (&[5.0], u64::MAX), (&[7.0], 1)] {
            b.push(contribution(&params(u), n)).unwrap();
        }
        bucket_in_place(&mut b, &[0, 1, 2, 3], 2);
        assert_eq!(b.samples(), [0, u64::MAX]);
        assert_eq!(b.updates(), [vec![2.0], vec![5.0]]);
        // Two claims of u64::MAX: the total saturates, the mean stays the mean.
        b.begin(&params(&[0.0]));
        for u in [&[1.0f32][..], &[3.0]] {
            b.push(contribution(&params(u), u64::MAX)).unwrap();
        }
        bucket_in_place(&mut b, &[1, 0], 2);
        assert_eq!((b.samples(), b.updates()), (&[u64::MAX][..], &[vec![2.0]][..]));
    }

    #[test]
    fn the_last_bucket_may_be_smaller_and_krum_counts_buckets() {
        let mut b = UpdateBuffer::default();
        b.begin(&params(&[0.0]));
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            b.push(contribution(&params(&[v]), 2)).unwrap();
        }
        bucket_in_place(&mut b, &[4, 0, 2, 1, 3], 2);
        assert_eq!(b.updates(), [vec![3.0], vec![2.5], vec![4.0]]);
        assert_eq!(b.samples(), [4, 4, 2]);
        // Krum with f = 1 needs 2f + 3 = 5 inputs: nine updates in buckets of two are five,
        // eight are four.
        let nine: &[&[f32]] = &[&[2.0f32][..]; 9];
        let krum = || Buffered::bucketed(Krum::single(Some(1)), Bucketing::new(2, SEED));
        check(krum, &[("nine updates, five buckets", nine, Ok(&[2.0]))]);
        let too_few = Err(AggregateError::TooFew { rule: "krum", needed: 5, got: 4 });
        check(krum, &[("eight updates, four buckets", &nine[..8], too_few)]);
    }

    #[test]
    fn median_of_buckets_is_closer_to_the_honest_mean_on_heterogeneous_updates() {
        // Two honest clusters (three devices near 0 with 20 samples each, three near 10 with
        // 10 each) and one attacker sending the second cluster's update sign-flipped.
        let honest: &[(f32, u64)] = &[(0.0, 20), (0.5, 20), (-0.5, 20), (10.0, 10), (10.5, 10), (9.5, 10)];
        let total: u64 = honest.iter().map(|h| h.1).sum();
        let mean = honest.iter().map(|&(v, n)| f64::from(v) * n as f64).sum::<f64>() / total as f64;
        let mut all: Vec<(f32, u64)> = honest.to_vec();
        all.push((-10.0, 10));
        let error = |bucketing: Bucketing| -> f64 {
            // Averaged over 20 rounds' permutations (each round seeded, so the average is fixed).
            (1..=20u64)
                .map(|round| {
                    let mut s = Buffered::bucketed(Median, bucketing);
                    let global = params(&[0.0]);
                    s.begin_round(round, &global, all.len());
                    for &(v, n) in &all {
                        s.accumulate(contribution(&params(&[v]), n)).unwrap();
                    }
                    (f64::from(s.aggregate_train(round, &global, 0).unwrap().data()[0]) - mean).abs()
                })
                .sum::<f64>()
                / 20.0
        };
        // Honest mean 3.33; the plain median is 0.5 every round (error 2.83), the median of
        // four bucket means errs by 1.14 on average.
        let (plain, bucketed) = (error(Bucketing::OFF), error(Bucketing::new(2, SEED)));
        assert!(bucketed < plain, "bucketed {bucketed} plain {plain} (honest mean {mean})");
    }
}
