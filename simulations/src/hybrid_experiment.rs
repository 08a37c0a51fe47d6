//! `fedge-sim hybrid`: the hybrid-inference experiment in one command. Train a teacher
//! federated, distil the int8 student, calibrate the escalation threshold on held-out images,
//! and measure on the rest: local only, cloud only (the teacher), and the cascade at several
//! target escalation rates, with the student's single-image latency.
//!
//! The test split is cut in two, alternately (even images calibrate the thresholds, odd images
//! evaluate; MNIST's test split is not shuffled: its first half is the harder one), so the
//! escalation rate reported is on images the threshold never saw, from the same distribution.
//! With prices (`--cost-per-cloud-call`, `--cost-per-device-ms`), each policy's cost per 1,000
//! requests and its saving against cloud-only ([`fedge_core::inference_cost`]), the local model
//! charged its mean measured latency.
//!
//! With `--prune S,...`, smaller students too: for each sparsity, the student pruned by
//! magnitude ([`fedge_core::prune`]) in three steps (a third of the sparsity, two thirds, all
//! of it), each followed by a third of the configured distillation epochs from the teacher with
//! the pruned weights held at zero after every step, then quantised and sent sparse
//! ([`QuantizedModel::into_sparse`]); each measured as the dense one is, thresholds calibrated
//! anew for it.
//!
//! With `--medium-model KIND`, three tiers as well ([`fedge_core::escalation::tiers`]): a
//! medium model distilled from the teacher like the student (int8, for a regional edge
//! server) answers what the device escalates, and sends on to the teacher only what it is
//! unsure of too, each tier calibrated to its own rate; beside the two-tier cascade at the same
//! device rate, with the mean latency of a request from each model's measured compute time and
//! the stated round trips.

use std::time::Instant;

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::dataset::Dataset;
use fedge_core::escalation::tiers::{TierLatency, TierObservation, TierRow, tier_table};
use fedge_core::escalation::{CLOUD_ONLY, ConfidenceMeasure, Observation, PolicyRow, policy_table};
use fedge_core::inference_cost::{CostModel, cost_table};
use fedge_core::quant::QuantizedModel;
use fedge_core::rng::{derive_rng, stream};
use fedge_learn::{ModelKind, Predictor, Trainer};
use rand::RngExt;
use serde::Serialize;

use crate::config::{SimConfig, SimConfigError};
use crate::run::{Observer, SimError};

/// One row of the table: a policy's accuracy and escalation rate, with the local model's
/// latency and size.
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
    /// Bytes of the student as it travels (the encoded int8 model; sparse when pruned).
    pub student_bytes: usize,
    /// Share of the student's weights that are zero, for a pruned student (absent for the
    /// distilled one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Cost of 1,000 requests and saving against cloud-only, when prices were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_1000: Option<f64>,
    /// `1 - cost / cloud-only's cost` (absent when cloud calls are free or no prices were given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saving: Option<f64>,
}

/// What the experiment measures besides the policies.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// The cascade's target escalation rates.
    pub rates: &'a [f64],
    /// How the student's confidence is scored.
    pub measure: ConfidenceMeasure,
    /// Prices, for the cost columns.
    pub cost: Option<&'a CostModel>,
    /// Sparsities of the pruned students to measure besides the distilled one.
    pub prune: &'a [f64],
    /// Three tiers, when asked for.
    pub tiers: Option<TierOptions>,
}

/// The three-tier comparison's settings.
#[derive(Debug, Clone, Copy)]
pub struct TierOptions {
    /// The regional server's model, distilled from the teacher like the student.
    pub medium: ModelKind,
    /// Share of the region's requests it sends on to the root.
    pub region_rate: f64,
    /// Device <-> region round trip, milliseconds.
    pub region_rtt_ms: f64,
    /// Region <-> root (and device <-> root) round trip, milliseconds.
    pub root_rtt_ms: f64,
}

impl TierOptions {
    fn validate(&self) -> Result<(), String> {
        self.medium.images_only()?;
        if !(0.0..=1.0).contains(&self.region_rate) {
            return Err(format!("region rate must be in [0, 1], got {}", self.region_rate));
        }
        for (what, v) in [("region round trip", self.region_rtt_ms), ("root round trip", self.root_rtt_ms)] {
            if !(v.is_finite() && (0.0..=3.6e6).contains(&v)) {
                return Err(format!("{what} must be 0 to 3600000 ms, got {v}"));
            }
        }
        Ok(())
    }
}

/// What the experiment measured: the policy rows, and the three tiers when asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Local-only, cloud-only and the cascades (then the pruned students').
    pub policies: Vec<HybridRow>,
    /// The three-tier comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Tiers>,
}

/// The three-tier comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Tiers {
    /// The regional model.
    pub medium: ModelKind,
    /// Its bytes as it travels (int8).
    pub medium_bytes: usize,
    /// Its accuracy alone on the evaluation images.
    pub medium_accuracy: f64,
    /// The latencies the mean latency is made of.
    pub latency: TierLatency,
    /// One row per device rate.
    pub rows: Vec<TierRow>,
}

