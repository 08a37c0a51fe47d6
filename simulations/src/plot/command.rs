//! `fedge-sim plot`: its arguments ([`PlotArgs`]) and the overlay of one metric of several runs.

use std::path::{Path, PathBuf};

use super::draw::{Figure, Panel, Series, format_of, save};
use super::read::{RunData, RunInfo, read_run};
use super::{Metric, PlotError, XAxis};

/// `fedge-sim plot`: one metric of several runs on one chart, with a legend.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// Run folders, each holding the rounds.csv (and summary.json) that `fedge-sim run` wrote.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The image to write: FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// What to draw: test accuracy (%), test loss, or epsilon (runs with central DP).
    #[arg(long, value_enum, default_value_t = Metric::Accuracy)]
    pub metric: Metric,
    /// The x axis: round number, or the simulator's virtual time (seconds) at each round's close.
    #[arg(long, value_enum, default_value_t = XAxis::Round)]
    pub x: XAxis,
    /// Legend labels, comma-separated, one per run [default: each run folder's name].
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Title [default: the metric and what the runs share: model, dataset, partition, strategy].
    #[arg(long)]
    pub title: Option<String>,
    /// The y axis starts at or below this value; points under it are not drawn (zooms in on
    /// the end of accuracy curves, e.g. `--y-min 90`).
    #[arg(long, allow_hyphen_values = true)]
    pub y_min: Option<f64>,
    /// The y axis ends at or above this value; points over it are not drawn.
    #[arg(long, allow_hyphen_values = true)]
    pub y_max: Option<f64>,
}

impl PlotArgs {
    /// Reads the runs and writes the image; returns its path.
    pub fn run(&self) -> Result<&Path, PlotError> {
        format_of(&self.out)?;
        if let Some(labels) = &self.labels
            && labels.len() != self.runs.len()
        {
            return Err(PlotError::Labels { labels: labels.len(), runs: self.runs.len() });
        }
        let y_range = (self.y_min, self.y_max);
        let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
        let ordered = match y_range {
            (Some(lo), Some(hi)) => lo < hi,
            _ => true,
        };
        if !(finite(self.y_min) && finite(self.y_max) && ordered) {
            return Err(PlotError::YRange(self.y_min, self.y_max));
        }
        let runs = self.runs.iter().map(|d| read_run(d)).collect::<Result<Vec<_>, _>>()?;
        let labels: Vec<String> = match &self.labels {
            Some(l) => l.clone(),
            None => self.runs.iter().map(|d| run_name(d)).collect(),
        };
        let mut figure = overlay_figure(&runs, &labels, self.metric, self.x, self.title.clone())?;
        figure.panels.iter_mut().for_each(|p| p.y_range = y_range);
        save(&figure, &self.out)?;
        Ok(&self.out)
    }
}

/// A run folder's name (`runs/fedprox/` is `fedprox`; `.` is the current folder's).
fn run_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(dir)
        .or_else(|| std::path::absolute(dir).ok().and_then(|p| named(&p)))
        .unwrap_or_else(|| dir.display().to_string())
}

/// One metric of several runs, one series each.
fn overlay_figure(
    runs: &[RunData],
    labels: &[String],
    metric: Metric,
    x: XAxis,
    title: Option<String>,
) -> Result<Figure, PlotError> {
    let mut series = Vec::new();
    for (i, (run, label)) in runs.iter().zip(labels).enumerate() {
        if x == XAxis::VirtualTime && run.rounds.iter().any(|p| x.value(p).is_none()) {
            return Err(PlotError::Missing {
                path: run.csv.clone(),
                what: "no virtual time (virtual_start_s and virtual_duration_s columns) for --x virtual-time".into(),
            });
        }
        let points: Vec<(f64, f64)> = run.rounds.iter().filter_map(|p| Some((x.value(p)?, metric.value(p)?))).collect();
        if points.is_empty() {
            let what = match metric {
                Metric::Epsilon => "no epsilon values (the run did not use central DP)".to_string(),
                m => format!("no {} values", m.column()),
            };
            return Err(PlotError::Missing { path: run.csv.clone(), what });
        }
        series.push(Series { label: label.clone(), color: i, points });
    }
    let infos: Vec<RunInfo> = runs.iter().map(|r| r.info.clone()).collect();
    let title = title.unwrap_or_else(|| match RunInfo::common(&infos) {
        c if c.is_empty() => metric.title().to_string(),
        c => format!("{}: {c}", metric.title()),
    });
    let delta = infos.first().and_then(|i| i.delta).filter(|d| infos.iter().all(|i| i.delta == Some(*d)));
    let panel = Panel { metric, axis: metric.axis(delta), series, y_range: (None, None) };
    Ok(Figure { title, x, panels: vec![panel], size: (1000, 620) })
}
