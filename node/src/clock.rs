//! The wall clock, in the unix milliseconds that envelopes, ticks and schedules use.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
