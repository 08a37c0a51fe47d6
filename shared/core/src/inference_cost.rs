//! What a hybrid-inference policy costs an operator: a price per cloud call (the teacher's
//! compute, egress) and a price per millisecond of device compute (energy, the device's time),
//! applied to a policy's measured escalation rate and the local model's measured latency. The
//! table it makes ([`cost_table`]) is the one an operator picks a policy from: cost per 1,000
//! requests and the saving against sending every request to the cloud, beside accuracy.
//!
//! Cost of 1,000 requests under a policy that escalates a share `e` of them, the local model
//! taking `ms` milliseconds a request: `1000 * (ms * per_device_ms + e * per_cloud_call)`;
//! cloud-only runs nothing on the device: `1000 * per_cloud_call`. Pure arithmetic: the prices
//! are the operator's, the rates and latencies come from a measurement (`fedge-sim hybrid`).

use serde::Serialize;
use thiserror::Error;

use crate::escalation::{CLOUD_ONLY, PolicyRow};

/// Prices, in any one currency unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    per_cloud_call: f64,
    per_device_ms: f64,
}

/// A price that is not a finite number >= 0.
#[derive(Debug, Error, PartialEq)]
#[error("{what} must be a finite number >= 0, got {value}")]
pub struct CostError {
    /// Which price.
    pub what: &'static str,
    /// What was given.
    pub value: f64,
}

/// One policy's line of the cost table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostRow {
    /// The policy (see [`PolicyRow::policy`]).
    pub policy: String,
    /// Escalation rate the policy was calibrated for.
    pub target_rate: f64,
    /// Accuracy of its answers.
    pub accuracy: f64,
    /// Share of requests it sent to the cloud.
    pub escalation_rate: f64,
    /// Cost of 1,000 requests.
    pub cost_per_1000: f64,
    /// `1 - cost / cloud-only's cost`; `None` when cloud-only costs nothing.
    pub saving: Option<f64>,
}

impl CostModel {
    /// Prices per cloud call and per millisecond of device compute.
    pub fn new(per_cloud_call: f64, per_device_ms: f64) -> Result<Self, CostError> {
        for (what, value) in [("the cost per cloud call", per_cloud_call), ("the cost per device ms", per_device_ms)] {
            if !value.is_finite() || value < 0.0 {
                return Err(CostError { what, value });
            }
        }
        Ok(Self { per_cloud_call, per_device_ms })
    }

    /// Cost of 1,000 requests answered as `row` measured, the local model taking `device_ms`
    /// a request (not run under cloud-only).
    pub fn per_thousand(&self, row: &PolicyRow, device_ms: f64) -> f64 {
        let local = if row.policy == CLOUD_ONLY { 0.0 } else { device_ms * self.per_device_ms };
        1000.0 * (local + row.escalation_rate * self.per_cloud_call)
    }
}

/// Every row of `rows` priced by `model`, the local model taking `device_ms` a request, with
/// its saving against the cloud-only row (cost 1,000 cloud calls when `rows` has none).
pub fn cost_table(model: &CostModel, rows: &[PolicyRow], device_ms: f64) -> Vec<CostRow> {
    let cloud = 1000.0 * model.per_cloud_call;
    rows.iter()
        .map(|r| {
            let cost = model.per_thousand(r, device_ms);
            CostRow {
                policy: r.policy.clone(),
                target_rate: r.target_rate,
                accuracy: r.accuracy,
                escalation_rate: r.escalation_rate,
                cost_per_1000: cost,
                saving: (cloud > 0.0).then(|| 1.0 - cost / cloud),
            }
        })
        .collect()
}

/// `rows` as a text table.
pub fn format_cost_table(rows: &[CostRow]) -> String {
    let mut out = format!(
        "{:<11} {:>7} {:>9} {:>10} {:>14} {:>20}\n",
        "policy", "target", "accuracy", "escalated", "cost per 1000", "saving vs cloud-only"
    );
    for r in rows {
        out += &format!(
            "{:<11} {:>6.0}% {:>8.2}% {:>9.1}% {:>14} {:>20}\n",
            r.policy,
            r.target_rate * 100.0,
            r.accuracy * 100.0,
            r.escalation_rate * 100.0,
            significant(r.cost_per_1000),
            r.saving.map_or("-".into(), |s| format!("{:.1}%", s * 100.0))
        );
    }
    out
}

/// `v` with four significant digits in plain notation (prices span many decades).
fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (3 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, escalation_rate: f64) -> PolicyRow {
        PolicyRow {
            policy: policy.into(),
            target_rate: escalation_rate,
            escalation_rate,
            accuracy: 0.9,
            cloud_calls_saved: 1.0 - escalation_rate,
            threshold: None,
        }
    }

    #[test]
    fn each_policy_is_priced_by_what_it_runs_where() {
        // 0.4 per 1,000 cloud calls, 0.001 per device second; the local model takes 0.05 ms.
        let m = CostModel::new(0.0004, 0.000_001).unwrap();
        let rows = [row("local-only", 0.0), row(CLOUD_ONLY, 1.0), row("cascade", 0.1)];
        let t = cost_table(&m, &rows, 0.05);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // Local only: 1,000 x 0.05 ms x 1e-6.
        assert!(close(t[0].cost_per_1000, 5e-5), "{}", t[0].cost_per_1000);
        // Cloud only: 1,000 calls, no device compute; no saving against itself.
        assert!(close(t[1].cost_per_1000, 0.4));
        assert!(close(t[1].saving.unwrap(), 0.0));
        // The cascade: every request runs locally, 10% also go to the cloud.
        assert!(close(t[2].cost_per_1000, 5e-5 + 0.04));
        assert!(close(t[2].saving.unwrap(), 1.0 - (5e-5 + 0.04) / 0.4));
        let text = format_cost_table(&t);
        assert_eq!(text.lines().count(), 4);
        // Four significant digits, however small the price.
        assert!(text.contains(" 0.00005000 ") && text.contains(" 0.04005 ") && text.contains(" 0.4000 "), "{text}");
    }

    #[test]
    fn free_cloud_calls_have_no_saving_to_state() {
        let m = CostModel::new(0.0, 0.01).unwrap();
        let t = cost_table(&m, &[row("local-only", 0.0), row(CLOUD_ONLY, 1.0)], 2.0);
        assert!(t.iter().all(|r| r.saving.is_none()));
        assert_eq!(t[0].cost_per_1000, 20.0);
        assert_eq!(t[1].cost_per_1000, 0.0);
        assert!(format_cost_table(&t).contains(" -\n"));
    }

    #[test]
    fn prices_must_be_finite_and_not_negative() {
        for (call, ms) in [(-1.0, 0.0), (0.0, f64::NAN), (f64::INFINITY, 0.0), (0.0, -0.5)] {
            let e = CostModel::new(call, ms).unwrap_err();
            assert!(e.to_string().contains("finite number >= 0"), "{e}");
        }
        assert!(CostModel::new(0.0, 0.0).is_ok());
    }
}
