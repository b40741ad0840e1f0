//! Typed reasons for refusing a request, shared by every kith protocol.

use serde::{Deserialize, Serialize};

/// Why a peer refused a request. Sent on the wire; the requester decides whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Reject {
    /// The envelope's signature does not verify against its `from` key.
    #[error("bad signature")]
    BadSignature,
    /// The request or envelope is larger than the receiver allows.
    #[error("too large (limit {max} bytes)")]
    TooLarge {
        /// The receiver's limit in bytes.
        max: u64,
    },
    /// The request names a mailbox that does not belong to the connection's peer.
    #[error("not your mailbox")]
    NotYours,
    /// The recipient's mailbox is full, or the sender deposits too fast; retry later.
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The receiver is overloaded; retry after the given delay.
    #[error("busy, retry after {retry_after_ms} ms")]
    Busy {
        /// How long to wait before retrying.
        retry_after_ms: u64,
    },
    /// The request could not be decoded or makes no sense.
    #[error("malformed request")]
    Malformed,
    /// The envelope's `from` is neither the connection's peer nor one allowed to deliver for it.
    #[error("sender does not match the connection")]
    WrongSender,
    /// The envelope is addressed to someone else.
    #[error("wrong recipient")]
    WrongRecipient,
    /// The envelope's format version is not supported.
    #[error("unsupported envelope version")]
    UnsupportedVersion,
    /// The envelope's `expires_at_ms` has passed.
    #[error("expired")]
    Expired,
    /// The receiver failed to store the envelope (its disk, not your input); retry later.
    #[error("receiver could not store the message")]
    StoreFailed,
    /// The recipient does not take messages from this sender: it blocked the sender, or it
    /// takes messages from its contacts only. Not worth retrying.
    #[error("the recipient does not accept messages from this sender")]
    Refused,
}

impl Reject {
    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Reject::QuotaExceeded | Reject::Busy { .. } | Reject::StoreFailed
        )
    }
}
