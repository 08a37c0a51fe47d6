//! Reading runs back from their folders: `rounds.csv` ([`read_rounds`]) and `summary.json`
//! ([`RunInfo`]) into a [`RunData`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::PlotError;
use crate::run::RoundRow;

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
    pub(super) fn common(infos: &[RunInfo]) -> String {
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
