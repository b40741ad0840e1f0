//! The outbox's side of back-pressure ([`kith_protocol::hold`]): waits that relays ask for, kept
//! per relay and recipient, and hurrying what waits on a peer or relay once it is back.
//!
//! - A deposit refused with `retry_after_ms` puts that (relay, recipient) pair on hold; later
//!   deposits for the recipient skip that relay until then.
//! - An outbox entry whose recipient is on hold at every one of its relays does not go out: it
//!   waits, without any attempt (no dial, no deposit), for the earliest hold to end; then one
//!   entry probes, and the others follow as soon as a relay stores (or the recipient connects).
//! - A connection to a peer or relay makes the entries waiting on it due now (a relay restart
//!   no longer costs the rest of a backoff), and drops the holds it made moot.

use kith_protocol::hold::Admit;
use kith_protocol::{Destination, Envelope};
use libp2p::PeerId;

use super::Node;
use crate::clock::now_ms;
use crate::core::store::OutboxEntry;
use crate::net::peer_of;

impl Node {
    /// Failed attempts so far of outbox entry `id`, or `None` when it is not in the outbox (it
    /// left, or never was there).
    pub fn outbox_attempts(&self, id: &str) -> Option<u32> {
        let id: kith_protocol::MessageId = id.parse().ok()?;
        self.outbox().get(&id).map(|e| e.attempts)
    }

    /// The relays (by peer id) that deposits for `to` go to.
    fn deposit_relays(&self, to: PeerId) -> Vec<PeerId> {
        self.route(to).relays.iter().filter_map(peer_of).collect()
    }

    /// Until when `entry`, due now, must wait for a hold instead of going out, if it must (the
    /// outbox puts it back for the hold's end; nothing is written: after a restart it simply
    /// probes once).
    pub(super) fn held_until(&self, entry: &OutboxEntry, now: u64) -> Option<u64> {
        let Destination::Peer(to) = entry.envelope.to else {
            return None;
        };
        let relays = self.deposit_relays(to);
        let admit = self.holds().admit(to, &relays, now);
        let Admit::WaitUntil(until) = admit else {
            if admit == Admit::Probe {
                tracing::debug!(%to, id = %entry.envelope.id, "probing a relay that asked us to wait");
            }
            return None;
        };
        Some(until)
    }

    /// Until when deposits of `envelope` at `relay` must wait, if they must.
    pub(super) fn held_at(&self, relay: PeerId, envelope: &Envelope) -> Option<u64> {
        let Destination::Peer(to) = envelope.to else {
            return None;
        };
        self.holds().held_until(&relay, &to, now_ms())
    }

    /// `relay` stored `envelope`: its recipient is no longer held there.
    pub(super) fn deposit_stored(&self, relay: PeerId, envelope: &Envelope) {
        if let Destination::Peer(to) = envelope.to {
            if self.holds().stored(relay, to) {
                self.hurry_where(|e| e.envelope.to == Destination::Peer(to));
            }
        }
    }

    /// `relay` refused `envelope` and asked us to wait `retry_after_ms`.
    pub(super) fn deposit_refused(&self, relay: PeerId, envelope: &Envelope, retry_after_ms: u64) {
        if let Destination::Peer(to) = envelope.to {
            tracing::debug!(%relay, %to, retry_after_ms, "relay asked us to wait");
            self.holds().hold(relay, to, retry_after_ms, now_ms());
        }
    }

    /// The deposits of `envelope` are over: if it was the probe and a relay of its recipient is
    /// free now, the recipient's waiting entries go.
    pub(super) fn deposits_done(&self, envelope: &Envelope) {
        let Destination::Peer(to) = envelope.to else {
            return;
        };
        let relays = self.deposit_relays(to);
        let now = now_ms();
        let (free, until) = {
            let mut holds = self.holds();
            holds.prune(now);
            let free = holds.probe_done(&to, &relays, now);
            (free, holds.all_held_until(&to, &relays, now))
        };
        if free {
            self.hurry_where(|e| e.envelope.to == Destination::Peer(to));
        } else if let Some(until) = until {
            // Refused again: the entries that waited for this probe wait for the new hold's
            // end, where one of them probes next.
            self.outbox()
                .defer_where(until, |e| e.envelope.to == Destination::Peer(to));
        }
    }

    /// A connection to `peer` is up: what waits on it is due now. As a recipient, its holds
    /// are moot (it can be reached directly); as a relay, it may have restarted, and entries
    /// whose deposits (or group posts) go to it stop waiting out their backoff.
    pub(super) fn reconnected(&self, peer: PeerId) {
        let released = {
            let mut holds = self.holds();
            holds.release_recipient(&peer);
            holds.release_relay(&peer)
        };
        let recipients = self.recipients_via(peer);
        let groups = self.groups_via(peer);
        self.hurry_where(|e| match e.envelope.to {
            Destination::Peer(to) => {
                to == peer || released.contains(&to) || recipients.contains(&to)
            }
            Destination::Group(group) => groups.contains(&group),
        });
    }

    /// The recipients in the outbox whose deposits go to `relay`.
    fn recipients_via(&self, relay: PeerId) -> Vec<PeerId> {
        let mut recipients: Vec<PeerId> = {
            self.outbox()
                .entries()
                .filter_map(|e| match e.envelope.to {
                    Destination::Peer(to) => Some(to),
                    Destination::Group(_) => None,
                })
                .collect()
        };
        recipients.sort();
        recipients.dedup();
        recipients.retain(|to| self.deposit_relays(*to).contains(&relay));
        recipients
    }

    /// The groups in the outbox hosted at `relay`.
    fn groups_via(&self, relay: PeerId) -> Vec<kith_protocol::GroupId> {
        let mut groups: Vec<_> = {
            self.outbox()
                .entries()
                .filter_map(|e| match e.envelope.to {
                    Destination::Group(group) => Some(group),
                    Destination::Peer(_) => None,
                })
                .collect()
        };
        groups.sort();
        groups.dedup();
        groups.retain(|group| self.plugins().rooms.relay_of(group) == Some(relay));
        groups
    }

    /// Makes every outbox entry that `pred` picks due now, and wakes the outbox.
    fn hurry_where(&self, pred: impl Fn(&OutboxEntry) -> bool) {
        let hurried = self.outbox().hurry_where(now_ms(), pred);
        if hurried > 0 {
            tracing::debug!(hurried, "outbox entries due now");
            self.inner.outbox_wake.notify_one();
        }
    }

    /// Why a message to `to` must not be deposited, if it must not: a deposit counts as
    /// `sent` only at relays the recipient fetches from, and for a contact whose relays are
    /// unknown we only know ours (which it may never poll). Receipts and other control
    /// messages carry no tick and still go to our relays, a community's shared ones. The
    /// reason shows in `kith status` while the message waits.
    pub(super) fn no_deposit_reason(
        &self,
        to: PeerId,
        envelope: &Envelope,
        kind: crate::core::store::EntryKind,
    ) -> Option<String> {
        // The entry's kind, not its body: a sealed body does not say what it carries.
        let is_chat = kind == crate::core::store::EntryKind::Message;
        let relays_known = self.contact_of(&to).is_some_and(|c| !c.relays.is_empty());
        let reason = (is_chat && !relays_known).then(|| {
            format!(
                "{to} is not reachable directly and its home relays are unknown \
                 (add it from its invite); will retry"
            )
        });
        self.set_pending_reason(envelope.id, reason.clone());
        reason
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, kith_protocol::hold::Holds> {
        self.inner.holds.lock().unwrap_or_else(|p| p.into_inner())
    }
}
