//! `fedge-sim demo`: the real system on loopback in one command.
//!
//! Makes a fresh CA, one operator and N device certificates in a temporary folder, starts a
//! coordinator process and N edge processes (this same executable, running the coordinator and
//! edge services), drives R rounds through operator commands over QUIC, reports each round's
//! model version and accuracy, and stops every process.
//!
//! With regions (`--regions R`), R regional aggregator processes (coordinators with an
//! `[upstream]` table and aggregator certificates) stand between the devices and the root:
//! device `i` connects to region `i mod R`, each region runs its part of every round and sends
//! its devices' mean to the root, relays the root's signed student to its devices, and answers
//! escalations with the regional 2NN the root distils with the student (three inference tiers).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::wire::{Message, OperatorCommand, Status};
use serde::Serialize;

use crate::processes::Children;

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
    /// With regions: the medium-tier model distilled with the student, for the regions to answer
    /// escalations with (the last round only; `devices_running` counts the regions running it).
    pub regional: Option<DemoStudent>,
    /// With regions: device 0's hybrid inference over the three live tiers (the last round only).
    pub tiers: Option<DemoTiers>,
}

/// Device 0's hybrid predictor (its deployed student, calibrated as `fedge-edge run` does,
/// escalating to its region) on test images, by the tier that answered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DemoTiers {
    /// Test images asked.
    pub requests: u64,
    /// Correct answers, of all.
    pub accuracy: f64,
    /// Answered on the device.
    pub device: TierStat,
    /// Answered by the region's medium-tier model.
    pub region: TierStat,
    /// Answered by the root's teacher (through the region).
    pub root: TierStat,
}

/// One tier's share of the answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierStat {
    /// Answers it gave.
    pub answered: u64,
    /// Of which correct.
    pub correct: u64,
    /// Mean time from request to answer on the device, milliseconds.
    pub mean_latency_ms: f64,
}

/// Test images device 0 asks in the three-tier measurement.
const TIER_REQUESTS: usize = 500;

