//! Pushes of newly stored envelopes to connected recipients, with a bound per recipient.
//!
//! Each push is a `/kith/dm/1` request: one yamux stream on the recipient's connection. A
//! yamux connection refuses to open more than 512 streams, and a node that receives a stream
//! beyond its own 512 closes the whole connection (with every request and relayed circuit on
//! it). A burst of deposits for one recipient (a sender's queue after the recipient restarted,
//! a busy group) must therefore not become a burst of streams to it.
//!
//! A recipient has at most [`Pushes::per_recipient`] pushes in flight. The envelopes stored
//! meanwhile are *held back*: the mailbox keeps them (as it keeps every entry until the
//! recipient accepts it), and once the recipient's pushes in flight are answered, the oldest
//! held-back ones are read from the mailbox and pushed in their turn
//! ([`crate::mailbox::service::Handle::try_waiting`]). Nothing is lost either way: an entry not
//! pushed waits for the recipient's own fetch.

use std::collections::HashMap;
use std::hash::Hash;

use libp2p::request_response::OutboundRequestId;
use libp2p::PeerId;

/// What to do with a new push.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Send it now.
    Send,
    /// Held back by a bound.
    HeldBack(Bound),
}

/// The bound that held a push back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The recipient has its most pushes in flight (`max_pushes_per_recipient`).
    Recipient,
    /// The relay has its most pushes in flight (`max_pending_pushes`).
    Relay,
}

impl Bound {
    /// The bound's name in `kith_relay_limit_hits_total{limit}`.
    pub fn limit(self) -> &'static str {
        match self {
            Bound::Recipient => "pushes_per_recipient",
            Bound::Relay => "pending_pushes",
        }
    }
}

/// A push was answered: the mailbox entry it was for, and where the held-back ones start if
/// it is time to push them.
#[derive(Debug, PartialEq, Eq)]
pub struct Answered {
    /// The recipient.
    pub owner: PeerId,
    /// The entry's sequence number.
    pub seq: u64,
    /// The first held-back sequence number of `owner`, once none of its pushes is in flight.
    pub resume_from: Option<u64>,
}

/// A recipient's pushes.
#[derive(Debug, Default)]
struct Recipient {
    in_flight: usize,
    /// The lowest sequence number held back, if any was.
    held_from: Option<u64>,
}

impl Recipient {
    fn hold(&mut self, seq: u64) {
        self.held_from = Some(self.held_from.map_or(seq, |from| from.min(seq)));
    }
}

/// The pushes in flight, by request (`R`, the swarm's request id) and by recipient.
#[derive(Debug)]
pub struct Pushes<R = OutboundRequestId> {
    per_recipient: usize,
    total: usize,
    requests: HashMap<R, (PeerId, u64)>,
    recipients: HashMap<PeerId, Recipient>,
}

impl<R: Hash + Eq> Pushes<R> {
    /// At most `per_recipient` pushes in flight to one recipient, and `total` to all.
    pub fn new(per_recipient: usize, total: usize) -> Self {
        Self {
            per_recipient: per_recipient.max(1),
            total: total.max(1),
            requests: HashMap::new(),
            recipients: HashMap::new(),
        }
    }

    /// Most pushes in flight to one recipient.
    pub fn per_recipient(&self) -> usize {
        self.per_recipient
    }

    /// Whether entry `seq` of `owner` may be pushed now; if not, it is held back.
    pub fn admit(&mut self, owner: PeerId, seq: u64) -> Admit {
        let full = self.requests.len() >= self.total;
        let recipient = self.recipients.entry(owner).or_default();
        let bound = if recipient.in_flight >= self.per_recipient {
            Bound::Recipient
        } else if full {
            Bound::Relay
        } else {
            return Admit::Send;
        };
        recipient.hold(seq);
        Admit::HeldBack(bound)
    }

    /// A push admitted by [`Pushes::admit`] is on its way as `request`.
    pub fn sent(&mut self, request: R, owner: PeerId, seq: u64) {
        self.requests.insert(request, (owner, seq));
        self.recipients.entry(owner).or_default().in_flight += 1;
    }

    /// `request` was answered or failed; `None` if it was not a push.
    pub fn answered(&mut self, request: &R) -> Option<Answered> {
        let (owner, seq) = self.requests.remove(request)?;
        let mut resume_from = None;
        if let Some(recipient) = self.recipients.get_mut(&owner) {
            recipient.in_flight = recipient.in_flight.saturating_sub(1);
            if recipient.in_flight == 0 {
                resume_from = recipient.held_from.take();
                self.recipients.remove(&owner);
            }
        }
        Some(Answered {
            owner,
            seq,
            resume_from,
        })
    }

    /// Pushes of `owner` resumed from the mailbox stopped before its newest entries: they
    /// are held back from `seq` on.
    pub fn hold_from(&mut self, owner: PeerId, seq: u64) {
        self.recipients.entry(owner).or_default().hold(seq);
    }

    /// `owner` has no connection left: what it did not get, it fetches when it is back.
    pub fn disconnected(&mut self, owner: &PeerId) {
        if let Some(recipient) = self.recipients.get_mut(owner) {
            recipient.held_from = None;
            if recipient.in_flight == 0 {
                self.recipients.remove(owner);
            }
        }
    }

    /// Pushes in flight to all recipients.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether no push is in flight.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_gets_at_most_its_share_and_resumes_from_the_first_held_back() {
        let ids = [10, 11, 12, 13];
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let mut pushes: Pushes<u32> = Pushes::new(2, 100);
        for (seq, id) in [(1, ids[0]), (2, ids[1])] {
            assert_eq!(pushes.admit(bob, seq), Admit::Send);
            pushes.sent(id, bob, seq);
        }
        assert_eq!(pushes.admit(bob, 3), Admit::HeldBack(Bound::Recipient));
        assert_eq!(pushes.admit(bob, 4), Admit::HeldBack(Bound::Recipient));
        // Another recipient is not held back by bob's.
        assert_eq!(pushes.admit(carol, 1), Admit::Send);
        pushes.sent(ids[2], carol, 1);

        let first = pushes.answered(&ids[0]).expect("a push");
        assert_eq!((first.owner, first.seq, first.resume_from), (bob, 1, None));
        let last = pushes.answered(&ids[1]).expect("a push");
        assert_eq!(last.resume_from, Some(3), "resumes at the first held back");
        assert_eq!(pushes.answered(&ids[1]), None, "answered once");
        assert_eq!(pushes.answered(&ids[3]), None, "not a push");
        assert_eq!(pushes.len(), 1);
    }

    #[test]
    fn the_relay_wide_bound_holds_back_too_and_a_disconnection_forgets_what_was_held() {
        let ids = [20, 21];
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let mut pushes: Pushes<u32> = Pushes::new(8, 1);
        assert_eq!(pushes.admit(bob, 1), Admit::Send);
        pushes.sent(ids[0], bob, 1);
        assert_eq!(pushes.admit(carol, 7), Admit::HeldBack(Bound::Relay));
        pushes.disconnected(&carol);
        pushes.hold_from(bob, 5);
        pushes.hold_from(bob, 9);
        let answered = pushes.answered(&ids[0]).expect("a push");
        assert_eq!(answered.resume_from, Some(5), "the lowest held back");
        assert!(pushes.is_empty());
        assert!(pushes.recipients.is_empty(), "carol's hold was forgotten");
    }
}
