//! The group service: one task that owns the group [`Store`] and orders each group's chain of
//! operations.
//!
//! Flow of a `Submit`: verify the envelope and decode its operation; if the operation names a
//! version other than the group's current one, answer `Conflict` with the current state (the
//! first valid operation for a version wins); otherwise validate it with
//! [`State::apply`] (or [`State::create`]), append it, flush, publish the new state in the
//! [`Directory`], and answer `Applied`, together with an [`Announce`] so the swarm task can tell
//! the old and new members. Operations are handled one at a time, so two admins racing for the
//! same version are ordered here.

use std::collections::BTreeSet;

use kith_protocol::group::{self, Change, Handshake, Limits, OpError, Request, Response, State};
use kith_protocol::{Envelope, GroupId, PeerId, Reject};
use tokio::sync::oneshot;

use super::store::Store;
use super::Directory;
use crate::metrics::Metrics;
use crate::queues::{queues, Receivers, Senders};

/// Tell these members about an applied operation.
#[derive(Debug, Clone)]
pub struct Announce {
    /// The group.
    pub group: GroupId,
    /// The operation envelope.
    pub envelope: Envelope,
    /// Old and new members, except the author.
    pub recipients: Vec<PeerId>,
}

/// The answer to one request, and whom to tell.
#[derive(Debug)]
pub struct Outcome {
    /// The response.
    pub response: Response,
    /// An applied operation to announce.
    pub announce: Option<Announce>,
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Membership limits.
    pub limits: Limits,
    /// This relay's peer id: a group created here must name it as its home relay.
    pub relay: PeerId,
}

#[derive(Debug)]
struct Command {
    peer: PeerId,
    request: Request,
    reply: oneshot::Sender<Outcome>,
}

/// The service's queue is full; answer `Busy`.
#[derive(Debug, thiserror::Error)]
#[error("the group service is busy")]
pub struct Busy;

/// A cloneable handle to the service.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Requests from connections on the newcomers' lane ([`crate::lanes`]) are served when no
    /// other waits.
    tx: Senders<Command>,
}

