//! A `request_response::Codec` over kith's framing and ciborium.
//!
//! Reading: the 4-byte length is checked against the protocol's maximum before anything is
//! allocated; a frame that is too large or does not decode becomes [`Message::Invalid`] (inbound
//! requests) or an I/O error (responses), never a panic.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kith_protocol::limits::FRAME_HEADER_BYTES;
use kith_protocol::{cbor, frame, Reject};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An inbound or outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<T> {
    /// A request that decoded.
    Valid(T),
    /// An inbound frame that was refused before or while decoding; answer with `reason`.
    Invalid {
        /// The typed reason to send back.
        reason: Reject,
        /// What was wrong, for the log.
        detail: String,
    },
    /// Bytes written to the stream as they are, header included. Used by tests and tools that
    /// need to send hostile input through a real connection; never produced by reading.
    Raw(Vec<u8>),
}

/// The codec: `Req` and `Resp` are CBOR inside frames of at most `max_frame_bytes`.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    max_frame_bytes: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_frame_bytes)
    }
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec that refuses frames above `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            _types: PhantomData,
        }
    }
}

/// What went wrong reading one frame.
enum ReadError {
    Io(io::Error),
    TooLarge { len: usize, max: usize },
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    io.read_exact(&mut header).await.map_err(ReadError::Io)?;
    let len = match frame::payload_len(header, max) {
        Ok(len) => len,
        Err(frame::FrameError::TooLarge { len, max }) => {
            return Err(ReadError::TooLarge { len, max })
        }
    };
    // Grow with the data actually received, not with the claimed length: a first step, then
    // (once the peer has shown it sends) the rest in one exact allocation. Reading into an
    // initialised buffer of the right size avoids `read_to_end`'s regrow-and-copy at the end.
    let first = len.min(FIRST_READ_BYTES);
    let mut payload = vec![0u8; first];
    io.read_exact(&mut payload)
        .await
        .map_err(|e| eof(e, 0, len))?;
    if len > first {
        payload.resize(len, 0);
        io.read_exact(&mut payload[first..])
            .await
            .map_err(|e| eof(e, first, len))?;
    }
    Ok(payload)
}

/// How much of a frame is read before the rest of its claimed length is allocated.
const FIRST_READ_BYTES: usize = 64 * 1024;

/// An early end of stream, saying how far the frame got.
fn eof(e: io::Error, from: usize, len: usize) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame of {len} bytes ended early (after at least {from})"),
        ))
    } else {
        ReadError::Io(e)
    }
}

async fn write_frame<T: AsyncWrite + Unpin + Send, V: Serialize>(
    io: &mut T,
    value: &V,
    max: usize,
) -> io::Result<()> {
    let framed = cbor::encode_framed(value, max).map_err(io::Error::other)?;
    io.write_all(&framed).await?;
    io.close().await
}

impl<Req, Resp> libp2p::request_response::Codec for Codec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Message<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let payload = match read_frame(io, self.max_frame_bytes).await {
            Ok(payload) => payload,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge { len, max }) => {
                return Ok(Message::Invalid {
                    reason: Reject::TooLarge { max: max as u64 },
                    detail: format!("frame header claims {len} bytes, limit {max}"),
                })
            }
        };
        Ok(match cbor::decode(&payload, self.max_frame_bytes) {
            Ok(request) => Message::Valid(request),
            Err(e) => Message::Invalid {
                reason: Reject::Malformed,
                detail: e.to_string(),
            },
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let payload = match read_frame(io, self.max_frame_bytes).await {
            Ok(payload) => payload,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge { len, max }) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("response frame of {len} bytes exceeds {max}"),
                ))
            }
        };
        cbor::decode(&payload, self.max_frame_bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Message<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            Message::Valid(request) => write_frame(io, &request, self.max_frame_bytes).await,
            Message::Raw(bytes) => {
                io.write_all(&bytes).await?;
                io.close().await
            }
            Message::Invalid { detail, .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to send an invalid request: {detail}"),
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &response, self.max_frame_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use kith_protocol::dm;
    use libp2p::request_response::Codec as _;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(dm::PROTOCOL)
    }

    async fn read(bytes: Vec<u8>) -> io::Result<Message<dm::Request>> {
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES);
        codec.read_request(&proto(), &mut Cursor::new(bytes)).await
    }

    #[tokio::test]
    async fn responses_round_trip() {
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES);
        let mut buf = Cursor::new(Vec::new());
        codec
            .write_response(&proto(), &mut buf, dm::Response::Accepted { req_id: 5 })
            .await
            .expect("write");
        let back = codec
            .read_response(&proto(), &mut Cursor::new(buf.into_inner()))
            .await
            .expect("read");
        assert_eq!(back, dm::Response::Accepted { req_id: 5 });
    }

    #[tokio::test]
    async fn oversize_header_becomes_a_typed_reject() {
        let header = (u32::MAX).to_be_bytes().to_vec();
        match read(header).await.expect("typed") {
            Message::Invalid { reason, .. } => assert_eq!(
                reason,
                Reject::TooLarge {
                    max: dm::MAX_FRAME_BYTES as u64
                }
            ),
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_becomes_malformed() {
        let framed = frame::encode(&[0xff, 0x00, 0x13], 16).expect("frame");
        assert!(matches!(
            read(framed).await.expect("typed"),
            Message::Invalid {
                reason: Reject::Malformed,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_short_frame_is_an_io_error() {
        let mut framed = frame::encode(&[1, 2, 3, 4], 16).expect("frame");
        framed.truncate(6);
        assert_eq!(
            read(framed).await.expect_err("short").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
