//! Compute backends, chosen at run time: `cpu` (Fedge's fused CPU kernels, `fedge-kernels`) and
//! `flex` (burn's pure-Rust CPU backend, the reference) always, `wgpu` (Vulkan/Metal/DX12 GPU)
//! when built with the `wgpu` feature.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use thiserror::Error;

/// Which burn backend to train and evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Fedge's fused CPU training and evaluation (`fedge-kernels`); burn-flex for everything
    /// else (initialisation, distillation, prediction).
    #[default]
    Cpu,
    /// burn-flex on the CPU for everything: burn's autodiff, the reference the fast path is
    /// checked against.
    Flex,
    /// burn-wgpu on the default GPU adapter.
    Wgpu,
}

/// A backend that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackendError {
    /// Not a known backend name.
    #[error("unknown backend `{0}` (expected `cpu`, `flex` or `wgpu`)")]
    Unknown(String),
    /// Known, but compiled out.
    #[error("backend `wgpu` is not compiled in: rebuild with `--features wgpu`")]
    NotCompiled,
}

impl FromStr for BackendKind {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "flex" => Ok(Self::Flex),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
        })
    }
}

impl BackendKind {
    /// The inference device of this backend (no autodiff).
    pub fn device(self) -> Result<Device, BackendError> {
        match self {
            Self::Cpu | Self::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(Default::default())),
            #[cfg(not(feature = "wgpu"))]
            Self::Wgpu => Err(BackendError::NotCompiled),
        }
    }

    /// Whether this build can run the backend.
    pub fn available(self) -> bool {
        self.device().is_ok()
    }
}