/// Device 0's hybrid predictor on the last [`TIER_REQUESTS`] test images, by the tier answering.
async fn measure_tiers(edge: &fedge_edge::config::EdgeConfig) -> Result<DemoTiers, DemoError> {
    use fedge_edge::hybrid::Source;
    let predictor =
        fedge_edge::service::hybrid_predictor(edge).map_err(|e| DemoError::Unexpected(format!("device 0: {e}")))?;
    let waited = Instant::now();
    while predictor.cloud().teacher_version().is_none() {
        if waited.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Timeout("device 0 did not reach its region for inference within 30 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let test = fedge_core::dataset::embedded::mnist_subset().map_err(|e| DemoError::Unexpected(e.to_string()))?.test;
    let mut t = DemoTiers::default();
    let mut latency = [0.0f64; 3];
    for i in test.len().saturating_sub(TIER_REQUESTS)..test.len() {
        let request = fedge_edge::hybrid::Request { pixels: test.image(i).to_vec(), private: false, max_cost: None };
        let a = predictor.predict(request).await.map_err(|e| DemoError::Unexpected(format!("device 0: {e}")))?;
        let (k, stat) = match a.answered_by {
            Source::Local => (0, &mut t.device),
            Source::Region => (1, &mut t.region),
            Source::Cloud => (2, &mut t.root),
        };
        stat.answered += 1;
        stat.correct += u64::from(a.class == test.labels[i] as usize);
        latency[k] += a.latency_ms;
        t.requests += 1;
    }
    for (stat, total) in [&mut t.device, &mut t.region, &mut t.root].into_iter().zip(latency) {
        stat.mean_latency_ms = if stat.answered > 0 { total / stat.answered as f64 } else { 0.0 };
    }
    t.accuracy = (t.device.correct + t.region.correct + t.root.correct) as f64 / t.requests.max(1) as f64;
    Ok(t)
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

impl DemoStudent {
    /// The registry's line of the model, and the devices (or regions) running it.
    fn of(m: &fedge_core::wire::ModelLine, devices_running: u64) -> Self {
        Self {
            version: m.version,
            architecture: m.architecture.clone(),
            accuracy: m.accuracy,
            size_bytes: m.size_bytes,
            latency_us: m.latency_us,
            signed: m.signed,
            devices_running,
        }
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Asked for no devices or no rounds.
    #[error("need at least one device and one round")]
    Empty,
    /// More regions than devices: a region would have none.
    #[error("{regions} regions for {devices} devices: every region needs a device")]
    Regions {
        /// Regions asked for.
        regions: usize,
        /// Devices asked for.
        devices: usize,
    },
    /// Secure aggregation needs two devices and no regions.
    #[error(
        "--secure-aggregation needs at least 2 devices and no regions (a region's mean is not a device's masked update)"
    )]
    Secure,
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

/// The root's newest regional model, once all `regions` have installed it (their logs say so).
async fn wait_for_regional(
    client: &fedge_net::RequestClient,
    regions: usize,
    dir: &Path,
) -> Result<DemoStudent, DemoError> {
    let waited = Instant::now();
    loop {
        let models = match client.request(&Message::Operator(OperatorCommand::Models)).await? {
            Message::Models(m) => m,
            other => return Err(DemoError::Unexpected(format!("{other:?}"))),
        };
        if let Some(m) = models.iter().rev().find(|m| m.role == fedge_core::registry::ModelRole::Regional) {
            let installed = format!("regional model v{} ({}) installed", m.version, m.architecture);
            let running = (0..regions)
                .filter(|r| {
                    std::fs::read_to_string(dir.join(format!("region-{r}.log"))).is_ok_and(|l| l.contains(&installed))
                })
                .count() as u64;
            if running == regions as u64 {
                return Ok(DemoStudent::of(m, running));
            }
        }
        if waited.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Timeout(format!(
                "the regional model did not reach every region within 60 s (logs in {})",
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    Ok(run_with(devices, rounds, 0, false, None, progress).await?.0)
}

/// [`run`], then, with `bench`, `fedge-edge bench-inference` as device 0 against the live
/// coordinator (whose per-device inference rate limit is lifted for it) before everything stops.
pub async fn run_with(
    devices: usize,
    rounds: u64,
    regions: usize,
    secure: bool,
    bench: Option<fedge_edge::bench::BenchOptions>,
    mut progress: impl FnMut(&DemoRound),
) -> Result<(Vec<DemoRound>, Option<fedge_edge::bench::BenchReport>), DemoError> {
    if devices == 0 || rounds == 0 {
        return Err(DemoError::Empty);
    }
    if regions > devices {
        return Err(DemoError::Regions { regions, devices });
    }
    if secure && (regions > 0 || devices < 2) {
        return Err(DemoError::Secure);
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
            "listen = \"{addr}\"\ncerts_dir = {:?}\nstate_dir = {:?}\nfraction = 1.0\nmin_train_clients = {}\nround_timeout_secs = 120\nepochs = 1\ndistill_every = {rounds}\nproxy_examples = 1000\n{}\n[distill]\nepochs = 10\n{}",
            fleet.display().to_string(),
            dir.path().join("coordinator-state").display().to_string(),
            if regions > 0 { regions } else { devices },
            if regions > 0 {
                "regional_model = \"2nn\"\n".to_string()
            } else if secure {
                // Each device holds a 1/devices share of the embedded 10,000 images: W is its size.
                format!(
                    "secure_aggregation = true\nsecagg_stage_secs = 10\nsecagg_weight_cap = {}\n",
                    10_000usize.div_ceil(devices)
                )
            } else {
                String::new()
            },
            // Regions escalate for many devices each: lift the per-participant rate too.
            if bench.is_some() || regions > 0 { "\n[inference]\nrate_per_sec = 1e9\nburst = 1e9\n" } else { "" }
        ),
    )
    .map_err(io("cannot write the coordinator configuration"))?;
    let mut children = Children(Vec::new());
    children.0.push(spawn(&exe, "coordinator", &coordinator_toml, &dir.path().join("coordinator.log"))?);
    // Regional aggregators: coordinators of their own devices, following the root.
    let mut region_addrs = Vec::new();
    for r in 0..regions {
        let name = format!("region-{r}");
        let issued = ca.issue(Role::Aggregator, &name, 1)?;
        let region_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let members = (0..devices).filter(|i| i % regions == r).count();
        let toml = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &toml,
            format!(
                "listen = \"{region_addr}\"\ncerts_dir = {:?}\nstate_dir = {:?}\nfraction = 1.0\nmin_train_clients = {members}\nround_timeout_secs = 90\n\n[upstream]\naddress = \"{addr}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nescalate_rate = 0.3\n",
                fleet.display().to_string(),
                dir.path().join(format!("{name}-state")).display().to_string(),
                ca.ca_pem().display().to_string(),
                issued.cert.display().to_string(),
                issued.key.display().to_string(),
            ),
        )
        .map_err(io("cannot write a region's configuration"))?;
        children.0.push(spawn(&exe, "coordinator", &toml, &dir.path().join(format!("{name}.log")))?);
        region_addrs.push(region_addr);
    }
    for i in 0..devices {
        // Behind region i mod R, or the root itself.
        let addr = if regions > 0 { region_addrs[i % regions] } else { addr };
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
    let connect = |addr: SocketAddr, log: String| {
        let (config, log) = (config.clone(), dir.path().join(log));
        async move {
            loop {
                match fedge_net::RequestClient::connect(addr, "localhost", config.clone()).await {
                    Ok(c) => break Ok(c),
                    Err(e) if started.elapsed() > Duration::from_secs(30) => {
                        let log = std::fs::read_to_string(&log).unwrap_or_default();
                        break Err(DemoError::Timeout(format!("a coordinator did not come up: {e}\n{log}")));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    };
    let client = connect(addr, "coordinator.log".into()).await?;
    let mut region_clients = Vec::new();
    for (r, a) in region_addrs.iter().enumerate() {
        region_clients.push(connect(*a, format!("region-{r}.log")).await?);
    }
    // Every device at its coordinator (the root, or its region), every region at the root.
    loop {
        let mut connected = status(&client, OperatorCommand::Status).await?.devices_connected.len()
            >= if regions > 0 { regions } else { devices };
        for (r, c) in region_clients.iter().enumerate() {
            let members = (0..devices).filter(|i| i % regions == r).count();
            connected &= status(c, OperatorCommand::Status).await?.devices_connected.len() >= members;
        }
        if connected {
            break;
        }
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
            // Behind regions: the devices in the regions' rounds that made this one.
            let mut devices_reporting = if regions > 0 { 0 } else { r.results };
            for c in &region_clients {
                let lines = status(c, OperatorCommand::Status).await?.rounds;
                let made = lines.iter().filter(|l| l.failed_reason.is_none()).nth(reported);
                devices_reporting += made.map_or(0, |l| l.results);
            }
            let line = DemoRound {
                round: r.round,
                model_version: r.model_version,
                accuracy: r.accuracy,
                devices_reporting,
                student: None,
                regional: None,
                tiers: None,
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
        // Devices behind regions are counted by their region, which relays the student.
        let mut running: std::collections::BTreeMap<u64, u64> =
            models.iter().map(|m| (m.version, m.devices_running)).collect();
        for c in &region_clients {
            if let Message::Models(relayed) = c.request(&Message::Operator(OperatorCommand::Models)).await? {
                for m in relayed.iter().filter(|m| m.promoted) {
                    *running.entry(m.version).or_insert(0) += m.devices_running;
                }
            }
        }
        let promoted = models.iter().find(|m| m.promoted).map(|m| (m, running.get(&m.version).copied().unwrap_or(0)));
        if let Some((m, devices_running)) = promoted.filter(|(_, n)| *n >= devices as u64) {
            break DemoStudent::of(m, devices_running);
        }
        if waited.elapsed() > Duration::from_secs(120) {
            return Err(DemoError::Timeout(format!(
                "the distilled student did not reach every device within 120 s (logs in {})",
                dir.path().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // With regions: the regional model distilled with the student, once every region runs it.
    let regional = match regions {
        0 => None,
        _ => Some(wait_for_regional(&client, regions, dir.path()).await?),
    };
    // And device 0's hybrid inference over the three tiers, live.
    let tiers = match regions {
        0 => None,
        _ => {
            let edge: fedge_edge::config::EdgeConfig =
                fedge_core::config_file::read_toml(&dir.path().join("edge-0.toml"))?;
            Some(measure_tiers(&edge).await?)
        }
    };
    if let Some(last) = out.last_mut() {
        last.student = Some(student);
        last.regional = regional;
        last.tiers = tiers;
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
    for c in region_clients {
        c.close().await;
    }
    drop(children);
    Ok((out, report))
}
