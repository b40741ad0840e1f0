//! libp2p plumbing shared by the kith node and relay.
//!
//! kith speaks its request-response protocols in CBOR (ciborium) inside length-prefixed frames
//! ([`kith_protocol::frame`]). libp2p's own `cbor` codec uses another CBOR library and caps
//! messages at fixed sizes, so [`codec::Codec`] is ours: it refuses an oversize frame from its
//! header alone and turns a frame that does not decode into a typed [`codec::Message::Invalid`]
//! so that the protocol handler can answer with a typed reject instead of dropping the stream.
#![deny(missing_docs)]

pub mod codec;
pub mod fuzz;
pub mod key_package;
pub mod shred;

use std::time::Duration;

/// How long a connection with no open streams stays up. Nodes keep their home-relay connection
/// open with a circuit reservation; direct chat connections stay warm this long after the last
/// message so that a conversation does not pay for a new handshake on every line.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one request may take before it fails with a timeout and is retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most concurrent inbound and outbound streams per request-response protocol and connection.
pub const MAX_CONCURRENT_STREAMS: usize = 512;

/// The `/kith/dm/1` codec.
pub type DmCodec = codec::Codec<kith_protocol::dm::Request, kith_protocol::dm::Response>;

/// The `/kith/mailbox/1` codec.
pub type MailboxCodec =
    codec::Codec<kith_protocol::mailbox::Request, kith_protocol::mailbox::Response>;

/// The `/kith/presence/1` codec.
pub type PresenceCodec =
    codec::Codec<kith_protocol::presence::Request, kith_protocol::presence::Response>;

/// The `/kith/group/1` codec.
pub type GroupCodec = codec::Codec<kith_protocol::group::Request, kith_protocol::group::Response>;

/// The `/kith/blob/1` codec.
pub type BlobCodec = codec::Codec<kith_protocol::blob::Request, kith_protocol::blob::Response>;

/// A request-response configuration with kith's timeout and stream limit.
pub fn request_response_config() -> libp2p::request_response::Config {
    libp2p::request_response::Config::default()
        .with_request_timeout(REQUEST_TIMEOUT)
        .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS)
}

/// The `/kith/keys/1` codec.
pub type KeysCodec =
    codec::Codec<kith_protocol::prekeys::Request, kith_protocol::prekeys::Response>;
