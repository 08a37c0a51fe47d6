//! Choosing a strategy by name: [`StrategyOptions`] are the keys a configuration file's
//! `[strategy_options]` table and the command line may set, [`StrategyConfig`] the checked
//! choice they make together with the strategy's name.

use serde::{Deserialize, Serialize};

/// Every strategy name, in the order the help text lists them.
pub const NAMES: [&str; 13] = [
    "fedavg",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "fedprox",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "norm-bound",
    "centered-clip",
    "fltrust",
];

/// The default bound on the memory a rule that holds the round's updates may use.
pub const DEFAULT_MAX_BUFFER_MB: u64 = 4096;

/// FLTrust's root set when none is configured: the paper's 100 examples.
pub const DEFAULT_ROOT_EXAMPLES: usize = 100;

/// The largest root set accepted (the server trains on it every round).
pub const MAX_ROOT_EXAMPLES: usize = 100_000;

/// The largest `bucket_size` accepted (a bucket that size already averages a whole round of
/// any sane cohort into one input).
pub const MAX_BUCKET_SIZE: usize = 1000;

/// A strategy's parameters as a configuration file or the command line gives them; `None`
/// takes the strategy's default. A key the chosen strategy does not read is refused, so a typo
/// of the strategy's name cannot silently drop a setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyOptions {
    /// Server learning rate eta (fedavg, fedavgm, fedadagrad, fedadam, fedyogi).
    pub server_lr: Option<f64>,
    /// Server momentum beta (fedavgm; default 0.9).
    pub server_momentum: Option<f64>,
    /// First-moment decay beta1 (fedadagrad, fedadam, fedyogi; default 0.9).
    pub beta1: Option<f64>,
    /// Second-moment decay beta2 (fedadam, fedyogi; default 0.99).
    pub beta2: Option<f64>,
    /// Adaptivity tau (fedadagrad, fedadam, fedyogi; default 1e-3).
    pub tau: Option<f64>,
    /// FedProx's proximal weight mu (default 0.01).
    pub proximal_mu: Option<f64>,
    /// Fraction trimmed from each side of every coordinate (trimmed-mean; default 0.2).
    pub trim_fraction: Option<f64>,
    /// Byzantine devices f the rule must tolerate (krum, multi-krum; default the most it
    /// can: floor((n - 3) / 2) of n results).
    pub byzantine: Option<usize>,
    /// Updates multi-krum averages (default n - f).
    pub krum_select: Option<usize>,
    /// The L2 bound on each update (norm-bound; default the median norm of the round).
    pub norm_bound: Option<f64>,
    /// Centered clipping's radius tau (default the median distance to the centre).
    pub clip_radius: Option<f64>,
    /// Centered clipping's iterations (default 3).
    pub clip_iters: Option<u32>,
    /// The most memory, in MiB, the round's held updates may take (median, trimmed-mean,
    /// krum, multi-krum, norm-bound without a bound, centered-clip, fltrust; default 4096).
    pub max_buffer_mb: Option<u64>,
    /// Bucketing (Karimireddy, He and Jaggi 2022): the rule sees the sample-weighted means of
    /// buckets of this many randomly permuted updates (median, trimmed-mean, krum, multi-krum,
    /// norm-bound, centered-clip; 1 to 1000, default 1: no bucketing).
    pub bucket_size: Option<usize>,
    /// FLTrust's root set: the clean examples the server trains its reference update on each
    /// round, held out from the devices (fltrust; 1 to 100,000, default 100 as in the paper).
    pub root_examples: Option<usize>,
    /// The norm FLTrust rescales every update to: `reference` (the server's update, as in the
    /// paper; default) or `median` (the median norm of the round's updates).
    pub fltrust_norm: Option<TrustNorm>,
}

/// The norm FLTrust rescales updates to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustNorm {
    /// The server's reference update's (Cao et al. 2021).
    #[default]
    Reference,
    /// The median norm of the round's updates.
    Median,
}

