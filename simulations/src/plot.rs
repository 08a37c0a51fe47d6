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
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde::Deserialize;
use thiserror::Error;

use crate::run::{RoundRow, Summary};

/// DejaVu Sans (Bitstream Vera license: `assets/DejaVuSans.LICENSE`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

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
    fn column(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Loss => "loss",
            Metric::Epsilon => "epsilon",
        }
    }

    /// The value of a round to draw (accuracy in percent), if it has one.
    fn value(self, p: &RoundPoint) -> Option<f64> {
        let v = match self {
            Metric::Accuracy => p.accuracy.map(|a| a * 100.0),
            Metric::Loss => p.loss,
            Metric::Epsilon => p.epsilon,
        };
        v.filter(|v| v.is_finite())
    }

    fn axis(self, delta: Option<f64>) -> String {
        match self {
            Metric::Accuracy => "test accuracy (%)".into(),
            Metric::Loss => "test loss (cross-entropy)".into(),
            Metric::Epsilon => match delta {
                Some(d) => format!("privacy loss ε (δ = {d:e})"),
                None => "privacy loss ε".into(),
            },
        }
    }

    fn title(self) -> &'static str {
        match self {
            Metric::Accuracy => "Test accuracy",
            Metric::Loss => "Test loss",
            Metric::Epsilon => "Privacy loss ε",
        }
    }

    fn range(self) -> RangeKind {
        match self {
            Metric::Accuracy => RangeKind::Percent,
            Metric::Loss => RangeKind::NonNegative,
            Metric::Epsilon => RangeKind::FromZero,
        }
    }

    /// The legend's corners, most likely empty first: accuracy rises (lower right is empty),
    /// loss falls (upper right), epsilon grows from zero (upper left).
    fn corners(self) -> [Corner; 4] {
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
    fn value(self, p: &RoundPoint) -> Option<f64> {
        match self {
            XAxis::Round => Some(p.round as f64),
            XAxis::VirtualTime => Some(p.virtual_start_s? + p.virtual_duration_s?).filter(|t| t.is_finite()),
        }
    }

    fn axis(self) -> &'static str {
        match self {
            XAxis::Round => "round",
            XAxis::VirtualTime => "virtual time when the round closed (s)",
        }
    }
}

/// One round of a run, as the plots need it: the columns of `rounds.csv` they read (the others
/// are ignored; an empty cell is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct RoundPoint {
    /// Round number.
    pub round: u64,
    /// Test accuracy (0..1).
    pub accuracy: Option<f64>,
    /// Test loss.
    pub loss: Option<f64>,
    /// Central DP: epsilon spent so far.
    pub epsilon: Option<f64>,
    /// Virtual time the round started, seconds since the run began.
    pub virtual_start_s: Option<f64>,
    /// Virtual seconds from the round's start to its close.
    pub virtual_duration_s: Option<f64>,
}

impl From<&RoundRow> for RoundPoint {
    fn from(r: &RoundRow) -> Self {
        Self {
            round: r.round,
            accuracy: r.accuracy,
            loss: r.loss,
            epsilon: r.epsilon,
            virtual_start_s: Some(r.virtual_start_s),
            virtual_duration_s: Some(r.virtual_duration_s),
        }
    }
}

/// What a run's `summary.json` says about the run, for titles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunInfo {
    /// `2nn on embedded`.
    pub setup: Option<String>,
    /// `iid partition`, `dirichlet(α=0.5) partition`, `shards(2 per device) partition`.
    pub partition: Option<String>,
    /// The aggregation strategy.
    pub strategy: Option<String>,
    /// `central DP z=1.1` when the server added noise.
    pub privacy: Option<String>,
    /// `20% sign-flip attackers`.
    pub attack: Option<String>,
    /// Delta of the epsilons reported.
    pub delta: Option<f64>,
}

