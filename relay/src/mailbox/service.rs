//! The mailbox service: one task that owns the [`Store`] and answers `/kith/mailbox/1` requests.
//!
//! Flow: the swarm task receives a request, hands it here with [`Handle::try_request`] (a full
//! queue is answered `Busy` at once, so the swarm never waits), and keeps the libp2p response
//! channel itself. This task validates and applies the request:
//!
//! - `Deposit`: verify the signature, require a peer recipient, refuse expired envelopes, check
//!   the depositor's rate and the recipient's quota, store (deduplicated by `(from, id)`), then
//!   pass the `Stored` answer to the [flusher](super::flusher), which releases it after the
//!   flush. A newly stored envelope comes back with a [`Push`] so the swarm can deliver it at
//!   once to a connected recipient; when that recipient accepts, [`Handle::try_delivered`]
//!   removes the entry.
//! - `Fetch` and `Ack`: always on the mailbox of the connection's own peer id.
//!
//! A periodic purge drops entries past their retention deadline. The task stops when every
//! [`Handle`] is gone, and flushes the store one last time.

use std::time::Duration;

use kith_protocol::limits::{MAX_BODY_BYTES, MAX_FETCH_BATCH, MAX_IDS_PER_BATCH};
use kith_protocol::mailbox::{Request, Response, MAX_FRAME_BYTES};
use kith_protocol::{Destination, Envelope, PeerId, Reject, VerifyError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::flusher::Job;
use super::rate::RateLimiter;
use super::store::{AckError, DepositError, Store, Usage};
use crate::clock::Clock;
use crate::metrics::Metrics;

/// An envelope to push to its connected recipient.
#[derive(Debug, Clone)]
pub struct Push {
    /// Whose mailbox holds it.
    pub recipient: PeerId,
    /// Its sequence number there.
    pub seq: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// The answer to one request, and what to push afterwards.
#[derive(Debug)]
pub struct Outcome {
    /// The response for the requester.
    pub response: Response,
    /// A newly stored envelope to push to its recipient, if connected.
    pub push: Option<Push>,
}

impl Outcome {
    /// An answer with nothing to push.
    pub fn reply(response: Response) -> Self {
        Self {
            response,
            push: None,
        }
    }
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sustained deposits per second per depositing peer.
    pub deposits_per_sec_per_peer: u32,
    /// Deposit burst per depositing peer.
    pub deposit_burst_per_peer: u32,
    /// How often to purge expired entries.
    pub purge_interval: Duration,
    /// The clock.
    pub clock: Clock,
}

enum Command {
    Request {
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Outcome>,
    },
    Delivered {
        owner: PeerId,
        seq: u64,
    },
    Usage {
        owner: Option<PeerId>,
        reply: oneshot::Sender<Usage>,
    },
    Purge {
        reply: oneshot::Sender<u64>,
    },
    FanOut {
        recipients: Vec<PeerId>,
        envelope: Box<Envelope>,
        reply: oneshot::Sender<FanOut>,
    },
}

/// A group message stored in many mailboxes (server-side fan-out), waiting for its flush.
#[derive(Debug)]
pub struct FanOut {
    /// Released by the flusher (`Stored`) once every copy is durable.
    pub flushed: oneshot::Receiver<Outcome>,
    /// One push per newly stored copy.
    pub pushes: Vec<Push>,
    /// How many recipients hold a copy.
    pub stored: u32,
}

/// The service's queue is full; answer `Busy`.
#[derive(Debug, thiserror::Error)]
#[error("the mailbox service is busy")]
pub struct Busy;

/// Why a query to the service failed.
#[derive(Debug, thiserror::Error)]
#[error("the mailbox service has stopped")]
pub struct Stopped;

/// A cloneable handle to the service.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Queues `request` from `peer` without waiting; the answer arrives on the receiver.
    pub fn try_request(
        &self,
        peer: PeerId,
        request: Request,
    ) -> Result<oneshot::Receiver<Outcome>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Command::Request {
                peer,
                request: Box::new(request),
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }

    /// Reports that `owner` accepted the pushed entry `seq`, which can go. Dropped when the
    /// queue is full: the node then fetches it again and deduplicates.
    pub fn try_delivered(&self, owner: PeerId, seq: u64) -> Result<(), Busy> {
        self.tx
            .try_send(Command::Delivered { owner, seq })
            .map_err(|_| Busy)
    }

    /// Queues a group envelope (already checked by the group gateway) for the mailboxes of
    /// `recipients`, without waiting.
    pub fn try_fan_out(
        &self,
        recipients: Vec<PeerId>,
        envelope: Envelope,
    ) -> Result<oneshot::Receiver<FanOut>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Command::FanOut {
                recipients,
                envelope: Box::new(envelope),
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }

    /// Entries and bytes waiting for `owner`, or in all mailboxes.
    pub async fn usage(&self, owner: Option<PeerId>) -> Result<Usage, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Usage { owner, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Purges expired entries now; returns how many went.
    pub async fn purge(&self) -> Result<u64, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Purge { reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Creates the handle and the receiving end for [`run`], with room for `capacity` requests.
pub fn channel(capacity: usize) -> (Handle, Receiver) {
    let (tx, rx) = mpsc::channel(capacity);
    (Handle { tx }, Receiver(rx))
}

/// The service's end of the queue.
#[derive(Debug)]
pub struct Receiver(mpsc::Receiver<Command>);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { peer, request, .. } => {
                write!(f, "Request({peer}, {})", request.req_id())
            }
            Command::Delivered { owner, seq } => write!(f, "Delivered({owner}, {seq})"),
            Command::Usage { .. } => f.write_str("Usage"),
            Command::Purge { .. } => f.write_str("Purge"),
            Command::FanOut { recipients, .. } => write!(f, "FanOut({})", recipients.len()),
        }
    }
}

struct Service {
    store: Store,
    rate: RateLimiter,
    settings: Settings,
    flusher: mpsc::Sender<Job>,
    metrics: Metrics,
}

/// Runs the service until every [`Handle`] is dropped, then flushes the store.
pub async fn run(
    store: Store,
    settings: Settings,
    Receiver(mut rx): Receiver,
    flusher: mpsc::Sender<Job>,
    metrics: Metrics,
) -> Result<(), sled::Error> {
    let mut service = Service {
        rate: RateLimiter::new(
            settings.deposits_per_sec_per_peer,
            settings.deposit_burst_per_peer,
        ),
        store,
        settings,
        flusher,
        metrics,
    };
    service.update_gauges();
    let mut purge = tokio::time::interval(service.settings.purge_interval);
    purge.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            command = rx.recv() => match command {
                None => break,
                Some(command) => service.handle(command).await,
            },
            _ = purge.tick() => {
                service.purge();
            }
        }
    }
    let db = service.store.db().clone();
    drop(service);
    db.flush_async().await.map(|_| ())
}

