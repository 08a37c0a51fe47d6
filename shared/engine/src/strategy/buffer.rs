//! The round's updates held in memory, for the rules that cannot stream (median, trimmed
//! mean, Krum, centered clipping, and norm bounding at the median norm or with buckets): `n`
//! updates of `d` values take `4 n d` bytes (bucketing replaces them in place by
//! `ceil(n / s)` means once the round is in). The engine
//! refuses to start a round whose sampled devices could take more than the configured bound
//! (`max_buffer_mb`), so the memory is known before the first update arrives.

use std::sync::Arc;

use fedge_core::aggregate::AggregateError;
use fedge_core::{ModelParams, ParamLayout};

use super::bucketing::Bucketing;
use super::{Contribution, ServerState, Strategy};

/// The accepted updates of the open round, each already scaled by the engine's clip.
#[derive(Debug, Default)]
pub struct UpdateBuffer {
    layout: Option<Arc<ParamLayout>>,
    updates: Vec<Vec<f32>>,
    samples: Vec<u64>,
}

impl UpdateBuffer {
    /// Empties the buffer for a round trained from `global`.
    pub fn begin(&mut self, global: &ModelParams) {
        self.layout = Some(global.layout().clone());
        self.updates.clear();
        self.samples.clear();
    }

    /// What [`Self::push`] would refuse: no round begun, another layout, a non-finite value,
    /// a bad clip factor.
    pub fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        let layout = self.layout.as_ref().ok_or(AggregateError::Empty)?;
        if **c.delta.layout() != **layout {
            return Err(AggregateError::LayoutMismatch);
        }
        if !(c.clip_scale.is_finite() && c.clip_scale >= 0.0) {
            return Err(AggregateError::InvalidWeight(c.clip_scale));
        }
        c.delta.check_finite()?;
        Ok(())
    }

    /// Holds `clip_scale * delta`.
    pub fn push(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.check(c)?;
        let update = if c.clip_scale == 1.0 {
            c.delta.data().to_vec()
        } else {
            let s = c.clip_scale as f32;
            c.delta.data().iter().map(|v| v * s).collect()
        };
        self.updates.push(update);
        self.samples.push(c.num_samples);
        Ok(())
    }

    /// The held updates, in arrival order.
    pub fn updates(&self) -> &[Vec<f32>] {
        &self.updates
    }

    /// Their sample counts.
    pub fn samples(&self) -> &[u64] {
        &self.samples
    }

    /// The held updates and their sample counts, for [`super::bucketing`] to replace by bucket
    /// means (kept the same length as each other).
    pub(super) fn held_mut(&mut self) -> (&mut Vec<Vec<f32>>, &mut Vec<u64>) {
        (&mut self.updates, &mut self.samples)
    }

    /// Fails with [`AggregateError::TooFew`] unless at least `needed` updates are held.
    pub fn need(&self, rule: &'static str, needed: usize) -> Result<usize, AggregateError> {
        let got = self.updates.len();
        if got == 0 {
            return Err(AggregateError::Empty);
        }
        if got < needed {
            return Err(AggregateError::TooFew { rule, needed, got });
        }
        Ok(got)
    }

    /// `global + step`, as the next model, emptying the buffer.
    pub fn finish(&mut self, global: &ModelParams, step: &[f32]) -> Result<ModelParams, AggregateError> {
        self.updates.clear();
        self.samples.clear();
        let mut next = global.clone();
        next.data_mut().iter_mut().zip(step).for_each(|(w, s)| *w += s);
        Ok(next)
    }

    /// Applies `f` to every coordinate's values across the held updates (in arrival order,
    /// in a scratch slice `f` may reorder), writing one value per coordinate.
    pub fn per_coordinate(&self, mut f: impl FnMut(&mut [f32]) -> f32) -> Vec<f32> {
        let n = self.updates.len();
        let d = self.updates.first().map_or(0, Vec::len);
        let mut column = vec![0.0f32; n];
        (0..d)
            .map(|j| {
                for (c, u) in column.iter_mut().zip(&self.updates) {
                    *c = u[j];
                }
                f(&mut column)
            })
            .collect()
    }
}

