//! What a run produces: one [`RoundRow`] per line of `rounds.csv`, the [`Summary`] written as
//! `summary.json`, [`SimOutput`] returned to the caller, and a round's console line.

use std::io::Write;
use std::path::Path;

use fedge_core::ModelParams;
use fedge_core::partition::PartitionReport;
use fedge_engine::RoundOutcome;
use serde::Serialize;

use super::SimError;
use crate::attack::AttackSummary;
use crate::clock::RoundTrace;
use crate::config::SimConfig;

/// One line of `rounds.csv`: deterministic values only (no timings), so equal seeds give equal
/// files. In FedBuff mode a line is one aggregation: `round` counts aggregations, `selected`
/// is the tasks handed out since the previous one, `failures` the results refused since then,
/// and the virtual start is the previous aggregation's time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    /// Round number.
    pub round: u64,
    /// Test accuracy of the model after the round (empty when not evaluated).
    pub accuracy: Option<f64>,
    /// Test loss.
    pub loss: Option<f64>,
    /// Sample-weighted mean training loss of the devices.
    pub train_loss: f64,
    /// Model version after the round.
    pub model_version: u64,
    /// Devices selected.
    pub selected: usize,
    /// Results aggregated.
    pub results: usize,
    /// Devices that dropped out.
    pub failures: usize,
    /// Examples trained on.
    pub samples: u64,
    /// Whether the round aggregated.
    pub aggregated: bool,
    /// Virtual time the round started, seconds since the run began.
    pub virtual_start_s: f64,
    /// Virtual seconds from the round's start to its close.
    pub virtual_duration_s: f64,
    /// Central DP: the clip norm of the round (it moves with adaptive clipping).
    pub clip_norm: Option<f64>,
    /// Central DP: epsilon spent by the run so far, at the configured delta.
    pub epsilon: Option<f64>,
    /// FedBuff: mean staleness of the aggregated results (empty in sync mode).
    pub mean_staleness: Option<f64>,
    /// FedBuff: largest staleness among them (empty in sync mode).
    pub max_staleness: Option<u64>,
    /// Selected devices that are attackers (0 without `attack`).
    pub attackers: usize,
}

