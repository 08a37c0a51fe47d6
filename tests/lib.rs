//! Helpers for Fedge's integration tests.

use std::path::PathBuf;

/// Folder holding the real datasets (`mnist/`, `fashion-mnist/`, ...): `$FEDGE_DATA_DIR`, or
/// `../shared/data` beside the repository, where CI puts it.
pub fn shared_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FEDGE_DATA_DIR") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        dir.join("mnist").is_dir(),
        "real datasets not found at {} (set FEDGE_DATA_DIR; see docs/data.md)",
        dir.display()
    );
    dir
}
