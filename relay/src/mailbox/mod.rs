//! Store-and-forward for offline recipients: `/kith/mailbox/1`.
//!
//! - [`store`]: the sled-backed mailboxes (pure data operations with explicit `now`).
//! - [`keys`]: senders' decoded public keys, a bounded cache for signature checks.
//! - [`rate`]: per-peer deposit token buckets (pure, explicit `now`).
//! - [`service`]: the task that owns the store and answers requests.
//! - [`waits`]: the waits asked of depositors, and the deposits back too early (strikes).
//! - [`flusher`]: group commit, so `Stored` is only said once the write is on disk.
//! - `kith_net::shred`: temporary chats' entries sealed under keys destroyed at their expiry.

pub mod flusher;
pub mod rate;
pub mod service;
pub mod store;
pub mod waits;

pub use service::Handle;
pub use store::{Store, Usage};

/// A signed chat envelope from `from` to `to`, for the mailbox's tests.
#[cfg(test)]
pub(crate) fn test_envelope(
    from: &kith_protocol::Keypair,
    to: libp2p::PeerId,
    text: &str,
    expires_at_ms: Option<u64>,
) -> kith_protocol::Envelope {
    use kith_protocol::{envelope::Header, Body, Destination, Envelope, MessageId};
    Envelope::seal(
        from,
        Header {
            id: MessageId::random(),
            to: Destination::Peer(to),
            sent_at_ms: 0,
            lamport: 1,
            expires_at_ms,
        },
        &Body::Chat { text: text.into() },
    )
    .expect("seal")
}