/// Runs the experiment: `config` trains the teacher (distillation is switched on after its
/// last round if the config does not ask for it). Rows: the distilled student's policies
/// (local-only, cloud-only, the cascade at each rate), then each pruned student's (without
/// cloud-only, which does not depend on the student).
pub fn run(config: &SimConfig, options: Options<'_>, obs: &mut dyn Observer) -> Result<Report, SimError> {
    for &s in options.prune {
        if !(0.0..1.0).contains(&s) {
            return Err(SimConfigError::Invalid(format!("prune sparsity must be in [0, 1), got {s}")).into());
        }
    }
    if let Some(t) = &options.tiers {
        t.validate().map_err(SimConfigError::Invalid)?;
    }
    let mut c = config.clone();
    c.distill_every = c.distill_every.or(Some(c.rounds));
    let out = crate::run(&c, None, obs)?;
    let student_params = out.student.as_ref().expect("distillation was on");
    let data = crate::run::load_data(&c)?;
    let test = &data.test;
    let predictor = |kind, params: &ModelParams| {
        Predictor::new(kind, params, c.backend)
            .map_err(|e| SimError::Eval(fedge_learn::ConvertError::Layout(e.to_string())))
    };
    let teacher = predictor(c.model, &out.global)?;
    // The teacher's answers on the evaluation half, once for every student, and its latency.
    let started = Instant::now();
    let cloud: Vec<usize> =
        (1..test.len()).step_by(2).map(|i| teacher.predict(test.image(i), test.rows, test.cols).class).collect();
    let teacher_ms = started.elapsed().as_secs_f64() * 1e3 / cloud.len().max(1) as f64;
    let dense = QuantizedModel::quantize(student_params);
    let measured = Measured { test, cloud: &cloud, options: &options };
    let student = predictor(c.student_model, student_params)?;
    let mut rows = measured.rows(&student, codec::encode_value(&dense).len(), None)?;
    if options.prune.is_empty() && options.tiers.is_none() {
        return Ok(Report { policies: rows, tiers: None });
    }
    // Pruning's fine-tuning and the medium model's distillation: the teacher's logits on the
    // run's proxy images, computed once.
    let proxy = crate::run::proxy_indices(&c, data.train.len());
    let mut teacher_trainer = Trainer::new(c.model, data.train.num_classes, c.backend)?;
    let logits = teacher_trainer.logits(&out.global, &data.train, &proxy)?;
    let tiers = match options.tiers {
        Some(t) => {
            let mut medium = Trainer::new(t.medium, data.train.num_classes, c.backend)?;
            let start = medium.initial_params(derive_rng(c.seed, &[stream::INIT, 200]).random());
            let mut rng = derive_rng(c.seed, &[stream::DISTILL, 200]);
            let params = medium.distill(&start, &data.train, &proxy, &logits, &c.distill, &mut rng)?.params;
            let int8 = QuantizedModel::quantize(&params);
            let deq = int8.dequantize().map_err(|e| SimConfigError::Invalid(e.to_string()))?;
            obs.line(&format!("medium model ({}) distilled for the regional tier", t.medium));
            let student_ms = rows.first().map_or(0.0, |r| r.local_mean_ms);
            Some(measured.tiers(
                &student,
                &predictor(t.medium, &deq)?,
                codec::encode_value(&int8).len(),
                &t,
                student_ms,
                teacher_ms,
            )?)
        }
        None => None,
    };
    if options.prune.is_empty() {
        return Ok(Report { policies: rows, tiers });
    }
    let mut student = Trainer::new(c.student_model, data.train.num_classes, c.backend)?;
    for (k, &sparsity) in options.prune.iter().enumerate() {
        let mut rng = derive_rng(c.seed, &[stream::DISTILL, 100 + k as u64]);
        let (params, mask) =
            student.prune_distilled(student_params, &data.train, &proxy, &logits, &c.distill, sparsity, &mut rng)?;
        let sparse = QuantizedModel::quantize(&params).into_sparse();
        let int8 = sparse.dequantize().map_err(|e| SimConfigError::Invalid(e.to_string()))?;
        let measured_sparsity = mask.sparsity();
        obs.line(&format!("pruned student at {:.0}% sparsity ready", measured_sparsity * 100.0));
        let pruned = measured.rows(
            &predictor(c.student_model, &int8)?,
            codec::encode_value(&sparse).len(),
            Some(measured_sparsity),
        )?;
        rows.extend(pruned.into_iter().filter(|r| r.row.policy != CLOUD_ONLY));
    }
    Ok(Report { policies: rows, tiers })
}

/// What every student is measured against: the test split, the teacher's answers on its odd
/// images, the rates and prices.
struct Measured<'a> {
    test: &'a Dataset,
    cloud: &'a [usize],
    options: &'a Options<'a>,
}

