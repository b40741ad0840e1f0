//! `/kith/keys/1` on the relay: nodes' published Olm keys, handed out to whoever wants to start
//! an end-to-end encrypted session with them. The relay holds public keys only; it never sees a
//! private key, and every key it serves is signed by its owner's ed25519 identity, which the
//! claimer checks: a relay can refuse service, not substitute keys.
//!
//! Flow: the owner sends `Publish { bundle }`; the relay checks that the bundle is the
//! connection's peer's (every signature, at most [`MAX_ONE_TIME_KEYS`] one-time keys), stores
//! it ([`store`]) and answers `Published { remaining }` once it is flushed. Anyone sends
//! `Claim { peer }` and gets one one-time key, removed and flushed before the answer, then the
//! fallback key once none is left; claims are rate-limited per claimer, publications per owner.
//!
//! As for blobs, the swarm task never touches the disk: each request becomes a blocking job
//! whose answer the task collects with [`Server::next`] and sends with [`Server::finish`].
//!
//! [`MAX_ONE_TIME_KEYS`]: kith_protocol::prekeys::MAX_ONE_TIME_KEYS

pub mod store;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kith_net::codec::Message;
use kith_protocol::prekeys::{Request, Response};
use kith_protocol::Reject;
use libp2p::{PeerId, Swarm};

use crate::mailbox::rate::RateLimiter;
use crate::metrics::Metrics;
use crate::requests::{self, Channel};
use crate::swarm::Behaviour;
use crate::Clock;

/// The keys service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Claims a claimer may make a second, sustained.
    pub claims_per_sec: u32,
    /// Claims a claimer may make at once.
    pub claim_burst: u32,
    /// Publications an owner may make a second, sustained.
    pub publishes_per_sec: u32,
    /// Publications an owner may make at once.
    pub publish_burst: u32,
    /// Jobs in progress before requests are answered `Busy`.
    pub max_pending: usize,
    /// The delay a `Busy` answer asks for.
    pub busy_retry_after_ms: u64,
    /// The clock the rate limits read.
    pub clock: Clock,
}

/// An answer ready to go back to a peer.
pub struct Done {
    peer: PeerId,
    channel: Channel<Response>,
    response: Response,
}

/// The keys service, owned by the swarm task.
pub struct Server {
    store: store::Store,
    settings: Settings,
    metrics: Metrics,
    claims: RateLimiter,
    publishes: RateLimiter,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
}

impl Server {
    /// A server over `store`.
    pub fn new(store: store::Store, settings: Settings, metrics: Metrics) -> Self {
        Self {
            claims: RateLimiter::new(settings.claims_per_sec, settings.claim_burst),
            publishes: RateLimiter::new(settings.publishes_per_sec, settings.publish_burst),
            store,
            settings,
            metrics,
            pending: FuturesUnordered::new(),
        }
    }

    /// Handles one inbound `/kith/keys/1` request from `peer` (the connection's authenticated
    /// peer).
    pub fn on_request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) {
        if let Some((channel, response)) = self.begin(peer, request, channel) {
            self.send(swarm, peer, channel, response);
        }
    }

    /// Starts a job for `request`, or returns an immediate answer with the channel.
    fn begin(
        &mut self,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) -> Option<(Channel<Response>, Response)> {
        let reject = |req_id, reason: Reject| Response::Rejected { req_id, reason };
        let request = match request {
            Message::Valid(request) => request,
            Message::Invalid { reason, detail } => {
                tracing::debug!(%peer, %detail, "refusing an undecodable keys request");
                return Some((channel, reject(0, reason)));
            }
            Message::Raw(_) => return Some((channel, reject(0, Reject::Malformed))),
        };
        let req_id = request.req_id();
        if self.pending.len() >= self.settings.max_pending {
            let reason = Reject::Busy {
                retry_after_ms: self.settings.busy_retry_after_ms,
            };
            return Some((channel, reject(req_id, reason)));
        }
        let now = self.settings.clock.now_ms();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let job = match request {
            Request::Publish { bundle, .. } => {
                if !self.publishes.check(&peer, now) {
                    tracing::warn!(%peer, "refusing a key publication: too many");
                    return Some((channel, reject(req_id, Reject::QuotaExceeded)));
                }
                tokio::task::spawn_blocking(move || {
                    // Only the owner publishes: every signature is checked against the
                    // connection's peer.
                    if let Err(e) = bundle.verify(&peer) {
                        tracing::warn!(%peer, error = %e, "refusing a key bundle");
                        return reject(req_id, Reject::Malformed);
                    }
                    match store.publish(&peer, &bundle) {
                        Ok(remaining) => {
                            metrics
                                .keys_published
                                .inc_by(bundle.one_time_keys.len() as u64);
                            Response::Published { req_id, remaining }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot store a key bundle");
                            reject(req_id, Reject::StoreFailed)
                        }
                    }
                })
            }
            Request::Claim { peer: owner, .. } => {
                if !self.claims.check(&peer, now) {
                    tracing::warn!(%peer, "refusing a key claim: too many");
                    return Some((channel, reject(req_id, Reject::QuotaExceeded)));
                }
                tokio::task::spawn_blocking(move || match store.claim(&owner) {
                    Ok(Some(claimed)) => {
                        if claimed.fallback {
                            metrics.keys_fallback_claims.inc();
                        } else {
                            metrics.keys_claimed.inc();
                        }
                        Response::Claimed {
                            req_id,
                            identity: claimed.identity,
                            key: claimed.key,
                            fallback: claimed.fallback,
                        }
                    }
                    Ok(None) => Response::NotFound { req_id },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot hand out a key");
                        reject(req_id, Reject::StoreFailed)
                    }
                })
            }
        };
        self.pending.push(
            async move {
                let response = job.await.unwrap_or(Response::Rejected {
                    req_id,
                    reason: Reject::StoreFailed,
                });
                Done {
                    peer,
                    channel,
                    response,
                }
            }
            .boxed(),
        );
        None
    }

    /// The next finished job. Never resolves while idle.
    pub async fn next(&mut self) -> Option<Done> {
        self.pending.next().await
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
            tracing::debug!(%peer, "keys requester went away before its answer");
        }
    }
}
