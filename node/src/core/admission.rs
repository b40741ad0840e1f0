//! Who may hold the node's inbound `/kith/dm/1` streams, and how fast strangers are served.
//!
//! Anyone can open dm streams to a node, and each one is served by a task that holds what its
//! sender has sent of its request. One pool for everybody let a hundred strangers take every
//! slot, and a contact's messages were then turned away. So streams are counted by who opened
//! them:
//!
//! - a **home relay** (its pushes, at most `max_pushes_per_recipient` of the relay's config) may
//!   hold [`MAX_STREAMS_PER_RELAY`];
//! - a **contact** [`MAX_STREAMS_PER_CONTACT`];
//! - a **stranger** [`MAX_STREAMS_PER_STRANGER`], and all strangers together
//!   [`MAX_STRANGER_STREAMS`];
//! - everybody together [`MAX_INBOUND_STREAMS`].
//!
//! A stream beyond its limit is dropped: its sender sees it reset and tries again later.
//!
//! Strangers' messages are also rated, all strangers together and a token per envelope, so a
//! batch costs what its messages do ([`StrangerRate`]): beyond [`STRANGER_REQUESTS_PER_SEC`]
//! (burst [`STRANGER_REQUEST_BURST`]) a request is answered `Busy` with the wait it should
//! observe, before anything in it is verified, opened or stored. A
//! stranger's first message still gets through at once on a quiet node; a flood of fresh
//! identities costs the node what the rate lets in, however many identities it uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kith_relay::mailbox::rate::TokenBucket;
use libp2p::PeerId;

/// Most inbound dm streams served at once, all peers together.
pub const MAX_INBOUND_STREAMS: usize = 1_024;
/// Most a home relay holds at once: the most pushes a relay may have in flight to one
/// recipient.
pub const MAX_STREAMS_PER_RELAY: usize = kith_relay::config::MAX_PUSHES_PER_RECIPIENT;
/// Most a contact holds at once (its node sends at most `max_in_flight_per_peer` requests).
pub const MAX_STREAMS_PER_CONTACT: usize = 64;
/// Most one stranger holds at once.
pub const MAX_STREAMS_PER_STRANGER: usize = 4;
/// Most all strangers together hold at once.
pub const MAX_STRANGER_STREAMS: usize = 128;
/// Strangers' messages (envelopes) served per second, all strangers together.
pub const STRANGER_REQUESTS_PER_SEC: u32 = 20;
/// The burst of strangers' messages.
pub const STRANGER_REQUEST_BURST: u32 = 40;

/// Who opened a stream, as far as the node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// One of this node's home relays.
    Relay,
    /// A contact.
    Contact,
    /// Anybody else.
    Stranger,
}

impl Standing {
    fn per_peer(self) -> usize {
        match self {
            Standing::Relay => MAX_STREAMS_PER_RELAY,
            Standing::Contact => MAX_STREAMS_PER_CONTACT,
            Standing::Stranger => MAX_STREAMS_PER_STRANGER,
        }
    }
}

/// Which limit turned a stream away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The node's, all peers together.
    Node,
    /// All strangers' together.
    Strangers,
    /// The peer's own.
    Peer,
}

impl Full {
    /// The limit's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Full::Node => "all peers' streams",
            Full::Strangers => "strangers' streams",
            Full::Peer => "the peer's streams",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    strangers: usize,
    per_peer: HashMap<PeerId, usize>,
}

/// The streams being served, by peer and standing. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    counts: Arc<Mutex<Counts>>,
}

/// A stream's place; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    counts: Arc<Mutex<Counts>>,
    peer: PeerId,
    stranger: bool,
}

impl Admission {
    /// A place for a stream `peer` opened, or the limit that turns it away.
    pub fn admit(&self, peer: PeerId, standing: Standing) -> Result<Ticket, Full> {
        let mut counts = lock(&self.counts);
        let stranger = standing == Standing::Stranger;
        if counts.total >= MAX_INBOUND_STREAMS {
            return Err(Full::Node);
        }
        if stranger && counts.strangers >= MAX_STRANGER_STREAMS {
            return Err(Full::Strangers);
        }
        let held = counts.per_peer.get(&peer).copied().unwrap_or(0);
        if held >= standing.per_peer() {
            return Err(Full::Peer);
        }
        counts.per_peer.insert(peer, held + 1);
        counts.total += 1;
        if stranger {
            counts.strangers += 1;
        }
        Ok(Ticket {
            counts: self.counts.clone(),
            peer,
            stranger,
        })
    }

