//! `/kith/dm/1`: deliver envelopes to their recipient's node.
//!
//! Flow: the sender (or a relay delivering for it) sends a [`Request`]; the recipient verifies
//! the envelope, stores it, flushes, and only then answers [`Response::Accepted`]. Any refusal is
//! a [`Response::Rejected`] with a typed [`Reject`]. The response echoes the request's `req_id`.
//!
//! A sender with several envelopes queued for the same recipient may send up to [`MAX_BATCH`] in
//! one request (`envelope` plus `more`). The recipient handles each as if it came alone, writes
//! them all, and answers after one flush: [`Response::Accepted`] when every one is stored,
//! [`Response::Partly`] listing the refused ones otherwise (the others are stored), or
//! [`Response::Rejected`] when the whole request is refused.

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::limits::{MAX_DM_BATCH, MAX_DM_BATCH_BYTES, MAX_DM_FRAME_BYTES};
use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/dm/1";

/// Largest frame on this protocol.
pub const MAX_FRAME_BYTES: usize = MAX_DM_FRAME_BYTES;

/// Most envelopes in one request.
pub const MAX_BATCH: usize = MAX_DM_BATCH;

/// Most bytes of [`Envelope::size_bound`] that `more` may carry.
pub const MAX_BATCH_BYTES: usize = MAX_DM_BATCH_BYTES;

/// Deliver these envelopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the requester, echoed in the response.
    pub req_id: u64,
    /// The (first) envelope to deliver.
    pub envelope: Envelope,
    /// More envelopes for the same recipient, each handled as if it came in its own request.
    /// Absent on the wire when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<Envelope>,
}

impl Request {
    /// A request carrying one envelope.
    pub fn new(req_id: u64, envelope: Envelope) -> Self {
        Self {
            req_id,
            envelope,
            more: Vec::new(),
        }
    }

    /// A request carrying `envelopes` (at least one), or `None` when there is none or they
    /// break [`MAX_BATCH`] or [`MAX_BATCH_BYTES`]; see [`Request::fits`].
    pub fn batch(req_id: u64, envelopes: Vec<Envelope>) -> Option<Self> {
        let mut envelopes = envelopes.into_iter();
        let envelope = envelopes.next()?;
        let request = Self {
            req_id,
            envelope,
            more: envelopes.collect(),
        };
        request.is_within_limits().then_some(request)
    }

    /// Whether a batch holding `count` envelopes whose `more` part weighs `more_bytes` (sum of
    /// [`Envelope::size_bound`]) may take one more envelope of `next_bytes`.
    pub fn fits(count: usize, more_bytes: usize, next_bytes: usize) -> bool {
        count == 0 || (count < MAX_BATCH && more_bytes + next_bytes <= MAX_BATCH_BYTES)
    }

    /// Whether the request respects [`MAX_BATCH`] and [`MAX_BATCH_BYTES`].
    pub fn is_within_limits(&self) -> bool {
        self.more.len() < MAX_BATCH
            && self.more.iter().map(Envelope::size_bound).sum::<usize>() <= MAX_BATCH_BYTES
    }

    /// How many envelopes it carries.
    pub fn len(&self) -> usize {
        1 + self.more.len()
    }

    /// Never empty: a request carries at least one envelope.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Its envelopes, in order.
    pub fn into_envelopes(self) -> Vec<Envelope> {
        let mut all = Vec::with_capacity(self.len());
        all.push(self.envelope);
        all.extend(self.more);
        all
    }
}

/// One refused envelope of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Its position in the request: 0 is `envelope`, 1 the first of `more`.
    pub index: u32,
    /// Why.
    pub reason: Reject,
}

/// The recipient's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Stored durably (or already stored earlier: duplicates are accepted again).
    Accepted {
        /// The request's id.
        req_id: u64,
    },
    /// Refused (every envelope of the request).
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
    },
    /// Some envelopes of a batch refused; every one not listed is stored durably.
    Partly {
        /// The request's id.
        req_id: u64,
        /// The refused ones.
        refused: Vec<Refused>,
    },
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Accepted { req_id }
            | Response::Rejected { req_id, .. }
            | Response::Partly { req_id, .. } => *req_id,
        }
    }

    /// The answer for a request of `count` envelopes given each one's outcome, in order.
    pub fn for_outcomes(req_id: u64, outcomes: &[Result<(), Reject>]) -> Self {
        let refused: Vec<Refused> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref().err().map(|reason| Refused {
                    index: i as u32,
                    reason: reason.clone(),
                })
            })
            .collect();
        match (outcomes.len(), refused.first()) {
            (_, None) => Response::Accepted { req_id },
            (1, Some(one)) => Response::Rejected {
                req_id,
                reason: one.reason.clone(),
            },
            _ => Response::Partly { req_id, refused },
        }
    }

    /// The outcome for envelope `index` of the request this answers.
    pub fn outcome(&self, index: usize) -> Result<(), Reject> {
        match self {
            Response::Accepted { .. } => Ok(()),
            Response::Rejected { reason, .. } => Err(reason.clone()),
            Response::Partly { refused, .. } => refused
                .iter()
                .find(|r| r.index as usize == index)
                .map_or(Ok(()), |r| Err(r.reason.clone())),
        }
    }
}
