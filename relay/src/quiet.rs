//! Rate-limited warnings about one peer's refused requests.
//!
//! A peer whose requests keep being refused (a full mailbox, a rate limit, garbage) must not
//! fill the relay's disk through its log: the first refusal of a peer is logged as it happens,
//! later ones only counted, and a summary line ("n more refusals") is written at most once every
//! `interval` per peer. Every refusal is counted in the metrics anyway. Time is an argument.

use std::collections::HashMap;

use libp2p::PeerId;

/// Peers remembered before the quiet ones are forgotten.
const MAX_TRACKED: usize = 10_000;

/// What to do about one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Log this refusal (the peer's first in a while).
    First,
    /// Log a summary: this many refusals (this one included) since the last line.
    Summary(u64),
    /// Say nothing; it is counted.
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    last_line_ms: u64,
    unsaid: u64,
}

/// Per-peer warning limiter.
#[derive(Debug)]
pub struct Warnings {
    interval_ms: u64,
    peers: HashMap<PeerId, Seen>,
    /// First lines of new peers in the current interval, and when it started: strangers that
    /// come back as fresh identities must not each get a line.
    firsts: u64,
    firsts_since_ms: u64,
}

/// Most peers whose first refusal is logged in one interval; the others' are only counted.
const MAX_FIRST_LINES_PER_INTERVAL: u64 = 20;

impl Warnings {
    /// At most one line per peer every `interval_ms`.
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            peers: HashMap::new(),
            firsts: 0,
            firsts_since_ms: 0,
        }
    }

    /// Whether (and how) to log a refusal of `peer` at `now_ms`.
    pub fn refused(&mut self, peer: &PeerId, now_ms: u64) -> Say {
        if self.peers.len() >= MAX_TRACKED && !self.peers.contains_key(peer) {
            self.forget_quiet(now_ms);
        }
        let interval = self.interval_ms;
        match self.peers.get_mut(peer) {
            None => {
                self.peers.insert(
                    *peer,
                    Seen {
                        last_line_ms: now_ms,
                        unsaid: 0,
                    },
                );
                if now_ms.saturating_sub(self.firsts_since_ms) >= interval {
                    self.firsts = 0;
                    self.firsts_since_ms = now_ms;
                }
                self.firsts += 1;
                if self.firsts > MAX_FIRST_LINES_PER_INTERVAL {
                    // Unsaid: its summary counts it.
                    if let Some(seen) = self.peers.get_mut(peer) {
                        seen.unsaid = 1;
                    }
                    return Say::Nothing;
                }
                Say::First
            }
            Some(seen) => {
                seen.unsaid += 1;
                if now_ms.saturating_sub(seen.last_line_ms) < interval {
                    return Say::Nothing;
                }
                let n = seen.unsaid;
                seen.unsaid = 0;
                seen.last_line_ms = now_ms;
                Say::Summary(n)
            }
        }
    }

    /// Forgets peers with nothing unsaid and no line for an interval (and, if the table is
    /// still full, every peer: their next refusal is logged again, which is the safe side).
    fn forget_quiet(&mut self, now_ms: u64) {
        let interval = self.interval_ms;
        self.peers
            .retain(|_, s| s.unsaid > 0 || now_ms.saturating_sub(s.last_line_ms) < interval);
        if self.peers.len() >= MAX_TRACKED {
            self.peers.clear();
        }
    }

    /// Peers tracked.
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

/// Logs a refusal of `peer` at WARN as `warnings` allows: the first one with its details, then
/// a summary at most once an interval.
///
/// With `key = K` the lines are limited under `K` instead of the peer (one key for many peers:
/// bans of fresh identities, say), and still name the peer.
#[macro_export]
macro_rules! warn_refused {
    ($warnings:expr, $now_ms:expr, key = $key:expr, $peer:expr, $($fields:tt)+) => {
        match $warnings.refused(&$key, $now_ms) {
            $crate::quiet::Say::First => tracing::warn!(peer = %$peer, $($fields)+),
            $crate::quiet::Say::Summary(n) => {
                tracing::warn!(peer = %$peer, refused_since_last_line = n, $($fields)+)
            }
            $crate::quiet::Say::Nothing => tracing::debug!(peer = %$peer, $($fields)+),
        }
    };
    ($warnings:expr, $now_ms:expr, $peer:expr, $($fields:tt)+) => {
        $crate::warn_refused!($warnings, $now_ms, key = $peer, $peer, $($fields)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_peers_get_a_first_line_only_up_to_a_number_per_interval() {
        let mut w = Warnings::new(1_000);
        for _ in 0..MAX_FIRST_LINES_PER_INTERVAL {
            assert_eq!(w.refused(&PeerId::random(), 10), Say::First);
        }
        let late = PeerId::random();
        assert_eq!(w.refused(&late, 20), Say::Nothing);
        assert_eq!(
            w.refused(&PeerId::random(), 1_010),
            Say::First,
            "a new interval"
        );
        // The one that was quiet still gets its summary in time, its first refusal counted.
        assert_eq!(w.refused(&late, 1_020), Say::Summary(2));
    }

    #[test]
    fn first_then_one_summary_per_interval() {
        let mut w = Warnings::new(1_000);
        let p = PeerId::random();
        assert_eq!(w.refused(&p, 0), Say::First);
        for t in 1..1_000 {
            assert_eq!(w.refused(&p, t), Say::Nothing);
        }
        assert_eq!(w.refused(&p, 1_000), Say::Summary(1_000));
        assert_eq!(w.refused(&p, 1_001), Say::Nothing);
        assert_eq!(w.refused(&p, 2_000), Say::Summary(2));
        // Another peer is not held back by the first.
        assert_eq!(w.refused(&PeerId::random(), 2_000), Say::First);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut w = Warnings::new(1_000);
        for _ in 0..MAX_TRACKED + 10 {
            w.refused(&PeerId::random(), 0);
        }
        assert!(w.tracked() <= MAX_TRACKED);
    }
}
