//! The fleet the system tests stand up, written once: a CA in a temporary folder, a coordinator
//! served on a free loopback port, devices that join with their certificates and train 2NNs on
//! slices of the embedded MNIST subset, an operator, and the waits that let a stopped
//! coordinator go (so its store can be opened again).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::listener::Listener;
use fedge_coordinator::server::Coordinator;
use fedge_coordinator::store::Store;
use fedge_core::ModelParams;
use fedge_core::dataset::{Dataset, embedded};
use fedge_core::params::ContentHash;
use fedge_core::wire::{Capabilities, TrainConfig, Welcome};
use fedge_edge::EdgeTrainer;
use fedge_edge::link::{DeviceTls, Link};
use fedge_edge::work_loop::{DeviceStatus, EdgeClient, WorkLoopError};
use fedge_engine::EngineConfig;
use fedge_learn::{BackendKind, ModelKind, Trainer};
use tokio::task::JoinHandle;

/// One local epoch of SGD in minibatches of 10, clipped to `clip_norm` if given.
pub fn one_epoch(clip_norm: Option<f32>) -> TrainConfig {
    TrainConfig { epochs: 1, batch_size: 10, learning_rate: 0.05, clip_norm, local_dp: None, proximal_mu: None }
}

/// Device `k`'s examples in the fleets whose devices differ in size: 40 + 20k of them, one
/// after another (so their FedAvg weights differ).
pub fn growing_slice(k: usize) -> Vec<usize> {
    let start: usize = (0..k).map(|j| 40 + 20 * j).sum();
    (start..start + 40 + 20 * k).collect()
}

/// The updates devices `0..n` (examples [`growing_slice`]) make on `task` from `global`, each
/// trained here as a device would (a full-batch task's update does not depend on the order of
/// its examples, so the fleet's match these to float rounding).
pub fn device_updates(
    global: &ModelParams,
    task: &fedge_core::wire::TrainTask,
    train: &Dataset,
    n: usize,
) -> Vec<fedge_core::wire::TrainResult> {
    let mut trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    (0..n)
        .map(|k| {
            let mut rng = fedge_core::rng::derive_rng(7, &[k as u64]);
            let mut noise = fedge_core::rng::derive_rng(8, &[k as u64]);
            trainer.run_task(task, global, train, &growing_slice(k), &mut rng, &mut noise).unwrap().result
        })
        .collect()
}

/// Training keys of one epoch at `batch_size` and `lr`, clipped to 1, with DP noise `z` on the
/// sum (central DP; distributed DP when the rounds are secure), delta 1e-5, no budget.
pub fn dp_keys(batch_size: u32, lr: f32, z: f64) -> fedge_engine::TrainingKeys {
    fedge_engine::TrainingKeys {
        epochs: 1,
        batch_size,
        lr,
        clip_norm: Some(1.0),
        noise_multiplier: Some(z),
        adaptive_clip: None,
        local_epsilon: None,
        delta: 1e-5,
        target_epsilon: None,
    }
}

/// A fresh 2NN's parameters (MNIST, 10 classes), initialised from `seed`.
pub fn initial_2nn(seed: u64) -> ModelParams {
    Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap().initial_params(seed)
}

/// The embedded MNIST subset's training split, shared by a test's devices.
pub fn embedded_train() -> Arc<Dataset> {
    Arc::new(embedded::mnist_subset().unwrap().train)
}

/// A temporary folder with a fleet CA (for `localhost`) in its `fleet/`.
pub fn fleet() -> (tempfile::TempDir, CertDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    (dir, ca)
}

/// Issues a device certificate for each of `names`.
pub fn issue_devices(ca: &CertDir, names: &[&str]) {
    for name in names {
        ca.issue(Role::Device, name, 1).unwrap();
    }
}

/// The TLS files of device `name` (its certificate already issued by `ca`).
pub fn device_tls(ca: &CertDir, name: &str) -> DeviceTls {
    DeviceTls {
        ca: ca.ca_pem(),
        cert: ca.dir().join(format!("devices/{name}.pem")),
        key: ca.dir().join(format!("devices/{name}.key")),
    }
}

/// What a test device says about itself at Hello.
pub fn caps(num_samples: u64) -> Capabilities {
    Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples }
}

/// Serves `coordinator` on a free loopback port.
pub fn serve(coordinator: &Arc<Coordinator>, ca: &CertDir) -> (SocketAddr, JoinHandle<()>) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), ca).unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(coordinator.clone().serve(listener)))
}

