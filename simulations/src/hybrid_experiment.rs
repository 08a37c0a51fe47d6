//! `fedge-sim hybrid`: the hybrid-inference experiment in one command. Train a teacher
//! federated, distil the int8 student devices run, calibrate the escalation threshold on
//! held-out images, and measure on the rest: local only, cloud only (the teacher), and the
//! cascade at several target escalation rates, with the student's single-image latency.
//!
//! The test split is cut in two, alternately (even images calibrate the thresholds, odd images
//! evaluate; MNIST's test split is not shuffled: its first half is the harder one), so the
//! escalation rate reported is on images the threshold never saw, from the same distribution.
//! With prices (`--cost-per-cloud-call`, `--cost-per-device-ms`), each policy's cost per 1,000
//! requests and its saving against cloud-only ([`fedge_core::inference_cost`]), the local model
//! charged its mean measured latency.

use std::time::Instant;

use fedge_core::escalation::{ConfidenceMeasure, Observation, PolicyRow, policy_table};
use fedge_core::inference_cost::{CostModel, cost_table};
use fedge_learn::Predictor;
use serde::Serialize;

use crate::config::SimConfig;
use crate::run::{Observer, SimError};

/// One row of the table: a policy's accuracy and escalation rate, with the local model's
/// latency.
#[derive(Debug, Clone, Serialize)]
pub struct HybridRow {
    /// The policy's line.
    #[serde(flatten)]
    pub row: PolicyRow,
    /// Median single-image latency of the local (student) model, milliseconds.
    pub local_p50_ms: f64,
    /// 99th percentile of the same.
    pub local_p99_ms: f64,
    /// Mean of the same (what the cost model charges a request).
    pub local_mean_ms: f64,
    /// Cost of 1,000 requests and saving against cloud-only, when prices were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_1000: Option<f64>,
    /// `1 - cost / cloud-only's cost` (absent when cloud calls are free or no prices were given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saving: Option<f64>,
}

/// Runs the experiment: `config` trains the teacher (distillation is switched on after its
/// last round if the config does not ask for it), `rates` are the cascade's target rates;
/// `cost` prices each policy when given.
pub fn run(
    config: &SimConfig,
    rates: &[f64],
    measure: ConfidenceMeasure,
    cost: Option<&CostModel>,
    obs: &mut dyn Observer,
) -> Result<Vec<HybridRow>, SimError> {
    let mut c = config.clone();
    c.distill_every = c.distill_every.or(Some(c.rounds));
    let out = crate::run(&c, None, obs)?;
    let student_params = out.student.as_ref().expect("distillation was on");
    let data = crate::run::load_data(&c)?;
    let test = &data.test;
    let predictor = |kind, params| {
        Predictor::new(kind, params, c.backend)
            .map_err(|e| SimError::Eval(fedge_learn::ConvertError::Layout(e.to_string())))
    };
    let teacher = predictor(c.model, &out.global)?;
    let student = predictor(c.student_model, student_params)?;
    let half = test.len().div_ceil(2);
    let (mut cal_scores, mut eval) = (Vec::with_capacity(half), Vec::with_capacity(half));
    let mut latencies = Vec::with_capacity(half);
    for i in 0..test.len() {
        let started = Instant::now();
        let local = student.predict(test.image(i), test.rows, test.cols);
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        let score = measure.score(&local.probabilities);
        if i % 2 == 0 {
            cal_scores.push(score);
        } else {
            latencies.push(elapsed);
            let cloud = teacher.predict(test.image(i), test.rows, test.cols).class;
            eval.push(Observation { score, local: local.class, cloud, label: test.labels[i] as usize });
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let (p50, p99) = (pct(0.5), pct(0.99));
    let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
    let table =
        policy_table(&cal_scores, &eval, rates).map_err(|e| crate::config::SimConfigError::Invalid(e.to_string()))?;
    let costs = cost.map(|m| cost_table(m, &table, mean));
    Ok(table
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let priced = costs.as_ref().map(|c| &c[i]);
            HybridRow {
                row,
                local_p50_ms: p50,
                local_p99_ms: p99,
                local_mean_ms: mean,
                cost_per_1000: priced.map(|c| c.cost_per_1000),
                saving: priced.and_then(|c| c.saving),
            }
        })
        .collect())
}
