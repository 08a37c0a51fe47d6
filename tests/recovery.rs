//! A device recovering from a coordinator's passing trouble: results it could not store yet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::listener::Listener;
use fedge_core::wire::{ErrorCode, Message, TrainTask, Welcome};
use fedge_edge::EdgeTrainer;
use fedge_edge::work_loop::EdgeClient;
use fedge_learn::{BackendKind, ModelKind};

use fedge_tests::harness::{
    caps, device_tls, embedded_train, fleet, initial_2nn, issue_devices, join, one_epoch, serve,
};

/// A coordinator of one round, on `listener`: the first `TaskRequest` gets `task`, later ones
/// `NoTask`; the first `unavailable` uploads get `Unavailable` (its store failing), later ones
/// `Ack`. Serves any number of connections; counts uploads.
fn fake_coordinator(
    listener: Listener,
    task: TrainTask,
    unavailable: u32,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicU32>) {
    let uploads = Arc::new(AtomicU32::new(0));
    let tasks = Arc::new(AtomicU32::new(0));
    let seen = uploads.clone();
    let server = tokio::spawn(async move {
        while let Some(peer) = listener.accept().await {
            let Ok(peer) = peer else { continue };
            let (task, seen, tasks) = (task.clone(), seen.clone(), tasks.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = peer.connection.accept_bi().await {
                    let Ok(request) = fedge_net::read_message(&mut recv).await else { continue };
                    let reply = match request {
                        Message::Hello(_) => Message::Welcome(Welcome {
                            protocol_version: fedge_core::wire::PROTOCOL_VERSION,
                            device_id: "dev".into(),
                            model_version: 0,
                        }),
                        Message::TaskRequest { .. } if tasks.fetch_add(1, Ordering::SeqCst) == 0 => {
                            Message::TrainTask(task.clone())
                        }
                        Message::TaskRequest { .. } => {
                            Message::NoTask { retry_after_ms: 50, model_version: 0, deployed: None }
                        }
                        Message::TrainResult(r) if seen.fetch_add(1, Ordering::SeqCst) < unavailable => {
                            let _ = r;
                            Message::Error { code: ErrorCode::Unavailable, message: "disk full".into() }
                        }
                        Message::TrainResult(r) => Message::Ack { round: r.round },
                        other => Message::Error { code: ErrorCode::Malformed, message: format!("{other:?}") },
                    };
                    let _ = fedge_net::write_message(&mut send, &reply).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (server, uploads)
}

/// A device of 100 examples over a new link to `addr`, starting from model v0 `initial`.
async fn device(addr: std::net::SocketAddr, ca: &CertDir, initial: &fedge_core::ModelParams) -> EdgeClient {
    let (link, _) = join(addr, ca, "dev", 100).await;
    let train = embedded_train();
    let trainer = EdgeTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
    let mut client = EdgeClient::new(link, trainer, train, (0..100).collect(), 1);
    client.set_model(0, initial.clone());
    client
}

/// Runs `client` until it has `acked` results acknowledged; returns the running task.
async fn until_acked(mut client: EdgeClient, acked: u64) -> tokio::task::JoinHandle<()> {
    let status = client.status();
    let running = tokio::spawn(async move {
        let _ = client.run(0).await;
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while status.lock().unwrap().acked < acked {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the result is acknowledged in the end");
    running
}

fn setup() -> (tempfile::TempDir, CertDir, fedge_core::ModelParams, TrainTask) {
    let (dir, ca) = fleet();
    issue_devices(&ca, &["dev"]);
    let initial = initial_2nn(1);
    let task = TrainTask {
        round: 1,
        model_version: 0,
        model_hash: initial.content_hash(),
        config: one_epoch(None),
        secure: None,
    };
    (dir, ca, initial, task)
}

/// A coordinator whose store fails twice: the device's result gets `Unavailable` twice, then
/// `Ack`. The device sends it three times and counts it acknowledged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sends_its_result_again_while_the_coordinator_answers_unavailable() {
    let (_dir, ca, initial, task) = setup();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, uploads) = fake_coordinator(listener, task, 2);
    let client = device(addr, &ca, &initial).await;
    let status = client.status();
    let running = until_acked(client, 1).await;
    assert_eq!(uploads.load(Ordering::SeqCst), 3, "sent until acknowledged, not after");
    assert_eq!(status.lock().unwrap().last_round, Some(1));
    running.abort();
    server.abort();
}

/// The count of acknowledged results is kept in the state folder: a restarted device
/// continues it instead of starting from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_acknowledged_survives_a_device_restart() {
    let (dir, ca, initial, task) = setup();
    let state = dir.path().join("device-state");
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, _) = fake_coordinator(listener, task, 0);
    let first = device(addr, &ca, &initial).await.with_state_dir(state.clone());
    let running = until_acked(first, 1).await;
    running.abort();
    let _ = running.await;
    let written = std::fs::read_to_string(state.join("status.json")).unwrap();
    assert!(written.contains("\"results_acknowledged\": 1"), "{written}");
    // A new process: a new client on the same state folder.
    let second = device(addr, &ca, &initial).await.with_state_dir(state.clone());
    let status = second.status().lock().unwrap().clone();
    assert_eq!((status.acked, status.last_round), (1, Some(1)));
    assert_eq!(fedge_edge::work_loop::load_acknowledged(&state), (1, Some(1)));
    server.abort();
}

/// A revoked device is told why on every attempt, not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_reads_the_plain_reason_on_every_attempt() {
    use fedge_edge::link::Link;
    use fedge_edge::service::{Setback, retry_delay};

    let (_dir, ca) = fleet();
    issue_devices(&ca, &["gone"]);
    ca.revoke(Role::Device, "gone").unwrap();
    let initial = initial_2nn(1);
    let coordinator =
        fedge_coordinator::server::Coordinator::new(fedge_engine::EngineConfig::default(), initial).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let tls = device_tls(&ca, "gone");
    let caps = caps(1);
    let mut delays = Vec::new();
    for attempt in 1..=3 {
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            let link = Link::connect(addr, "localhost", &tls).await?;
            link.hello(caps.clone()).await
        })
        .await
        .expect("refused in time");
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("refused this certificate: revoked"), "attempt {attempt}: {err}");
        let setback = Setback::of(&err);
        assert_eq!(setback, Setback::CertificateRefused, "attempt {attempt}: {err}");
        delays.push(retry_delay(attempt, setback));
    }
    assert!(delays.iter().all(|d| *d > retry_delay(10, Setback::Network)), "{delays:?}");
    server.abort();
}
