//! Rate limiting: one token bucket per depositing peer (or per other key, such as the IP
//! address new connections come from), with explicit `now`.
//!
//! A bucket holds up to `burst` tokens and refills at `per_sec` tokens a second; each deposit
//! takes one. Buckets that have refilled completely carry no information and are dropped when
//! the table grows, so the table stays bounded by the number of recently active peers.

use std::collections::HashMap;
use std::hash::Hash;

use kith_protocol::PeerId;

/// Tracked peers above which full buckets are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// One token bucket. Tokens are counted in thousandths so integer math is exact enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(burst: u32, now_ms: u64) -> Self {
        Self {
            milli_tokens: u64::from(burst) * 1_000,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, burst: u32, per_sec: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // per_sec tokens a second is per_sec milli-tokens a millisecond.
        let added = elapsed.saturating_mul(u64::from(per_sec));
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(added)
            .min(u64::from(burst) * 1_000);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, burst: u32, per_sec: u32, now_ms: u64) -> bool {
        self.try_take_n(1, burst, per_sec, now_ms)
    }

    /// Takes `n` tokens if there are as many (a request that costs `n`: a group message
    /// fanned out into `n` mailboxes). A cost above the burst is capped at the burst, so a
    /// full bucket always admits one request.
    pub fn try_take_n(&mut self, n: u64, burst: u32, per_sec: u32, now_ms: u64) -> bool {
        self.refill(burst, per_sec, now_ms);
        let cost = n.min(u64::from(burst)).saturating_mul(1_000);
        if self.milli_tokens >= cost {
            self.milli_tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now_ms`.
    pub fn is_full(&self, burst: u32, per_sec: u32, now_ms: u64) -> bool {
        let mut copy = *self;
        copy.refill(burst, per_sec, now_ms);
        copy.milli_tokens >= u64::from(burst) * 1_000
    }
}

/// Token buckets by peer (or by another key).
#[derive(Debug)]
pub struct RateLimiter<K = PeerId> {
    burst: u32,
    per_sec: u32,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// `per_sec` sustained, `burst` at once, per peer.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            burst,
            per_sec,
            buckets: HashMap::new(),
        }
    }

    /// Whether `peer` may act now (and takes a token if so).
    pub fn check(&mut self, peer: &K, now_ms: u64) -> bool {
        self.check_n(peer, 1, now_ms)
    }

    /// Whether `peer` may do something that costs `n` tokens now (and takes them if so).
    pub fn check_n(&mut self, peer: &K, n: u64, now_ms: u64) -> bool {
        if self.buckets.len() >= PRUNE_ABOVE && !self.buckets.contains_key(peer) {
            self.prune(now_ms);
        }
        let (burst, per_sec) = (self.burst, self.per_sec);
        self.buckets
            .entry(*peer)
            .or_insert_with(|| TokenBucket::full(burst, now_ms))
            .try_take_n(n, burst, per_sec, now_ms)
    }

    /// How long until a peer with an empty bucket has a token again, in milliseconds.
    pub fn refill_ms(&self) -> u64 {
        1_000u64.div_ceil(u64::from(self.per_sec.max(1)))
    }

    /// Drops buckets that have refilled completely.
    pub fn prune(&mut self, now_ms: u64) {
        let (burst, per_sec) = (self.burst, self.per_sec);
        self.buckets
            .retain(|_, bucket| !bucket.is_full(burst, per_sec, now_ms));
    }

    /// Peers currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut bucket = TokenBucket::full(3, 0);
        assert!(bucket.try_take(3, 2, 0));
        assert!(bucket.try_take(3, 2, 0));
        assert!(bucket.try_take(3, 2, 0));
        assert!(!bucket.try_take(3, 2, 0));
        // Two tokens a second: one token after 500 ms.
        assert!(!bucket.try_take(3, 2, 499));
        assert!(bucket.try_take(3, 2, 500));
        assert!(!bucket.try_take(3, 2, 500));
        // Never more than the burst.
        assert!(bucket.is_full(3, 2, 1_000_000));
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let mut bucket = TokenBucket::full(1, 1_000);
        assert!(bucket.try_take(1, 1, 1_000));
        assert!(!bucket.try_take(1, 1, 0));
        assert!(!bucket.try_take(1, 1, 1_500));
        assert!(bucket.try_take(1, 1, 2_000));
    }

    #[test]
    fn a_costly_request_takes_as_many_tokens() {
        let mut bucket = TokenBucket::full(10, 0);
        assert!(bucket.try_take_n(6, 10, 1, 0));
        assert!(!bucket.try_take_n(6, 10, 1, 0));
        assert!(bucket.try_take_n(4, 10, 1, 0));
        // A cost above the burst is capped at it: a full bucket admits it.
        assert!(bucket.try_take_n(50, 10, 1, 10_000));
        assert!(!bucket.try_take(10, 1, 10_000));
    }

    #[test]
    fn peers_are_limited_separately_and_pruned() {
        let a = PeerId::random();
        let b = PeerId::random();
        let mut limiter = RateLimiter::new(1, 1);
        assert!(limiter.check(&a, 0));
        assert!(!limiter.check(&a, 0));
        assert!(limiter.check(&b, 0));
        assert_eq!(limiter.tracked(), 2);
        limiter.prune(5_000);
        assert_eq!(limiter.tracked(), 0);
    }
}
