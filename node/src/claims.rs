//! Inbound messages being stored, by sender and id. Whether a message is new and its write are
//! one step: a copy that arrives while another copy of the same message is between its "not
//! stored yet" check and its flush (a relay pushing a deposit to a connected recipient while
//! the recipient fetches the same message from its mailbox) sees the claim and is not stored
//! or announced a second time.

use std::collections::HashSet;
use std::sync::Mutex;

use kith_protocol::MessageId;
use libp2p::PeerId;

/// The claims of one node.
#[derive(Default)]
pub(crate) struct Claims(Mutex<HashSet<(PeerId, MessageId)>>);

/// One claimed message; the claim ends when this is dropped (after the message is flushed and
/// announced, or given up).
pub(crate) struct Claim<'a> {
    claims: &'a Claims,
    key: (PeerId, MessageId),
}

impl Claims {
    /// Claims message `id` of `from`; `None` while another copy holds it.
    pub(crate) fn claim(&self, from: PeerId, id: MessageId) -> Option<Claim<'_>> {
        let key = (from, id);
        let fresh = self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        fresh.then_some(Claim { claims: self, key })
    }
}

impl Claim<'_> {
    /// Whether this is the claim of message `id` of `from`.
    pub(crate) fn is(&self, from: PeerId, id: MessageId) -> bool {
        self.key == (from, id)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_waits_for_the_first_to_end() {
        let claims = Claims::default();
        let from = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let id = MessageId::random();
        let first = claims.claim(from, id);
        assert!(first.is_some());
        assert!(claims.claim(from, id).is_none());
        assert!(claims.claim(from, MessageId::random()).is_some());
        drop(first);
        assert!(claims.claim(from, id).is_some());
    }
}
