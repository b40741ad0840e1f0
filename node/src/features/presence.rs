//! Presence on the node: heartbeats to the home relays, goodbye on a clean stop, answering
//! other nodes' queries and typing notices, asking about a contact, and sending typing notices.
//!
//! Flow: [`Node::mark_user_activity`] (called on send, read, typing, opening a chat) records the
//! time and wakes the heartbeat task, which sends a `User` heartbeat to every connected home relay
//! at once (at most one per [`USER_HEARTBEAT_MIN_GAP`]); otherwise it sends an `App` heartbeat
//! every `Config::heartbeat_interval`. A heartbeat names the digest of this node's visibility
//! policy (`Settings::presence` plus the contact list) and carries the policy itself when a relay
//! does not have it yet. [`Node::presence`] asks the peer itself when a connection to it is open,
//! else the peer's home relays (from its invite; ours when we do not know them). A node answers
//! queries about itself with the same policy its relays enforce: a hidden user looks like an
//! unknown one (`online: false, last_seen_ms: null`). Typing notices go straight to the peer
//! (directly or through a relay circuit) once; they are never stored and never retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::join_all;
use kith_net::codec::Message;
use kith_protocol::presence::{Activity, Policy, Request, Response, Status};
use kith_protocol::Reject;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::core::hooks::{self, Feature};
use crate::core::{Node, NodeError, NodeEvent};
use crate::net::{self, circuit_addr, peer_of};
use crate::shutdown::Signal;
use futures::future::BoxFuture;

/// Least time between two heartbeats sent because of user activity.
pub const USER_HEARTBEAT_MIN_GAP: Duration = Duration::from_millis(250);

/// How long one presence request (heartbeat, goodbye, query, typing) may take.
pub const PRESENCE_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a stopping node waits for its relays to take its goodbye.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// The node's presence state.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The last user activity, unix ms (0: none since the node started).
    last_user_ms: AtomicU64,
    /// User activity happened since the last heartbeat.
    user_pending: AtomicBool,
    /// Wakes the heartbeat task (user activity, a relay connected, a new contact).
    wake: Notify,
    /// The node is stopping: no more heartbeats after the goodbye.
    stopping: AtomicBool,
    /// The policy digest each relay last acknowledged.
    relay_digests: Mutex<HashMap<PeerId, u64>>,
}

impl State {
    /// Asks the heartbeat task to send a heartbeat now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    fn last_user_ms(&self) -> Option<u64> {
        match self.last_user_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

/// What `kith presence WHO --json` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PresenceView {
    /// The peer asked about.
    #[serde(serialize_with = "as_string", deserialize_with = "from_string")]
    pub peer_id: PeerId,
    /// Whether it is online.
    pub online: bool,
    /// Its last user activity (unix ms), or `null` when unknown or hidden.
    pub last_seen_ms: Option<u64>,
}

fn as_string<S: serde::Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(peer)
}

fn from_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

impl Node {
    /// Records user activity (send, read, typing, opening a chat): moves this node's last seen
    /// and sends a `User` heartbeat to the home relays soon.
    pub fn mark_user_activity(&self) {
        let state = self.presence_state();
        state.last_user_ms.store(now_ms(), Ordering::Relaxed);
        state.user_pending.store(true, Ordering::Relaxed);
        state.wake();
    }

    /// This node's last user activity (unix ms), if any since it started.
    pub fn last_user_activity_ms(&self) -> Option<u64> {
        self.presence_state().last_user_ms()
    }

    /// The user opened the conversation with `with`: counts as user activity.
    pub fn open_chat(&self, with: &str) -> Result<PeerId, NodeError> {
        let peer = self.resolve(with)?;
        self.mark_user_activity();
        Ok(peer)
    }

    /// This node's presence policy: the visibility setting and the contacts, with who may
    /// reach the user and whom it blocked (for its relays, [`crate::features::strangers`]).
    fn policy(&self) -> Policy {
        let (_, settings, _, _) = self.parts();
        Policy::with_reach(
            settings.presence,
            settings.reach,
            self.contact_peers(),
            self.plugins().gate.blocked(),
        )
    }

