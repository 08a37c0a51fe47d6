//! Where a run's progress goes besides its files: the [`Observer`] trait, [`Console`] (lines and
//! a progress bar) and [`Quiet`].

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};

/// Where run output goes besides the files.
pub trait Observer {
    /// A human-readable line (partition stats, per-round progress).
    fn line(&mut self, text: &str);
    /// A round started with `selected` devices (for a progress bar).
    fn round_started(&mut self, _round: u64, _selected: usize) {}
    /// One selected device finished.
    fn device_done(&mut self) {}
}

/// Prints lines to stdout and draws a per-round progress bar on stderr when it is a terminal.
pub struct Console {
    bar: Option<ProgressBar>,
    rounds: u64,
}

impl Console {
    /// A console observer for a run of `rounds` rounds.
    pub fn new(rounds: u64) -> Self {
        Self { bar: None, rounds }
    }
}

impl Observer for Console {
    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(text),
            // A closed pipe (`| head`) must not kill the run: the files are still written.
            _ => {
                let _ = writeln!(std::io::stdout().lock(), "{text}");
            }
        }
    }
    fn round_started(&mut self, round: u64, selected: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let bar = ProgressBar::new(selected as u64);
        bar.set_style(
            ProgressStyle::with_template("round {msg} [{bar:30}] {pos}/{len} devices {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{round}/{}", self.rounds));
        self.bar = Some(bar);
    }
    fn device_done(&mut self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Prints nothing.
pub struct Quiet;

impl Observer for Quiet {
    fn line(&mut self, _text: &str) {}
}
