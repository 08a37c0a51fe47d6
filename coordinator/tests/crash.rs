//! Crash safety, for real: a `fedge-coordinator serve` process is killed with SIGKILL in the
//! middle of a round and started again on the same state folder. The round resumes: updates
//! acknowledged before the kill are kept (and not counted twice), the device that had not
//! answered reconnects, gets the same task, and the round completes with exactly the model
//! the three updates define.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::ModelParams;
use fedge_core::wire::{Capabilities, ErrorCode, Message, TrainResult, TrainTask};
use fedge_edge::transport::{DeviceTls, Link};

/// A coordinator process, killed when dropped.
struct Coordinator {
    child: Child,
    log: PathBuf,
}

impl Coordinator {
    fn start(config: &Path, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fedge-coordinator"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start fedge-coordinator");
        Self { child, log: log.to_path_buf() }
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls(ca: &CertDir, name: &str) -> DeviceTls {
    DeviceTls {
        ca: ca.ca_pem(),
        cert: ca.dir().join(format!("devices/{name}.pem")),
        key: ca.dir().join(format!("devices/{name}.key")),
    }
}

/// Connects and says Hello, retrying while the coordinator is starting.
async fn join(addr: SocketAddr, ca: &CertDir, name: &str, coordinator: &Coordinator) -> Link {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let caps =
            Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples: 10 };
        let attempt = async {
            let link = Link::connect(addr, "localhost", &tls(ca, name)).await?;
            link.hello(caps).await?;
            Ok::<_, fedge_edge::transport::ConnectError>(link)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(link)) => return link,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{name} cannot join: {:?}\n{}", other.map(|r| r.err()), coordinator.log()),
        }
    }
}

async fn task_of(link: &Link) -> TrainTask {
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
fn update(task: &TrainTask, like: &ModelParams, i: usize) -> TrainResult {
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

async fn model(link: &Link, version: u64) -> ModelParams {
    match link.request(&Message::ModelRequest { version: Some(version) }).await.unwrap() {
        Message::Model { version: v, hash, params } => {
            assert_eq!((v, hash), (version, params.content_hash()));
            params
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn operator(certs: &Path, addr: SocketAddr, args: &[&str]) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_loses_no_acknowledged_update() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("fleet");
    let ca = CertDir::init(&certs, &["localhost".into()]).unwrap();
    let names = ["dev-0", "dev-1", "dev-2"];
    for name in names {
        ca.issue(Role::Device, name, 1).unwrap();
    }
    ca.issue(Role::Operator, "admin", 1).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ncerts_dir = {certs:?}\nstate_dir = {:?}\nfraction = 1.0\nmin_train_clients = 3\n\
             accept_failures = false\nround_timeout_secs = 300\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let log = dir.path().join("coordinator.log");

    // First life: all three devices are selected; two upload and are acknowledged.
    let first = Coordinator::start(&config, &log);
    let mut links = Vec::new();
    for name in names {
        links.push(join(addr, &ca, name, &first).await);
    }
    operator(&certs, addr, &["round", "start", "--rounds", "1"]);
    let mut tasks = Vec::new();
    for link in &links {
        tasks.push(task_of(link).await);
    }
    assert!(tasks.iter().all(|t| (t.round, t.model_version) == (1, 0)));
    let initial = model(&links[0], 0).await;
    let updates: Vec<TrainResult> = (0..3).map(|i| update(&tasks[i], &initial, i)).collect();
    for i in 0..2 {
        let reply = links[i].request(&Message::TrainResult(updates[i].clone())).await.unwrap();
        assert_eq!(reply, Message::Ack { round: 1 }, "{}", first.log());
    }
    first.kill();
    drop(links);

    // Second life, same state folder.
    let second = Coordinator::start(&config, &log);
    let links: Vec<Link> = {
        let mut v = Vec::new();
        for name in names {
            v.push(join(addr, &ca, name, &second).await);
        }
        v
    };
    assert!(second.log().contains("resumed round 1 with 2 of 3 updates"), "{}", second.log());
    // The acknowledged updates were kept: sending one again is a duplicate, not a second vote.
    match links[0].request(&Message::TrainResult(updates[0].clone())).await.unwrap() {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Duplicate),
        other => panic!("unexpected {other:?}"),
    }
    // Devices that answered get no task; the one that had not gets the same task again.
    assert!(matches!(links[1].request(&Message::TaskRequest { running: None }).await.unwrap(), Message::NoTask { .. }));
    assert_eq!(task_of(&links[2]).await, tasks[2]);
    let reply = links[2].request(&Message::TrainResult(updates[2].clone())).await.unwrap();
    assert_eq!(reply, Message::Ack { round: 1 });

    // The round completes from all three updates: v1 = v0 + (10*0.001 + 20*0.002 + 30*0.003) / 60.
    let deadline = Instant::now() + Duration::from_secs(30);
    let v1 = loop {
        match links[1].request(&Message::TaskRequest { running: None }).await.unwrap() {
            Message::NoTask { model_version: 1, .. } => break model(&links[1], 1).await,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("round 1 did not close: {other:?}\n{}", second.log()),
        }
    };
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003) / 60.0;
    for (a, b) in v1.data().iter().zip(initial.data()) {
        assert!((*a as f64 - (*b as f64 + step)).abs() < 1e-6, "{a} vs {b} + {step}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&operator(&certs, addr, &["round", "list", "--json"])).unwrap();
    assert_eq!(status[0]["round"], 1);
    assert_eq!(status[0]["model_version"], 1);
    assert_eq!(status[0]["devices_reporting"], 3);
}

/// Issue 13, one path for each update: an acknowledged update is stored as the very bytes the
/// device sent (the encoded `TrainResult` frame), not decoded and encoded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_stored_as_the_bytes_the_device_sent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("fleet");
    let ca = CertDir::init(&certs, &["localhost".into()]).unwrap();
    let names = ["dev-0", "dev-1"];
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
            "listen = \"{addr}\"\ncerts_dir = {certs:?}\nstate_dir = {state:?}\nfraction = 1.0\nmin_train_clients = 2\n\
             accept_failures = false\nround_timeout_secs = 300\n"
        ),
    )
    .unwrap();
    let coordinator = Coordinator::start(&config, &dir.path().join("coordinator.log"));
    let mut links = Vec::new();
    for name in names {
        links.push(join(addr, &ca, name, &coordinator).await);
    }
    operator(&certs, addr, &["round", "start", "--rounds", "1"]);
    let task = task_of(&links[0]).await;
    let sent = Message::TrainResult(update(&task, &model(&links[0], task.model_version).await, 0));
    let reply = links[0].request(&sent).await.unwrap();
    assert_eq!(reply, Message::Ack { round: task.round }, "{}", coordinator.log());
    coordinator.kill();
    drop(links);

    let store = fedge_coordinator::store::Store::open(&state).unwrap();
    let id = store.devices().unwrap().into_iter().find(|(name, _)| name == "dev-0").unwrap().1;
    let stored = store.update_bytes(task.round, id).unwrap().expect("the acknowledged update is stored");
    assert_eq!(stored, fedge_core::codec::encode(&sent));
}