impl Service {
    async fn handle(&mut self, command: Command) {
        match command {
            Command::Request {
                peer,
                request,
                reply,
            } => self.request(peer, *request, reply).await,
            Command::Delivered { owner, seq } => {
                match self.store.remove(&owner, seq) {
                    Ok(true) => {
                        self.metrics.pushes.inc();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(%owner, seq, error = %e, "removing a pushed entry"),
                }
                self.update_gauges();
            }
            Command::Usage { owner, reply } => {
                let usage = match owner {
                    Some(owner) => self.store.usage(&owner),
                    None => self.store.totals(),
                };
                let _ = reply.send(usage);
            }
            Command::Purge { reply } => {
                let _ = reply.send(self.purge());
            }
            Command::FanOut {
                recipients,
                envelope,
                reply,
            } => self.fan_out(recipients, *envelope, reply).await,
        }
    }

    fn purge(&mut self) -> u64 {
        let now = self.settings.clock.now_ms();
        self.rate.prune(now);
        match self.store.purge(now) {
            Ok(purged) => {
                if purged > 0 {
                    tracing::info!(purged, "purged expired mailbox entries");
                    self.metrics.purged.inc_by(purged);
                }
                self.update_gauges();
                purged
            }
            Err(e) => {
                tracing::error!(error = %e, "mailbox purge failed");
                0
            }
        }
    }

    fn update_gauges(&self) {
        let totals = self.store.totals();
        self.metrics
            .mailbox_messages
            .set(i64::try_from(totals.messages).unwrap_or(i64::MAX));
        self.metrics
            .mailbox_bytes
            .set(i64::try_from(totals.bytes).unwrap_or(i64::MAX));
    }

    fn reject(&self, peer: &PeerId, req_id: u64, reason: Reject, detail: &str) -> Outcome {
        tracing::warn!(%peer, req_id, %reason, detail, "mailbox request rejected");
        self.metrics.reject(&reason);
        Outcome::reply(Response::Rejected { req_id, reason })
    }

    async fn request(&mut self, peer: PeerId, request: Request, reply: oneshot::Sender<Outcome>) {
        let outcome = match request {
            Request::Deposit {
                req_id, envelope, ..
            } => {
                match self.deposit(&peer, req_id, envelope) {
                    Ok(outcome) => {
                        // The answer is released by the flusher once the write is durable.
                        let job = Job { reply, outcome };
                        if let Err(mpsc::error::SendError(job)) = self.flusher.send(job).await {
                            tracing::error!("the mailbox flusher has stopped");
                            let _ = job.reply.send(Outcome::reply(Response::Rejected {
                                req_id,
                                reason: Reject::StoreFailed,
                            }));
                        }
                        self.update_gauges();
                        return;
                    }
                    Err((reason, detail)) => self.reject(&peer, req_id, reason, &detail),
                }
            }
            Request::Fetch {
                req_id,
                after,
                limit,
            } => {
                let limit = limit.min(MAX_FETCH_BATCH);
                match self.store.fetch(&peer, after, limit, MAX_FRAME_BYTES) {
                    Ok(page) => {
                        self.metrics.fetches.inc();
                        Outcome::reply(Response::Batch {
                            req_id,
                            items: page.items,
                            more: page.more,
                        })
                    }
                    Err(e) => self.reject(&peer, req_id, Reject::StoreFailed, &e.to_string()),
                }
            }
            Request::Ack { req_id, seqs } => {
                if seqs.len() > MAX_IDS_PER_BATCH {
                    let detail = format!("{} seqs, at most {MAX_IDS_PER_BATCH}", seqs.len());
                    self.reject(&peer, req_id, Reject::Malformed, &detail)
                } else {
                    match self.store.ack(&peer, &seqs) {
                        Ok(removed) => {
                            self.metrics.acks.inc();
                            self.update_gauges();
                            Outcome::reply(Response::Acked { req_id, removed })
                        }
                        Err(e @ AckError::NotYours { .. }) => {
                            self.reject(&peer, req_id, Reject::NotYours, &e.to_string())
                        }
                        Err(e @ AckError::Storage(_)) => {
                            self.reject(&peer, req_id, Reject::StoreFailed, &e.to_string())
                        }
                    }
                }
            }
        };
        let _ = reply.send(outcome);
    }

    /// Stores one group envelope in every recipient's mailbox (one batch per copy, one flush
    /// for all). A recipient whose mailbox is full misses this message; the others do not.
    async fn fan_out(
        &mut self,
        recipients: Vec<PeerId>,
        envelope: Envelope,
        reply: oneshot::Sender<FanOut>,
    ) {
        let now = self.settings.clock.now_ms();
        let mut pushes = Vec::new();
        let mut stored = 0u32;
        for recipient in recipients {
            match self.store.deposit(&recipient, &envelope, now) {
                Ok(done) => {
                    stored += 1;
                    if !done.duplicate {
                        pushes.push(Push {
                            recipient,
                            seq: done.seq,
                            envelope: envelope.clone(),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(%recipient, id = %envelope.id, error = %e, "group copy not stored");
                }
            }
        }
        let (tx, flushed) = oneshot::channel();
        let job = Job {
            reply: tx,
            outcome: Outcome::reply(Response::Stored { req_id: 0 }),
        };
        if self.flusher.send(job).await.is_err() {
            tracing::error!("the mailbox flusher has stopped");
        }
        self.update_gauges();
        let _ = reply.send(FanOut {
            flushed,
            pushes,
            stored,
        });
    }

    /// Validates and stores a deposit; the answer still has to wait for the flush.
    fn deposit(
        &mut self,
        peer: &PeerId,
        req_id: u64,
        envelope: Envelope,
    ) -> Result<Outcome, (Reject, String)> {
        if let Err(e) = envelope.verify() {
            let reason = match e {
                VerifyError::UnsupportedVersion(_) => Reject::UnsupportedVersion,
                VerifyError::BodyTooLarge { .. } => Reject::TooLarge {
                    max: MAX_BODY_BYTES as u64,
                },
                VerifyError::UnknownKey(_) | VerifyError::BadSignature => Reject::BadSignature,
            };
            return Err((
                reason,
                format!("envelope {} from {}: {e}", envelope.id, envelope.from),
            ));
        }
        let recipient = match envelope.to {
            Destination::Peer(recipient) => recipient,
            Destination::Group(group) => {
                return Err((
                    Reject::Malformed,
                    format!("group deposits ({group}) are not supported yet"),
                ))
            }
        };
        let now = self.settings.clock.now_ms();
        if envelope.is_expired(now) {
            return Err((Reject::Expired, format!("envelope {} expired", envelope.id)));
        }
        if !self.rate.check(peer, now) {
            return Err((Reject::QuotaExceeded, "deposit rate exceeded".into()));
        }
        match self.store.deposit(&recipient, &envelope, now) {
            Ok(stored) => {
                tracing::debug!(%recipient, seq = stored.seq, duplicate = stored.duplicate, "deposit");
                let push = (!stored.duplicate).then_some(Push {
                    recipient,
                    seq: stored.seq,
                    envelope,
                });
                Ok(Outcome {
                    response: Response::Stored { req_id },
                    push,
                })
            }
            Err(e @ DepositError::QuotaExceeded { .. }) => {
                Err((Reject::QuotaExceeded, e.to_string()))
            }
            Err(e @ DepositError::Unstorable(_)) => Err((Reject::Malformed, e.to_string())),
            Err(e @ DepositError::Storage(_)) => {
                tracing::error!(error = %e, "mailbox store failed");
                Err((Reject::StoreFailed, e.to_string()))
            }
        }
    }
}
