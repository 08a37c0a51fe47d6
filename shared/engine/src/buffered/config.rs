//! How the buffered asynchronous engine runs: [`AsyncConfig`] and the staleness weight
//! [`StalenessWeight`], checked by `validate` with one-line errors.

use fedge_core::wire::TrainConfig;
use thiserror::Error;

use crate::config::{CentralDp, ConfigError, DEFAULT_MAX_SAMPLES_PER_RESULT, EngineConfig};

/// How much a result trained `s` versions ago counts, `w(s)` in (0, 1].
///
/// The functions of Xie et al. 2019 (FedAsync), which FedBuff (Nguyen et al. 2022) reuses;
/// FedBuff's experiments use the polynomial one with exponent 0.5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StalenessWeight {
    /// `w(s) = 1`: staleness ignored.
    Constant,
    /// `w(s) = 1 / (1 + s)^exponent`.
    Polynomial {
        /// The exponent `a` (0.5 in the paper), at least 0.
        exponent: f64,
    },
    /// `w(s) = 1` while `s <= b`, then `1 / (a (s - b) + 1)`.
    Hinge {
        /// The slope `a`, at least 0.
        a: f64,
        /// The staleness `b` up to which results count fully.
        b: u64,
    },
}

impl Default for StalenessWeight {
    fn default() -> Self {
        Self::Polynomial { exponent: DEFAULT_STALENESS_EXPONENT }
    }
}

/// FedBuff's polynomial exponent.
pub const DEFAULT_STALENESS_EXPONENT: f64 = 0.5;
/// The hinge's default slope `a`.
pub const DEFAULT_HINGE_A: f64 = 10.0;
/// The hinge's default knee `b`.
pub const DEFAULT_HINGE_B: u64 = 4;
/// The largest buffer (K) or concurrency a configuration may ask for.
pub const MAX_ASYNC_SIZE: usize = 1_000_000;

impl StalenessWeight {
    /// `w(s)`.
    pub fn weight(&self, staleness: u64) -> f64 {
        let s = staleness as f64;
        match *self {
            Self::Constant => 1.0,
            Self::Polynomial { exponent } => 1.0 / (1.0 + s).powf(exponent),
            Self::Hinge { b, .. } if staleness <= b => 1.0,
            Self::Hinge { a, b } => 1.0 / (a * (s - b as f64) + 1.0),
        }
    }

    /// Short name for reports: `constant`, `polynomial` or `hinge`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Polynomial { .. } => "polynomial",
            Self::Hinge { .. } => "hinge",
        }
    }

    fn validate(&self) -> Result<(), AsyncConfigError> {
        let check = |what: &'static str, v: f64| {
            if v.is_finite() && (0.0..=1e6).contains(&v) { Ok(()) } else { Err(AsyncConfigError::Staleness(what, v)) }
        };
        match *self {
            Self::Constant => Ok(()),
            Self::Polynomial { exponent } => check("staleness exponent", exponent),
            Self::Hinge { a, .. } => check("hinge slope a", a),
        }
    }
}

/// How the buffered asynchronous engine runs (FedBuff).
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncConfig {
    /// K: accepted results per aggregation (10 in the paper).
    pub buffer_size: usize,
    /// The most devices training at once.
    pub max_concurrency: usize,
    /// Results trained more than this many versions ago are refused.
    pub max_staleness: u64,
    /// How staleness discounts a result.
    pub staleness: StalenessWeight,
    /// eta_g: the step taken along the buffer's mean delta (1 in the paper's default).
    pub server_lr: f64,
    /// What devices are asked to do. Local DP (`local_dp`) is refused: see the module docs.
    pub train: TrainConfig,
    /// Central DP (DP-FedBuff, see the module docs): every aggregation adds N(0, (z C)^2) to the
    /// sum of the buffer's clipped, staleness-weighted deltas and is charged as one Gaussian
    /// release without subsampling amplification. Adaptive clipping is refused; `server_lr`
    /// must be 1.
    pub privacy: Option<CentralDp>,
    /// Seed of which free device is tasked next.
    pub seed: u64,
    /// The most samples one result may claim (as in the synchronous engine).
    pub max_samples_per_result: u64,
    /// A device with a result in the open buffer gets no new task until the buffer is
    /// aggregated: each version is made of `buffer_size` different devices (always so under
    /// central DP; a coordinator sets it so that each buffered result is stored under its
    /// device).
    pub one_per_device: bool,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            buffer_size: 10,
            max_concurrency: 100,
            max_staleness: 100,
            staleness: StalenessWeight::default(),
            server_lr: 1.0,
            train: TrainConfig::sgd(5, 10, 0.05),
            privacy: None,
            seed: 0,
            max_samples_per_result: DEFAULT_MAX_SAMPLES_PER_RESULT,
            one_per_device: false,
        }
    }
}

/// An impossible asynchronous configuration, in one line.
#[derive(Debug, Error, PartialEq)]
pub enum AsyncConfigError {
    /// A buffer of none or past [`MAX_ASYNC_SIZE`].
    #[error("buffer_size must be 1 to {MAX_ASYNC_SIZE}, got {0}")]
    BufferSize(usize),
    /// A concurrency of none or past [`MAX_ASYNC_SIZE`].
    #[error("max_concurrency must be 1 to {MAX_ASYNC_SIZE}, got {0}")]
    Concurrency(usize),
    /// A staleness parameter that is negative, absurd or not finite.
    #[error("{0} must be in [0, 1e6], got {1}")]
    Staleness(&'static str, f64),
    /// A server learning rate that is not positive and finite.
    #[error("server_lr must be positive and finite, got {0}")]
    ServerLr(f64),
    /// Privacy settings asynchronous mode does not offer.
    #[error("{0} is not offered in asynchronous (FedBuff) mode: unset it or run the synchronous engine")]
    Privacy(&'static str),
    /// Central DP with a server learning rate other than 1.
    #[error("central DP in FedBuff mode takes the noised mean as it is: server_lr must be 1, got {0}")]
    DpServerLr(f64),
    /// The training settings or the sample bound, as the synchronous engine checks them.
    #[error(transparent)]
    Engine(#[from] ConfigError),
}

impl AsyncConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), AsyncConfigError> {
        if !(1..=MAX_ASYNC_SIZE).contains(&self.buffer_size) {
            return Err(AsyncConfigError::BufferSize(self.buffer_size));
        }
        if !(1..=MAX_ASYNC_SIZE).contains(&self.max_concurrency) {
            return Err(AsyncConfigError::Concurrency(self.max_concurrency));
        }
        self.staleness.validate()?;
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return Err(AsyncConfigError::ServerLr(self.server_lr));
        }
        if self.train.local_dp.is_some() {
            return Err(AsyncConfigError::Privacy("local DP"));
        }
        if let Some(p) = &self.privacy {
            if p.adaptive.is_some() {
                return Err(AsyncConfigError::Privacy("adaptive clipping"));
            }
            if self.server_lr != 1.0 {
                return Err(AsyncConfigError::DpServerLr(self.server_lr));
            }
        }
        // The training keys, the privacy settings and the sample bound are checked exactly as
        // the synchronous engine checks them.
        EngineConfig {
            train: self.train,
            privacy: self.privacy.clone(),
            max_samples_per_result: self.max_samples_per_result,
            seed: self.seed,
            ..EngineConfig::default()
        }
        .validate()?;
        Ok(())
    }
}