impl RunInfo {
    /// Reads the fields out of a `summary.json` value (any of them may be missing).
    pub fn from_summary(v: &serde_json::Value) -> Self {
        let c = &v["config"];
        let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let setup = match (s(&c["model"]), s(&c["dataset"])) {
            (Some(m), Some(d)) => Some(format!("{m} on {d}")),
            _ => None,
        };
        let partition = s(&c["partition"]).map(|p| match p.as_str() {
            "dirichlet" => match c["alpha"].as_f64() {
                Some(a) => format!("dirichlet(α={a}) partition"),
                None => "dirichlet partition".into(),
            },
            "shards" => match c["shards_per_device"].as_u64() {
                Some(n) => format!("shards({n} per device) partition"),
                None => "shards partition".into(),
            },
            p => format!("{p} partition"),
        });
        let privacy = c["noise_multiplier"].as_f64().map(|z| format!("central DP z={z}"));
        let attack = match (s(&c["attack"]), c["attackers"].as_f64()) {
            (Some(kind), Some(f)) if f > 0.0 => Some(format!("{}% {kind} attackers", round_to(f * 100.0, 1))),
            _ => None,
        };
        Self { setup, partition, strategy: s(&v["strategy"]), privacy, attack, delta: c["delta"].as_f64() }
    }

    fn parts(&self) -> [&Option<String>; 5] {
        [&self.setup, &self.partition, &self.strategy, &self.privacy, &self.attack]
    }

    /// `2nn on embedded, iid partition, fedavg` (and DP, attack when present).
    pub fn title(&self) -> String {
        self.parts().into_iter().flatten().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The parts every run shares, for an overlay's title.
    fn common(infos: &[RunInfo]) -> String {
        let Some(first) = infos.first() else { return String::new() };
        (0..5)
            .filter_map(|i| {
                let v = first.parts()[i].as_ref()?;
                infos.iter().all(|o| o.parts()[i].as_ref() == Some(v)).then(|| v.clone())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

/// A run read back from its folder.
#[derive(Debug, Clone)]
pub struct RunData {
    /// Its `rounds.csv`.
    pub csv: PathBuf,
    /// Its rounds.
    pub rounds: Vec<RoundPoint>,
    /// What its `summary.json` says (default when the run has none yet: a run still going).
    pub info: RunInfo,
}

/// Reads `dir/rounds.csv` and, when present, `dir/summary.json`.
pub fn read_run(dir: &Path) -> Result<RunData, PlotError> {
    let csv = dir.join("rounds.csv");
    let rounds = read_rounds(&csv)?;
    let path = dir.join("summary.json");
    let info = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| PlotError::Malformed { path: path.clone(), cause: e.to_string() })?;
            RunInfo::from_summary(&v)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => RunInfo::default(),
        Err(cause) => return Err(PlotError::Read { path, cause }),
    };
    Ok(RunData { csv, rounds, info })
}

/// Reads a `rounds.csv`.
pub fn read_rounds(path: &Path) -> Result<Vec<RoundPoint>, PlotError> {
    let file = std::fs::File::open(path).map_err(|cause| PlotError::Read { path: path.to_path_buf(), cause })?;
    let mut reader = csv::Reader::from_reader(file);
    let headers =
        reader.headers().map_err(|e| PlotError::Malformed { path: path.to_path_buf(), cause: one_line(&e) })?.clone();
    if headers.iter().all(str::is_empty) {
        return Err(PlotError::Empty(path.to_path_buf()));
    }
    if !headers.iter().any(|h| h == "round") {
        return Err(PlotError::Malformed { path: path.to_path_buf(), cause: "no `round` column".into() });
    }
    let rounds = reader
        .deserialize()
        .collect::<Result<Vec<RoundPoint>, _>>()
        .map_err(|e| PlotError::Malformed { path: path.to_path_buf(), cause: one_line(&e) })?;
    if rounds.is_empty() {
        return Err(PlotError::Empty(path.to_path_buf()));
    }
    Ok(rounds)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
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
            panels.push(Panel { metric, axis: metric.axis(info.delta), series: Vec::new() });
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
        });
    }
    let title = match info.title() {
        t if t.is_empty() => "Fedge simulation".to_string(),
        t => t,
    };
    let height = 70 + 300 * panels.len() as u32;
    Figure { title, x: XAxis::Round, panels, size: (1000, height) }
}

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
        let runs = self.runs.iter().map(|d| read_run(d)).collect::<Result<Vec<_>, _>>()?;
        let labels: Vec<String> = match &self.labels {
            Some(l) => l.clone(),
            None => self.runs.iter().map(|d| run_name(d)).collect(),
        };
        let figure = overlay_figure(&runs, &labels, self.metric, self.x, self.title.clone())?;
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
    Ok(Figure { title, x, panels: vec![Panel { metric, axis: metric.axis(delta), series }], size: (1000, 620) })
}

