//! The outbox's scheduling, as a state machine in the style of quinn-proto: time is an argument,
//! and nothing here sleeps, spawns, sends or writes. The store holds the durable copy of every
//! entry; this holds when each is due, which are in flight, and the request slots.
//!
//! The driver (`Node::outbox_loop`) turns the crank:
//! 1. [`Outbox::poll_due`] hands over the entries due at `now` (each is then in flight);
//! 2. the driver gives up those past their deadline, puts back those a relay asked to wait
//!    ([`Outbox::wait`]), and [`Outbox::queue`]s the rest;
//! 3. [`Outbox::poll_transmit`] hands over requests to start, each holding a request slot (and
//!    for a peer, one of its per-peer slots): a peer's queued entries leave together, up to
//!    [`Limits::max_batch`] per request;
//! 4. an attempt frees its slots ([`Outbox::peer_done`], [`Outbox::request_done`]) and settles its
//!    entries: [`Outbox::settled`] or [`Outbox::retry`] (the retry schedule: backoff with jitter,
//!    no later than the entry's deadline);
//! 5. the driver sleeps until [`Outbox::poll_timeout`] or until something wakes it.
//!
//! Order: entries due together leave in the order they first came in (kept across retries),
//! which is the order their recipient's ratchet expects.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use kith_protocol::retry::Backoff;
use kith_protocol::{dm, Destination, MessageId};
use libp2p::PeerId;

use crate::core::store::OutboxEntry;

/// The outbox's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests in flight at once, all peers and groups together.
    pub max_in_flight: usize,
    /// Requests in flight at once to one peer.
    pub max_in_flight_per_peer: usize,
    /// Most entries in one request to a peer.
    pub max_batch: usize,
    /// Most entries taken from the schedule and waiting for a slot.
    pub max_queued: usize,
    /// The retry schedule.
    pub backoff: Backoff,
}

/// A request to start.
#[derive(Debug, PartialEq)]
pub enum Transmit {
    /// Entries for one peer, in one `/kith/dm/1` request; it holds one of the peer's slots.
    Peer {
        /// The recipient.
        to: PeerId,
        /// What the request carries, in order.
        entries: Vec<OutboxEntry>,
    },
    /// One post to a group's relay.
    Group(OutboxEntry),
}

