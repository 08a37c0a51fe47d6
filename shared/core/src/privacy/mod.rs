//! Differential privacy: the mechanisms and the accounting, as plain maths.
//!
//! - [`clip`]: per-update L2 clipping (the sensitivity bound).
//! - [`adaptive_clip`]: a clip norm that tracks a quantile of update norms (Andrew et al. 2021).
//! - [`noise`]: Gaussian noise, on the caller's RNG.
//! - [`analytic_gaussian`]: the exact (epsilon, delta) calibration of Gaussian noise (Balle and
//!   Wang 2018), for local DP.
//! - [`rdp`]: the Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism (Mironov
//!   et al. 2019) and its conversion to (epsilon, delta); noise calibration for a target.
//! - [`ledger`]: the per-round record of what a training run has spent.
//!
//! Nothing here knows about rounds in progress, sockets or models; the coordinator and the
//! simulator call into it.

pub mod adaptive_clip;
pub mod analytic_gaussian;
pub mod clip;
pub mod ledger;
pub mod noise;
pub mod rdp;
mod special;

pub use adaptive_clip::{AdaptiveClip, AdaptiveClipConfig};
pub use analytic_gaussian::calibrate_analytic_gaussian;
pub use clip::{ClipOutcome, clip_l2, l2_norm};
pub use ledger::{LedgerEntry, PrivacyLedger};
pub use noise::{add_gaussian_noise, add_gaussian_noise_f64};
pub use rdp::{EpsilonAt, RdpAccountant, calibrate_noise_multiplier, epsilon};

use thiserror::Error;

/// A privacy parameter out of its domain.
#[derive(Debug, Error, PartialEq)]
pub enum PrivacyError {
    /// Noise multiplier not positive and finite.
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    /// Sampling rate outside (0, 1].
    #[error("sampling rate must be in (0, 1], got {0}")]
    SamplingRate(f64),
    /// Delta outside (0, 1).
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    /// Epsilon not positive and finite.
    #[error("epsilon must be positive and finite, got {0}")]
    Epsilon(f64),
    /// Zero steps.
    #[error("steps must be at least 1")]
    Steps,
    /// Bad Rényi orders.
    #[error("invalid orders: {0}")]
    Orders(String),
    /// Sensitivity not positive and finite.
    #[error("sensitivity must be positive and finite, got {0}")]
    Sensitivity(f64),
    /// Clip norm not positive and finite.
    #[error("clip norm must be positive and finite, got {0}")]
    ClipNorm(f64),
    /// Bad adaptive clipping settings.
    #[error("adaptive clipping: {0}")]
    Adaptive(String),
    /// No noise multiplier up to 1e6 reaches the target.
    #[error("no noise multiplier up to 1e6 reaches epsilon {0}")]
    Unreachable(f64),
}
