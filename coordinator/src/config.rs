//! `coordinator.toml`: what `fedge-coordinator serve` runs. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedge_core::privacy::AdaptiveClipConfig;
use fedge_engine::{AsyncConfig, ConfigError, EngineConfig, StalenessWeight, StrategyOptions, TrainingKeys};
use serde::{Deserialize, Serialize};

/// The coordinator's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// TCP address of the Prometheus metrics endpoint (`GET /metrics`) and of the operator
    /// page (`GET /`, `GET /api/status`); none if absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token the operator page and its JSON require (`Authorization: Bearer TOKEN`, or
    /// `/?token=TOKEN` in a browser): at least 16 of `A-Z a-z 0-9 - . _ ~`. Required when
    /// `metrics_listen` is not a loopback address; `/metrics` never needs it.
    pub page_token: Option<String>,
    /// Folder made by `fedge-coordinator certs init`.
    pub certs_dir: PathBuf,
    /// Where model versions and the device registry are kept (redb + content-addressed blobs).
    pub state_dir: PathBuf,
    /// `2nn` or `cnn`.
    pub model: String,
    /// Seed of the initial model, of device sampling and of bucketing.
    pub seed: u64,
    /// Dataset whose test split evaluates each new model: `embedded`, `mnist`, `fashion-mnist`.
    pub eval_dataset: String,
    /// Folder with `mnist/` and `fashion-mnist/`.
    pub data_dir: PathBuf,
    /// Fraction of connected devices sampled per round.
    pub fraction: f64,
    /// Fewest results a round needs.
    pub min_train_clients: usize,
    /// Sample this fraction more devices than a round needs and close it when enough have
    /// answered (0.3 = 130%).
    pub over_commit: f64,
    /// Whether a round with failed devices may aggregate.
    pub accept_failures: bool,
    /// With `accept_failures`, the most failed or late devices a round may have and still
    /// aggregate (absent: no bound beyond the quorum).
    pub max_failures: Option<usize>,
    /// Seconds a round waits for results.
    pub round_timeout_secs: u64,
    /// The most samples one device's result may claim (a larger claim weighs this much).
    pub max_samples_per_device: u64,
    /// Local epochs.
    pub epochs: u32,
    /// Local batch size.
    pub batch_size: u32,
    /// Local learning rate.
    pub lr: f32,
    /// L2 bound devices clip their deltas to (C; the starting value with adaptive clipping).
    pub clip_norm: Option<f32>,
    /// Central DP: the coordinator adds N(0, (z C)^2) to the sum of deltas (needs `clip_norm`).
    pub noise_multiplier: Option<f64>,
    /// Central DP: move the clip norm towards a quantile of update norms.
    pub adaptive_clip: Option<AdaptiveClipConfig>,
    /// Local DP: each device makes its own upload (local_epsilon, delta)-DP.
    pub local_epsilon: Option<f64>,
    /// The delta of every (epsilon, delta) reported or enforced.
    pub delta: f64,
    /// Central DP budget: a round that would take epsilon past it does not start.
    pub target_epsilon: Option<f64>,
    /// Distil the global model into an int8 student every this many rounds (none: never).
    pub distill_every: Option<u64>,
    /// Student architecture (`mlp`).
    pub student_model: String,
    /// Also distil, each time a student is distilled, a medium-tier model of this architecture
    /// (`2nn`, `cnn`) for regional aggregators to answer escalations with (registered with role
    /// `regional`). Absent: none.
    pub regional_model: Option<String>,
    /// Training images of `eval_dataset` (from the end of its training split) used, without
    /// their labels, as the distillation proxy set.
    pub proxy_examples: usize,
    /// How to distil.
    pub distill: fedge_learn::DistillConfig,
    /// Promote each new student at once (else an operator runs `models promote`).
    pub auto_promote: bool,
    /// Where registry blobs live, as an object-store URL (`file:///srv/blobs`; `s3://bucket/p`
    /// with the `s3` build feature). Absent: `state_dir/registry` on the local filesystem.
    pub blob_store: Option<String>,
    /// Inference on escalated requests: batching window, batch size, per-device rate limit.
    pub inference: crate::inference::InferenceConfig,
    /// The longest step one round may move the global model (L2 norm of the change); a round
    /// whose aggregate goes further fails and the model stays. Absent: no bound.
    pub max_step_norm: Option<f64>,
    /// Aggregation strategy by name (`fedavg`, `fedadam`, `trimmed-mean`, ...; see
    /// docs/operations.md).
    pub strategy: String,
    /// The strategy's parameters (the `[strategy_options]` table).
    pub strategy_options: StrategyOptions,
    /// FedBuff mode (buffered asynchronous aggregation) when the `[fedbuff]` table is present:
    /// no rounds; devices train whenever free on the newest model and every `buffer_size`
    /// results make a version.
    pub fedbuff: Option<FedBuffKeys>,
    /// The most samples a regional aggregator's result may claim (the total of the devices it
    /// speaks for; a device's own bound is `max_samples_per_device`).
    pub max_samples_per_region: u64,
    /// Makes this coordinator a regional aggregator of the root named here (the `[upstream]`
    /// table): its devices connect to it, and it takes part in the root's rounds with their
    /// weighted mean.
    pub upstream: Option<UpstreamKeys>,
    /// Secure aggregation (SecAgg+): each round's devices enter their clipped, weighted updates
    /// into a masked sum and the coordinator learns only the sum (docs/secagg.md). Needs
    /// `clip_norm`.
    pub secure_aggregation: bool,
    /// Seconds each of the four SecAgg stages waits for its devices.
    pub secagg_stage_secs: u64,
    /// SecAgg neighbours per device (default about `3 log2 m` for `m` devices).
    pub secagg_degree: Option<u32>,
    /// SecAgg's Shamir threshold (default `floor(k/2) + 1`).
    pub secagg_threshold: Option<u32>,
    /// Quantisation steps per unit (default `2^20 / clip_norm`).
    pub secagg_scale: Option<f32>,
    /// `W`: a device's FedAvg weight inside the secure sum is `min(samples, W) / W` (a device
    /// with more examples counts as `W`). Near the largest device's size keeps the weights
    /// precise after quantisation.
    pub secagg_weight_cap: u64,
    /// Distributed DP (`noise_multiplier` with `secure_aggregation`): the sum still carries
    /// the full noise when up to this fraction of a round's selected devices drop (default 0.2).
    pub dp_dropout_tolerance: Option<f64>,
}

