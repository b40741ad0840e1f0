//! Retries end: an outbox entry that has not left within the mailbox TTL (`Config::mailbox_ttl`,
//! how long relays would have kept it) is given up, `failed` with a reason, instead of being
//! retried for ever. Retries are scheduled no later than the deadline, and an entry found past
//! it (after a long hold, or a restart) fails without another attempt.

use super::{Node, Outcome};
use crate::clock::now_ms;
use crate::core::store::OutboxEntry;

/// When an entry sent at `sent_at_ms` stops being tried: `ttl_ms` later, and no later than
/// `ttl_ms` after `first_seen_ms` (when this node first had it), so that a clock that was far
/// ahead at sending does not keep it for ever.
pub(crate) fn deadline_ms(sent_at_ms: u64, first_seen_ms: u64, ttl_ms: u64) -> u64 {
    sent_at_ms.min(first_seen_ms).saturating_add(ttl_ms)
}

impl Node {
    /// The mailbox TTL in milliseconds.
    pub(crate) fn mailbox_ttl_ms(&self) -> u64 {
        u64::try_from(self.inner.config.mailbox_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// When `entry` stops being retried (unix ms).
    pub(crate) fn outbox_deadline_ms(&self, entry: &OutboxEntry) -> u64 {
        // The outbox does not record when an entry was queued; it was signed then.
        deadline_ms(
            entry.envelope.sent_at_ms,
            entry.envelope.sent_at_ms,
            self.mailbox_ttl_ms(),
        )
    }

    /// Why `entry` fails now, if its deadline has passed at `now`.
    pub(crate) fn outbox_given_up(&self, entry: &OutboxEntry, now: u64) -> Option<String> {
        (now >= self.outbox_deadline_ms(entry)).then(|| {
            format!(
                "not sent within the mailbox TTL ({} s) after {} attempts",
                self.inner.config.mailbox_ttl.as_secs(),
                entry.attempts
            )
        })
    }

    /// A retry past `entry`'s deadline becomes a failure, saying why the last attempt failed.
    pub(crate) fn retry_or_give_up(&self, entry: &OutboxEntry, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Retry(reason) => match self.outbox_given_up(entry, now_ms()) {
                Some(why) => {
                    tracing::warn!(id = %entry.envelope.id, %reason, "{why}: giving up");
                    Outcome::Failed(format!("{why}; last: {reason}"))
                }
                None => Outcome::Retry(reason),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_the_earlier_of_sending_and_first_sight() {
        assert_eq!(deadline_ms(1_000, 5_000, 100), 1_100);
        // A sender clock far ahead does not push the deadline out.
        assert_eq!(deadline_ms(u64::MAX - 1, 5_000, 100), 5_100);
        assert_eq!(deadline_ms(u64::MAX, u64::MAX, 100), u64::MAX);
    }
}
