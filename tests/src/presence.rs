//! Presence and overload helpers for tests and the benchmark: a bare `/kith/presence/1` peer
//! (heartbeats and queries without a node around it), and load generators that keep a window of
//! requests in flight until told to stop, tallying the answers.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_net::PresenceCodec;
use kith_protocol::mailbox::{self, DepositClass};
use kith_protocol::presence::{self, Request, Response};
use kith_protocol::{Envelope, Reject};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::watch;

use crate::{RawBehaviourEvent, RawPeer, DEADLINE};

/// Only `/kith/presence/1`, outbound.
#[derive(NetworkBehaviour)]
pub struct PresenceBehaviour {
    /// `/kith/presence/1`.
    pub presence: request_response::Behaviour<PresenceCodec>,
}

/// A bare presence peer.
pub struct PresencePeer {
    /// Its swarm.
    pub swarm: Swarm<PresenceBehaviour>,
    /// Its key.
    pub key: Keypair,
    next_req: u64,
}

impl PresencePeer {
    /// A peer with a fresh identity.
    pub fn new() -> Result<Self> {
        Self::with_key(Keypair::generate_ed25519())
    }

    /// A peer with a given identity.
    pub fn with_key(key: Keypair) -> Result<Self> {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| PresenceBehaviour {
                presence: request_response::Behaviour::with_codec(
                    PresenceCodec::new(presence::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(presence::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        Ok(Self {
            swarm,
            key,
            next_req: 0,
        })
    }

    /// Its peer id.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// A fresh request id.
    pub fn req_id(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// Sends one request to `peer` at `addr` and waits for the answer.
    pub async fn request(
        &mut self,
        peer: PeerId,
        addr: &Multiaddr,
        request: Request,
    ) -> Result<Response> {
        self.swarm.add_peer_address(peer, addr.clone());
        let id = self
            .swarm
            .behaviour_mut()
            .presence
            .send_request(&peer, Message::Valid(request));
        let fut = async {
            loop {
                if let SwarmEvent::Behaviour(PresenceBehaviourEvent::Presence(event)) =
                    self.swarm.select_next_some().await
                {
                    match event {
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        } if request_id == id => return Ok(response),
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        } if request_id == id => bail!("presence request failed: {error}"),
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await?
    }

    /// Asks `at` (a relay or the node itself) about `who`: `(online, last_seen_ms)`.
    pub async fn query(
        &mut self,
        at: PeerId,
        addr: &Multiaddr,
        who: PeerId,
    ) -> Result<(bool, Option<u64>)> {
        let req_id = self.req_id();
        match self
            .request(at, addr, Request::Query { req_id, peer: who })
            .await?
        {
            Response::Status {
                online,
                last_seen_ms,
                ..
            } => Ok((online, last_seen_ms)),
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

/// What a load generator saw.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Answered with success (`Stored`, `Status`, `Ack`).
    pub ok: u64,
    /// Answered `Busy`.
    pub busy: u64,
    /// Any other answer or failure.
    pub other: u64,
    /// Latency of each successful request.
    pub latencies: Vec<Duration>,
}

impl Tally {
    /// Requests sent and answered.
    pub fn total(&self) -> u64 {
        self.ok + self.busy + self.other
    }

    /// The share of successful answers (1 when nothing was sent).
    pub fn success_rate(&self) -> f64 {
        match self.total() {
            0 => 1.0,
            n => self.ok as f64 / n as f64,
        }
    }
}

/// Queries `relay` about `who` with `window` queries in flight until `stop` turns true.
pub async fn query_flood(
    mut peer: PresencePeer,
    relay: PeerId,
    addr: Multiaddr,
    who: PeerId,
    window: usize,
    mut stop: watch::Receiver<bool>,
) -> Result<Tally> {
    // Connect first, so connection set-up is not counted. Any answer means the connection is
    // up: a relay already shedding under the other floods may well say `Busy`.
    let req_id = peer.req_id();
    peer.request(relay, &addr, Request::Query { req_id, peer: who })
        .await?;
    let mut tally = Tally::default();
    let mut started = std::collections::HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        while started.len() < window {
            let req_id = peer.req_id();
            let id = peer
                .swarm
                .behaviour_mut()
                .presence
                .send_request(&relay, Message::Valid(Request::Query { req_id, peer: who }));
            started.insert(id, Instant::now());
        }
        tokio::select! {
            _ = stop.changed() => {}
            event = peer.swarm.select_next_some() => {
                let SwarmEvent::Behaviour(PresenceBehaviourEvent::Presence(event)) = event else {
                    continue;
                };
                match event {
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    } => {
                        let Some(at) = started.remove(&request_id) else { continue };
                        match response {
                            Response::Status { .. } => {
                                tally.ok += 1;
                                tally.latencies.push(at.elapsed());
                            }
                            Response::Rejected { reason: Reject::Busy { .. }, .. } => tally.busy += 1,
                            _ => tally.other += 1,
                        }
                    }
                    request_response::Event::OutboundFailure { request_id, .. } => {
                        started.remove(&request_id);
                        tally.other += 1;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(tally)
}

/// Deposits envelopes made by `make` at `relay` with `window` in flight, as `class`, until
/// `count` were answered (if given) or `stop` turns true.
#[allow(clippy::too_many_arguments)]
pub async fn deposit_flood(
    mut peer: RawPeer,
    relay: PeerId,
    addr: Multiaddr,
    class: DepositClass,
    window: usize,
    count: Option<u64>,
    mut make: impl FnMut(&Keypair) -> Envelope,
    mut stop: watch::Receiver<bool>,
) -> Result<Tally> {
    peer.swarm.add_peer_address(relay, addr.clone());
    let mut tally = Tally::default();
    let mut started = std::collections::HashMap::new();
    let mut sent = 0u64;
    let mut next_req = 0u64;
    loop {
        let done = count.is_some_and(|n| tally.total() >= n);
        if done || (*stop.borrow() && count.is_none()) {
            break;
        }
        while started.len() < window && count.is_none_or(|n| sent < n) {
            next_req += 1;
            let envelope = make(&peer.key);
            let id = peer.swarm.behaviour_mut().mailbox.send_request(
                &relay,
                Message::Valid(mailbox::Request::Deposit {
                    req_id: next_req,
                    envelope,
                    class,
                }),
            );
            started.insert(id, Instant::now());
            sent += 1;
        }
        tokio::select! {
            _ = stop.changed(), if count.is_none() => {}
            event = peer.swarm.select_next_some() => {
                let SwarmEvent::Behaviour(RawBehaviourEvent::Mailbox(event)) = event else {
                    continue;
                };
                match event {
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    } => {
                        let Some(at) = started.remove(&request_id) else { continue };
                        match response {
                            mailbox::Response::Stored { .. } => {
                                tally.ok += 1;
                                tally.latencies.push(at.elapsed());
                            }
                            mailbox::Response::Rejected { reason: Reject::Busy { .. }, .. } => {
                                tally.busy += 1
                            }
                            _ => tally.other += 1,
                        }
                    }
                    request_response::Event::OutboundFailure { request_id, .. } => {
                        started.remove(&request_id);
                        tally.other += 1;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(tally)
}

/// What [`overload`] measured.
#[derive(Debug, Clone)]
pub struct Overload {
    /// Message deposits.
    pub messages: Tally,
    /// Receipt deposits.
    pub receipts: Tally,
    /// Presence queries.
    pub presence: Tally,
}

/// Runs a relay with a small mailbox queue (`max_pending_mailbox_requests` 64, shedding from 32
/// requests in flight) under three floods at once for `duration`: message deposits (32 in
/// flight), receipt deposits (128 in flight) and presence queries (64 in flight), each from its
/// own peer; with load shedding on or off.
pub async fn overload(shedding: bool, duration: Duration) -> Result<Overload> {
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.shed_enabled = shedding;
    config.shed_max_in_flight_requests = 32;
    config.max_pending_mailbox_requests = 64;
    config.busy_retry_after_ms = 100;
    config.deposits_per_sec_per_peer = 1_000_000;
    config.deposit_burst_per_peer = 1_000_000;
    config.mailbox_max_messages = 10_000_000;
    config.mailbox_max_bytes = 1 << 40;
    config.mailbox_max_messages_per_sender = config.mailbox_max_messages;
    config.mailbox_max_bytes_per_sender = config.mailbox_max_bytes;
    let relay = kith_relay::start(config).await?;
    let (peer, addr) = (relay.peer_id, relay.listen_addrs[0].clone());
    let somebody = Keypair::generate_ed25519().public().to_peer_id();
    let (stop_tx, stop) = watch::channel(false);
    let flood = |class, window| {
        let stop = stop.clone();
        let addr = addr.clone();
        async move {
            deposit_flood(
                RawPeer::new()?,
                peer,
                addr,
                class,
                window,
                None,
                move |key| crate::bench::payload_envelope(key, somebody, 100),
                stop,
            )
            .await
        }
    };
    let messages = tokio::spawn(flood(DepositClass::Message, 32));
    let receipts = tokio::spawn(flood(DepositClass::Receipt, 128));
    let presence = tokio::spawn(query_flood(
        PresencePeer::new()?,
        peer,
        addr.clone(),
        somebody,
        64,
        stop.clone(),
    ));
    tokio::time::sleep(duration).await;
    let _ = stop_tx.send(true);
    let result = Overload {
        messages: messages.await??,
        receipts: receipts.await??,
        presence: presence.await??,
    };
    relay.shutdown().await?;
    Ok(result)
}
