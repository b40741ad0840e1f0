//! CBOR encoding and bounded decoding with ciborium.
//!
//! Encoding is deterministic (fields in declaration order, shortest integer forms), which is what
//! signatures are computed over. Decoding refuses input above a caller-given maximum before
//! handing it to ciborium, and ciborium itself never trusts a length header: byte strings are read
//! in bounded chunks and sequences are pre-sized cautiously, so a "length bomb" costs nothing.

use serde::de::DeserializeOwned;
use serde::Serialize;

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
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| EncodeError::Cbor(e.to_string()))?;
    if out.len() > max {
        return Err(EncodeError::TooLarge {
            len: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Decodes exactly one value from `bytes`, refusing inputs larger than `max`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let mut reader = bytes;
    let value = ciborium::from_reader(&mut reader).map_err(|e| match e {
        ciborium::de::Error::Io(_) => DecodeError::Malformed("unexpected end of input".into()),
        other => DecodeError::Malformed(other.to_string()),
    })?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes(reader.len()));
    }
    Ok(value)
}
