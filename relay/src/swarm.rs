//! The relay's libp2p swarm and the task that owns it.
//!
//! The [`Behaviour`] combines the circuit relay v2 server (the gateway for nodes behind NAT),
//! identify, ping, the autonat v1 server, gossipsub for group topics, and one request-response
//! behaviour ([`crate::requests`]) for the `/kith/mailbox/1`, `/kith/presence/1`
//! ([`crate::presence`]), `/kith/group/1` and `/kith/blob/1` servers and the `/kith/dm/1`
//! client used to push deposits to connected recipients. Low-priority requests are shed with
//! `Busy` under load ([`crate::shed`]).
//!
//! The swarm task never waits on the store: a mailbox request goes to the
//! [mailbox service](crate::mailbox::service) together with a oneshot; the libp2p response
//! channel stays here in a set of pending answers, which the task's `select!` loop completes
//! when the service (or, for deposits, the group-commit flusher) replies. A full service queue
//! is answered `Busy` at once.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kith_net::codec::Budget;
use kith_net::codec::Message;
use kith_protocol::{dm, mailbox, presence as presence_wire, Reject};
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, identify, identity, noise, ping, relay, tcp, yamux, Multiaddr,
    PeerId, Swarm,
};
use tokio::sync::oneshot;

use crate::boxed::Boxed;
use crate::config::Config;
use crate::group::gateway::{Done as GroupDone, Gateway as GroupGateway};
use crate::lanes::Lanes;
use crate::mailbox::service::{self, Outcome, Push};
use crate::metrics::Metrics;
use crate::presence;
use crate::pushes::{Admit, Pushes};
use crate::requests::{self, Channel};
use crate::shed;
use crate::state_file;
use kith_protocol::group as group_wire;

/// The identify protocol version kith peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/kith/1.0.0";

/// The relay's behaviour: [`Protocols`], with each connection's handler in a box so an idle
/// connection holds it once ([`crate::boxed`]). Derefs to [`Protocols`].
pub type Behaviour = Boxed<Protocols>;

/// What the relay's swarm reports.
pub type BehaviourEvent = ProtocolsEvent;

/// Every protocol the relay speaks.
#[derive(NetworkBehaviour)]
pub struct Protocols {
    /// Connection limits (in all, per peer, pending); first, so a connection beyond them is
    /// refused before any other behaviour spends anything on it.
    pub limits: connection_limits::Behaviour,
    /// New connections per IP address, refused before their handshake ([`crate::ip_rate`]).
    pub ip_rate: crate::ip_rate::Behaviour,
    /// Peers banned for malformed requests, refused once their identity is known
    /// ([`crate::strikes`]).
    pub strikes: crate::strikes::Behaviour,
    /// Circuit relay v2 server.
    pub relay: relay::Behaviour,
    /// Address exchange.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// NAT status probes for nodes (server side).
    pub autonat: autonat::Behaviour,
    /// `/kith/mailbox/1`, `/kith/presence/1` (heartbeats, goodbyes, queries), `/kith/group/1`
    /// (membership operations, chains, message uploads) and `/kith/blob/1` (encrypted file
    /// chunks, [`crate::blob`]) inbound; `/kith/dm/1` pushes outbound.
    pub requests: requests::Behaviour,
    /// Group messages to online members, on `kith/g/<group id>` ([`crate::group`]).
    pub gossipsub: crate::group::Gossipsub,
}

