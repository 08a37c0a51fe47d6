//! Hybrid inference decisions, as plain maths: how sure a local answer is, where the
//! escalation threshold sits for a target escalation rate, and what each policy does with an
//! answer. The edge client and the simulator drive this; nothing here runs a model or a socket.
//! [`tiers`]: the three-tier cascade (device -> region -> root).

pub mod tiers;

use thiserror::Error;

/// How confidence is read from a probability vector (higher = surer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfidenceMeasure {
    /// The largest probability.
    #[default]
    MaxSoftmax,
    /// Largest minus second largest.
    Margin,
    /// One minus the entropy, normalised by its maximum ln(K).
    Entropy,
}

impl ConfidenceMeasure {
    /// The confidence of `probabilities` (which sum to 1).
    pub fn score(self, probabilities: &[f32]) -> f32 {
        match self {
            Self::MaxSoftmax => probabilities.iter().copied().fold(0.0, f32::max),
            Self::Margin => {
                let (mut a, mut b) = (0.0f32, 0.0f32);
                for &p in probabilities {
                    if p > a {
                        b = a;
                        a = p;
                    } else if p > b {
                        b = p;
                    }
                }
                a - b
            }
            Self::Entropy => {
                let k = probabilities.len().max(2) as f32;
                let h: f32 = probabilities.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
                1.0 - h / k.ln()
            }
        }
    }
}

/// A threshold that cannot be calibrated.
#[derive(Debug, Error, PartialEq)]
pub enum CalibrationError {
    /// No held-out scores.
    #[error("no held-out examples to calibrate on")]
    Empty,
    /// The target rate is not in [0, 1].
    #[error("target escalation rate must be in [0, 1], got {0}")]
    Rate(f64),
}

/// The threshold below which a fraction `target_rate` of `scores` falls: answers with a lower
/// confidence escalate. Ties at the threshold stay local, so the realised rate never exceeds
/// the target on the calibration set.
pub fn calibrate_threshold(scores: &[f32], target_rate: f64) -> Result<f32, CalibrationError> {
    if !(0.0..=1.0).contains(&target_rate) {
        return Err(CalibrationError::Rate(target_rate));
    }
    if scores.is_empty() {
        return Err(CalibrationError::Empty);
    }
    let mut s: Vec<f32> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return Err(CalibrationError::Empty);
    }
    s.sort_by(f32::total_cmp);
    let k = (target_rate * s.len() as f64).floor() as usize;
    Ok(if k == 0 {
        f32::NEG_INFINITY
    } else if k >= s.len() {
        f32::INFINITY
    } else {
        s[k]
    })
}

/// Whether an answer with confidence `score` escalates at `threshold`.
pub fn escalates(score: f32, threshold: f32) -> bool {
    score < threshold
}

/// Where answers come from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum Policy {
    /// Always the local model.
    LocalOnly,
    /// Local, but ask the cloud when the local confidence is below the threshold.
    Cascade {
        /// The escalation threshold.
        threshold: f32,
    },
    /// Answer locally at once; when unsure, also ask the cloud and correct the answer if the
    /// cloud's differs.
    Speculative {
        /// The escalation threshold.
        threshold: f32,
    },
    /// The cloud, with the local model when the cloud cannot be reached.
    CloudFirst,
}

/// A policy by name, before its threshold is calibrated (`local-only`, `cascade`,
/// `speculative`, `cloud-first`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// See [`Policy::LocalOnly`].
    LocalOnly,
    /// See [`Policy::Cascade`].
    #[default]
    Cascade,
    /// See [`Policy::Speculative`].
    Speculative,
    /// See [`Policy::CloudFirst`].
    CloudFirst,
}

impl PolicyKind {
    /// The policy with escalation `threshold` (ignored by the policies without one).
    pub fn with_threshold(self, threshold: f32) -> Policy {
        match self {
            Self::LocalOnly => Policy::LocalOnly,
            Self::Cascade => Policy::Cascade { threshold },
            Self::Speculative => Policy::Speculative { threshold },
            Self::CloudFirst => Policy::CloudFirst,
        }
    }

    /// Whether answers need the local confidence (every policy but cloud-first).
    pub fn needs_local(self) -> bool {
        self != Self::CloudFirst
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LocalOnly => "local-only",
            Self::Cascade => "cascade",
            Self::Speculative => "speculative",
            Self::CloudFirst => "cloud-first",
        })
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local-only" => Ok(Self::LocalOnly),
            "cascade" => Ok(Self::Cascade),
            "speculative" => Ok(Self::Speculative),
            "cloud-first" => Ok(Self::CloudFirst),
            _ => Err(format!("unknown policy {s:?}: local-only, cascade, speculative or cloud-first")),
        }
    }
}