/// The outbox schedule.
pub struct Outbox {
    limits: Limits,
    entries: HashMap<MessageId, OutboxEntry>,
    /// By due time, then by the order entries first came in.
    due: BTreeSet<(u64, u64, MessageId)>,
    /// Each entry's place in that order, kept across its retries.
    order: HashMap<MessageId, u64>,
    next_order: u64,
    /// Handed out by `poll_due` and not settled yet.
    in_flight: HashSet<MessageId>,
    /// Taken from the schedule and waiting for a slot, per peer.
    queued: HashMap<PeerId, VecDeque<OutboxEntry>>,
    queued_groups: VecDeque<OutboxEntry>,
    queued_len: usize,
    /// Requests in flight per peer.
    busy: HashMap<PeerId, usize>,
    /// Requests in flight in all.
    requests: usize,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            due: BTreeSet::new(),
            order: HashMap::new(),
            next_order: 0,
            in_flight: HashSet::new(),
            queued: HashMap::new(),
            queued_groups: VecDeque::new(),
            queued_len: 0,
            busy: HashMap::new(),
            requests: 0,
        }
    }

    fn order_of(&mut self, id: MessageId) -> u64 {
        let next = &mut self.next_order;
        *self.order.entry(id).or_insert_with(|| {
            *next += 1;
            *next
        })
    }

    /// Puts an entry (already durable) on the schedule, due at its `due_ms`; an entry with the
    /// same id is replaced, keeping its place in the order.
    pub fn insert(&mut self, entry: OutboxEntry) {
        let id = entry.envelope.id;
        let order = self.order_of(id);
        if let Some(old) = self.entries.get(&id) {
            self.due.remove(&(old.due_ms, order, id));
        }
        self.due.insert((entry.due_ms, order, id));
        self.entries.insert(id, entry);
    }

    /// Forgets an entry (it left, failed, or was deleted).
    pub fn remove(&mut self, id: &MessageId) {
        let order = self.order.remove(id);
        if let (Some(old), Some(order)) = (self.entries.remove(id), order) {
            self.due.remove(&(old.due_ms, order, *id));
        }
        self.in_flight.remove(id);
    }

    /// The entry with this id, if it is in the outbox.
    pub fn get(&self, id: &MessageId) -> Option<&OutboxEntry> {
        self.entries.get(id)
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.entries.values()
    }

    /// How many entries the outbox holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries due at `now`, in order, each now in flight: as many as the queue has room
    /// for, and at least one.
    pub fn poll_due(&mut self, now: u64) -> Vec<OutboxEntry> {
        let room = self
            .limits
            .max_queued
            .saturating_sub(self.queued_len)
            .max(1);
        let mut ready = Vec::new();
        while let Some(&(due_ms, _, id)) = self.due.first() {
            if due_ms > now || ready.len() >= room {
                break;
            }
            self.due.pop_first();
            if self.in_flight.insert(id) {
                if let Some(entry) = self.entries.get(&id) {
                    ready.push(entry.clone());
                }
            }
        }
        ready
    }

    /// An entry handed out by `poll_due` must wait until `until` (a relay asked): it goes back on
    /// the schedule, not in flight, unless it left the outbox meanwhile.
    pub fn wait(&mut self, entry: &OutboxEntry, until: u64) {
        self.in_flight.remove(&entry.envelope.id);
        if self.entries.contains_key(&entry.envelope.id) {
            let mut waiting = entry.clone();
            waiting.due_ms = until;
            self.insert(waiting);
        }
    }

    /// Queues an entry handed out by `poll_due` for the next free slot.
    pub fn queue(&mut self, entry: OutboxEntry) {
        match entry.envelope.to {
            Destination::Peer(peer) => self.queued.entry(peer).or_default().push_back(entry),
            Destination::Group(_) => self.queued_groups.push_back(entry),
        }
        self.queued_len += 1;
    }

    /// The next request to start, if a slot is free for something queued; the request holds a
    /// slot until [`Outbox::request_done`] (and for a peer, [`Outbox::peer_done`]).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.requests >= self.limits.max_in_flight.max(1) {
            return None;
        }
        if let Some(entry) = self.queued_groups.pop_front() {
            self.queued_len -= 1;
            self.requests += 1;
            return Some(Transmit::Group(entry));
        }
        let per_peer = self.limits.max_in_flight_per_peer.max(1);
        let max_batch = self.limits.max_batch.max(1);
        let busy = &self.busy;
        // The peer whose queue has waited longest (by its first entry's order) goes first.
        let order = &self.order;
        let to = self
            .queued
            .iter()
            .filter(|(peer, queue)| {
                !queue.is_empty() && busy.get(*peer).copied().unwrap_or(0) < per_peer
            })
            .min_by_key(|(_, queue)| {
                queue
                    .front()
                    .and_then(|e| order.get(&e.envelope.id).copied())
                    .unwrap_or(u64::MAX)
            })
            .map(|(peer, _)| *peer)?;
        let queue = self.queued.get_mut(&to)?;
        let entries = take_batch(queue, max_batch);
        if queue.is_empty() {
            self.queued.remove(&to);
        }
        self.queued_len -= entries.len();
        *self.busy.entry(to).or_default() += 1;
        self.requests += 1;
        Some(Transmit::Peer { to, entries })
    }

    /// A request to `to` got its answer (or gave up): the peer's slot is free.
    pub fn peer_done(&mut self, to: &PeerId) {
        if let Some(slots) = self.busy.get_mut(to) {
            *slots = slots.saturating_sub(1);
            if *slots == 0 {
                self.busy.remove(to);
            }
        }
    }

    /// An attempt is over: its request slot is free.
    pub fn request_done(&mut self) {
        self.requests = self.requests.saturating_sub(1);
    }

    /// For a new entry when nothing is due, in flight or queued: it is put in flight at once with
    /// a request slot and one of its peer's, so that a lone message leaves without waiting for
    /// the driver. `false` (nothing changed) when the outbox is busy.
    pub fn claim_idle(&mut self, now: u64, entry: &OutboxEntry) -> bool {
        let Destination::Peer(to) = entry.envelope.to else {
            return false;
        };
        let idle = self.in_flight.is_empty()
            && self.queued_len == 0
            && self.requests < self.limits.max_in_flight.max(1)
            && self.due.first().is_none_or(|&(due_ms, _, _)| due_ms > now);
        if !idle {
            return false;
        }
        let id = entry.envelope.id;
        self.insert(entry.clone());
        let order = self.order_of(id);
        self.due.remove(&(entry.due_ms, order, id));
        self.in_flight.insert(id);
        *self.busy.entry(to).or_default() += 1;
        self.requests += 1;
        true
    }

    /// An entry's attempt ended for good (delivered, stored by a relay, or failed): it leaves.
    pub fn settled(&mut self, id: &MessageId) {
        self.remove(id);
    }

    /// An entry's attempt must be tried again: its next try, `attempts` one more, due after the
    /// backoff for the attempts so far (`jitter` in 0..1 picks within it) and no later than
    /// `deadline_ms`. The caller writes it to the store.
    pub fn retry(
        &mut self,
        entry: &OutboxEntry,
        now: u64,
        jitter: f64,
        deadline_ms: u64,
    ) -> OutboxEntry {
        let delay = self.limits.backoff.delay_ms(entry.attempts, jitter);
        let next = OutboxEntry {
            attempts: entry.attempts + 1,
            due_ms: now.saturating_add(delay).min(deadline_ms),
            ..entry.clone()
        };
        self.in_flight.remove(&entry.envelope.id);
        self.insert(next.clone());
        next
    }

    /// Whether the outbox now holds another copy of `entry` (a re-send on a new session took its
    /// place while the attempt ran): the copy stays, due; the attempt is no longer in flight.
    pub fn take_replaced(&mut self, entry: &OutboxEntry) -> bool {
        let id = entry.envelope.id;
        let Some(current) = self
            .entries
            .get(&id)
            .filter(|current| current.envelope != entry.envelope)
            .cloned()
        else {
            return false;
        };
        self.in_flight.remove(&id);
        // The copy may have come while this attempt was in flight: `poll_due` then passed over
        // it, so it goes back on the schedule here.
        self.insert(current);
        true
    }

    /// The copy of `unsealed` becomes `sealed` (same id; the due time and attempts of the copy
    /// in the outbox), unless another copy took its place meanwhile.
    pub fn seal_in_place(&mut self, unsealed: &OutboxEntry, sealed: &OutboxEntry) {
        let id = sealed.envelope.id;
        let Some(current) = self.entries.get(&id) else {
            return;
        };
        if current.envelope != unsealed.envelope {
            return;
        }
        let entry = OutboxEntry {
            due_ms: current.due_ms,
            attempts: current.attempts,
            ..sealed.clone()
        };
        self.insert(entry);
    }

    /// Makes every entry that `pred` picks, not in flight and due after `now`, due now; returns
    /// how many.
    pub fn hurry_where(&mut self, now: u64, pred: impl Fn(&OutboxEntry) -> bool) -> usize {
        self.move_where(now, |due| due > now, pred)
    }

    /// Makes every entry addressed to `peer` due now (it is reachable again).
    pub fn hurry(&mut self, peer: &PeerId, now: u64) -> usize {
        self.hurry_where(now, |e| e.envelope.to == Destination::Peer(*peer))
    }

    /// Moves every entry that `pred` picks, not in flight and due later than `until`, to `until`.
    pub fn defer_where(&mut self, until: u64, pred: impl Fn(&OutboxEntry) -> bool) -> usize {
        self.move_where(until, |due| due > until, pred)
    }

    fn move_where(
        &mut self,
        to: u64,
        when: impl Fn(u64) -> bool,
        pred: impl Fn(&OutboxEntry) -> bool,
    ) -> usize {
        let ids: Vec<MessageId> = self
            .entries
            .values()
            .filter(|e| when(e.due_ms) && !self.in_flight.contains(&e.envelope.id) && pred(e))
            .map(|e| e.envelope.id)
            .collect();
        for id in &ids {
            if let Some(mut entry) = self.entries.get(id).cloned() {
                entry.due_ms = to;
                self.insert(entry);
            }
        }
        ids.len()
    }

    /// When the driver must next look (unix ms): the earliest due entry not in flight.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.due.first().map(|&(due_ms, _, _)| due_ms)
    }
}

