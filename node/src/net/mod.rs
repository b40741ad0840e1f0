//! The network actor: one task owns the libp2p `Swarm`; everything else talks to it through a
//! cloneable [`Handle`] over a bounded channel and hears from it through a bounded event channel.
//!
//! Flow: the delivery engine asks for `SendDm` / `Mailbox` requests and gets the peer's answer on
//! a oneshot. `/kith/dm/1` streams go around this task where they can (see
//! `dm_streams`): a request leaves on a connection's ready stream when it has one, and
//! inbound streams go to the engine's server (`Handle::serve_dm_with`; before it is set, they
//! come out as [`Event::InboundDm`]), which reads the request on the stream and answers there
//! once its write is flushed.

pub mod dm_streams;
pub mod gossip;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kith_net::codec::Message;
use kith_net::{DmCodec, MailboxCodec, PresenceCodec};
use kith_protocol::{dm, mailbox, prekeys, presence};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity::Keypair, mdns, noise, ping, relay, tcp, yamux};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot};

use kith_net::GroupCodec;
use kith_protocol::group as group_wire;
use libp2p::gossipsub;

/// Protocol version string sent in identify.
const IDENTIFY_PROTOCOL: &str = "/kith/1.0.0";

/// How often the actor re-dials home relays it is not connected to.
const RELAY_REDIAL_INTERVAL: Duration = Duration::from_secs(3);

/// Why a network request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// The peer could not be reached (no address, dial failed, connection closed).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer did not answer in time.
    #[error("request timed out")]
    Timeout,
    /// The network actor has stopped.
    #[error("network is shutting down")]
    Closed,
}

/// The node's libp2p behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// Inbound `/kith/dm/1` streams, and ready outbound ones.
    dm_streams: crate::net::dm_streams::Behaviour,
    /// Outbound `/kith/dm/1` requests when no ready stream is at hand (this one dials).
    dm: request_response::Behaviour<DmCodec>,
    mailbox: request_response::Behaviour<MailboxCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossip::Gossipsub,
    group: request_response::Behaviour<GroupCodec>,
    presence: request_response::Behaviour<PresenceCodec>,
    blob: request_response::Behaviour<kith_net::BlobCodec>,
    /// `/kith/keys/1`: publishing to relays, claiming from relays and nodes, answering claims.
    keys: request_response::Behaviour<kith_net::KeysCodec>,
    /// Strangers banned for sending requests that do not decode (the relay's
    /// [`kith_relay::strikes`]): their connections closed, new ones refused.
    strikes: kith_relay::strikes::Behaviour,
    /// Bounds on connections, so that a stranger opening them in a loop cannot exhaust the
    /// node's memory or file descriptors.
    limits: libp2p::connection_limits::Behaviour,
}

/// Most connections one peer may hold to a node at once (a direct one and one through each
/// relay, dialled from both sides at once, fit well within it).
const MAX_CONNECTIONS_PER_PEER: u32 = 8;

/// Most inbound connections a node holds at once (a 200-member group's members and the
/// relays fit well within it).
const MAX_INBOUND_CONNECTIONS: u32 = 1_024;

/// Most inbound connections in their handshake at once.
const MAX_PENDING_INBOUND: u32 = 64;

/// How often the line about banned strangers may be written (one line for all of them).
const BAN_LINE_INTERVAL_MS: u64 = 60_000;

/// Undecodable requests a stranger may send at once before it is banned.
const MALFORMED_REQUEST_BURST: u32 = 20;

/// Undecodable requests a stranger may send a second, sustained.
const MALFORMED_REQUESTS_PER_SEC: u32 = 1;

/// How long a banned stranger stays out.
const BAN: std::time::Duration = std::time::Duration::from_secs(600);

/// What the rest of the node hears from the network.
#[derive(Debug)]
pub enum Event {
    /// A message arrived on a group's gossipsub topic; validate it, then report with
    /// [`Handle::validate_gossip`].
    Gossip {
        /// The peer that forwarded it.
        source: PeerId,
        /// gossipsub's id for it.
        message_id: gossipsub::MessageId,
        /// The topic.
        topic: String,
        /// The payload (a CBOR envelope).
        data: Vec<u8>,
    },
    /// A `/kith/dm/1` stream opened: read the request on it with [`read_dm`], answer with
    /// [`answer_dm`].
    InboundDm {
        /// The connection's (authenticated) peer.
        peer: PeerId,
        /// The stream, its protocol negotiated.
        stream: libp2p::Stream,
    },
    /// A connection to `peer` is up (a good moment to retry what waits for it).
    Connected {
        /// The peer.
        peer: PeerId,
    },
    /// A home relay is connected: fetch the mailbox.
    RelayConnected {
        /// The relay.
        relay: PeerId,
    },
    /// A `/kith/blob/1` request arrived (another node wants a blob of a file we sent); answer
    /// it with [`Handle::respond_blob`].
    InboundBlob {
        /// The connection's (authenticated) peer.
        peer: PeerId,
        /// The request, or why the codec refused it.
        request: Message<kith_protocol::blob::Request>,
        /// Where the answer goes.
        channel: ResponseChannel<kith_protocol::blob::Response>,
    },
    /// A `/kith/keys/1` request arrived (a claim for one of this node's keys); answer it with
    /// [`Handle::respond_keys`].
    InboundKeys {
        /// The connection's (authenticated) peer.
        peer: PeerId,
        /// The request, or why the codec refused it.
        request: Message<prekeys::Request>,
        /// Where the answer goes.
        channel: ResponseChannel<prekeys::Response>,
    },
    /// A `/kith/presence/1` request arrived (a query or a typing notice from another node);
    /// answer it with [`Handle::respond_presence`].
    InboundPresence {
        /// The connection's (authenticated) peer.
        peer: PeerId,
        /// The request, or why the codec refused it.
        request: Message<presence::Request>,
        /// Where the answer goes.
        channel: ResponseChannel<presence::Response>,
    },
}

