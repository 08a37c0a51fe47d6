//! The device's live conditions as the integrator reports them: a small TOML file
//! (`[inference] conditions_file`) with any of
//!
//! ```toml
//! metered = true          # the link is metered
//! battery_percent = 18    # 0 to 100
//! charging = false
//! ```
//!
//! Read again when its modification time or length changes, and at least every
//! [`REREAD`]. A missing, unreadable or malformed file is a warning (once per distinct
//! problem) and the last good state stands; it never fails a request.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use fedge_core::routing::Conditions;
use serde::Deserialize;

/// Longest time between two reads of an unchanged file.
pub const REREAD: Duration = Duration::from_secs(5);

/// The file's content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionsFile {
    metered: Option<bool>,
    battery_percent: Option<f64>,
    charging: Option<bool>,
}

/// The conditions in `text`, or why they cannot be read.
pub fn parse(text: &str) -> Result<Conditions, String> {
    let f: ConditionsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(b) = f.battery_percent
        && !(0.0..=100.0).contains(&b)
    {
        return Err(format!("battery_percent must be in [0, 100], got {b}"));
    }
    Ok(Conditions { metered: f.metered, battery_percent: f.battery_percent, charging: f.charging, rtt_ms: None })
}

#[derive(Debug, Default)]
struct Seen {
    /// (modification time, length) of the file last read.
    stamp: Option<(SystemTime, u64)>,
    read_at: Option<Instant>,
    good: Conditions,
    /// The last problem warned about (not repeated).
    warned: Option<String>,
}

/// Watches a conditions file (or none: conditions unknown).
#[derive(Debug, Default)]
pub struct ConditionsSource {
    path: Option<PathBuf>,
    seen: Mutex<Seen>,
}

impl ConditionsSource {
    /// Conditions from `path`, if given.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path, seen: Mutex::default() }
    }

    /// The conditions now (the link and power part; the caller adds the round trip).
    pub fn current(&self) -> Conditions {
        let Some(path) = &self.path else { return Conditions::default() };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        let due = seen.read_at.is_none_or(|t| t.elapsed() >= REREAD);
        if stamp.is_some() && stamp == seen.stamp && !due {
            return seen.good;
        }
        if stamp.is_none() && !due {
            return seen.good;
        }
        seen.read_at = Some(Instant::now());
        seen.stamp = stamp;
        let read = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}")).and_then(|t| parse(&t));
        match read {
            Ok(c) => {
                if seen.good != c {
                    tracing::info!("inference: conditions now {}", c.describe());
                }
                seen.good = c;
                seen.warned = None;
            }
            Err(e) => {
                if seen.warned.as_ref() != Some(&e) {
                    tracing::warn!(
                        "inference: conditions file {}: {e}; keeping the last good state ({})",
                        path.display(),
                        seen.good.describe()
                    );
                    seen.warned = Some(e);
                }
            }
        }
        seen.good
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_read_when_it_changes_and_bad_content_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conditions.toml");
        let src = ConditionsSource::new(Some(path.clone()));
        assert_eq!(src.current(), Conditions::default(), "no file yet: unknown");
        std::fs::write(&path, "metered = true\nbattery_percent = 18\ncharging = false\n").unwrap();
        // Written after the first read: the new stamp makes it read at once.
        let c = src.current();
        assert_eq!((c.metered, c.battery_percent, c.charging), (Some(true), Some(18.0), Some(false)));
        std::fs::write(&path, "metered = false\n").unwrap();
        assert_eq!(src.current().metered, Some(false));
        assert_eq!(src.current().battery_percent, None);
        for bad in ["metered = \"yes\"", "battery_percent = 140", "meterd = true", "\u{0}\u{ff}garbage", ""] {
            std::fs::write(&path, bad).unwrap();
            let c = src.current();
            if bad.is_empty() {
                assert_eq!(c, Conditions::default(), "an empty file says nothing is known");
            } else {
                assert_eq!(c.metered, Some(false), "{bad:?} keeps the last good state");
            }
            std::fs::write(&path, "metered = false\n").unwrap();
            src.current();
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(src.current().metered, Some(false), "a removed file keeps the last good state");
        assert_eq!(ConditionsSource::new(None).current(), Conditions::default());
    }
}
