//! Three-tier cascades: device (the int8 student) -> regional edge server (a medium model) ->
//! root (the teacher). A request escalates from the device when the student is unsure under
//! the device's threshold, and from the region to the root only when the medium model is
//! unsure too. Each tier has its own target rate: the device's is the share of all requests
//! it sends on; the region's is the share of *its* requests (those the device escalated) it
//! sends on, so its threshold is calibrated on the medium model's scores of the calibration
//! requests the device escalates.

use serde::Serialize;

use super::{CalibrationError, calibrate_threshold, escalates};

/// One request of an offline evaluation of three tiers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierObservation {
    /// The student's confidence score.
    pub device_score: f32,
    /// The student's class.
    pub device: usize,
    /// The medium model's confidence score.
    pub region_score: f32,
    /// The medium model's class.
    pub region: usize,
    /// The teacher's class.
    pub root: usize,
    /// The true class.
    pub label: usize,
}

/// Compute time of each tier's model and the network round trips between tiers, in
/// milliseconds, for the latency of each path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TierLatency {
    /// The student on the device.
    pub device_ms: f64,
    /// The medium model on the regional server.
    pub region_ms: f64,
    /// The teacher at the root.
    pub root_ms: f64,
    /// Device <-> region round trip.
    pub region_rtt_ms: f64,
    /// Region <-> root round trip (and device <-> root in the two-tier cascade).
    pub root_rtt_ms: f64,
}

impl TierLatency {
    /// Answered on the device.
    pub fn device_path(&self) -> f64 {
        self.device_ms
    }

    /// Answered by the region.
    pub fn region_path(&self) -> f64 {
        self.device_ms + self.region_rtt_ms + self.region_ms
    }

    /// Answered by the root through the region.
    pub fn root_path(&self) -> f64 {
        self.region_path() + self.root_rtt_ms + self.root_ms
    }

    /// Answered by the root straight from the device (two tiers).
    pub fn direct_root_path(&self) -> f64 {
        self.device_ms + self.root_rtt_ms + self.root_ms
    }
}

/// One line of the comparison: three tiers at a device rate and a region rate, beside the
/// two-tier cascade at the same device rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierRow {
    /// Share of all requests the device's threshold was calibrated to send on.
    pub device_rate: f64,
    /// Share of the region's requests its threshold was calibrated to send on.
    pub region_rate: f64,
    /// Share of requests answered on the device, by the region, by the root (measured).
    pub device_share: f64,
    /// See `device_share`.
    pub region_share: f64,
    /// See `device_share`.
    pub root_share: f64,
    /// Accuracy of the three-tier answers.
    pub accuracy: f64,
    /// Mean latency of a request over the three paths, milliseconds.
    pub mean_latency_ms: f64,
    /// The two-tier cascade (device -> root) at the same device threshold: its accuracy.
    pub two_tier_accuracy: f64,
    /// Its root share (the device's measured escalation rate).
    pub two_tier_root_share: f64,
    /// Its mean latency, milliseconds.
    pub two_tier_mean_latency_ms: f64,
    /// The device's threshold.
    pub device_threshold: f32,
    /// The region's threshold.
    pub region_threshold: f32,
}

/// For each of `device_rates`: thresholds calibrated on `calibration` (the student's and the
/// medium model's scores of held-out requests), the device's for its rate and the region's
/// for `region_rate` among the calibration requests the device escalates; measured on `eval`.
pub fn tier_table(
    calibration: &[(f32, f32)],
    eval: &[TierObservation],
    device_rates: &[f64],
    region_rate: f64,
    latency: &TierLatency,
) -> Result<Vec<TierRow>, CalibrationError> {
    if eval.is_empty() {
        return Err(CalibrationError::Empty);
    }
    let n = eval.len() as f64;
    let device_scores: Vec<f32> = calibration.iter().map(|c| c.0).collect();
    let mut rows = Vec::with_capacity(device_rates.len());
    for &rate in device_rates {
        let td = calibrate_threshold(&device_scores, rate)?;
        let escalated: Vec<f32> = calibration.iter().filter(|c| escalates(c.0, td)).map(|c| c.1).collect();
        let tr = calibrate_threshold(&escalated, region_rate)?;
        let (mut at_device, mut at_region, mut at_root) = (0usize, 0usize, 0usize);
        let (mut correct, mut two_correct) = (0usize, 0usize);
        for o in eval {
            let answer = if !escalates(o.device_score, td) {
                at_device += 1;
                o.device
            } else if !escalates(o.region_score, tr) {
                at_region += 1;
                o.region
            } else {
                at_root += 1;
                o.root
            };
            correct += usize::from(answer == o.label);
            let two = if escalates(o.device_score, td) { o.root } else { o.device };
            two_correct += usize::from(two == o.label);
        }
        let share = |k: usize| k as f64 / n;
        let (d, r, t) = (share(at_device), share(at_region), share(at_root));
        rows.push(TierRow {
            device_rate: rate,
            region_rate,
            device_share: d,
            region_share: r,
            root_share: t,
            accuracy: share(correct),
            mean_latency_ms: d * latency.device_path() + r * latency.region_path() + t * latency.root_path(),
            two_tier_accuracy: share(two_correct),
            two_tier_root_share: r + t,
            two_tier_mean_latency_ms: d * latency.device_path() + (r + t) * latency.direct_root_path(),
            device_threshold: td,
            region_threshold: tr,
        });
    }
    Ok(rows)
}

