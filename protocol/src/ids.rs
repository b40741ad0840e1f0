//! Identifiers: message ids and group ids, 16 random bytes printed as lowercase hex.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a printed id could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an id is 32 lowercase hex characters (16 bytes), got {got:?}")]
pub struct ParseIdError {
    /// The text that was given.
    pub got: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                let mut bytes = [0u8; 16];
                rand::thread_rng().fill_bytes(&mut bytes);
                Self(bytes)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses raw bytes; `None` unless exactly 16 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 16]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || ParseIdError { got: s.to_owned() };
                if s.len() != 32 {
                    return Err(err());
                }
                let bytes = hex::decode(s).map_err(|_| err())?;
                Self::from_slice(&bytes).ok_or_else(err)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
                Self::from_slice(&bytes).ok_or_else(|| {
                    serde::de::Error::invalid_length(bytes.len(), &"16 bytes")
                })
            }
        }
    };
}

id_type!(
    /// A message id: 16 random bytes chosen by the sender, unique per sender.
    MessageId
);
id_type!(
    /// A group id: 16 random bytes chosen by the group's creator.
    GroupId
);

/// Serde helpers that encode a [`PeerId`](libp2p_identity::PeerId) as its raw bytes (CBOR byte
/// string), independent of the serializer's human-readable flag.
pub mod peer_bytes {
    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes a peer id as bytes.
    pub fn serialize<S: Serializer>(peer: &PeerId, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&peer.to_bytes())
    }

    /// Deserializes a peer id from bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PeerId, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
        PeerId::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_prints_as_lowercase_hex_and_parses_back() {
        let id = MessageId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
    }

    #[test]
    fn bad_ids_are_refused() {
        assert!("abc".parse::<MessageId>().is_err());
        assert!("zz".repeat(16).parse::<GroupId>().is_err());
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(MessageId::random(), MessageId::random());
    }
}