/// A picture: a title over panels stacked vertically, sharing the x axis.
struct Figure {
    title: String,
    x: XAxis,
    panels: Vec<Panel>,
    size: (u32, u32),
}

struct Panel {
    metric: Metric,
    axis: String,
    series: Vec<Series>,
}

struct Series {
    label: String,
    /// Index into [`COLORS`].
    color: usize,
    points: Vec<(f64, f64)>,
}

/// Tableau 10: distinguishable, also in greyscale print and for the common colour blindnesses
/// better than plotters' primaries.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Series with at most this many points get a marker on each (a one-point series is otherwise
/// invisible).
const MARKERS_UP_TO: usize = 40;

enum Format {
    Svg,
    Png,
}

fn format_of(path: &Path) -> Result<Format, PlotError> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => Err(PlotError::Extension(path.to_path_buf())),
    }
}

/// Registers the embedded font as plotters' `sans-serif` (once).
fn font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Draws `figure` into `path`, SVG or PNG by its extension; the file is written only once the
/// picture is complete.
fn save(figure: &Figure, path: &Path) -> Result<(), PlotError> {
    let format = format_of(path)?;
    font()?;
    let drawing = |cause: String| PlotError::Draw { path: path.to_path_buf(), cause };
    let write = |cause: String| PlotError::Write { path: path.to_path_buf(), cause };
    let (w, h) = figure.size;
    match format {
        Format::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
                draw(&root, figure, 0).map_err(drawing)?;
                root.present().map_err(|e| drawing(e.to_string()))?;
            }
            std::fs::write(path, text).map_err(|e| write(e.to_string()))
        }
        Format::Png => {
            let mut buffer = vec![0u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
                draw(&root, figure, PNG_TEXT_NUDGE).map_err(drawing)?;
                root.present().map_err(|e| drawing(e.to_string()))?;
            }
            let image = image::RgbImage::from_raw(w, h, buffer).ok_or_else(|| drawing("bad buffer size".into()))?;
            image.save_with_format(path, image::ImageFormat::Png).map_err(|e| write(e.to_string()))
        }
    }
}

/// Pixels plotters' ab_glyph text sits above where it centres it (its layout box is taller than
/// the glyphs): PNGs move tick labels down, and legend swatches up, by this much. SVG viewers
/// centre text themselves.
const PNG_TEXT_NUDGE: i32 = 3;

/// Font sizes, in pixels. Even: plotters' ab_glyph places each glyph at `size / 2 + top`
/// truncated, which with an odd size puts a period a pixel above the baseline.
const TITLE_PX: u32 = 24;
const AXIS_PX: u32 = 18;
const LABEL_PX: u32 = 16;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, figure: &Figure, nudge: i32) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let body = root.titled(&figure.title, ("sans-serif", TITLE_PX).into_font().color(&BLACK)).map_err(err)?;
    let xs: Vec<f64> = figure.panels.iter().flat_map(|p| &p.series).flat_map(|s| &s.points).map(|p| p.0).collect();
    let x_axis = x_axis(&xs, figure.x);
    let areas = body.split_evenly((figure.panels.len().max(1), 1));
    for (i, (panel, area)) in figure.panels.iter().zip(&areas).enumerate() {
        let last = i + 1 == figure.panels.len();
        draw_panel(area, panel, &x_axis, figure.x, last, nudge).map_err(err)?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x_axis: &Axis,
    x: XAxis,
    bottom: bool,
    nudge: i32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ys: Vec<f64> = panel.series.iter().flat_map(|s| &s.points).map(|p| p.1).collect();
    let y_axis = y_axis(&ys, panel.metric.range());
    let (x_digits, y_digits) = (x_axis.decimals, y_axis.decimals);
    let x_format = |v: &f64| format_tick(*v, x_digits);
    let y_format = |v: &f64| format_tick(*v, y_digits);
    let mut chart = ChartBuilder::on(area)
        .margin_left(10)
        .margin_right(25)
        .margin_top(10)
        .margin_bottom(if bottom { 5 } else { 0 })
        .x_label_area_size(if bottom { 55 } else { 30 })
        .y_label_area_size(85)
        .build_cartesian_2d(x_axis.clone(), y_axis.clone())?;
    let label_font = ("sans-serif", LABEL_PX).into_font();
    let desc_font = ("sans-serif", AXIS_PX).into_font();
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.12))
        .axis_style(BLACK.mix(0.7))
        .label_style(label_font.clone())
        .axis_desc_style(desc_font)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .y_label_offset(nudge)
        .y_desc(panel.axis.as_str());
    if bottom {
        mesh.x_desc(x.axis());
    }
    mesh.draw()?;
    for s in &panel.series {
        let color = COLORS[s.color % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
            .label(s.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6 - nudge), (x + 22, y + 6 - nudge)], color.filled()));
        if s.points.len() <= MARKERS_UP_TO {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(legend_corner(panel, x_axis, &y_axis).position())
            .margin(12)
            .label_font(label_font)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// A corner of a panel, for its legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corner {
    UpperLeft,
    UpperRight,
    LowerLeft,
    LowerRight,
}

