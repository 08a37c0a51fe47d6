//! The network edge over real QUIC on 127.0.0.1 with real certificates: who gets in, and who
//! they are.

use std::net::SocketAddr;
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::listener::{Listener, ListenerError, answer_hello};
use fedge_core::wire::{Capabilities, ErrorCode};
use fedge_edge::link::{ConnectError, DeviceTls, Link};

fn caps() -> Capabilities {
    Capabilities { backend: "flex".into(), memory_mb: 512, charging: true, unmetered: true, num_samples: 600 }
}

fn tls(ca: &CertDir, issued: &fedge_coordinator::certs::Issued) -> DeviceTls {
    DeviceTls { ca: ca.ca_pem(), cert: issued.cert.clone(), key: issued.key.clone() }
}

/// Starts a listener that answers every connection's Hello; returns its address and a channel
/// of what happened to each connection attempt.
async fn serve(
    ca: &CertDir,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>, tokio::task::JoinHandle<()>) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), ca).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(peer) = listener.accept().await {
            let tx = tx.clone();
            match peer {
                Ok(peer) => {
                    tokio::spawn(async move {
                        let r =
                            answer_hello(&peer, 3).await.map(|_| peer.identity.id.clone()).map_err(|e| e.to_string());
                        let _ = tx.send(r);
                        // Keep the connection until the device closes it (dropping it would
                        // discard the answer still in flight).
                        let _ = tokio::time::timeout(Duration::from_secs(10), peer.connection.closed()).await;
                    });
                }
                Err(e) => {
                    let what = match e {
                        ListenerError::Handshake { .. } => "handshake",
                        _ => "other",
                    };
                    let _ = tx.send(Err(format!("{what}: {e}")));
                }
            }
        }
    });
    (addr, rx, task)
}

/// Awaits `f`, failing the test if it takes more than 20 s.
async fn within<F: std::future::Future>(f: F) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(20), f).await
}

async fn attempt(addr: SocketAddr, tls: &DeviceTls) -> Result<fedge_core::wire::Welcome, ConnectError> {
    let link = Link::connect(addr, "localhost", tls).await?;
    let r = link.hello(caps()).await;
    link.close().await;
    r
}

#[tokio::test]
async fn only_valid_unrevoked_devices_get_in_and_ids_come_from_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(&dir.path().join("fleet"), &["localhost".into(), "127.0.0.1".into()]).unwrap();
    let good = ca.issue(Role::Device, "dev-1", 30).unwrap();
    let revoked = ca.issue(Role::Device, "dev-2", 30).unwrap();
    ca.revoke(Role::Device, "dev-2").unwrap();
    let operator = ca.issue(Role::Operator, "alice", 30).unwrap();
    let rogue_ca = CertDir::init(&dir.path().join("rogue"), &["localhost".into()]).unwrap();
    // The rogue device calls itself dev-1 and trusts the real CA, but its certificate is signed
    // by another CA.
    let rogue = rogue_ca.issue(Role::Device, "dev-1", 30).unwrap();

    let (addr, mut events, server) = serve(&ca).await;

    // A valid device: welcomed under the id in its certificate.
    let w = within(attempt(addr, &tls(&ca, &good))).await.unwrap().unwrap();
    assert_eq!((w.device_id.as_str(), w.model_version), ("dev-1", 3));
    assert_eq!(within(events.recv()).await.unwrap().unwrap(), Ok("dev-1".to_string()));

    // Another CA's certificate: refused in the handshake.
    let rogue_tls = DeviceTls { ca: ca.ca_pem(), ..tls(&rogue_ca, &rogue) };
    let err = within(attempt(addr, &rogue_tls)).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("refused this certificate"), "{err}");
    let e = within(events.recv()).await.unwrap().unwrap().unwrap_err();
    assert!(e.starts_with("handshake"), "{e}");

    // A revoked certificate: refused in the handshake, and the device is told so plainly.
    let err = within(attempt(addr, &tls(&ca, &revoked))).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("refused this certificate: revoked"), "{err}");
    let e = within(events.recv()).await.unwrap().unwrap().unwrap_err();
    assert!(e.starts_with("handshake") && e.to_lowercase().contains("revoked"), "{e}");

    // An operator certificate cannot act as a device.
    let err = within(attempt(addr, &tls(&ca, &operator))).await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectError::Refused { code: ErrorCode::Unauthorized, .. }), "{err}");
    let e = within(events.recv()).await.unwrap().unwrap().unwrap_err();
    assert!(e.contains("alice is not a device"), "{e}");

    // A device that does not trust the coordinator's CA will not talk to it.
    let wrong_root = DeviceTls { ca: rogue_ca.ca_pem(), ..tls(&ca, &good) };
    assert!(within(attempt(addr, &wrong_root)).await.unwrap().is_err());

    server.abort();
}
