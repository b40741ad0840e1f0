//! The order in which the Olm messages of one sending chain are opened.
//!
//! The ratchet keeps the keys of at most 40 skipped messages of a chain: opening message 150
//! of a chain whose messages 0 to 149 have not come yet throws away the keys of 0 to 109, and
//! those messages could then never be read. Messages do come that far out of order: a sender
//! with 200 messages queued for an offline peer deposits them at a relay in whatever order its
//! retries find room, a relay's push races the recipient's own fetch, and a relay that restarts
//! hands over what it stored before what is still on its way.
//!
//! So a node opens a chain's messages no further than [`WINDOW`] ahead of the first one it has
//! not opened. A message beyond that is stored as it came (sealed, with its envelope; it is
//! stored by the recipient's node, so its sender may show it delivered) and opened once the
//! messages before it have been: each open looks for held messages that came into the window.
//! A message that never comes (its sender lost it) must not hold the others forever: a chain
//! whose oldest held message waited [`PATIENCE`] skips to it; what came before is then asked
//! for again if it ever arrives (see `stage_undecryptable`).
//!
//! [`Chains`] is the pure part (what may be opened now), kept per peer at `x/c/` peer; held
//! messages are at `x/h/` peer, ratchet key, chain index, message id (see [`held_key`]).

use std::collections::BTreeSet;
use std::time::Duration;

use kith_protocol::envelope::{Sealed, OLM_NORMAL, OLM_PRE_KEY};
use serde::{Deserialize, Serialize};
use vodozemac::olm::OlmMessage;

/// How far ahead of a chain's first unopened message a message is opened (below the ratchet's
/// 40 kept keys, so that every skipped key of the window stays).
pub const WINDOW: u64 = 32;

/// How long the oldest held message of a chain waits for the ones before it.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Most messages held for one peer; more are refused with `Busy` until some open.
pub const MAX_HELD_PER_PEER: usize = 2_000;

/// Chains remembered per peer (the least recently used goes first); a chain forgotten starts
/// again from its index 0, which only makes its next messages wait for [`PATIENCE`].
const MAX_CHAINS_PER_PEER: usize = 16;

/// Where a message stands in its sender's ratchet: the chain's ratchet key and its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The sender's ratchet key (names the chain).
    pub ratchet: [u8; 32],
    /// The message's index in the chain.
    pub index: u64,
}

impl Position {
    /// The position of a sealed message, `None` when it does not parse (the open says why).
    pub fn of(sealed: &Sealed) -> Option<Self> {
        if sealed.message_type != OLM_PRE_KEY && sealed.message_type != OLM_NORMAL {
            return None;
        }
        let message =
            OlmMessage::from_parts(usize::from(sealed.message_type), &sealed.ciphertext).ok()?;
        Some(Self::of_message(&message))
    }

    /// The position of a parsed message.
    pub fn of_message(message: &OlmMessage) -> Self {
        let inner = match message {
            OlmMessage::PreKey(m) => m.message(),
            OlmMessage::Normal(m) => m,
        };
        Self {
            ratchet: inner.ratchet_key().to_bytes(),
            index: inner.chain_index(),
        }
    }
}

/// What to do with a message now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Open it.
    Open,
    /// Keep it sealed until the messages before it are opened.
    Hold,
}

/// One chain: the first index not yet opened and the ones opened beyond it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chain {
    #[serde(with = "serde_bytes")]
    ratchet: [u8; 32],
    next: u64,
    opened: BTreeSet<u64>,
    touched: u64,
}

/// A peer's chains, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chains {
    chains: Vec<Chain>,
    clock: u64,
}

impl Chains {
    fn find(&self, ratchet: &[u8; 32]) -> Option<&Chain> {
        self.chains.iter().find(|c| &c.ratchet == ratchet)
    }

    fn find_or_add(&mut self, ratchet: [u8; 32]) -> &mut Chain {
        self.clock += 1;
        let clock = self.clock;
        let at = match self.chains.iter().position(|c| c.ratchet == ratchet) {
            Some(at) => at,
            None => {
                if self.chains.len() >= MAX_CHAINS_PER_PEER {
                    if let Some(oldest) = self
                        .chains
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.touched)
                        .map(|(i, _)| i)
                    {
                        self.chains.swap_remove(oldest);
                    }
                }
                self.chains.push(Chain {
                    ratchet,
                    next: 0,
                    opened: BTreeSet::new(),
                    touched: clock,
                });
                self.chains.len() - 1
            }
        };
        let chain = &mut self.chains[at];
        chain.touched = clock;
        chain
    }

    /// Whether the message at `at` may be opened now.
    pub fn verdict(&self, at: &Position) -> Verdict {
        let next = self.find(&at.ratchet).map_or(0, |c| c.next);
        if at.index < next.saturating_add(WINDOW) {
            Verdict::Open
        } else {
            Verdict::Hold
        }
    }

    /// Notes that the message at `at` was opened.
    pub fn opened(&mut self, at: &Position) {
        let chain = self.find_or_add(at.ratchet);
        if at.index < chain.next {
            return;
        }
        chain.opened.insert(at.index);
        while chain.opened.remove(&chain.next) {
            chain.next += 1;
        }
    }

    /// Gives up waiting for the messages of a chain before `at`.
    pub fn skip_to(&mut self, at: &Position) {
        let chain = self.find_or_add(at.ratchet);
        if at.index <= chain.next {
            return;
        }
        chain.next = at.index;
        let next = chain.next;
        chain.opened.retain(|i| *i >= next);
        while chain.opened.remove(&chain.next) {
            chain.next += 1;
        }
    }
}