    /// Direct addresses of `peer` and its relay circuits, and the relays to ask about it.
    fn routes(&self, peer: &PeerId) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
        let (_, _, _, home_relays) = self.parts();
        let mut addrs: Vec<Multiaddr> = Vec::new();
        let mut relays: Vec<Multiaddr> = Vec::new();
        if let Some(c) = self.contact_of(peer) {
            addrs.extend(c.addrs.iter().filter_map(|a| a.parse().ok()));
            relays.extend(c.relays.iter().filter_map(|a| a.parse().ok()));
        }
        if relays.is_empty() {
            // Most likely a community relay we share (as for delivery).
            relays.extend(home_relays.values().cloned());
        }
        addrs.extend(relays.iter().map(|r| circuit_addr(r, *peer)));
        (addrs, relays)
    }

    async fn ask(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
    ) -> Result<Response, String> {
        let (net, ..) = self.parts();
        match tokio::time::timeout(PRESENCE_REQUEST_TIMEOUT, net.presence(peer, addrs, request))
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Whether `who` (a contact name or peer id) is online, and when it was last seen, as far as
    /// its visibility setting lets this node know.
    pub async fn presence(&self, who: &str) -> Result<PresenceView, NodeError> {
        let peer = self.resolve(who)?;
        if peer == self.peer_id() {
            return Ok(PresenceView {
                peer_id: peer,
                online: true,
                last_seen_ms: self.last_user_activity_ms(),
            });
        }
        let (net, ..) = self.parts();
        let mut problems = Vec::new();
        if net.is_connected(peer).await {
            let request = Request::Query {
                req_id: self.req_id(),
                peer,
            };
            match self.ask(peer, Vec::new(), request).await {
                Ok(Response::Status {
                    online,
                    last_seen_ms,
                    ..
                }) => {
                    return Ok(PresenceView {
                        peer_id: peer,
                        online,
                        last_seen_ms,
                    })
                }
                Ok(other) => problems.push(format!("{peer} answered {other:?}")),
                Err(e) => problems.push(format!("{peer}: {e}")),
            }
        }
        let (_, relays) = self.routes(&peer);
        let asks = relays.iter().filter_map(|relay| {
            let relay_peer = peer_of(relay)?;
            let request = Request::Query {
                req_id: self.req_id(),
                peer,
            };
            Some(async move {
                (
                    relay_peer,
                    self.ask(relay_peer, vec![relay.clone()], request).await,
                )
            })
        });
        let mut answer: Option<Status> = None;
        for (relay, result) in join_all(asks).await {
            match result {
                Ok(Response::Status {
                    online,
                    last_seen_ms,
                    ..
                }) => {
                    let seen = answer.get_or_insert(Status::HIDDEN);
                    seen.online |= online;
                    seen.last_seen_ms = seen.last_seen_ms.max(last_seen_ms);
                }
                Ok(Response::Rejected { reason, .. }) => {
                    problems.push(format!("relay {relay}: {reason}"))
                }
                Ok(other) => problems.push(format!("relay {relay} answered {other:?}")),
                Err(e) => problems.push(format!("relay {relay}: {e}")),
            }
        }
        match answer {
            Some(status) => Ok(PresenceView {
                peer_id: peer,
                online: status.online,
                last_seen_ms: status.last_seen_ms,
            }),
            None if problems.is_empty() => Err(NodeError::Unavailable(format!(
                "no connection to {} and no relay to ask about it",
                self.peer_label(&peer)
            ))),
            None => Err(NodeError::Unavailable(format!(
                "presence of {} unavailable: {}",
                self.peer_label(&peer),
                problems.join("; ")
            ))),
        }
    }

    /// Tells `to` (a contact name or peer id) that the user is typing. Sent once, directly or
    /// through a relay circuit; never stored, never retried. Returns whether `to` took it.
    pub async fn typing(&self, to: &str) -> Result<bool, NodeError> {
        let peer = self.resolve(to)?;
        self.mark_user_activity();
        let (addrs, _) = self.routes(&peer);
        let request = Request::Typing {
            req_id: self.req_id(),
        };
        match self.ask(peer, addrs, request).await {
            Ok(Response::Ack { .. }) => Ok(true),
            Ok(other) => {
                tracing::debug!(%peer, ?other, "typing notice refused");
                Ok(false)
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "typing notice not delivered");
                Ok(false)
            }
        }
    }

    /// Answers another node's presence request.
    pub(crate) async fn handle_presence(
        &self,
        peer: PeerId,
        request: Message<Request>,
        channel: ResponseChannel<Response>,
    ) {
        let me = self.peer_id();
        let response = match request {
            Message::Valid(Request::Query { req_id, peer: who }) if who == me => {
                let status =
                    if self.policy().allows(&me, &peer) && !self.plugins().gate.is_blocked(&peer) {
                        Status {
                            online: true,
                            last_seen_ms: self.last_user_activity_ms(),
                        }
                    } else {
                        Status::HIDDEN
                    };
                Response::Status {
                    req_id,
                    online: status.online,
                    last_seen_ms: status.last_seen_ms,
                }
            }
            Message::Valid(Request::Typing { req_id }) => {
                // Only contacts' typing shows; strangers' and blocked peers' is dropped.
                match self.contact_of(&peer) {
                    Some(contact) if !self.plugins().gate.is_blocked(&peer) => {
                        self.emit(NodeEvent::Typing {
                            from: peer.to_string(),
                            from_name: Some(contact.name),
                        })
                    }
                    _ => tracing::debug!(%peer, "ignoring typing from a stranger or blocked peer"),
                }
                Response::Ack {
                    req_id,
                    policy_known: true,
                }
            }
            Message::Valid(other) => {
                // Queries about others and heartbeats belong to relays.
                tracing::warn!(%peer, ?other, "refusing a presence request meant for a relay");
                Response::Rejected {
                    req_id: other.req_id(),
                    reason: Reject::WrongRecipient,
                }
            }
            Message::Invalid { reason, detail } => {
                self.malformed_from(peer, kith_protocol::presence::PROTOCOL, &reason, &detail)
                    .await;
                Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => Response::Rejected {
                req_id: 0,
                reason: Reject::Malformed,
            },
        };
        let (net, ..) = self.parts();
        net.respond_presence(channel, response).await;
    }

    /// Sends one heartbeat to every connected home relay (with the policy where it is new).
    async fn heartbeat(&self, activity: Activity) {
        let (net, _, config, home_relays) = self.parts();
        let policy = self.policy();
        let digest = policy.digest();
        let offline_after_ms =
            u64::try_from(config.presence_offline_after.as_millis()).unwrap_or(u64::MAX);
        let mut sends = Vec::new();
        for (relay, addr) in home_relays {
            if !net.is_connected(*relay).await {
                continue;
            }
            let known = self
                .presence_state()
                .relay_digests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(relay)
                == Some(&digest);
            let policy = policy.clone();
            sends.push(async move {
                let mut with_policy = !known;
                // At most two rounds: the second carries the policy the relay asked for.
                for _ in 0..2 {
                    let request = Request::Heartbeat {
                        req_id: self.req_id(),
                        activity,
                        offline_after_ms,
                        policy_digest: digest,
                        policy: with_policy.then(|| policy.clone()),
                    };
                    match self.ask(*relay, vec![addr.clone()], request).await {
                        Ok(Response::Ack {
                            policy_known: true, ..
                        }) => {
                            self.presence_state()
                                .relay_digests
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(*relay, digest);
                            return;
                        }
                        Ok(Response::Ack {
                            policy_known: false,
                            ..
                        }) if !with_policy => with_policy = true,
                        Ok(other) => {
                            tracing::debug!(%relay, ?other, "heartbeat not taken");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%relay, error = %e, "heartbeat failed");
                            return;
                        }
                    }
                }
            });
        }
        join_all(sends).await;
    }

    /// Sends heartbeats until shutdown: every `heartbeat_interval`, and soon after user activity
    /// or a relay (re)connection.
    pub(crate) async fn heartbeat_loop(self, mut shutdown: Signal) {
        let (_, _, config, home_relays) = self.parts();
        if home_relays.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
                _ = self.presence_state().wake.notified() => {
                    if let Some(last) = last_sent {
                        let at = last + USER_HEARTBEAT_MIN_GAP;
                        tokio::select! {
                            biased;
                            _ = shutdown.wait() => return,
                            _ = tokio::time::sleep_until(at) => {}
                        }
                    }
                }
            }
            let state = self.presence_state();
            if state.stopping.load(Ordering::Relaxed) {
                return;
            }
            let activity = if state.user_pending.swap(false, Ordering::Relaxed) {
                Activity::User
            } else {
                Activity::App
            };
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = self.heartbeat(activity) => {}
            }
            last_sent = Some(Instant::now());
        }
    }

    /// Tells the connected home relays that this node is stopping, so they show it offline now.
    /// Waits at most [`GOODBYE_TIMEOUT`].
    pub async fn say_goodbye(&self) {
        let state = self.presence_state();
        state.stopping.store(true, Ordering::Relaxed);
        // A user action not yet reported (heartbeats are spaced out) must still move last seen.
        if state.user_pending.swap(false, Ordering::Relaxed)
            && tokio::time::timeout(GOODBYE_TIMEOUT, self.heartbeat(Activity::User))
                .await
                .is_err()
        {
            tracing::debug!("the last user heartbeat did not go out in time");
        }
        let (net, _, _, home_relays) = self.parts();
        let mut sends = Vec::new();
        for (relay, addr) in home_relays {
            if !net.is_connected(*relay).await {
                continue;
            }
            let request = Request::Goodbye {
                req_id: self.req_id(),
            };
            sends.push(async move {
                let (net, ..) = self.parts();
                net.presence(*relay, vec![addr.clone()], request).await
            });
        }
        if tokio::time::timeout(GOODBYE_TIMEOUT, join_all(sends))
            .await
            .is_err()
        {
            tracing::debug!("a relay did not take the goodbye in time");
        }
    }
}

// ---- plugged into the core ------------------------------------------------------------------

impl Node {
    /// The presence feature's state.
    pub(crate) fn presence_state(&self) -> &State {
        self.feature::<State>()
            .expect("the presence feature is plugged in by `start`")
    }
}

impl Feature for State {
    fn tasks(&self, node: &Node, shutdown: &Signal) -> Vec<BoxFuture<'static, ()>> {
        vec![Box::pin(node.clone().heartbeat_loop(shutdown.clone()))]
    }

    fn serve(
        &self,
        node: &Node,
        event: Box<net::Event>,
    ) -> Result<BoxFuture<'static, ()>, Box<net::Event>> {
        match *event {
            net::Event::InboundPresence {
                peer,
                request,
                channel,
            } => {
                let node = node.clone();
                Ok(Box::pin(async move {
                    node.handle_presence(peer, request, channel).await;
                }))
            }
            other => Err(Box::new(other)),
        }
    }
}

impl hooks::Presence for State {
    fn user_active(&self, node: &Node) {
        node.mark_user_activity();
    }

    fn wake(&self) {
        State::wake(self);
    }
}
