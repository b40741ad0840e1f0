//! Graceful degradation: which work a loaded relay refuses first.
//!
//! Work falls in four [`Class`]es, most important first: message deposit / fetch / ack / push,
//! group operations, receipts, presence and typing. The relay measures its load as the larger of
//! two fractions of configurable limits: requests in flight (waiting for the mailbox service or
//! for the group-commit flush) over `shed_max_in_flight_requests`, and the duration of the last
//! store flush over `shed_max_flush_latency_ms` (counted only while work is in flight, so one slow
//! flush does not shed an idle relay forever). Classes are refused with `Busy{retry_after_ms}`
//! from a share of that load upwards, lowest class first:
//!
//! | class | shed from |
//! |---|---|
//! | presence and typing | 50 % of a limit |
//! | receipts | 75 % |
//! | group operations | 100 % |
//! | messages | never by this policy (only when the mailbox queue is actually full) |
//!
//! The decision is pure ([`Policy::admits`]); the swarm task feeds it the current [`Load`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A priority class of relay work; lower numbers are more important.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Message deposit, mailbox fetch and ack, push: never shed by the policy.
    Message = 1,
    /// Group operations.
    Group = 2,
    /// Receipts (deposits the sender marked as receipts).
    Receipt = 3,
    /// Presence heartbeats and queries, typing.
    Presence = 4,
}

impl Class {
    /// Every class, most important first.
    pub const ALL: [Class; 4] = [
        Class::Message,
        Class::Group,
        Class::Receipt,
        Class::Presence,
    ];

    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Class::Message => "message",
            Class::Group => "group",
            Class::Receipt => "receipt",
            Class::Presence => "presence",
        }
    }

    /// The load, in percent of a limit, from which this class is shed (`None`: never).
    pub fn shed_from_percent(&self) -> Option<u64> {
        match self {
            Class::Message => None,
            Class::Group => Some(100),
            Class::Receipt => Some(75),
            Class::Presence => Some(50),
        }
    }
}

/// The relay's load at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests accepted and not yet answered.
    pub in_flight: usize,
    /// How long the last store flush took, in microseconds.
    pub flush_latency_us: u64,
}

/// The configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Shedding on at all.
    pub enabled: bool,
    /// In-flight requests that count as 100 % load.
    pub max_in_flight: usize,
    /// Flush latency that counts as 100 % load, in milliseconds.
    pub max_flush_latency_ms: u64,
}

impl Policy {
    /// The load in percent of the tighter limit.
    pub fn load_percent(&self, load: Load) -> u64 {
        let in_flight = (load.in_flight as u64)
            .saturating_mul(100)
            .checked_div(self.max_in_flight as u64)
            .unwrap_or(0);
        let flush = if load.in_flight == 0 {
            0
        } else {
            load.flush_latency_us
                .checked_div(self.max_flush_latency_ms.saturating_mul(10))
                .unwrap_or(0)
        };
        in_flight.max(flush)
    }

    /// Whether work of `class` is taken under `load`.
    pub fn admits(&self, class: Class, load: Load) -> bool {
        if !self.enabled {
            return true;
        }
        match class.shed_from_percent() {
            None => true,
            Some(threshold) => self.load_percent(load) < threshold,
        }
    }
}

/// The latest flush duration, shared between the flusher (writer) and the swarm task (reader).
#[derive(Debug, Clone, Default)]
pub struct FlushGauge(Arc<AtomicU64>);

impl FlushGauge {
    /// Records how long a flush took.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.0.store(us, Ordering::Relaxed);
    }

    /// The last flush's duration in microseconds.
    pub fn latest_us(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        enabled: true,
        max_in_flight: 100,
        max_flush_latency_ms: 200,
    };

    fn admitted(load: Load) -> Vec<Class> {
        Class::ALL
            .into_iter()
            .filter(|c| POLICY.admits(*c, load))
            .collect()
    }

    #[test]
    fn lowest_classes_go_first_as_in_flight_work_grows() {
        let at = |in_flight| Load {
            in_flight,
            flush_latency_us: 0,
        };
        assert_eq!(admitted(at(0)), Class::ALL);
        assert_eq!(admitted(at(49)), Class::ALL);
        assert_eq!(
            admitted(at(50)),
            [Class::Message, Class::Group, Class::Receipt]
        );
        assert_eq!(admitted(at(75)), [Class::Message, Class::Group]);
        assert_eq!(admitted(at(100)), [Class::Message]);
        assert_eq!(admitted(at(10_000)), [Class::Message]);
    }

    #[test]
    fn slow_flushes_shed_too_but_only_while_work_waits() {
        let slow = |in_flight| Load {
            in_flight,
            flush_latency_us: 160_000,
        };
        assert_eq!(POLICY.load_percent(slow(1)), 80);
        assert_eq!(admitted(slow(1)), [Class::Message, Class::Group]);
        assert_eq!(admitted(slow(0)), Class::ALL);
    }

    #[test]
    fn disabled_or_zero_limits_shed_nothing() {
        let heavy = Load {
            in_flight: 1_000_000,
            flush_latency_us: u64::MAX,
        };
        let off = Policy {
            enabled: false,
            ..POLICY
        };
        assert!(Class::ALL.iter().all(|c| off.admits(*c, heavy)));
        let zero = Policy {
            enabled: true,
            max_in_flight: 0,
            max_flush_latency_ms: 0,
        };
        assert!(Class::ALL.iter().all(|c| zero.admits(*c, heavy)));
    }

    #[test]
    fn the_gauge_keeps_the_latest_flush() {
        let gauge = FlushGauge::default();
        gauge.record(Duration::from_millis(3));
        assert_eq!(gauge.clone().latest_us(), 3_000);
    }
}