fn relay_config(config: &Config) -> relay::Config {
    let mut relay = relay::Config {
        max_reservations: config.max_reservations,
        max_reservations_per_peer: config.max_reservations_per_peer,
        reservation_duration: Duration::from_secs(config.reservation_duration_secs),
        reservation_rate_limiters: Vec::new(),
        max_circuits: config.max_circuits,
        max_circuits_per_peer: config.max_circuits_per_peer,
        max_circuit_duration: Duration::from_secs(config.max_circuit_duration_secs),
        max_circuit_bytes: config.max_circuit_bytes,
        circuit_src_rate_limiters: Vec::new(),
    };
    // n per minute: a bucket of n tokens refilled one token every minute / n.
    let per_minute = |n: NonZeroU32| Duration::from_secs(60) / n.get();
    if let Some(n) = NonZeroU32::new(config.reservations_per_peer_per_minute) {
        relay = relay.reservation_rate_per_peer(n, per_minute(n));
    }
    if let Some(n) = NonZeroU32::new(config.reservations_per_ip_per_minute) {
        relay = relay.reservation_rate_per_ip(n, per_minute(n));
    }
    if let Some(n) = NonZeroU32::new(config.circuits_per_peer_per_minute) {
        relay = relay.circuit_src_per_peer(n, per_minute(n));
    }
    if let Some(n) = NonZeroU32::new(config.circuits_per_ip_per_minute) {
        relay = relay.circuit_src_per_ip(n, per_minute(n));
    }
    relay
}

impl Protocols {
    /// The relay's protocols for `key`, with the limits in `config`; every request frame read
    /// counts against `budget`.
    pub fn new(
        key: &identity::Keypair,
        config: &Config,
        budget: Budget,
    ) -> Result<Self, BuildError> {
        let peer_id = key.public().to_peer_id();
        let gossipsub = crate::group::gossipsub(key, config).map_err(BuildError::Gossipsub)?;
        Ok(Self {
            limits: connection_limits::Behaviour::new(connection_limits(config)),
            ip_rate: crate::ip_rate::Behaviour::new(
                config.new_connections_per_ip_per_sec,
                config.new_connection_burst_per_ip,
            ),
            strikes: crate::strikes::Behaviour::new(
                config.malformed_requests_per_peer_per_sec,
                config.malformed_request_burst_per_peer,
                std::time::Duration::from_secs(config.ban_secs),
            ),
            gossipsub,
            requests: requests::behaviour(budget, config.max_streams_per_connection),
            relay: relay::Behaviour::new(peer_id, relay_config(config)),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                    .with_agent_version(format!("kith-relay/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::default(),
            autonat: autonat::Behaviour::new(
                peer_id,
                autonat::Config {
                    // Serve probes only; a relay does not need to learn its own NAT status from
                    // the nodes it serves.
                    use_connected: false,
                    ..autonat::Config::default()
                },
            ),
        })
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// DNS resolution could not be set up (no system resolver configuration).
    #[error("dns setup failed: {0}")]
    Dns(#[from] std::io::Error),
    /// The TCP transport (its Noise upgrade) could not be set up.
    #[error("tcp transport setup failed: {0}")]
    Transport(String),
    /// gossipsub refused its configuration.
    #[error("gossipsub setup failed: {0}")]
    Gossipsub(String),
}

/// The connection limits in `config`.
fn connection_limits(config: &Config) -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_pending_incoming_connections))
}

/// The metric label of a connection refused by [`connection_limits`], or `None` for a
/// refusal of another kind.
fn connection_limit_label(cause: &libp2p::swarm::ConnectionDenied) -> Option<&'static str> {
    if cause.downcast_ref::<crate::ip_rate::TooFast>().is_some() {
        return Some("connections_per_ip_rate");
    }
    if cause.downcast_ref::<crate::strikes::Banned>().is_some() {
        return Some("banned_peer");
    }
    let exceeded = cause.downcast_ref::<connection_limits::Exceeded>()?;
    let text = exceeded.to_string();
    Some(if text.contains("per peer") {
        "connections_per_peer"
    } else if text.contains("pending") {
        "pending_connections"
    } else {
        "connections"
    })
}

