//! Message states (the ticks) and the rule that they only move forward.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::envelope::ReceiptState;

/// Where a message stands, as its sender sees it. Ordered: a later state implies the earlier ones.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// In the sender's own outbox only.
    #[default]
    Pending,
    /// It could not leave the sender's outbox within the mailbox TTL, or was refused for
    /// good; it is not tried again. A later receipt still moves it on (it did arrive).
    Failed,
    /// Durably stored by a relay holding the recipient's mailbox.
    Sent,
    /// Stored by the recipient's node.
    Delivered,
    /// Shown to the recipient user.
    Read,
    /// A message of a temporary chat whose expiry passed before it was delivered: it is gone
    /// everywhere and will never be. Final (every later state is refused by `advance`).
    Expired,
}

impl MessageState {
    /// The state after learning `update`: never moves backwards.
    #[must_use]
    pub fn advance(self, update: MessageState) -> MessageState {
        self.max(update)
    }

    /// The lowercase name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Pending => "pending",
            MessageState::Failed => "failed",
            MessageState::Sent => "sent",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
            MessageState::Expired => "expired",
        }
    }
}

impl From<ReceiptState> for MessageState {
    fn from(state: ReceiptState) -> Self {
        match state {
            ReceiptState::Delivered => MessageState::Delivered,
            ReceiptState::Read => MessageState::Read,
        }
    }
}

impl fmt::Display for MessageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown message state {0:?} (expected pending, failed, sent, delivered, read or expired)")]
pub struct ParseStateError(pub String);

impl FromStr for MessageState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(MessageState::Pending),
            "failed" => Ok(MessageState::Failed),
            "sent" => Ok(MessageState::Sent),
            "delivered" => Ok(MessageState::Delivered),
            "read" => Ok(MessageState::Read),
            "expired" => Ok(MessageState::Expired),
            other => Err(ParseStateError(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_move_forward() {
        use MessageState::*;
        assert_eq!(Pending.advance(Sent), Sent);
        assert_eq!(Delivered.advance(Sent), Delivered);
        assert_eq!(Read.advance(Delivered), Read);
        assert_eq!(Sent.advance(Read), Read);
        assert_eq!(Pending.advance(Failed), Failed);
        assert_eq!(Failed.advance(Pending), Failed);
        assert_eq!(Failed.advance(Delivered), Delivered);
        assert_eq!(Sent.advance(Failed), Sent);
        assert_eq!(Sent.advance(Expired), Expired);
        assert_eq!(Expired.advance(Read), Expired);
    }

    #[test]
    fn names_round_trip() {
        for s in ["pending", "failed", "sent", "delivered", "read", "expired"] {
            assert_eq!(s.parse::<MessageState>().expect("parse").as_str(), s);
        }
        assert!("seen".parse::<MessageState>().is_err());
    }
}
