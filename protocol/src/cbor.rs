//! CBOR encoding and bounded decoding with ciborium.
//!
//! Encoding is deterministic (fields in declaration order, shortest integer forms), which is what
//! signatures are computed over. Decoding refuses input above a caller-given maximum before
//! handing it to ciborium, and ciborium itself never trusts a length header: byte strings are read
//! in bounded chunks and sequences are pre-sized cautiously, so a "length bomb" costs nothing.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::limits::FRAME_HEADER_BYTES;

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serializer failed (a bug in a wire type, not bad input).
    #[error("cbor encoding failed: {0}")]
    Cbor(String),
    /// The encoded value is larger than allowed.
    #[error("encoded value of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than allowed; nothing was parsed.
    #[error("input of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Input size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input is not a valid encoding of the expected type.
    #[error("malformed cbor: {0}")]
    Malformed(String),
    /// The input holds a valid value followed by extra bytes.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
}

/// Encodes `value`, refusing results larger than `max`.
pub fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, EncodeError> {
    encode_after(value, 0, max)
}

/// Encodes `value` as one frame: the 4-byte big-endian length, then the CBOR, in one buffer.
/// Refuses values whose encoding is larger than `max`.
pub fn encode_framed<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = encode_after(value, FRAME_HEADER_BYTES, max.min(u32::MAX as usize))?;
    let len = (out.len() - FRAME_HEADER_BYTES) as u32;
    out[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Encodes `value` after `room` zero bytes, into a buffer of exactly the right size: the value
/// is first encoded into a counter, so a large byte string (a file chunk) is copied once instead
/// of being regrown and copied again as the buffer doubles.
fn encode_after<T: Serialize>(value: &T, room: usize, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut counter = Counter(0);
    ciborium::into_writer(value, &mut counter).map_err(|e| EncodeError::Cbor(e.to_string()))?;
    if counter.0 > max {
        return Err(EncodeError::TooLarge {
            len: counter.0,
            max,
        });
    }
    let mut out = Vec::with_capacity(room + counter.0);
    out.resize(room, 0);
    ciborium::into_writer(value, &mut out).map_err(|e| EncodeError::Cbor(e.to_string()))?;
    Ok(out)
}

/// A writer that only counts what it is given.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decodes exactly one value from `bytes`, refusing inputs larger than `max`.
///
/// ciborium copies byte strings through a scratch buffer. Inputs up to [`STACK_SCRATCH`] bytes
/// use one on the stack; larger ones a per-thread buffer as long as the input, up to
/// [`MAX_SCRATCH`], so a [`bytes`] field (a file chunk) fits in it whole and is read with one
/// exact allocation.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    if bytes.len() <= STACK_SCRATCH {
        let mut scratch = [0u8; STACK_SCRATCH];
        return decode_with(bytes, &mut scratch);
    }
    let len = bytes.len().min(MAX_SCRATCH);
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            decode_with(bytes, &mut scratch[..len])
        }
        // A decode inside a decode.
        Err(_) => decode_with(bytes, &mut vec![0u8; len]),
    })
}

/// The scratch buffer on the stack: enough for every message but files and large batches.
const STACK_SCRATCH: usize = 4096;

/// The largest scratch buffer, kept by each decoding thread: the longest [`bytes`] field that
/// decodes. A file chunk frame is a little over 256 KiB.
pub const MAX_SCRATCH: usize = 512 * 1024;

const _: () = assert!(crate::blob::MAX_FRAME_BYTES <= MAX_SCRATCH);

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn decode_with<T: DeserializeOwned>(bytes: &[u8], scratch: &mut [u8]) -> Result<T, DecodeError> {
    let mut reader = bytes;
    let value =
        ciborium::de::from_reader_with_buffer(&mut reader, scratch).map_err(|e| match e {
            ciborium::de::Error::Io(_) => DecodeError::Malformed("unexpected end of input".into()),
            other => DecodeError::Malformed(other.to_string()),
        })?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes(reader.len()));
    }
    Ok(value)
}

