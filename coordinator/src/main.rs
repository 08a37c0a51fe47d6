//! `fedge-coordinator`: the coordinator binary. Today: the fleet's certificates
//! (`certs init`, `certs issue-device`, `certs issue-operator`, `certs revoke`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_coordinator::certs::{CertDir, Role};

#[derive(Parser)]
#[command(name = "fedge-coordinator", version, about = "Fedge coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority for the fleet (see certs/README.md).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, the coordinator's server certificate and a model-signing key.
    Init {
        /// Folder to create them in.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// DNS names and IP addresses the coordinator is reached at (repeatable).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Issue a device certificate; the device id is its common name.
    IssueDevice {
        /// Device id (letters, digits, '-', '_', '.').
        id: String,
        /// CA folder.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Issue an operator certificate.
    IssueOperator {
        /// Operator name.
        name: String,
        /// CA folder.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Revoke a device's (or with --operator, an operator's) certificate.
    Revoke {
        /// Device id or operator name.
        id: String,
        /// CA folder.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// Revoke an operator certificate instead of a device's.
        #[arg(long)]
        operator: bool,
    },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Certs { command } => match command {
            CertsCommand::Init { dir, names } => {
                let ca = CertDir::init(&dir, &names).context("failed to create the CA")?;
                println!(
                    "created CA, server certificate ({}) and model-signing key in {}",
                    names.join(", "),
                    ca.dir().display()
                );
            }
            CertsCommand::IssueDevice { id, dir, days } => {
                let issued = CertDir::open(&dir)?.issue(Role::Device, &id, days)?;
                println!("device {id}: {} {}", issued.cert.display(), issued.key.display());
            }
            CertsCommand::IssueOperator { name, dir, days } => {
                let issued = CertDir::open(&dir)?.issue(Role::Operator, &name, days)?;
                println!("operator {name}: {} {}", issued.cert.display(), issued.key.display());
            }
            CertsCommand::Revoke { id, dir, operator } => {
                let role = if operator { Role::Operator } else { Role::Device };
                CertDir::open(&dir)?.revoke(role, &id)?;
                println!("revoked {id}; the coordinator refuses it from its next start");
            }
        },
    }
    Ok(())
}