/// The `[upstream]` table: the root a regional aggregator joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamKeys {
    /// The root's UDP address, `host:port` (a name, e.g. a Kubernetes Service's, is looked up
    /// at every connection).
    pub address: String,
    /// The name the root's certificate carries.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA that signed the root's certificate (PEM).
    pub ca: PathBuf,
    /// This aggregator's certificate (`fedge-coordinator certs issue-aggregator NAME`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The fleet's model-signing public key: regional models from the root must be signed with
    /// it. Absent: `model-signing.pub` in `certs_dir`, if there is one.
    #[serde(default)]
    pub model_key: Option<PathBuf>,
    /// The share of its devices' escalations the region sends on to the root, calibrated on
    /// `calibration_examples` test images of `eval_dataset` (the rest it answers with the
    /// root's regional model, when `[inference]` is enabled).
    #[serde(default = "default_escalate_rate")]
    pub escalate_rate: f64,
    /// Unlabelled images (from the end of `eval_dataset`'s test split) the escalation
    /// threshold is calibrated on.
    #[serde(default = "default_calibration_examples")]
    pub calibration_examples: usize,
}

fn default_escalate_rate() -> f64 {
    0.1
}

fn default_calibration_examples() -> usize {
    1000
}

/// The first of `keys` that is set (a key a mode does not offer).
fn first_set<'a>(keys: &[(&'a str, bool)]) -> Option<&'a str> {
    keys.iter().find(|(_, set)| *set).map(|(key, _)| *key)
}

fn default_server_name() -> String {
    "localhost".into()
}

/// The `[fedbuff]` table: FedBuff (Nguyen et al. 2022) in the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedBuffKeys {
    /// K: results per aggregation (each from a different device).
    pub buffer_size: usize,
    /// The most devices training at once.
    pub max_concurrency: usize,
    /// Results trained more than this many versions ago are refused.
    pub max_staleness: u64,
    /// How staleness discounts a result: `constant`, `polynomial` (1/(1+s)^staleness_exponent)
    /// or `hinge` (1 up to hinge_b, then 1/(hinge_a (s - hinge_b) + 1)).
    pub staleness: String,
    /// The polynomial weight's exponent.
    pub staleness_exponent: f64,
    /// The hinge's slope.
    pub hinge_a: f64,
    /// The hinge's knee.
    pub hinge_b: u64,
}

