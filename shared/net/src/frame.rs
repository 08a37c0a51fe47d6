//! Length-prefixed wire messages over QUIC streams.
//!
//! A frame is a `u32` little-endian byte count followed by that many bytes of
//! [`fedge_core::codec`] encoding. The count is checked against the size limit before a
//! buffer is allocated, so a peer cannot make us reserve memory by lying about a length.

use fedge_core::codec::{self, DecodeError, MAX_MESSAGE_BYTES};
use fedge_core::wire::Message;
use thiserror::Error;

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream ended or the connection dropped.
    #[error("stream closed: {0}")]
    Closed(String),
    /// The announced length exceeds the limit.
    #[error("frame of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
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
        return Err(FrameError::TooLarge(bytes.len()));
    }
    send.write_all(&(bytes.len() as u32).to_le_bytes()).await.map_err(|e| FrameError::Closed(explain(&e)))?;
    send.write_all(bytes).await.map_err(|e| FrameError::Closed(explain(&e)))
}

/// Writes one frame whose bytes come in two parts (an encoded prefix and bytes held
/// elsewhere), without joining them first.
pub async fn write_parts(send: &mut quinn::SendStream, head: &[u8], tail: &[u8]) -> Result<(), FrameError> {
    let len = head.len() + tail.len();
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let closed = |e: quinn::WriteError| FrameError::Closed(explain(&e));
    send.write_all(&(len as u32).to_le_bytes()).await.map_err(closed)?;
    send.write_all(head).await.map_err(closed)?;
    send.write_all(tail).await.map_err(closed)
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
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| FrameError::Closed(explain(&e)))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| FrameError::Closed(explain(&e)))?;
    Ok((codec::decode(&buf)?, buf))
}
