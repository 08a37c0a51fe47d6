//! The coordinator's network edge: a QUIC listener that admits only peers whose client
//! certificate chains to the fleet CA and is not revoked, and says who they are.
//!
//! Revocation and expiry hold for live connections too, not only at the handshake:
//! [`Listener::enforce`] (the coordinator calls it every second) re-reads the CRL when it
//! changed, gives new handshakes the new list, and closes every open connection whose
//! certificate is revoked or has expired.
//!
//! This is the only coordinator module that names quinn or rustls.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fedge_core::wire::{ErrorCode, Hello, Message, PROTOCOL_VERSION, Welcome};
use fedge_net::TlsError;
use thiserror::Error;

use crate::certs::{CertDir, CertError, Identity, Role, identity_of};

/// Why a peer was not admitted, or the listener could not start.
#[derive(Debug, Error)]
pub enum ListenerError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding the UDP socket failed.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        cause: std::io::Error,
    },
    /// The handshake failed (unknown CA, revoked or expired certificate, wrong protocol...).
    #[error("handshake from {remote} failed: {reason}")]
    Handshake {
        /// The peer's address.
        remote: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Verified certificate, but no Fedge identity in it.
    #[error("peer {remote}: {cause}")]
    Identity {
        /// The peer's address.
        remote: SocketAddr,
        /// Why.
        cause: CertError,
    },
}

/// An admitted peer: a live connection and the identity its certificate proves.
#[derive(Debug)]
pub struct Peer {
    /// Device or operator, and its id.
    pub identity: Identity,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

impl Peer {
    /// A handle that can end this peer's connection later.
    pub fn closer(&self) -> Closer {
        let connection = self.connection.clone();
        Closer::new(move |reason| connection.close(4u32.into(), reason.as_bytes()))
    }
}

/// Ends a peer's session (the fleet keeps one per device to close a superseded session).
/// It names no transport: [`Peer::closer`] closes a QUIC connection, and a test can record
/// the reason instead.
#[derive(Clone)]
pub struct Closer(Arc<dyn Fn(&str) + Send + Sync>);

impl Closer {
    /// A closer that runs `close` with the reason.
    pub fn new(close: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(close))
    }

    /// Closes the session, telling the peer `reason`.
    pub fn close(&self, reason: &str) {
        (self.0)(reason);
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Closer")
    }
}

/// A QUIC endpoint accepting mutually authenticated connections.
pub struct Listener {
    endpoint: quinn::Endpoint,
    /// Finished handshakes, from the [`handshakes`] task.
    handshaken: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Handshaken>>,
    handshaker: tokio::task::JoinHandle<()>,
    certs: CertDir,
    /// Admitted connections with their certificate's serial and end of validity.
    live: Mutex<Vec<Live>>,
    /// The CRL as last applied, and the serials it revokes.
    crl: Mutex<(Vec<u8>, BTreeSet<Vec<u8>>)>,
    /// The UDP receive buffer the kernel granted, in bytes.
    socket_buffer: usize,
}

struct Live {
    connection: quinn::Connection,
    serial: Vec<u8>,
    /// Unix seconds.
    not_after: i64,
}

/// What one [`Listener::enforce`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Enforced {
    /// Whether a changed CRL was loaded.
    pub reloaded: bool,
    /// Connections closed because their certificate is revoked.
    pub revoked: usize,
    /// Connections closed because their certificate expired.
    pub expired: usize,
}