enum Command {
    Keys {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: prekeys::Request,
        reply: oneshot::Sender<Result<prekeys::Response, NetError>>,
    },
    RespondKeys {
        channel: ResponseChannel<prekeys::Response>,
        response: prekeys::Response,
    },
    Blob {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: kith_protocol::blob::Request,
        reply: oneshot::Sender<Result<kith_protocol::blob::Response, NetError>>,
    },
    RespondBlob {
        channel: ResponseChannel<kith_protocol::blob::Response>,
        response: kith_protocol::blob::Response,
    },
    Group {
        relay: PeerId,
        addrs: Vec<Multiaddr>,
        request: group_wire::Request,
        reply: oneshot::Sender<Result<group_wire::Response, NetError>>,
    },
    Subscribe {
        topic: String,
        subscribe: bool,
    },
    Strike {
        peer: PeerId,
    },
    ValidateGossip {
        source: PeerId,
        message_id: gossipsub::MessageId,
        acceptance: gossipsub::MessageAcceptance,
    },
    SendDm {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Message<dm::Request>,
        reply: oneshot::Sender<Result<dm::Response, NetError>>,
    },
    Mailbox {
        relay: PeerId,
        addrs: Vec<Multiaddr>,
        request: mailbox::Request,
        reply: oneshot::Sender<Result<mailbox::Response, NetError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Presence {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: presence::Request,
        reply: oneshot::Sender<Result<presence::Response, NetError>>,
    },
    RespondPresence {
        channel: ResponseChannel<presence::Response>,
        response: presence::Response,
    },
    Connected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Health {
        reply: oneshot::Sender<Health>,
    },
}

/// What the network knows of its home relays and its connections, for `kith status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    /// Each home relay.
    pub relays: Vec<RelayHealth>,
    /// Connected peers and the road each connection takes: `direct` when one connection is
    /// not through a relay circuit, `relayed` otherwise.
    pub paths: HashMap<PeerId, &'static str>,
}

/// One home relay's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelayHealth {
    /// Its address, with `/p2p/<id>`.
    pub addr: String,
    /// Whether a connection to it is open.
    pub connected: bool,
    /// Whether it holds a circuit reservation for this node (others can reach it through it).
    pub reserved: bool,
    /// Why the last dial failed, while it is not connected.
    pub error: Option<String>,
    /// Since when (unix ms) it is connected, or failing.
    pub since_ms: Option<u64>,
}

/// The actor's record of one home relay.
#[derive(Debug, Default)]
struct RelayState {
    connected: bool,
    reserved: bool,
    error: Option<String>,
    since_ms: Option<u64>,
}

/// A cloneable handle to the network actor.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    streams: crate::net::dm_streams::Streams,
    paths: Arc<Paths>,
    /// Where connections run: strangers' on the newcomers' lane, contacts' and relays' on the
    /// node's runtime ([`NEWCOMER_LANE_NICE`]).
    lanes: kith_relay::lanes::Lanes,
}

/// `/kith/dm/1` requests sent so far, by the road they took.
#[derive(Default)]
struct Paths {
    ready_stream: AtomicU64,
    request_response: AtomicU64,
}

/// `/kith/dm/1` requests a node sent, by the road they took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DmPaths {
    /// On a connection's ready stream (see `dm_streams`).
    pub ready_stream: u64,
    /// Through the swarm's request-response behaviour (no ready stream; it dials if need be).
    pub request_response: u64,
}

