//! Routing by live conditions, as plain rules: which escalation rate the device should spend
//! given what it knows of its link and its battery, and why. The device reads its conditions
//! (a file the integrator writes, the measured round trip to the coordinator) and applies the
//! [`Choice`]; nothing here reads a file or a clock.
//!
//! Rules are tried in order; the first whose every condition holds names the target rate.
//! A condition the device does not know (no conditions file, no round trip measured yet)
//! never holds. When no rule matches, the default rate (`target_rate`) stands.

use serde::{Deserialize, Serialize};

/// What the device knows of its state now (`None`: unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Conditions {
    /// The link is metered (mobile data, a capped plan).
    pub metered: Option<bool>,
    /// Battery level, 0 to 100.
    pub battery_percent: Option<f64>,
    /// On external power.
    pub charging: Option<bool>,
    /// Smoothed round-trip time to the coordinator, milliseconds.
    pub rtt_ms: Option<f64>,
}

impl Conditions {
    /// A short description of the link and power state, for answers: `"unmetered, charging"`,
    /// `"metered link, battery 18%"`, `"conditions unknown"`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.metered {
            Some(true) => parts.push("metered link".to_string()),
            Some(false) => parts.push("unmetered".to_string()),
            None => {}
        }
        match (self.charging, self.battery_percent) {
            (Some(true), _) => parts.push("charging".to_string()),
            (_, Some(b)) => parts.push(format!("battery {b:.0}%")),
            (Some(false), None) => parts.push("on battery".to_string()),
            (None, None) => {}
        }
        if parts.is_empty() { "conditions unknown".to_string() } else { parts.join(", ") }
    }
}

/// One rule: when every condition given holds, escalate at `target_rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// The link is (`true`) or is not (`false`) metered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metered: Option<bool>,
    /// The battery is below this percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_below: Option<f64>,
    /// The device is (`true`) or is not (`false`) charging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging: Option<bool>,
    /// The smoothed round trip to the coordinator is above this, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_above_ms: Option<f64>,
    /// Share of requests to escalate while the rule holds (a threshold is calibrated for it).
    pub target_rate: f64,
}

impl RouteRule {
    /// Whether every condition of the rule holds (an unknown condition does not).
    pub fn matches(&self, c: &Conditions) -> bool {
        let eq = |want: Option<bool>, have: Option<bool>| want.is_none_or(|w| have == Some(w));
        let below = |limit: Option<f64>, have: Option<f64>| limit.is_none_or(|l| have.is_some_and(|h| h < l));
        let above = |limit: Option<f64>, have: Option<f64>| limit.is_none_or(|l| have.is_some_and(|h| h > l));
        eq(self.metered, c.metered)
            && eq(self.charging, c.charging)
            && below(self.battery_below, c.battery_percent)
            && above(self.rtt_above_ms, c.rtt_ms)
    }

    /// What the rule is about, for answers: `"metered link"`, `"battery below 20%, not
    /// charging"`, `"round trip above 300 ms"`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.metered {
            Some(true) => parts.push("metered link".to_string()),
            Some(false) => parts.push("unmetered link".to_string()),
            None => {}
        }
        if let Some(b) = self.battery_below {
            parts.push(format!("battery below {b:.0}%"));
        }
        match self.charging {
            Some(true) => parts.push("charging".to_string()),
            Some(false) => parts.push("not charging".to_string()),
            None => {}
        }
        if let Some(r) = self.rtt_above_ms {
            parts.push(format!("round trip above {r:.0} ms"));
        }
        if parts.is_empty() { "always".to_string() } else { parts.join(", ") }
    }
}

/// The rules the device ships with: on a metered link, or below 20% battery while not
/// charging, escalate only the least confident 2%.
pub fn default_rules() -> Vec<RouteRule> {
    vec![
        RouteRule { metered: Some(true), battery_below: None, charging: None, rtt_above_ms: None, target_rate: 0.02 },
        RouteRule {
            metered: None,
            battery_below: Some(20.0),
            charging: Some(false),
            rtt_above_ms: None,
            target_rate: 0.02,
        },
    ]
}

/// Checks the rules' values.
pub fn validate(rules: &[RouteRule]) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        if !(0.0..=1.0).contains(&r.target_rate) {
            return Err(format!("inference rule {}: target_rate must be in [0, 1], got {}", i + 1, r.target_rate));
        }
        if r.battery_below.is_some_and(|b| !(0.0..=100.0).contains(&b)) {
            return Err(format!("inference rule {}: battery_below must be in [0, 100]", i + 1));
        }
        if r.rtt_above_ms.is_some_and(|t| t.is_nan() || t < 0.0) {
            return Err(format!("inference rule {}: rtt_above_ms must be at least 0", i + 1));
        }
    }
    Ok(())
}

/// Every rate a threshold must be calibrated for: `default` and each rule's, once each, in
/// order.
pub fn rates(default: f64, rules: &[RouteRule]) -> Vec<f64> {
    let mut out = vec![default];
    for r in rules {
        if !out.contains(&r.target_rate) {
            out.push(r.target_rate);
        }
    }
    out
}

/// The rate to spend now and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    /// The target escalation rate in force.
    pub target_rate: f64,
    /// The rule that set it (index into the rules), `None`: the default.
    pub rule: Option<usize>,
    /// Why, in words: the rule's conditions, or the conditions under the default.
    pub why: String,
}

/// The first rule of `rules` that holds under `conditions`, else `default`.
pub fn choose(default: f64, rules: &[RouteRule], conditions: &Conditions) -> Choice {
    match rules.iter().position(|r| r.matches(conditions)) {
        Some(i) => Choice { target_rate: rules[i].target_rate, rule: Some(i), why: rules[i].describe() },
        None => Choice { target_rate: default, rule: None, why: conditions.describe() },
    }
}