/// Connects with the device certificate `name` (already issued by `ca`) and says Hello.
pub async fn join(addr: SocketAddr, ca: &CertDir, name: &str, num_samples: u64) -> (Link, Welcome) {
    let link = Link::connect(addr, "localhost", &device_tls(ca, name)).await.unwrap();
    let welcome = link.hello(caps(num_samples)).await.unwrap();
    (link, welcome)
}

/// The task `link`'s device is given, asked for every 20 ms until it comes; a test fails, never
/// hangs, when it does not come within a minute (or the coordinator answers anything but
/// `NoTask` meanwhile).
pub async fn task_of(link: &Link) -> fedge_core::wire::TrainTask {
    let asked = std::time::Instant::now();
    loop {
        match link.request(&fedge_core::wire::Message::TaskRequest { running: None }).await.unwrap() {
            fedge_core::wire::Message::TrainTask(t) => return t,
            fedge_core::wire::Message::NoTask { .. } if asked.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("no task within a minute: {other:?}"),
        }
    }
}

/// Issues the operator certificate `name` and connects with it.
pub async fn operator(addr: SocketAddr, ca: &CertDir, name: &str) -> fedge_net::RequestClient {
    let cert = ca.issue(Role::Operator, name, 1).unwrap();
    let config = fedge_net::client_config(&ca.ca_pem(), &cert.cert, &cert.key).unwrap();
    fedge_net::RequestClient::connect(addr, "localhost", config).await.unwrap()
}

/// A running edge client.
pub type ClientTask = JoinHandle<Result<(), WorkLoopError>>;

/// Runs a 2NN edge client over `link` on examples `indices` of `train`.
pub fn spawn_client(
    link: Link,
    train: &Arc<Dataset>,
    indices: Vec<usize>,
    seed: u64,
    device: u64,
) -> (Arc<Mutex<DeviceStatus>>, ClientTask) {
    let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let mut client = EdgeClient::new(link, trainer, train.clone(), indices, seed);
    (client.status(), tokio::spawn(async move { client.run(device).await }))
}

/// Joins each of `names` (certificates already issued), device `i` training on examples
/// `100 i .. 100 (i + 1)` of `train` with seed 1.
pub async fn spawn_devices(addr: SocketAddr, ca: &CertDir, names: &[&str], train: &Arc<Dataset>) -> Vec<ClientTask> {
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, _) = join(addr, ca, name, 100).await;
        clients.push(spawn_client(link, train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
    }
    clients
}

/// Stops a served coordinator and its devices, and waits until it lets go of its store.
pub async fn stop(coordinator: &Arc<Coordinator>, server: JoinHandle<()>, clients: Vec<ClientTask>) {
    server.abort();
    for c in clients {
        c.abort();
        let _ = c.await;
    }
    let _ = server.await;
    released(coordinator).await;
}

/// Waits until the device sessions of a stopped coordinator have noticed their closed
/// connections and let go of it (so its store can be opened again).
pub async fn released(coordinator: &Arc<Coordinator>) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while Arc::strong_count(coordinator) > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stopped coordinator is released");
}

/// A coordinator's life on a state folder, as [`life`] reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Life {
    /// The model version it ended on.
    pub version: u64,
    /// That version's content hash.
    pub hash: ContentHash,
    /// The devices it knew.
    pub devices_known: u64,
}

/// Runs `rounds` rounds on a coordinator over `state` (a fresh 2NN, seed 1, when it holds
/// none) with devices `dev-a` and `dev-b` (certificates already issued), then stops it and
/// waits until it lets go of the state.
pub async fn life(config: &EngineConfig, state: &Path, ca: &CertDir, rounds: u64) -> Life {
    let train = embedded_train();
    let coordinator = Coordinator::with_store(config.clone(), initial_2nn(1), Store::open(state).unwrap()).unwrap();
    let (addr, server) = serve(&coordinator, ca);
    let clients = spawn_devices(addr, ca, &["dev-a", "dev-b"], &train).await;
    let before = coordinator.reports().len();
    coordinator.start_rounds(rounds);
    tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(rounds as usize)).await.expect("rounds");
    assert_eq!(coordinator.reports().len(), before + rounds as usize);
    let (version, global) = coordinator.global();
    let devices_known = coordinator.status().devices_known;
    stop(&coordinator, server, clients).await;
    Life { version, hash: global.content_hash(), devices_known }
}

/// Waits until every status satisfies `pred`.
pub async fn until_all(statuses: &[Arc<Mutex<DeviceStatus>>], what: &str, pred: impl Fn(&DeviceStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !statuses.iter().all(|s| pred(&s.lock().unwrap())) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "devices did not reach: {what}; {:?}",
            statuses.iter().map(|s| s.lock().unwrap().clone()).collect::<Vec<_>>()
        )
    });
}

/// A plain HTTP/1.1 GET; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: fedge\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}