impl Corner {
    fn position(self) -> SeriesLabelPosition {
        match self {
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
        }
    }

    /// Whether a point at (fx, fy), as fractions of the axes' ranges, lies where a legend in
    /// this corner would be (about 45% wide, a third high).
    fn covers(self, fx: f64, fy: f64) -> bool {
        let left = fx < 0.45;
        let right = fx > 0.55;
        let low = fy < 0.35;
        let high = fy > 0.65;
        match self {
            Corner::UpperLeft => left && high,
            Corner::UpperRight => right && high,
            Corner::LowerLeft => left && low,
            Corner::LowerRight => right && low,
        }
    }
}

/// The corner whose legend covers the fewest points (ties: the metric's usual order).
fn legend_corner(panel: &Panel, x: &Axis, y: &Axis) -> Corner {
    let frac = |v: f64, a: &Axis| (v - a.lo) / (a.hi - a.lo);
    let points: Vec<(f64, f64)> =
        panel.series.iter().flat_map(|s| &s.points).map(|&(px, py)| (frac(px, x), frac(py, y))).collect();
    let corners = panel.metric.corners();
    corners
        .into_iter()
        .min_by_key(|c| points.iter().filter(|&&(fx, fy)| c.covers(fx, fy)).count())
        .unwrap_or(corners[0])
}

