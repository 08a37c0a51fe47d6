//! The store's unit tests: reopening, damage, a round's life.

use super::*;
use fedge_core::{ParamLayout, TensorSpec};
use std::sync::Arc;

fn params(x: f32) -> ModelParams {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![3] }]).unwrap());
    ModelParams::new(layout, vec![x, x + 1.0, x + 2.0]).unwrap()
}

#[test]
fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        assert!(s.latest().unwrap().is_none());
        assert_eq!(s.device_id("a").unwrap(), 0);
        assert_eq!(s.device_id("b").unwrap(), 1);
        s.save_model(0, 0, &params(0.0)).unwrap();
        s.save_model(1, 1, &params(1.0)).unwrap();
        s.save_model(2, 3, &params(2.0)).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let r = s.latest().unwrap().unwrap();
    assert_eq!((r.version, r.last_round), (2, 3));
    assert_eq!(r.params, params(2.0));
    assert_eq!(s.models().unwrap().len(), 3);
    assert_eq!(s.device_id("b").unwrap(), 1);
    assert_eq!(s.device_id("c").unwrap(), 2);
}

#[test]
fn a_damaged_blob_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.save_model(1, 1, &params(5.0)).unwrap();
    let blob = s.blob_path(&params(5.0).content_hash());
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();
    assert!(matches!(s.latest(), Err(StoreError::Corrupt(_))));
}

fn line(round: u64, model_version: u64) -> RoundLine {
    RoundLine {
        round,
        model_version,
        selected: 3,
        results: 2,
        failures: 1,
        stragglers: 0,
        surplus: 0,
        samples: 14,
        train_loss: 0.5,
        accuracy: None,
        failed_reason: None,
        privacy: Some(fedge_core::privacy::LedgerEntry {
            round,
            sampling_rate: 0.5,
            noise_multiplier: 1.0,
            clip_norm: 2.0,
            epsilon: 0.1 * round as f64,
        }),
        duration_ms: None,
    }
}

fn update(round: u64, x: f32) -> TrainResult {
    TrainResult { round, model_version: 1, num_samples: 7, train_loss: 0.25, delta: params(x), clipped: false }
}

#[test]
fn an_open_round_and_its_updates_survive_reopening_until_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let record = RoundRecord { round: 2, model_version: 1, chosen: vec![3, 5, 8], target: 3, population: 4 };
    {
        let s = Store::open(dir.path()).unwrap();
        s.save_model(1, 1, &params(1.0)).unwrap();
        s.set_rounds_left(4).unwrap();
        s.save_settings(&Settings { fraction: 0.5, min_train_clients: 2, round_timeout_ms: 9000 }).unwrap();
        s.begin_round(&record, 3).unwrap();
        s.save_update(2, 5, &update(2, 0.5)).unwrap();
        s.save_update(2, 3, &update(2, 0.25)).unwrap();
        s.save_evaluation(1, Evaluation { accuracy: 0.75, loss: 0.5 }).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let r = s.latest().unwrap().unwrap();
    assert_eq!((r.version, r.last_round, r.rounds_left), (1, 1, 3));
    assert_eq!(r.settings.unwrap().round_timeout_ms, 9000);
    assert_eq!(r.evaluations, vec![(1, Evaluation { accuracy: 0.75, loss: 0.5 })]);
    let open = r.open.unwrap();
    assert_eq!(open.record, record);
    assert_eq!(open.accepted, vec![(3, update(2, 0.25)), (5, update(2, 0.5))]);

    // Closing records the new version and forgets the round and its updates, atomically.
    s.close_round(&line(2, 2), Some((2, &params(2.0))), 3).unwrap();
    let r = s.latest().unwrap().unwrap();
    assert_eq!((r.version, r.last_round, r.rounds_left), (2, 2, 3));
    assert_eq!(r.params, params(2.0));
    assert!(r.open.is_none());
    // A failed round advances the round count, not the version.
    s.begin_round(&RoundRecord { round: 3, ..record }, 2).unwrap();
    s.save_update(3, 8, &update(3, 0.0)).unwrap();
    s.close_round(&line(3, 2), None, 2).unwrap();
    let r = s.latest().unwrap().unwrap();
    assert_eq!((r.version, r.last_round, r.rounds_left), (2, 3, 2));
    assert_eq!(r.rounds, vec![line(2, 2), line(3, 2)]);
    assert!(r.open.is_none());
}

