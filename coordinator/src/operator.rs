//! The operator's client: connects to a coordinator with an operator certificate and sends
//! [`OperatorCommand`]s, one request and one answer per stream (what `fedge-coordinator round`,
//! `devices` and `models` run; [`crate::print`] shows the answers).

use std::net::SocketAddr;
use std::path::PathBuf;

use fedge_core::wire::{ErrorCode, Message, OperatorCommand, Status};

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The operator's certificate, key or the fleet CA cannot be loaded.
    #[error(transparent)]
    Tls(#[from] fedge_net::TlsError),
    /// Connecting or the request failed.
    #[error(transparent)]
    Client(#[from] fedge_net::RequestError),
    /// The coordinator answered with an error.
    #[error("coordinator refused ({code:?}): {message}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The coordinator answered with a message that does not answer the command.
    #[error("unexpected answer: {0:?}")]
    Unexpected(Box<Message>),
}

/// Which coordinator to reach, and as whom.
#[derive(Debug, Clone)]
pub struct OperatorTarget {
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Name in the coordinator's certificate.
    pub server_name: String,
    /// Certificate folder holding `ca.pem` and `operators/NAME.{pem,key}`.
    pub certs_dir: PathBuf,
    /// Operator name (certificate `operators/NAME.pem`).
    pub operator: String,
}

/// An open operator connection.
pub struct Operator {
    client: fedge_net::RequestClient,
}

impl Operator {
    /// Connects to `target` with the operator's certificate.
    pub async fn connect(target: &OperatorTarget) -> Result<Self, OperatorError> {
        let dir = &target.certs_dir;
        let config = fedge_net::client_config(
            &dir.join("ca.pem"),
            &dir.join("operators").join(format!("{}.pem", target.operator)),
            &dir.join("operators").join(format!("{}.key", target.operator)),
        )?;
        let client = fedge_net::RequestClient::connect(target.coordinator, &target.server_name, config).await?;
        Ok(Self { client })
    }

    /// Sends `command`; the coordinator's answer, or its refusal as [`OperatorError::Refused`].
    pub async fn request(&self, command: OperatorCommand) -> Result<Message, OperatorError> {
        match self.client.request(&Message::Operator(command)).await? {
            Message::Error { code, message } => Err(OperatorError::Refused { code, message }),
            other => Ok(other),
        }
    }

    /// Sends `command`, which the coordinator answers with its [`Status`].
    pub async fn status(&self, command: OperatorCommand) -> Result<Status, OperatorError> {
        match self.request(command).await? {
            Message::Status(s) => Ok(s),
            other => Err(OperatorError::Unexpected(Box::new(other))),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.client.close().await;
    }
}
