//! Length-prefixed frames: a big-endian `u32` length, then that many bytes of CBOR.
//!
//! The length is checked against the caller's maximum before any buffer is sized, so a peer
//! cannot make us allocate by claiming a huge frame. [`decode`] tells "need more bytes" apart
//! from "invalid".

use crate::limits::FRAME_HEADER_BYTES;

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame claims (or would need) more bytes than the protocol allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The claimed length.
        len: usize,
        /// The protocol's maximum.
        max: usize,
    },
}

/// The result of looking at a buffer that may hold a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame: its payload and the number of bytes it took from the buffer.
    Frame {
        /// The payload bytes (without the header).
        payload: &'a [u8],
        /// Header plus payload.
        consumed: usize,
    },
    /// The buffer holds only part of a frame; at least this many more bytes are needed.
    NeedMore(usize),
}

/// Reads the header of a frame and checks the length against `max`.
///
/// Returns the payload length; use it to size the read of the payload.
pub fn payload_len(header: [u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Looks for one frame at the start of `buf`.
pub fn decode(buf: &[u8], max: usize) -> Result<Decoded<'_>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(Decoded::NeedMore(FRAME_HEADER_BYTES - buf.len()));
    };
    let mut fixed = [0u8; FRAME_HEADER_BYTES];
    fixed.copy_from_slice(header);
    let len = payload_len(fixed, max)?;
    let end = FRAME_HEADER_BYTES + len;
    match buf.get(FRAME_HEADER_BYTES..end) {
        Some(payload) => Ok(Decoded::Frame {
            payload,
            consumed: end,
        }),
        None => Ok(Decoded::NeedMore(end - buf.len())),
    }
}

/// Writes `payload` as one frame, refusing payloads above `max`.
pub fn encode(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    if payload.len() > max || u32::try_from(payload.len()).is_err() {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let framed = encode(b"hello", 16).expect("fits");
        assert_eq!(
            decode(&framed, 16),
            Ok(Decoded::Frame {
                payload: b"hello",
                consumed: 9
            })
        );
    }

    #[test]
    fn partial_frames_need_more() {
        let framed = encode(b"hello", 16).expect("fits");
        assert_eq!(decode(&framed[..2], 16), Ok(Decoded::NeedMore(2)));
        assert_eq!(decode(&framed[..6], 16), Ok(Decoded::NeedMore(3)));
        assert_eq!(decode(&[], 16), Ok(Decoded::NeedMore(4)));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let header = u32::MAX.to_be_bytes();
        assert_eq!(
            decode(&header, 1024),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert!(encode(&[0u8; 17], 16).is_err());
    }
}