/// How a confidence-routed answer was decided (the bounded label of the routes metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Sure enough under the default rate: kept local.
    Confident,
    /// Unsure under the default rate but not under the rule in force: kept local by the rule.
    KeptLocal,
    /// Below the threshold in force: escalated.
    Escalated,
}

/// The verdict for confidence `score`, with `default_threshold` (calibrated for the default
/// rate) and `threshold` (for the rate in force), and its reason in words.
pub fn verdict(score: f32, default_threshold: f32, threshold: f32, choice: &Choice) -> (Verdict, String) {
    let pct = choice.target_rate * 100.0;
    if crate::escalation::escalates(score, threshold) {
        (Verdict::Escalated, format!("escalated: below threshold for {pct:.0}% ({})", choice.why))
    } else if crate::escalation::escalates(score, default_threshold) {
        (Verdict::KeptLocal, format!("kept local: {}, budget {pct:.0}%", choice.why))
    } else {
        (Verdict::Confident, "confident".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(metered: Option<bool>, battery: Option<f64>, charging: Option<bool>, rtt: Option<f64>) -> Conditions {
        Conditions { metered, battery_percent: battery, charging, rtt_ms: rtt }
    }

    #[test]
    fn the_shipped_rules_pick_the_rate_for_each_state() {
        let rules = default_rules();
        let slow = RouteRule { rtt_above_ms: Some(300.0), ..rules[0].clone() };
        let slow = RouteRule { metered: None, target_rate: 0.05, ..slow };
        let mut with_rtt = rules.clone();
        with_rtt.push(slow);
        // (conditions, rules, expected rate, expected rule, expected why)
        type Row<'a> = (Conditions, &'a [RouteRule], f64, Option<usize>, &'a str);
        let table: &[Row] = &[
            (c(Some(true), Some(90.0), Some(true), None), &rules, 0.02, Some(0), "metered link"),
            (c(Some(false), Some(18.0), Some(false), None), &rules, 0.02, Some(1), "battery below 20%, not charging"),
            (c(Some(false), Some(18.0), Some(true), None), &rules, 0.1, None, "unmetered, charging"),
            (c(Some(false), Some(80.0), Some(false), None), &rules, 0.1, None, "unmetered, battery 80%"),
            (c(Some(false), Some(20.0), Some(false), None), &rules, 0.1, None, "unmetered, battery 20%"),
            (c(None, None, None, None), &rules, 0.1, None, "conditions unknown"),
            // Unknown battery never counts as low; unknown link never as metered.
            (c(None, None, Some(false), None), &rules, 0.1, None, "on battery"),
            (c(Some(true), Some(5.0), Some(false), None), &rules, 0.02, Some(0), "metered link"),
            (c(Some(false), None, None, Some(500.0)), &with_rtt, 0.05, Some(2), "round trip above 300 ms"),
            (c(Some(false), None, None, Some(100.0)), &with_rtt, 0.1, None, "unmetered"),
            (c(Some(false), None, None, None), &with_rtt, 0.1, None, "unmetered"),
            (c(Some(true), None, None, None), &[], 0.1, None, "metered link"),
        ];
        for (i, (cond, rules, rate, rule, why)) in table.iter().enumerate() {
            let got = choose(0.1, rules, cond);
            assert_eq!((got.target_rate, got.rule, got.why.as_str()), (*rate, *rule, *why), "row {i}");
        }
    }

    #[test]
    fn verdicts_and_reasons() {
        let metered = choose(0.1, &default_rules(), &c(Some(true), None, None, None));
        let home = choose(0.1, &default_rules(), &c(Some(false), None, Some(true), None));
        // Thresholds: 0.6 for 10%, 0.3 for 2%.
        let table = [
            (0.9, &home, 0.6, Verdict::Confident, "confident"),
            (0.5, &home, 0.6, Verdict::Escalated, "escalated: below threshold for 10% (unmetered, charging)"),
            (0.9, &metered, 0.3, Verdict::Confident, "confident"),
            (0.5, &metered, 0.3, Verdict::KeptLocal, "kept local: metered link, budget 2%"),
            (0.2, &metered, 0.3, Verdict::Escalated, "escalated: below threshold for 2% (metered link)"),
        ];
        for (score, choice, t, v, why) in table {
            assert_eq!(verdict(score, 0.6, t, choice), (v, why.to_string()), "{score}");
        }
    }

    #[test]
    fn rates_are_calibrated_once_each_and_rules_are_checked() {
        assert_eq!(rates(0.1, &default_rules()), vec![0.1, 0.02]);
        assert_eq!(rates(0.02, &default_rules()), vec![0.02]);
        assert!(validate(&default_rules()).is_ok());
        let bad = RouteRule { target_rate: 1.5, ..default_rules()[0].clone() };
        assert!(validate(&[bad]).unwrap_err().contains("rule 1"));
        let bad = RouteRule { battery_below: Some(120.0), ..default_rules()[1].clone() };
        assert!(validate(&[bad]).is_err());
    }

    #[test]
    fn rules_read_from_toml() {
        #[derive(Deserialize)]
        struct F {
            rules: Vec<RouteRule>,
        }
        let f: F = toml::from_str(
            "[[rules]]\nmetered = true\ntarget_rate = 0.02\n[[rules]]\nbattery_below = 20\ncharging = false\ntarget_rate = 0.02\n",
        )
        .unwrap();
        assert_eq!(f.rules, default_rules());
        assert!(toml::from_str::<F>("[[rules]]\nmeterd = true\ntarget_rate = 0.02\n").is_err());
    }
}
