//! The waits a relay asked depositors for, and the deposits that came back too early.
//!
//! A deposit refused because the recipient's mailbox (or the depositor's share of it) is full
//! asks the depositor to wait `retry_after_ms` before it deposits for that recipient again; a
//! kith node waits exactly that, per relay and recipient. A depositor that keeps depositing
//! for the recipient anyway costs the relay a stream, a decode and an answer each time, for
//! nothing: such a deposit is refused at once and counts as a strike against its peer
//! ([`crate::strikes`]), so that a peer that ignores the wait is soon banned and its retries
//! stop reaching the relay at all.
//!
//! The wait opens at the first refusal for a (depositor, recipient) pair and is not moved by
//! the refusals during it. Its first half is grace: deposits that were already on their way
//! when the refusal left (a node keeps several in flight) arrive then, and are refused as
//! usual, without a strike. Waits too short to tell in-flight deposits from retries (a rate
//! refusal asks for a few milliseconds) open nothing.

use std::collections::HashMap;

use libp2p::PeerId;

/// Shortest wait that opens a window: below it, a retry cannot be told from a deposit in flight.
pub const MIN_WAIT_MS: u64 = 200;

/// Most windows kept; beyond it the ones that ended are swept out, and new ones wait for room.
const MAX_WINDOWS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    opened_ms: u64,
    until_ms: u64,
}

/// What a deposit is, against the waits asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No wait applies: handle it.
    Free,
    /// It came back before the wait ended, this many milliseconds early: refuse it, as a strike.
    Early(u64),
}

/// The windows, per (depositor, recipient).
#[derive(Debug, Default)]
pub struct Waits {
    windows: HashMap<(PeerId, PeerId), Window>,
    /// When ended windows were last swept out.
    swept_ms: u64,
}

impl Waits {
    /// Records that `depositor` was asked at `now_ms` to wait `wait_ms` before depositing for
    /// `recipient` again. A window still open stays as it was.
    pub fn asked(&mut self, depositor: PeerId, recipient: PeerId, now_ms: u64, wait_ms: u64) {
        if wait_ms < MIN_WAIT_MS {
            return;
        }
        let key = (depositor, recipient);
        if self.windows.get(&key).is_some_and(|w| now_ms < w.until_ms) {
            return;
        }
        if self.windows.len() >= MAX_WINDOWS {
            // At most one sweep a second: under a flood of fresh pairs, a sweep per refusal
            // would cost more than the refusals.
            if now_ms >= self.swept_ms.saturating_add(1_000) {
                self.swept_ms = now_ms;
                self.windows.retain(|_, w| now_ms < w.until_ms);
            }
            if self.windows.len() >= MAX_WINDOWS {
                // Full of open windows: this one goes untracked (its retries are refused as
                // usual, only not counted as strikes).
                return;
            }
        }
        self.windows.insert(
            key,
            Window {
                opened_ms: now_ms,
                until_ms: now_ms.saturating_add(wait_ms),
            },
        );
    }

    /// Whether a deposit by `depositor` for `recipient` at `now_ms` ignores a wait.
    pub fn check(&mut self, depositor: PeerId, recipient: PeerId, now_ms: u64) -> Verdict {
        let key = (depositor, recipient);
        let Some(w) = self.windows.get(&key).copied() else {
            return Verdict::Free;
        };
        if now_ms >= w.until_ms {
            self.windows.remove(&key);
            return Verdict::Free;
        }
        let grace_ends = w.opened_ms + (w.until_ms - w.opened_ms) / 2;
        if now_ms < grace_ends {
            Verdict::Free
        } else {
            Verdict::Early(w.until_ms - now_ms)
        }
    }

    /// How many windows are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deposit_back_after_the_grace_and_before_the_wait_ends_is_early() {
        let (a, r) = (PeerId::random(), PeerId::random());
        let mut waits = Waits::default();
        waits.asked(a, r, 1_000, 1_000);
        // In flight when the refusal left: no strike.
        assert_eq!(waits.check(a, r, 1_499), Verdict::Free);
        assert_eq!(waits.check(a, r, 1_500), Verdict::Early(500));
        assert_eq!(waits.check(a, r, 1_999), Verdict::Early(1));
        // Waited as asked.
        assert_eq!(waits.check(a, r, 2_000), Verdict::Free);
        assert_eq!(waits.check(a, r, 2_600), Verdict::Free);
    }

    #[test]
    fn a_window_is_kept_per_depositor_and_recipient() {
        let (a, b, r, s) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let mut waits = Waits::default();
        waits.asked(a, r, 0, 1_000);
        assert_eq!(waits.check(a, r, 600), Verdict::Early(400));
        // Another recipient of the same depositor, another depositor for the same recipient.
        assert_eq!(waits.check(a, s, 600), Verdict::Free);
        assert_eq!(waits.check(b, r, 600), Verdict::Free);
    }

    #[test]
    fn refusals_during_a_wait_do_not_move_it() {
        let (a, r) = (PeerId::random(), PeerId::random());
        let mut waits = Waits::default();
        waits.asked(a, r, 0, 1_000);
        // A depositor refused again and again keeps the window it had: otherwise each early
        // retry would reopen the grace and never count.
        waits.asked(a, r, 400, 1_000);
        waits.asked(a, r, 900, 1_000);
        assert_eq!(waits.check(a, r, 950), Verdict::Early(50));
        assert_eq!(waits.check(a, r, 1_000), Verdict::Free);
        // Refused once the wait is over: a new window.
        waits.asked(a, r, 1_000, 1_000);
        assert_eq!(waits.check(a, r, 1_400), Verdict::Free);
        assert_eq!(waits.check(a, r, 1_600), Verdict::Early(400));
    }

    #[test]
    fn short_waits_open_no_window() {
        let (a, r) = (PeerId::random(), PeerId::random());
        let mut waits = Waits::default();
        waits.asked(a, r, 0, MIN_WAIT_MS - 1);
        assert_eq!(waits.check(a, r, MIN_WAIT_MS - 2), Verdict::Free);
    }

    #[test]
    fn the_windows_are_bounded() {
        let mut waits = Waits::default();
        let r = PeerId::random();
        for i in 0..MAX_WINDOWS as u64 + 10 {
            waits.asked(PeerId::random(), r, i, 100_000);
        }
        assert_eq!(waits.len(), MAX_WINDOWS);
        // Once windows have ended, a new one makes room by sweeping them out.
        let late = PeerId::random();
        waits.asked(late, r, 150_000, 1_000);
        assert_eq!(waits.len(), 1);
        assert_eq!(waits.check(late, r, 150_600), Verdict::Early(400));
    }
}
