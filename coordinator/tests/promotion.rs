//! Promotions (issue 14, #7: rollback attacks): each `promote` and `rollback` is a new
//! instruction with a higher number than any before it, signed by the model-signing key; a
//! coordinator restored from an old backup still numbers past everything devices followed; a
//! global (teacher) version is not deployable. (The device side, refusing a replayed or stale
//! promotion, is tested in `edge-client/src/deploy.rs`.)

use std::sync::Arc;

use fedge_coordinator::certs::CertDir;
use fedge_coordinator::server::{Coordinator, NewStudent, RegistryError};
use fedge_coordinator::store::Store;
use fedge_core::registry::Promotion;
use fedge_core::{ModelParams, ParamLayout, TensorSpec};
use fedge_engine::EngineConfig;
use fedge_net::ModelKey;

fn initial() -> ModelParams {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![4, 3] }]).unwrap());
    ModelParams::new(layout, (0..12).map(|i| i as f32 / 10.0).collect()).unwrap()
}

fn student(seed: u8) -> NewStudent {
    NewStudent {
        parent: 0,
        round: 0,
        architecture: "mlp".into(),
        parameters: 12,
        accuracy: Some(0.5),
        latency_us: None,
        blob: vec![seed; 64],
    }
}

/// The coordinator's latest promotion, checked: it names `version` and verifies with `key`.
fn promotion(c: &Coordinator, version: u64, key: &ModelKey) -> Promotion {
    let p = c.promotion().expect("a promotion");
    assert_eq!(p.version, version);
    key.verify_promotion(&p).unwrap();
    p
}

#[tokio::test]
async fn promotions_are_numbered_past_a_restored_backup_and_global_models_are_not_deployable() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into()]).unwrap();
    let key = ModelKey::read(&ca.model_public_key_path()).unwrap();
    let (state, backup) = (dir.path().join("state"), dir.path().join("backup"));
    let start = |folder: &std::path::Path| {
        let c = Coordinator::with_store(EngineConfig::default(), initial(), Store::open(folder).unwrap()).unwrap();
        c.set_signer(ca.model_signer().unwrap(), "2nn");
        c
    };

    let first = start(&state);
    match first.promote(0) {
        Err(e @ RegistryError::NotDeployable(0)) => assert!(e.to_string().contains("not a distilled student"), "{e}"),
        other => panic!("promoting the global v0: {other:?}"),
    }
    assert_eq!(first.promotion(), None);
    let s1 = first.register_student(student(1), true).await.unwrap().version;
    let p1 = promotion(&first, s1, &key);
    drop(first);
    copy_dir(&state, &backup);

    let second = start(&state);
    assert_eq!(second.promotion().as_ref(), Some(&p1), "kept across a restart");
    let s2 = second.register_student(student(2), true).await.unwrap().version;
    let p2 = promotion(&second, s2, &key);
    assert!(p2.sequence > p1.sequence);
    // A rollback is a new promotion, numbered higher still.
    assert_eq!(second.rollback().unwrap(), s1);
    let p3 = promotion(&second, s1, &key);
    assert!(p3.sequence > p2.sequence);
    drop(second);

    // Restored from the backup taken after p1: it knows nothing of p2 and p3, yet its next
    // promotion is numbered past them, so devices that followed them follow it too.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let restored = start(&backup);
    assert_eq!(restored.promotion().as_ref(), Some(&p1));
    restored.promote(s1).unwrap();
    let p4 = promotion(&restored, s1, &key);
    assert!(p4.sequence > p3.sequence, "{} vs {}", p4.sequence, p3.sequence);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
