//! What survives an interruption: a coordinator restarted on its state folder, a model download
//! cut short.

use std::time::Duration;

use fedge_coordinator::server::Coordinator;
use fedge_core::wire::{ErrorCode, Message};
use fedge_engine::EngineConfig;
use fedge_tests::harness::{
    embedded_train, fleet, initial_2nn, issue_devices, join, life, one_epoch, serve, spawn_client,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_last_model_version() {
    use fedge_coordinator::store::Store;

    let (dir, ca) = fleet();
    let state = dir.path().join("state");
    let train = embedded_train();
    let config = EngineConfig {
        fraction: 1.0,
        min_train_clients: 2,
        round_timeout: Duration::from_secs(60),
        train: one_epoch(None),
        ..EngineConfig::default()
    };
    let names = ["dev-a", "dev-b"];
    issue_devices(&ca, &names);

    // First life: two rounds.
    let first = life(&config, &state, &ca, 2).await;
    assert_eq!(first.version, 2);
    let (hash_before, known_before) = (first.hash, first.devices_known);
    assert_eq!(known_before, 2);

    // Second life, same state folder, a different initial model offered: the stored one wins.
    let other_initial = initial_2nn(99);
    let coordinator = Coordinator::with_store(config, other_initial, Store::open(&state).unwrap()).unwrap();
    let (version, global) = coordinator.global();
    assert_eq!(version, 2);
    assert_eq!(global.content_hash(), hash_before);
    let st = coordinator.status();
    assert_eq!((st.devices_known, st.model_version, st.model_hash), (2, 2, hash_before));
    // The next round is round 3 and builds version 3 from version 2.
    let (addr, server) = serve(&coordinator, &ca);
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, welcome) = join(addr, &ca, name, 100).await;
        assert_eq!(welcome.model_version, 2);
        clients.push(spawn_client(link, &train, (i * 100..(i + 1) * 100).collect(), 1, i as u64).1);
    }
    coordinator.start_rounds(1);
    tokio::time::timeout(Duration::from_secs(120), coordinator.wait_for_rounds(1)).await.expect("round 3");
    let r = &coordinator.reports()[0];
    assert_eq!((r.round, r.model_version, r.results), (3, 3, 2));
    assert_eq!(coordinator.status().devices_known, 2, "the same devices, not new ones");
    server.abort();
    for c in clients {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_download_resumes_from_the_bytes_on_disk_and_refuses_damage() {
    use fedge_edge::download::{DownloadError, fetch_model};

    let (dir, ca) = fleet();
    issue_devices(&ca, &["dev-a"]);
    let initial = initial_2nn(3);
    let coordinator = Coordinator::new(EngineConfig::default(), initial.clone()).unwrap();
    let (addr, server) = serve(&coordinator, &ca);
    let (link, _) = join(addr, &ca, "dev-a", 10).await;

    // A first attempt that got 100,000 bytes before the connection dropped.
    let cut = 100_000u64;
    let (hash, total_len, head) =
        match link.request(&Message::ModelChunkRequest { version: 0, offset: 0, max_len: cut as u32 }).await.unwrap() {
            Message::ModelChunk { hash, total_len, offset: 0, bytes, .. } => (hash, total_len, bytes),
            other => panic!("unexpected {other:?}"),
        };
    assert_eq!((hash, head.len() as u64), (initial.content_hash(), cut));
    assert!(total_len > 4 * 199_210, "the 2NN's weights are all there");
    let state = dir.path().join("device");
    std::fs::create_dir_all(&state).unwrap();
    let part = state.join(format!("model-v0-{hash}.part"));
    std::fs::write(&part, &head).unwrap();

    // The download continues where it stopped and verifies the whole model.
    let d = fetch_model(&link, 0, Some(&state)).await.unwrap();
    assert_eq!((d.resumed_from, d.fetched), (cut, total_len - cut));
    assert_eq!(d.params, initial);
    assert_eq!(std::fs::metadata(d.file.as_ref().unwrap()).unwrap().len(), total_len);
    std::fs::remove_file(d.file.unwrap()).unwrap();

    // A damaged part (one flipped byte in the weights) is refused and deleted; the next attempt
    // starts from scratch and succeeds.
    let mut bad = head.clone();
    bad[99_000] ^= 0x20;
    std::fs::write(&part, &bad).unwrap();
    assert!(matches!(fetch_model(&link, 0, Some(&state)).await, Err(DownloadError::BadModel { .. })));
    assert!(!part.exists(), "the damaged part is gone");
    let d = fetch_model(&link, 0, Some(&state)).await.unwrap();
    assert_eq!((d.resumed_from, d.fetched, d.params.content_hash()), (0, total_len, hash));

    // Without a state folder the download happens in memory; nonsense offsets are refused.
    assert_eq!(fetch_model(&link, 0, None).await.unwrap().params, initial);
    let past = Message::ModelChunkRequest { version: 0, offset: total_len + 1, max_len: 10 };
    assert!(matches!(link.request(&past).await.unwrap(), Message::Error { code: ErrorCode::Malformed, .. }));
    let unknown = Message::ModelChunkRequest { version: 9, offset: 0, max_len: 10 };
    assert!(matches!(link.request(&unknown).await.unwrap(), Message::Error { code: ErrorCode::StaleModel, .. }));
    server.abort();
}
