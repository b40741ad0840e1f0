//! Verifying a contact: the safety number of both identity keys, and whether the user marked it
//! as compared (served by the API at `/v1/contacts/{name}/verify`).

use serde::Serialize;

use crate::core::{Node, NodeError};

/// What `kith contact verify` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerifyView {
    /// The contact's peer id.
    pub peer_id: String,
    /// 60 digits in twelve groups of five, the same on both sides.
    pub safety_number: String,
    /// The user compared it (and the contact's identity key has not changed since).
    pub verified: bool,
    /// The contact's identity key changed since it was first seen, and is not verified again.
    pub identity_changed: bool,
}

impl Node {
    /// The safety number with `who` (a contact name or peer id); with `mark`, records that
    /// the user compared it.
    pub fn verify_contact(&self, who: &str, mark: bool) -> Result<VerifyView, NodeError> {
        let peer = self.resolve(who)?;
        let failed = |e: crate::core::crypto::CryptoError| NodeError::Invalid(e.to_string());
        let Some(mut record) = self.olm().peer(&peer).map_err(failed)? else {
            return Err(NodeError::Unavailable(format!(
                "no identity key of {who} is known yet: add the contact from its invite, or exchange a message first"
            )));
        };
        if mark {
            self.olm().mark_verified(&peer).map_err(failed)?;
            record.verified = true;
            record.changed = false;
        }
        Ok(VerifyView {
            peer_id: peer.to_string(),
            safety_number: super::safety_number(self.olm().identity(), &record.identity),
            verified: record.verified,
            identity_changed: record.changed,
        })
    }

    /// Whether `peer`'s identity key is verified, and whether it changed (for contact lists).
    pub fn verification(&self, peer: &libp2p::PeerId) -> (bool, bool) {
        match self.olm().peer(peer) {
            Ok(Some(record)) => (record.verified, record.changed),
            _ => (false, false),
        }
    }
}