/// `rows` as a text table.
pub fn format_tier_table(rows: &[TierRow]) -> String {
    let mut out = format!(
        "{:>6} {:>6}  {:>7} {:>7} {:>7}  {:>8} {:>9}   {:>8} {:>7} {:>9}\n",
        "device", "region", "device", "region", "root", "accuracy", "mean ms", "2-tier", "root", "mean ms"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>5.0}% {:>5.0}%  {:>6.1}% {:>6.1}% {:>6.1}%  {:>7.2}% {:>9.2}   {:>7.2}% {:>6.1}% {:>9.2}\n",
            r.device_rate * 100.0,
            r.region_rate * 100.0,
            r.device_share * 100.0,
            r.region_share * 100.0,
            r.root_share * 100.0,
            r.accuracy * 100.0,
            r.mean_latency_ms,
            r.two_tier_accuracy * 100.0,
            r.two_tier_root_share * 100.0,
            r.two_tier_mean_latency_ms,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(
        device_score: f32,
        device: usize,
        region_score: f32,
        region: usize,
        root: usize,
        label: usize,
    ) -> TierObservation {
        TierObservation { device_score, device, region_score, region, root, label }
    }

    #[test]
    fn requests_stop_at_the_first_sure_tier() {
        // Calibration: device scores 0.1..1.0; at rate 0.4 the threshold is the 5th lowest
        // (0.5: scores below it escalate), so 0.1 to 0.4 escalate, with region scores 0.9,
        // 0.2, 0.5, 0.1: at region rate 1/3 the threshold is the 2nd lowest of those (0.2), so
        // one of the four goes on.
        let cal: Vec<(f32, f32)> = [
            (0.1, 0.9),
            (0.2, 0.2),
            (0.3, 0.5),
            (0.4, 0.1),
            (0.5, 0.1),
            (0.6, 0.1),
            (0.7, 0.1),
            (0.8, 0.1),
            (0.9, 0.1),
            (1.0, 0.1),
        ]
        .to_vec();
        let td = calibrate_threshold(&cal.iter().map(|c| c.0).collect::<Vec<_>>(), 0.4).unwrap();
        let tr = calibrate_threshold(&[0.9, 0.2, 0.5, 0.1], 1.0 / 3.0).unwrap();
        assert_eq!((td, tr), (0.5, 0.2));
        let eval = [
            obs(0.95, 1, 0.0, 9, 9, 1),  // sure on the device: right
            obs(0.9, 2, 0.0, 9, 9, 3),   // sure on the device: wrong
            obs(0.05, 5, 0.95, 4, 9, 4), // the region is sure: right (two tiers: the root, wrong)
            obs(0.05, 5, 0.01, 4, 6, 6), // to the root: right (two tiers: right)
        ];
        let lat = TierLatency { device_ms: 1.0, region_ms: 2.0, root_ms: 4.0, region_rtt_ms: 10.0, root_rtt_ms: 50.0 };
        let rows = tier_table(&cal, &eval, &[0.4], 1.0 / 3.0, &lat).unwrap();
        let r = &rows[0];
        assert_eq!((r.device_threshold, r.region_threshold), (td, tr));
        assert!(escalates(0.05, td) && !escalates(0.9, td) && !escalates(0.95, tr) && escalates(0.01, tr));
        assert_eq!((r.device_share, r.region_share, r.root_share), (0.5, 0.25, 0.25));
        assert_eq!((r.accuracy, r.two_tier_accuracy, r.two_tier_root_share), (0.75, 0.5, 0.5));
        // Paths: device 1; region 1 + 10 + 2 = 13; root via region 13 + 50 + 4 = 67; root
        // direct 1 + 50 + 4 = 55.
        assert_eq!(
            (lat.device_path(), lat.region_path(), lat.root_path(), lat.direct_root_path()),
            (1.0, 13.0, 67.0, 55.0)
        );
        assert!((r.mean_latency_ms - (0.5 * 1.0 + 0.25 * 13.0 + 0.25 * 67.0)).abs() < 1e-12);
        assert!((r.two_tier_mean_latency_ms - (0.5 * 1.0 + 0.5 * 55.0)).abs() < 1e-12);
        assert!(format_tier_table(&rows).contains("75.00%"));
    }

    #[test]
    fn nothing_to_measure_or_calibrate_is_an_error() {
        let lat = TierLatency { device_ms: 1.0, region_ms: 1.0, root_ms: 1.0, region_rtt_ms: 1.0, root_rtt_ms: 1.0 };
        assert!(tier_table(&[(0.5, 0.5)], &[], &[0.1], 0.1, &lat).is_err());
        // A device rate of 0 escalates nothing, so the region has nothing to calibrate on.
        let e = [obs(0.5, 1, 0.5, 1, 1, 1)];
        assert!(tier_table(&[(0.5, 0.5), (0.6, 0.6)], &e, &[0.0], 0.5, &lat).is_err());
    }
}
