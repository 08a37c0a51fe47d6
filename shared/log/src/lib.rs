//! Diagnostics for Fedge's binaries. The libraries log with `tracing`'s macros (warn for what
//! was refused or failed and is survived, info for round and service events, debug for
//! chatter); each binary (`fedge-coordinator`, `fedge-edge`, `fedge-sim`) installs the one
//! subscriber here first thing in `main`: events filtered by `RUST_LOG` (an `EnvFilter`,
//! `info` when unset), written to stderr, one per line, as plain text for people or as JSON
//! for log collectors (`FEDGE_LOG_FORMAT=json`; docs/operations.md). What a command prints as
//! its result (tables, JSON answers, the lines a user reads on stdout) is not logged: it is
//! printed.

use std::fmt;
use std::str::FromStr;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable that chooses the format: `text` (the default) or `json`.
pub const FORMAT_VAR: &str = "FEDGE_LOG_FORMAT";

/// How events are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line per event, for people: `warning: ` or `error: ` before the message (nothing
    /// before info), then the event's fields as `key=value`; no timestamp, no target.
    #[default]
    Text,
    /// One JSON object per line, for log collectors: `timestamp`, `level`, `target` and the
    /// event's `fields` (its `message` among them).
    Json,
}

/// Why the subscriber was not installed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `FEDGE_LOG_FORMAT` names no format.
    #[error("{FORMAT_VAR}={0:?}: expected text or json")]
    Format(String),
    /// Another subscriber was installed first.
    #[error("a log subscriber is already installed")]
    Installed,
}

impl FromStr for LogFormat {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, LogError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(LogError::Format(s.to_string())),
        }
    }
}

impl LogFormat {
    /// The format `FEDGE_LOG_FORMAT` names; text when it is unset.
    pub fn from_env() -> Result<Self, LogError> {
        match std::env::var(FORMAT_VAR) {
            Ok(s) => s.parse(),
            Err(std::env::VarError::NotPresent) => Ok(Self::Text),
            Err(std::env::VarError::NotUnicode(s)) => Err(LogError::Format(s.to_string_lossy().into_owned())),
        }
    }
}

/// Installs the process's subscriber in the format `FEDGE_LOG_FORMAT` names, filtered by
/// `RUST_LOG` (`info` when unset; directives it cannot parse are skipped).
pub fn init() -> Result<(), LogError> {
    init_with(LogFormat::from_env()?)
}

/// Installs the process's subscriber in `format`, filtered by `RUST_LOG` (`info` when unset).
pub fn init_with(format: LogFormat) -> Result<(), LogError> {
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    let installed = match format {
        LogFormat::Text => builder.event_format(Plain).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|_| LogError::Installed)
}

/// The text format: the level as a command-line tool writes it, then the fields.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "{}", prefix(*event.metadata().level()))?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// What the text format writes before an event's message.
fn prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_in_any_case_and_others_refused() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let err = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert_eq!(err, "FEDGE_LOG_FORMAT=\"xml\": expected text or json");
    }

    #[test]
    fn text_lines_read_like_a_command_line_tool() {
        assert_eq!(prefix(Level::WARN), "warning: ");
        assert_eq!(prefix(Level::ERROR), "error: ");
        assert_eq!(prefix(Level::INFO), "");
    }
}