impl std::str::FromStr for ConfidenceMeasure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max-softmax" => Ok(Self::MaxSoftmax),
            "margin" => Ok(Self::Margin),
            "entropy" => Ok(Self::Entropy),
            _ => Err(format!("unknown confidence measure {s:?}: max-softmax, margin or entropy")),
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Answer with the local model only.
    Local,
    /// Wait for the cloud's answer (local if it fails).
    Cloud,
    /// Answer locally now and ask the cloud for a correction.
    LocalThenCloud,
}

impl Policy {
    /// The route of a request whose local confidence is `score` (`None`: not computed, as
    /// for cloud-first), given whether the coordinator is reachable and whether the request is
    /// private (its input must never leave the device).
    pub fn route(&self, score: Option<f32>, online: bool, private: bool) -> Route {
        if private || !online {
            return Route::Local;
        }
        let unsure = |t: f32| score.is_some_and(|s| escalates(s, t));
        match *self {
            Self::LocalOnly => Route::Local,
            Self::Cascade { threshold } if unsure(threshold) => Route::Cloud,
            Self::Speculative { threshold } if unsure(threshold) => Route::LocalThenCloud,
            Self::Cascade { .. } | Self::Speculative { .. } => Route::Local,
            Self::CloudFirst => Route::Cloud,
        }
    }
}

/// One request of an offline evaluation: the local confidence score, both models' classes
/// and the true label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Local confidence under the measure calibrated on.
    pub score: f32,
    /// The local model's class.
    pub local: usize,
    /// The cloud model's class.
    pub cloud: usize,
    /// The true class.
    pub label: usize,
}

/// One line of a policy comparison.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyRow {
    /// `local-only`, `cloud-only` or `cascade`.
    pub policy: String,
    /// Escalation rate the threshold was calibrated for.
    pub target_rate: f64,
    /// Escalation rate measured on the evaluation images.
    pub escalation_rate: f64,
    /// Accuracy of the answers given.
    pub accuracy: f64,
    /// Share of requests answered without the cloud (against cloud-only).
    pub cloud_calls_saved: f64,
    /// The calibrated threshold (cascade only).
    pub threshold: Option<f32>,
}

/// The [`PolicyRow::policy`] of the baseline that sends every request to the cloud and runs
/// nothing on the device.
pub const CLOUD_ONLY: &str = "cloud-only";

/// Local-only, cloud-only, and the cascade calibrated on `calibration` scores for each of
/// `rates`, measured on `eval` (which the calibration must not include).
pub fn policy_table(
    calibration: &[f32],
    eval: &[Observation],
    rates: &[f64],
) -> Result<Vec<PolicyRow>, CalibrationError> {
    if eval.is_empty() {
        return Err(CalibrationError::Empty);
    }
    let n = eval.len() as f64;
    let row = |policy: &str, target: f64, threshold: Option<f32>, escalate: &dyn Fn(f32) -> bool| {
        let (mut correct, mut escalated) = (0usize, 0usize);
        for o in eval {
            let answer = if escalate(o.score) {
                escalated += 1;
                o.cloud
            } else {
                o.local
            };
            correct += usize::from(answer == o.label);
        }
        PolicyRow {
            policy: policy.into(),
            target_rate: target,
            escalation_rate: escalated as f64 / n,
            accuracy: correct as f64 / n,
            cloud_calls_saved: 1.0 - escalated as f64 / n,
            threshold,
        }
    };
    let mut rows = vec![row("local-only", 0.0, None, &|_| false), row(CLOUD_ONLY, 1.0, None, &|_| true)];
    for &rate in rates {
        let t = calibrate_threshold(calibration, rate)?;
        rows.push(row("cascade", rate, Some(t), &|s| escalates(s, t)));
    }
    Ok(rows)
}

