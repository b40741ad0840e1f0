//! The retry schedule: exponential backoff with jitter, as a pure function of the attempt number
//! and a random sample supplied by the caller.

/// Exponential backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry, before jitter.
    pub base_ms: u64,
    /// Upper bound on any delay.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_ms: 500,
            max_ms: 60_000,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry).
    ///
    /// The nominal delay doubles each attempt up to `max_ms`; `jitter` (in `[0, 1)`) picks a point
    /// in its upper half ("equal jitter"), so retries of many messages spread out but never come
    /// back sooner than half the nominal delay.
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let nominal = self
            .base_ms
            .saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX))
            .min(self.max_ms);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = nominal / 2;
        half + ((nominal - half) as f64 * jitter) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap() {
        let b = Backoff {
            base_ms: 100,
            max_ms: 1_000,
        };
        assert_eq!(b.delay_ms(0, 1.0), 100);
        assert_eq!(b.delay_ms(1, 1.0), 200);
        assert_eq!(b.delay_ms(3, 1.0), 800);
        assert_eq!(b.delay_ms(4, 1.0), 1_000);
        assert_eq!(b.delay_ms(200, 1.0), 1_000);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let b = Backoff::default();
        for attempt in 0..10 {
            let full = b.delay_ms(attempt, 1.0);
            assert_eq!(b.delay_ms(attempt, 0.0), full / 2);
            let mid = b.delay_ms(attempt, 0.5);
            assert!(mid >= full / 2 && mid <= full);
            assert_eq!(b.delay_ms(attempt, f64::NAN), full / 2);
        }
    }
}
