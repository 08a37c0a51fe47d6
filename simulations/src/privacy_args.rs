//! `fedge-sim privacy`: differential-privacy accounting on the command line (the epsilon of a
//! training run, or the noise multiplier a target epsilon needs), over
//! [`fedge_core::privacy::rdp`].

use std::io::Write;

use clap::Subcommand;

#[derive(Subcommand)]
/// `fedge-sim privacy`'s subcommands.
pub enum PrivacyCommand {
    /// Epsilon of T steps of the Poisson-subsampled Gaussian mechanism (RDP accountant).
    Epsilon {
        /// Noise std / clip norm (z).
        #[arg(long)]
        noise_multiplier: f64,
        /// Devices per round / population (q).
        #[arg(long)]
        sampling_rate: f64,
        /// Rounds (T).
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long)]
        delta: f64,
        /// Rényi orders, comma-separated [default: 1.1..10.9 by 0.1, 11..63, 128, 256, 512, 1024].
        #[arg(long, value_delimiter = ',')]
        orders: Option<Vec<f64>>,
        /// Print {"epsilon": ..., "order": ...}.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier whose epsilon after T steps is at most the target.
    Calibrate {
        /// Epsilon to stay within.
        #[arg(long)]
        target_epsilon: f64,
        /// Target delta.
        #[arg(long)]
        delta: f64,
        /// Devices per round / population (q).
        #[arg(long)]
        sampling_rate: f64,
        /// Rounds (T).
        #[arg(long)]
        steps: u64,
        /// Print {"noise_multiplier": ..., "epsilon": ..., "order": ...}.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `fedge-sim privacy` subcommand, printing to stdout.
pub fn privacy(command: PrivacyCommand) -> anyhow::Result<()> {
    use fedge_core::privacy::rdp::{RdpAccountant, calibrate_noise_multiplier, epsilon};
    let mut stdout = std::io::stdout().lock();
    match command {
        PrivacyCommand::Epsilon { noise_multiplier, sampling_rate, steps, delta, orders, json } => {
            let mut acc = match orders {
                Some(o) => RdpAccountant::with_orders(o)?,
                None => RdpAccountant::new(),
            };
            acc.compose_subsampled_gaussian(sampling_rate, noise_multiplier, steps)?;
            let e = acc.epsilon(delta)?;
            if json {
                let _ = writeln!(stdout, "{}", serde_json::json!({"epsilon": e.epsilon, "order": e.order}));
            } else {
                let _ = writeln!(
                    stdout,
                    "epsilon {:.6} at delta {delta:e} (best order {}) after {steps} steps, q = {sampling_rate}, z = {noise_multiplier}",
                    e.epsilon, e.order
                );
            }
        }
        PrivacyCommand::Calibrate { target_epsilon, delta, sampling_rate, steps, json } => {
            let z = calibrate_noise_multiplier(target_epsilon, delta, sampling_rate, steps)?;
            let e = epsilon(sampling_rate, z, steps, delta)?;
            if json {
                let _ = writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({"noise_multiplier": z, "epsilon": e.epsilon, "order": e.order})
                );
            } else {
                let _ = writeln!(
                    stdout,
                    "noise multiplier {z:.6} gives epsilon {:.6} at delta {delta:e} after {steps} steps, q = {sampling_rate}",
                    e.epsilon
                );
            }
        }
    }
    Ok(())
}
