//! `fedge-sim shards`: one sharded experiment on this machine, in one command: fresh
//! certificates, the root coordinator (`fedge-sim shard-root`'s config) and `N` shard
//! processes, started as a Kubernetes Indexed Job starts them (one command line for all, the
//! index from `JOB_COMPLETION_INDEX`, the count from `FEDGE_SHARDS`, each shard's certificate
//! picked by `{index}`), the rounds started through an operator command, shard 0 recording
//! `rounds.csv`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::wire::{Message, OperatorCommand, Status};

use super::{RootPlace, check_shardable, root_config};
use crate::config::SimConfig;
use crate::processes::Children;

/// Why the launcher failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The configuration cannot be sharded.
    #[error(transparent)]
    Config(#[from] crate::config::SimConfigError),
    /// Certificates.
    #[error(transparent)]
    Certs(#[from] fedge_coordinator::certs::CertError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] fedge_net::TlsError),
    /// The operator's link.
    #[error(transparent)]
    Request(#[from] fedge_net::RequestError),
    /// A file or process.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The experiment's data cannot be read (what every shard and the root would fail on).
    #[error(transparent)]
    Data(#[from] crate::run::SimError),
    /// A process failed or something took too long.
    #[error("{0}")]
    Failed(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let context = context.into();
    move |source| LaunchError::Io { context, source }
}

/// What the launcher measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LaunchReport {
    /// Shards.
    pub shards: u32,
    /// `rounds.csv`, written by shard 0.
    pub rounds_csv: PathBuf,
    /// Wall seconds of each round at the root (start to close).
    pub round_seconds: Vec<f64>,
    /// From starting the rounds to the last shard's exit.
    pub wall_seconds: f64,
    /// Peak resident memory of each shard process, MiB (sampled every 100 ms).
    pub shard_peak_rss_mib: Vec<f64>,
    /// Peak resident memory of the root, MiB.
    pub root_peak_rss_mib: f64,
}

/// Peak resident set of process `pid` so far (Linux `VmHWM`), MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs `config_path` (read as `config`, whose `data_dir` the shards are given: it may differ
/// from the file's) as `shards` shard processes against a root on loopback; logs and
/// `rounds.csv` go to `out`.
pub async fn launch(
    config_path: &Path,
    config: &SimConfig,
    shards: u32,
    out: &Path,
    mut progress: impl FnMut(&str),
) -> Result<LaunchReport, LaunchError> {
    check_shardable(config)?;
    if shards == 0 {
        return Err(LaunchError::Failed("--shards must be at least 1".into()));
    }
    // Every process reads the data: a missing dataset is said once, here, with how to get it.
    crate::run::load_data(config)?;
    std::fs::create_dir_all(out).map_err(io(format!("cannot create {}", out.display())))?;
    let csv = out.join("rounds.csv");
    if csv.exists() {
        std::fs::remove_file(&csv).map_err(io(format!("cannot replace {}", csv.display())))?;
    }
    let exe = std::env::current_exe().map_err(io("cannot find this executable"))?;
    let dir = tempfile::tempdir().map_err(io("cannot make a temporary folder"))?;
    let fleet = dir.path().join("fleet");
    let ca = CertDir::init(&fleet, &["localhost".into(), "127.0.0.1".into()])?;
    let op = ca.issue(Role::Operator, "launcher", 1)?;
    let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_err(io("no free UDP port"))?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let root_toml = dir.path().join("root.toml");
    let listen = addr.to_string();
    let place = RootPlace {
        listen: &listen,
        certs_dir: &fleet,
        state_dir: &dir.path().join("root-state"),
        round_timeout_secs: 3600,
    };
    std::fs::write(&root_toml, root_config(config, shards, &place)?).map_err(io("cannot write root.toml"))?;
    let log = |name: &str| -> Result<(Stdio, Stdio), LaunchError> {
        let path = out.join(name);
        let f = std::fs::File::create(&path).map_err(io(format!("cannot create {}", path.display())))?;
        let g = f.try_clone().map_err(io("cannot share a log file"))?;
        Ok((f.into(), g.into()))
    };
    let mut children = Children(Vec::new());
    let (o, e) = log("root.log")?;
    children.0.push(
        Command::new(&exe)
            .args(["coordinator", "--config"])
            .arg(&root_toml)
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .spawn()
            .map_err(io("cannot start the root"))?,
    );
    let mut shard_certs = Vec::new();
    for i in 0..shards {
        shard_certs.push(ca.issue(Role::Aggregator, &format!("shard-{i}"), 1)?);
    }
    let template = |p: &Path| p.display().to_string().replace("shard-0.", "shard-{index}.");
    for i in 0..shards {
        let (o, e) = log(&format!("shard-{i}.log"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("shard")
            .arg("--config")
            .arg(config_path)
            .arg("--data-dir")
            .arg(&config.data_dir)
            .args(["--root", &listen, "--server-name", "localhost"])
            .arg("--ca")
            .arg(ca.ca_pem())
            .args(["--cert", &template(&shard_certs[0].cert), "--key", &template(&shard_certs[0].key)])
            .arg("--out")
            .arg(out)
            // As an Indexed Job starts its pods.
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .env("FEDGE_SHARDS", shards.to_string())
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e);
        children.0.push(cmd.spawn().map_err(io(format!("cannot start shard {i}")))?);
    }
    let tls = fedge_net::client_config(&ca.ca_pem(), &op.cert, &op.key)?;
    let started = Instant::now();
    let client = loop {
        match fedge_net::RequestClient::connect(addr, "localhost", tls.clone()).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() > Duration::from_secs(60) => {
                return Err(LaunchError::Failed(format!(
                    "the root did not come up: {e} (log {})",
                    out.join("root.log").display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let ask = |cmd: OperatorCommand| {
        let client = &client;
        async move {
            match client.request(&Message::Operator(cmd)).await? {
                Message::Status(s) => Ok::<Status, LaunchError>(s),
                other => Err(LaunchError::Failed(format!("the root answered {other:?}"))),
            }
        }
    };
    let mut peaks = vec![0.0f64; children.0.len()];
    let sample = |children: &Children, peaks: &mut [f64]| {
        for (c, p) in children.0.iter().zip(peaks.iter_mut()) {
            if let Some(m) = peak_rss_mib(c.id()) {
                *p = p.max(m);
            }
        }
    };
    // Every shard at the root (each prepares the whole experiment's data first).
    loop {
        let s = ask(OperatorCommand::Status).await?;
        if s.devices_connected.len() >= shards as usize {
            break;
        }
        check_children(&mut children, out)?;
        if started.elapsed() > Duration::from_secs(600) {
            return Err(LaunchError::Failed(format!(
                "{} of {shards} shards reached the root within 600 s (logs in {})",
                s.devices_connected.len(),
                out.display()
            )));
        }
        sample(&children, &mut peaks);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress(&format!("{shards} shards connected; starting {} rounds", config.rounds));
    let rounds_started = Instant::now();
    ask(OperatorCommand::StartRounds {
        rounds: config.rounds,
        fraction: None,
        min_train_clients: None,
        deadline_secs: None,
    })
    .await?;
    let mut reported = 0;
    loop {
        sample(&children, &mut peaks);
        let s = ask(OperatorCommand::Status).await?;
        for line in s.rounds.iter().skip(reported) {
            progress(&format!(
                "round {}: {} at the root in {} ms ({} samples)",
                line.round,
                match &line.failed_reason {
                    None => format!("version {}", line.model_version),
                    Some(r) => format!("failed: {r}"),
                },
                line.duration_ms.unwrap_or(0),
                line.samples
            ));
            reported += 1;
        }
        // Done when every shard has exited (each exits 0 once its last round is in, shard 0
        // once it has recorded it).
        let mut running = 0;
        for (i, c) in children.0.iter_mut().enumerate().skip(1) {
            match c.try_wait().map_err(io("cannot watch a shard"))? {
                None => running += 1,
                Some(status) if status.success() => {}
                Some(status) => {
                    return Err(LaunchError::Failed(format!(
                        "shard {} exited with {status} (log {})",
                        i - 1,
                        out.join(format!("shard-{}.log", i - 1)).display()
                    )));
                }
            }
        }
        if running == 0 {
            let round_seconds = s.rounds.iter().map(|l| l.duration_ms.unwrap_or(0) as f64 / 1000.0).collect();
            return Ok(LaunchReport {
                shards,
                rounds_csv: csv,
                round_seconds,
                wall_seconds: rounds_started.elapsed().as_secs_f64(),
                shard_peak_rss_mib: peaks[1..].to_vec(),
                root_peak_rss_mib: peaks[0],
            });
        }
        check_children(&mut children, out)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails if the root has exited, or a shard failed.
fn check_children(children: &mut Children, out: &Path) -> Result<(), LaunchError> {
    for (i, c) in children.0.iter_mut().enumerate() {
        if let Some(status) = c.try_wait().map_err(io("cannot watch a process"))? {
            let log = if i == 0 { "root.log".to_string() } else { format!("shard-{}.log", i - 1) };
            if i == 0 || !status.success() {
                return Err(LaunchError::Failed(format!(
                    "{} exited with {status} (log {})",
                    if i == 0 { "the root".to_string() } else { format!("shard {}", i - 1) },
                    out.join(log).display()
                )));
            }
        }
    }
    Ok(())
}
