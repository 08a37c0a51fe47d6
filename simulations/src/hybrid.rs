//! `fedge-sim hybrid`: the hybrid-inference experiment in one command. Train a teacher
//! federated, distil the int8 student devices run, calibrate the escalation threshold on
//! held-out images, and measure on the rest: local only, cloud only (the teacher), and the
//! cascade at several target escalation rates, with the student's single-image latency.
//!
//! The test split is cut in two, alternately (even images calibrate the thresholds, odd images
//! evaluate; MNIST's test split is not shuffled: its first half is the harder one), so the
//! escalation rate reported is on images the threshold never saw, from the same distribution.

use std::time::Instant;

use fedge_core::hybrid::{ConfidenceMeasure, calibrate_threshold, escalates};
use fedge_learn::Predictor;
use serde::Serialize;

use crate::config::SimConfig;
use crate::run::{Observer, SimError};

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct HybridRow {
    /// `local-only`, `cloud-only` or `cascade`.
    pub policy: String,
    /// Escalation rate the threshold was calibrated for.
    pub target_rate: f64,
    /// Escalation rate measured on the evaluation half.
    pub escalation_rate: f64,
    /// Accuracy of the answers given.
    pub accuracy: f64,
    /// Share of requests answered without the cloud.
    pub cloud_calls_saved: f64,
    /// The calibrated threshold (cascade only).
    pub threshold: Option<f32>,
    /// Median single-image latency of the local (student) model, milliseconds.
    pub local_p50_ms: f64,
    /// 99th percentile of the same.
    pub local_p99_ms: f64,
}

/// Runs the experiment: `config` trains the teacher (distillation is switched on after its
/// last round if the config does not ask for it), `rates` are the cascade's target rates.
pub fn run(
    config: &SimConfig,
    rates: &[f64],
    measure: ConfidenceMeasure,
    obs: &mut dyn Observer,
) -> Result<Vec<HybridRow>, SimError> {
    let mut c = config.clone();
    c.distill_every = c.distill_every.or(Some(c.rounds));
    let out = crate::run(&c, None, obs)?;
    let student_params = out.student.as_ref().expect("distillation was on");
    let data = c.dataset.load(&c.data_dir)?;
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
            eval.push((score, local.class, cloud, test.labels[i] as usize));
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let (p50, p99) = (pct(0.5), pct(0.99));
    let n = eval.len() as f64;
    let row = |policy: &str, target: f64, threshold: Option<f32>, escalate: &dyn Fn(f32) -> bool| {
        let (mut correct, mut escalated) = (0usize, 0usize);
        for &(score, local, cloud, label) in &eval {
            let answer = if escalate(score) {
                escalated += 1;
                cloud
            } else {
                local
            };
            correct += usize::from(answer == label);
        }
        HybridRow {
            policy: policy.into(),
            target_rate: target,
            escalation_rate: escalated as f64 / n,
            accuracy: correct as f64 / n,
            cloud_calls_saved: 1.0 - escalated as f64 / n,
            threshold,
            local_p50_ms: p50,
            local_p99_ms: p99,
        }
    };
    let mut rows = vec![row("local-only", 0.0, None, &|_| false), row("cloud-only", 1.0, None, &|_| true)];
    for &rate in rates {
        let t =
            calibrate_threshold(&cal_scores, rate).map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;
        rows.push(row("cascade", rate, Some(t), &|s| escalates(s, t)));
    }
    Ok(rows)
}
