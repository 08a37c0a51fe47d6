//! `fedge-coordinator`: the coordinator binary: `serve` (rounds over QUIC), `round`
//! (operator commands), `certs` (the fleet's certificates).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::config::ServeConfig;
use fedge_core::wire::{Message, OperatorCommand, RoundLine, Status};

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
            c.engine().validate().map_err(|e| anyhow::anyhow!("{e}"))?;
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
            CertsCommand::Revoke { id, dir, operator } => {
                let role = if operator { Role::Operator } else { Role::Device };
                CertDir::open(&dir)?.revoke(role, &id)?;
                println!("revoked {id}; the coordinator refuses it from its next start");
            }
        },
    }
    Ok(())
}

async fn operator_client(op: &OperatorArgs) -> anyhow::Result<fedge_net::Client> {
    let dir = &op.certs_dir;
    let config = fedge_net::client_config(
        &dir.join("ca.pem"),
        &dir.join("operators").join(format!("{}.pem", op.operator)),
        &dir.join("operators").join(format!("{}.key", op.operator)),
    )?;
    Ok(fedge_net::Client::connect(op.coordinator, &op.server_name, config).await?)
}

async fn ask(client: &fedge_net::Client, command: OperatorCommand) -> anyhow::Result<Status> {
    match client.request(&Message::Operator(command)).await? {
        Message::Status(s) => Ok(s),
        Message::Error { code, message } => anyhow::bail!("coordinator refused ({code:?}): {message}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

fn rounds_json(rounds: &[RoundLine]) -> serde_json::Value {
    rounds
        .iter()
        .map(|r| {
            serde_json::json!({
                "round": r.round, "model_version": r.model_version, "selected": r.selected,
                "devices_reporting": r.results, "failures": r.failures, "stragglers": r.stragglers,
                "surplus": r.surplus, "samples": r.samples, "train_loss": r.train_loss, "accuracy": r.accuracy,
                "failed_reason": r.failed_reason,
                "privacy": r.privacy.map(|p| serde_json::json!({
                    "sampling_rate": p.sampling_rate, "noise_multiplier": p.noise_multiplier,
                    "clip_norm": p.clip_norm, "epsilon": p.epsilon,
                })),
            })
        })
        .collect()
}

fn print_rounds(out: &mut impl Write, rounds: &[RoundLine]) {
    let _ = writeln!(
        out,
        "{:>5}  {:>7}  {:>9}  {:>7}  {:>5}  {:>8}  {:>10}  {:>9}  {:>8}",
        "round", "version", "reporting", "failed", "late", "samples", "train_loss", "accuracy", "epsilon"
    );
    for r in rounds {
        let acc = r.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
        let _ = writeln!(
            out,
            "{:>5}  {:>7}  {:>4}/{:<4}  {:>7}  {:>5}  {:>8}  {:>10.4}  {:>9}  {:>8}{}",
            r.round,
            r.model_version,
            r.results,
            r.selected,
            r.failures,
            r.stragglers,
            r.samples,
            r.train_loss,
            acc,
            r.privacy.map_or("-".into(), |p| format!("{:.4}", p.epsilon)),
            r.failed_reason.as_ref().map_or(String::new(), |w| format!("  not aggregated: {w}"))
        );
    }
}

fn print_status(s: &Status, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let rounds = rounds_json(&s.rounds);
        let v = serde_json::json!({
            "model_version": s.model_version, "model_hash": s.model_hash.to_string(),
            "current_round": s.current_round, "rounds_left": s.rounds_left,
            "devices_connected": s.devices_connected, "devices_known": s.devices_known, "rounds": rounds,
            "privacy": s.privacy.map(|p| serde_json::json!({
                "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "delta": p.delta,
                "epsilon": p.epsilon, "target_epsilon": p.target_epsilon,
            })),
        });
        let _ = writeln!(out, "{v:#}");
        return;
    }
    let _ = writeln!(
        out,
        "model v{} ({}...)  round {}  rounds left {}  devices {} connected / {} known",
        s.model_version,
        &s.model_hash.to_string()[..12],
        s.current_round.map_or("-".into(), |r| r.to_string()),
        s.rounds_left,
        s.devices_connected.len(),
        s.devices_known
    );
    if let Some(p) = s.privacy {
        let _ = writeln!(
            out,
            "central DP: epsilon {:.4} spent at delta {:e}{}  (z = {}, clip {:.4})",
            p.epsilon,
            p.delta,
            p.target_epsilon.map_or(String::new(), |t| format!(" of a budget of {t}")),
            p.noise_multiplier,
            p.clip_norm
        );
    }
    print_rounds(&mut out, &s.rounds);
}

async fn round(command: RoundCommand, op: OperatorArgs) -> anyhow::Result<()> {
    let client = operator_client(&op).await?;
    match command {
        RoundCommand::Start { rounds, fraction, min_clients, deadline } => {
            let command = OperatorCommand::StartRounds {
                rounds,
                fraction,
                min_train_clients: min_clients,
                deadline_secs: deadline,
            };
            let s = ask(&client, command).await?;
            println!(
                "{} rounds queued; model v{}, {} devices connected",
                s.rounds_left + u64::from(s.current_round.is_some()),
                s.model_version,
                s.devices_connected.len()
            );
        }
        RoundCommand::List { json } => {
            let s = ask(&client, OperatorCommand::Status).await?;
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(out, "{:#}", rounds_json(&s.rounds));
            } else {
                print_rounds(&mut out, &s.rounds);
            }
        }
        RoundCommand::Status { json, watch } => loop {
            let s = ask(&client, OperatorCommand::Status).await?;
            print_status(&s, json);
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
    let client = operator_client(&op).await?;
    let answer = client.request(&Message::Operator(command)).await?;
    client.close().await;
    let mut out = std::io::stdout().lock();
    match answer {
        Message::Devices(devices) => {
            if json {
                let v: Vec<_> = devices
                    .iter()
                    .map(|d| {
                        let caps = d.capabilities.as_ref().map(|c| {
                            serde_json::json!({"backend": c.backend, "memory_mb": c.memory_mb, "charging": c.charging,
                                "unmetered": c.unmetered, "num_samples": c.num_samples})
                        });
                        serde_json::json!({"id": d.id, "connected": d.connected, "capabilities": caps, "running": d.running})
                    })
                    .collect();
                let _ = writeln!(out, "{:#}", serde_json::Value::from(v));
            } else {
                let _ = writeln!(
                    out,
                    "{:<24} {:>9}  {:>7}  {:>8}  {:>9}",
                    "device", "connected", "backend", "memory", "samples"
                );
                for d in devices {
                    let (backend, mem, samples) =
                        d.capabilities.as_ref().map_or(("-".into(), "-".into(), "-".into()), |c| {
                            (c.backend.clone(), format!("{} MiB", c.memory_mb), c.num_samples.to_string())
                        });
                    let connected = if d.connected { "yes" } else { "no" };
                    let _ = writeln!(out, "{:<24} {connected:>9}  {backend:>7}  {mem:>8}  {samples:>9}", d.id);
                }
            }
        }
        Message::Models(mut models) => {
            if let Some(v) = only {
                models.retain(|m| m.version == v);
                anyhow::ensure!(!models.is_empty(), "no model version {v}");
            }
            let as_json = |m: &fedge_core::wire::ModelLine| {
                serde_json::json!({
                    "version": m.version, "role": m.role, "architecture": m.architecture, "parent": m.parent,
                    "round": m.round, "accuracy": m.accuracy, "epsilon": m.epsilon, "parameters": m.parameters,
                    "size_bytes": m.size_bytes, "sha256": m.hash.to_string(), "created_at": m.created_at,
                    "signed": m.signed, "promoted": m.promoted, "devices_running": m.devices_running,
                })
            };
            if json && only.is_some() {
                let _ = writeln!(out, "{:#}", as_json(&models[0]));
            } else if json {
                let v: Vec<_> = models.iter().map(as_json).collect();
                let _ = writeln!(out, "{:#}", serde_json::Value::from(v));
            } else if only.is_some() {
                for (k, v) in as_json(&models[0]).as_object().expect("an object") {
                    let _ = writeln!(out, "{k:<16} {v}");
                }
            } else {
                let _ = writeln!(
                    out,
                    "{:>7}  {:<7}  {:<4}  {:>6}  {:>5}  {:>8}  {:>8}  {:>10}  {:>8}  {:<12}  {:>7}  deployed",
                    "version",
                    "role",
                    "arch",
                    "parent",
                    "round",
                    "accuracy",
                    "epsilon",
                    "bytes",
                    "latency",
                    "sha256",
                    "signed"
                );
                for m in models {
                    let acc = m.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
                    let eps = m.epsilon.map_or("-".into(), |e| format!("{e:.4}"));
                    let role = match m.role {
                        fedge_core::registry::ModelRole::Global => "global",
                        fedge_core::registry::ModelRole::Student => "student",
                    };
                    let parent = m.parent.map_or("-".into(), |p| p.to_string());
                    let deployed = if m.promoted {
                        format!("PROMOTED, {} devices", m.devices_running)
                    } else if m.devices_running > 0 {
                        format!("{} devices", m.devices_running)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        out,
                        "{:>7}  {role:<7}  {:<4}  {parent:>6}  {:>5}  {acc:>8}  {eps:>8}  {:>10}  {:>8}  {:<12}  {:>7}  {deployed}",
                        m.version,
                        m.architecture,
                        m.round,
                        m.size_bytes,
                        m.latency_us.map_or("-".into(), |l| format!("{l:.1} us")),
                        &m.hash.to_string()[..12],
                        if m.signed { "yes" } else { "no" },
                    );
                }
            }
        }
        Message::Error { code, message } => anyhow::bail!("coordinator refused ({code:?}): {message}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
    Ok(())
}
