//! The group gateway: the part of the group directory that runs inside the swarm task.
//!
//! It never waits: `Submit` and `Get` go to the [group service](super::service), a `Post` is
//! checked against the [`Directory`] and handed to the mailbox service for fan-out; each answer
//! comes back as a [`Done`] through [`Gateway::next`], and [`Gateway::finish`] answers the
//! requester, publishes on the group's gossipsub topic and returns the pushes the swarm task
//! should make (see the delivery design in [the module](super)).

use std::collections::HashSet;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kith_net::codec::Message;
use kith_protocol::group::{self, OpError, Request, Response};
use kith_protocol::limits::MAX_ENVELOPE_BYTES;
use kith_protocol::{cbor, mailbox, Destination, Envelope, GroupId, PeerId, Reject, VerifyError};
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::Swarm;

use crate::mailbox::rate::{RateLimiter, TokenBucket};

use super::service::{self, Announce};
use super::Directory;
use crate::clock::Clock;
use crate::lanes::Lanes;
use crate::mailbox::service::{self as mailbox_service, Push};
use crate::metrics::Metrics;
use crate::requests::{self, Channel};
use crate::swarm::Behaviour;

/// Where an answer goes.
type Reply = (PeerId, Channel<Response>, u64);

/// Work that has finished off the swarm task.
pub enum Done {
    /// The group service answered a `Submit` or `Get`.
    Answer {
        /// The requester.
        reply: Reply,
        /// The service's answer (`None`: it stopped).
        outcome: Option<service::Outcome>,
        /// Whether the requester's connection was a newcomer's ([`crate::lanes`]).
        newcomer: bool,
    },
    /// A message or an operation was fanned out into members' mailboxes.
    FannedOut {
        /// The requester, for a `Post`.
        reply: Option<Reply>,
        /// The group.
        group: GroupId,
        /// The envelope.
        envelope: Envelope,
        /// How many copies, which pushes and which members missed theirs, or why nothing was
        /// stored (`None`: the store failed).
        result: Result<(u32, Vec<Push>, Vec<PeerId>), Option<mailbox::Response>>,
    },
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The delay a `Busy` answer asks for.
    pub busy_retry_after_ms: u64,
    /// Sustained membership operations (creations included) per second per peer.
    pub ops_per_sec_per_peer: u32,
    /// Membership operations a peer may submit in a burst.
    pub op_burst_per_peer: u32,
    /// Sustained group creations per second, all peers together.
    pub creations_per_sec: u32,
    /// Group creations in a burst, all peers together.
    pub creation_burst: u32,
    /// Sustained membership operations per second, all newcomers together.
    pub newcomer_ops_per_sec: u32,
    /// Newcomers' membership operations in a burst, all together.
    pub newcomer_op_burst: u32,
    /// The clock (for expiry).
    pub clock: Clock,
}

/// The gateway.
pub struct Gateway {
    service: service::Handle,
    directory: Directory,
    mailbox: mailbox_service::Handle,
    /// Where a requester goes when it is asked to come back later ([`Lanes::refused`]).
    lanes: Lanes,
    metrics: Metrics,
    settings: Settings,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Membership operations per peer.
    ops: RateLimiter,
    /// Group creations, all peers together: a fresh identity gets a burst of `ops` of its own,
    /// and creating a group is how it starts spending it.
    creations: TokenBucket,
    /// Membership operations of newcomers ([`crate::lanes`]), all together: the relay spends
    /// a bounded share of its writes on peers it does not know yet, whoever they say they are.
    newcomer_ops: TokenBucket,
}

impl Gateway {
    /// A gateway over the group service, the directory and the mailbox service.
    pub fn new(
        service: service::Handle,
        directory: Directory,
        mailbox: mailbox_service::Handle,
        lanes: Lanes,
        metrics: Metrics,
        settings: Settings,
    ) -> Self {
        Self {
            service,
            directory,
            mailbox,
            lanes,
            metrics,
            ops: RateLimiter::new(settings.ops_per_sec_per_peer, settings.op_burst_per_peer),
            creations: TokenBucket::full(settings.creation_burst, settings.clock.now_ms()),
            newcomer_ops: TokenBucket::full(settings.newcomer_op_burst, settings.clock.now_ms()),
            settings,
            pending: FuturesUnordered::new(),
        }
    }

