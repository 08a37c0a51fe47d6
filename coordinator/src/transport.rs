//! The coordinator's network edge: a QUIC listener that admits only peers whose client
//! certificate chains to the fleet CA and is not revoked, and says who they are.
//!
//! This and `main.rs` are the only coordinator code that touches quinn or tokio.

use std::net::SocketAddr;

use fedge_core::wire::{ErrorCode, Hello, Message, PROTOCOL_VERSION, Welcome};
use fedge_net::TlsError;
use thiserror::Error;

use crate::certs::{CertDir, CertError, Identity, Role, identity_of};

/// Why a peer was not admitted, or the listener could not start.
#[derive(Debug, Error)]
pub enum TransportError {
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

/// A QUIC endpoint accepting mutually authenticated connections.
pub struct Listener {
    endpoint: quinn::Endpoint,
}

impl Listener {
    /// Listens on `addr` with the server certificate, CA and revocation list of `certs`.
    /// Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, certs: &CertDir) -> Result<Self, TransportError> {
        let server = certs.server();
        let config = fedge_net::server_config(&certs.ca_pem(), &server.cert, &server.key, Some(&certs.crl_pem()))?;
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|cause| TransportError::Bind { addr, cause })?;
        Ok(Self { endpoint })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Waits for the next connection attempt and completes its handshake. `None` once the
    /// endpoint is closed; `Some(Err(_))` for a refused peer (the listener keeps going).
    pub async fn accept(&self) -> Option<Result<Peer, TransportError>> {
        let incoming = self.endpoint.accept().await?;
        let remote = incoming.remote_address();
        let connection = match incoming.await {
            Ok(c) => c,
            Err(e) => return Some(Err(TransportError::Handshake { remote, reason: e.to_string() })),
        };
        let identity = connection
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|c| identity_of(c.as_ref())));
        match identity {
            Some(Ok(identity)) => Some(Ok(Peer { identity, connection })),
            Some(Err(cause)) => {
                connection.close(1u32.into(), b"no fedge identity");
                Some(Err(TransportError::Identity { remote, cause }))
            }
            None => {
                connection.close(1u32.into(), b"no client certificate");
                Some(Err(TransportError::Handshake { remote, reason: "no client certificate".into() }))
            }
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
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
    /// A device certificate tried to run an operator command.
    #[error("device {0}: a device certificate cannot run operator commands")]
    NotAnOperator(String),
}

impl HelloError {
    /// The wire code the peer was (or would have been) told.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Frame(fedge_net::FrameError::TooLarge(_)) => ErrorCode::TooLarge,
            Self::Frame(_) | Self::Unexpected => ErrorCode::Malformed,
            Self::Version(_) => ErrorCode::UnsupportedVersion,
            Self::NotADevice(_) | Self::NotAnOperator(_) => ErrorCode::Unauthorized,
        }
    }
}

/// Runs the opening exchange of a device connection: reads its `Hello` on the first stream,
/// checks protocol version and role, and answers `Welcome` (or a typed `Error`).
pub async fn answer_hello(peer: &Peer, model_version: u64) -> Result<Hello, HelloError> {
    let (mut send, mut recv) =
        peer.connection.accept_bi().await.map_err(|e| fedge_net::FrameError::Closed(e.to_string()))?;
    let refuse = |code, message: String| Message::Error { code, message };
    let outcome = match fedge_net::read_message(&mut recv).await? {
        Message::Hello(h) if h.protocol_version != PROTOCOL_VERSION => {
            Err((HelloError::Version(h.protocol_version), ErrorCode::UnsupportedVersion))
        }
        Message::Hello(_) if peer.identity.role != Role::Device => {
            Err((HelloError::NotADevice(peer.identity.id.clone()), ErrorCode::Unauthorized))
        }
        Message::Hello(h) => Ok(h),
        Message::Operator(_) => Err((HelloError::NotAnOperator(peer.identity.id.clone()), ErrorCode::Unauthorized)),
        _ => Err((HelloError::Unexpected, ErrorCode::Malformed)),
    };
    let reply = match &outcome {
        Ok(_) => Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: peer.identity.id.clone(),
            model_version,
        }),
        Err((e, code)) => refuse(*code, e.to_string()),
    };
    fedge_net::write_message(&mut send, &reply).await?;
    let _ = send.finish();
    outcome.map_err(|(e, _)| e)
}
