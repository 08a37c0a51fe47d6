//! Reading TOML configuration files with one-line errors that name the file and the line.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

/// A configuration file that cannot be used.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read config {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML for the expected schema (unknown keys included).
    #[error("config {path}, line {line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Parses TOML text; on error, the 1-based line and a one-line reason.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, (usize, String)> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let line = e.span().map_or(1, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        (line, e.message().replace('\n', " ").trim().to_string())
    })
}

/// Reads and parses a TOML file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigFileError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    parse_toml(&text).map_err(|(line, reason)| ConfigFileError::Parse { path: path.to_path_buf(), line, reason })
}
