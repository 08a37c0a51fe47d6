//! The device's network edge: connect to the coordinator over QUIC with the device's client
//! certificate, and run the opening `Hello`/`Welcome` exchange.
//!
//! The only edge-client code that touches quinn or tokio.

use std::net::SocketAddr;
use std::path::PathBuf;

use fedge_core::wire::{Capabilities, ErrorCode, Hello, Message, PROTOCOL_VERSION, Welcome};
use thiserror::Error;

/// The device's TLS material.
#[derive(Debug, Clone)]
pub struct DeviceTls {
    /// The fleet CA certificate (PEM): the only root trusted.
    pub ca: PathBuf,
    /// The device certificate (PEM).
    pub cert: PathBuf,
    /// The device key (PEM).
    pub key: PathBuf,
}

/// Why connecting failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] fedge_net::TlsError),
    /// Local socket trouble.
    #[error("cannot open a local endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The connection or handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Coordinator address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Talking failed.
    #[error(transparent)]
    Frame(#[from] fedge_net::FrameError),
    /// The coordinator refused.
    #[error("coordinator refused ({code:?}): {message}")]
    Refused {
        /// Typed reason.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The coordinator answered something unexpected.
    #[error("unexpected answer to Hello")]
    Unexpected,
}

/// An open connection to the coordinator.
pub struct Link {
    endpoint: quinn::Endpoint,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

impl Link {
    /// Connects to the coordinator at `addr`, whose certificate must name `server_name`.
    pub async fn connect(addr: SocketAddr, server_name: &str, tls: &DeviceTls) -> Result<Self, ConnectError> {
        let config = fedge_net::client_config(&tls.ca, &tls.cert, &tls.key)?;
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid");
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Endpoint)?;
        endpoint.set_default_client_config(config);
        let connecting =
            endpoint.connect(addr, server_name).map_err(|e| ConnectError::Connect { addr, reason: e.to_string() })?;
        let connection = connecting.await.map_err(|e| ConnectError::Connect { addr, reason: e.to_string() })?;
        Ok(Self { endpoint, connection })
    }

    /// Sends `Hello` with `capabilities` and waits for `Welcome`.
    pub async fn hello(&self, capabilities: Capabilities) -> Result<Welcome, ConnectError> {
        let (mut send, mut recv) =
            self.connection.open_bi().await.map_err(|e| fedge_net::FrameError::Closed(e.to_string()))?;
        fedge_net::write_message(
            &mut send,
            &Message::Hello(Hello { protocol_version: PROTOCOL_VERSION, capabilities }),
        )
        .await?;
        let _ = send.finish();
        match fedge_net::read_message(&mut recv).await? {
            Message::Welcome(w) => Ok(w),
            Message::Error { code, message } => Err(ConnectError::Refused { code, message }),
            _ => Err(ConnectError::Unexpected),
        }
    }

    /// Closes the connection and waits until the coordinator has been told.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
