//! The certificate folder's unit tests: issue, revoke, sign, keys and validity.

use super::*;

fn der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).map(|(_, p)| p.contents).unwrap_or_else(|_| b64.into_bytes())
}

#[test]
fn init_issue_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
    assert!(matches!(CertDir::init(dir.path(), &[]), Err(CertError::Exists(_))));
    let dev = ca.issue(Role::Device, "dev-7", 30).unwrap();
    let op = ca.issue(Role::Operator, "alice", 30).unwrap();
    assert_eq!(identity_of(&der(&dev.cert)).unwrap(), Identity { role: Role::Device, id: "dev-7".into() });
    assert_eq!(identity_of(&der(&op.cert)).unwrap(), Identity { role: Role::Operator, id: "alice".into() });
    assert!(matches!(ca.issue(Role::Device, "dev-7", 30), Err(CertError::AlreadyIssued(_))));
    assert!(matches!(ca.issue(Role::Device, "../etc", 30), Err(CertError::BadName(_))));
    assert!(matches!(ca.revoke(Role::Device, "nobody"), Err(CertError::Unknown(_))));
    let before = std::fs::read(ca.crl_pem()).unwrap();
    ca.revoke(Role::Device, "dev-7").unwrap();
    assert_ne!(std::fs::read(ca.crl_pem()).unwrap(), before);
    assert!(identity_of(&der(&ca.server().cert)).is_err(), "the server certificate is no client identity");
}

#[test]
fn validity_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &[]).unwrap();
    for days in [0, -1, MAX_DAYS + 1, i64::MAX] {
        let err = ca.issue(Role::Device, "d", days).unwrap_err();
        assert!(matches!(err, CertError::BadDays(d) if d == days), "{err}");
        assert!(err.to_string().contains("1 to 36500 days"), "{err}");
    }
    assert!(!dir.path().join("devices/d.pem").exists(), "nothing issued");
    ca.issue(Role::Device, "d", 1).unwrap();
}

#[cfg(unix)]
#[test]
fn keys_are_private_and_nothing_half_written_is_left() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &[]).unwrap();
    let dev = ca.issue(Role::Device, "d", 30).unwrap();
    // A stale temporary key file left world-readable by an earlier crash is narrowed too.
    let stale = dir.path().join("operators/.o.key.tmp");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "old").unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
    let op = ca.issue(Role::Operator, "o", 30).unwrap();
    ca.revoke(Role::Device, "d").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for key in ["ca.key", "server.key", "model-signing.key"] {
        assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
    }
    assert_eq!(mode(&dev.key), 0o600);
    assert_eq!(mode(&op.key), 0o600);
    assert_eq!(mode(&ca.crl_pem()), 0o644);
    let leftovers: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn model_records_are_signed_and_devices_verify_them() {
    use fedge_core::params::ContentHash;
    use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole};
    use fedge_net::{ModelKey, SignatureError};

    let tmp = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&tmp.path().join("a"), &[]).unwrap();
    let other = CertDir::init(&tmp.path().join("b"), &[]).unwrap();
    let mut r = ModelRecord {
        parent: Some(2),
        round: 2,
        accuracy: Some(0.9),
        created_at: 1,
        ..ModelRecord::of_blob(3, ModelRole::Student, "mlp", BlobFormat::Int8, 10, b"blob")
    };
    let key = ModelKey::read(&ca.model_public_key_path()).unwrap();
    assert_eq!(key.verify(&r), Err(SignatureError::Unsigned(3)));
    let signer = ca.model_signer().unwrap();
    assert_eq!(ModelKey::from_raw(&signer.public_key()).unwrap(), key);
    signer.sign(&mut r).unwrap();
    key.verify(&r).unwrap();
    // Another fleet's key, or any change to a signed field, fails.
    assert_eq!(ModelKey::read(&other.model_public_key_path()).unwrap().verify(&r), Err(SignatureError::Bad(3)));
    let tampered = ModelRecord { sha256: ContentHash::of_bytes(b"evil"), ..r.clone() };
    assert_eq!(key.verify(&tampered), Err(SignatureError::Bad(3)));
    // Accuracy is filled in later and not signed.
    key.verify(&ModelRecord { accuracy: Some(0.1), ..r }).unwrap();
}
