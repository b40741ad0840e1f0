//! `/kith/mailbox/1`: store-and-forward between a node and a relay.
//!
//! Flow: a sender [`Request::Deposit`]s an envelope for an offline recipient; the relay verifies
//! and stores it, flushes, and answers [`Response::Stored`] (the `sent` tick). The recipient later
//! [`Request::Fetch`]es its own mailbox in batches (ordered by the relay's sequence numbers),
//! stores what it got, and [`Request::Ack`]s the sequence numbers so the relay deletes them. Fetch
//! and ack only ever touch the mailbox of the connection's own (Noise-authenticated) peer id.

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_IDS_PER_BATCH, MAX_MAILBOX_FRAME_BYTES};
use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/mailbox/1";

/// Largest frame on this protocol (a fetch answer).
pub const MAX_FRAME_BYTES: usize = MAX_MAILBOX_FRAME_BYTES;

/// Largest request frame: a deposit carries one envelope; an ack's [`MAX_IDS_PER_BATCH`]
/// sequence numbers take at most 9 KiB.
pub const MAX_REQUEST_BYTES: usize = MAX_ENVELOPE_BYTES + 1024;

/// A request to a relay's mailbox service.
// A request is built once and moved into the codec; boxing the envelope would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Store this envelope for its recipient.
    Deposit {
        /// Echoed in the response.
        req_id: u64,
        /// The envelope, addressed to a peer.
        envelope: Envelope,
        /// The sender's hint of what the envelope is, since the relay cannot read bodies. A
        /// relay under load sheds receipts before messages; absent on the wire means `Message`.
        #[serde(default)]
        class: DepositClass,
    },
    /// Return up to `limit` envelopes of the caller's own mailbox with a sequence number above
    /// `after` (or from the start).
    Fetch {
        /// Echoed in the response.
        req_id: u64,
        /// Only entries after this sequence number.
        after: Option<u64>,
        /// At most this many entries (capped by the relay).
        limit: u32,
    },
    /// Delete these entries from the caller's own mailbox.
    Ack {
        /// Echoed in the response.
        req_id: u64,
        /// Sequence numbers from earlier fetches, at most [`MAX_IDS_PER_BATCH`] (decoding stops
        /// at the first one beyond).
        #[serde(deserialize_with = "at_most_ids_per_batch")]
        seqs: Vec<u64>,
    },
}

/// Decodes a list of sequence numbers, refusing it as soon as it holds more than
/// [`MAX_IDS_PER_BATCH`], before decoding the rest.
fn at_most_ids_per_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    struct Seqs;
    impl<'de> serde::de::Visitor<'de> for Seqs {
        type Value = Vec<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_IDS_PER_BATCH} sequence numbers")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_IDS_PER_BATCH));
            while let Some(n) = seq.next_element()? {
                if out.len() == MAX_IDS_PER_BATCH {
                    return Err(serde::de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(n);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Seqs)
}

/// What a deposited envelope carries, as its sender declares it.
///
/// Lying buys nothing: a receipt declared `Message` is treated as a message (which a real
/// message could have been anyway), and a message declared `Receipt` only gets shed sooner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DepositClass {
    /// A chat message (or anything that is not a receipt): shed last.
    #[default]
    Message,
    /// A delivery or read receipt: shed before messages, retried by its sender.
    Receipt,
}

impl Request {
    /// The request's id.
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Deposit { req_id, .. }
            | Request::Fetch { req_id, .. }
            | Request::Ack { req_id, .. } => *req_id,
        }
    }
}

/// One stored envelope with its mailbox sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The relay's sequence number for this entry; ack it to delete the entry.
    pub seq: u64,
    /// The stored envelope, exactly as deposited.
    pub envelope: Envelope,
}