impl Handle {
    /// Queues a `Submit` or `Get` request from `peer` without waiting. A request from a
    /// connection on the newcomers' lane (`newcomer`) waits for the others.
    pub fn try_request(
        &self,
        peer: PeerId,
        request: Request,
        newcomer: bool,
    ) -> Result<oneshot::Receiver<Outcome>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .to(newcomer)
            .try_send(Command {
                peer,
                request,
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }
}

/// The service's end of the queues.
#[derive(Debug)]
pub struct Receiver(Receivers<Command>);

/// Creates the handle and the receiving end for [`run`]; requests from newcomers each have the
/// same room again.
pub fn channel(capacity: usize) -> (Handle, Receiver) {
    let (tx, rx) = queues(capacity);
    (Handle { tx }, Receiver(rx))
}

/// Runs until every [`Handle`] is dropped.
pub async fn run(
    store: Store,
    directory: Directory,
    settings: Settings,
    Receiver(mut rx): Receiver,
    metrics: Metrics,
) {
    let mut next = Vec::with_capacity(1);
    while rx.recv_many(&mut next, 1, 1).await > 0 {
        let Some(Command {
            peer,
            request,
            reply,
        }) = next.pop()
        else {
            continue;
        };
        let outcome = match request {
            Request::Submit {
                req_id,
                op,
                handshake,
            } => submit(&store, &directory, &settings, &peer, req_id, op, handshake).await,
            Request::Get {
                req_id,
                group,
                after_version,
                limit,
            } => {
                let limit = limit.clamp(1, group::MAX_OPS_PER_PAGE) as usize;
                // Only members read a group's chain (who is in it, and who changed what).
                let member = directory.get(&group).is_some_and(|s| s.is_member(&peer));
                let response = if !member {
                    tracing::debug!(%peer, %group, "chain read by a non-member refused");
                    metrics.limit_hit("group_read_non_member");
                    Response::Refused {
                        req_id,
                        reason: group::OpError::NotMember {
                            peer: peer.to_string(),
                        },
                    }
                } else {
                    match store.ops(&group, after_version, limit) {
                        Ok((ops, handshakes, more)) => Response::Ops {
                            req_id,
                            ops,
                            more,
                            handshakes,
                        },
                        Err(e) => {
                            tracing::error!(%group, error = %e, "reading a group chain");
                            Response::Rejected {
                                req_id,
                                reason: Reject::StoreFailed,
                            }
                        }
                    }
                };
                Outcome {
                    response,
                    announce: None,
                }
            }
            Request::Post { req_id, .. } => Outcome {
                // Posts are handled by the gateway; one that arrives here is a routing bug.
                response: Response::Rejected {
                    req_id,
                    reason: Reject::Malformed,
                },
                announce: None,
            },
        };
        if let Response::Rejected { reason, .. } = &outcome.response {
            metrics.reject(reason);
        }
        let _ = reply.send(outcome);
    }
}

fn refused(peer: &PeerId, req_id: u64, reason: OpError) -> Outcome {
    // Counted as `limit_hits{limit="group_op_refused"}`; a line each would let fresh
    // identities fill the log.
    tracing::debug!(%peer, req_id, %reason, "group operation refused");
    Outcome {
        response: Response::Refused { req_id, reason },
        announce: None,
    }
}

async fn submit(
    store: &Store,
    directory: &Directory,
    settings: &Settings,
    peer: &PeerId,
    req_id: u64,
    envelope: Envelope,
    handshake: Option<Handshake>,
) -> Outcome {
    let op = match group::open_op(&envelope) {
        Ok(op) => op,
        Err(e) => {
            // Counted in `kith_relay_rejects_total`.
            tracing::debug!(%peer, req_id, error = %e, "refusing a group operation envelope");
            return Outcome {
                response: Response::Rejected {
                    req_id,
                    reason: e.reject(),
                },
                announce: None,
            };
        }
    };
    let author = envelope.from;
    let current = directory.get(&op.group);
    let next = match (&current, &op.change) {
        (None, Change::Create { relay, .. }) => {
            if !relay.ends_with(&format!("/p2p/{}", settings.relay)) {
                return refused(peer, req_id, OpError::BadRelay);
            }
            State::create(author, &op, &settings.limits)
        }
        (Some(_), Change::Create { .. }) => Err(OpError::AlreadyExists),
        (None, _) => Err(OpError::UnknownGroup),
        (Some(state), _) if op.version != state.version => {
            tracing::debug!(group = %op.group, version = op.version, current = state.version, "group operation conflicts");
            return Outcome {
                response: Response::Conflict {
                    req_id,
                    state: state.clone(),
                },
                announce: None,
            };
        }
        (Some(state), _) => state.apply(author, &op, &settings.limits),
    };
    let next = match next {
        Ok(next) => next,
        Err(reason) => return refused(peer, req_id, reason),
    };
    // The commit and Welcome must be the ones the operation signed: members fetch them here.
    if let Err(reason) = op.check_handshake(handshake.as_ref()) {
        return refused(peer, req_id, reason);
    }
    let durable = match store.append(&next, &envelope, handshake.as_ref()) {
        Ok(()) => store.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = durable {
        tracing::error!(group = %op.group, error = %e, "cannot store a group operation");
        return Outcome {
            response: Response::Rejected {
                req_id,
                reason: Reject::StoreFailed,
            },
            announce: None,
        };
    }
    directory.insert(next.clone());
    tracing::debug!(group = %op.group, version = next.version, members = next.members.len(), "group operation applied");
    let mut recipients: BTreeSet<PeerId> = next.members.clone();
    if let Some(old) = &current {
        recipients.extend(old.members.iter().copied());
    }
    recipients.remove(&author);
    Outcome {
        response: Response::Applied {
            req_id,
            version: next.version,
        },
        announce: Some(Announce {
            group: op.group,
            envelope,
            recipients: recipients.into_iter().collect(),
        }),
    }
}
