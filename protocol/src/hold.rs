//! Back-pressure that a sender obeys: waits a relay asked for, per relay and recipient.
//!
//! A relay that refuses a deposit and says when to come back (`retry_after_ms`: a full mailbox,
//! a rate limit, load) puts that (relay, recipient) pair on hold until then. While every relay of
//! a recipient is on hold, the recipient's outbox entries do not go out at all: they wait for
//! the earliest hold to end, instead of each retrying on its own backoff (with thousands of
//! messages queued that was hundreds of refused deposits a second). When a hold ends, one
//! attempt goes first as a probe; the others follow when it succeeds (or when the probe's time
//! is up), so a full mailbox costs its relay about one refusal per hold instead of one per
//! message. Other recipients, and the same recipient at relays that are not on hold, are not
//! held up.
//!
//! Time is an argument; the node keeps one [`Holds`] for its outbox.

use std::collections::HashMap;

use libp2p_identity::PeerId;

/// How long a probe may take before another entry may probe in its place.
pub const PROBE_TIMEOUT_MS: u64 = 30_000;

/// Longest wait a relay may ask for; a longer one is cut to this (a hostile or broken relay
/// must not park a conversation for days).
pub const MAX_HOLD_MS: u64 = 3_600_000;

/// Whether an outbox entry for a recipient may go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go: at least one of its relays is not on hold.
    Go,
    /// Go as the probe: every relay was on hold and one hold has ended.
    Probe,
    /// Wait until this time (a hold or the probe's end).
    WaitUntil(u64),
}

/// The holds of one sender's outbox.
#[derive(Debug, Default)]
pub struct Holds {
    /// `(relay, recipient)` → held until.
    holds: HashMap<(PeerId, PeerId), u64>,
    /// Recipient → the running probe's deadline.
    probes: HashMap<PeerId, u64>,
}

impl Holds {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// `relay` asked us to wait `retry_after_ms` before depositing for `recipient` again.
    pub fn hold(&mut self, relay: PeerId, recipient: PeerId, retry_after_ms: u64, now_ms: u64) {
        let until = now_ms.saturating_add(retry_after_ms.min(MAX_HOLD_MS));
        self.holds.insert((relay, recipient), until);
        self.probes.remove(&recipient);
    }

    /// `relay` stored a deposit for `recipient`: no hold there any more. Returns whether the
    /// recipient had been held back (its waiting entries may go now).
    pub fn stored(&mut self, relay: PeerId, recipient: PeerId) -> bool {
        let held = self.holds.remove(&(relay, recipient)).is_some();
        self.probes.remove(&recipient).is_some() || held
    }

    /// The recipient is reachable directly (it connected): none of its holds matter now.
    /// Returns whether it had any.
    pub fn release_recipient(&mut self, recipient: &PeerId) -> bool {
        let before = self.holds.len();
        self.holds.retain(|(_, r), _| r != recipient);
        self.probes.remove(recipient).is_some() || self.holds.len() != before
    }

    /// `relay` (re)connected: it may have restarted and forgotten why it refused. Returns the
    /// recipients that were held there.
    pub fn release_relay(&mut self, relay: &PeerId) -> Vec<PeerId> {
        let mut released = Vec::new();
        self.holds.retain(|(r, recipient), _| {
            if r == relay {
                released.push(*recipient);
                false
            } else {
                true
            }
        });
        for recipient in &released {
            self.probes.remove(recipient);
        }
        released
    }

    /// Until when deposits at `relay` for `recipient` wait, if they do (`None` once the hold
    /// has ended: a deposit there is the probe).
    pub fn held_until(&self, relay: &PeerId, recipient: &PeerId, now_ms: u64) -> Option<u64> {
        self.holds
            .get(&(*relay, *recipient))
            .copied()
            .filter(|&until| until > now_ms)
    }

    /// Whether an entry for `recipient`, whose deposits go to `relays`, may go out now. A
    /// [`Admit::Probe`] answer makes this entry the probe: others wait until
    /// [`Holds::probe_done`], a new hold, or [`PROBE_TIMEOUT_MS`].
    pub fn admit(&mut self, recipient: PeerId, relays: &[PeerId], now_ms: u64) -> Admit {
        let mut earliest: Option<u64> = None;
        for relay in relays {
            match self.holds.get(&(*relay, recipient)) {
                None => return Admit::Go,
                Some(&until) => earliest = Some(earliest.map_or(until, |e| e.min(until))),
            }
        }
        let Some(earliest) = earliest else {
            return Admit::Go;
        };
        if let Some(&deadline) = self.probes.get(&recipient) {
            if deadline > now_ms {
                return Admit::WaitUntil(deadline);
            }
        }
        if earliest > now_ms {
            return Admit::WaitUntil(earliest);
        }
        self.probes
            .insert(recipient, now_ms.saturating_add(PROBE_TIMEOUT_MS));
        Admit::Probe
    }

    /// A deposit for `recipient` is over, whatever its outcome (a refusal has set a new hold
    /// already). Returns whether it was a running probe and waiting entries may go now: a relay
    /// of the recipient is no longer on hold. Without a probe running there is nothing to
    /// release (entries that were never held keep their own schedule).
    pub fn probe_done(&mut self, recipient: &PeerId, relays: &[PeerId], now_ms: u64) -> bool {
        if self.probes.remove(recipient).is_none() {
            return false;
        }
        relays
            .iter()
            .any(|relay| self.held_until(relay, recipient, now_ms).is_none())
    }

