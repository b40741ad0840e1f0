//! `/kith/blob/1` on the relay: encrypted file chunks held for offline recipients.
//!
//! Flow: a sender asks `Begin { size }` (refused with `TooLarge` above
//! [`Settings::max_file_bytes`] or `QuotaExceeded` when its stored chunks plus `size` exceed its
//! quota), then `Put`s each blob; the relay checks the BLAKE3 hash, writes the blob to disk
//! ([`store`]) and answers `Stored`. Anyone who knows a hash may `Get` the blob: blobs are sealed
//! with a key the relay never sees, and a hash is only learnt from a signed message. Blobs expire
//! after a TTL; a periodic purge deletes them.
//!
//! The swarm task never touches the disk: each request becomes a blocking job whose answer the
//! task collects with [`Server::next`] and sends with [`Server::finish`]. Past
//! [`Settings::max_pending`] jobs, requests are answered `Busy` at once.

pub mod store;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kith_net::codec::Message;
use kith_protocol::blob::{self, Request, Response, MAX_BLOB_BYTES};
use kith_protocol::Reject;
use libp2p::{PeerId, Swarm};

use crate::metrics::Metrics;
use crate::requests::{self, Channel};
use crate::swarm::Behaviour;
use crate::Clock;

/// The blob service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest file accepted by `Begin`, in bytes.
    pub max_file_bytes: u64,
    /// Jobs in progress before requests are answered `Busy`.
    pub max_pending: usize,
    /// The delay a `Busy` answer asks for, in milliseconds.
    pub busy_retry_after_ms: u64,
    /// How often expired blobs are deleted.
    pub purge_interval: Duration,
    /// The clock expiry reads.
    pub clock: Clock,
    /// Clock skew tolerated on a temporary chat's blob expiry ([`kith_protocol::timer`]).
    pub expiry_skew_ms: u64,
}

/// An answer ready to go back to a peer.
pub struct Done {
    peer: PeerId,
    channel: Channel<Response>,
    response: Response,
}

/// The blob service, owned by the swarm task.
pub struct Server {
    store: Arc<store::Store>,
    settings: Settings,
    metrics: Metrics,
    pending: FuturesUnordered<BoxFuture<'static, Option<Done>>>,
    purge: tokio::time::Interval,
}

