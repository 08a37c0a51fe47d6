//! Plots of runs for people: test accuracy, test loss and (with central DP) epsilon per round,
//! as SVG or PNG, drawn with `plotters`.
//!
//! [`write_run_plots`] draws one run's panels into `accuracy.svg` and `accuracy.png` beside its
//! `rounds.csv` (called at the end of [`crate::run`]); [`PlotArgs`] is `fedge-sim plot`, which
//! overlays one metric of several runs read back from their folders. Rounds without a value (an
//! `eval_every` gap, a run without DP) are skipped, never drawn as zeros; the line joins the
//! rounds that have one. Text in PNGs is drawn with DejaVu Sans embedded in the binary
//! (`simulations/assets/`), so nothing depends on the fonts of the machine.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::run::{RoundRow, Summary};

mod axis;
mod command;
mod draw;
mod metric;
mod read;
#[cfg(test)]
mod tests;

use draw::{Figure, Panel, Series, save};

pub use command::PlotArgs;
pub use metric::{Metric, XAxis};
pub use read::{RoundPoint, RunData, RunInfo, read_rounds, read_run};

/// The files a run writes, in its output folder.
pub const RUN_PLOTS: [&str; 2] = ["accuracy.svg", "accuracy.png"];

/// Why a plot could not be made.
#[derive(Debug, Error)]
pub enum PlotError {
    /// The output name ends in neither `.svg` nor `.png`.
    #[error("cannot plot to {}: the file name must end in .svg or .png", .0.display())]
    Extension(PathBuf),
    /// A file could not be read.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A file is not what a run writes.
    #[error("{}: {cause}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, in one line.
        cause: String,
    },
    /// A `rounds.csv` has no rounds.
    #[error("{}: no rounds (empty file or a header only)", .0.display())]
    Empty(PathBuf),
    /// A run has no value of the metric (or of the x axis) to draw.
    #[error("{}: {what}", path.display())]
    Missing {
        /// The `rounds.csv`.
        path: PathBuf,
        /// What it lacks.
        what: String,
    },
    /// `--y-min` / `--y-max` are not finite or not in order.
    #[error("--y-min and --y-max must be finite numbers with y-min below y-max, got {0:?} and {1:?}")]
    YRange(Option<f64>, Option<f64>),
    /// `--labels` does not name every run once.
    #[error("--labels has {labels} labels for {runs} runs")]
    Labels {
        /// Labels given.
        labels: usize,
        /// Runs given.
        runs: usize,
    },
    /// The embedded font did not load.
    #[error("the embedded font (DejaVu Sans) did not load")]
    Font,
    /// Drawing failed.
    #[error("drawing {}: {cause}", path.display())]
    Draw {
        /// The image.
        path: PathBuf,
        /// The cause.
        cause: String,
    },
    /// Writing the image failed.
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        /// The image.
        path: PathBuf,
        /// The cause.
        cause: String,
    },
}

/// Writes `accuracy.svg` and `accuracy.png` ([`RUN_PLOTS`]) into `dir`: test accuracy and test
/// loss per round, and epsilon per round when the run used central DP.
pub fn write_run_plots(dir: &Path, rows: &[RoundRow], summary: &Summary) -> Result<(), PlotError> {
    let points: Vec<RoundPoint> = rows.iter().map(RoundPoint::from).collect();
    // Through JSON, so that a run and `fedge-sim plot` title alike.
    let info = serde_json::to_value(summary).map(|v| RunInfo::from_summary(&v)).unwrap_or_default();
    let figure = run_figure(&points, &info);
    for name in RUN_PLOTS {
        save(&figure, &dir.join(name))?;
    }
    Ok(())
}

/// The panels of one run: accuracy, loss, and epsilon when any round has one.
fn run_figure(points: &[RoundPoint], info: &RunInfo) -> Figure {
    let mut panels = Vec::new();
    for (i, metric) in [Metric::Accuracy, Metric::Loss, Metric::Epsilon].into_iter().enumerate() {
        let series: Vec<(f64, f64)> =
            points.iter().filter_map(|p| Some((XAxis::Round.value(p)?, metric.value(p)?))).collect();
        let Some(&(_, last)) = series.last() else {
            // A run without central DP has no epsilon panel; one without an evaluation has
            // empty accuracy and loss panels (still drawn, so the figure's shape is stable).
            if metric == Metric::Epsilon {
                continue;
            }
            panels.push(Panel { metric, axis: metric.axis(info.delta), series: Vec::new(), y_range: (None, None) });
            continue;
        };
        let label = match metric {
            Metric::Accuracy => {
                let best = series.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                format!("test accuracy: final {last:.2}%, best {best:.2}%")
            }
            Metric::Loss => format!("test loss: final {last:.4}"),
            Metric::Epsilon => format!("ε: final {last:.3}"),
        };
        panels.push(Panel {
            metric,
            axis: metric.axis(info.delta),
            series: vec![Series { label, color: i, points: series }],
            y_range: (None, None),
        });
    }
    let title = match info.title() {
        t if t.is_empty() => "Fedge simulation".to_string(),
        t => t,
    };
    let height = 70 + 300 * panels.len() as u32;
    Figure { title, x: XAxis::Round, panels, size: (1000, height) }
}
