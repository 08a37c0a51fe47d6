//! The device's network edge: connect to the coordinator over QUIC with the device's client
//! certificate, and run the opening `Hello`/`Welcome` exchange.
//!
//! The only edge-client code that touches quinn or tokio.

use std::net::SocketAddr;
use std::path::PathBuf;

use fedge_core::wire::{Capabilities, ErrorCode, Hello, Message, PROTOCOL_VERSION, SessionPurpose, Welcome};
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
    /// Connecting or talking failed.
    #[error(transparent)]
    Client(#[from] fedge_net::RequestError),
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
    client: fedge_net::RequestClient,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

impl Link {
    /// Connects to the coordinator at `addr`, whose certificate must name `server_name`.
    pub async fn connect(addr: SocketAddr, server_name: &str, tls: &DeviceTls) -> Result<Self, ConnectError> {
        let config = fedge_net::client_config(&tls.ca, &tls.cert, &tls.key)?;
        let client = fedge_net::RequestClient::connect(addr, server_name, config).await?;
        let connection = client.connection.clone();
        Ok(Self { client, connection })
    }

    /// Sends `msg` on a new stream and reads the answer.
    pub async fn request(&self, msg: &Message) -> Result<Message, ConnectError> {
        Ok(self.client.request(msg).await?)
    }

    /// Sends `Hello` with `capabilities` and waits for `Welcome`: a training session.
    pub async fn hello(&self, capabilities: Capabilities) -> Result<Welcome, ConnectError> {
        self.hello_for(capabilities, SessionPurpose::Train).await
    }

    /// Sends `Hello` for a session of `purpose` and waits for `Welcome`.
    pub async fn hello_for(
        &self,
        capabilities: Capabilities,
        purpose: SessionPurpose,
    ) -> Result<Welcome, ConnectError> {
        let hello = Hello { protocol_version: PROTOCOL_VERSION, capabilities, purpose };
        match self.request(&Message::Hello(hello)).await? {
            Message::Welcome(w) => Ok(w),
            Message::Error { code, message } => Err(ConnectError::Refused { code, message }),
            _ => Err(ConnectError::Unexpected),
        }
    }

    /// Closes the connection and waits until the coordinator has been told.
    pub async fn close(self) {
        self.client.close().await;
    }
}
