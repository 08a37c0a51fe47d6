//! What the coordinator's process tests share: a fleet's certificates and configuration, a
//! `fedge-coordinator serve` process, and raw device links that speak the protocol by hand.
#![allow(dead_code)] // each test file uses its own part

pub mod browser;
pub mod relay;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::ModelParams;
use fedge_core::wire::{Capabilities, Message, TrainResult, TrainTask};
use fedge_edge::link::{DeviceTls, Link};

/// A fleet in a temporary folder: a CA with device certificates `names` and an operator
/// `admin`, a free loopback port, and a coordinator configuration whose state is `state/`.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub ca: CertDir,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Fleet {
    /// Every device is selected (`fraction = 1`), a round needs `min` of them and failures are
    /// not accepted.
    pub fn new(names: &[&str], min: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("fleet");
        let ca = CertDir::init(&certs, &["localhost".into()]).unwrap();
        for name in names {
            ca.issue(Role::Device, name, 1).unwrap();
        }
        ca.issue(Role::Operator, "admin", 1).unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.path().join("coordinator.toml");
        let state = dir.path().join("state");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ncerts_dir = {certs:?}\nstate_dir = {state:?}\nfraction = 1.0\nmin_train_clients = {min}\n\
                 accept_failures = false\nround_timeout_secs = 300\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("coordinator.log");
        Self { dir, certs, ca, addr, config, state, log }
    }

    /// Adds `lines` to the coordinator's configuration.
    pub fn configure(&self, lines: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(lines);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts `fedge-coordinator serve` on this fleet's configuration.
    pub fn start(&self) -> Coordinator {
        Coordinator::start(&self.config, &self.log)
    }

    /// Starts it unable to write files past `max_file_kib` (see [`Coordinator::start_limited`]).
    pub fn start_limited(&self, max_file_kib: u64) -> Coordinator {
        Coordinator::start_limited(&self.config, &self.log, max_file_kib)
    }

    /// Device `name`'s link, joined (see [`join`]).
    pub async fn join(&self, name: &str, coordinator: &Coordinator) -> Link {
        join(self.addr, &self.ca, name, coordinator).await
    }

    /// The links of devices `names`, joined to `coordinator` in order.
    pub async fn join_all(&self, names: &[&str], coordinator: &Coordinator) -> Vec<Link> {
        let mut links = Vec::new();
        for name in names {
            links.push(self.join(name, coordinator).await);
        }
        links
    }

    /// Runs an operator command against this fleet's coordinator; its standard output.
    pub fn operator(&self, args: &[&str]) -> String {
        operator(&self.certs, self.addr, args)
    }
}

/// A coordinator process, killed when dropped.
pub struct Coordinator {
    pub child: Child,
    log: PathBuf,
}

impl Coordinator {
    pub fn start(config: &Path, log: &Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fedge-coordinator"));
        command.args(["serve", "--config"]).arg(config);
        Self::spawn(command, log)
    }

    /// `fedge-coordinator serve` unable to write any file past `max_file_kib` KiB
    /// (`RLIMIT_FSIZE`, set by `ulimit -f`, with `SIGXFSZ` ignored so that a write past it
    /// fails with `EFBIG` as on a full disk instead of killing the process).
    pub fn start_limited(config: &Path, log: &Path, max_file_kib: u64) -> Self {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(format!("trap '' XFSZ; ulimit -f {max_file_kib} && exec \"$0\" serve --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_fedge-coordinator"))
            .arg(config);
        Self::spawn(command, log)
    }

    fn spawn(mut command: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = command
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start fedge-coordinator");
        Self { child, log: log.to_path_buf() }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.sigkill();
    }

    /// SIGKILL, keeping the handle (for its log).
    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits up to `within` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the coordinator did not stop within {within:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tls(ca: &CertDir, name: &str) -> DeviceTls {
    DeviceTls {
        ca: ca.ca_pem(),
        cert: ca.dir().join(format!("devices/{name}.pem")),
        key: ca.dir().join(format!("devices/{name}.key")),
    }
}

/// Connects and says Hello, retrying while the coordinator is starting.
pub async fn join(addr: SocketAddr, ca: &CertDir, name: &str, coordinator: &Coordinator) -> Link {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let caps =
            Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples: 10 };
        let attempt = async {
            let link = Link::connect(addr, "localhost", &tls(ca, name)).await?;
            link.hello(caps).await?;
            Ok::<_, fedge_edge::link::ConnectError>(link)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(link)) => return link,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{name} cannot join: {:?}\n{}", other.map(|r| r.err()), coordinator.log()),
        }
    }
}

pub async fn task_of(link: &Link) -> TrainTask {
    for _ in 0..200 {
        match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
            Message::TrainTask(t) => return t,
            Message::NoTask { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no task");
}

/// Device `i`'s update: every weight moved by `0.001 * (i + 1)`, from `10 * (i + 1)` examples.
pub fn update(task: &TrainTask, like: &ModelParams, i: usize) -> TrainResult {
    let delta = ModelParams::new(like.layout().clone(), vec![0.001 * (i + 1) as f32; like.numel()]).unwrap();
    TrainResult {
        round: task.round,
        model_version: task.model_version,
        num_samples: 10 * (i as u64 + 1),
        train_loss: 0.5,
        delta,
        clipped: false,
    }
}

pub async fn model(link: &Link, version: u64) -> ModelParams {
    match link.request(&Message::ModelRequest { version: Some(version) }).await.unwrap() {
        Message::Model { version: v, hash, params } => {
            assert_eq!((v, hash), (version, params.content_hash()));
            params
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Polls through `link` until the coordinator announces global version `version` (panics with
/// the coordinator's log after `within`).
pub async fn wait_for_version(link: &Link, version: u64, within: Duration, coordinator: &Coordinator) {
    let deadline = Instant::now() + within;
    loop {
        match link.request(&Message::TaskRequest { running: None }).await {
            Ok(Message::NoTask { model_version, .. }) if model_version == version => return,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("v{version} never came: {other:?}\n{}", coordinator.log()),
        }
    }
}

pub fn operator(certs: &Path, addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-coordinator"))
        .args(args)
        .arg("--coordinator")
        .arg(addr.to_string())
        .arg("--certs-dir")
        .arg(certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