/// Builds the swarm: QUIC, TCP (noise, yamux; new incoming connections paced,
/// [`crate::accept_pace`]) and DNS, with a long idle timeout; every request frame read counts
/// against `budget`; connections run on `lanes`.
pub fn build(
    keypair: identity::Keypair,
    config: &Config,
    budget: Budget,
    lanes: Lanes,
    metrics: Metrics,
) -> Result<Swarm<Behaviour>, BuildError> {
    let idle = Duration::from_secs(config.idle_connection_timeout_secs);
    let (per_sec, burst) = (config.new_connections_per_sec, config.new_connection_burst);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_other_transport(|key| {
            // What `with_tcp` builds, with the pace around the TCP listener.
            use libp2p::Transport as _;
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            let noise = noise::Config::new(key).map_err(|e| Box::new(e) as Box<_>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                crate::accept_pace::Paced::new(tcp, per_sec, burst, metrics)
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .map(|(peer, muxer), _| {
                        (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer))
                    }),
            )
        })
        .map_err(|e| BuildError::Transport(e.to_string()))?
        .with_dns()?
        .with_behaviour(|key| {
            Protocols::new(key, config, budget)
                .map(Boxed)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| BuildError::Gossipsub(e.to_string()))?
        // A configuration of its own instead of the one given (whose executor is tokio's): the
        // same defaults, with the lanes as the executor.
        .with_swarm_config(|_| {
            libp2p::swarm::Config::with_executor(lanes).with_idle_connection_timeout(idle)
        })
        .build();
    Ok(swarm)
}

/// Why the listeners did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The transport refused the address.
    #[error("cannot listen on {addr}: {source}")]
    Refused {
        /// The address.
        addr: Multiaddr,
        /// The transport's error.
        source: libp2p::TransportError<std::io::Error>,
    },
    /// A listener failed or closed before reporting an address.
    #[error("listener on {addr} failed: {reason}")]
    Failed {
        /// The address.
        addr: Multiaddr,
        /// What happened.
        reason: String,
    },
    /// A listener reported no address in time.
    #[error("listener on {addr} reported no address within {timeout:?}")]
    Timeout {
        /// The address.
        addr: Multiaddr,
        /// How long we waited.
        timeout: Duration,
    },
}

/// How long the listeners may take to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// `addr` with `/p2p/<peer>` appended (unless it already ends with it).
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

/// Starts every listener in `addrs` and waits until each has reported at least one concrete
/// address (a wildcard listener reports one per interface). Returns the addresses without
/// `/p2p`, each also registered as an external address so the relay advertises HOP.
pub async fn listen(
    swarm: &mut Swarm<Behaviour>,
    addrs: &[Multiaddr],
) -> Result<Vec<Multiaddr>, ListenError> {
    let mut waiting: HashMap<ListenerId, Multiaddr> = HashMap::new();
    for addr in addrs {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|source| ListenError::Refused {
                addr: addr.clone(),
                source,
            })?;
        waiting.insert(id, addr.clone());
    }
    let mut found = Vec::new();
    let mut on_event = |swarm: &mut Swarm<Behaviour>,
                        waiting: &mut HashMap<ListenerId, Multiaddr>,
                        event: SwarmEvent<BehaviourEvent>|
     -> Result<(), ListenError> {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                waiting.remove(&listener_id);
                swarm.add_external_address(address.clone());
                found.push(address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(addr) = waiting.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "closed".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    return Err(ListenError::Failed { addr, reason });
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                if let Some(addr) = waiting.remove(&listener_id) {
                    return Err(ListenError::Failed {
                        addr,
                        reason: error.to_string(),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    };
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    while !waiting.is_empty() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(event) => on_event(swarm, &mut waiting, event)?,
            Err(_) => {
                let addr = waiting
                    .into_values()
                    .next()
                    .unwrap_or_else(Multiaddr::empty);
                return Err(ListenError::Timeout {
                    addr,
                    timeout: LISTEN_TIMEOUT,
                });
            }
        }
    }
    // Collect the other interfaces of wildcard listeners that are already reported.
    while let Some(Some(event)) = swarm.next().now_or_never() {
        on_event(swarm, &mut waiting, event)?;
    }
    Ok(found)
}

type Pending = BoxFuture<'static, (PeerId, u64, Channel<mailbox::Response>, Option<Outcome>)>;

/// Settings the swarm task needs from the config.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// Where `relay.json` goes.
    pub data_dir: PathBuf,
    /// Push deposits to connected recipients.
    pub push_to_connected: bool,
    /// Most pushes awaiting an answer.
    pub max_pending_pushes: usize,
    /// Most pushes awaiting one recipient's answer ([`crate::pushes`]).
    pub max_pushes_per_recipient: usize,
    /// The delay a `Busy` answer asks for.
    pub busy_retry_after_ms: u64,
    /// Which work to shed under load.
    pub shed: shed::Policy,
    /// The presence service's settings.
    pub presence: presence::Settings,
    /// At most one WARN line per peer about its refused requests in this many milliseconds.
    pub refusal_log_interval_ms: u64,
}

