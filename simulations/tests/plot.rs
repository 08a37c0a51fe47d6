//! `fedge-sim run`'s plots and `fedge-sim plot`, as a user runs them.

use std::path::Path;
use std::process::Command;

fn sim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-sim")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The contents of every `<text>` in an SVG, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|rest| Some(rest.split_once('>')?.1.split("</text>").next()?.trim().to_string()))
        .collect()
}

/// A decodable PNG of the expected width that is not one flat colour.
fn check_png(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_rgb8();
    assert_eq!(img.width(), 1000, "{}", path.display());
    let first = img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| p != first), "{} is one colour", path.display());
}

#[test]
fn run_writes_plots_and_plot_overlays_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("fedavg");
    let (ok, _, stderr) =
        sim(&["run", "-q", "--devices", "10", "--rounds", "2", "--epochs", "1", "--out", run.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let svg = std::fs::read_to_string(run.join("accuracy.svg")).unwrap();
    let words = texts(&svg);
    for text in ["2nn on embedded, iid partition, fedavg", "test accuracy (%)", "test loss (cross-entropy)", "round"] {
        assert!(words.iter().any(|t| t == text), "accuracy.svg lacks the text {text:?}: {words:?}");
    }
    // No DP: no epsilon panel.
    assert!(!svg.contains("privacy loss"));
    check_png(&run.join("accuracy.png"));

    // The same run twice, as PNG and SVG, with labels.
    let copy = dir.path().join("again");
    std::fs::create_dir(&copy).unwrap();
    for f in ["rounds.csv", "summary.json"] {
        std::fs::copy(run.join(f), copy.join(f)).unwrap();
    }
    let png = dir.path().join("cmp.png");
    let (ok, stdout, stderr) =
        sim(&["plot", run.to_str().unwrap(), copy.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    check_png(&png);
    let svg = dir.path().join("cmp.svg");
    let (ok, _, stderr) = sim(&[
        "plot",
        run.to_str().unwrap(),
        copy.to_str().unwrap(),
        "--metric",
        "loss",
        "--x",
        "virtual-time",
        "--labels",
        "first,second",
        "--title",
        "Loss of two runs",
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    let words = texts(&svg);
    for text in
        ["first", "second", "Loss of two runs", "virtual time when the round closed (s)", "test loss (cross-entropy)"]
    {
        assert!(words.iter().any(|t| t == text), "cmp.svg lacks the text {text:?}: {words:?}");
    }
}

#[test]
fn plot_refuses_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let nope = dir.path().join("nope");
    let out_png = dir.path().join("x.png");
    let cases = [
        (
            vec![empty.to_str().unwrap(), "--out", "plot.pdf"],
            "plot.pdf: the file name must end in .svg or .png".to_string(),
        ),
        (
            vec![empty.to_str().unwrap(), "--out", out_png.to_str().unwrap()],
            format!("cannot read {}", empty.join("rounds.csv").display()),
        ),
        (
            vec![nope.to_str().unwrap(), "--out", out_png.to_str().unwrap()],
            format!("cannot read {}", nope.join("rounds.csv").display()),
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["plot"];
        all.extend(args.iter().copied());
        let (ok, _, stderr) = sim(&all);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(&want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        assert!(!out_png.exists());
    }
}

#[test]
fn a_failed_plot_only_warns() {
    let dir = tempfile::tempdir().unwrap();
    // A folder where the PNG should go: the image cannot be written.
    std::fs::create_dir_all(dir.path().join("accuracy.png")).unwrap();
    let (ok, _, stderr) =
        sim(&["run", "-q", "--devices", "10", "--rounds", "1", "--epochs", "1", "--out", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.starts_with("warning: no accuracy plot: cannot write"), "{stderr}");
    assert!(stderr.contains("accuracy.png"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(dir.path().join("summary.json").is_file());
}
