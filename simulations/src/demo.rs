//! `fedge-sim demo`: the real system on loopback in one command.
//!
//! Makes a fresh CA, one operator and N device certificates in a temporary folder, starts a
//! coordinator process and N edge processes (this same executable, running the coordinator and
//! edge services), drives R rounds through operator commands over QUIC, reports each round's
//! model version and accuracy, and stops every process.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::wire::{Message, OperatorCommand, Status};
use serde::Serialize;

/// One round of the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoRound {
    /// Round number.
    pub round: u64,
    /// Model version after it.
    pub model_version: u64,
    /// Test accuracy of that version.
    pub accuracy: Option<f64>,
    /// Devices whose results were aggregated.
    pub devices_reporting: u64,
    /// The int8 student distilled from this round's model, once promoted and running on every
    /// device (the last round only).
    pub student: Option<DemoStudent>,
}

/// The deployed student at the end of the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoStudent {
    /// Its registry version.
    pub version: u64,
    /// Architecture.
    pub architecture: String,
    /// Test accuracy of the int8 student.
    pub accuracy: Option<f64>,
    /// Bytes on the wire.
    pub size_bytes: u64,
    /// Median single-image inference time measured by the coordinator, microseconds.
    pub latency_us: Option<f64>,
    /// Whether its record is signed.
    pub signed: bool,
    /// Devices that verified it and run it.
    pub devices_running: u64,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Asked for no devices or no rounds.
    #[error("need at least one device and one round")]
    Empty,
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificates could not be made.
    #[error(transparent)]
    Certs(#[from] fedge_coordinator::certs::CertError),
    /// The operator's TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] fedge_net::TlsError),
    /// An operator request failed.
    #[error(transparent)]
    Request(#[from] fedge_net::RequestError),
    /// The coordinator answered something other than a status.
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
    /// The system did not reach the expected state in time.
    #[error("{0}")]
    Timeout(String),
    /// The inference benchmark failed.
    #[error("inference benchmark: {0}")]
    Bench(#[from] fedge_edge::bench::BenchError),
    /// An edge configuration could not be read back.
    #[error(transparent)]
    Config(#[from] fedge_core::config_file::ConfigFileError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let context = context.into();
    move |source| DemoError::Io { context, source }
}

/// Kills the child processes however the demo ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> Result<u16, DemoError> {
    let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_err(io("no free UDP port"))?.port();
    Ok(port)
}

fn spawn(exe: &Path, role: &str, config: &Path, log: &Path) -> Result<Child, DemoError> {
    let log = std::fs::File::create(log).map_err(io(format!("cannot create {}", log.display())))?;
    let out = log.try_clone().map_err(io("cannot share the log file"))?;
    Command::new(exe)
        .args([role, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .spawn()
        .map_err(io(format!("cannot start the {role} process")))
}

async fn status(client: &fedge_net::RequestClient, cmd: OperatorCommand) -> Result<Status, DemoError> {
    match client.request(&Message::Operator(cmd)).await? {
        Message::Status(s) => Ok(s),
        other => Err(DemoError::Unexpected(format!("{other:?}"))),
    }
}

/// Runs the demo with `devices` edge processes for `rounds` rounds; `progress` gets one line
/// per round.
pub async fn run(devices: usize, rounds: u64, progress: impl FnMut(&DemoRound)) -> Result<Vec<DemoRound>, DemoError> {
    Ok(run_with(devices, rounds, None, progress).await?.0)
}

/// [`run`], then, with `bench`, `fedge-edge bench-inference` as device 0 against the live
/// coordinator (whose per-device inference rate limit is lifted for it) before everything stops.
pub async fn run_with(
    devices: usize,
    rounds: u64,
    bench: Option<fedge_edge::bench::BenchOptions>,
    mut progress: impl FnMut(&DemoRound),
) -> Result<(Vec<DemoRound>, Option<fedge_edge::bench::BenchReport>), DemoError> {
    if devices == 0 || rounds == 0 {
        return Err(DemoError::Empty);
    }
    let exe = std::env::current_exe().map_err(io("cannot find this executable"))?;
    let dir = tempfile::tempdir().map_err(io("cannot make a temporary folder"))?;
    let fleet = dir.path().join("fleet");
    let ca = CertDir::init(&fleet, &["localhost".into(), "127.0.0.1".into()])?;
    let op = ca.issue(Role::Operator, "demo", 1)?;
    let port = free_udp_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let coordinator_toml = dir.path().join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        format!(
            "listen = \"{addr}\"\ncerts_dir = {:?}\nstate_dir = {:?}\nfraction = 1.0\nmin_train_clients = {devices}\nround_timeout_secs = 120\nepochs = 1\ndistill_every = {rounds}\nproxy_examples = 1000\n\n[distill]\nepochs = 10\n{}",
            fleet.display().to_string(),
            dir.path().join("coordinator-state").display().to_string(),
            if bench.is_some() { "\n[inference]\nrate_per_sec = 1e9\nburst = 1e9\n" } else { "" }
        ),
    )
    .map_err(io("cannot write the coordinator configuration"))?;
    let mut children = Children(Vec::new());
    children.0.push(spawn(&exe, "coordinator", &coordinator_toml, &dir.path().join("coordinator.log"))?);
    for i in 0..devices {
        let issued = ca.issue(Role::Device, &format!("dev-{i}"), 1)?;
        let toml = dir.path().join(format!("edge-{i}.toml"));
        std::fs::write(
            &toml,
            format!(
                "coordinator = \"{addr}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nstate_dir = {:?}\nshard = {i}\nshards = {devices}\nmodel_key = {:?}\n",
                ca.ca_pem().display().to_string(),
                issued.cert.display().to_string(),
                issued.key.display().to_string(),
                dir.path().join(format!("state-{i}")).display().to_string(),
                ca.model_public_key_path().display().to_string(),
            ),
        )
        .map_err(io("cannot write an edge configuration"))?;
        children.0.push(spawn(&exe, "edge", &toml, &dir.path().join(format!("edge-{i}.log")))?);
    }

    let config = fedge_net::client_config(&ca.ca_pem(), &op.cert, &op.key)?;
    let started = Instant::now();
    let client = loop {
        match fedge_net::RequestClient::connect(addr, "localhost", config.clone()).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default();
                return Err(DemoError::Timeout(format!("coordinator did not come up: {e}\n{log}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    while status(&client, OperatorCommand::Status).await?.devices_connected.len() < devices {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Timeout(format!(
                "devices did not all connect within 60 s (logs in {})",
                dir.path().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status(
        &client,
        OperatorCommand::StartRounds { rounds, fraction: None, min_train_clients: None, deadline_secs: None },
    )
    .await?;
    let mut reported = 0usize;
    let mut out = Vec::new();
    loop {
        let s = status(&client, OperatorCommand::Status).await?;
        // Report a round once the coordinator has evaluated its model.
        while let Some(r) = s.rounds.get(reported) {
            if r.accuracy.is_none() && r.failed_reason.is_none() {
                break;
            }
            let line = DemoRound {
                round: r.round,
                model_version: r.model_version,
                accuracy: r.accuracy,
                devices_reporting: r.results,
                student: None,
            };
            progress(&line);
            out.push(line);
            reported += 1;
        }
        if reported as u64 >= rounds {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The coordinator distils the last model, signs and promotes the student; every device
    // fetches, verifies and runs it.
    let waited = Instant::now();
    let student = loop {
        let models = match client.request(&Message::Operator(OperatorCommand::Models)).await? {
            Message::Models(m) => m,
            other => return Err(DemoError::Unexpected(format!("{other:?}"))),
        };
        if let Some(m) = models.iter().find(|m| m.promoted && m.devices_running >= devices as u64) {
            break DemoStudent {
                version: m.version,
                architecture: m.architecture.clone(),
                accuracy: m.accuracy,
                size_bytes: m.size_bytes,
                latency_us: m.latency_us,
                signed: m.signed,
                devices_running: m.devices_running,
            };
        }
        if waited.elapsed() > Duration::from_secs(120) {
            return Err(DemoError::Timeout(format!(
                "the distilled student did not reach every device within 120 s (logs in {})",
                dir.path().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(last) = out.last_mut() {
        last.student = Some(student);
    }
    let report = match bench {
        Some(opts) => {
            let edge: fedge_edge::config::EdgeConfig =
                fedge_core::config_file::read_toml(&dir.path().join("edge-0.toml"))?;
            Some(fedge_edge::bench::run(&edge, &opts).await?)
        }
        None => None,
    };
    client.close().await;
    drop(children);
    Ok((out, report))
}