/// The UDP receive and send buffers the listener asks the kernel for. Every device's packets
/// arrive on one socket: with the default 208 KiB, 1,000 devices uploading at once (each
/// connection keeping at least a couple of packets in flight) overflow it for seconds, QUIC's
/// loss recovery backs off, and connections time out mid-upload (docs/benchmarks.md, "Load").
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A granted receive buffer below this draws a warning: 4 MiB carried the 1,000-device load
/// benchmark's round without a lost connection, 208 KiB did not.
const SOCKET_BUFFER_ENOUGH: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER_BYTES`] asked for both buffers (the kernel
/// may grant less: no error), and the receive buffer it granted, in bytes of payload (Linux
/// reports twice what it grants, for its bookkeeping).
fn bind_socket(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, usize)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Refusals leave the defaults, which the caller reports.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let granted = state.recv_buffer_size((&socket).into())?;
    let granted = if cfg!(target_os = "linux") { granted / 2 } else { granted };
    Ok((socket, granted))
}

impl Listener {
    /// Listens on `addr` with the server certificate, CA and revocation list of `certs`.
    /// Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, certs: &CertDir) -> Result<Self, ListenerError> {
        let server = certs.server();
        let crl = std::fs::read(certs.crl_pem()).unwrap_or_default();
        let revoked = revoked_serials(&crl);
        let config = fedge_net::server_config(&certs.ca_pem(), &server.cert, &server.key, Some(&certs.crl_pem()))?;
        let (socket, socket_buffer) = bind_socket(addr).map_err(|cause| ListenerError::Bind { addr, cause })?;
        if socket_buffer < SOCKET_BUFFER_ENOUGH {
            tracing::warn!(
                "the UDP receive buffer is {} KiB, not the {} KiB asked for (net.core.rmem_max caps it): hundreds of \
                 devices uploading at once overflow it, and connections starved of their packets time out; raise \
                 net.core.rmem_max to {} or more for a large fleet",
                socket_buffer / 1024,
                SOCKET_BUFFER_BYTES / 1024,
                SOCKET_BUFFER_BYTES
            );
        }
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)
            .map_err(|cause| ListenerError::Bind { addr, cause })?;
        let (done, handshaken) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let handshaker = tokio::spawn(handshakes(endpoint.clone(), done));
        Ok(Self {
            endpoint,
            handshaken: tokio::sync::Mutex::new(handshaken),
            handshaker,
            certs: certs.clone(),
            live: Mutex::new(Vec::new()),
            crl: Mutex::new((crl, revoked)),
            socket_buffer,
        })
    }

    /// Applies revocation and expiry to what is already connected: when the CRL file changed,
    /// loads it for new handshakes; then closes each open connection whose certificate it
    /// revokes or whose validity has ended. A CRL that cannot be read or parsed keeps the last
    /// one in force (and is an error).
    pub fn enforce(&self) -> Result<Enforced, ListenerError> {
        let mut done = Enforced::default();
        let path = self.certs.crl_pem();
        let bytes = std::fs::read(&path)
            .map_err(|e| ListenerError::Tls(TlsError::Read { path: path.clone(), reason: e.to_string() }))?;
        let revoked = {
            let mut crl = self.crl.lock().unwrap_or_else(|p| p.into_inner());
            if crl.0 != bytes {
                let server = self.certs.server();
                let config = fedge_net::server_config(&self.certs.ca_pem(), &server.cert, &server.key, Some(&path))?;
                self.endpoint.set_server_config(Some(config));
                *crl = (bytes.clone(), revoked_serials(&bytes));
                done.reloaded = true;
            }
            crl.1.clone()
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|l| {
            if l.connection.close_reason().is_some() {
                return false;
            }
            if revoked.contains(&l.serial) {
                l.connection.close(2u32.into(), b"certificate revoked");
                done.revoked += 1;
                false
            } else if l.not_after <= now {
                l.connection.close(3u32.into(), b"certificate expired");
                done.expired += 1;
                false
            } else {
                true
            }
        });
        Ok(done)
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The UDP receive buffer the kernel granted the listening socket, in bytes (see
    /// [`SOCKET_BUFFER_BYTES`]).
    pub fn socket_buffer(&self) -> usize {
        self.socket_buffer
    }

    /// The next admitted peer (handshakes run concurrently, see [`handshakes`]). `None` once
    /// the endpoint is closed; `Some(Err(_))` for a refused peer (the listener keeps going).
    pub async fn accept(&self) -> Option<Result<Peer, ListenerError>> {
        let (remote, connection) = match self.handshaken.lock().await.recv().await? {
            Ok(done) => done,
            Err(e) => return Some(Err(e)),
        };
        let identity = connection
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|c| identity_of(c.as_ref())));
        match identity {
            Some(Ok(identity)) => {
                if let Some((serial, not_after)) = leaf_validity(&connection) {
                    let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
                    live.retain(|l| l.connection.close_reason().is_none());
                    // One certificate, a few connections (a device's training and inference
                    // sessions, a restart overlapping the old one): not thousands.
                    if live.iter().filter(|l| l.serial == serial).count() >= MAX_CONNECTIONS_PER_CERTIFICATE {
                        drop(live);
                        connection.close(6u32.into(), b"too many connections with this certificate");
                        return Some(Err(ListenerError::Handshake {
                            remote,
                            reason: format!(
                                "{}: more than {MAX_CONNECTIONS_PER_CERTIFICATE} connections with one certificate",
                                identity.id
                            ),
                        }));
                    }
                    live.push(Live { connection: connection.clone(), serial, not_after });
                }
                Some(Ok(Peer { identity, connection }))
            }
            Some(Err(cause)) => {
                connection.close(1u32.into(), b"no fedge identity");
                Some(Err(ListenerError::Identity { remote, cause }))
            }
            None => {
                connection.close(1u32.into(), b"no client certificate");
                Some(Err(ListenerError::Handshake { remote, reason: "no client certificate".into() }))
            }
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }

    /// Gives answers already being written `grace` to leave, then closes every connection with
    /// `reason` (what the peers are told) and waits up to a second for them to hear it.
    pub async fn shut_down(&self, reason: &str, grace: std::time::Duration) {
        tokio::time::sleep(grace).await;
        self.endpoint.close(0u32.into(), reason.as_bytes());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The handshake task holds an endpoint handle: without it the endpoint goes with us.
        self.handshaker.abort();
    }
}

/// Open connections one certificate may hold.
pub const MAX_CONNECTIONS_PER_CERTIFICATE: usize = 4;

/// Handshakes in progress at most; past half of it, new peers must first prove their address
/// (QUIC retry), and when it is full they are refused.
pub const MAX_HANDSHAKES: usize = 256;
/// The longest a handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Handshaken = Result<(SocketAddr, quinn::Connection), ListenerError>;

/// Accepts connection attempts and runs each handshake on its own task, bounded in time and in
/// number, so a peer that sends a first packet and goes quiet delays nobody else.
async fn handshakes(endpoint: quinn::Endpoint, done: tokio::sync::mpsc::Sender<Handshaken>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let free = slots.available_permits();
        if free == 0 {
            incoming.refuse();
            continue;
        }
        if free < MAX_HANDSHAKES / 2 && !incoming.remote_address_validated() && incoming.may_retry() {
            // Under load: a stateless retry costs us nothing until the peer proves its address.
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let done = done.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(connection)) => Ok((remote, connection)),
                Ok(Err(e)) => Err(ListenerError::Handshake { remote, reason: e.to_string() }),
                Err(_) => Err(ListenerError::Handshake {
                    remote,
                    reason: format!("no complete handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                }),
            };
            drop(slot);
            let _ = done.send(result).await;
        });
    }
}

/// Why the opening exchange on a connection failed.
#[derive(Debug, Error)]
pub enum HelloError {
    /// Reading or writing failed.
    #[error(transparent)]
    Frame(#[from] fedge_net::FrameError),
    /// The peer sent something other than `Hello` first.
    #[error("expected Hello, got another message")]
    Unexpected,
    /// The peer speaks another protocol version.
    #[error("device speaks protocol {0}, coordinator {PROTOCOL_VERSION}")]
    Version(u32),
    /// An operator certificate tried to act as a device.
    #[error("{0} is not a device certificate")]
    NotADevice(String),
    /// The coordinator does not take this peer now (a regional aggregator where rounds cannot
    /// take one).
    #[error("{0}")]
    Refused(String),
    /// A device certificate tried to run an operator command.
    #[error("device {0}: a device certificate cannot run operator commands")]
    NotAnOperator(String),
    /// The coordinator could not register the device now (its storage failed); it may try
    /// again later.
    #[error("{0}")]
    Unavailable(String),
}

impl HelloError {
    /// The wire code the peer was (or would have been) told.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Frame(fedge_net::FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
            Self::Frame(_) | Self::Unexpected => ErrorCode::Malformed,
            Self::Version(_) => ErrorCode::UnsupportedVersion,
            Self::NotADevice(_) | Self::NotAnOperator(_) | Self::Refused(_) => ErrorCode::Unauthorized,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// Runs the opening exchange of a device connection: reads its `Hello` on the first stream,
/// checks protocol version and role, and answers `Welcome` (or a typed `Error`).
pub async fn answer_hello(peer: &Peer, model_version: u64) -> Result<Hello, HelloError> {
    answer_hello_then(peer, (model_version, model_version), |_| None, |_| Ok(())).await.map(|(hello, ())| hello)
}

/// [`answer_hello`], refusing a Hello for which `refusal` gives a reason, and otherwise running
/// `admit` (the coordinator registers the device there) *before* the `Welcome` goes out: a
/// device that has read its `Welcome` is known to the coordinator, so a round started after
/// that counts it. `admit`'s error refuses the device as `Unavailable`. The `Welcome` names
/// `versions.0` to a training session and `versions.1` to an inference session (a regional
/// aggregator's teacher version is its root's, not its own model's).
///
/// Once `admit` has run, its value is returned even if the `Welcome` cannot be written: the
/// connection is then gone, and the caller's session loop ends at once and undoes `admit`.
pub async fn answer_hello_then<T>(
    peer: &Peer,
    versions: (u64, u64),
    refusal: impl FnOnce(&Hello) -> Option<String>,
    admit: impl FnOnce(&Hello) -> Result<T, String>,
) -> Result<(Hello, T), HelloError> {
    let (mut send, hello) = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(peer)).await {
        Ok(read) => read?,
        Err(_) => {
            peer.connection.close(5u32.into(), b"no Hello in time");
            return Err(HelloError::Frame(fedge_net::FrameError::Closed(format!(
                "no Hello within {} s",
                HELLO_TIMEOUT.as_secs()
            ))));
        }
    };
    let outcome = match hello {
        Message::Hello(h) if h.protocol_version != PROTOCOL_VERSION => Err(HelloError::Version(h.protocol_version)),
        Message::Hello(_) if peer.identity.role == Role::Operator => {
            Err(HelloError::NotADevice(peer.identity.id.clone()))
        }
        Message::Hello(h) => match refusal(&h) {
            Some(why) => Err(HelloError::Refused(why)),
            None => match admit(&h) {
                Ok(admitted) => Ok((h, admitted)),
                Err(why) => Err(HelloError::Unavailable(why)),
            },
        },
        Message::Operator(_) => Err(HelloError::NotAnOperator(peer.identity.id.clone())),
        _ => Err(HelloError::Unexpected),
    };
    let reply = match &outcome {
        Ok((h, _)) => Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: peer.identity.id.clone(),
            model_version: match h.purpose {
                fedge_core::wire::SessionPurpose::Inference => versions.1,
                _ => versions.0,
            },
        }),
        Err(e) => Message::Error { code: e.code(), message: e.to_string() },
    };
    // A reply that cannot be written changes nothing: a refused peer is refused either way,
    // and an admitted one's session loop finds the dead connection by itself.
    let _ = tokio::time::timeout(HELLO_TIMEOUT, async {
        if fedge_net::write_message(&mut send, &reply).await.is_ok() {
            let _ = send.finish();
        }
    })
    .await;
    outcome
}

/// The longest a connected device may take to say Hello (and to take its answer).
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The first stream's opening message (and the stream to answer on).
async fn read_hello(peer: &Peer) -> Result<(quinn::SendStream, Message), HelloError> {
    let (send, mut recv) =
        peer.connection.accept_bi().await.map_err(|e| fedge_net::FrameError::Closed(e.to_string()))?;
    let (hello, _) = fedge_net::read_message_limited(&mut recv, |_| fedge_net::SMALL_FRAME_BYTES).await?;
    Ok((send, hello))
}

/// The serial and end of validity (unix seconds) of a connection's client certificate.
fn leaf_validity(connection: &quinn::Connection) -> Option<(Vec<u8>, i64)> {
    let chain = connection.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certificate_validity(chain.first()?.as_ref())
}

/// The serial and end of validity (unix seconds) of a DER certificate; `None` if it does not
/// parse. (Fuzzed: `fuzz/fuzz_targets/certs.rs`.)
pub fn certificate_validity(der: &[u8]) -> Option<(Vec<u8>, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((cert.raw_serial().to_vec(), cert.validity().not_after.timestamp()))
}

/// The serials a PEM CRL revokes (none if it does not parse: rustls has already refused to
/// load such a list). (Fuzzed: `fuzz/fuzz_targets/certs.rs`.)
pub fn revoked_serials(pem: &[u8]) -> BTreeSet<Vec<u8>> {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem) else {
        return BTreeSet::new();
    };
    let Ok((_, crl)) = x509_parser::parse_x509_crl(&pem.contents) else {
        return BTreeSet::new();
    };
    crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()).collect()
}
