//! Inbound messages being stored, by sender and id. Whether a message is new and its write are
//! one step: a copy that arrives while another copy of the same message is between its "not
//! stored yet" check and its flush (a relay pushing a deposit to a connected recipient while
//! the recipient fetches the same message from its mailbox) sees the claim and is not stored
//! or announced a second time. The most recently stored messages stay known here too, so a
//! copy that comes right after is a duplicate whatever the store's read says.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use kith_protocol::MessageId;
use libp2p::PeerId;

/// Recently stored messages remembered (far more than a burst of racing copies spans).
const RECENT: usize = 16 * 1024;

type Key = (PeerId, MessageId);

/// The claims of one node.
#[derive(Default)]
pub(crate) struct Claims(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    in_flight: HashSet<Key>,
    recent: HashSet<Key>,
    recent_order: VecDeque<Key>,
}

/// What [`Claims::claim`] found.
pub(crate) enum Claimed<'a> {
    /// The message is this caller's to check and store.
    Mine(Claim<'a>),
    /// Another copy is being stored right now.
    Busy,
    /// Another copy was stored moments ago.
    Stored,
}

/// One claimed message; the claim ends when this is dropped (after the message is flushed and
/// announced, or given up).
pub(crate) struct Claim<'a> {
    claims: &'a Claims,
    key: Key,
    stored: bool,
}

impl Claims {
    /// Claims message `id` of `from`.
    pub(crate) fn claim(&self, from: PeerId, id: MessageId) -> Claimed<'_> {
        let key = (from, id);
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if inner.recent.contains(&key) {
            return Claimed::Stored;
        }
        if !inner.in_flight.insert(key) {
            return Claimed::Busy;
        }
        Claimed::Mine(Claim {
            claims: self,
            key,
            stored: false,
        })
    }
}

impl Claim<'_> {
    /// Whether this is the claim of message `id` of `from`.
    pub(crate) fn is(&self, from: PeerId, id: MessageId) -> bool {
        self.key == (from, id)
    }

    /// The message is written: once the claim ends, copies are duplicates.
    pub(crate) fn stored(&mut self) {
        self.stored = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut inner = self.claims.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.in_flight.remove(&self.key);
        if self.stored && inner.recent.insert(self.key) {
            inner.recent_order.push_back(self.key);
            if inner.recent_order.len() > RECENT {
                if let Some(old) = inner.recent_order.pop_front() {
                    inner.recent.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_waits_for_the_first_and_then_sees_it_stored() {
        let claims = Claims::default();
        let from = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let (id, given_up) = (MessageId::random(), MessageId::random());
        let Claimed::Mine(mut first) = claims.claim(from, id) else {
            panic!("the first claim is the caller's");
        };
        assert!(matches!(claims.claim(from, id), Claimed::Busy));
        assert!(matches!(claims.claim(from, given_up), Claimed::Mine(_)));
        first.stored();
        drop(first);
        assert!(matches!(claims.claim(from, id), Claimed::Stored));
        // A claim given up without storing leaves nothing behind.
        assert!(matches!(claims.claim(from, given_up), Claimed::Mine(_)));
    }
}