impl RoundRow {
    /// The row of a synchronous round from its trace and, if the model after it was scored,
    /// the evaluation; `epsilon` is what the run has spent so far under central DP.
    pub(crate) fn of_round(
        trace: &crate::clock::RoundTrace,
        eval: Option<fedge_engine::Evaluation>,
        epsilon: Option<f64>,
    ) -> Self {
        let report = &trace.report;
        Self {
            round: report.round,
            accuracy: eval.map(|e| e.accuracy),
            loss: eval.map(|e| e.loss),
            train_loss: report.train_loss,
            model_version: report.model_version,
            selected: report.selected,
            results: report.results,
            failures: report.failures + report.stragglers.len(),
            samples: report.samples,
            aggregated: report.outcome == fedge_engine::RoundOutcome::Aggregated,
            virtual_start_s: super::seconds(trace.start),
            virtual_duration_s: super::seconds(trace.duration()),
            clip_norm: report.privacy.map(|p| p.clip_norm),
            epsilon,
            mean_staleness: None,
            max_staleness: None,
            attackers: trace.attackers,
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The aggregation strategy.
    pub strategy: String,
    /// Test accuracy of the final model.
    pub final_accuracy: f64,
    /// Test loss of the final model.
    pub final_loss: f64,
    /// Best test accuracy seen.
    pub best_accuracy: f64,
    /// Rounds run.
    pub rounds: u64,
    /// First round whose accuracy reached `target_accuracy`, if set and reached.
    pub rounds_to_target: Option<u64>,
    /// Virtual devices.
    pub devices: usize,
    /// Devices holding at least one example.
    pub devices_with_data: usize,
    /// Model parameters.
    pub parameters: usize,
    /// Final model version.
    pub model_version: u64,
    /// SHA-256 of the final model.
    pub model_hash: String,
    /// Wall-clock seconds of the whole run.
    pub wall_seconds: f64,
    /// Wall-clock seconds per round (training + evaluation).
    pub round_seconds: Vec<f64>,
    /// Virtual seconds from the first round's start to the last one's close.
    pub virtual_seconds: f64,
    /// Bytes of device updates that crossed the (in-memory) wire.
    pub upload_bytes: u64,
    /// Central DP: epsilon of the whole run at `config.delta` (record-level for the devices'
    /// data taken as one record each: device-level DP).
    pub epsilon: Option<f64>,
    /// Central DP: the sampling rate q of a round (devices per round / population).
    pub sampling_rate: Option<f64>,
    /// With `distill_every`: test accuracy of the final global (teacher) model.
    pub teacher_accuracy: Option<f64>,
    /// With `distill_every`: bytes of the teacher as it travels (an encoded `Model` message).
    pub teacher_bytes: Option<u64>,
    /// With `distill_every`: test accuracy of the last int8 student, as devices run it.
    pub student_accuracy: Option<f64>,
    /// With `distill_every`: the same student before quantisation.
    pub student_f32_accuracy: Option<f64>,
    /// With `distill_every`: bytes of the int8 student as it travels.
    pub student_bytes: Option<u64>,
    /// With `distill_every`: parameters of the student.
    pub student_parameters: Option<usize>,
    /// With `distill_every`: median single-image inference time of the teacher, microseconds.
    pub teacher_latency_us: Option<f64>,
    /// With `distill_every`: the same for the int8 student (dequantised on load).
    pub student_latency_us: Option<f64>,
    /// The configuration that ran.
    pub config: SimConfig,
    /// With `attack`: its kind, the configured fraction and the attacking devices.
    pub attack: Option<AttackSummary>,
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct SimOutput {
    /// Per-round rows.
    pub rounds: Vec<RoundRow>,
    /// The summary.
    pub summary: Summary,
    /// Sizes and label histograms of the partition.
    pub partition: PartitionReport,
    /// The final global model.
    pub global: ModelParams,
    /// With `distill_every`: the last student as devices run it (int8, dequantised).
    pub student: Option<ModelParams>,
    /// Each round on the virtual clock: start, deadline, arrivals, the engine's report.
    pub traces: Vec<RoundTrace>,
}

/// A round's line for the [`Observer`](super::Observer).
pub(super) fn format_row(row: &RoundRow, rounds: u64, secs: f64, report: &fedge_engine::RoundReport) -> String {
    let eval = match (row.accuracy, row.loss) {
        (Some(a), Some(l)) => format!("accuracy {:6.2}%  loss {l:.4}", a * 100.0),
        _ => "accuracy    -     loss   -   ".to_string(),
    };
    let mut status = match &report.outcome {
        RoundOutcome::Aggregated => String::new(),
        RoundOutcome::Failed(why) => format!("  (not aggregated: {why})"),
    };
    if let Some(e) = row.epsilon {
        status = format!("  epsilon {e:.4}{status}");
    }
    if row.attackers > 0 {
        status = format!("  {} attackers{status}", row.attackers);
    }
    if !report.stragglers.is_empty() {
        status = format!("  {} late{status}", report.stragglers.len());
    }
    format!(
        "round {:>w$}/{rounds}  {eval}  train_loss {:.4}  devices {}/{}  v{}  virtual {:.1}s+{:.1}s  {secs:.2}s{status}",
        row.round,
        row.train_loss,
        row.results,
        row.selected,
        row.model_version,
        row.virtual_start_s,
        row.virtual_duration_s,
        w = rounds.to_string().len()
    )
}

/// Writes `value` as pretty JSON and a newline into `path`.
pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SimError> {
    let io = |cause| SimError::Output { path: path.to_path_buf(), cause };
    let mut f = std::fs::File::create(path).map_err(io)?;
    serde_json::to_writer_pretty(&mut f, value).map_err(|e| io(std::io::Error::other(e)))?;
    f.write_all(b"\n").map_err(io)
}
