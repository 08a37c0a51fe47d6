//! Drawing: a [`Figure`] of panels into an SVG or PNG (plotters' backends, the embedded font),
//! each panel's mesh, series, markers and legend.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::axis::{Axis, format_tick, x_axis, y_axis};
use super::{Metric, PlotError, XAxis};

/// DejaVu Sans (Bitstream Vera license: `assets/DejaVuSans.LICENSE`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// A picture: a title over panels stacked vertically, sharing the x axis.
pub(super) struct Figure {
    pub(super) title: String,
    pub(super) x: XAxis,
    pub(super) panels: Vec<Panel>,
    pub(super) size: (u32, u32),
}

pub(super) struct Panel {
    pub(super) metric: Metric,
    pub(super) axis: String,
    pub(super) series: Vec<Series>,
    /// The y axis's bounds when given (`--y-min`, `--y-max`): it spans at least them, and
    /// points outside are not drawn.
    pub(super) y_range: (Option<f64>, Option<f64>),
}

impl Panel {
    /// Whether `y` is inside the panel's given bounds.
    fn shows(&self, y: f64) -> bool {
        self.y_range.0.is_none_or(|lo| y >= lo) && self.y_range.1.is_none_or(|hi| y <= hi)
    }
}

pub(super) struct Series {
    pub(super) label: String,
    /// Index into [`COLORS`].
    pub(super) color: usize,
    pub(super) points: Vec<(f64, f64)>,
}

/// Tableau 10: distinguishable, also in greyscale print and for the common colour blindnesses
/// better than plotters' primaries.
pub(super) const COLORS: [RGBColor; 10] = [
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

pub(super) enum Format {
    Svg,
    Png,
}

pub(super) fn format_of(path: &Path) -> Result<Format, PlotError> {
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
pub(super) fn save(figure: &Figure, path: &Path) -> Result<(), PlotError> {
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
    let mut ys: Vec<f64> =
        panel.series.iter().flat_map(|s| &s.points).map(|p| p.1).filter(|&y| panel.shows(y)).collect();
    ys.extend([panel.y_range.0, panel.y_range.1].into_iter().flatten());
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
        let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| panel.shows(p.1)).collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(s.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6 - nudge), (x + 22, y + 6 - nudge)], color.filled()));
        if points.len() <= MARKERS_UP_TO {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
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
pub(super) enum Corner {
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