    /// Streams being served, all peers together.
    pub fn len(&self) -> usize {
        lock(&self.counts).total
    }

    /// Whether no stream is being served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if self.stranger {
            counts.strangers = counts.strangers.saturating_sub(1);
        }
        if let Some(held) = counts.per_peer.get_mut(&self.peer) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters only: a panic elsewhere leaves nothing half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One token bucket for all strangers' messages together, a token per envelope.
#[derive(Debug)]
pub struct StrangerRate {
    bucket: Mutex<TokenBucket>,
    per_sec: u32,
    burst: u32,
}

impl StrangerRate {
    /// `per_sec` messages a second, `burst` at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let (per_sec, burst) = (per_sec.max(1), burst.max(1));
        Self {
            bucket: Mutex::new(TokenBucket::full(burst, 0)),
            per_sec,
            burst,
        }
    }

    /// Takes the tokens of a request of `envelopes` at `now_ms` (at most a burst's: a full
    /// bucket always admits one request); `Err` holds how long to wait for them.
    pub fn take(&self, envelopes: usize, now_ms: u64) -> Result<(), u64> {
        let cost = u64::try_from(envelopes).unwrap_or(u64::MAX);
        if lock(&self.bucket).try_take_n(cost, self.burst, self.per_sec, now_ms) {
            return Ok(());
        }
        Err(cost.clamp(1, u64::from(self.burst)) * 1_000 / u64::from(self.per_sec))
    }
}

impl Default for StrangerRate {
    fn default() -> Self {
        Self::new(STRANGER_REQUESTS_PER_SEC, STRANGER_REQUEST_BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_get_their_own_share_and_contacts_keep_theirs() {
        let admission = Admission::default();
        let mut held = Vec::new();
        // One stranger holds at most its own few streams.
        let stranger = PeerId::random();
        for _ in 0..MAX_STREAMS_PER_STRANGER {
            held.push(admission.admit(stranger, Standing::Stranger).expect("room"));
        }
        assert_eq!(
            admission.admit(stranger, Standing::Stranger).err(),
            Some(Full::Peer)
        );
        // Many strangers hold at most the strangers' share.
        while let Ok(ticket) = admission.admit(PeerId::random(), Standing::Stranger) {
            held.push(ticket);
        }
        assert_eq!(held.len(), MAX_STRANGER_STREAMS);
        assert_eq!(
            admission.admit(PeerId::random(), Standing::Stranger).err(),
            Some(Full::Strangers)
        );
        // A contact and a relay still get all of theirs.
        let contact = PeerId::random();
        for _ in 0..MAX_STREAMS_PER_CONTACT {
            held.push(admission.admit(contact, Standing::Contact).expect("room"));
        }
        assert_eq!(
            admission.admit(contact, Standing::Contact).err(),
            Some(Full::Peer)
        );
        let relay = PeerId::random();
        for _ in 0..MAX_STREAMS_PER_RELAY {
            held.push(admission.admit(relay, Standing::Relay).expect("room"));
        }
        // Streams given back make room again.
        let before = admission.len();
        held.truncate(1);
        assert_eq!(admission.len(), 1);
        assert!(before > 1);
        assert!(admission.admit(stranger, Standing::Stranger).is_ok());
    }

    #[test]
    fn the_node_wide_limit_holds_for_everyone() {
        let admission = Admission::default();
        let mut held = Vec::new();
        while let Ok(ticket) = admission.admit(PeerId::random(), Standing::Contact) {
            held.push(ticket);
        }
        assert_eq!(held.len(), MAX_INBOUND_STREAMS);
        assert_eq!(
            admission.admit(PeerId::random(), Standing::Relay).err(),
            Some(Full::Node)
        );
    }

    #[test]
    fn the_strangers_rate_lets_a_burst_through_then_asks_to_wait() {
        let rate = StrangerRate::new(10, 3);
        for _ in 0..3 {
            assert_eq!(rate.take(1, 1_000), Ok(()));
        }
        assert_eq!(rate.take(1, 1_000), Err(100), "one token in 100 ms at 10/s");
        assert_eq!(rate.take(1, 1_100), Ok(()));
        assert_eq!(rate.take(1, 1_100), Err(100));
        // Tokens do not pile up beyond the burst.
        for _ in 0..3 {
            assert_eq!(rate.take(1, 60_000), Ok(()));
        }
        assert!(rate.take(1, 60_000).is_err());
        // A batch costs a token per envelope: it waits for all of them.
        assert_eq!(rate.take(2, 60_100), Err(200));
        assert_eq!(rate.take(2, 60_200), Ok(()));
    }
}
