//! `/kith/dm/1`: deliver one envelope to its recipient's node.
//!
//! Flow: the sender (or a relay delivering for it) sends a [`Request`]; the recipient verifies
//! the envelope, stores it, flushes, and only then answers [`Response::Accepted`]. Any refusal is
//! a [`Response::Rejected`] with a typed [`Reject`]. The response echoes the request's `req_id`.

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::limits::MAX_DM_FRAME_BYTES;
use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/dm/1";

/// Largest frame on this protocol.
pub const MAX_FRAME_BYTES: usize = MAX_DM_FRAME_BYTES;

/// Deliver this envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the requester, echoed in the response.
    pub req_id: u64,
    /// The envelope to deliver.
    pub envelope: Envelope,
}

/// The recipient's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Stored durably (or already stored earlier: duplicates are accepted again).
    Accepted {
        /// The request's id.
        req_id: u64,
    },
    /// Refused.
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
    },
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Accepted { req_id } | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}