#[test]
fn an_update_is_kept_as_the_bytes_given() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let bytes = codec::encode(&Message::TrainResult(update(2, 0.5)));
    s.save_update_bytes(2, 5, &bytes).unwrap();
    assert_eq!(s.update_bytes(2, 5).unwrap(), Some(bytes));
    assert_eq!(s.update_bytes(2, 6).unwrap(), None);
}

#[test]
fn blobs_without_their_database_are_not_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.save_model(0, 0, &params(0.0)).unwrap();
        s.save_model(1, 1, &params(1.0)).unwrap();
    }
    let db = dir.path().join("state.redb");
    // Truncated to nothing, then gone: both refused, naming the way out; nothing is created.
    std::fs::write(&db, b"").unwrap();
    for _ in 0..2 {
        let err = Store::open(dir.path()).map(|_| ()).unwrap_err();
        assert!(matches!(err, StoreError::LostDatabase { blobs: 2, .. }), "{err}");
        assert!(err.to_string().contains("move the folder away"), "{err}");
        std::fs::remove_file(&db).ok();
        assert!(!db.exists());
    }
    // An empty folder is a fresh start.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("state.redb"), b"").unwrap();
    assert!(Store::open(fresh.path()).unwrap().latest().unwrap().is_none());
}

#[test]
fn a_regions_root_task_is_stored_with_its_adopted_model_until_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let task = UpstreamTask {
        root_round: 7,
        root_version: 12,
        root_hash: params(4.0).content_hash(),
        base: 3,
        train: fedge_core::wire::TrainConfig {
            epochs: 2,
            batch_size: 16,
            learning_rate: 0.1,
            clip_norm: Some(1.0),
            local_dp: None,
            proximal_mu: None,
        },
    };
    {
        let s = Store::open(dir.path()).unwrap();
        s.save_model(0, 0, &params(0.0)).unwrap();
        assert_eq!(s.upstream().unwrap(), None);
        s.adopt_upstream(&EncodedModel::new(3, &params(4.0)), 2, &task, 1).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.upstream().unwrap(), Some(task));
    let r = s.latest().unwrap().unwrap();
    assert_eq!((r.version, r.last_round, r.rounds_left, r.params), (3, 2, 1, params(4.0)));
    assert_eq!(s.model(3).unwrap(), Some(params(4.0)));
    assert_eq!(s.model(0).unwrap(), Some(params(0.0)));
    assert_eq!(s.model(9).unwrap(), None);
    s.forget_upstream().unwrap();
    assert_eq!(s.upstream().unwrap(), None);
}

#[test]
fn closing_a_round_keeps_the_record_of_the_next_one_opened_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.save_model(0, 0, &params(0.0)).unwrap();
    let next = RoundRecord { round: 2, model_version: 1, chosen: Vec::new(), target: 2, population: 0 };
    s.begin_round(&next, 0).unwrap();
    s.save_update(2, 7, &update(2, 0.5)).unwrap();
    s.close_round(&line(1, 1), Some((1, &params(1.0))), 0).unwrap();
    let open = s.latest().unwrap().unwrap().open.expect("round 2's record survives round 1's close");
    assert_eq!((open.record, open.accepted.len()), (next, 1));
    s.close_round(&line(2, 2), Some((2, &params(2.0))), 0).unwrap();
    assert!(s.latest().unwrap().unwrap().open.is_none());
}
