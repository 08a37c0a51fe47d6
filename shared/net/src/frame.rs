//! Length-prefixed wire messages over QUIC streams.
//!
//! A frame is a `u32` little-endian byte count followed by that many bytes of
//! [`fedge_core::codec`] encoding. The count is checked against a limit before anything is
//! allocated, so a peer cannot make us reserve memory by lying about a length: the global
//! [`MAX_MESSAGE_BYTES`], or with [`read_message_limited`] a limit for the kind of message the
//! frame's first byte announces (a reader expecting a small request refuses a megabyte at
//! once). Even under the limit the body is read in pieces and the buffer grows with the bytes
//! that actually arrive, never to the announced length up front.

use fedge_core::codec::{self, DecodeError, FrameKind, MAX_MESSAGE_BYTES};
use fedge_core::wire::Message;
use thiserror::Error;

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream ended or the connection dropped.
    #[error("stream closed: {0}")]
    Closed(String),
    /// The announced length exceeds the limit for its kind of message.
    #[error("a {kind:?} frame of {len} bytes exceeds the {limit}-byte limit for it")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit it broke.
        limit: usize,
        /// The kind of message the frame announced.
        kind: FrameKind,
    },
    /// The bytes are not a message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Why a stream or connection ended, in words a person can act on. quinn's "connection lost"
/// keeps its cause in the error's source: a certificate the other side refused is named from
/// the TLS alert QUIC carries ("the peer refused this certificate: revoked"), a close by the
/// peer with its reason, anything else as the error and its causes.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(e);
    while let Some(err) = cause {
        match err.downcast_ref::<quinn::ConnectionError>() {
            Some(quinn::ConnectionError::ConnectionClosed(close)) => {
                let code = u64::from(close.error_code);
                let alert = code.checked_sub(0x100).filter(|a| *a < 0x100).and_then(|a| certificate_alert(a as u8));
                if let Some(why) = alert {
                    let detail = String::from_utf8_lossy(&close.reason);
                    return if detail.is_empty() {
                        format!("the peer refused this certificate: {why}")
                    } else {
                        format!("the peer refused this certificate: {why} ({detail})")
                    };
                }
            }
            Some(quinn::ConnectionError::ApplicationClosed(close)) if !close.reason.is_empty() => {
                return format!("closed by the peer: {}", String::from_utf8_lossy(&close.reason));
            }
            _ => {}
        }
        cause = err.source();
    }
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(err) = cause {
        let more = err.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = err.source();
    }
    text
}

/// The certificate problem a TLS alert names (RFC 8446 section 6), if it names one.
fn certificate_alert(alert: u8) -> Option<&'static str> {
    Some(match alert {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "revoked",
        45 => "expired",
        46 => "not valid (unknown or not yet valid)",
        48 => "signed by an unknown CA",
        49 => "access denied",
        51 => "its signature does not verify (issued by another CA?)",
        116 => "a client certificate is required",
        _ => return None,
    })
}

/// Writes one message as a frame.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), FrameError> {
    write_encoded(send, &codec::encode(msg)).await
}

/// Writes bytes that already hold one encoded message (for example a model encoded once and
/// sent to many devices) as a frame.
pub async fn write_encoded(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), FrameError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(too_large(bytes.len(), bytes.first().copied()));
    }
    send.write_all(&(bytes.len() as u32).to_le_bytes()).await.map_err(|e| FrameError::Closed(explain(&e)))?;
    send.write_all(bytes).await.map_err(|e| FrameError::Closed(explain(&e)))
}

/// Writes one frame whose bytes come in two parts (an encoded prefix and bytes held
/// elsewhere), without joining them first.
pub async fn write_parts(send: &mut quinn::SendStream, head: &[u8], tail: &[u8]) -> Result<(), FrameError> {
    let len = head.len() + tail.len();
    if len > MAX_MESSAGE_BYTES {
        return Err(too_large(len, head.first().copied()));
    }
    let closed = |e: quinn::WriteError| FrameError::Closed(explain(&e));
    send.write_all(&(len as u32).to_le_bytes()).await.map_err(closed)?;
    send.write_all(head).await.map_err(closed)?;
    send.write_all(tail).await.map_err(closed)
}

fn too_large(len: usize, first: Option<u8>) -> FrameError {
    let kind = first.map_or(FrameKind::Unknown, FrameKind::of_first_byte);
    FrameError::TooLarge { len, limit: MAX_MESSAGE_BYTES, kind }
}

/// Reads one frame and decodes it.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message, FrameError> {
    Ok(read_message_sized(recv).await?.0)
}

/// Reads one frame and decodes it; also says how many bytes the frame took.
pub async fn read_message_sized(recv: &mut quinn::RecvStream) -> Result<(Message, usize), FrameError> {
    let (msg, bytes) = read_message_bytes(recv).await?;
    Ok((msg, bytes.len() + 4))
}

/// Reads one frame and decodes it; also returns the frame's bytes as received (the encoded
/// message, without its length prefix), for a receiver that keeps them as they came.
pub async fn read_message_bytes(recv: &mut quinn::RecvStream) -> Result<(Message, Vec<u8>), FrameError> {
    read_message_limited(recv, |_| MAX_MESSAGE_BYTES).await
}

/// The limit for a request with fixed-size fields (a `Hello`, a `TaskRequest`, an operator
/// command, a status answer's question): 64 KiB.
pub const SMALL_FRAME_BYTES: usize = 64 << 10;

/// Bytes read per piece of a frame's body; the buffer grows by what arrives.
const PIECE: usize = 64 << 10;

/// Reads one frame whose length must not exceed `limit(kind)`, `kind` told from the frame's
/// first byte (an unknown first byte gets the limit of [`FrameKind::Unknown`]; keep that
/// small), and decodes it; also returns the frame's bytes as received. An oversized frame is
/// refused after its first byte, before its body is read; the stream is then stopped, so
/// the peer cannot go on pushing bytes at it. Limits above [`MAX_MESSAGE_BYTES`] are cut to
/// it.
pub async fn read_message_limited(
    recv: &mut quinn::RecvStream,
    limit: impl Fn(FrameKind) -> usize,
) -> Result<(Message, Vec<u8>), FrameError> {
    let closed = |e: quinn::ReadExactError| FrameError::Closed(explain(&e));
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(closed)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Ok((codec::decode(&[])?, Vec::new()));
    }
    if len > MAX_MESSAGE_BYTES {
        // Over every limit: refused without waiting for the first byte.
        let _ = recv.stop(0u32.into());
        return Err(FrameError::TooLarge { len, limit: MAX_MESSAGE_BYTES, kind: FrameKind::Unknown });
    }
    let mut first = [0u8; 1];
    recv.read_exact(&mut first).await.map_err(closed)?;
    let kind = FrameKind::of_first_byte(first[0]);
    let limit = limit(kind).min(MAX_MESSAGE_BYTES);
    if len > limit {
        let _ = recv.stop(0u32.into());
        return Err(FrameError::TooLarge { len, limit, kind });
    }
    let mut buf = Vec::with_capacity(len.min(PIECE));
    buf.push(first[0]);
    while buf.len() < len {
        let want = (len - buf.len()).min(PIECE);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameError::Closed(format!(
                    "the stream ended {} bytes into a {len}-byte frame",
                    buf.len()
                )));
            }
            Err(e) => return Err(FrameError::Closed(explain(&e))),
        }
    }
    Ok((codec::decode(&buf)?, buf))
}
