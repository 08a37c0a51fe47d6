//! What a plot draws: the metric on the y axis ([`Metric`]) and the x axis ([`XAxis`]), with
//! their labels, titles and ranges.

use super::axis::RangeKind;
use super::draw::Corner;
use super::read::RoundPoint;

/// What `fedge-sim plot` draws on the y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// Test accuracy, in percent.
    Accuracy,
    /// Test loss (cross-entropy).
    Loss,
    /// Central DP: epsilon spent so far.
    Epsilon,
}

impl Metric {
    pub(super) fn column(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Loss => "loss",
            Metric::Epsilon => "epsilon",
        }
    }

    /// The value of a round to draw (accuracy in percent), if it has one.
    pub(super) fn value(self, p: &RoundPoint) -> Option<f64> {
        let v = match self {
            Metric::Accuracy => p.accuracy.map(|a| a * 100.0),
            Metric::Loss => p.loss,
            Metric::Epsilon => p.epsilon,
        };
        v.filter(|v| v.is_finite())
    }

    pub(super) fn axis(self, delta: Option<f64>) -> String {
        match self {
            Metric::Accuracy => "test accuracy (%)".into(),
            Metric::Loss => "test loss (cross-entropy)".into(),
            Metric::Epsilon => match delta {
                Some(d) => format!("privacy loss ε (δ = {d:e})"),
                None => "privacy loss ε".into(),
            },
        }
    }

    pub(super) fn title(self) -> &'static str {
        match self {
            Metric::Accuracy => "Test accuracy",
            Metric::Loss => "Test loss",
            Metric::Epsilon => "Privacy loss ε",
        }
    }

    pub(super) fn range(self) -> RangeKind {
        match self {
            Metric::Accuracy => RangeKind::Percent,
            Metric::Loss => RangeKind::NonNegative,
            Metric::Epsilon => RangeKind::FromZero,
        }
    }

    /// The legend's corners, most likely empty first: accuracy rises (lower right is empty),
    /// loss falls (upper right), epsilon grows from zero (upper left).
    pub(super) fn corners(self) -> [Corner; 4] {
        use Corner::*;
        match self {
            Metric::Accuracy => [LowerRight, UpperLeft, LowerLeft, UpperRight],
            Metric::Loss => [UpperRight, LowerLeft, UpperLeft, LowerRight],
            Metric::Epsilon => [UpperLeft, LowerRight, UpperRight, LowerLeft],
        }
    }
}

/// What `fedge-sim plot` draws on the x axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    /// The round number.
    Round,
    /// Virtual seconds since the run began, when the round closed (and was evaluated).
    VirtualTime,
}

impl XAxis {
    pub(super) fn value(self, p: &RoundPoint) -> Option<f64> {
        match self {
            XAxis::Round => Some(p.round as f64),
            XAxis::VirtualTime => Some(p.virtual_start_s? + p.virtual_duration_s?).filter(|t| t.is_finite()),
        }
    }

    pub(super) fn axis(self) -> &'static str {
        match self {
            XAxis::Round => "round",
            XAxis::VirtualTime => "virtual time when the round closed (s)",
        }
    }
}