/// An axis: its range, tick positions and the decimals their labels need.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    decimals: usize,
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
enum RangeKind {
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

fn format_tick(v: f64, decimals: usize) -> String {
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    // No "-0".
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') { s.trim_start_matches('-').into() } else { s }
}

/// The x axis over `xs`: rounds get whole-number ticks and a little room either side (so the
/// first and last markers are not cut); virtual time starts at zero, the run's start.
fn x_axis(xs: &[f64], x: XAxis) -> Axis {
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
fn y_axis(ys: &[f64], kind: RangeKind) -> Axis {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rounds.csv as `fedge-sim run` writes it: 10 rounds, evaluated every other round,
    /// accuracy rising.
    fn rounds_csv(eval_every: u64, dp: bool) -> String {
        let mut s = String::from(
            "round,accuracy,loss,train_loss,model_version,selected,results,failures,samples,aggregated,virtual_start_s,virtual_duration_s,clip_norm,epsilon,attackers\n",
        );
        for r in 1..=10u64 {
            let (acc, loss) = if r % eval_every == 0 || r == 10 {
                (format!("{}", 0.5 + 0.04 * r as f64), format!("{}", 2.0 / r as f64))
            } else {
                (String::new(), String::new())
            };
            let (clip, eps) = if dp { ("1.0".to_string(), format!("{}", 0.3 * r as f64)) } else { Default::default() };
            s += &format!(
                "{r},{acc},{loss},0.5,{r},10,10,0,600,true,{},{},{clip},{eps},0\n",
                (r - 1) as f64 * 12.5,
                12.5
            );
        }
        s
    }

    const SUMMARY: &str = r#"{"strategy": "fedprox", "final_accuracy": 0.9,
        "config": {"model": "cnn", "dataset": "mnist", "partition": "dirichlet", "alpha": 0.3,
                   "delta": 1e-5, "noise_multiplier": null, "attack": null, "attackers": 0.0}}"#;

    fn run_dir(root: &Path, name: &str, csv: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rounds.csv"), csv).unwrap();
        std::fs::write(dir.join("summary.json"), SUMMARY).unwrap();
        dir
    }

    fn args(runs: Vec<PathBuf>, out: PathBuf) -> PlotArgs {
        PlotArgs { runs, out, metric: Metric::Accuracy, x: XAxis::Round, labels: None, title: None }
    }

    /// The points of every series line (`<polyline>` of stroke width 2; axes and ticks are
    /// width 1) in an SVG, as (x, y) pairs.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("<polyline")
            .skip(1)
            .map(|rest| rest.split("/>").next().unwrap())
            .filter(|tag| tag.contains("stroke-width=\"2\""))
            .map(|tag| {
                let attr = tag.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
                attr.split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// The contents of every `<text>` in an SVG, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|rest| Some(rest.split_once('>')?.1.split("</text>").next()?.trim().to_string()))
            .collect()
    }

    #[test]
    fn overlay_svg_has_axis_labels_a_legend_and_one_line_per_run() {
        let tmp = tempfile::tempdir().unwrap();
        let a = run_dir(tmp.path(), "fedavg", &rounds_csv(1, false));
        let b = run_dir(tmp.path(), "fedprox", &rounds_csv(2, false));
        let out = tmp.path().join("cmp.svg");
        args(vec![a, b], out.clone()).run().unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        let texts = texts(&svg);
        // Axis labels, the legend, and the title: the metric and what both runs share.
        for text in [
            "test accuracy (%)",
            "round",
            "fedavg",
            "fedprox",
            "Test accuracy: cnn on mnist, dirichlet(α=0.3) partition, fedprox",
        ] {
            assert!(texts.iter().any(|t| t == text), "no text {text:?} in {texts:?}");
        }
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 2, "one polyline per run");
        // Every round of the first, rounds 2, 4, ..., 10 of the second.
        assert_eq!(lines[0].len(), 10);
        assert_eq!(lines[1].len(), 5);
        // Accuracy rises: y (pixels from the top) falls along each line.
        for line in &lines {
            assert!(line.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1), "{line:?}");
        }
    }