/// Takes from the front of `queue` as many entries as one `/kith/dm/1` request may carry.
fn take_batch(queue: &mut VecDeque<OutboxEntry>, max_batch: usize) -> Vec<OutboxEntry> {
    let mut batch = Vec::new();
    let mut more_bytes = 0;
    while let Some(next) = queue.front() {
        if batch.len() >= max_batch {
            break;
        }
        let size = next.envelope.size_bound();
        if !dm::Request::fits(batch.len(), more_bytes, size) {
            break;
        }
        if !batch.is_empty() {
            more_bytes += size;
        }
        batch.extend(queue.pop_front());
    }
    batch
}

#[cfg(test)]
mod tests {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Envelope, GroupId};
    use libp2p::identity::Keypair;

    use super::*;
    use crate::core::store::EntryKind;

    fn limits() -> Limits {
        Limits {
            max_in_flight: 4,
            max_in_flight_per_peer: 2,
            max_batch: 8,
            max_queued: 64,
            backoff: Backoff {
                base_ms: 500,
                max_ms: 60_000,
            },
        }
    }

    fn entry_to(to: Destination, due_ms: u64) -> OutboxEntry {
        let key = Keypair::generate_ed25519();
        let header = Header {
            id: MessageId::random(),
            to,
            sent_at_ms: 1_000,
            lamport: 1,
            expires_at_ms: None,
        };
        let body = Body::Chat {
            text: "hello".into(),
        };
        let envelope = Envelope::seal(&key, header, &body).expect("seal");
        OutboxEntry::new(envelope, EntryKind::Message, false, due_ms)
    }

    fn entry(to: PeerId, due_ms: u64) -> OutboxEntry {
        entry_to(Destination::Peer(to), due_ms)
    }

    fn ids(entries: &[OutboxEntry]) -> Vec<MessageId> {
        entries.iter().map(|e| e.envelope.id).collect()
    }

    /// Polls due entries and queues them all, then takes every request a slot is free for.
    fn crank(outbox: &mut Outbox, now: u64) -> Vec<Transmit> {
        for e in outbox.poll_due(now) {
            outbox.queue(e);
        }
        std::iter::from_fn(|| outbox.poll_transmit()).collect()
    }

    #[test]
    fn entries_leave_when_due_in_the_order_they_came() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let first = entry(peer, 100);
        let second = entry(peer, 100);
        let later = entry(peer, 200);
        outbox.insert(first.clone());
        outbox.insert(second.clone());
        outbox.insert(later.clone());
        assert!(outbox.poll_due(99).is_empty());
        assert_eq!(outbox.poll_timeout(), Some(100));
        assert_eq!(ids(&outbox.poll_due(150)), ids(&[first, second]));
        // In flight: not handed out again, and the next wake is for the later one.
        assert!(outbox.poll_due(150).is_empty());
        assert_eq!(outbox.poll_timeout(), Some(200));
        assert_eq!(ids(&outbox.poll_due(200)), ids(&[later]));
        assert_eq!(outbox.poll_timeout(), None);
    }

    #[test]
    fn a_peers_queue_leaves_in_batches_within_its_slots() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let all: Vec<OutboxEntry> = (0..20).map(|_| entry(peer, 0)).collect();
        for e in &all {
            outbox.insert(e.clone());
        }
        let sent = crank(&mut outbox, 0);
        // Two slots for this peer: two requests of 8, in order; 4 wait for a slot.
        assert_eq!(sent.len(), 2);
        let batches: Vec<Vec<MessageId>> = sent
            .into_iter()
            .map(|t| match t {
                Transmit::Peer { to, entries } => {
                    assert_eq!(to, peer);
                    ids(&entries)
                }
                Transmit::Group(_) => panic!("a peer's entry went to a group"),
            })
            .collect();
        assert_eq!(batches[0], ids(&all[0..8]));
        assert_eq!(batches[1], ids(&all[8..16]));
        assert!(outbox.poll_transmit().is_none());
        // One answer frees one peer slot (and its attempt a request slot): the rest go.
        outbox.peer_done(&peer);
        outbox.request_done();
        match outbox.poll_transmit() {
            Some(Transmit::Peer { entries, .. }) => assert_eq!(ids(&entries), ids(&all[16..])),
            other => panic!("expected the last batch, got {other:?}"),
        }
    }

    #[test]
    fn request_slots_bound_all_peers_together() {
        let mut outbox = Outbox::new(limits());
        let peers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        for p in &peers {
            outbox.insert(entry(*p, 0));
        }
        let group = entry_to(Destination::Group(GroupId::random()), 0);
        outbox.insert(group.clone());
        let sent = crank(&mut outbox, 0);
        assert_eq!(sent.len(), 4, "max_in_flight is 4");
        assert!(
            sent.contains(&Transmit::Group(group)),
            "a group post takes a slot first"
        );
        outbox.request_done();
        assert!(outbox.poll_transmit().is_some(), "a freed slot is used");
        assert!(outbox.poll_transmit().is_none());
    }

    #[test]
    fn retries_back_off_with_growing_delays_up_to_the_deadline() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let mut current = entry(peer, 0);
        outbox.insert(current.clone());
        let mut delays = Vec::new();
        let mut now = 10_000;
        for _ in 0..10 {
            let due = outbox.poll_due(now);
            assert_eq!(ids(&due), ids(&[current.clone()]));
            let next = outbox.retry(&due[0], now, 1.0, u64::MAX);
            assert_eq!(next.attempts, current.attempts + 1);
            delays.push(next.due_ms - now);
            assert_eq!(outbox.poll_timeout(), Some(next.due_ms));
            now = next.due_ms;
            current = next;
        }
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays.first(), Some(&500));
        assert_eq!(delays.last(), Some(&60_000), "capped at max_ms");
        // Near the deadline the retry is due at the deadline, not after it.
        let due = outbox.poll_due(now);
        let next = outbox.retry(&due[0], now, 1.0, now + 10);
        assert_eq!(next.due_ms, now + 10);
    }

    #[test]
    fn an_entry_keeps_its_place_in_the_order_across_retries() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let first = entry(peer, 0);
        let second = entry(peer, 0);
        outbox.insert(first.clone());
        outbox.insert(second.clone());
        let due = outbox.poll_due(0);
        for e in &due {
            outbox.retry(e, 0, 0.0, u64::MAX);
        }
        // Both due at the same time again: the first still comes first.
        assert_eq!(outbox.poll_timeout(), Some(250));
        assert_eq!(ids(&outbox.poll_due(1_000)), ids(&[first, second]));
    }

    #[test]
    fn reconnecting_hurries_what_waits_for_the_peer_but_not_what_is_in_flight() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let other = PeerId::random();
        let flying = entry(peer, 0);
        outbox.insert(flying.clone());
        assert_eq!(outbox.poll_due(0).len(), 1);
        let waiting = entry(peer, 50_000);
        let elsewhere = entry(other, 50_000);
        outbox.insert(waiting.clone());
        outbox.insert(elsewhere.clone());
        assert_eq!(outbox.hurry(&peer, 1_000), 1);
        assert_eq!(ids(&outbox.poll_due(1_000)), ids(&[waiting]));
        assert_eq!(outbox.poll_timeout(), Some(50_000));
        // Deferring moves only what is due later than the new time.
        assert_eq!(outbox.defer_where(20_000, |_| true), 1);
        assert_eq!(outbox.poll_timeout(), Some(20_000));
    }

    #[test]
    fn a_held_entry_waits_and_comes_back() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let e = entry(peer, 0);
        outbox.insert(e.clone());
        let due = outbox.poll_due(0);
        outbox.wait(&due[0], 5_000);
        assert_eq!(outbox.poll_timeout(), Some(5_000));
        assert!(outbox.poll_due(4_999).is_empty());
        assert_eq!(ids(&outbox.poll_due(5_000)), ids(&[e]));
        // An entry that left meanwhile is not put back.
        let gone = entry(peer, 0);
        outbox.insert(gone.clone());
        let due = outbox.poll_due(6_000);
        outbox.settled(&gone.envelope.id);
        outbox.wait(&due[0], 9_000);
        assert!(outbox.get(&gone.envelope.id).is_none());
    }

    #[test]
    fn a_lone_message_claims_a_slot_only_when_the_outbox_is_idle() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let lone = entry(peer, 0);
        assert!(outbox.claim_idle(0, &lone));
        assert_eq!(outbox.len(), 1);
        assert!(outbox.poll_due(0).is_empty(), "it is in flight already");
        // Now something is in flight: the next one goes through the schedule.
        let next = entry(peer, 0);
        assert!(!outbox.claim_idle(0, &next));
        assert!(outbox.get(&next.envelope.id).is_none(), "nothing changed");
        outbox.peer_done(&peer);
        outbox.request_done();
        outbox.settled(&lone.envelope.id);
        assert!(outbox.is_empty());
        // Something due now also makes it busy.
        outbox.insert(entry(peer, 0));
        assert!(!outbox.claim_idle(0, &next));
    }

    #[test]
    fn a_resend_replaces_the_copy_in_flight() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let unsealed = entry(peer, 0);
        outbox.insert(unsealed.clone());
        let flying = outbox.poll_due(0);
        let mut sealed = entry(peer, 0);
        sealed.envelope.id = unsealed.envelope.id;
        outbox.seal_in_place(&unsealed, &sealed);
        assert_eq!(
            outbox.get(&unsealed.envelope.id).map(|e| &e.envelope),
            Some(&sealed.envelope)
        );
        // The attempt that carried the unsealed copy finds it replaced; the new copy stays.
        assert!(outbox.take_replaced(&flying[0]));
        assert!(!outbox.take_replaced(&sealed));
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn a_copy_that_comes_while_the_first_is_in_flight_leaves_after_it() {
        let mut outbox = Outbox::new(limits());
        let peer = PeerId::random();
        let first = entry(peer, 0);
        outbox.insert(first.clone());
        let flying = outbox.poll_due(0);
        // A re-send of the same message (another envelope, same id) is queued meanwhile...
        let mut again = entry(peer, 0);
        again.envelope.id = first.envelope.id;
        outbox.insert(again.clone());
        assert!(
            outbox.poll_due(0).is_empty(),
            "one copy in flight at a time"
        );
        // ...and goes once the first attempt ends.
        assert!(outbox.take_replaced(&flying[0]));
        assert_eq!(
            outbox.poll_due(0).first().map(|e| &e.envelope),
            Some(&again.envelope)
        );
    }
}