/// A held message as stored: its envelope (CBOR) and when it came.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// The envelope as it came.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// When it was held (ms since the epoch).
    pub held_at_ms: u64,
}

/// The prefix of a peer's held messages (`x/h/` peer).
pub fn held_prefix(peer_part: &[u8]) -> Vec<u8> {
    let mut key = b"x/h/".to_vec();
    key.extend_from_slice(peer_part);
    key
}

/// The key of a held message: the peer's prefix, then the position (so that a scan lists a
/// chain in index order) and the message id.
pub fn held_key(peer_part: &[u8], at: &Position, id: &[u8]) -> Vec<u8> {
    let mut key = held_prefix(peer_part);
    key.extend_from_slice(&at.ratchet);
    key.extend_from_slice(&at.index.to_be_bytes());
    key.extend_from_slice(id);
    key
}

/// The position in a held message's key, after the peer's prefix.
pub fn held_position(rest: &[u8]) -> Option<Position> {
    let ratchet: [u8; 32] = rest.get(..32)?.try_into().ok()?;
    let index = u64::from_be_bytes(rest.get(32..40)?.try_into().ok()?);
    Some(Position { ratchet, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: u64) -> Position {
        Position {
            ratchet: [7; 32],
            index,
        }
    }

    #[test]
    fn a_new_chain_opens_its_first_window_and_holds_what_is_beyond() {
        let chains = Chains::default();
        assert_eq!(chains.verdict(&at(0)), Verdict::Open);
        assert_eq!(chains.verdict(&at(WINDOW - 1)), Verdict::Open);
        assert_eq!(chains.verdict(&at(WINDOW)), Verdict::Hold);
        assert_eq!(chains.verdict(&at(150)), Verdict::Hold);
    }

    #[test]
    fn the_window_moves_with_the_first_unopened_message() {
        let mut chains = Chains::default();
        // 1 to 5 open out of order: the first unopened stays 0.
        for i in [3, 1, 5, 2, 4] {
            chains.opened(&at(i));
        }
        assert_eq!(chains.verdict(&at(WINDOW)), Verdict::Hold);
        chains.opened(&at(0));
        // 0 to 5 are open: the window starts at 6.
        assert_eq!(chains.verdict(&at(WINDOW + 5)), Verdict::Open);
        assert_eq!(chains.verdict(&at(WINDOW + 6)), Verdict::Hold);
        // Another chain of the same peer has its own window.
        let other = Position {
            ratchet: [9; 32],
            index: WINDOW,
        };
        assert_eq!(chains.verdict(&other), Verdict::Hold);
    }

    #[test]
    fn skipping_gives_up_on_the_messages_before_and_keeps_those_opened_after() {
        let mut chains = Chains::default();
        chains.opened(&at(41));
        chains.opened(&at(43));
        chains.skip_to(&at(40));
        assert_eq!(chains.verdict(&at(40 + WINDOW - 1)), Verdict::Open);
        chains.opened(&at(40));
        // 40 and 41 are open, 42 is not: the window starts at 42.
        assert_eq!(chains.verdict(&at(42 + WINDOW - 1)), Verdict::Open);
        assert_eq!(chains.verdict(&at(42 + WINDOW)), Verdict::Hold);
        // Skipping backwards changes nothing.
        chains.skip_to(&at(3));
        assert_eq!(chains.verdict(&at(42 + WINDOW)), Verdict::Hold);
    }

    #[test]
    fn a_peer_keeps_a_bounded_number_of_chains() {
        let mut chains = Chains::default();
        for r in 0..(MAX_CHAINS_PER_PEER as u8 + 4) {
            chains.opened(&Position {
                ratchet: [r; 32],
                index: 0,
            });
        }
        assert_eq!(chains.chains.len(), MAX_CHAINS_PER_PEER);
        // The oldest went: its window starts at 0 again.
        assert!(chains.find(&[0; 32]).is_none());
        assert!(chains.find(&[MAX_CHAINS_PER_PEER as u8 + 3; 32]).is_some());
    }

    #[test]
    fn held_keys_list_a_chain_in_index_order_and_parse_back() {
        let peer = [3u8, 1, 2, 3];
        let mut keys: Vec<_> = [300u64, 2, 40, 1000]
            .iter()
            .map(|i| held_key(&peer, &at(*i), &[0; 16]))
            .collect();
        keys.sort();
        let prefix = held_prefix(&peer);
        let indices: Vec<_> = keys
            .iter()
            .map(|k| held_position(&k[prefix.len()..]).expect("parses").index)
            .collect();
        assert_eq!(indices, vec![2, 40, 300, 1000]);
        assert!(held_position(&[1, 2, 3]).is_none());
    }
}
