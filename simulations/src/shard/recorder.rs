//! The sharded experiment's record: `rounds.csv`, the rows `fedge-sim run` writes for the same
//! config, written by one shard as each becomes known (see [`crate::shard`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use fedge_core::wire::RoundLine;

use super::ShardError;
use crate::clock::RoundTrace;
use crate::config::SimConfig;
use crate::run::{Observer, RoundRow, score};

/// Writes `rounds.csv` in round order; rows already in the file (a recorder restarted) stay.
pub(crate) struct Recorder {
    path: PathBuf,
    writer: csv::Writer<File>,
    rounds: u64,
    eval_every: u64,
    /// Rows in the file.
    written: u64,
    /// Replayed rounds whose rows are not written yet.
    traces: BTreeMap<u64, RoundTrace>,
    /// Rows written by this process.
    rows: Vec<RoundRow>,
    best: f64,
}

impl Recorder {
    /// Opens `dir/rounds.csv`, keeping the rows it holds.
    pub(crate) fn open(dir: &Path, config: &SimConfig) -> Result<Self, ShardError> {
        let path = dir.join("rounds.csv");
        let fail = |cause: std::io::Error| ShardError::Output { path: path.clone(), cause: cause.to_string() };
        std::fs::create_dir_all(dir).map_err(fail)?;
        // Rows already written (a recorder restarted), and whether the header is (one that
        // stopped before its first row).
        let (written, headed) = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
                (lines.saturating_sub(1) as u64, text.starts_with("round,"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, false),
            Err(e) => return Err(fail(e)),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(fail)?;
        let writer = csv::WriterBuilder::new().has_headers(!headed).from_writer(file);
        Ok(Self {
            path,
            writer,
            rounds: config.rounds,
            eval_every: config.eval_every,
            written,
            traces: BTreeMap::new(),
            rows: Vec::new(),
            best: 0.0,
        })
    }

    /// Round `trace.report.round` as the replay saw it.
    pub(crate) fn replayed(&mut self, trace: RoundTrace) {
        if trace.report.round > self.written {
            self.traces.insert(trace.report.round, trace);
        }
    }

    /// Whether round `round`'s row is written.
    pub(crate) fn has_row(&self, round: u64) -> bool {
        round <= self.written
    }

    /// Whether round `round`'s row carries the model's score (every `eval_every` rounds and
    /// the last, as `fedge-sim run`).
    pub(crate) fn scores(&self, round: u64) -> bool {
        round.is_multiple_of(self.eval_every) || round == self.rounds
    }

    /// Whether every round's row is written.
    pub(crate) fn complete(&self) -> bool {
        self.written >= self.rounds
    }

    /// Rows in the file.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// The root closed round `round` (`line`) with model `params`: scores it when the run
    /// would (every `eval_every` rounds and the last) and writes the row. `None`: the root no
    /// longer keeps that model (the recorder was away for rounds), so the row has no accuracy.
    pub(crate) fn model_after(
        &mut self,
        round: u64,
        line: &RoundLine,
        params: Option<&ModelParams>,
        evaluator: &mut fedge_learn::Trainer,
        test: &Dataset,
        obs: &mut dyn Observer,
    ) -> Result<(), ShardError> {
        if self.has_row(round) {
            return Ok(());
        }
        if round != self.written + 1 {
            return Err(ShardError::Refused(format!(
                "rounds.csv holds {} rows: cannot write round {round} next",
                self.written
            )));
        }
        let trace = self
            .traces
            .remove(&round)
            .ok_or_else(|| ShardError::Refused(format!("round {round} was not replayed before its row")))?;
        let due = self.scores(round);
        let eval = match params {
            Some(params) if due => Some(score(evaluator, params, test, &mut self.best)?),
            None if due => {
                obs.line(&format!(
                    "round {round}: the root no longer keeps model version {}: its row has no accuracy",
                    line.model_version
                ));
                None
            }
            _ => None,
        };
        let mut row = RoundRow::of_round(&trace, eval, None);
        // The devices' loss is spread over the shards: the root's line has their weighted mean.
        row.train_loss = line.train_loss;
        let fail = |e: csv::Error| ShardError::Output { path: self.path.clone(), cause: e.to_string() };
        self.writer.serialize(&row).map_err(fail)?;
        self.writer.flush().map_err(|e| ShardError::Output { path: self.path.clone(), cause: e.to_string() })?;
        obs.line(&format!(
            "round {round}/{}: {}train loss {:.4}, {} of {} results, {} samples (root version {})",
            self.rounds,
            match eval {
                Some(e) => format!("accuracy {:.2}%, loss {:.4}, ", e.accuracy * 100.0, e.loss),
                None => String::new(),
            },
            row.train_loss,
            row.results,
            row.selected,
            row.samples,
            line.model_version
        ));
        self.written = round;
        self.rows.push(row);
        Ok(())
    }

    /// The rows this process wrote.
    pub(crate) fn into_rows(self) -> Vec<RoundRow> {
        self.rows
    }
}
