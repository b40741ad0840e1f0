//! Wire types, framing, signing and pure state machines shared by every kith component.
//!
//! This crate does no I/O: no sockets, no files, no tokio, no system clock. Time is always an
//! argument (`now_ms`), randomness is drawn from a caller-supplied RNG where it matters, and every
//! decoder refuses oversize input before allocating.
//!
//! The message flow it describes:
//!
//! 1. A sender builds a [`Body`], wraps it in an [`Envelope`] with [`Envelope::seal`] (which
//!    encodes the body to bytes and signs every field with the sender's ed25519 key).
//! 2. The envelope travels inside a [`dm::Request`] (node to node, relay to node) or a
//!    [`mailbox::Request`] (node to relay), each CBOR-encoded inside a length-prefixed [`frame`].
//! 3. The receiver decodes the frame, checks [`Envelope::verify`], and only then stores it. A relay
//!    never needs to decode the body, which for one-to-one messages is end-to-end encrypted
//!    ([`Body::Olm`], keys from [`prekeys`]).
#![deny(missing_docs)]

pub mod blob;
pub mod cbor;
pub mod dm;
pub mod envelope;
pub mod frame;
pub mod group;
pub mod hold;
pub mod ids;
pub mod invite;
pub mod keys;
pub mod lamport;
pub mod limits;
pub mod mailbox;
pub mod prekeys;
pub mod presence;
pub mod reject;
pub mod retry;
pub mod state;
pub mod timer;

pub use envelope::{Body, Destination, Envelope, ReceiptState, VerifyError};
pub use ids::{GroupId, MessageId};
pub use libp2p_identity::{Keypair, PeerId, PublicKey};
pub use reject::Reject;
pub use state::MessageState;
