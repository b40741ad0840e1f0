//! Temporary chats: the conversation timer's durations, and the pure rules that decide when a
//! message of a timed conversation expires on each machine that holds it.
//!
//! A sender stamps every message of a timed conversation with `expires_at_ms = sent_at_ms +
//! timer`, by its own clock, in the signed envelope header (so relays can drop it, and nobody
//! can change it without breaking the signature). Machines' clocks differ; every holder
//! tolerates a skew of `skew_ms` (a setting, [`DEFAULT_SKEW_MS`] by default):
//!
//! - a relay or a receiver refuses an envelope only once `expires_at_ms + skew_ms` has passed by
//!   its own clock ([`refuses`]); a relay drops what it holds at that time too ([`relay_deadline`]);
//! - a receiver keeps a message for the lifetime its sender gave it, counted from its arrival,
//!   but never past `expires_at_ms + skew_ms` by its own clock ([`receiver_deadline`]). So a
//!   receiver whose clock is ahead of or behind the sender's by up to the tolerance shows a
//!   fresh message for its whole lifetime, and a message that sat in a mailbox is gone at most
//!   the tolerance after its expiry;
//! - the sender deletes its own copy at `expires_at_ms` exactly (its own clock stamped it).

use std::fmt;

/// Shortest timer a message may carry (the user setting has its own, larger minimum in the
/// node's configuration).
pub const MIN_SECS: u64 = 1;

/// Longest timer: 90 days.
pub const MAX_SECS: u64 = 90 * 24 * 3600;

/// The clock skew every holder tolerates unless configured otherwise: 30 seconds.
pub const DEFAULT_SKEW_MS: u64 = 30_000;

/// A duration that is not a timer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a number followed by `s`, `m`, `h`, `d` or `w`, nor `off`.
    #[error("{0:?} is not a duration: write a number and a unit (30s, 5m, 1h, 7d, 2w) or off")]
    Syntax(String),
    /// Outside [`MIN_SECS`] ..= [`MAX_SECS`] (or the caller's own minimum).
    #[error("a timer must be between {min} and {max}", min = format_secs(*min), max = format_secs(*max))]
    OutOfRange {
        /// The shortest allowed, in seconds.
        min: u64,
        /// The longest allowed, in seconds.
        max: u64,
    },
}

/// Parses `3s`, `5m`, `1h`, `7d`, `2w` (or a bare number of seconds) into seconds; `off` (or
/// `0`) is `None`. Refuses anything outside `min_secs ..= MAX_SECS`.
pub fn parse(text: &str, min_secs: u64) -> Result<Option<u64>, ParseError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Ok(None);
    }
    let syntax = || ParseError::Syntax(text.to_owned());
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| syntax())?;
    let unit_secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "w" => 7 * 24 * 3600,
        _ => return Err(syntax()),
    };
    let min = min_secs.max(MIN_SECS);
    let secs = n
        .checked_mul(unit_secs)
        .ok_or(ParseError::OutOfRange { min, max: MAX_SECS })?;
    check(secs, min)?;
    Ok(Some(secs))
}

/// Checks that a timer lies within `min_secs ..= MAX_SECS`.
pub fn check(secs: u64, min_secs: u64) -> Result<(), ParseError> {
    let min = min_secs.max(MIN_SECS);
    if (min..=MAX_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(ParseError::OutOfRange { min, max: MAX_SECS })
    }
}

/// A timer for people: the largest unit that divides it (`90s`, `5m`, `1h`, `7d`).
pub fn format_secs(secs: u64) -> String {
    for (unit, len) in [
        ("w", 7 * 24 * 3600),
        ("d", 24 * 3600),
        ("h", 3600),
        ("m", 60),
    ] {
        if secs >= len && secs.is_multiple_of(len) {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{secs}s")
}

/// The expiry a sender stamps on a message sent at `sent_at_ms` under a timer of `secs`.
pub fn expiry(sent_at_ms: u64, secs: u64) -> u64 {
    sent_at_ms.saturating_add(secs.saturating_mul(1000))
}

/// Why an expiry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    /// It passed (beyond the tolerated skew).
    #[error("expired at {expires_at_ms} (now {now_ms}, skew tolerated {skew_ms} ms)")]
    Expired {
        /// The envelope's expiry.
        expires_at_ms: u64,
        /// The holder's clock.
        now_ms: u64,
        /// The tolerance.
        skew_ms: u64,
    },
    /// It is not after the send time, or further than [`MAX_SECS`] after it.
    #[error(
        "a lifetime from {sent_at_ms} to {expires_at_ms} is not between {MIN_SECS} s and 90 days"
    )]
    BadLifetime {
        /// The envelope's send time.
        sent_at_ms: u64,
        /// Its expiry.
        expires_at_ms: u64,
    },
    /// It lies further ahead of the holder's clock than the longest timer and the skew allow.
    #[error("expiry {expires_at_ms} is too far ahead of now ({now_ms})")]
    TooFarAhead {
        /// The envelope's expiry.
        expires_at_ms: u64,
        /// The holder's clock.
        now_ms: u64,
    },
}

/// Whether a relay or a node refuses an envelope expiring at `expires_at_ms` at `now_ms`.
pub fn refuses(expires_at_ms: u64, now_ms: u64, skew_ms: u64) -> bool {
    expires_at_ms.saturating_add(skew_ms) <= now_ms
}

