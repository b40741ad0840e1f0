//! The relay's presence service: answers `/kith/presence/1` from the swarm task.
//!
//! Flow: a connected node's [`Request::Heartbeat`]s keep it online and (when marked user
//! activity) move its last seen; [`Request::Goodbye`] or the drop of its last connection
//! ([`Service::disconnected`]) shows it offline at once; otherwise it shows offline when its
//! heartbeats stop for the threshold (the smaller of the node's and `presence_offline_after_ms`).
//! [`Request::Query`] is answered with what the queried user's policy lets the asker see: a
//! stranger asking about a `contacts` user, or anyone asking about a `nobody` user (or a user whose
//! policy this relay does not hold), gets `online: false, last_seen_ms: None`, the same answer as
//! for a user the relay has never seen. Typing is node to node and refused here.
//!
//! Everything is in memory ([`kith_protocol::presence::Tracker`], bounded): after a relay restart
//! presence is rebuilt from the next heartbeats, and users not yet heard from are hidden.
//! Shedding (`Busy`) is decided by the swarm task before a request gets here.

use kith_net::codec::Message;
use kith_protocol::presence::{Request, Response, Tracker};
use kith_protocol::{PeerId, Reject};

use crate::clock::Clock;
use crate::metrics::Metrics;

/// Settings of the presence service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest silence after a heartbeat before a node shows offline, in milliseconds.
    pub offline_after_ms: u64,
    /// Most peers remembered.
    pub max_tracked_peers: usize,
    /// The clock.
    pub clock: Clock,
}

/// The presence state and its request handler (owned by the swarm task; every call is O(1)
/// except the eviction scan when the table is full).
#[derive(Debug)]
pub struct Service {
    tracker: Tracker,
    clock: Clock,
    metrics: Metrics,
}

impl Service {
    /// An empty service.
    pub fn new(settings: Settings, metrics: Metrics) -> Self {
        Self {
            tracker: Tracker::new(settings.offline_after_ms, settings.max_tracked_peers),
            clock: settings.clock,
            metrics,
        }
    }

    /// Answers one request from the connection's (authenticated) `peer`.
    pub fn handle(&mut self, peer: PeerId, request: Message<Request>) -> Response {
        let now = self.clock.now_ms();
        match request {
            Message::Valid(Request::Heartbeat {
                req_id,
                activity,
                offline_after_ms,
                policy_digest,
                policy,
            }) => {
                if let Some(policy) = &policy {
                    if let Err(reason) = policy.validate() {
                        tracing::warn!(%peer, %reason, "refusing a heartbeat with a bad policy");
                        return Response::Rejected { req_id, reason };
                    }
                }
                self.metrics.presence_heartbeats.inc();
                if policy.is_some() {
                    self.metrics.presence_policies.inc();
                }
                let policy_known = self.tracker.heartbeat(
                    peer,
                    activity,
                    offline_after_ms,
                    policy_digest,
                    policy,
                    now,
                );
                Response::Ack {
                    req_id,
                    policy_known,
                }
            }
            Message::Valid(Request::Goodbye { req_id }) => {
                tracing::debug!(%peer, "goodbye");
                self.tracker.gone(&peer);
                Response::Ack {
                    req_id,
                    policy_known: true,
                }
            }
            Message::Valid(Request::Query {
                req_id,
                peer: target,
            }) => {
                self.metrics.presence_queries.inc();
                let status = self.tracker.query(&peer, &target, now);
                Response::Status {
                    req_id,
                    online: status.online,
                    last_seen_ms: status.last_seen_ms,
                }
            }
            Message::Valid(Request::Typing { req_id }) => {
                tracing::warn!(%peer, "typing notice sent to a relay (typing is node to node)");
                Response::Rejected {
                    req_id,
                    reason: Reject::WrongRecipient,
                }
            }
            Message::Invalid { reason, detail } => {
                tracing::debug!(%peer, %reason, detail, "invalid presence request");
                Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => {
                tracing::warn!(%peer, "raw presence request (never produced by reading)");
                Response::Rejected {
                    req_id: 0,
                    reason: Reject::Malformed,
                }
            }
        }
    }

    /// `peer`'s last connection closed: it is offline now.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.tracker.gone(peer);
    }

    /// Whether `owner`'s policy lets `sender` deposit into `owner`'s mailbox (see
    /// [`Tracker::accepts_deposit`]): the owner sets it, over its own authenticated connection,
    /// with its heartbeats.
    pub fn accepts_deposit(&self, owner: &PeerId, sender: &PeerId) -> bool {
        self.tracker.accepts_deposit(owner, sender)
    }

    /// How many peers are remembered.
    pub fn tracked(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_protocol::presence::{Activity, Policy, Visibility};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn heartbeat_query_disconnect() {
        let now = Arc::new(AtomicU64::new(1_000));
        let clock = {
            let now = now.clone();
            Clock::from_fn(move || now.load(Ordering::Relaxed))
        };
        let mut service = Service::new(
            Settings {
                offline_after_ms: 30_000,
                max_tracked_peers: 16,
                clock,
            },
            Metrics::new(),
        );
        let (alice, friend, stranger) = (peer(), peer(), peer());
        let policy = Policy::new(Visibility::Contacts, [friend]);
        let beat = |policy: Option<Policy>, digest| {
            Message::Valid(Request::Heartbeat {
                req_id: 1,
                activity: Activity::User,
                offline_after_ms: 30_000,
                policy_digest: digest,
                policy,
            })
        };
        assert_eq!(
            service.handle(alice, beat(None, policy.digest())),
            Response::Ack {
                req_id: 1,
                policy_known: false
            }
        );
        assert_eq!(
            service.handle(alice, beat(Some(policy.clone()), policy.digest())),
            Response::Ack {
                req_id: 1,
                policy_known: true
            }
        );
        let query = |target| {
            Message::Valid(Request::Query {
                req_id: 2,
                peer: target,
            })
        };
        assert_eq!(
            service.handle(friend, query(alice)),
            Response::Status {
                req_id: 2,
                online: true,
                last_seen_ms: Some(1_000)
            }
        );
        assert_eq!(
            service.handle(stranger, query(alice)),
            Response::Status {
                req_id: 2,
                online: false,
                last_seen_ms: None
            }
        );
        now.store(2_000, Ordering::Relaxed);
        service.disconnected(&alice);
        assert_eq!(
            service.handle(friend, query(alice)),
            Response::Status {
                req_id: 2,
                online: false,
                last_seen_ms: Some(1_000)
            }
        );
        assert!(matches!(
            service.handle(friend, Message::Valid(Request::Typing { req_id: 3 })),
            Response::Rejected { .. }
        ));
    }
}
