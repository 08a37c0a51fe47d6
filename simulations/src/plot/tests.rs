use plotters::style::Color;

use super::axis::{RangeKind, format_tick, x_axis, y_axis};
use super::draw::COLORS;
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
        s += &format!("{r},{acc},{loss},0.5,{r},10,10,0,600,true,{},{},{clip},{eps},0\n", (r - 1) as f64 * 12.5, 12.5);
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
    PlotArgs {
        runs,
        out,
        metric: Metric::Accuracy,
        x: XAxis::Round,
        labels: None,
        title: None,
        y_min: None,
        y_max: None,
    }
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
fn y_min_zooms_in_on_the_end_of_the_curves() {
    // Accuracy 54%, 58%, ..., 90% over rounds 1..10: from 80% up, rounds 8, 9 and 10 remain,
    // and the axis starts at 80 (its first tick), not at the data's 54.
    let tmp = tempfile::tempdir().unwrap();
    let a = run_dir(tmp.path(), "a", &rounds_csv(1, false));
    let out = tmp.path().join("zoom.svg");
    PlotArgs { y_min: Some(80.0), ..args(vec![a.clone()], out.clone()) }.run().unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    let lines = polylines(&svg);
    assert_eq!(lines[0].len(), 3, "{lines:?}");
    let ticks = texts(&svg);
    assert!(ticks.iter().any(|t| t == "80") && !ticks.iter().any(|t| t == "50" || t == "60"), "{ticks:?}");
    // Bounds that are not finite or not in order are refused.
    for (lo, hi) in [(Some(f64::NAN), None), (Some(90.0), Some(80.0)), (None, Some(f64::INFINITY))] {
        let e = PlotArgs { y_min: lo, y_max: hi, ..args(vec![a.clone()], out.clone()) }.run().unwrap_err();
        assert!(e.to_string().contains("--y-min and --y-max"), "{e}");
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