impl Measured<'_> {
    /// Three tiers with `student` on the device and `medium` at the region (calibrated on the
    /// even test images, measured on the odd ones), and the medium model's latency.
    fn tiers(
        &self,
        student: &Predictor,
        medium: &Predictor,
        medium_bytes: usize,
        t: &TierOptions,
        student_ms: f64,
        teacher_ms: f64,
    ) -> Result<Tiers, SimError> {
        let test = self.test;
        let measure = self.options.measure;
        let (mut cal, mut eval) = (Vec::new(), Vec::new());
        let (mut medium_time, mut medium_right) = (0.0f64, 0usize);
        for i in 0..test.len() {
            let s = student.predict(test.image(i), test.rows, test.cols);
            let started = Instant::now();
            let m = medium.predict(test.image(i), test.rows, test.cols);
            let (ds, ms) = (measure.score(&s.probabilities), measure.score(&m.probabilities));
            if i % 2 == 0 {
                cal.push((ds, ms));
            } else {
                medium_time += started.elapsed().as_secs_f64() * 1e3;
                let label = test.labels[i] as usize;
                medium_right += usize::from(m.class == label);
                eval.push(TierObservation {
                    device_score: ds,
                    device: s.class,
                    region_score: ms,
                    region: m.class,
                    root: self.cloud[i / 2],
                    label,
                });
            }
        }
        let n = eval.len().max(1) as f64;
        let latency = TierLatency {
            device_ms: student_ms,
            region_ms: medium_time / n,
            root_ms: teacher_ms,
            region_rtt_ms: t.region_rtt_ms,
            root_rtt_ms: t.root_rtt_ms,
        };
        let rows = tier_table(&cal, &eval, self.options.rates, t.region_rate, &latency)
            .map_err(|e| SimConfigError::Invalid(e.to_string()))?;
        Ok(Tiers { medium: t.medium, medium_bytes, medium_accuracy: medium_right as f64 / n, latency, rows })
    }

    /// The policy rows of one student (calibrated on the even test images, measured on the
    /// odd ones), with its latency, size and cost.
    fn rows(
        &self,
        student: &Predictor,
        student_bytes: usize,
        sparsity: Option<f64>,
    ) -> Result<Vec<HybridRow>, SimError> {
        let test = self.test;
        let half = test.len().div_ceil(2);
        let (mut cal_scores, mut eval) = (Vec::with_capacity(half), Vec::with_capacity(half));
        let mut latencies = Vec::with_capacity(half);
        for i in 0..test.len() {
            let started = Instant::now();
            let local = student.predict(test.image(i), test.rows, test.cols);
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            let score = self.options.measure.score(&local.probabilities);
            if i % 2 == 0 {
                cal_scores.push(score);
            } else {
                latencies.push(elapsed);
                let cloud = self.cloud[i / 2];
                eval.push(Observation { score, local: local.class, cloud, label: test.labels[i] as usize });
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        let (p50, p99) = (pct(0.5), pct(0.99));
        let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
        let table =
            policy_table(&cal_scores, &eval, self.options.rates).map_err(|e| SimConfigError::Invalid(e.to_string()))?;
        let costs = self.options.cost.map(|m| cost_table(m, &table, mean));
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
                    student_bytes,
                    sparsity,
                    cost_per_1000: priced.map(|c| c.cost_per_1000),
                    saving: priced.and_then(|c| c.saving),
                }
            })
            .collect())
    }
}

/// The pruned students' rows as a text table: one line per student, its local-only accuracy
/// and each cascade rate's accuracy and measured escalation.
pub fn format_pruned(rows: &[HybridRow], dense_bytes: usize) -> String {
    let mut out = String::new();
    let mut students: Vec<f64> = rows.iter().filter_map(|r| r.sparsity).collect();
    students.dedup();
    if students.is_empty() {
        return out;
    }
    out += &format!(
        "{:>8} {:>9} {:>8} {:>9}  cascade (target: accuracy, escalated)\n",
        "sparsity", "bytes", "vs dense", "local"
    );
    for s in students {
        let mine: Vec<&HybridRow> = rows.iter().filter(|r| r.sparsity == Some(s)).collect();
        let Some(local) = mine.iter().find(|r| r.row.policy == "local-only") else { continue };
        let cascades: Vec<String> = mine
            .iter()
            .filter(|r| r.row.policy == "cascade")
            .map(|r| {
                format!(
                    "{:.0}%: {:.2}%, {:.1}%",
                    r.row.target_rate * 100.0,
                    r.row.accuracy * 100.0,
                    r.row.escalation_rate * 100.0
                )
            })
            .collect();
        out += &format!(
            "{:>7.1}% {:>9} {:>7.2}x {:>8.2}%  {}\n",
            s * 100.0,
            local.student_bytes,
            dense_bytes as f64 / local.student_bytes as f64,
            local.row.accuracy * 100.0,
            cascades.join("; ")
        );
    }
    out
}
