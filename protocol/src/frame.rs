//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian body length followed by the postcard encoding of one
//! message. A body longer than [`MAX_FRAME_LEN`] is refused before a byte of it is read,
//! so a hostile peer cannot make the other side buffer more than that.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::{LENGTH_PREFIX_LEN, MAX_FRAME_LEN};

/// Why a frame could not be encoded, decoded, read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed before the frame is complete; not an error of the peer.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes the frame needs at least.
        needed: usize,
    },
    /// The length prefix announces a body larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("frame i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The error code a peer is closed with for this error.
    pub fn code(&self) -> crate::ErrorCode {
        match self {
            FrameError::TooLarge { .. } => crate::ErrorCode::FrameTooLarge,
            _ => crate::ErrorCode::Protocol,
        }
    }
}

/// Encodes `msg` as one frame (length prefix + body).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_append(&mut out, msg)?;
    Ok(out)
}

/// A postcard output that appends to a borrowed buffer (its own `ExtendFlavor` takes the
/// buffer and gives it back only on success).
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// [`encode`], appended to `out` (several frames in one buffer, for one write). On an
/// error `out` is left as it was.
pub fn encode_append<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    let malformed = |e: postcard::Error| FrameError::Malformed(e.to_string());
    // Sized first (a walk without writing), so the frame is one allocation, not a Vec
    // doubled from 4 bytes up to the payload's size.
    let size = postcard::experimental::serialized_size(msg).map_err(malformed)?;
    if size > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: size, max: MAX_FRAME_LEN });
    }
    let start = out.len();
    out.reserve(LENGTH_PREFIX_LEN + size);
    out.extend_from_slice(&[0u8; LENGTH_PREFIX_LEN]);
    if let Err(e) = postcard::serialize_with_flavor(msg, AppendTo(out)) {
        out.truncate(start);
        return Err(malformed(e));
    }
    let len = out.len() - start - LENGTH_PREFIX_LEN;
    let prefix = match u32::try_from(len) {
        Ok(p) if len <= MAX_FRAME_LEN => p,
        _ => {
            out.truncate(start);
            return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN });
        }
    };
    out[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Reads the length prefix at the start of `buf`, checking it against the limit.
fn body_len(buf: &[u8]) -> Result<usize, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_LEN) else {
        return Err(FrameError::Incomplete { needed: LENGTH_PREFIX_LEN - buf.len() });
    };
    let mut raw = [0u8; LENGTH_PREFIX_LEN];
    raw.copy_from_slice(prefix);
    let len = u32::from_be_bytes(raw) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    Ok(len)
}

/// Decodes a message body (without prefix); trailing bytes make it malformed.
fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`, returning the message and the bytes used.
///
/// [`FrameError::Incomplete`] means "call again with more bytes"; every other error means
/// the peer sent something wrong.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let len = body_len(buf)?;
    let total = LENGTH_PREFIX_LEN + len;
    let Some(body) = buf.get(LENGTH_PREFIX_LEN..total) else {
        return Err(FrameError::Incomplete { needed: total - buf.len() });
    };
    Ok((decode_body(body)?, total))
}

/// Reads one frame from a stream. `Ok(None)` means the stream ended cleanly between frames.
pub async fn read_frame<T, R>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    let mut got = 0;
    while got < LENGTH_PREFIX_LEN {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        got += n;
    }
    let len = body_len(&prefix)?;
    let mut body = Vec::new();
    read_body(reader, len, &mut body).await?;
    decode_body(&body).map(Some)
}

/// Bytes of a frame body allocated before any of it has arrived.
const FIRST_READ: usize = 16 * 1024;

/// Reads a body of `len` bytes into `body`, growing it as bytes arrive: a peer that
/// announces a 1 MiB frame and sends nothing costs [`FIRST_READ`], not 1 MiB. A body that
/// fits in [`FIRST_READ`] is one allocation of exactly its size.
async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
    body: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = body.len();
    let mut filled = 0;
    while filled < len {
        if body.len() == start + filled {
            // Double what has arrived, up to what is still announced.
            let grow = (len - filled).min(FIRST_READ.max(filled));
            body.resize(start + filled + grow, 0);
        }
        let n = match reader.read(&mut body[start + filled..]).await {
            Ok(n) => n,
            Err(e) => {
                body.truncate(start + filled);
                return Err(e.into());
            }
        };
        if n == 0 {
            body.truncate(start + filled);
            return Err(FrameError::Truncated);
        }
        filled += n;
    }
    Ok(())
}

/// Bytes a lane's reader takes from its stream at once.
const LANE_READ_BUFFER: usize = 4096;

/// The reader of a lane (a stream that carries many frames, one after another: a job lane,
/// a native API lane): [`read_frame`] through a buffer, so that one read of the stream takes
/// every frame that has arrived, not two reads per frame (each read of a quinn stream
/// takes its connection's lock). Nothing may be read past a frame by other means
/// ([`take_end`]): the buffer may hold the next one.
pub fn lane_reader<R: AsyncRead>(reader: R) -> tokio::io::BufReader<R> {
    tokio::io::BufReader::with_capacity(LANE_READ_BUFFER, reader)
}

/// Reads the end of a stream if it has already arrived, without waiting (it nearly always
/// comes with the last frame); answers whether it was there.
///
/// A QUIC receiver that drops a stream before reading its end asks the peer to stop
/// sending: quinn cannot tell a finished stream from one still missing data. That
/// `STOP_SENDING` frame goes out at once, usually in a datagram of its own, one per call
/// (BENCHMARKS.md). Bytes past the last frame (a peer's error) are read and dropped.
pub fn take_end<R: AsyncRead + Unpin>(reader: &mut R) -> bool {
    use std::task::{Context, Poll, Waker};
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(reader).poll_read(&mut cx, &mut buf) {
        Poll::Ready(Ok(())) => buf.filled().is_empty(),
        _ => false,
    }
}

/// Encodes `msg` and writes it as one frame.
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = encode(msg)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_announced_body_is_not_allocated_before_it_arrives() {
        // 1 MiB announced, 100 bytes sent, then the stream ends.
        let mut wire = vec![0u8; 100];
        let mut body = Vec::new();
        let r = read_body(&mut wire.as_slice(), MAX_FRAME_LEN, &mut body).await;
        assert!(matches!(r, Err(FrameError::Truncated)));
        assert_eq!(body.len(), 100);
        assert!(body.capacity() < 64 * 1024, "capacity {}", body.capacity());
        // A whole body is read exactly, and nothing past it.
        wire.extend_from_slice(b"next frame");
        let mut body = Vec::new();
        let mut rest = wire.as_slice();
        read_body(&mut rest, 100, &mut body).await.expect("whole");
        assert_eq!(body.len(), 100);
        assert_eq!(rest, b"next frame");
    }

    #[tokio::test]
    async fn the_end_is_taken_only_when_it_is_there() {
        let (mut near, mut far) = tokio::io::duplex(64);
        write_frame(&mut far, &7u32).await.expect("write");
        assert_eq!(read_frame::<u32, _>(&mut near).await.expect("read"), Some(7));
        // The peer has not ended the stream: nothing is waited for.
        assert!(!take_end(&mut near));
        // A byte past the last frame is not an end.
        far.write_all(b"x").await.expect("write");
        assert!(!take_end(&mut near));
        drop(far);
        assert!(take_end(&mut near));
    }
}