impl Default for FedBuffKeys {
    fn default() -> Self {
        use fedge_engine::buffered::{DEFAULT_HINGE_A, DEFAULT_HINGE_B, DEFAULT_STALENESS_EXPONENT};
        Self {
            buffer_size: 10,
            max_concurrency: 20,
            max_staleness: 100,
            staleness: "polynomial".into(),
            staleness_exponent: DEFAULT_STALENESS_EXPONENT,
            hinge_a: DEFAULT_HINGE_A,
            hinge_b: DEFAULT_HINGE_B,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4433".parse().expect("valid address"),
            metrics_listen: None,
            page_token: None,
            certs_dir: PathBuf::from("certs/fleet"),
            state_dir: PathBuf::from("coordinator-state"),
            model: "2nn".into(),
            seed: 0,
            eval_dataset: "embedded".into(),
            data_dir: PathBuf::from("data"),
            fraction: 1.0,
            min_train_clients: 2,
            over_commit: 0.0,
            accept_failures: true,
            max_failures: None,
            round_timeout_secs: 60,
            max_samples_per_device: fedge_engine::config::DEFAULT_MAX_SAMPLES_PER_RESULT,
            epochs: 1,
            batch_size: 10,
            lr: 0.05,
            clip_norm: Some(10.0),
            noise_multiplier: None,
            adaptive_clip: None,
            local_epsilon: None,
            delta: 1e-5,
            target_epsilon: None,
            distill_every: None,
            student_model: "mlp".into(),
            regional_model: None,
            proxy_examples: 2000,
            distill: fedge_learn::DistillConfig::default(),
            auto_promote: true,
            blob_store: None,
            inference: crate::inference::InferenceConfig::default(),
            max_step_norm: None,
            strategy: "fedavg".into(),
            strategy_options: StrategyOptions::default(),
            fedbuff: None,
            max_samples_per_region: crate::server::DEFAULT_MAX_SAMPLES_PER_REGION,
            upstream: None,
            secure_aggregation: false,
            secagg_stage_secs: 30,
            secagg_degree: None,
            secagg_threshold: None,
            secagg_scale: None,
            secagg_weight_cap: 1000,
            dp_dropout_tolerance: None,
        }
    }
}