impl std::str::FromStr for TrustNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reference" => Ok(Self::Reference),
            "median" => Ok(Self::Median),
            other => Err(format!("unknown fltrust_norm `{other}` (expected reference or median)")),
        }
    }
}

/// A strategy and its parameters, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StrategyConfig {
    /// FedAvg (DP-FedAvg under central DP).
    FedAvg {
        /// Step size on the mean delta.
        server_lr: f64,
    },
    /// FedAvg with server momentum.
    FedAvgM {
        /// Step size.
        server_lr: f64,
        /// Momentum.
        momentum: f64,
    },
    /// Adaptive server optimisers of Reddi et al. 2021.
    FedOpt {
        /// Which one.
        kind: FedOptKind,
        /// Step size eta.
        server_lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay (unused by FedAdagrad).
        beta2: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// FedAvg on the server, the proximal term on the devices.
    FedProx {
        /// mu.
        mu: f64,
    },
    /// Coordinate-wise median.
    Median {
        /// Updates averaged per bucket (1: none).
        bucket_size: usize,
    },
    /// Coordinate-wise trimmed mean.
    TrimmedMean {
        /// Fraction trimmed from each side.
        fraction: f64,
        /// Updates averaged per bucket (1: none).
        bucket_size: usize,
    },
    /// Krum (`select: None`) or Multi-Krum.
    Krum {
        /// Byzantine devices tolerated (`None`: the most the round's size allows).
        byzantine: Option<usize>,
        /// Multi-Krum: updates averaged (`Some(None)`: n - f). `None`: Krum.
        select: Option<Option<usize>>,
        /// Updates averaged per bucket (1: none); `byzantine` and `select` then count buckets.
        bucket_size: usize,
    },
    /// Norm bounding.
    NormBound {
        /// The bound (`None`: the round's median norm).
        bound: Option<f64>,
        /// Updates averaged per bucket (1: none).
        bucket_size: usize,
    },
    /// Centered clipping.
    CenteredClip {
        /// The radius (`None`: the median distance to the centre, each iteration).
        radius: Option<f64>,
        /// Iterations.
        iters: u32,
        /// Updates averaged per bucket (1: none).
        bucket_size: usize,
    },
    /// FLTrust: updates scored by their cosine with the server's own update on a root set.
    FlTrust {
        /// Examples in the server's root set.
        root_examples: usize,
        /// The norm updates are rescaled to.
        norm: TrustNorm,
    },
}

/// Which adaptive server optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedOptKind {
    /// FedAdagrad.
    Adagrad,
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg { server_lr: 1.0 }
    }
}