    /// The next finished piece of work; pending forever when there is none.
    pub async fn next(&mut self) -> Done {
        match self.pending.next().await {
            Some(done) => done,
            None => futures::future::pending().await,
        }
    }

    /// Whether work is in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    fn respond(&self, swarm: &mut Swarm<Behaviour>, reply: Reply, response: Response) {
        let (peer, channel, req_id) = reply;
        match &response {
            Response::Rejected { reason, .. } => {
                self.metrics.reject(reason);
                self.lanes.after_refusal(&peer, reason);
            }
            // Logged at debug only (strangers can send them by the thousand): counted here.
            Response::Refused { .. } => self.metrics.limit_hit("group_op_refused"),
            _ => {}
        }
        if !requests::respond(&mut swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, req_id, "group requester went away before its answer");
        }
    }

    /// Handles an inbound `/kith/group/1` request.
    pub fn on_request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        newcomer: bool,
        request: Message<Request>,
        channel: Channel<Response>,
    ) {
        let request = match request {
            Message::Valid(request) => request,
            Message::Invalid { reason, detail } => {
                tracing::debug!(%peer, %reason, detail, "invalid group request");
                return self.respond(
                    swarm,
                    (peer, channel, 0),
                    Response::Rejected { req_id: 0, reason },
                );
            }
            Message::Raw(_) => {
                return self.respond(
                    swarm,
                    (peer, channel, 0),
                    Response::Rejected {
                        req_id: 0,
                        reason: Reject::Malformed,
                    },
                )
            }
        };
        let req_id = request.req_id();
        let reply = (peer, channel, req_id);
        match request {
            Request::Post { envelope, .. } => match self.check_post(&peer, &envelope) {
                Ok((group, recipients)) => {
                    if let Err(reply) =
                        self.fan_out(Some(reply), group, envelope, recipients, newcomer)
                    {
                        self.busy(swarm, reply);
                    }
                }
                Err(response) => self.respond(swarm, reply, response(req_id)),
            },
            Request::Submit { .. } if !self.ops.check(&peer, self.settings.clock.now_ms()) => {
                self.metrics.limit_hit("group_op_rate");
                tracing::debug!(%peer, "group operation over the peer's rate");
                let reason = Reject::Busy {
                    retry_after_ms: self.ops.refill_ms(),
                };
                self.respond(swarm, reply, Response::Rejected { req_id, reason });
            }
            Request::Submit { .. } if newcomer && !self.newcomer_may_submit() => {
                self.metrics.limit_hit("group_newcomer_op_rate");
                tracing::debug!(%peer, "group operation over the newcomers' rate");
                let reason = Reject::Busy {
                    retry_after_ms: 1_000 / u64::from(self.settings.newcomer_ops_per_sec.max(1)),
                };
                self.respond(swarm, reply, Response::Rejected { req_id, reason });
            }
            Request::Submit { ref op, .. } if !self.may_create(op) => {
                self.metrics.limit_hit("group_creation_rate");
                tracing::debug!(%peer, "group creation over the relay's rate");
                let reason = Reject::Busy {
                    retry_after_ms: 1_000 / u64::from(self.settings.creations_per_sec.max(1)),
                };
                self.respond(swarm, reply, Response::Rejected { req_id, reason });
            }
            request => match self.service.try_request(peer, request, newcomer) {
                Ok(rx) => self.pending.push(Box::pin(async move {
                    Done::Answer {
                        reply,
                        outcome: rx.await.ok(),
                        newcomer,
                    }
                })),
                Err(service::Busy) => self.busy(swarm, Some(reply)),
            },
        }
    }

    /// Whether an operation may go on to the service as far as the relay-wide creation rate
    /// goes: one for a group this relay does not host (a creation, or refused later as
    /// unknown) takes a token; others pass. Checked before the signature: the cheap refusal.
    fn may_create(&mut self, op: &Envelope) -> bool {
        let Destination::Group(group) = op.to else {
            return true;
        };
        if self.directory.get(&group).is_some() {
            return true;
        }
        self.creations.try_take(
            self.settings.creation_burst,
            self.settings.creations_per_sec,
            self.settings.clock.now_ms(),
        )
    }

    /// Whether a newcomer's operation fits the newcomers' shared rate (takes a token).
    fn newcomer_may_submit(&mut self) -> bool {
        self.newcomer_ops.try_take(
            self.settings.newcomer_op_burst,
            self.settings.newcomer_ops_per_sec,
            self.settings.clock.now_ms(),
        )
    }

    fn busy(&self, swarm: &mut Swarm<Behaviour>, reply: Option<Reply>) {
        if let Some(reply) = reply {
            tracing::warn!(peer = %reply.0, req_id = reply.2, "group request answered busy");
            let response = Response::Rejected {
                req_id: reply.2,
                reason: Reject::Busy {
                    retry_after_ms: self.settings.busy_retry_after_ms,
                },
            };
            self.respond(swarm, reply, response);
        }
    }

    /// Checks an uploaded group message: signed, from the connection's peer, for a hosted group
    /// that counts it as a member, not expired. Returns the group and the other members.
    #[allow(clippy::type_complexity)]
    fn check_post(
        &self,
        peer: &PeerId,
        envelope: &Envelope,
    ) -> Result<(GroupId, Vec<PeerId>), Box<dyn FnOnce(u64) -> Response>> {
        let rejected = |reason: Reject| -> Box<dyn FnOnce(u64) -> Response> {
            Box::new(move |req_id| Response::Rejected { req_id, reason })
        };
        if let Err(e) = envelope.verify() {
            tracing::warn!(%peer, id = %envelope.id, error = %e, "refusing a group post");
            return Err(rejected(match e {
                VerifyError::UnsupportedVersion(_) => Reject::UnsupportedVersion,
                VerifyError::BodyTooLarge { max, .. } => Reject::TooLarge { max: max as u64 },
                _ => Reject::BadSignature,
            }));
        }
        if envelope.from != *peer {
            tracing::warn!(%peer, from = %envelope.from, "refusing a group post for another sender");
            return Err(rejected(Reject::WrongSender));
        }
        let Destination::Group(group) = envelope.to else {
            return Err(rejected(Reject::WrongRecipient));
        };
        if envelope.is_expired(self.settings.clock.now_ms()) {
            return Err(rejected(Reject::Expired));
        }
        let Some(state) = self.directory.get(&group) else {
            tracing::warn!(%peer, %group, "post to a group not hosted here");
            return Err(Box::new(|req_id| Response::Refused {
                req_id,
                reason: OpError::UnknownGroup,
            }));
        };
        if !state.is_member(peer) {
            tracing::warn!(%peer, %group, "post from a non-member refused");
            let who = peer.to_string();
            return Err(Box::new(move |req_id| Response::Refused {
                req_id,
                reason: OpError::NotMember { peer: who },
            }));
        }
        let recipients = state
            .members
            .iter()
            .filter(|m| *m != peer)
            .copied()
            .collect();
        Ok((group, recipients))
    }

    /// Starts storing `envelope` for `recipients` (after other requests, for a `newcomer`'s).
    /// Gives the reply back if the mailbox is busy.
    fn fan_out(
        &mut self,
        reply: Option<Reply>,
        group: GroupId,
        envelope: Envelope,
        recipients: Vec<PeerId>,
        newcomer: bool,
    ) -> Result<(), Option<Reply>> {
        let rx = match self
            .mailbox
            .try_fan_out(recipients, envelope.clone(), newcomer)
        {
            Ok(rx) => rx,
            Err(_) => {
                tracing::warn!(%group, id = %envelope.id, "mailbox busy; group fan-out refused");
                return Err(reply);
            }
        };
        self.pending.push(Box::pin(async move {
            let result = match rx.await {
                Ok(fan) => match fan.flushed.await {
                    Ok(outcome) if matches!(outcome.response, mailbox::Response::Stored { .. }) => {
                        Ok((fan.stored, fan.pushes, fan.missed))
                    }
                    Ok(outcome) => Err(Some(outcome.response)),
                    Err(_) => Err(None),
                },
                Err(_) => Err(None),
            };
            Done::FannedOut {
                reply,
                group,
                envelope,
                result,
            }
        }));
        Ok(())
    }

    /// Completes finished work; returns the pushes the swarm task should make.
    pub fn finish(&mut self, swarm: &mut Swarm<Behaviour>, done: Done) -> Vec<Push> {
        match done {
            Done::Answer {
                reply,
                outcome,
                newcomer,
            } => {
                let req_id = reply.2;
                let Some(service::Outcome { response, announce }) = outcome else {
                    tracing::error!("the group service dropped a request");
                    self.respond(
                        swarm,
                        reply,
                        Response::Rejected {
                            req_id,
                            reason: Reject::StoreFailed,
                        },
                    );
                    return Vec::new();
                };
                self.respond(swarm, reply, response);
                if let Some(Announce {
                    group,
                    envelope,
                    recipients,
                }) = announce
                {
                    if self
                        .fan_out(None, group, envelope, recipients, newcomer)
                        .is_err()
                    {
                        tracing::warn!(%group, "membership change not announced (mailbox busy); members catch up on their next sync");
                    }
                }
                Vec::new()
            }
            Done::FannedOut {
                reply,
                group,
                envelope,
                result,
            } => {
                let (stored, pushes, missed) = match result {
                    Ok(done) => done,
                    Err(refused) => {
                        let reason = match refused {
                            Some(mailbox::Response::Rejected { reason, .. }) => {
                                tracing::debug!(%group, id = %envelope.id, from = %envelope.from, %reason, "group fan-out refused");
                                reason
                            }
                            _ => {
                                tracing::error!(%group, id = %envelope.id, "group fan-out failed to store");
                                Reject::StoreFailed
                            }
                        };
                        if let Some(reply) = reply {
                            let req_id = reply.2;
                            self.respond(swarm, reply, Response::Rejected { req_id, reason });
                        }
                        return Vec::new();
                    }
                };
                if let Some(reply) = reply {
                    let req_id = reply.2;
                    self.respond(
                        swarm,
                        reply,
                        Response::Stored {
                            req_id,
                            recipients: stored,
                            missed: missed.into_iter().collect(),
                        },
                    );
                }
                if pushes.is_empty() {
                    // A duplicate upload: every copy was stored (and published) before.
                    return pushes;
                }
                self.publish_and_pick(swarm, &group, &envelope, pushes)
            }
        }
    }

    /// Publishes on the group's topic and keeps the pushes for members the publish did not
    /// reach: every connected member if the publish failed, else those not subscribed.
    fn publish_and_pick(
        &self,
        swarm: &mut Swarm<Behaviour>,
        group: &GroupId,
        envelope: &Envelope,
        pushes: Vec<Push>,
    ) -> Vec<Push> {
        let topic = IdentTopic::new(group::topic(group));
        let data = match cbor::encode(envelope, MAX_ENVELOPE_BYTES + 1024) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(%group, error = %e, "cannot encode a group envelope for gossip");
                return pushes;
            }
        };
        let gossip = &mut swarm.behaviour_mut().gossipsub;
        match gossip.publish(topic.clone(), data) {
            Ok(_) => {
                let hash = topic.hash();
                let subscribed: HashSet<PeerId> = gossip
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .map(|(peer, _)| *peer)
                    .collect();
                pushes
                    .into_iter()
                    .filter(|p| !subscribed.contains(&p.recipient))
                    .collect()
            }
            Err(e) => {
                // Not queued by gossipsub: store-and-forward (the pushes) takes over.
                tracing::debug!(%group, error = %e, "group publish failed; pushing instead");
                pushes
            }
        }
    }

    /// Gossip that reaches the relay is never forwarded: members upload with `Post`, which is
    /// durable and checked, and the relay alone publishes.
    pub fn on_gossip(&mut self, swarm: &mut Swarm<Behaviour>, event: gossipsub::Event) {
        if let gossipsub::Event::Message {
            propagation_source,
            message_id,
            ..
        } = event
        {
            tracing::debug!(peer = %propagation_source, "ignoring gossip published by a peer");
            swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    gossipsub::MessageAcceptance::Ignore,
                );
        }
    }
}
