//! Lamport clocks per conversation, without overflow.
//!
//! A peer chooses the clock values in what it sends, so a hostile one may send `u64::MAX`.
//! Observing a value never moves a clock past [`CEILING`] (far beyond any honest count), and
//! ticking saturates, so the next send never overflows; a conversation pushed to the ceiling
//! keeps working, its later messages sharing one clock value (ties are broken by arrival).

/// The highest value a clock takes from what others sent: 2^62.
pub const CEILING: u64 = 1 << 62;

/// The clock after observing `seen` in a received message.
pub fn observe(current: u64, seen: u64) -> u64 {
    current.max(seen.min(CEILING))
}

/// The clock value for the next message sent, after `current`.
pub fn next(current: u64) -> u64 {
    current.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_maximum_neither_overflows_nor_sticks_at_the_top() {
        let after = observe(5, u64::MAX);
        assert_eq!(after, CEILING);
        assert_eq!(next(after), CEILING + 1);
        assert_eq!(next(u64::MAX), u64::MAX);
        assert_eq!(observe(7, 3), 7);
        assert_eq!(observe(7, 9), 9);
    }
}
