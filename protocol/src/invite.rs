//! Invites: a peer id, a display name and home relay addresses in one copyable string.
//!
//! Format: `kith:` followed by base58 of the CBOR-encoded [`Invite`]. Relay addresses are kept as
//! strings here (this crate does not depend on libp2p's multiaddr); the node parses them.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::cbor;
use crate::ids::peer_bytes;

/// The prefix of every invite string.
pub const PREFIX: &str = "kith:";

/// Longest invite accepted, in characters.
pub const MAX_INVITE_CHARS: usize = 4096;

/// Most relay addresses in one invite.
pub const MAX_INVITE_RELAYS: usize = 16;

/// What an invite carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// Who to talk to.
    #[serde(with = "peer_bytes")]
    pub peer_id: PeerId,
    /// The name its owner chose.
    pub name: String,
    /// Its home relays, as multiaddr strings ending in `/p2p/<relay peer id>`.
    pub relays: Vec<String>,
    /// Its end-to-end identity key, signed by its peer id's key. Absent in invites of earlier
    /// releases (the key is then learned from its key bundle or first message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::prekeys::SignedIdentity>,
}

/// Why an invite string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// It does not start with `kith:`.
    #[error("an invite starts with {PREFIX:?}")]
    Prefix,
    /// It is longer than [`MAX_INVITE_CHARS`] or lists too many relays.
    #[error("invite too long")]
    TooLong,
    /// The base58 or CBOR inside is broken (a copy-paste error, usually).
    #[error("invite is damaged: {0}")]
    Damaged(String),
}

impl Invite {
    /// The invite as a string.
    pub fn encode(&self) -> String {
        // An invite of bounded parts always encodes; the size check only guards the decoder.
        let bytes = cbor::encode(self, usize::MAX).unwrap_or_default();
        format!("{PREFIX}{}", bs58::encode(bytes).into_string())
    }

    /// Parses an invite string.
    pub fn decode(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        if text.len() > MAX_INVITE_CHARS {
            return Err(InviteError::TooLong);
        }
        let rest = text.strip_prefix(PREFIX).ok_or(InviteError::Prefix)?;
        let bytes = bs58::decode(rest)
            .into_vec()
            .map_err(|e| InviteError::Damaged(e.to_string()))?;
        let invite: Invite = cbor::decode(&bytes, MAX_INVITE_CHARS)
            .map_err(|e| InviteError::Damaged(e.to_string()))?;
        if invite.relays.len() > MAX_INVITE_RELAYS {
            return Err(InviteError::TooLong);
        }
        Ok(invite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    #[test]
    fn invites_round_trip() {
        let invite = Invite {
            peer_id: Keypair::generate_ed25519().public().to_peer_id(),
            name: "alice".into(),
            relays: vec!["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW".into()],
            identity: None,
        };
        let text = invite.encode();
        assert!(text.starts_with(PREFIX));
        assert_eq!(Invite::decode(&text), Ok(invite));
    }

    #[test]
    fn invites_carry_the_signed_identity_key_and_older_ones_still_parse() {
        let key = Keypair::generate_ed25519();
        let mut invite = Invite {
            peer_id: key.public().to_peer_id(),
            name: "alice".into(),
            relays: vec![],
            identity: Some(crate::prekeys::SignedIdentity::sign(&key, [7; 32]).expect("sign")),
        };
        let text = invite.encode();
        assert_eq!(Invite::decode(&text), Ok(invite.clone()));
        // An invite of an earlier release: the three fields alone.
        #[derive(Serialize)]
        struct Old {
            #[serde(with = "peer_bytes")]
            peer_id: PeerId,
            name: String,
            relays: Vec<String>,
        }
        let old = Old {
            peer_id: invite.peer_id,
            name: invite.name.clone(),
            relays: vec![],
        };
        let text = format!(
            "{PREFIX}{}",
            bs58::encode(cbor::encode(&old, 4096).expect("encode")).into_string()
        );
        invite.identity = None;
        assert_eq!(Invite::decode(&text), Ok(invite));
    }

    #[test]
    fn damaged_invites_are_refused() {
        assert_eq!(Invite::decode("hello"), Err(InviteError::Prefix));
        assert!(matches!(
            Invite::decode("kith:0OIl"),
            Err(InviteError::Damaged(_))
        ));
        assert!(matches!(
            Invite::decode("kith:2NEpo7TZRRrLZSi2U"),
            Err(InviteError::Damaged(_))
        ));
    }
}