impl StrategyConfig {
    /// The strategy called `name` with `options`; an unknown name, a key the strategy does
    /// not read, or a value out of range is refused in one line.
    pub fn parse(name: &str, options: &StrategyOptions) -> Result<Self, String> {
        let o = options;
        let given: [(&str, bool); 16] = [
            ("server_lr", o.server_lr.is_some()),
            ("server_momentum", o.server_momentum.is_some()),
            ("beta1", o.beta1.is_some()),
            ("beta2", o.beta2.is_some()),
            ("tau", o.tau.is_some()),
            ("proximal_mu", o.proximal_mu.is_some()),
            ("trim_fraction", o.trim_fraction.is_some()),
            ("byzantine", o.byzantine.is_some()),
            ("krum_select", o.krum_select.is_some()),
            ("norm_bound", o.norm_bound.is_some()),
            ("clip_radius", o.clip_radius.is_some()),
            ("clip_iters", o.clip_iters.is_some()),
            ("max_buffer_mb", o.max_buffer_mb.is_some()),
            ("bucket_size", o.bucket_size.is_some()),
            ("root_examples", o.root_examples.is_some()),
            ("fltrust_norm", o.fltrust_norm.is_some()),
        ];
        let Some(reads) = keys_read_by(name) else {
            return Err(format!("unknown strategy `{name}`; choose one of {}", NAMES.join(", ")));
        };
        if let Some((key, _)) = given.iter().find(|(k, set)| *set && !reads.contains(k)) {
            let by: Vec<&str> =
                NAMES.into_iter().filter(|n| keys_read_by(n).is_some_and(|r| r.contains(key))).collect();
            return Err(format!("strategy option `{key}` does not apply to {name} (it is read by {})", by.join(", ")));
        }
        let lr = |default| range("server_lr", o.server_lr.unwrap_or(default), 0.0, false, 1e3, true);
        let unit = |key, v: Option<f64>, default| range(key, v.unwrap_or(default), 0.0, true, 1.0, false);
        let tau = || range("tau", o.tau.unwrap_or(1e-3), 0.0, false, 1e3, true);
        let fedopt = |kind, default_lr| -> Result<Self, String> {
            Ok(StrategyConfig::FedOpt {
                kind,
                server_lr: lr(default_lr)?,
                beta1: unit("beta1", o.beta1, 0.9)?,
                beta2: unit("beta2", o.beta2, 0.99)?,
                tau: tau()?,
            })
        };
        if let Some(mb) = o.max_buffer_mb
            && !(1..=1 << 24).contains(&mb)
        {
            return Err(format!("max_buffer_mb must be 1 to {}, got {mb}", 1u64 << 24));
        }
        let bucket_size = match o.bucket_size.unwrap_or(1) {
            s @ 1..=MAX_BUCKET_SIZE => s,
            s => return Err(format!("bucket_size must be 1 to {MAX_BUCKET_SIZE}, got {s}")),
        };
        Ok(match name {
            "fedavg" => StrategyConfig::FedAvg { server_lr: lr(1.0)? },
            "fedavgm" => StrategyConfig::FedAvgM {
                server_lr: lr(1.0)?,
                momentum: unit("server_momentum", o.server_momentum, 0.9)?,
            },
            "fedadagrad" => fedopt(FedOptKind::Adagrad, 0.1)?,
            "fedadam" => fedopt(FedOptKind::Adam, 0.01)?,
            "fedyogi" => fedopt(FedOptKind::Yogi, 0.01)?,
            "fedprox" => StrategyConfig::FedProx {
                mu: range("proximal_mu", o.proximal_mu.unwrap_or(0.01), 0.0, true, 1e6, true)?,
            },
            "median" => StrategyConfig::Median { bucket_size },
            "trimmed-mean" => StrategyConfig::TrimmedMean {
                fraction: range("trim_fraction", o.trim_fraction.unwrap_or(0.2), 0.0, true, 0.5, false)?,
                bucket_size,
            },
            "krum" | "multi-krum" => {
                if let Some(f) = o.byzantine
                    && f > crate::config::MAX_MIN_CLIENTS
                {
                    return Err(format!("byzantine must be at most {}, got {f}", crate::config::MAX_MIN_CLIENTS));
                }
                if o.krum_select == Some(0) {
                    return Err("krum_select must be at least 1".into());
                }
                let select = (name == "multi-krum").then_some(o.krum_select);
                StrategyConfig::Krum { byzantine: o.byzantine, select, bucket_size }
            }
            "norm-bound" => StrategyConfig::NormBound {
                bound: o.norm_bound.map(|b| range("norm_bound", b, 0.0, false, 1e12, true)).transpose()?,
                bucket_size,
            },
            "centered-clip" => StrategyConfig::CenteredClip {
                radius: o.clip_radius.map(|r| range("clip_radius", r, 0.0, false, 1e12, true)).transpose()?,
                iters: match o.clip_iters.unwrap_or(3) {
                    i @ 1..=100 => i,
                    i => return Err(format!("clip_iters must be 1 to 100, got {i}")),
                },
                bucket_size,
            },
            "fltrust" => StrategyConfig::FlTrust {
                root_examples: match o.root_examples.unwrap_or(DEFAULT_ROOT_EXAMPLES) {
                    n @ 1..=MAX_ROOT_EXAMPLES => n,
                    n => return Err(format!("root_examples must be 1 to {MAX_ROOT_EXAMPLES}, got {n}")),
                },
                norm: o.fltrust_norm.unwrap_or_default(),
            },
            _ => unreachable!("every name was matched above"),
        })
    }

