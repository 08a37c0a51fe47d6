//! Fedge's transport: the one crate that knows QUIC and TLS.
//!
//! [`tls`] builds quinn endpoint configurations from PEM files: TLS 1.3 only, ALPN
//! [`ALPN`], the server requiring a client certificate chained to the fleet CA and not on its
//! revocation list, the client pinning the same CA. [`frame`] moves [`fedge_core::wire::Message`]s
//! over QUIC streams as length-prefixed frames, checking the length against
//! [`fedge_core::codec::MAX_MESSAGE_BYTES`] before allocating.
//!
//! Architecture invariant: everything above this crate (the round engine, strategies, the
//! trainer) sees messages, never sockets.

pub mod frame;
pub mod request;
pub mod signing;
pub mod tls;

/// The application protocol negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"fedge/1";

pub use frame::{
    FrameError, SMALL_FRAME_BYTES, read_message, read_message_bytes, read_message_limited, read_message_sized,
    write_encoded, write_message, write_parts,
};
pub use request::{RequestClient, RequestError};
pub use signing::{BlobError, ModelKey, SignatureError, open_blob};
pub use tls::{TlsError, client_config, server_config};
