//! Store-and-forward for offline recipients: `/kith/mailbox/1`.
//!
//! - [`store`]: the sled-backed mailboxes (pure data operations with explicit `now`).
//! - [`keys`]: senders' decoded public keys, a bounded cache for signature checks.
//! - [`rate`]: per-peer deposit token buckets (pure, explicit `now`).
//! - [`service`]: the task that owns the store and answers requests.
//! - [`flusher`]: group commit, so `Stored` is only said once the write is on disk.

pub mod flusher;
pub mod keys;
pub mod rate;
pub mod service;
pub mod store;

pub use service::Handle;
pub use store::{Store, Usage};
