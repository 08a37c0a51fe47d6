//! Hostile devices over the wire: what one may send and what it cannot make the coordinator
//! do.

use std::time::Duration;

use fedge_coordinator::server::Coordinator;
use fedge_core::ModelParams;
use fedge_core::wire::{ErrorCode, Message, TrainResult};
use fedge_engine::EngineConfig;

use fedge_tests::harness::{fleet, initial_2nn, issue_devices, join, serve};

/// This process's resident memory, in bytes (`VmRSS` in /proc/self/status).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Announces a frame of `len` bytes whose first byte says `tag` (1: `TrainResult`, 5:
/// `TaskRequest`), pushes up to 1 MiB of its body on a task of its own, and returns the
/// coordinator's answer, which must come without the rest of the body.
async fn announce(link: &fedge_edge::link::Link, len: u32, tag: u8) -> Message {
    let (mut send, mut recv) = link.connection.open_bi().await.unwrap();
    let mut head = len.to_le_bytes().to_vec();
    head.push(tag);
    send.write_all(&head).await.unwrap();
    let pusher = tokio::spawn(async move {
        let body = vec![0u8; 1 << 20];
        let _ = send.write_all(&body).await;
        send
    });
    let answer = tokio::time::timeout(Duration::from_secs(5), fedge_net::read_message(&mut recv))
        .await
        .expect("an oversized frame is refused at once, before its body arrives")
        .unwrap();
    pusher.abort();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_at_once_without_memory_and_honest_devices_train() {
    let (_dir, ca) = fleet();
    let initial = initial_2nn(1);
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(60),
        ..EngineConfig::default()
    };
    let coordinator = Coordinator::new(config, initial.clone()).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    issue_devices(&ca, &["flood", "honest"]);
    let (flood, _) = join(addr, &ca, "flood", 10).await;
    let (honest, _) = join(addr, &ca, "honest", 10).await;
    coordinator.start_rounds(1);
    let task = match honest.request(&Message::TaskRequest { running: None }).await.unwrap() {
        Message::TrainTask(t) => t,
        other => panic!("{other:?}"),
    };

    let before = rss_bytes();
    for i in 0..100 {
        // A 200 MiB TrainResult (under the global 256 MiB limit, far over the model's size),
        // then a 1 MiB TaskRequest.
        let (len, tag) = if i % 2 == 0 { (200 << 20, 1) } else { (1 << 20, 5) };
        match announce(&flood, len, tag).await {
            Message::Error { code: ErrorCode::TooLarge, message } => {
                assert!(message.contains("exceeds"), "{message}")
            }
            other => panic!("frame {i}: expected TooLarge, got {other:?}"),
        }
    }
    let grown = rss_bytes().saturating_sub(before);
    eprintln!("resident memory grew by {} KiB over 100 oversized frames", grown >> 10);
    assert!(grown < 50 << 20, "resident memory grew by {grown} bytes");

    // Both devices can still train: the flooder's connection stays usable, the honest
    // device's result is acknowledged and the round closes.
    let zero = ModelParams::zeros(initial.layout().clone());
    for link in [&honest, &flood] {
        let task = match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
            Message::TrainTask(t) => t,
            other => panic!("{other:?}"),
        };
        let result = TrainResult {
            round: task.round,
            model_version: task.model_version,
            num_samples: 10,
            train_loss: 0.1,
            delta: zero.clone(),
            clipped: false,
        };
        match link.request(&Message::TrainResult(result)).await.unwrap() {
            Message::Ack { round } => assert_eq!(round, task.round),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(task.round, 1);
    tokio::time::timeout(Duration::from_secs(30), coordinator.wait_for_rounds(1)).await.expect("round closes");
    assert_eq!(coordinator.global().0, 1);
    server.abort();
}
