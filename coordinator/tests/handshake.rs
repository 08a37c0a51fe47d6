//! A peer that starts a handshake and goes quiet must not hold up anyone else: handshakes run
//! concurrently, each bounded in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::listener::Listener;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A client certificate "resolver" that never answers: the client stops mid-handshake, after
/// its first flight, holding the server's handshake open.
#[derive(Debug)]
struct Stall;

impl rustls::client::ResolvesClientCert for Stall {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        std::thread::sleep(Duration::from_secs(60));
        None
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Starts, on a thread and runtime of its own (which `Stall` then blocks), a connection
/// attempt that never completes.
fn start_stalled_peer(addr: std::net::SocketAddr, ca: &std::path::Path) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Stall));
    tls.alpn_protocols = vec![fedge_net::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quic));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(config);
            let _ = endpoint.connect(addr, "localhost").unwrap().await;
        });
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_half_open_peer_does_not_hold_up_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let devices: Vec<_> = (0..50).map(|i| ca.issue(Role::Device, &format!("dev-{i}"), 1).unwrap()).collect();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
    let addr = listener.local_addr().unwrap();
    let admitted = Arc::new(AtomicUsize::new(0));
    let counter = admitted.clone();
    let server = tokio::spawn(async move {
        let mut peers = Vec::new();
        while let Some(peer) = listener.accept().await {
            if let Ok(peer) = peer {
                counter.fetch_add(1, Ordering::SeqCst);
                peers.push(peer);
            }
        }
    });

    start_stalled_peer(addr, &ca.ca_pem());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut clients = Vec::new();
    for d in &devices {
        let config = fedge_net::client_config(&ca.ca_pem(), &d.cert, &d.key).unwrap();
        clients.push(tokio::spawn(fedge_net::RequestClient::connect(addr, "localhost", config)));
    }
    // Before, the accept loop awaited the silent peer's handshake until the idle timeout (10 s)
    // and nobody got in; now all 50 do while it is still pending.
    let all_in = tokio::time::timeout(Duration::from_secs(6), async {
        while admitted.load(Ordering::SeqCst) < devices.len() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(all_in.is_ok(), "only {} of {} admitted", admitted.load(Ordering::SeqCst), devices.len());
    for c in clients {
        c.await.unwrap().unwrap();
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_a_few_connections_not_many() {
    use fedge_coordinator::listener::MAX_CONNECTIONS_PER_CERTIFICATE as MAX;
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let dev = ca.issue(Role::Device, "dev-0", 1).unwrap();
    let other = ca.issue(Role::Device, "dev-1", 1).unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let mut peers = Vec::new();
        while let Some(peer) = listener.accept().await {
            let _ = tx.send(peer.as_ref().map(|p| p.identity.id.clone()).map_err(|e| e.to_string()));
            if let Ok(p) = peer {
                peers.push(p);
            }
        }
    });
    let connect = |d: &fedge_coordinator::certs::Issued| {
        let config = fedge_net::client_config(&ca.ca_pem(), &d.cert, &d.key).unwrap();
        fedge_net::RequestClient::connect(addr, "localhost", config)
    };
    let mut held = Vec::new();
    for _ in 0..MAX {
        held.push(connect(&dev).await.unwrap());
        assert_eq!(rx.recv().await.unwrap(), Ok("dev-0".to_string()));
    }
    let extra = connect(&dev).await.unwrap();
    let refused = rx.recv().await.unwrap().unwrap_err();
    assert!(refused.contains("connections with one certificate"), "{refused}");
    let reason = tokio::time::timeout(Duration::from_secs(5), extra.connection.closed()).await.unwrap();
    assert!(reason.to_string().contains("too many connections"), "{reason}");
    // Another certificate is not affected, and a closed connection frees its place.
    let _other = connect(&other).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Ok("dev-1".to_string()));
    held.pop().unwrap().connection.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _again = connect(&dev).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Ok("dev-0".to_string()));
    server.abort();
}

#[tokio::test]
async fn the_listening_socket_asks_for_a_large_receive_buffer() {
    // Every device's packets arrive on this one socket; the kernel's default (208 KiB) lost
    // connections at 1,000 devices (docs/benchmarks.md, "Load"). The kernel grants up to
    // net.core.rmem_max: whatever it allows up to the size asked for must be taken.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<usize>().ok());
    let (Some(max), Some(default)) = (read("/proc/sys/net/core/rmem_max"), read("/proc/sys/net/core/rmem_default"))
    else {
        eprintln!("no /proc/sys/net/core: nothing to compare with");
        return;
    };
    let want = max.min(fedge_coordinator::listener::SOCKET_BUFFER_BYTES);
    assert!(
        listener.socket_buffer() >= want,
        "granted {} bytes where rmem_max allows {want} (the default is {default})",
        listener.socket_buffer()
    );
}