/// A relay's answer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The deposit is stored durably.
    Stored {
        /// The request's id.
        req_id: u64,
    },
    /// Entries of the caller's mailbox, oldest first.
    Batch {
        /// The request's id.
        req_id: u64,
        /// The entries.
        items: Vec<Item>,
        /// Whether more entries follow the last one.
        more: bool,
    },
    /// The acked entries are deleted.
    Acked {
        /// The request's id.
        req_id: u64,
        /// How many entries were removed.
        removed: u32,
    },
    /// Refused.
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
        /// For a refusal that may succeed later (a full mailbox, a rate limit): how long the
        /// sender should wait before asking this relay again for this recipient. Absent from
        /// older relays' answers (and ignored by older nodes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl Response {
    /// A refusal with no advice on when to come back.
    pub fn rejected(req_id: u64, reason: Reject) -> Self {
        let retry_after_ms = match reason {
            Reject::Busy { retry_after_ms } => Some(retry_after_ms),
            _ => None,
        };
        Response::Rejected {
            req_id,
            reason,
            retry_after_ms,
        }
    }
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Stored { req_id }
            | Response::Batch { req_id, .. }
            | Response::Acked { req_id, .. }
            | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor;

    #[test]
    fn an_ack_with_too_many_seqs_is_refused_while_decoding() {
        let ok = Request::Ack {
            req_id: 1,
            seqs: (0..MAX_IDS_PER_BATCH as u64).collect(),
        };
        let bytes = cbor::encode(&ok, MAX_REQUEST_BYTES).expect("encodes");
        assert_eq!(
            cbor::decode::<Request>(&bytes, MAX_REQUEST_BYTES).ok(),
            Some(ok)
        );
        let over = Request::Ack {
            req_id: 1,
            seqs: vec![0; MAX_IDS_PER_BATCH + 1],
        };
        let bytes = cbor::encode(&over, MAX_REQUEST_BYTES).expect("encodes");
        let err = cbor::decode::<Request>(&bytes, MAX_REQUEST_BYTES).expect_err("too many");
        assert!(err.to_string().contains("1025"), "{err}");
    }

    #[test]
    fn retry_after_is_optional_both_ways() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        enum OldResponse {
            Rejected { req_id: u64, reason: Reject },
        }
        let new = Response::Rejected {
            req_id: 4,
            reason: Reject::QuotaExceeded,
            retry_after_ms: Some(1_500),
        };
        let bytes = cbor::encode(&new, MAX_FRAME_BYTES).expect("encodes");
        let old: OldResponse = cbor::decode(&bytes, MAX_FRAME_BYTES).expect("an old node reads it");
        assert_eq!(
            old,
            OldResponse::Rejected {
                req_id: 4,
                reason: Reject::QuotaExceeded
            }
        );
        let bytes = cbor::encode(&old, MAX_FRAME_BYTES).expect("encodes");
        let back: Response = cbor::decode(&bytes, MAX_FRAME_BYTES).expect("a new node reads it");
        assert_eq!(back, Response::rejected(4, Reject::QuotaExceeded));
    }

    /// A deposit from a node that predates the class hint decodes as a message.
    #[test]
    fn a_deposit_without_a_class_is_a_message() {
        #[derive(Serialize)]
        enum OldRequest {
            Deposit { req_id: u64, envelope: Envelope },
        }
        let key = libp2p_identity::Keypair::generate_ed25519();
        let to = key.public().to_peer_id();
        let envelope = Envelope::seal(
            &key,
            crate::envelope::Header {
                id: crate::MessageId::random(),
                to: crate::Destination::Peer(to),
                sent_at_ms: 1,
                lamport: 1,
                expires_at_ms: None,
            },
            &crate::Body::Chat { text: "hi".into() },
        )
        .expect("seals");
        let old = OldRequest::Deposit {
            req_id: 3,
            envelope: envelope.clone(),
        };
        let bytes = cbor::encode(&old, MAX_FRAME_BYTES).expect("encodes");
        let new: Request = cbor::decode(&bytes, MAX_FRAME_BYTES).expect("decodes");
        assert_eq!(
            new,
            Request::Deposit {
                req_id: 3,
                envelope,
                class: DepositClass::Message
            }
        );
    }
}