/// `#[serde(with = "kith_protocol::cbor::bytes")]` for large `Vec<u8>` fields (file chunks):
/// the same encoding as `serde_bytes`, decoded with one allocation of the exact length instead
/// of a buffer regrown piece by piece. The byte string must fit in [`decode`]'s scratch buffer:
/// at most [`MAX_SCRATCH`] bytes, definite-length (the encoder never writes the other kind).
pub mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    /// Writes `bytes` as a CBOR byte string.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    /// Reads a CBOR byte string (or, like `serde_bytes`, an array of bytes).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_bytes(Exact)
    }

    struct Exact;

    impl<'de> Visitor<'de> for Exact {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Cautious pre-sizing: the length is the peer's claim.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Chunk {
        id: u64,
        #[serde(with = "crate::cbor::bytes")]
        bytes: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Reference {
        id: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsArray {
        id: u64,
        bytes: Vec<u8>,
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn exact_bytes_match_serde_bytes_on_the_wire_at_every_size() {
        // Around the stack scratch size, a file chunk, and the longest that fits the scratch.
        for len in [0, 1, 23, 24, 4080, 4096, 4097, 262_160, MAX_SCRATCH - 16] {
            let chunk = Chunk {
                id: len as u64,
                bytes: data(len),
            };
            let reference = Reference {
                id: len as u64,
                bytes: data(len),
            };
            let wire = encode(&chunk, usize::MAX).expect("encodes");
            assert_eq!(wire, encode(&reference, usize::MAX).expect("encodes"));
            assert_eq!(decode::<Chunk>(&wire, usize::MAX), Ok(chunk));
            assert_eq!(decode::<Reference>(&wire, usize::MAX), Ok(reference));
        }
    }

    #[test]
    fn inputs_longer_than_the_scratch_still_decode_ordinary_byte_strings() {
        let reference = Reference {
            id: 7,
            bytes: data(3 * MAX_SCRATCH),
        };
        let wire = encode(&reference, usize::MAX).expect("encodes");
        assert_eq!(decode::<Reference>(&wire, usize::MAX), Ok(reference));
        // An exact-bytes field longer than the scratch is refused, not a panic.
        assert!(matches!(
            decode::<Chunk>(&wire, usize::MAX),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn exact_bytes_also_read_an_array_of_bytes() {
        let wire = encode(
            &AsArray {
                id: 1,
                bytes: vec![1, 2, 3],
            },
            1024,
        )
        .expect("encodes");
        assert_eq!(
            decode::<Chunk>(&wire, 1024),
            Ok(Chunk {
                id: 1,
                bytes: vec![1, 2, 3]
            })
        );
    }

    #[test]
    fn a_byte_string_longer_than_its_input_is_malformed() {
        // A header claiming 1 MiB of bytes, followed by three.
        let mut wire = encode(
            &Chunk {
                id: 1,
                bytes: Vec::new(),
            },
            1024,
        )
        .expect("encodes");
        wire.truncate(wire.len() - 1);
        wire.extend_from_slice(&[0x5a, 0x00, 0x10, 0x00, 0x00, 1, 2, 3]);
        assert!(matches!(
            decode::<Chunk>(&wire, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn framed_encoding_is_the_frame_of_the_encoding() {
        let chunk = Chunk {
            id: 9,
            bytes: data(5000),
        };
        let framed = encode_framed(&chunk, 10_000).expect("fits");
        let plain = encode(&chunk, 10_000).expect("fits");
        assert_eq!(framed, crate::frame::encode(&plain, 10_000).expect("fits"));
        assert!(matches!(
            encode_framed(&chunk, 4000),
            Err(EncodeError::TooLarge { max: 4000, .. })
        ));
    }

    #[test]
    fn input_above_the_limit_is_refused_before_parsing() {
        assert_eq!(
            decode::<Chunk>(&[0u8; 100], 99),
            Err(DecodeError::TooLarge { len: 100, max: 99 })
        );
    }
}