/// `rows` as a text table.
pub fn format_table(rows: &[PolicyRow]) -> String {
    let mut out = format!(
        "{:<11} {:>7} {:>10} {:>9} {:>11} {:>9}\n",
        "policy", "target", "escalated", "accuracy", "cloud saved", "threshold"
    );
    for r in rows {
        out += &format!(
            "{:<11} {:>6.0}% {:>9.1}% {:>8.2}% {:>10.1}% {:>9}\n",
            r.policy,
            r.target_rate * 100.0,
            r.escalation_rate * 100.0,
            r.accuracy * 100.0,
            r.cloud_calls_saved * 100.0,
            r.threshold.map_or("-".into(), |t| format!("{t:.4}"))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;
    use rand::RngExt;

    #[test]
    fn measures_rank_sure_above_unsure() {
        let sure = [0.97, 0.01, 0.01, 0.01];
        let unsure = [0.4, 0.35, 0.15, 0.1];
        for m in [ConfidenceMeasure::MaxSoftmax, ConfidenceMeasure::Margin, ConfidenceMeasure::Entropy] {
            assert!(m.score(&sure) > m.score(&unsure), "{m:?}");
        }
        assert!((ConfidenceMeasure::Margin.score(&unsure) - 0.05).abs() < 1e-6);
        assert!(ConfidenceMeasure::Entropy.score(&[0.25; 4]).abs() < 1e-6, "uniform = no confidence");
        assert!((ConfidenceMeasure::Entropy.score(&[1.0, 0.0]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn calibrated_thresholds_hit_the_target_rate_on_fresh_data() {
        let mut rng = derive_rng(3, &[]);
        let draw =
            |rng: &mut crate::rng::SeededRng| (0..20_000).map(|_| rng.random::<f32>().powi(3)).collect::<Vec<_>>();
        let (held_out, fresh) = (draw(&mut rng), draw(&mut rng));
        for target in [0.05, 0.1, 0.2, 0.5] {
            let t = calibrate_threshold(&held_out, target).unwrap();
            let on_calibration = held_out.iter().filter(|&&s| escalates(s, t)).count() as f64 / 20_000.0;
            assert!(on_calibration <= target + 1e-9 && on_calibration > target - 0.001, "{on_calibration}");
            let rate = fresh.iter().filter(|&&s| escalates(s, t)).count() as f64 / 20_000.0;
            assert!((rate - target).abs() < 0.01, "target {target}: {rate}");
        }
        assert_eq!(calibrate_threshold(&held_out, 0.0).unwrap(), f32::NEG_INFINITY);
        assert_eq!(calibrate_threshold(&held_out, 1.0).unwrap(), f32::INFINITY);
        assert_eq!(calibrate_threshold(&[], 0.1), Err(CalibrationError::Empty));
        assert_eq!(calibrate_threshold(&held_out, 1.5), Err(CalibrationError::Rate(1.5)));
    }

    #[test]
    fn the_table_counts_what_each_policy_answers() {
        let o = |score, local, cloud, label| Observation { score, local, cloud, label };
        // Unsure answers are the wrong ones; the cloud is right but for the last image.
        let eval = [o(0.9, 1, 1, 1), o(0.8, 2, 2, 2), o(0.3, 0, 3, 3), o(0.2, 0, 4, 5)];
        let rows = policy_table(&[0.1, 0.5, 0.6, 0.7], &eval, &[0.5]).unwrap();
        assert_eq!(rows[0].accuracy, 0.5, "local-only");
        assert_eq!(rows[1].accuracy, 0.75, "cloud-only");
        let c = &rows[2];
        assert_eq!((c.threshold, c.escalation_rate, c.accuracy, c.cloud_calls_saved), (Some(0.6), 0.5, 0.75, 0.5));
        assert!(format_table(&rows).lines().count() == 4);
        assert_eq!(policy_table(&[0.5], &[], &[0.1]), Err(CalibrationError::Empty));
    }

    #[test]
    fn policy_names_round_trip() {
        for k in [PolicyKind::LocalOnly, PolicyKind::Cascade, PolicyKind::Speculative, PolicyKind::CloudFirst] {
            assert_eq!(k.to_string().parse::<PolicyKind>().unwrap(), k);
        }
        assert!("cloudy".parse::<PolicyKind>().unwrap_err().contains("cascade"));
        assert_eq!("margin".parse::<ConfidenceMeasure>().unwrap(), ConfidenceMeasure::Margin);
        assert_eq!(PolicyKind::Cascade.with_threshold(0.5), Policy::Cascade { threshold: 0.5 });
    }

    #[test]
    fn policies_route_and_private_or_offline_stays_local() {
        let c = Policy::Cascade { threshold: 0.8 };
        let s = Policy::Speculative { threshold: 0.8 };
        assert_eq!(c.route(Some(0.5), true, false), Route::Cloud);
        assert_eq!(c.route(Some(0.9), true, false), Route::Local);
        assert_eq!(s.route(Some(0.5), true, false), Route::LocalThenCloud);
        assert_eq!(Policy::CloudFirst.route(None, true, false), Route::Cloud);
        assert_eq!(Policy::LocalOnly.route(Some(0.1), true, false), Route::Local);
        for p in [c, s, Policy::CloudFirst, Policy::LocalOnly] {
            assert_eq!(p.route(Some(0.1), true, true), Route::Local, "private: {p:?}");
            assert_eq!(p.route(Some(0.1), false, false), Route::Local, "offline: {p:?}");
        }
    }
}