/// The task that owns the swarm.
pub struct Task {
    swarm: Swarm<Behaviour>,
    mailbox: service::Handle,
    /// Moves connections between the relay's lane and the newcomers' ([`crate::lanes`]).
    lanes: Lanes,
    metrics: Metrics,
    /// Reservations and circuits held, from which their gauges are set.
    occupancy: crate::occupancy::Occupancy,
    settings: TaskSettings,
    pending: FuturesUnordered<Pending>,
    pushes: Pushes,
    /// Reads of held-back pushes from the mailbox ([`crate::pushes`]).
    waiting: FuturesUnordered<BoxFuture<'static, Option<service::Waiting>>>,
    listen_addrs: Vec<Multiaddr>,
    presence: presence::Service,
    groups: Option<GroupGateway>,
    blobs: Option<crate::blob::Server>,
    /// Which refusals make a WARN line.
    warnings: crate::quiet::Warnings,
    keys: Option<crate::keys::Server>,
}

impl Task {
    /// A task for `swarm`, whose listeners report `listen_addrs` (without `/p2p`).
    pub fn new(
        swarm: Swarm<Behaviour>,
        listen_addrs: Vec<Multiaddr>,
        mailbox: service::Handle,
        lanes: Lanes,
        metrics: Metrics,
        settings: TaskSettings,
    ) -> Self {
        let warnings = crate::quiet::Warnings::new(settings.refusal_log_interval_ms);
        let pushes = Pushes::new(
            settings.max_pushes_per_recipient,
            settings.max_pending_pushes,
        );
        Self {
            presence: presence::Service::new(settings.presence.clone(), metrics.clone()),
            swarm,
            mailbox,
            lanes,
            metrics,
            occupancy: Default::default(),
            settings,
            pending: FuturesUnordered::new(),
            pushes,
            waiting: FuturesUnordered::new(),
            listen_addrs,
            groups: None,
            blobs: None,
            warnings,
            keys: None,
        }
    }

    /// Serves `/kith/group/1` and the group topics through `gateway`. The relay subscribes to
    /// no topic (so it announces none of the groups it hosts to the peers it meets); it
    /// flood-publishes each group's messages to the peers subscribed to the group's topic.
    pub fn with_groups(mut self, gateway: GroupGateway) -> Self {
        self.groups = Some(gateway);
        self
    }

    /// Serves `/kith/blob/1` through `server`.
    pub fn with_blobs(mut self, server: crate::blob::Server) -> Self {
        self.blobs = Some(server);
        self
    }

    /// Serves `/kith/keys/1` through `server`.
    pub fn with_keys(mut self, server: crate::keys::Server) -> Self {
        self.keys = Some(server);
        self
    }

