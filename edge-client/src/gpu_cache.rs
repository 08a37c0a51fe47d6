//! The GPU driver's compiled-shader cache, kept in the device's state folder.
//!
//! burn's wgpu backend (cubecl) turns each kernel into a shader and hands it to the driver,
//! which compiles it into a pipeline: seconds per model on a cold start (6.6 s for the CNN's
//! first step on Mesa's lavapipe, 1.6 s warm; docs/gpu.md). cubecl keeps nothing of that on
//! disk (its pipelines are made without a pipeline cache, and its autotune cache is compiled
//! out of Fedge's build); the drivers do, in a folder under the user's home by default, which a
//! device's service account, a container or a read-only root may not keep. So a device that
//! trains on wgpu points the drivers' caches into its state folder: Mesa's
//! (`MESA_SHADER_CACHE_DIR`) and NVIDIA's (`__GL_SHADER_DISK_CACHE_PATH`, with its size cap
//! lifted). The drivers read these when the process loads them, and a process may not change
//! its own environment safely once threads run, so a device started without them starts itself
//! again with them set ([`keep_in`], [`restart_with`]: `exec`, the same process id and
//! arguments). `fedge-edge gpu-cache --config edge.toml` does the same and prints where the
//! caches are (edge-client/tests/cli.rs runs it: the restart is tested without a GPU build).

use std::path::{Path, PathBuf};

/// The cache folder in a device's state folder.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("gpu-cache")
}

/// The variables to set for drivers to cache in `dir`, those not already set (`env` reads the
/// environment): empty when nothing is to change. A variable the operator set is kept.
pub fn missing(dir: &Path, env: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    let d = dir.display().to_string();
    [
        ("MESA_SHADER_CACHE_DIR", d.clone()),
        ("__GL_SHADER_DISK_CACHE", "1".to_string()),
        ("__GL_SHADER_DISK_CACHE_PATH", d),
        ("__GL_SHADER_DISK_CACHE_SKIP_CLEANUP", "1".to_string()),
    ]
    .into_iter()
    .filter(|(name, _)| env(name).is_none())
    .collect()
}

/// Set in the restarted process: [`keep_in`] restarts at most once.
pub const RESTARTED: &str = "FEDGE_GPU_CACHE_RESTARTED";

/// Where the drivers cache compiled shaders in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caches {
    /// Mesa's (`MESA_SHADER_CACHE_DIR`).
    pub mesa: String,
    /// NVIDIA's (`__GL_SHADER_DISK_CACHE_PATH`).
    pub nvidia: String,
}

impl std::fmt::Display for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mesa's in {}, NVIDIA's in {}", self.mesa, self.nvidia)
    }
}

/// Makes this process's GPU drivers cache in `state_dir`'s [`cache_dir`]: creates the folder
/// and, when a variable is missing, starts the process again with it set (`exec`: this returns
/// in the new process, which has them all). Where the caches are once that is done; an error
/// when the folder cannot be made or the restart failed (the drivers then cache where they
/// like, and the device goes on).
pub fn keep_in(state_dir: &Path) -> Result<Caches, std::io::Error> {
    let dir = cache_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let mut vars = missing(&dir, |name| std::env::var(name).ok());
    if !vars.is_empty() {
        // Restarted once already and still without them: something strips the environment;
        // starting again would loop.
        if std::env::var_os(RESTARTED).is_some() {
            return Err(std::io::Error::other(format!(
                "{} still unset after a restart",
                vars.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
            )));
        }
        tracing::info!("starting again with the GPU drivers' shader caches in {}", dir.display());
        vars.push((RESTARTED, "1".to_string()));
        return Err(restart_with(&vars));
    }
    let var = |name| std::env::var(name).unwrap_or_default();
    Ok(Caches { mesa: var("MESA_SHADER_CACHE_DIR"), nvidia: var("__GL_SHADER_DISK_CACHE_PATH") })
}

/// Replaces this process with itself, `vars` added to its environment. Returns only if that
/// failed (the caller then goes on without the cache).
#[cfg(unix)]
pub fn restart_with(vars: &[(&'static str, String)]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(vars.iter().cloned()).exec()
}

/// Elsewhere the drivers keep their own default caches.
#[cfg(not(unix))]
pub fn restart_with(_vars: &[(&'static str, String)]) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, "restarting with a new environment")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unset_variables_are_added() {
        let dir = cache_dir(Path::new("/var/lib/fedge"));
        let all = missing(&dir, |_| None);
        assert_eq!(all.len(), 4);
        assert!(all.contains(&("MESA_SHADER_CACHE_DIR", "/var/lib/fedge/gpu-cache".to_string())));
        assert!(all.contains(&("__GL_SHADER_DISK_CACHE_PATH", "/var/lib/fedge/gpu-cache".to_string())));
        // Set by the operator (or by the restart itself): kept, so a restart happens once.
        let set = |name: &str| (name == "MESA_SHADER_CACHE_DIR").then(|| "/elsewhere".to_string());
        let rest = missing(&dir, set);
        assert_eq!(rest.len(), 3);
        assert!(rest.iter().all(|(name, _)| *name != "MESA_SHADER_CACHE_DIR"));
        let everything = |_: &str| Some("x".to_string());
        assert!(missing(&dir, everything).is_empty());
    }
}