    /// The strategy's name.
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg { .. } => "fedavg",
            StrategyConfig::FedAvgM { .. } => "fedavgm",
            StrategyConfig::FedOpt { kind: FedOptKind::Adagrad, .. } => "fedadagrad",
            StrategyConfig::FedOpt { kind: FedOptKind::Adam, .. } => "fedadam",
            StrategyConfig::FedOpt { kind: FedOptKind::Yogi, .. } => "fedyogi",
            StrategyConfig::FedProx { .. } => "fedprox",
            StrategyConfig::Median { .. } => "median",
            StrategyConfig::TrimmedMean { .. } => "trimmed-mean",
            StrategyConfig::Krum { select: None, .. } => "krum",
            StrategyConfig::Krum { select: Some(_), .. } => "multi-krum",
            StrategyConfig::NormBound { .. } => "norm-bound",
            StrategyConfig::CenteredClip { .. } => "centered-clip",
            StrategyConfig::FlTrust { .. } => "fltrust",
        }
    }

    /// Updates averaged per bucket before the rule sees them (1: no bucketing, and for every
    /// strategy that does not bucket).
    pub fn bucket_size(&self) -> usize {
        match *self {
            StrategyConfig::Median { bucket_size }
            | StrategyConfig::TrimmedMean { bucket_size, .. }
            | StrategyConfig::Krum { bucket_size, .. }
            | StrategyConfig::NormBound { bucket_size, .. }
            | StrategyConfig::CenteredClip { bucket_size, .. } => bucket_size,
            _ => 1,
        }
    }

    /// Whether the rule holds every update of a round (it cannot stream). Norm bounding with a
    /// fixed bound streams unless it buckets (a bucket's members are known only once the round
    /// is in).
    pub fn holds_updates(&self) -> bool {
        match self {
            StrategyConfig::Median { .. }
            | StrategyConfig::TrimmedMean { .. }
            | StrategyConfig::Krum { .. }
            | StrategyConfig::CenteredClip { .. }
            | StrategyConfig::FlTrust { .. } => true,
            StrategyConfig::NormBound { bound, bucket_size } => bound.is_none() || *bucket_size > 1,
            _ => false,
        }
    }

    /// Whether the rule combines the round's updates jointly (robust rules), so that one
    /// device can move its output by more than its own clipped update divided by the round's
    /// size: the bound central DP's accountant assumes does not hold.
    pub fn is_robust(&self) -> bool {
        matches!(
            self,
            StrategyConfig::Median { .. }
                | StrategyConfig::TrimmedMean { .. }
                | StrategyConfig::Krum { .. }
                | StrategyConfig::NormBound { .. }
                | StrategyConfig::CenteredClip { .. }
                | StrategyConfig::FlTrust { .. }
        )
    }

    /// The server's root set size, for a rule that trains a reference update on one (FLTrust).
    pub fn root_examples(&self) -> Option<usize> {
        match *self {
            StrategyConfig::FlTrust { root_examples, .. } => Some(root_examples),
            _ => None,
        }
    }
}

/// The option keys strategy `name` reads (`None`: no such strategy).
fn keys_read_by(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "fedavg" => &["server_lr"],
        "fedavgm" => &["server_lr", "server_momentum"],
        "fedadagrad" => &["server_lr", "beta1", "tau"],
        "fedadam" | "fedyogi" => &["server_lr", "beta1", "beta2", "tau"],
        "fedprox" => &["proximal_mu"],
        "median" => &["max_buffer_mb", "bucket_size"],
        "trimmed-mean" => &["trim_fraction", "max_buffer_mb", "bucket_size"],
        "krum" => &["byzantine", "max_buffer_mb", "bucket_size"],
        "multi-krum" => &["byzantine", "krum_select", "max_buffer_mb", "bucket_size"],
        "norm-bound" => &["norm_bound", "max_buffer_mb", "bucket_size"],
        "centered-clip" => &["clip_radius", "clip_iters", "max_buffer_mb", "bucket_size"],
        "fltrust" => &["root_examples", "fltrust_norm", "max_buffer_mb"],
        _ => return None,
    })
}