    #[test]
    fn eval_every_gaps_are_skipped_not_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let a = run_dir(tmp.path(), "sparse", &rounds_csv(3, false));
        let out = tmp.path().join("a.svg");
        args(vec![a], out.clone()).run().unwrap();
        let lines = polylines(&std::fs::read_to_string(&out).unwrap());
        // Rounds 3, 6, 9 and the last, 10.
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 4, "{lines:?}");
        // No point dropped to zero: the line only rises.
        assert!(lines[0].windows(2).all(|w| w[1].1 < w[0].1), "{lines:?}");
    }

    #[test]
    fn run_plots_have_a_dp_panel_only_with_dp() {
        let tmp = tempfile::tempdir().unwrap();
        let info = RunInfo::from_summary(&serde_json::from_str(SUMMARY).unwrap());
        for (dp, panels) in [(false, 2), (true, 3)] {
            let points: Vec<RoundPoint> =
                csv::Reader::from_reader(rounds_csv(2, dp).as_bytes()).deserialize().map(Result::unwrap).collect();
            let figure = run_figure(&points, &info);
            assert_eq!(figure.panels.len(), panels);
            let path = tmp.path().join(format!("run-{dp}.svg"));
            save(&figure, &path).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            for text in ["test accuracy (%)", "test loss (cross-entropy)", "round", "final 90.00%, best 90.00%"] {
                assert!(svg.contains(text), "dp {dp}: no {text:?}");
            }
            assert_eq!(svg.contains("privacy loss ε (δ = 1e-5)"), dp);
            let lines = polylines(&svg);
            assert_eq!(lines.len(), panels);
            assert_eq!(lines.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 10][..panels]);
        }
    }

    #[test]
    fn png_decodes_with_its_size_and_is_not_blank() {
        let tmp = tempfile::tempdir().unwrap();
        let a = run_dir(tmp.path(), "a", &rounds_csv(1, true));
        let b = run_dir(tmp.path(), "b", &rounds_csv(2, true));
        for metric in [Metric::Accuracy, Metric::Epsilon] {
            let out = tmp.path().join("cmp.png");
            let mut plot = args(vec![a.clone(), b.clone()], out.clone());
            plot.metric = metric;
            plot.x = XAxis::VirtualTime;
            plot.run().unwrap();
            let img = image::open(&out).unwrap().into_rgb8();
            assert_eq!(img.dimensions(), (1000, 620));
            // White background, black text, both series' colours.
            for color in [[255, 255, 255], [0, 0, 0], COLORS[0].rgb().into(), COLORS[1].rgb().into()] {
                assert!(img.pixels().any(|p| p.0 == color), "{metric:?}: no pixel of {color:?}");
            }
        }
    }

    #[test]
    fn bad_input_fails_in_one_line_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let good = run_dir(tmp.path(), "good", &rounds_csv(1, false));
        let nope = tmp.path().join("nope");
        let empty = run_dir(tmp.path(), "empty", "");
        let header = run_dir(tmp.path(), "header", "round,accuracy\n");
        let bad = run_dir(tmp.path(), "bad", "round,accuracy\n1,0.5\nbanana,0.6\n");
        let png = tmp.path().join("x.png");
        let cases: Vec<(Vec<PathBuf>, PathBuf, String)> = vec![
            (vec![good.clone()], tmp.path().join("x.jpg"), "x.jpg: the file name must end in .svg or .png".into()),
            (vec![good.clone()], tmp.path().join("x"), "the file name must end in .svg or .png".into()),
            (vec![nope.clone()], png.clone(), format!("cannot read {}", nope.join("rounds.csv").display())),
            (vec![empty.clone()], png.clone(), format!("{}: no rounds", empty.join("rounds.csv").display())),
            (vec![header.clone()], png.clone(), format!("{}: no rounds", header.join("rounds.csv").display())),
            (vec![bad.clone()], png.clone(), format!("{}: CSV deserialize error", bad.join("rounds.csv").display())),
        ];
        for (runs, out, want) in cases {
            let e = args(runs, out.clone()).run().unwrap_err().to_string();
            assert!(e.contains(&want), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(!out.exists());
        }
        let mut eps = args(vec![good.clone()], png.clone());
        eps.metric = Metric::Epsilon;
        let e = eps.run().unwrap_err().to_string();
        assert!(e.contains("rounds.csv: no epsilon values (the run did not use central DP)"), "{e}");
        let mut labels = args(vec![good.clone()], png.clone());
        labels.labels = Some(vec!["a".into(), "b".into()]);
        assert_eq!(labels.run().unwrap_err().to_string(), "--labels has 2 labels for 1 runs");
    }

    #[test]
    fn axes_are_on_whole_ticks() {
        // Accuracy in percent, zoomed to the data by whole ticks, never past 100.
        let a = y_axis(&[62.3, 91.2], RangeKind::Percent);
        assert_eq!((a.lo, a.ticks.first(), a.ticks.last()), (60.0, Some(&60.0), Some(&95.0)));
        assert!(a.hi > 91.2 && a.hi < 96.0, "{a:?}");
        let a = y_axis(&[80.0, 99.9], RangeKind::Percent);
        assert_eq!(a.ticks.last(), Some(&100.0));
        assert!(a.hi <= 100.5, "{a:?}");
        let a = y_axis(&[9.0, 97.0], RangeKind::Percent);
        assert_eq!((a.lo, a.ticks.last()), (0.0, Some(&100.0)));
        // Epsilon from zero; a single value gets a band around it.
        assert_eq!(y_axis(&[2.0, 7.5], RangeKind::FromZero).lo, 0.0);
        let one = y_axis(&[0.31], RangeKind::NonNegative);
        assert!(one.lo < 0.31 && one.hi > 0.31 && one.ticks.len() >= 2, "{one:?}");
        // Rounds: whole numbers only.
        let x = x_axis(&[1.0, 2.0], XAxis::Round);
        assert_eq!(x.ticks, [1.0, 2.0]);
        assert!(x.lo < 1.0 && x.hi > 2.0);
        let x = x_axis(&[1.0, 200.0], XAxis::Round);
        assert_eq!(x.ticks.first(), Some(&0.0));
        assert!(x.ticks.windows(2).all(|w| w[1] - w[0] == 20.0), "{x:?}");
        assert_eq!(format_tick(-0.0, 1), "0.0");
        assert_eq!(format_tick(0.25, 2), "0.25");
    }
}