/// When a relay drops an envelope expiring at `expires_at_ms`.
pub fn relay_deadline(expires_at_ms: u64, skew_ms: u64) -> u64 {
    expires_at_ms.saturating_add(skew_ms)
}

/// Checks a received message's expiry and returns when the receiver deletes it (by its own
/// clock): its lifetime counted from `now_ms`, bounded by `expires_at_ms + skew_ms`, and never
/// before `expires_at_ms`.
pub fn receiver_deadline(
    sent_at_ms: u64,
    expires_at_ms: u64,
    now_ms: u64,
    skew_ms: u64,
) -> Result<u64, ExpiryError> {
    let lifetime = expires_at_ms.checked_sub(sent_at_ms);
    let Some(lifetime) = lifetime.filter(|l| (MIN_SECS * 1000..=MAX_SECS * 1000).contains(l))
    else {
        return Err(ExpiryError::BadLifetime {
            sent_at_ms,
            expires_at_ms,
        });
    };
    if refuses(expires_at_ms, now_ms, skew_ms) {
        return Err(ExpiryError::Expired {
            expires_at_ms,
            now_ms,
            skew_ms,
        });
    }
    if expires_at_ms
        > now_ms
            .saturating_add(MAX_SECS * 1000)
            .saturating_add(skew_ms)
    {
        return Err(ExpiryError::TooFarAhead {
            expires_at_ms,
            now_ms,
        });
    }
    let latest = expires_at_ms.saturating_add(skew_ms);
    Ok(now_ms
        .saturating_add(lifetime)
        .min(latest)
        .max(expires_at_ms))
}

/// A conversation's timer as a value that prints for people (`off` or `5m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Display(pub Option<u64>);

impl fmt::Display for Display {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(secs) => f.write_str(&format_secs(secs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse("3s", 1), Ok(Some(3)));
        assert_eq!(parse("5m", 1), Ok(Some(300)));
        assert_eq!(parse("1h", 30), Ok(Some(3600)));
        assert_eq!(parse("7d", 30), Ok(Some(7 * 86_400)));
        assert_eq!(parse("90", 30), Ok(Some(90)));
        assert_eq!(parse("off", 30), Ok(None));
        assert_eq!(parse("OFF", 30), Ok(None));
        assert!(matches!(
            parse("3s", 30),
            Err(ParseError::OutOfRange { min: 30, .. })
        ));
        assert!(matches!(
            parse("91d", 1),
            Err(ParseError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse("99999999999999999999w", 1),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            parse("3000000000000000w", 1),
            Err(ParseError::OutOfRange { .. })
        ));
        for bad in ["", "s", "3x", "-3s", "3 s s", "1.5h"] {
            assert!(matches!(parse(bad, 1), Err(ParseError::Syntax(_))), "{bad}");
        }
        assert_eq!(format_secs(90), "90s");
        assert_eq!(format_secs(300), "5m");
        assert_eq!(format_secs(7 * 86_400), "1w");
        assert_eq!(format_secs(2 * 86_400), "2d");
        assert_eq!(Display(None).to_string(), "off");
        assert_eq!(Display(Some(3600)).to_string(), "1h");
    }

    #[test]
    fn relays_tolerate_the_skew_and_no_more() {
        let skew = 30_000;
        // A sender whose clock is 20 s behind stamps an expiry that already passed here.
        assert!(!refuses(1_000_000 - 10_000, 1_000_000, skew));
        assert!(refuses(1_000_000 - 30_000, 1_000_000, skew));
        assert!(refuses(1_000_000 - 40_000, 1_000_000, skew));
        assert_eq!(relay_deadline(5_000, skew), 35_000);
    }

    #[test]
    fn receivers_keep_the_lifetime_within_the_skew() {
        let skew = 30_000;
        let sent = 1_000_000;
        let expires = expiry(sent, 60);
        // Same clocks: deleted at the expiry.
        assert_eq!(receiver_deadline(sent, expires, sent, skew), Ok(expires));
        // Receiver 20 s ahead: the whole minute still, by its own clock.
        assert_eq!(
            receiver_deadline(sent, expires, sent + 20_000, skew),
            Ok(expires + 20_000)
        );
        // Receiver 20 s behind: never before the expiry.
        assert_eq!(
            receiver_deadline(sent, expires, sent - 20_000, skew),
            Ok(expires)
        );
        // Arrived after sitting 50 s in a mailbox: no longer than the tolerance past expiry.
        assert_eq!(
            receiver_deadline(sent, expires, sent + 50_000, skew),
            Ok(expires + skew)
        );
        // Too late, even with the tolerance.
        assert!(matches!(
            receiver_deadline(sent, expires, expires + skew, skew),
            Err(ExpiryError::Expired { .. })
        ));
        // Nonsense lifetimes.
        for bad in [sent, sent - 1, sent + 999, expiry(sent, MAX_SECS) + 1] {
            assert!(matches!(
                receiver_deadline(sent, bad, sent, skew),
                Err(ExpiryError::BadLifetime { .. })
            ));
        }
        // A sender whose clock runs a year ahead.
        let year = 365 * 86_400_000;
        assert!(matches!(
            receiver_deadline(sent + year, expiry(sent + year, 60), sent, skew),
            Err(ExpiryError::TooFarAhead { .. })
        ));
    }
}