/// Squared Euclidean distance, accumulated in f64.
pub(crate) fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

/// Squared Euclidean norm, accumulated in f64.
pub(crate) fn sq_norm(a: &[f32]) -> f64 {
    a.iter().map(|x| f64::from(*x).powi(2)).sum()
}

/// The median of `v` (the mean of the two middle values when `v.len()` is even), reordering
/// `v`. `v` must not be empty and hold no NaN (updates are checked finite).
pub(crate) fn median_of(v: &mut [f32]) -> f32 {
    let n = v.len();
    let (lower, mid, _) = v.select_nth_unstable_by(n / 2, f32::total_cmp);
    let mid = *mid;
    if n % 2 == 1 {
        mid
    } else {
        let below = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ((f64::from(below) + f64::from(mid)) / 2.0) as f32
    }
}

/// The median of f64 values (as [`median_of`]).
pub(crate) fn median_f64(v: &mut [f64]) -> f64 {
    let n = v.len();
    let (lower, mid, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    let mid = *mid;
    if n % 2 == 1 { mid } else { (lower.iter().copied().fold(f64::NEG_INFINITY, f64::max) + mid) / 2.0 }
}

/// A rule that needs every update of the round at once (median, trimmed mean, Krum, centered
/// clipping): [`Buffered`] holds the updates and asks the rule for the round's step.
pub trait BufferedRule: Send + std::fmt::Debug {
    /// The strategy's name.
    fn name(&self) -> &'static str;

    /// The round's step from the held updates (at least one, all finite, one model long).
    fn step(&mut self, buffer: &UpdateBuffer) -> Result<Vec<f32>, AggregateError>;

    /// The step was proposed as the round's: state the rule carries may move on (the engine
    /// restores it if it then refuses the step).
    fn taken(&mut self, _step: &[f32]) {}

    /// State carried between rounds, if any.
    fn server_state(&self) -> Option<ServerState> {
        None
    }

    /// Restores [`Self::server_state`]'s state.
    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        Err(AggregateError::State(format!("{} keeps no state; this state is {}'s", self.name(), state.strategy)))
    }
}

/// A [`BufferedRule`] as a [`Strategy`]: the round's updates held in an [`UpdateBuffer`],
/// optionally bucketed ([`super::bucketing`]) before the rule sees them.
#[derive(Debug)]
pub struct Buffered<R> {
    rule: R,
    buffer: UpdateBuffer,
    bucketing: Bucketing,
}

impl<R: BufferedRule> Buffered<R> {
    /// `rule` over the round's held updates.
    pub fn new(rule: R) -> Self {
        Self::bucketed(rule, Bucketing::OFF)
    }

    /// `rule` over the bucket means of the round's held updates.
    pub fn bucketed(rule: R, bucketing: Bucketing) -> Self {
        Self { rule, buffer: UpdateBuffer::default(), bucketing }
    }
}

impl<R: BufferedRule> Strategy for Buffered<R> {
    fn name(&self) -> &'static str {
        self.rule.name()
    }

    fn begin_round(&mut self, _round: u64, global: &ModelParams, _expected: usize) {
        self.buffer.begin(global);
    }

    fn holds_updates(&self) -> bool {
        true
    }

    fn server_state(&self) -> Option<ServerState> {
        self.rule.server_state()
    }

    fn restore_server_state(&mut self, state: ServerState) -> Result<(), AggregateError> {
        self.rule.restore_server_state(state)
    }

    fn check(&self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.buffer.check(c)
    }

    fn accumulate(&mut self, c: Contribution<'_>) -> Result<(), AggregateError> {
        self.buffer.push(c)
    }

    fn aggregate_train(&mut self, round: u64, global: &ModelParams, _: usize) -> Result<ModelParams, AggregateError> {
        self.bucketing.apply(round, &mut self.buffer);
        self.buffer.need(self.rule.name(), 1)?;
        let step = self.rule.step(&self.buffer)?;
        let next = self.buffer.finish(global, &step)?;
        // Should the engine fail the round (a non-finite model, a step past max_step_norm), it
        // restores the rule's state from the copy it saved before aggregating.
        self.rule.taken(&step);
        Ok(next)
    }
}
