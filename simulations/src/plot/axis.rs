//! Axes: ranges on whole ticks, tick positions and labels, and [`Axis`] as a plotters
//! coordinate.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

use super::XAxis;

/// An axis: its range, tick positions and the decimals their labels need.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Axis {
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) ticks: Vec<f64>,
    pub(super) decimals: usize,
}

/// A linear axis whose grid lines and labels are exactly [`Axis::ticks`] (plotters' own f64
/// axis picks fractional ticks for rounds).
impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Bold grid lines and labels at the ticks; no light lines.
        if hint.weight().allow_light_points() { Vec::new() } else { self.ticks.clone() }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// How a y axis is bounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RangeKind {
    /// Percent: within 0..=100, zoomed to the data by whole ticks.
    Percent,
    /// At least zero (a loss), zoomed to the data.
    NonNegative,
    /// From zero (epsilon grows from it).
    FromZero,
}

/// A step of 1, 2 or 5 times a power of ten giving at most about `ticks` intervals over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&s| s >= raw * (1.0 - 1e-9)).unwrap_or(raw)
}

/// Ticks at multiples of `step` within `lo..=hi`.
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn decimals(step: f64) -> usize {
    (-step.log10().floor()).clamp(0.0, 6.0) as usize
}

pub(super) fn format_tick(v: f64, decimals: usize) -> String {
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    // No "-0".
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') { s.trim_start_matches('-').into() } else { s }
}

/// The x axis over `xs`: rounds get whole-number ticks and a little room either side (so the
/// first and last markers are not cut); virtual time starts at zero, the run's start.
pub(super) fn x_axis(xs: &[f64], x: XAxis) -> Axis {
    let (min, max) = min_max(xs).unwrap_or((1.0, 1.0));
    match x {
        XAxis::Round => {
            let step = nice_step((max - min).max(1.0), 10.0).max(1.0).round();
            let pad = ((max - min) * 0.02).max(0.4);
            let (lo, hi) = (min - pad, max + pad);
            Axis { lo, hi, ticks: ticks(lo.max(0.0), hi, step), decimals: 0 }
        }
        XAxis::VirtualTime => {
            let hi = if max > 0.0 { max * 1.03 } else { 1.0 };
            let step = nice_step(hi, 10.0);
            Axis { lo: 0.0, hi, ticks: ticks(0.0, hi, step), decimals: decimals(step) }
        }
    }
}

/// The y axis over `ys`, bounds on whole ticks.
pub(super) fn y_axis(ys: &[f64], kind: RangeKind) -> Axis {
    let (mut min, mut max) = match (min_max(ys), kind) {
        (Some(m), _) => m,
        (None, RangeKind::Percent) => (0.0, 100.0),
        (None, _) => (0.0, 1.0),
    };
    if kind == RangeKind::FromZero {
        min = min.min(0.0);
    }
    if max - min < 1e-9 {
        // One value (or a flat line): a band around it.
        let half = (max.abs() * 0.05).max(if kind == RangeKind::Percent { 1.0 } else { 1e-3 });
        (min, max) = (min - half, max + half);
    }
    let step = nice_step(max - min, 6.0);
    let (mut lo, mut hi) = ((min / step).floor() * step, (max / step).ceil() * step);
    match kind {
        RangeKind::Percent => (lo, hi) = (lo.max(0.0), hi.min(100.0)),
        RangeKind::NonNegative | RangeKind::FromZero => lo = lo.max(0.0),
    }
    // Room above the top point when it sits on the top tick, so its marker is not cut in half.
    let top = hi + step * 0.04;
    Axis { lo, hi: top, ticks: ticks(lo, hi + step * 1e-6, step), decimals: decimals(step) }
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let finite = v.iter().copied().filter(|x| x.is_finite());
    finite.fold(None, |acc, x| match acc {
        None => Some((x, x)),
        Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
    })
}
