//! The client side of a connection: connect with a client certificate, then one request and
//! one answer per bidirectional stream.

use std::net::SocketAddr;

use fedge_core::wire::Message;
use thiserror::Error;

use crate::frame::{FrameError, read_message, write_message};

/// Why connecting or a request failed.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Local socket trouble.
    #[error("cannot open a local endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The connection or handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Remote address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A request failed on the wire.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// An open, mutually authenticated connection.
pub struct RequestClient {
    endpoint: quinn::Endpoint,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

impl RequestClient {
    /// Connects to `addr`, whose certificate must name `server_name`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<Self, RequestError> {
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid address");
        let mut endpoint = quinn::Endpoint::client(bind).map_err(RequestError::Endpoint)?;
        endpoint.set_default_client_config(config);
        let connecting =
            endpoint.connect(addr, server_name).map_err(|e| RequestError::Connect { addr, reason: e.to_string() })?;
        let connection =
            connecting.await.map_err(|e| RequestError::Connect { addr, reason: crate::frame::explain(&e) })?;
        Ok(Self { endpoint, connection })
    }

    /// Sends `msg` on a new stream and reads the answer (also when the peer stopped reading
    /// the request early, for example refusing it as too large).
    pub async fn request(&self, msg: &Message) -> Result<Message, RequestError> {
        let (mut send, mut recv) =
            self.connection.open_bi().await.map_err(|e| FrameError::Closed(crate::frame::explain(&e)))?;
        // A peer that refuses a request (too large) stops our sending and still answers why:
        // read its answer before reporting a failed write.
        let written = write_message(&mut send, msg).await;
        let _ = send.finish();
        match (read_message(&mut recv).await, written) {
            (Ok(answer), _) => Ok(answer),
            (Err(_), Err(e)) | (Err(e), Ok(())) => Err(e.into()),
        }
    }

    /// Closes the connection and waits until the peer has been told.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