    /// Runs until `shutdown` fires (or its sender is dropped).
    pub async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some((peer, req_id, channel, outcome)) = self.pending.next(),
                    if !self.pending.is_empty() => {
                    self.answer(peer, req_id, channel, outcome);
                }
                Some(waiting) = self.waiting.next(), if !self.waiting.is_empty() => {
                    self.on_waiting(waiting);
                }
                done = next_group(&mut self.groups) => self.on_group_done(done),
                Some(done) = next_blob(&mut self.blobs) => {
                    if let Some(blobs) = self.blobs.as_mut() {
                        blobs.finish(&mut self.swarm, done);
                    }
                }
                Some(done) = next_keys(&mut self.keys) => {
                    if let Some(keys) = self.keys.as_mut() {
                        keys.finish(&mut self.swarm, done);
                    }
                }
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
        tracing::info!("swarm stopped");
    }

    fn on_group_done(&mut self, done: GroupDone) {
        let Some(groups) = self.groups.as_mut() else {
            return;
        };
        for push in groups.finish(&mut self.swarm, done) {
            self.push(push);
        }
    }

    fn on_group(
        &mut self,
        peer: PeerId,
        newcomer: bool,
        request: Message<group_wire::Request>,
        channel: Channel<group_wire::Response>,
    ) {
        let (class, req_id) = match &request {
            Message::Valid(r @ group_wire::Request::Post { .. }) => {
                (shed::Class::Message, r.req_id())
            }
            Message::Valid(r) => (shed::Class::Group, r.req_id()),
            _ => (shed::Class::Group, 0),
        };
        let shed = self.shed(class);
        let refused = match (self.groups.as_mut(), shed) {
            (Some(_), Some(busy)) => Some(busy),
            (Some(groups), None) => {
                groups.on_request(&mut self.swarm, peer, newcomer, request, channel);
                return;
            }
            (None, _) => Some(Reject::Malformed),
        };
        if let Some(reason) = refused {
            self.metrics.reject(&reason);
            self.lanes.after_refusal(&peer, &reason);
            let response = group_wire::Response::Rejected { req_id, reason };
            if !requests::respond(&mut self.swarm.behaviour_mut().requests, channel, response) {
                tracing::debug!(%peer, "group requester went away before its answer");
            }
        }
    }

    fn write_state(&self) {
        let peer = *self.swarm.local_peer_id();
        let addrs: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| with_peer(a, peer))
            .collect();
        if let Err(e) = state_file::write(
            &self.settings.data_dir,
            &state_file::Info::new(&peer, &addrs),
        ) {
            tracing::warn!(error = %e, "cannot write relay.json");
        }
    }

    fn answer(
        &mut self,
        peer: PeerId,
        req_id: u64,
        channel: Channel<mailbox::Response>,
        outcome: Option<Outcome>,
    ) {
        let Outcome {
            response,
            push,
            ignored_wait,
        } = outcome.unwrap_or_else(|| {
            tracing::error!(%peer, req_id, "the mailbox service dropped a request");
            self.metrics.reject(&Reject::StoreFailed);
            Outcome::reply(mailbox::Response::rejected(req_id, Reject::StoreFailed))
        });
        if ignored_wait {
            self.strike(peer);
        }
        if let mailbox::Response::Rejected { reason, .. } = &response {
            self.lanes.after_refusal(&peer, reason);
        }
        if !requests::respond(&mut self.swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, req_id, "requester went away before its answer");
        }
        if let Some(push) = push {
            self.push(push);
        }
    }

    fn push(&mut self, push: Push) {
        let Push {
            recipient,
            seq,
            envelope,
        } = push;
        if !self.settings.push_to_connected || !self.swarm.is_connected(&recipient) {
            return;
        }
        if let Admit::HeldBack(bound) = self.pushes.admit(recipient, seq) {
            self.metrics.limit_hit(bound.limit());
            return;
        }
        let id = self.swarm.behaviour_mut().requests.send_request(
            &recipient,
            requests::Request::Dm(Message::Valid(dm::Request::new(seq, envelope))),
        );
        self.pushes.sent(id, recipient, seq);
    }

    /// A push was answered: once none of its recipient's is in flight, the envelopes held
    /// back meanwhile are read from the mailbox to be pushed.
    fn push_answered(&mut self, request_id: &OutboundRequestId) -> Option<(PeerId, u64)> {
        let answered = self.pushes.answered(request_id)?;
        if let Some(from) = answered.resume_from {
            if self.swarm.is_connected(&answered.owner) {
                let limit = self.pushes.per_recipient() as u32;
                match self.mailbox.try_waiting(answered.owner, from, limit) {
                    Ok(rx) => self.waiting.push(Box::pin(async move { rx.await.ok() })),
                    // The recipient fetches them itself.
                    Err(service::Busy) => {
                        tracing::debug!(owner = %answered.owner, "mailbox busy; held-back pushes wait for a fetch");
                    }
                }
            }
        }
        Some((answered.owner, answered.seq))
    }

    /// Held-back envelopes read from a mailbox: pushed, and the rest held back again.
    fn on_waiting(&mut self, waiting: Option<service::Waiting>) {
        let Some(service::Waiting { pushes, more }) = waiting else {
            return;
        };
        let next = pushes
            .last()
            .map(|p| (p.recipient, p.seq.saturating_add(1)));
        for push in pushes {
            self.push(push);
        }
        if let (true, Some((owner, from))) = (more, next) {
            if self.swarm.is_connected(&owner) {
                self.pushes.hold_from(owner, from);
            }
        }
    }

    fn respond_now(
        &mut self,
        peer: PeerId,
        channel: Channel<mailbox::Response>,
        req_id: u64,
        reason: Reject,
    ) {
        self.metrics.reject(&reason);
        self.lanes.after_refusal(&peer, &reason);
        let response = mailbox::Response::rejected(req_id, reason);
        if !requests::respond(&mut self.swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, req_id, "requester went away before its answer");
        }
    }

    fn on_requests(&mut self, event: requests::Event) {
        match event {
            requests::Event::Mailbox {
                peer,
                connection,
                request,
                channel,
            } => {
                let newcomer = self.is_newcomer(connection);
                self.on_mailbox(peer, newcomer, request, channel)
            }
            requests::Event::Presence {
                peer,
                request,
                channel,
            } => {
                self.warn_invalid(peer, presence_wire::PROTOCOL, &request);
                self.on_presence(peer, request, channel)
            }
            requests::Event::Group {
                peer,
                connection,
                request,
                channel,
            } => {
                self.warn_invalid(peer, group_wire::PROTOCOL, &request);
                let newcomer = self.is_newcomer(connection);
                self.on_group(peer, newcomer, request, channel)
            }
            requests::Event::Blob {
                peer,
                request,
                channel,
            } => {
                self.warn_invalid(peer, kith_protocol::blob::PROTOCOL, &request);
                match self.blobs.as_mut() {
                    Some(blobs) => blobs.on_request(&mut self.swarm, peer, request, channel),
                    None => tracing::debug!("blob request while blobs are not served"),
                }
            }
            requests::Event::Keys {
                peer,
                request,
                channel,
            } => {
                self.warn_invalid(peer, kith_protocol::prekeys::PROTOCOL, &request);
                match self.keys.as_mut() {
                    Some(keys) => keys.on_request(&mut self.swarm, peer, request, channel),
                    None => tracing::debug!("keys request while keys are not served"),
                }
            }
            requests::Event::Pushed {
                peer,
                request_id,
                response,
            } => self.on_pushed(peer, request_id, response),
            requests::Event::PushFailed {
                peer,
                request_id,
                error,
            } => self.on_push_failed(peer, request_id, error),
            requests::Event::InboundFailure { peer, error } => {
                tracing::debug!(%peer, %error, "inbound request failure");
            }
        }
    }

    /// Whether `connection` is on the newcomers' lane: its requests wait for the others'.
    fn is_newcomer(&self, connection: libp2p::swarm::ConnectionId) -> bool {
        self.lanes.lane_of(connection) != Some(crate::lanes::Lane::Relay)
    }

    /// Logs an undecodable request as the per-peer refusal limiter allows: garbage must not
    /// fill the disk through the log. The protocol's handler answers and counts it.
    fn warn_invalid<T>(&mut self, peer: PeerId, protocol: &str, request: &Message<T>) {
        if let Message::Invalid { reason, detail } = request {
            let now = self.settings.presence.clock.now_ms();
            crate::warn_refused!(self.warnings, now, peer, protocol, %reason, detail, "invalid request");
            if crate::strikes::is_strike(reason) {
                self.strike(peer);
            }
        }
    }

    /// Counts a malformed request of `peer`, or a deposit it made before the wait it was asked
    /// for ended, which may get it banned ([`crate::strikes`]).
    fn strike(&mut self, peer: PeerId) {
        self.lanes.demote_peer(&peer);
        if !self.swarm.behaviour_mut().strikes.strike(peer) {
            return;
        }
        self.metrics.limit_hit("malformed_requests");
        // One line per interval for all bans together: an attacker bans a fresh identity at a
        // time, and each would otherwise get its own first line.
        let now = self.settings.presence.clock.now_ms();
        let all_bans = *self.swarm.local_peer_id();
        crate::warn_refused!(
            self.warnings,
            now,
            key = all_bans,
            peer,
            "banning a peer that keeps sending malformed requests or ignoring retry_after_ms"
        );
    }

    fn on_mailbox(
        &mut self,
        peer: PeerId,
        newcomer: bool,
        request: Message<mailbox::Request>,
        channel: Channel<mailbox::Response>,
    ) {
        match request {
            Message::Valid(request) => {
                let req_id = request.req_id();
                let class = match &request {
                    mailbox::Request::Deposit {
                        class: mailbox::DepositClass::Receipt,
                        ..
                    } => shed::Class::Receipt,
                    _ => shed::Class::Message,
                };
                if let Some(reason) = self.shed(class) {
                    self.respond_now(peer, channel, req_id, reason);
                    return;
                }
                if let Some(reason) = self.refused_by_recipient(&request) {
                    self.respond_now(peer, channel, req_id, reason);
                    return;
                }
                match self.mailbox.try_request(peer, request, newcomer) {
                    Ok(rx) => self.pending.push(Box::pin(async move {
                        (peer, req_id, channel, rx.await.ok())
                    })),
                    Err(service::Busy) => {
                        let now = self.settings.presence.clock.now_ms();
                        crate::warn_refused!(self.warnings, now, peer, req_id, "mailbox busy");
                        let reason = Reject::Busy {
                            retry_after_ms: self.settings.busy_retry_after_ms,
                        };
                        self.respond_now(peer, channel, req_id, reason);
                    }
                }
            }
            Message::Invalid { reason, detail } => {
                let now = self.settings.presence.clock.now_ms();
                crate::warn_refused!(self.warnings, now, peer, %reason, detail, "invalid mailbox request");
                let strike = crate::strikes::is_strike(&reason);
                self.respond_now(peer, channel, 0, reason);
                if strike {
                    self.strike(peer);
                }
            }
            Message::Raw(_) => {
                tracing::warn!(%peer, "raw mailbox request (never produced by reading)");
                self.respond_now(peer, channel, 0, Reject::Malformed);
            }
        }
    }

    /// `Some(Refused)` for a deposit its recipient's policy turns away: the recipient blocked
    /// the sender, or takes messages from its contacts only ([`presence::Service`] holds the
    /// policies). Counted in `rejects{reason="refused"}`; logged at debug only, since a sender
    /// the recipient refuses is not a fault of the relay's.
    fn refused_by_recipient(&self, request: &mailbox::Request) -> Option<Reject> {
        let mailbox::Request::Deposit { envelope, .. } = request else {
            return None;
        };
        let kith_protocol::Destination::Peer(owner) = envelope.to else {
            return None;
        };
        if self.presence.accepts_deposit(&owner, &envelope.from) {
            return None;
        }
        tracing::debug!(%owner, from = %envelope.from, id = %envelope.id, "deposit refused by the recipient's policy");
        Some(Reject::Refused)
    }

    /// `Some(Busy)` when work of `class` is to be shed now (and counts it), else `None`.
    fn shed(&self, class: shed::Class) -> Option<Reject> {
        let load = shed::Load {
            in_flight: self.pending.len(),
            flush_latency_us: self.metrics.last_flush.latest_us(),
        };
        if self.settings.shed.admits(class, load) {
            return None;
        }
        tracing::debug!(class = class.label(), ?load, "shedding");
        self.metrics.shed(class);
        Some(Reject::Busy {
            retry_after_ms: self.settings.busy_retry_after_ms,
        })
    }

    fn on_presence(
        &mut self,
        peer: PeerId,
        request: Message<presence_wire::Request>,
        channel: Channel<presence_wire::Response>,
    ) {
        // A goodbye is never shed: it is cheap and keeps presence true.
        let sheddable = !matches!(
            request,
            Message::Valid(presence_wire::Request::Goodbye { .. })
        );
        let response = match self.shed(shed::Class::Presence).filter(|_| sheddable) {
            Some(reason) => {
                self.metrics.reject(&reason);
                presence_wire::Response::Rejected {
                    req_id: match &request {
                        Message::Valid(r) => r.req_id(),
                        _ => 0,
                    },
                    reason,
                }
            }
            None => self.presence.handle(peer, request),
        };
        if !requests::respond(&mut self.swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, "presence requester went away before its answer");
        }
    }

    fn on_pushed(&mut self, peer: PeerId, request_id: OutboundRequestId, response: dm::Response) {
        let Some((owner, seq)) = self.push_answered(&request_id) else {
            return;
        };
        match response {
            dm::Response::Accepted { req_id } if req_id == seq && peer == owner => {
                tracing::debug!(%owner, seq, "push accepted");
                if self.mailbox.try_delivered(owner, seq).is_err() {
                    tracing::debug!(%owner, seq, "mailbox busy; entry stays for a fetch");
                }
            }
            other => {
                tracing::debug!(%owner, seq, ?other, "push not accepted; entry stays");
            }
        }
    }

    fn on_push_failed(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        error: OutboundFailure,
    ) {
        self.push_answered(&request_id);
        tracing::debug!(%peer, %error, "push failed; entry stays for a fetch");
    }

    fn on_relay(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                tracing::debug!(peer = %src_peer_id, renewed, "reservation accepted");
                self.occupancy.reserved(src_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.occupancy.unreserved(&src_peer_id);
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                tracing::info!(peer = %src_peer_id, "reservation denied");
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                self.occupancy.circuit_opened(src_peer_id, dst_peer_id);
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                self.occupancy.circuit_closed(src_peer_id, dst_peer_id);
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit denied");
            }
            _ => {}
        }
        self.count_occupancy();
    }

    fn count_occupancy(&self) {
        self.metrics.reservations.set(self.occupancy.reservations());
        self.metrics.circuits.set(self.occupancy.circuits());
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Requests(event)) => {
                if let request_response::Event::Message {
                    connection_id,
                    message: request_response::Message::Request { request, .. },
                    ..
                } = &event
                {
                    if request.is_well_formed() {
                        self.lanes.promote(*connection_id);
                    }
                }
                if let Some(event) = requests::Event::classify(event) {
                    self.on_requests(event);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay(event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => {
                if let Some(groups) = self.groups.as_mut() {
                    groups.on_gossip(&mut self.swarm, event);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                tracing::debug!(peer = %peer_id, "connected");
                self.metrics.connections.inc();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "disconnected");
                self.metrics.connections.dec();
                if num_established == 0 {
                    self.pushes.disconnected(&peer_id);
                    self.presence.disconnected(&peer_id);
                    self.occupancy.disconnected(&peer_id);
                    self.count_occupancy();
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.swarm.add_external_address(address.clone());
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
                self.write_state();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "no longer listening");
                self.swarm.remove_external_address(&address);
                self.listen_addrs.retain(|a| a != &address);
                self.write_state();
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                if let Some(limit) = connection_limit_label(&cause) {
                    tracing::debug!(%send_back_addr, %cause, "connection refused");
                    self.metrics.limit_hit(limit);
                }
            }
            _ => {}
        }
    }
}

/// The next finished group work, or never when groups are not served.
async fn next_group(groups: &mut Option<GroupGateway>) -> GroupDone {
    match groups {
        Some(groups) => groups.next().await,
        None => futures::future::pending().await,
    }
}

/// The next finished blob job, or never when blobs are not served.
async fn next_blob(blobs: &mut Option<crate::blob::Server>) -> Option<crate::blob::Done> {
    match blobs {
        Some(blobs) => blobs.next().await,
        None => futures::future::pending().await,
    }
}

async fn next_keys(keys: &mut Option<crate::keys::Server>) -> Option<crate::keys::Done> {
    match keys {
        Some(keys) => keys.next().await,
        None => futures::future::pending().await,
    }
}