/// `value` within (or at, when `*_closed`) `lo` and `hi`, and finite.
fn range(key: &str, value: f64, lo: f64, lo_closed: bool, hi: f64, hi_closed: bool) -> Result<f64, String> {
    let above = if lo_closed { value >= lo } else { value > lo };
    let below = if hi_closed { value <= hi } else { value < hi };
    if value.is_finite() && above && below {
        Ok(value)
    } else {
        let (l, h) = (if lo_closed { "[" } else { "(" }, if hi_closed { "]" } else { ")" });
        Err(format!("{key} must be in {l}{lo}, {hi}{h}, got {value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_their_defaults() {
        for name in NAMES {
            let c = StrategyConfig::parse(name, &StrategyOptions::default()).unwrap();
            assert_eq!(c.name(), name);
        }
        assert_eq!(
            StrategyConfig::parse("trimmed-mean", &StrategyOptions::default()),
            Ok(StrategyConfig::TrimmedMean { fraction: 0.2, bucket_size: 1 })
        );
    }

    #[test]
    fn bad_names_keys_and_values_are_refused_in_one_line() {
        let err = |name: &str, o: StrategyOptions| StrategyConfig::parse(name, &o).unwrap_err();
        let none = StrategyOptions::default();
        assert!(err("fedsgd", none).starts_with("unknown strategy `fedsgd`; choose one of fedavg, fedavgm"));
        let e = err("krum", StrategyOptions { trim_fraction: Some(0.1), ..none });
        assert_eq!(e, "strategy option `trim_fraction` does not apply to krum (it is read by trimmed-mean)");
        let e = err("median", StrategyOptions { tau: Some(0.1), ..none });
        assert_eq!(e, "strategy option `tau` does not apply to median (it is read by fedadagrad, fedadam, fedyogi)");
        assert_eq!(
            err("trimmed-mean", StrategyOptions { trim_fraction: Some(0.5), ..none }),
            "trim_fraction must be in [0, 0.5), got 0.5"
        );
        assert_eq!(err("fedadam", StrategyOptions { beta2: Some(1.0), ..none }), "beta2 must be in [0, 1), got 1");
        assert!(err("fedavg", StrategyOptions { server_lr: Some(f64::NAN), ..none }).starts_with("server_lr must be"));
        assert!(err("fedavg", StrategyOptions { server_lr: Some(0.0), ..none }).starts_with("server_lr must be"));
        assert_eq!(
            err("multi-krum", StrategyOptions { krum_select: Some(0), ..none }),
            "krum_select must be at least 1"
        );
        assert_eq!(
            err("centered-clip", StrategyOptions { clip_iters: Some(0), ..none }),
            "clip_iters must be 1 to 100, got 0"
        );
        assert!(err("median", StrategyOptions { max_buffer_mb: Some(0), ..none }).starts_with("max_buffer_mb must"));
        assert!(err("fedprox", StrategyOptions { proximal_mu: Some(-1.0), ..none }).starts_with("proximal_mu must"));
    }

    #[test]
    fn bucket_size_is_read_by_the_rules_that_hold_updates() {
        let o = |s| StrategyOptions { bucket_size: Some(s), ..StrategyOptions::default() };
        for name in ["median", "trimmed-mean", "krum", "multi-krum", "norm-bound", "centered-clip"] {
            assert_eq!(StrategyConfig::parse(name, &o(2)).unwrap().bucket_size(), 2, "{name}");
            assert_eq!(StrategyConfig::parse(name, &StrategyOptions::default()).unwrap().bucket_size(), 1);
            assert_eq!(StrategyConfig::parse(name, &o(0)).unwrap_err(), "bucket_size must be 1 to 1000, got 0");
            assert_eq!(StrategyConfig::parse(name, &o(1001)).unwrap_err(), "bucket_size must be 1 to 1000, got 1001");
        }
        assert!(StrategyConfig::parse("median", &o(MAX_BUCKET_SIZE)).is_ok());
        for name in ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox"] {
            assert_eq!(
                StrategyConfig::parse(name, &o(2)).unwrap_err(),
                format!(
                    "strategy option `bucket_size` does not apply to {name} (it is read by median, trimmed-mean, \
                     krum, multi-krum, norm-bound, centered-clip)"
                )
            );
        }
        // A fixed norm bound streams, unless it buckets.
        let fixed = |s| StrategyOptions { norm_bound: Some(1.0), bucket_size: Some(s), ..StrategyOptions::default() };
        assert!(!StrategyConfig::parse("norm-bound", &fixed(1)).unwrap().holds_updates());
        assert!(StrategyConfig::parse("norm-bound", &fixed(2)).unwrap().holds_updates());
        let o: StrategyOptions = toml::from_str("bucket_size = 2").unwrap();
        assert_eq!(StrategyConfig::parse("median", &o), Ok(StrategyConfig::Median { bucket_size: 2 }));
    }

    #[test]
    fn fltrust_reads_its_root_set_size() {
        let o = |n| StrategyOptions { root_examples: Some(n), ..StrategyOptions::default() };
        let c = StrategyConfig::parse("fltrust", &StrategyOptions::default()).unwrap();
        assert_eq!(
            (c, c.root_examples(), c.is_robust(), c.holds_updates()),
            (StrategyConfig::FlTrust { root_examples: 100, norm: TrustNorm::Reference }, Some(100), true, true)
        );
        assert_eq!(StrategyConfig::parse("fltrust", &o(600)).unwrap().root_examples(), Some(600));
        assert_eq!(StrategyConfig::parse("fltrust", &o(0)).unwrap_err(), "root_examples must be 1 to 100000, got 0");
        assert_eq!(
            StrategyConfig::parse("median", &o(10)).unwrap_err(),
            "strategy option `root_examples` does not apply to median (it is read by fltrust)"
        );
        assert_eq!(
            StrategyConfig::parse("fltrust", &StrategyOptions { bucket_size: Some(2), ..StrategyOptions::default() })
                .unwrap_err(),
            "strategy option `bucket_size` does not apply to fltrust (it is read by median, trimmed-mean, krum, \
             multi-krum, norm-bound, centered-clip)"
        );
        assert_eq!(StrategyConfig::default().root_examples(), None);
        let o: StrategyOptions = toml::from_str("root_examples = 1000\nfltrust_norm = \"median\"").unwrap();
        assert_eq!(
            StrategyConfig::parse("fltrust", &o),
            Ok(StrategyConfig::FlTrust { root_examples: 1000, norm: TrustNorm::Median })
        );
        assert!(toml::from_str::<StrategyOptions>("fltrust_norm = \"mean\"").is_err());
        assert_eq!(
            "mean".parse::<TrustNorm>().unwrap_err(),
            "unknown fltrust_norm `mean` (expected reference or median)"
        );
    }

    #[test]
    fn options_parse_from_a_table_and_refuse_unknown_keys() {
        let o: StrategyOptions = toml::from_str("trim_fraction = 0.1\nmax_buffer_mb = 64").unwrap();
        assert_eq!(
            StrategyConfig::parse("trimmed-mean", &o),
            Ok(StrategyConfig::TrimmedMean { fraction: 0.1, bucket_size: 1 })
        );
        assert!(toml::from_str::<StrategyOptions>("trim = 0.1").is_err());
    }
}
