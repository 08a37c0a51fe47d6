//! `fedge-coordinator`: the coordinator binary: `serve` (rounds over QUIC), `round`
//! (operator commands), `certs` (the fleet's certificates).
//!
//! Argument parsing and dispatch only: the service is `fedge_coordinator::service`, the
//! operator's client `fedge_coordinator::operator`, what it prints `fedge_coordinator::print`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::config::ServeConfig;
use fedge_coordinator::operator::{Operator, OperatorError, OperatorTarget};
use fedge_coordinator::print;
use fedge_core::wire::{Message, OperatorCommand};

#[derive(Parser)]
#[command(name = "fedge-coordinator", version, about = "Fedge coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: accept devices and operators, run rounds, evaluate each model.
    Serve {
        /// coordinator.toml (see docs/operations.md); flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Certificate folder.
        #[arg(long)]
        certs_dir: Option<PathBuf>,
        /// Serve Prometheus metrics on this TCP address (GET /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Central DP budget: refuse any round that would take epsilon past this (needs
        /// `noise_multiplier` in the config).
        #[arg(long)]
        target_epsilon: Option<f64>,
    },
    /// Operator commands (need an operator certificate).
    Round {
        #[command(subcommand)]
        command: RoundCommand,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// List devices (operator command).
    Devices {
        #[command(subcommand)]
        command: ListCommand,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Model versions: list, show, promote, roll back (operator commands).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Certificate authority for the fleet (see certs/README.md).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum RoundCommand {
    /// Run N more rounds.
    Start {
        /// How many.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
        /// Fraction of connected devices to sample (kept for later rounds).
        #[arg(long)]
        fraction: Option<f64>,
        /// Fewest results a round needs (kept for later rounds).
        #[arg(long)]
        min_clients: Option<u64>,
        /// Seconds a round waits for results (kept for later rounds).
        #[arg(long)]
        deadline: Option<u64>,
    },
    /// List every round closed, earlier runs of the coordinator included.
    List {
        /// Print JSON (a list of rounds).
        #[arg(long)]
        json: bool,
    },
    /// Show the coordinator's state and the rounds so far.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Subcommand)]
enum ListCommand {
    /// Print them as a table (or JSON).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Every version, global and student, with lineage, metrics, size and deployment.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One version in full.
    Show {
        /// The version.
        version: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a registered (student) version what devices run.
    Promote {
        /// The version.
        version: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Go back to the previously promoted version.
    Rollback {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct OperatorArgs {
    /// Coordinator address.
    #[arg(long, global = true, default_value = "127.0.0.1:4433")]
    coordinator: SocketAddr,
    /// Name in the coordinator's certificate.
    #[arg(long, global = true, default_value = "localhost")]
    server_name: String,
    /// Certificate folder holding ca.pem and operators/NAME.{pem,key}.
    #[arg(long, global = true, default_value = "certs/fleet")]
    certs_dir: PathBuf,
    /// Operator name (certificate operators/NAME.pem).
    #[arg(long, global = true, default_value = "admin")]
    operator: String,
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
    /// Issue a regional aggregator's certificate (a coordinator with an `[upstream]` table
    /// joins its root with it).
    IssueAggregator {
        /// Aggregator name.
        name: String,
        /// CA folder.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Revoke a device's (or with --operator, an operator's; with --aggregator, a regional
    /// aggregator's) certificate.
    Revoke {
        /// Device id, operator name or aggregator name.
        id: String,
        /// CA folder.
        #[arg(long, default_value = "certs/fleet")]
        dir: PathBuf,
        /// Revoke an operator certificate instead of a device's.
        #[arg(long, conflicts_with = "aggregator")]
        operator: bool,
        /// Revoke a regional aggregator's certificate instead of a device's.
        #[arg(long)]
        aggregator: bool,
    },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The command's answer when it fails: printed, not logged, so that it reaches the
            // user whatever RUST_LOG or FEDGE_LOG_FORMAT say.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    fedge_log::init().context("cannot start logging")?;
    match Cli::parse().command {
        Command::Serve { config, listen, certs_dir, metrics, target_epsilon } => {
            let mut c = match config {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    toml::from_str::<ServeConfig>(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message().replace('\n', " ")))?
                }
                None => ServeConfig::default(),
            };
            if metrics.is_some() {
                c.metrics_listen = metrics;
            }
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(d) = certs_dir {
                c.certs_dir = d;
            }
            if target_epsilon.is_some() {
                anyhow::ensure!(c.noise_multiplier.is_some(), "--target-epsilon needs central DP (noise_multiplier)");
                c.target_epsilon = target_epsilon;
            }
            c.engine().map_err(|e| anyhow::anyhow!("{e}"))?;
            return tokio::runtime::Runtime::new()?
                .block_on(async {
                    fedge_coordinator::service::run(
                        c,
                        |addr| println!("fedge-coordinator listening on {addr}"),
                        async {
                            let _ = tokio::signal::ctrl_c().await;
                        },
                    )
                    .await
                })
                .map_err(Into::into);
        }
        Command::Round { command, op } => return tokio::runtime::Runtime::new()?.block_on(round(command, op)),
        Command::Devices { command: ListCommand::List { json }, op } => {
            return tokio::runtime::Runtime::new()?.block_on(list(OperatorCommand::Devices, json, None, op));
        }
        Command::Models { command, op } => {
            let rt = tokio::runtime::Runtime::new()?;
            return match command {
                ModelsCommand::List { json } => rt.block_on(list(OperatorCommand::Models, json, None, op)),
                ModelsCommand::Show { version, json } => {
                    rt.block_on(list(OperatorCommand::Models, json, Some(version), op))
                }
                ModelsCommand::Promote { version, json } => {
                    rt.block_on(list(OperatorCommand::Promote { version }, json, None, op))
                }
                ModelsCommand::Rollback { json } => rt.block_on(list(OperatorCommand::Rollback, json, None, op)),
            };
        }
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
            CertsCommand::IssueAggregator { name, dir, days } => {
                let issued = CertDir::open(&dir)?.issue(Role::Aggregator, &name, days)?;
                println!("aggregator {name}: {} {}", issued.cert.display(), issued.key.display());
            }
            CertsCommand::Revoke { id, dir, operator, aggregator } => {
                let role = match (operator, aggregator) {
                    (true, _) => Role::Operator,
                    (_, true) => Role::Aggregator,
                    _ => Role::Device,
                };
                CertDir::open(&dir)?.revoke(role, &id)?;
                println!("revoked {id}; the coordinator refuses it from its next start");
            }
        },
    }
    Ok(())
}

impl OperatorArgs {
    fn target(&self) -> OperatorTarget {
        OperatorTarget {
            coordinator: self.coordinator,
            server_name: self.server_name.clone(),
            certs_dir: self.certs_dir.clone(),
            operator: self.operator.clone(),
        }
    }
}

async fn round(command: RoundCommand, op: OperatorArgs) -> anyhow::Result<()> {
    let client = Operator::connect(&op.target()).await?;
    match command {
        RoundCommand::Start { rounds, fraction, min_clients, deadline } => {
            let command = OperatorCommand::StartRounds {
                rounds,
                fraction,
                min_train_clients: min_clients,
                deadline_secs: deadline,
            };
            let s = client.status(command).await?;
            println!(
                "{} rounds queued; model v{}, {} devices connected",
                s.rounds_left + u64::from(s.current_round.is_some()),
                s.model_version,
                s.devices_connected.len()
            );
        }
        RoundCommand::List { json } => {
            let s = client.status(OperatorCommand::Status).await?;
            let mut out = std::io::stdout().lock();
            let _ = if json {
                writeln!(out, "{:#}", print::rounds_json(&s.rounds))
            } else {
                print::print_rounds(&mut out, &s.rounds)
            };
        }
        RoundCommand::Status { json, watch } => loop {
            let s = client.status(OperatorCommand::Status).await?;
            let _ = print::print_status(&mut std::io::stdout().lock(), &s, json);
            if !watch {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    }
    client.close().await;
    Ok(())
}

async fn list(command: OperatorCommand, json: bool, only: Option<u64>, op: OperatorArgs) -> anyhow::Result<()> {
    let client = Operator::connect(&op.target()).await?;
    let answer = client.request(command).await;
    client.close().await;
    let mut out = std::io::stdout().lock();
    match answer? {
        Message::Devices(devices) => {
            let _ = print::print_devices(&mut out, &devices, json);
        }
        Message::Models(mut models) => match only {
            Some(v) => {
                models.retain(|m| m.version == v);
                anyhow::ensure!(!models.is_empty(), "no model version {v}");
                let _ = print::print_model(&mut out, &models[0], json);
            }
            None => {
                let _ = print::print_models(&mut out, &models, json);
            }
        },
        other => return Err(OperatorError::Unexpected(Box::new(other)).into()),
    }
    Ok(())
}
