//! `fedge-sim run`'s strategy options: `--strategy NAME` and the parameters of
//! [`fedge_engine::StrategyOptions`], each overriding the configuration file's key.

use clap::Args;
use fedge_engine::StrategyOptions;

use crate::config::SimConfig;

/// The strategy and its parameters on the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct StrategyArgs {
    /// Aggregation strategy: fedavg, fedavgm, fedadagrad, fedadam, fedyogi, fedprox, median,
    /// trimmed-mean, krum, multi-krum, norm-bound, centered-clip, fltrust.
    #[arg(long)]
    pub strategy: Option<String>,
    /// Server learning rate (fedavg, fedavgm, fedadagrad, fedadam, fedyogi).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// Server momentum (fedavgm).
    #[arg(long)]
    pub server_momentum: Option<f64>,
    /// First-moment decay beta1 (fedadagrad, fedadam, fedyogi).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Second-moment decay beta2 (fedadam, fedyogi).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Adaptivity tau (fedadagrad, fedadam, fedyogi).
    #[arg(long)]
    pub tau: Option<f64>,
    /// FedProx's proximal weight mu.
    #[arg(long)]
    pub proximal_mu: Option<f64>,
    /// Fraction trimmed from each side (trimmed-mean; default 0.2).
    #[arg(long)]
    pub trim_fraction: Option<f64>,
    /// Byzantine devices to tolerate (krum, multi-krum; default the most the round allows).
    #[arg(long)]
    pub byzantine: Option<usize>,
    /// Updates multi-krum averages (default n - f).
    #[arg(long)]
    pub krum_select: Option<usize>,
    /// L2 bound on each update (norm-bound; default the round's median norm).
    #[arg(long)]
    pub norm_bound: Option<f64>,
    /// Centered clipping radius (default the median distance to the centre).
    #[arg(long)]
    pub clip_radius: Option<f64>,
    /// Centered clipping iterations (default 3).
    #[arg(long)]
    pub clip_iters: Option<u32>,
    /// Memory bound, MiB, for the rules that hold a round's updates.
    #[arg(long)]
    pub max_buffer_mb: Option<u64>,
    /// Bucketing: the robust rule sees the sample-weighted means of seeded random buckets of
    /// this many updates (median, trimmed-mean, krum, multi-krum, norm-bound, centered-clip;
    /// default 1: none; 2 is Karimireddy et al.'s choice).
    #[arg(long)]
    pub bucket_size: Option<usize>,
    /// FLTrust's root set: training examples held out from the devices, on which the server
    /// trains its reference update each round (default 100).
    #[arg(long)]
    pub root_examples: Option<usize>,
    /// The norm FLTrust rescales updates to: reference (the paper's; default) or median (the
    /// round's median update norm).
    #[arg(long)]
    pub fltrust_norm: Option<fedge_engine::strategy::TrustNorm>,
}

impl StrategyArgs {
    /// Writes the options given onto `c`.
    pub fn apply(&self, c: &mut SimConfig) {
        if let Some(s) = &self.strategy {
            c.strategy.clone_from(s);
        }
        let o: &mut StrategyOptions = &mut c.strategy_options;
        macro_rules! set {
            ($($f:ident),*) => { $( if self.$f.is_some() { o.$f = self.$f; } )* };
        }
        set!(server_lr, server_momentum, beta1, beta2, tau, proximal_mu, trim_fraction, byzantine, krum_select);
        set!(norm_bound, clip_radius, clip_iters, max_buffer_mb, bucket_size, root_examples, fltrust_norm);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        strategy: StrategyArgs,
    }

    #[test]
    fn flags_override_the_files_options() {
        let cli = Cli::try_parse_from(["fedge-sim", "--strategy", "median", "--bucket-size", "2"]).unwrap();
        let mut c = SimConfig::default();
        c.strategy_options.trim_fraction = Some(0.1);
        cli.strategy.apply(&mut c);
        assert_eq!((c.strategy.as_str(), c.strategy_options.bucket_size), ("median", Some(2)));
        assert_eq!(c.strategy_options.trim_fraction, Some(0.1), "a flag not given leaves the file's key");
    }
}