    /// When the earliest hold of `recipient` at `relays` ends, if every one of them holds it
    /// (else `None`: it may go now).
    pub fn all_held_until(
        &self,
        recipient: &PeerId,
        relays: &[PeerId],
        now_ms: u64,
    ) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        for relay in relays {
            let until = self.held_until(relay, recipient, now_ms)?;
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
        }
        earliest
    }

    /// Drops holds that ended long ago (a probe would find out anyway), so the table stays
    /// bounded by the recipients recently refused.
    pub fn prune(&mut self, now_ms: u64) {
        self.holds
            .retain(|_, until| until.saturating_add(MAX_HOLD_MS) > now_ms);
        self.probes.retain(|_, deadline| *deadline > now_ms);
    }

    /// Pairs on hold (ended or not).
    pub fn len(&self) -> usize {
        self.holds.len()
    }

    /// Whether nothing is on hold.
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> (PeerId, PeerId, PeerId, PeerId) {
        (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        )
    }

    #[test]
    fn a_hold_at_every_relay_makes_entries_wait_then_one_probes() {
        let (r1, r2, bob, carol) = peers();
        let mut h = Holds::new();
        assert_eq!(h.admit(bob, &[r1, r2], 0), Admit::Go);
        h.hold(r1, bob, 1_000, 0);
        // r2 still takes deposits for bob.
        assert_eq!(h.admit(bob, &[r1, r2], 10), Admit::Go);
        assert_eq!(h.held_until(&r1, &bob, 10), Some(1_000));
        assert_eq!(h.held_until(&r2, &bob, 10), None);
        h.hold(r2, bob, 2_000, 0);
        assert_eq!(h.admit(bob, &[r1, r2], 10), Admit::WaitUntil(1_000));
        // Others are not held up.
        assert_eq!(h.admit(carol, &[r1, r2], 10), Admit::Go);
        // The first hold ends: one entry probes, the rest wait for it.
        assert_eq!(h.admit(bob, &[r1, r2], 1_000), Admit::Probe);
        assert_eq!(
            h.admit(bob, &[r1, r2], 1_001),
            Admit::WaitUntil(1_000 + PROBE_TIMEOUT_MS)
        );
        // The probe is refused again: a new hold, no probe running.
        h.hold(r1, bob, 5_000, 1_200);
        assert_eq!(h.all_held_until(&bob, &[r1, r2], 1_300), Some(2_000));
        assert_eq!(h.admit(bob, &[r1, r2], 1_300), Admit::WaitUntil(2_000));
        // At 2 000 r2's hold ends: probe; it is stored there.
        assert_eq!(h.admit(bob, &[r1, r2], 2_000), Admit::Probe);
        assert_eq!(h.all_held_until(&bob, &[r1, r2], 2_000), None);
        assert!(h.stored(r2, bob));
        // The store released the waiting entries; the probe's end has nothing more to release.
        assert!(!h.probe_done(&bob, &[r1, r2], 2_100));
        assert_eq!(h.admit(bob, &[r1, r2], 2_100), Admit::Go);
    }

    #[test]
    fn deposits_that_were_never_held_release_nothing() {
        let (r1, _, bob, _) = peers();
        let mut h = Holds::new();
        assert!(!h.probe_done(&bob, &[r1], 0));
        // A probe whose relay is free again (its hold ended and was pruned) releases the rest.
        h.hold(r1, bob, 100, 0);
        assert_eq!(h.admit(bob, &[r1], 100), Admit::Probe);
        h.release_relay(&r1);
        h.hold(r1, bob, 0, 0);
        assert_eq!(h.admit(bob, &[r1], 200), Admit::Probe);
        assert!(h.probe_done(&bob, &[r1], 200));
    }

    #[test]
    fn a_lost_probe_lets_another_entry_probe_after_its_timeout() {
        let (r1, _, bob, _) = peers();
        let mut h = Holds::new();
        h.hold(r1, bob, 100, 0);
        assert_eq!(h.admit(bob, &[r1], 100), Admit::Probe);
        assert_eq!(
            h.admit(bob, &[r1], 100 + PROBE_TIMEOUT_MS - 1),
            Admit::WaitUntil(100 + PROBE_TIMEOUT_MS)
        );
        assert_eq!(h.admit(bob, &[r1], 100 + PROBE_TIMEOUT_MS), Admit::Probe);
    }

    #[test]
    fn reconnections_release_holds() {
        let (r1, r2, bob, carol) = peers();
        let mut h = Holds::new();
        h.hold(r1, bob, 10_000, 0);
        h.hold(r1, carol, 10_000, 0);
        h.hold(r2, carol, 10_000, 0);
        let mut released = h.release_relay(&r1);
        released.sort();
        let mut expected = vec![bob, carol];
        expected.sort();
        assert_eq!(released, expected);
        assert_eq!(h.admit(bob, &[r1], 1), Admit::Go);
        assert_eq!(h.admit(carol, &[r2], 1), Admit::WaitUntil(10_000));
        assert!(h.release_recipient(&carol));
        assert_eq!(h.admit(carol, &[r2], 1), Admit::Go);
        assert!(h.is_empty());
    }

    #[test]
    fn waits_are_capped_and_old_holds_pruned() {
        let (r1, _, bob, _) = peers();
        let mut h = Holds::new();
        h.hold(r1, bob, u64::MAX, 5);
        assert_eq!(h.held_until(&r1, &bob, 5), Some(5 + MAX_HOLD_MS));
        h.prune(5 + 2 * MAX_HOLD_MS);
        assert!(h.is_empty());
    }

    #[test]
    fn a_recipient_without_relays_is_never_held() {
        let (_, _, bob, _) = peers();
        assert_eq!(Holds::new().admit(bob, &[], 0), Admit::Go);
    }
}