impl Handle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Moves `peer`'s connections off the newcomers' lane: it is a contact.
    pub(crate) fn trust(&self, peer: &PeerId) {
        self.lanes.promote_peer(peer);
    }

    /// Whether each of `peer`'s connections runs on the newcomers' lane (`true`) or on the
    /// node's runtime.
    pub fn on_newcomers_lane(&self, peer: &PeerId) -> Vec<bool> {
        self.lanes
            .lanes_of_peer(peer)
            .into_iter()
            .map(|lane| lane == kith_relay::lanes::Lane::Newcomers)
            .collect()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Sends a `/kith/dm/1` request to `peer`, dialing `addrs` if not connected. The request
    /// leaves at once (before the returned future is first polled): on a ready stream of a
    /// connection to `peer` if there is one, else through the network task when its queue has
    /// room. The caller goes on while it is on its way; the future yields the answer.
    pub fn send_dm(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Message<dm::Request>,
    ) -> impl std::future::Future<Output = Result<dm::Response, NetError>> + Send + 'static {
        let Some(stream) = self.streams.take(peer) else {
            return futures::future::Either::Left(self.send_dm_through_swarm(peer, addrs, request));
        };
        self.paths.ready_stream.fetch_add(1, Ordering::Relaxed);
        let mut exchange = Box::pin(exchange_on(stream, request));
        // Writes the request now. What is left is waiting for the answer: the caller's task polls
        // again, with its own waker, before an answer can be there (and finds it if it is).
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        let early = std::future::Future::poll(exchange.as_mut(), &mut cx);
        let handle = self.clone();
        futures::future::Either::Right(async move {
            let result = match early {
                std::task::Poll::Ready(result) => result,
                std::task::Poll::Pending => exchange.await,
            };
            match result {
                Ok(response) => Ok(response),
                Err(Exchange::Unsent(request, e)) => {
                    tracing::debug!(%peer, error = %e, "ready dm stream failed; using request-response");
                    handle.send_dm_through_swarm(peer, addrs, *request).await
                }
                Err(Exchange::Failed(e)) => Err(NetError::Unreachable(e.to_string())),
            }
        })
    }

    /// [`Handle::send_dm`] through the swarm's request-response behaviour.
    fn send_dm_through_swarm(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Message<dm::Request>,
    ) -> impl std::future::Future<Output = Result<dm::Response, NetError>> + Send + 'static {
        self.paths.request_response.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let command = Command::SendDm {
            peer,
            addrs,
            request,
            reply,
        };
        let waiting = match self.commands.try_send(command) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(command)) => Ok(Some(command)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NetError::Closed),
        };
        let commands = self.commands.clone();
        async move {
            if let Some(command) = waiting? {
                commands.send(command).await.map_err(|_| NetError::Closed)?;
            }
            answer.await.map_err(|_| NetError::Closed)?
        }
    }

    /// `/kith/dm/1` requests sent so far, by the road they took.
    pub fn dm_paths(&self) -> DmPaths {
        DmPaths {
            ready_stream: self.paths.ready_stream.load(Ordering::Relaxed),
            request_response: self.paths.request_response.load(Ordering::Relaxed),
        }
    }

    /// Inbound `/kith/dm/1` streams go to `server` (called on their connection's task) instead
    /// of coming out as [`Event::InboundDm`].
    pub(crate) fn serve_dm_with(
        &self,
        server: impl Fn(PeerId, libp2p::Stream) + Send + Sync + 'static,
    ) {
        self.streams.serve_with(Box::new(server));
    }

    /// Sends a `/kith/mailbox/1` request to a relay.
    pub async fn mailbox(
        &self,
        relay: PeerId,
        addrs: Vec<Multiaddr>,
        request: mailbox::Request,
    ) -> Result<mailbox::Response, NetError> {
        self.ask(|reply| Command::Mailbox {
            relay,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Sends a `/kith/blob/1` request to `peer` (a relay or a node), dialing `addrs` if not
    /// connected.
    pub async fn blob(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: kith_protocol::blob::Request,
    ) -> Result<kith_protocol::blob::Response, NetError> {
        self.ask(|reply| Command::Blob {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Answers an inbound `/kith/blob/1` request.
    pub async fn respond_blob(
        &self,
        channel: ResponseChannel<kith_protocol::blob::Response>,
        response: kith_protocol::blob::Response,
    ) {
        let _ = self
            .commands
            .send(Command::RespondBlob { channel, response })
            .await;
    }

    /// Sends a `/kith/presence/1` request to `peer` (a relay or a node), dialing `addrs` if not
    /// connected.
    pub async fn presence(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: presence::Request,
    ) -> Result<presence::Response, NetError> {
        self.ask(|reply| Command::Presence {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Sends a `/kith/keys/1` request to `peer` (a relay or a node), dialing `addrs` if not
    /// connected.
    pub async fn keys(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: prekeys::Request,
    ) -> Result<prekeys::Response, NetError> {
        self.ask(|reply| Command::Keys {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Answers an inbound `/kith/keys/1` request.
    pub async fn respond_keys(
        &self,
        channel: ResponseChannel<prekeys::Response>,
        response: prekeys::Response,
    ) {
        let _ = self
            .commands
            .send(Command::RespondKeys { channel, response })
            .await;
    }

    /// Answers an inbound `/kith/presence/1` request.
    pub async fn respond_presence(
        &self,
        channel: ResponseChannel<presence::Response>,
        response: presence::Response,
    ) {
        let _ = self
            .commands
            .send(Command::RespondPresence { channel, response })
            .await;
    }

    /// Sends a `/kith/group/1` request to a group's home relay.
    pub async fn group(
        &self,
        relay: PeerId,
        addrs: Vec<Multiaddr>,
        request: group_wire::Request,
    ) -> Result<group_wire::Response, NetError> {
        self.ask(|reply| Command::Group {
            relay,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Subscribes to (or, with `subscribe: false`, leaves) a gossipsub topic.
    pub async fn subscribe(&self, topic: String, subscribe: bool) {
        let _ = self
            .commands
            .send(Command::Subscribe { topic, subscribe })
            .await;
    }

    /// Counts an undecodable request of `peer` (a stranger: the caller checks), which bans it
    /// once it sent too many.
    pub async fn strike(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Strike { peer }).await;
    }

    /// Reports whether a gossip message is valid (forwarded) or not (dropped).
    pub async fn validate_gossip(
        &self,
        source: PeerId,
        message_id: gossipsub::MessageId,
        acceptance: gossipsub::MessageAcceptance,
    ) {
        let _ = self
            .commands
            .send(Command::ValidateGossip {
                source,
                message_id,
                acceptance,
            })
            .await;
    }

    /// The addresses this node listens on, with `/p2p/<id>`.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.ask(|reply| Command::ListenAddrs { reply })
            .await
            .unwrap_or_default()
    }

    /// The home relays' state and the roads to connected peers.
    pub async fn health(&self) -> Health {
        self.ask(|reply| Command::Health { reply })
            .await
            .unwrap_or_default()
    }

    /// Whether a connection to `peer` is open.
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        self.ask(|reply| Command::Connected { peer, reply })
            .await
            .unwrap_or(false)
    }
}

/// Network settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Home relays (each ending in `/p2p/<relay id>`).
    pub relays: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// gossipsub heartbeat interval (group topics' mesh upkeep).
    pub gossip_heartbeat: Duration,
}

/// The CPU priority (`nice`) of the thread that runs handshakes and strangers' connections
/// (the relay's newcomers' lane, [`kith_relay::lanes`]): strangers' churned identities,
/// garbage and floods wait for the node's contacts and relays, whose connections move to the
/// node's own runtime as soon as they are known.
pub const NEWCOMER_LANE_NICE: i32 = 10;

/// The longest a stopping node waits for the connections on the newcomers' lane to close.
const NEWCOMERS_STOP_WAIT: Duration = Duration::from_secs(2);

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The transport could not be built.
    #[error("building the libp2p transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A relay address does not end in `/p2p/<peer id>`.
    #[error("relay address {0} must end in /p2p/<relay peer id>")]
    RelayAddr(Multiaddr),
}

/// The peer id at the end of a multiaddr, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Builds the swarm, starts listening, and spawns the actor. Returns the handle, the event
/// receiver and the actor's task.
pub(crate) async fn start(
    key: Keypair,
    settings: Settings,
    shutdown: crate::shutdown::Signal,
) -> Result<(Handle, mpsc::Receiver<Event>, tokio::task::JoinHandle<()>), StartError> {
    let local_peer_id = key.public().to_peer_id();
    let mut relays = HashMap::new();
    for addr in &settings.relays {
        let peer = peer_of(addr).ok_or_else(|| StartError::RelayAddr(addr.clone()))?;
        relays.insert(peer, addr.clone());
    }
    let mdns_enabled = settings.mdns;
    let gossipsub =
        gossip::behaviour(&key, settings.gossip_heartbeat).map_err(StartError::Transport)?;
    let (events_tx, events_rx) = mpsc::channel(1024);
    let (dm_streams, streams) = crate::net::dm_streams::Behaviour::new(
        StreamProtocol::new(dm::PROTOCOL),
        events_tx.clone(),
    );
    // Connections start on the newcomers' lane; a contact's or relay's moves to this runtime
    // once known (no waiting time: a node knows its peers by their keys).
    let (lanes, newcomers) = kith_relay::lanes::Lanes::start(
        NEWCOMER_LANE_NICE,
        Duration::ZERO,
        kith_relay::metrics::Metrics::new(),
    )
    .map_err(|e| StartError::Transport(e.to_string()))?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| StartError::Transport(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| StartError::Transport(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| StartError::Transport(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let peer = key.public().to_peer_id();
            let mdns = if mdns_enabled {
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer).ok()
            } else {
                None
            };
            Behaviour {
                relay_client,
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                dm_streams,
                dm: request_response::Behaviour::with_codec(
                    DmCodec::new(dm::MAX_FRAME_BYTES),
                    [(StreamProtocol::new(dm::PROTOCOL), ProtocolSupport::Outbound)],
                    kith_net::request_response_config(),
                ),
                mailbox: request_response::Behaviour::with_codec(
                    MailboxCodec::with_limits(mailbox::MAX_REQUEST_BYTES, mailbox::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(mailbox::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
                mdns: Toggle::from(mdns),
                gossipsub,
                group: request_response::Behaviour::with_codec(
                    GroupCodec::with_limits(
                        group_wire::MAX_REQUEST_BYTES,
                        group_wire::MAX_FRAME_BYTES,
                    ),
                    [(
                        StreamProtocol::new(group_wire::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
                blob: request_response::Behaviour::with_codec(
                    kith_net::BlobCodec::new(kith_protocol::blob::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(kith_protocol::blob::PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    kith_net::request_response_config(),
                ),
                keys: request_response::Behaviour::with_codec(
                    kith_net::KeysCodec::new(prekeys::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(prekeys::PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    kith_net::request_response_config(),
                ),
                strikes: kith_relay::strikes::Behaviour::new(
                    MALFORMED_REQUESTS_PER_SEC,
                    MALFORMED_REQUEST_BURST,
                    BAN,
                ),
                limits: libp2p::connection_limits::Behaviour::new(
                    libp2p::connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                        .with_max_established_incoming(Some(MAX_INBOUND_CONNECTIONS))
                        .with_max_pending_incoming(Some(MAX_PENDING_INBOUND)),
                ),
                presence: request_response::Behaviour::with_codec(
                    PresenceCodec::new(presence::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(presence::PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    kith_net::request_response_config(),
                ),
            }
        })
        .map_err(|e| StartError::Transport(e.to_string()))?
        // A configuration of its own instead of the one given (whose executor is tokio's): the
        // same defaults, with the lanes as the executor.
        .with_swarm_config(|_| {
            libp2p::swarm::Config::with_executor(lanes.clone())
                .with_idle_connection_timeout(kith_net::IDLE_CONNECTION_TIMEOUT)
                // 0-RTT stream negotiation: a request leaves with its protocol proposal instead
                // of a round trip later. Same wire protocol as V1; every listener accepts it.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();

    let mut pending_listeners = HashSet::new();
    for addr in &settings.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        pending_listeners.insert(id);
    }
    // Wait until every listener reports an address, so callers see real ports.
    while !pending_listeners.is_empty() {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                pending_listeners.remove(&listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                return Err(StartError::Listen {
                    addr: Multiaddr::empty(),
                    reason: format!("listener {listener_id:?} closed: {reason:?}"),
                })
            }
            _ => {}
        }
    }
    for addr in relays.values() {
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(relay = %addr, error = %e, "cannot dial home relay");
        }
    }

    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let actor = Actor {
        swarm,
        relay_states: relays.keys().map(|p| (*p, RelayState::default())).collect(),
        connections: HashMap::new(),
        relays,
        circuits: HashSet::new(),
        pending_dm: HashMap::new(),
        pending_mailbox: HashMap::new(),
        pending_presence: HashMap::new(),
        events: events_tx,
        pending_group: HashMap::new(),
        pending_blob: HashMap::new(),
        pending_keys: HashMap::new(),
        ban_warnings: kith_relay::quiet::Warnings::new(BAN_LINE_INTERVAL_MS),
        lanes: lanes.clone(),
        newcomers,
    };
    let task = tokio::spawn(actor.run(commands_rx, shutdown));
    Ok((
        Handle {
            commands: commands_tx,
            local_peer_id,
            streams,
            paths: Arc::default(),
            lanes,
        },
        events_rx,
        task,
    ))
}

struct Actor {
    swarm: Swarm<Behaviour>,
    relays: HashMap<PeerId, Multiaddr>,
    /// What `kith status` shows of each home relay.
    relay_states: HashMap<PeerId, RelayState>,
    /// Open connections per peer, and whether each goes through a relay circuit.
    connections: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, bool>>,
    /// Relays on which a circuit listener is open.
    circuits: HashSet<PeerId>,
    pending_dm: HashMap<OutboundRequestId, oneshot::Sender<Result<dm::Response, NetError>>>,
    pending_mailbox:
        HashMap<OutboundRequestId, oneshot::Sender<Result<mailbox::Response, NetError>>>,
    pending_presence:
        HashMap<OutboundRequestId, oneshot::Sender<Result<presence::Response, NetError>>>,
    events: mpsc::Sender<Event>,
    pending_group:
        HashMap<OutboundRequestId, oneshot::Sender<Result<group_wire::Response, NetError>>>,
    pending_blob: HashMap<
        OutboundRequestId,
        oneshot::Sender<Result<kith_protocol::blob::Response, NetError>>,
    >,
    pending_keys: HashMap<OutboundRequestId, oneshot::Sender<Result<prekeys::Response, NetError>>>,
    /// Rate-limits the line about banned strangers: an attacker bans a fresh identity at a time.
    ban_warnings: kith_relay::quiet::Warnings,
    /// Moves a home relay's connections to this runtime as they open.
    lanes: kith_relay::lanes::Lanes,
    /// The newcomers' lane's thread: stops (with the connections still on it) with the actor.
    newcomers: kith_relay::lanes::NewcomersRuntime,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: crate::shutdown::Signal,
    ) {
        let mut redial = tokio::time::interval(RELAY_REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(command) = commands.recv() => self.handle_command(command),
                event = self.swarm.select_next_some() => self.handle_event(event).await,
                _ = redial.tick() => self.redial_relays(),
            }
        }
        // The connections go with the swarm; those on the newcomers' lane are closed before the
        // node counts as stopped (a node started again at once listens on the same port).
        let Actor {
            swarm, newcomers, ..
        } = self;
        drop(swarm);
        newcomers.stop(NEWCOMERS_STOP_WAIT).await;
        tracing::debug!("network actor stopped");
    }

    fn redial_relays(&mut self) {
        let mut unreserved = Vec::new();
        for (peer, addr) in &self.relays {
            if !self.swarm.is_connected(peer) {
                tracing::debug!(relay = %addr, "re-dialing home relay");
                let _ = self.swarm.dial(addr.clone());
            } else if !self.circuits.contains(peer) {
                unreserved.push((*peer, addr.clone()));
            }
        }
        // Connected, but the circuit listener closed (the reservation was refused or lapsed
        // while the connection stayed): reserve again now rather than on the next connection.
        for (peer, addr) in unreserved {
            self.reserve(peer, addr);
        }
    }

    /// Opens a circuit listener (a reservation) at home relay `peer`, once.
    fn reserve(&mut self, peer: PeerId, addr: Multiaddr) {
        if self.circuits.insert(peer) {
            let circuit = addr.with(Protocol::P2pCircuit);
            if let Err(e) = self.swarm.listen_on(circuit.clone()) {
                tracing::warn!(%circuit, error = %e, "cannot reserve a relay circuit");
                self.circuits.remove(&peer);
            }
        }
    }

    /// A dial failed: for a home relay, remember why and say so once per new reason (the
    /// re-dial every few seconds would otherwise repeat it).
    fn relay_dial_failed(&mut self, peer: PeerId, reason: String) {
        let (Some(state), Some(addr)) = (self.relay_states.get_mut(&peer), self.relays.get(&peer))
        else {
            return;
        };
        if state.connected {
            return;
        }
        if state.error.as_deref() != Some(reason.as_str()) {
            tracing::warn!(relay = %addr, error = %reason, "cannot reach home relay; will keep trying (`kith status` shows it)");
            if state.error.is_none() {
                state.since_ms = Some(crate::clock::now_ms());
            }
            state.error = Some(reason);
        }
    }

    fn health(&self) -> Health {
        let mut relays: Vec<RelayHealth> = self
            .relays
            .iter()
            .map(|(peer, addr)| {
                let state = self.relay_states.get(peer);
                RelayHealth {
                    addr: addr.to_string(),
                    connected: self.swarm.is_connected(peer),
                    reserved: state.is_some_and(|s| s.reserved),
                    error: state.and_then(|s| s.error.clone()),
                    since_ms: state.and_then(|s| s.since_ms),
                }
            })
            .collect();
        relays.sort_by(|a, b| a.addr.cmp(&b.addr));
        let paths = self
            .connections
            .iter()
            .map(|(peer, open)| {
                let road = if open.values().any(|relayed| !relayed) {
                    "direct"
                } else {
                    "relayed"
                };
                (*peer, road)
            })
            .collect();
        Health { relays, paths }
    }

    fn add_addresses(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        // Every behaviour hears of each address added; a connected peer needs none.
        if self.swarm.is_connected(&peer) {
            return;
        }
        for addr in addrs {
            self.swarm.add_peer_address(peer, addr);
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Keys {
                peer,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(peer, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().keys;
                send_to(
                    behaviour,
                    &mut self.pending_keys,
                    &peer,
                    Message::Valid(request),
                    reply,
                );
            }
            Command::RespondKeys { channel, response } => {
                respond_on(&mut self.swarm.behaviour_mut().keys, channel, response);
            }
            Command::Blob {
                peer,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(peer, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().blob;
                send_to(
                    behaviour,
                    &mut self.pending_blob,
                    &peer,
                    Message::Valid(request),
                    reply,
                );
            }
            Command::RespondBlob { channel, response } => {
                respond_on(&mut self.swarm.behaviour_mut().blob, channel, response);
            }
            Command::SendDm {
                peer,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(peer, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().dm;
                send_to(behaviour, &mut self.pending_dm, &peer, request, reply);
            }
            Command::Mailbox {
                relay,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(relay, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().mailbox;
                send_to(
                    behaviour,
                    &mut self.pending_mailbox,
                    &relay,
                    Message::Valid(request),
                    reply,
                );
            }
            Command::ListenAddrs { reply } => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .listeners()
                    .map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Group {
                relay,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(relay, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().group;
                send_to(
                    behaviour,
                    &mut self.pending_group,
                    &relay,
                    Message::Valid(request),
                    reply,
                );
            }
            Command::Strike { peer } => {
                if self.swarm.behaviour_mut().strikes.strike(peer) {
                    let all_bans = *self.swarm.local_peer_id();
                    kith_relay::warn_refused!(
                        self.ban_warnings,
                        crate::clock::now_ms(),
                        key = all_bans,
                        peer,
                        "banning a stranger that keeps sending malformed requests"
                    );
                }
            }
            Command::Subscribe { topic, subscribe } => {
                let topic = gossipsub::IdentTopic::new(topic);
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                if subscribe {
                    if let Err(e) = gossip.subscribe(&topic) {
                        tracing::warn!(%topic, error = %e, "cannot subscribe to a group topic");
                    }
                } else {
                    gossip.unsubscribe(&topic);
                }
            }
            Command::ValidateGossip {
                source,
                message_id,
                acceptance,
            } => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &source, acceptance);
            }
            Command::Connected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::Health { reply } => {
                let _ = reply.send(self.health());
            }
            Command::Presence {
                peer,
                addrs,
                request,
                reply,
            } => {
                self.add_addresses(peer, addrs);
                let behaviour = &mut self.swarm.behaviour_mut().presence;
                send_to(
                    behaviour,
                    &mut self.pending_presence,
                    &peer,
                    Message::Valid(request),
                    reply,
                );
            }
            Command::RespondPresence { channel, response } => {
                respond_on(&mut self.swarm.behaviour_mut().presence, channel, response);
            }
        }
    }

    async fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Dm(event)) => self.handle_dm(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::Blob(event)) => self.handle_blob(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::Keys(event)) => {
                if let Some((peer, request, channel)) =
                    route(&mut self.pending_keys, event, prekeys::PROTOCOL)
                {
                    let event = Event::InboundKeys {
                        peer,
                        request,
                        channel,
                    };
                    emit(&self.events, event).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(event)) => self.handle_mailbox(event),
            SwarmEvent::Behaviour(BehaviourEvent::Group(event)) => self.handle_group(event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => {
                self.handle_gossip(event).await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Presence(event)) => {
                self.handle_presence(event).await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.add_peer_address(peer, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                tracing::debug!(?event, "relay client");
                if let relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } = event {
                    if let Some(state) = self.relay_states.get_mut(&relay_peer_id) {
                        state.reserved = true;
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => self.relay_dial_failed(peer, error.to_string()),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, endpoint.is_relayed());
                if let Some(state) = self.relay_states.get_mut(&peer_id) {
                    if !state.connected {
                        if state.error.is_some() {
                            tracing::info!(relay = %peer_id, "home relay reachable again");
                        }
                        *state = RelayState {
                            connected: true,
                            reserved: state.reserved,
                            error: None,
                            since_ms: Some(crate::clock::now_ms()),
                        };
                    }
                }
                if let Some(addr) = self.relays.get(&peer_id).cloned() {
                    self.lanes.promote(connection_id);
                    self.reserve(peer_id, addr);
                    emit(&self.events, Event::RelayConnected { relay: peer_id }).await;
                }
                emit(&self.events, Event::Connected { peer: peer_id }).await;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(open) = self.connections.get_mut(&peer_id) {
                    open.remove(&connection_id);
                    if open.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                if num_established > 0 {
                    return;
                }
                tracing::debug!(peer = %peer_id, "disconnected");
                if let Some(state) = self.relay_states.get_mut(&peer_id) {
                    tracing::info!(relay = %peer_id, "lost home relay; will re-dial");
                    *state = RelayState {
                        since_ms: Some(crate::clock::now_ms()),
                        ..RelayState::default()
                    };
                }
            }
            SwarmEvent::ListenerClosed { addresses, .. } => {
                for addr in addresses {
                    if let Some(relay) = relay_of_circuit(&addr) {
                        self.circuits.remove(&relay);
                        if let Some(state) = self.relay_states.get_mut(&relay) {
                            state.reserved = false;
                        }
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            _ => {}
        }
    }

    async fn handle_dm(
        &mut self,
        event: request_response::Event<Message<dm::Request>, dm::Response>,
    ) {
        // Inbound dm streams go to `dm_streams`: this behaviour only asks.
        if let Some((peer, ..)) = route(&mut self.pending_dm, event, dm::PROTOCOL) {
            tracing::warn!(%peer, "unexpected inbound dm request through request-response");
        }
    }

    fn handle_mailbox(
        &mut self,
        event: request_response::Event<Message<mailbox::Request>, mailbox::Response>,
    ) {
        if let Some((peer, ..)) = route(&mut self.pending_mailbox, event, mailbox::PROTOCOL) {
            tracing::warn!(%peer, "unexpected inbound mailbox request (nodes only ask)");
        }
    }
}

impl Actor {
    async fn handle_presence(
        &mut self,
        event: request_response::Event<Message<presence::Request>, presence::Response>,
    ) {
        if let Some((peer, request, channel)) =
            route(&mut self.pending_presence, event, presence::PROTOCOL)
        {
            emit(
                &self.events,
                Event::InboundPresence {
                    peer,
                    request,
                    channel,
                },
            )
            .await;
        }
    }
}

/// Sends a request and remembers who waits for its answer.
fn send_to<C>(
    behaviour: &mut request_response::Behaviour<C>,
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<C::Response, NetError>>>,
    peer: &PeerId,
    request: C::Request,
    reply: oneshot::Sender<Result<C::Response, NetError>>,
) where
    C: request_response::Codec + Clone + Send + 'static,
{
    let id = behaviour.send_request(peer, request);
    pending.insert(id, reply);
}

/// Answers an inbound request; the requester may have gone away meanwhile.
fn respond_on<C>(
    behaviour: &mut request_response::Behaviour<C>,
    channel: ResponseChannel<C::Response>,
    response: C::Response,
) where
    C: request_response::Codec + Clone + Send + 'static,
{
    if behaviour.send_response(channel, response).is_err() {
        tracing::debug!("response not sent: the requester went away");
    }
}

/// Routes one request-response event: an answer (or failure) of one of our requests goes to the
/// caller waiting for it in `pending`; an inbound request is handed back for the caller to pass
/// on with its response channel.
fn route<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, NetError>>>,
    event: request_response::Event<Req, Resp>,
    protocol: &'static str,
) -> Option<(PeerId, Req, ResponseChannel<Resp>)> {
    use request_response::{Event as E, Message as M};
    match event {
        E::Message {
            peer,
            message: M::Request {
                request, channel, ..
            },
            ..
        } => Some((peer, request, channel)),
        E::Message {
            message:
                M::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Ok(response));
            }
            None
        }
        E::OutboundFailure {
            request_id, error, ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(outbound_error(error)));
            }
            None
        }
        E::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, %error, protocol, "inbound request failed");
            None
        }
        E::ResponseSent { .. } => None,
    }
}

/// How a request on a ready stream went wrong.
enum Exchange {
    /// Writing the request failed: it may go another way (should part of it have left, the
    /// recipient drops the second copy).
    Unsent(Box<Message<dm::Request>>, std::io::Error),
    /// Afterwards: the recipient may or may not have it.
    Failed(std::io::Error),
}

/// One `/kith/dm/1` request on a ready stream, as request-response does it: the request, the
/// write half closed, the answer.
async fn exchange_on(
    mut stream: crate::net::dm_streams::InUse,
    request: Message<dm::Request>,
) -> Result<dm::Response, Exchange> {
    use request_response::Codec;
    let (protocol, mut codec) = dm_codec();
    // The codec closes the write half after the request. If the write fails (the connection is
    // gone, say), the request goes through request-response.
    let written = codec
        .write_request(&protocol, &mut stream.stream, request.clone())
        .await;
    if let Err(e) = written {
        return Err(Exchange::Unsent(Box::new(request), e));
    }
    codec
        .read_response(&protocol, &mut stream.stream)
        .await
        .map_err(Exchange::Failed)
}

/// The `/kith/dm/1` protocol name and codec, for streams handled outside request-response.
fn dm_codec() -> (StreamProtocol, DmCodec) {
    (
        StreamProtocol::new(dm::PROTOCOL),
        DmCodec::new(dm::MAX_FRAME_BYTES),
    )
}

/// Reads the request on an inbound `/kith/dm/1` stream ([`Event::InboundDm`]); it must come
/// within [`kith_net::REQUEST_TIMEOUT`].
pub async fn read_dm(stream: &mut libp2p::Stream) -> std::io::Result<Message<dm::Request>> {
    use request_response::Codec;
    let (protocol, mut codec) = dm_codec();
    let read = codec.read_request(&protocol, stream);
    tokio::time::timeout(kith_net::REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Answers the request read with [`read_dm`], and closes the stream (the codec does).
pub async fn answer_dm(mut stream: libp2p::Stream, response: dm::Response) -> std::io::Result<()> {
    use request_response::Codec;
    let (protocol, mut codec) = dm_codec();
    let write = codec.write_response(&protocol, &mut stream, response);
    tokio::time::timeout(kith_net::REQUEST_TIMEOUT, write)
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

async fn emit(events: &mpsc::Sender<Event>, event: Event) {
    if events.send(event).await.is_err() {
        tracing::debug!("event dropped: the engine has stopped");
    }
}

fn outbound_error(error: request_response::OutboundFailure) -> NetError {
    match error {
        request_response::OutboundFailure::Timeout => NetError::Timeout,
        other => NetError::Unreachable(other.to_string()),
    }
}

/// The relay's peer id in a `/…/p2p/<relay>/p2p-circuit/…` address.
fn relay_of_circuit(addr: &Multiaddr) -> Option<PeerId> {
    let mut last_peer = None;
    for proto in addr.iter() {
        match proto {
            Protocol::P2p(peer) => last_peer = Some(peer),
            Protocol::P2pCircuit => return last_peer,
            _ => {}
        }
    }
    None
}

/// The address of `peer` through `relay`'s circuit.
pub fn circuit_addr(relay: &Multiaddr, peer: PeerId) -> Multiaddr {
    relay
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(peer))
}

impl Actor {
    fn handle_group(
        &mut self,
        event: request_response::Event<Message<group_wire::Request>, group_wire::Response>,
    ) {
        if let Some((peer, ..)) = route(&mut self.pending_group, event, group_wire::PROTOCOL) {
            tracing::warn!(%peer, "unexpected inbound group request (nodes only ask)");
        }
    }

    async fn handle_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let event = Event::Gossip {
                    source: propagation_source,
                    message_id,
                    topic: message.topic.into_string(),
                    data: message.data,
                };
                emit(&self.events, event).await;
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed");
            }
            _ => {}
        }
    }
}

impl Actor {
    async fn handle_blob(
        &mut self,
        event: request_response::Event<
            Message<kith_protocol::blob::Request>,
            kith_protocol::blob::Response,
        >,
    ) {
        if let Some((peer, request, channel)) =
            route(&mut self.pending_blob, event, kith_protocol::blob::PROTOCOL)
        {
            emit(
                &self.events,
                Event::InboundBlob {
                    peer,
                    request,
                    channel,
                },
            )
            .await;
        }
    }
}