impl Server {
    /// A server over `store`.
    pub fn new(store: store::Store, settings: Settings, metrics: Metrics) -> Self {
        let mut purge = tokio::time::interval(settings.purge_interval);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            store: Arc::new(store),
            settings,
            metrics,
            pending: FuturesUnordered::new(),
            purge,
        }
    }

    /// Handles one inbound `/kith/blob/1` request.
    pub fn on_request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) {
        if let Some((channel, response)) = self.start(peer, request, channel) {
            self.send(swarm, peer, channel, response);
        }
    }

    /// Starts a job for `request`, or returns an immediate answer.
    fn start(
        &mut self,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) -> Option<(Channel<Response>, Response)> {
        let reject = |req_id, reason: Reject| Response::Rejected { req_id, reason };
        let request = match request {
            Message::Valid(request) => request,
            Message::Invalid { reason, detail } => {
                tracing::debug!(%peer, %detail, "refusing an undecodable blob request");
                self.metrics.reject(&reason);
                return Some((channel, reject(0, reason)));
            }
            Message::Raw(_) => return Some((channel, reject(0, Reject::Malformed))),
        };
        let req_id = request.req_id();
        if self.pending.len() >= self.settings.max_pending {
            let reason = Reject::Busy {
                retry_after_ms: self.settings.busy_retry_after_ms,
            };
            self.metrics.reject(&reason);
            return Some((channel, reject(req_id, reason)));
        }
        let store = self.store.clone();
        let now = self.settings.clock.now_ms();
        match request {
            Request::Begin { size, .. } => {
                let response = if size > self.settings.max_file_bytes {
                    // Counted in `kith_relay_rejects_total`; fresh identities would get past a
                    // per-peer log limiter.
                    tracing::debug!(%peer, size, "refusing a file above the size limit");
                    reject(
                        req_id,
                        Reject::TooLarge {
                            max: self.settings.max_file_bytes,
                        },
                    )
                } else if !store.has_room(&peer, size) {
                    tracing::debug!(%peer, size, "refusing a file over the uploader's quota");
                    reject(req_id, Reject::QuotaExceeded)
                } else {
                    Response::Ready { req_id }
                };
                Some((channel, response))
            }
            Request::Put {
                hash,
                bytes,
                expires_at_ms,
                ..
            } => {
                let skew = self.settings.expiry_skew_ms;
                if expires_at_ms.is_some_and(|at| kith_protocol::timer::refuses(at, now, skew)) {
                    tracing::debug!(%peer, %hash, "refusing an expired blob");
                    return Some((channel, reject(req_id, Reject::Expired)));
                }
                let cap = expires_at_ms.map(|at| kith_protocol::timer::relay_deadline(at, skew));
                if bytes.len() > MAX_BLOB_BYTES {
                    return Some((
                        channel,
                        reject(
                            req_id,
                            Reject::TooLarge {
                                max: MAX_BLOB_BYTES as u64,
                            },
                        ),
                    ));
                }
                let job = tokio::task::spawn_blocking(move || {
                    if let Err(e) = blob::verify(&hash, &bytes) {
                        tracing::warn!(%peer, error = %e, "refusing a blob that does not match its hash");
                        return reject(req_id, Reject::Malformed);
                    }
                    match store.put_expiring(peer, &hash, &bytes, now, cap) {
                        Ok(()) => Response::Stored { req_id },
                        Err(store::PutError::Quota { .. } | store::PutError::Budget { .. }) => {
                            reject(req_id, Reject::QuotaExceeded)
                        }
                        Err(store::PutError::Store(e)) => {
                            tracing::error!(error = %e, "cannot store a blob");
                            reject(req_id, Reject::StoreFailed)
                        }
                    }
                });
                self.push_job(peer, channel, req_id, job);
                None
            }
            Request::Get { hash, .. } => {
                let job = tokio::task::spawn_blocking(move || match store.get(&hash, now) {
                    Ok(Some(bytes)) => Response::Blob { req_id, bytes },
                    Ok(None) => Response::NotFound { req_id },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read a blob");
                        reject(req_id, Reject::StoreFailed)
                    }
                });
                self.push_job(peer, channel, req_id, job);
                None
            }
        }
    }

    fn push_job(
        &mut self,
        peer: PeerId,
        channel: Channel<Response>,
        req_id: u64,
        job: tokio::task::JoinHandle<Response>,
    ) {
        self.pending.push(
            async move {
                let response = job.await.unwrap_or(Response::Rejected {
                    req_id,
                    reason: Reject::StoreFailed,
                });
                Some(Done {
                    peer,
                    channel,
                    response,
                })
            }
            .boxed(),
        );
    }

    /// The next finished job (or `None` after a purge). Never resolves while idle.
    pub async fn next(&mut self) -> Option<Done> {
        tokio::select! {
            Some(done) = self.pending.next(), if !self.pending.is_empty() => done,
            _ = self.purge.tick() => {
                let store = self.store.clone();
                let now = self.settings.clock.now_ms();
                self.pending.push(
                    async move {
                        match tokio::task::spawn_blocking(move || store.purge(now)).await {
                            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "purged expired blobs"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "blob purge failed"),
                            _ => {}
                        }
                        None
                    }
                    .boxed(),
                );
                None
            }
        }
    }

    /// Sends a finished job's answer.
    pub fn finish(&mut self, swarm: &mut Swarm<Behaviour>, done: Done) {
        let Done {
            peer,
            channel,
            response,
        } = done;
        self.send(swarm, peer, channel, response);
    }

    fn send(
        &self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        channel: Channel<Response>,
        response: Response,
    ) {
        if let Response::Rejected { reason, .. } = &response {
            self.metrics.reject(reason);
        }
        if !requests::respond(&mut swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, "blob requester went away before its answer");
        }
    }
}