impl ServeConfig {
    /// Secure aggregation's settings when `secure_aggregation = true`, checked; what it does
    /// not combine with is refused in one line. (The strategy is checked against the engine:
    /// [`crate::server::Coordinator::set_secure_aggregation`].)
    pub fn secure(&self) -> Result<Option<crate::server::SecureSettings>, String> {
        if !self.secure_aggregation {
            let set = [
                ("secagg_degree", self.secagg_degree.is_some()),
                ("secagg_threshold", self.secagg_threshold.is_some()),
                ("secagg_scale", self.secagg_scale.is_some()),
                ("dp_dropout_tolerance", self.dp_dropout_tolerance.is_some()),
            ];
            return match first_set(&set) {
                Some(key) => Err(format!("{key} needs secure_aggregation = true")),
                None => Ok(None),
            };
        }
        let Some(clip) = self.clip_norm else {
            return Err("secure_aggregation needs clip_norm: updates are clipped to it and quantised within it".into());
        };
        let refused = [
            ("adaptive_clip (it needs each update's norm)", self.adaptive_clip.is_some()),
            (
                "local_epsilon together with noise_multiplier (choose local or distributed DP)",
                self.local_epsilon.is_some() && self.noise_multiplier.is_some(),
            ),
            ("[fedbuff]", self.fedbuff.is_some()),
            ("[upstream] (a region's devices' updates would be summed in the clear)", self.upstream.is_some()),
        ];
        if let Some(key) = first_set(&refused) {
            return Err(format!("secure_aggregation is not offered with {key}"));
        }
        if !(1..=3600).contains(&self.secagg_stage_secs) {
            return Err(format!("secagg_stage_secs must be 1 to 3600, got {}", self.secagg_stage_secs));
        }
        if 4 * self.secagg_stage_secs >= self.round_timeout_secs {
            return Err(format!(
                "round_timeout_secs = {} must leave the four SecAgg stages (4 x secagg_stage_secs = {}) after training",
                self.round_timeout_secs,
                4 * self.secagg_stage_secs
            ));
        }
        fedge_secagg::weighting::check_degree_threshold(self.secagg_degree, self.secagg_threshold)?;
        if self.secagg_weight_cap == 0 {
            return Err("secagg_weight_cap must be at least 1".into());
        }
        let scale = self.secagg_scale.unwrap_or(fedge_secagg::weighting::DEFAULT_LEVELS_PER_CLIP / clip);
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!("secagg_scale must be positive, got {scale}"));
        }
        let noise = match (self.noise_multiplier, self.dp_dropout_tolerance) {
            (None, Some(_)) => return Err("dp_dropout_tolerance needs noise_multiplier (distributed DP)".into()),
            (Some(z), f) => Some(fedge_secagg::weighting::DistributedNoise::new(z, f)?),
            (None, None) => None,
        };
        Ok(Some(crate::server::SecureSettings {
            stage_timeout: std::time::Duration::from_secs(self.secagg_stage_secs),
            degree: self.secagg_degree,
            threshold: self.secagg_threshold,
            scale,
            weight_cap: self.secagg_weight_cap,
            clip,
            noise,
        }))
    }

    /// The training and privacy keys, as the engine reads them.
    pub fn training_keys(&self) -> TrainingKeys {
        TrainingKeys {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            adaptive_clip: self.adaptive_clip,
            local_epsilon: self.local_epsilon,
            delta: self.delta,
            target_epsilon: self.target_epsilon,
        }
    }

    /// FedBuff's engine configuration when `[fedbuff]` is present, checked; what FedBuff
    /// mode does not offer is refused in one line.
    pub fn fedbuff(&self) -> Result<Option<AsyncConfig>, String> {
        let Some(f) = &self.fedbuff else { return Ok(None) };
        if self.strategy != "fedavg" {
            return Err(format!(
                "[fedbuff] aggregates with FedAvg over the buffer (server_lr applies); strategy `{}` is for synchronous rounds",
                self.strategy
            ));
        }
        let unsupported = [
            ("adaptive_clip", self.adaptive_clip.is_some()),
            ("local_epsilon", self.local_epsilon.is_some()),
            ("max_step_norm", self.max_step_norm.is_some()),
        ];
        if let Some(key) = first_set(&unsupported) {
            return Err(format!("{key} is not offered with [fedbuff] yet: unset it or remove [fedbuff]"));
        }
        let staleness = match f.staleness.as_str() {
            "constant" => StalenessWeight::Constant,
            "polynomial" => StalenessWeight::Polynomial { exponent: f.staleness_exponent },
            "hinge" => StalenessWeight::Hinge { a: f.hinge_a, b: f.hinge_b },
            other => return Err(format!("unknown staleness `{other}` (expected constant, polynomial or hinge)")),
        };
        let keys = self.training_keys();
        let c = AsyncConfig {
            buffer_size: f.buffer_size,
            max_concurrency: f.max_concurrency,
            max_staleness: f.max_staleness,
            staleness,
            server_lr: self.strategy_options.server_lr.unwrap_or(1.0),
            train: keys.train(),
            privacy: keys.central_dp(),
            seed: self.seed,
            max_samples_per_result: self.max_samples_per_device,
            one_per_device: true,
        };
        if (StrategyOptions { server_lr: None, ..self.strategy_options }) != StrategyOptions::default() {
            return Err("[fedbuff] reads only server_lr from [strategy_options]".into());
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(Some(c))
    }

    /// A regional aggregator's root when `[upstream]` is present, checked: a region runs
    /// plain FedAvg rounds (its upload is its devices' weighted mean; the root applies its own
    /// strategy) and what would change that is refused in one line.
    pub fn upstream(&self) -> Result<Option<&UpstreamKeys>, String> {
        let Some(u) = &self.upstream else { return Ok(None) };
        let plain = self.strategy == "fedavg" && self.strategy_options == StrategyOptions::default();
        if !plain {
            return Err(format!(
                "a regional aggregator ([upstream]) averages its devices' updates with plain FedAvg; strategy `{}` and [strategy_options] belong at the root",
                self.strategy
            ));
        }
        let unsupported = [
            ("[fedbuff]", self.fedbuff.is_some()),
            ("noise_multiplier", self.noise_multiplier.is_some()),
            ("adaptive_clip", self.adaptive_clip.is_some()),
            ("distill_every", self.distill_every.is_some()),
            ("max_step_norm", self.max_step_norm.is_some()),
        ];
        if let Some(key) = first_set(&unsupported) {
            return Err(format!("{key} is not offered on a regional aggregator ([upstream]): set it at the root"));
        }
        if !(0.0..=1.0).contains(&u.escalate_rate) {
            return Err(format!("[upstream] escalate_rate must be in [0, 1], got {}", u.escalate_rate));
        }
        if u.address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
            return Err(format!("[upstream] address must be host:port, got `{}`", u.address));
        }
        if u.calibration_examples == 0 {
            return Err("[upstream] calibration_examples must be at least 1".into());
        }
        Ok(Some(u))
    }

    /// The round engine's part, checked.
    pub fn engine(&self) -> Result<EngineConfig, ConfigError> {
        let keys = self.training_keys();
        let mut c = EngineConfig {
            fraction: self.fraction,
            min_train_clients: self.min_train_clients,
            over_commit: self.over_commit,
            accept_failures: self.accept_failures,
            max_failures: self.max_failures,
            round_timeout: Duration::from_secs(self.round_timeout_secs),
            train: keys.train(),
            seed: self.seed,
            privacy: keys.central_dp(),
            // With secure aggregation the devices add the noise (distributed DP).
            distributed_dp: self.secure_aggregation && self.noise_multiplier.is_some(),
            max_samples_per_result: self.max_samples_per_device,
            max_step_norm: self.max_step_norm,
            ..EngineConfig::default()
        };
        c.set_strategy(&self.strategy, &self.strategy_options)?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::config_file::parse_toml;
    use fedge_engine::StrategyConfig;

    #[test]
    fn the_strategy_is_chosen_by_name_with_its_options() {
        let c: ServeConfig =
            parse_toml("strategy = \"trimmed-mean\"\n[strategy_options]\ntrim_fraction = 0.1").unwrap();
        assert_eq!(c.engine().unwrap().strategy, StrategyConfig::TrimmedMean { fraction: 0.1, bucket_size: 1 });
        assert_eq!(ServeConfig::default().engine().unwrap().strategy, StrategyConfig::FedAvg { server_lr: 1.0 });
        let bad = |toml: &str| parse_toml::<ServeConfig>(toml).unwrap().engine().unwrap_err().to_string();
        assert!(bad("strategy = \"krumm\"").contains("unknown strategy `krumm`"));
        assert!(bad("strategy = \"fedyogi\"\n[strategy_options]\nbeta2 = 2.0").contains("beta2 must be in [0, 1)"));
        assert_eq!(parse_toml::<ServeConfig>("[strategy_options]\nmu = 1.0").unwrap_err().0, 2);
        let c: ServeConfig = parse_toml("strategy = \"fltrust\"\n[strategy_options]\nroot_examples = 500").unwrap();
        assert_eq!(c.engine().unwrap().strategy.root_examples(), Some(500));
        assert!(bad("strategy = \"fltrust\"\n[strategy_options]\nroot_examples = 0").contains("root_examples must be"));
    }

    #[test]
    fn secure_aggregation_keys_are_checked_in_one_line() {
        let secure = |extra: &str| {
            parse_toml::<ServeConfig>(&format!("round_timeout_secs = 300\nsecure_aggregation = true\n{extra}"))
                .unwrap()
                .secure()
        };
        let s = secure("clip_norm = 2.0\nsecagg_stage_secs = 20\nsecagg_weight_cap = 600").unwrap().unwrap();
        assert_eq!((s.clip, s.scale, s.weight_cap), (2.0, 524_288.0, 600));
        assert_eq!(s.stage_timeout, std::time::Duration::from_secs(20));
        assert_eq!(ServeConfig::default().secure(), Ok(None));
        let refused = [
            ("clip_norm = 1.0\nnoise_multiplier = 1.0\nlocal_epsilon = 8.0", "choose local or distributed DP"),
            ("clip_norm = 1.0\nnoise_multiplier = 1.0\ndp_dropout_tolerance = 0.95", "dp_dropout_tolerance must be"),
            ("clip_norm = 1.0\ndp_dropout_tolerance = 0.1", "dp_dropout_tolerance needs noise_multiplier"),
            ("clip_norm = 1.0\n[fedbuff]", "[fedbuff]"),
            ("clip_norm = 1.0\nsecagg_stage_secs = 75", "must leave the four SecAgg stages"),
            ("clip_norm = 1.0\nsecagg_degree = 10\nsecagg_threshold = 5", "secagg_threshold = 5"),
            ("clip_norm = 1.0\nsecagg_weight_cap = 0", "secagg_weight_cap must be"),
            ("clip_norm = 1.0\nsecagg_scale = -1.0", "secagg_scale must be positive"),
        ];
        for (extra, says) in refused {
            let e = secure(extra).unwrap_err();
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        }
        // The default clip_norm is 10; without any, there is nothing to quantise within.
        let none: ServeConfig = parse_toml("secure_aggregation = true").unwrap();
        let none = ServeConfig { clip_norm: None, round_timeout_secs: 300, ..none };
        assert!(none.secure().unwrap_err().contains("needs clip_norm"));
        let off: ServeConfig = parse_toml("secagg_degree = 4").unwrap();
        assert!(off.secure().unwrap_err().contains("secagg_degree needs secure_aggregation = true"));
    }

    #[test]
    fn a_fedbuff_table_selects_fedbuff_and_refuses_what_it_does_not_offer() {
        use fedge_engine::StalenessWeight;
        assert_eq!(ServeConfig::default().fedbuff(), Ok(None));
        let c: ServeConfig =
            parse_toml("[fedbuff]\nbuffer_size = 5\nmax_concurrency = 8\nstaleness = \"hinge\"\nhinge_b = 2").unwrap();
        let a = c.fedbuff().unwrap().unwrap();
        assert_eq!((a.buffer_size, a.max_concurrency, a.one_per_device), (5, 8, true));
        assert_eq!(a.staleness, StalenessWeight::Hinge { a: 10.0, b: 2 });
        let bad = |toml: &str| parse_toml::<ServeConfig>(toml).unwrap().fedbuff().unwrap_err();
        assert!(bad("strategy = \"median\"\n[fedbuff]").contains("strategy `median` is for synchronous rounds"));
        assert!(
            bad("adaptive_clip = { target_quantile = 0.5 }\n[fedbuff]")
                .starts_with("adaptive_clip is not offered with [fedbuff]")
        );
        assert!(parse_toml::<ServeConfig>("distill_every = 2\n[fedbuff]").unwrap().fedbuff().is_ok());
        assert!(bad("[fedbuff]\nstaleness = \"linear\"").starts_with("unknown staleness `linear`"));
        assert!(bad("[fedbuff]\nbuffer_size = 0").starts_with("buffer_size must be 1 to"));
        assert!(bad("[strategy_options]\ntrim_fraction = 0.1\n[fedbuff]").contains("reads only server_lr"));
        assert_eq!(parse_toml::<ServeConfig>("[fedbuff]\nbufer_size = 2").unwrap_err().0, 2);
    }

    #[test]
    fn an_upstream_table_makes_a_region_and_refuses_what_belongs_at_the_root() {
        assert_eq!(ServeConfig::default().upstream(), Ok(None));
        let table = "[upstream]\naddress = \"10.0.0.1:4433\"\nca = \"ca.pem\"\ncert = \"eu.pem\"\nkey = \"eu.key\"\n";
        let c: ServeConfig = parse_toml(table).unwrap();
        let u = c.upstream().unwrap().unwrap();
        assert_eq!((u.address.as_str(), u.server_name.as_str()), ("10.0.0.1:4433", "localhost"));
        let named: ServeConfig = parse_toml(&table.replace("10.0.0.1:4433", "fedge-coordinator:4433")).unwrap();
        assert!(named.upstream().unwrap().is_some(), "a name resolves at connection time");
        let no_port: ServeConfig = parse_toml(&table.replace("10.0.0.1:4433", "fedge-coordinator")).unwrap();
        assert!(no_port.upstream().unwrap_err().contains("must be host:port"));
        let bad =
            |before: &str| parse_toml::<ServeConfig>(&format!("{before}\n{table}")).unwrap().upstream().unwrap_err();
        assert!(bad("strategy = \"median\"").contains("strategy `median` and [strategy_options] belong at the root"));
        assert!(bad("[strategy_options]\nserver_lr = 0.5").contains("plain FedAvg"));
        assert!(bad("noise_multiplier = 1.0").starts_with("noise_multiplier is not offered on a regional aggregator"));
        assert!(bad("distill_every = 2").starts_with("distill_every is not offered"));
        assert_eq!((u.escalate_rate, u.calibration_examples, u.model_key.as_ref()), (0.1, 1000, None));
        let rate = |r: &str| {
            parse_toml::<ServeConfig>(&format!("{table}escalate_rate = {r}\n")).unwrap().upstream().map(|u| u.is_some())
        };
        assert_eq!(rate("0.3"), Ok(true));
        assert!(rate("1.5").unwrap_err().contains("escalate_rate must be in [0, 1]"));
        // A missing key is an error naming its line.
        assert!(parse_toml::<ServeConfig>("[upstream]\naddress = \"10.0.0.1:4433\"").is_err());
        let c: ServeConfig = parse_toml("max_samples_per_region = 5000").unwrap();
        assert_eq!(c.max_samples_per_region, 5000);
    }
}
