//! Senders' public keys, decoded once and kept for their next envelopes.
//!
//! Decoding an ed25519 key from a peer id decompresses a curve point, a good part of the cost of
//! verifying an envelope, and a relay (deposits) or a node (its contacts' messages) sees the same
//! senders over and over. The cache is bounded
//! with two generations: lookups fill the current one; when it holds [`Keys::capacity`] keys
//! it becomes the previous one (the one before is dropped), and a key found only there moves
//! back. Recently used keys stay; the memory held is at most twice the capacity. A cached key
//! only ever checks envelopes of its own peer ([`SenderKey`]), so the cache cannot make a
//! forged envelope pass.

use std::collections::HashMap;

use crate::envelope::SenderKey;
use crate::PeerId;

/// A bounded cache of senders' decoded keys.
#[derive(Debug)]
pub struct Keys {
    current: HashMap<PeerId, SenderKey>,
    previous: HashMap<PeerId, SenderKey>,
    capacity: usize,
}

impl Keys {
    /// An empty cache keeping up to `capacity` keys per generation (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Keys kept per generation.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key of `peer`, decoded now if it is not cached; `None` if its id embeds no key.
    pub fn get(&mut self, peer: &PeerId) -> Option<SenderKey> {
        if let Some(key) = self.current.get(peer) {
            return Some(key.clone());
        }
        let key = match self.previous.remove(peer) {
            Some(key) => key,
            None => SenderKey::of(peer)?,
        };
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(*peer, key.clone());
        Some(key)
    }

    /// Keys held now, in both generations.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Header;
    use crate::{Body, Destination, Envelope, Keypair, MessageId, VerifyError};

    fn sealed(from: &Keypair, text: &str) -> Envelope {
        let to = Keypair::generate_ed25519().public().to_peer_id();
        let header = Header {
            id: MessageId::random(),
            to: Destination::Peer(to),
            sent_at_ms: 0,
            lamport: 1,
            expires_at_ms: None,
        };
        Envelope::seal(from, header, &Body::Chat { text: text.into() }).expect("seal")
    }

    #[test]
    fn cached_keys_still_reject_forgeries() {
        let mut keys = Keys::new(4);
        let alice = Keypair::generate_ed25519();
        let genuine = sealed(&alice, "hello");
        let first = keys.get(&genuine.from).expect("ed25519 id");
        assert_eq!(genuine.verify_with(&first), Ok(()));
        // From the cache this time: a forged copy of alice's envelope still fails.
        let cached = keys.get(&genuine.from).expect("cached");
        let mut forged = genuine.clone();
        forged.body = sealed(&alice, "forged").body;
        assert_eq!(forged.verify_with(&cached), Err(VerifyError::BadSignature));
        // An envelope claiming to be from mallory is not checked with alice's cached key.
        let mallory = Keypair::generate_ed25519();
        let mut claimed = genuine;
        claimed.from = mallory.public().to_peer_id();
        assert_eq!(
            claimed.verify_with(&cached),
            Err(VerifyError::UnknownKey(claimed.from))
        );
        let theirs = keys.get(&claimed.from).expect("ed25519 id");
        assert_eq!(claimed.verify_with(&theirs), Err(VerifyError::BadSignature));
    }

    #[test]
    fn stays_bounded_and_keeps_recent_keys() {
        let mut keys = Keys::new(3);
        let peers: Vec<PeerId> = (0..10)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let busy = peers[0];
        for peer in &peers[1..] {
            assert!(keys.get(&busy).is_some());
            assert!(keys.get(peer).is_some());
            assert!(keys.len() <= 2 * keys.capacity(), "{} keys", keys.len());
        }
        // The sender seen all along is still held.
        assert!(keys.current.contains_key(&busy) || keys.previous.contains_key(&busy));
    }

    #[test]
    fn an_id_without_a_key_is_not_cached() {
        let mut keys = Keys::new(3);
        // 32 random bytes as an identity multihash: not a protobuf-encoded key.
        let keyless = PeerId::random();
        assert!(keys.get(&keyless).is_none());
        assert!(keys.is_empty());
    }
}
