//! `/kith/dm/1` streams that go around the swarm task.
//!
//! The wire protocol is request-response's (see [`kith_net::DmCodec`]): one stream per request,
//! the request frame, the sender's half closed, the answer frame. Only the plumbing differs:
//!
//! - **Inbound**: each connection's handler hands a new `/kith/dm/1` stream straight to the
//!   delivery engine's server ([`Streams::serve_with`]; before that is set, as a
//!   [`crate::net::Event::InboundDm`]), which reads the request, and answers once its write is
//!   flushed. The swarm task never sees it.
//! - **Outbound**: each connection keeps [`SPARE_STREAMS`] outbound streams open and ready.
//!   Opening one costs nothing on the wire (yamux opens streams lazily, and the protocol proposal
//!   leaves with the first frame, in 0-RTT negotiation), so the remote sees nothing until one is
//!   used. [`Streams::take`] hands one to a caller, which writes its request on it at once; the
//!   handler opens another in its place once the request is over. When no spare stream is ready (no connection yet, or
//!   all taken), requests go through the swarm's request-response behaviour as before, which
//!   also dials.
//!
//! A request thus crosses one task hand-off on each side instead of two, and skips
//! request-response's per-request timer thread wake-ups: on a two-core machine this is a good
//! part of the send → delivered latency.
//!
//! Keep-alive: a spare stream does not keep its connection open (the idle timeout runs as if
//! it did not exist); a stream taken for a request does, until it is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use crate::net::Event;

/// Outbound streams each connection keeps ready for requests.
pub const SPARE_STREAMS: usize = 2;

/// The behaviour: one [`Handler`] per connection.
pub struct Behaviour {
    shared: Arc<Shared>,
}

/// Takes ready streams for requests; cloneable, usable from any task.
#[derive(Clone)]
pub struct Streams {
    shared: Arc<Shared>,
}

/// Serves an inbound stream; called on the connection's task, so it must only hand it on.
pub(crate) type Server = Box<dyn Fn(PeerId, Stream) + Send + Sync>;

struct Shared {
    protocol: StreamProtocol,
    /// Serves inbound streams once the engine is up (see [`Streams::serve_with`]).
    server: std::sync::OnceLock<Server>,
    /// Where inbound streams go until then (the engine's network events).
    inbound: mpsc::Sender<Event>,
    connections: Mutex<HashMap<ConnectionId, Connection>>,
}

struct Connection {
    peer: PeerId,
    /// Ready outbound streams.
    spare: Vec<Stream>,
    /// The handler, waiting for a spare stream to be taken.
    waker: Option<Waker>,
    /// Held (upgraded) by each stream in use; the handler keeps the connection alive meanwhile.
    alive: Weak<()>,
}

impl Shared {
    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Connection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Behaviour {
    /// A behaviour for `protocol` whose inbound streams go to `inbound`, and the handle that
    /// takes its ready outbound streams.
    pub fn new(protocol: StreamProtocol, inbound: mpsc::Sender<Event>) -> (Self, Streams) {
        let shared = Arc::new(Shared {
            protocol,
            server: std::sync::OnceLock::new(),
            inbound,
            connections: Mutex::new(HashMap::new()),
        });
        (
            Self {
                shared: shared.clone(),
            },
            Streams { shared },
        )
    }

    fn handler(&self, connection: ConnectionId, peer: PeerId) -> Handler {
        let alive = Arc::new(());
        self.shared.connections().insert(
            connection,
            Connection {
                peer,
                spare: Vec::new(),
                waker: None,
                alive: Arc::downgrade(&alive),
            },
        );
        Handler {
            connection,
            peer,
            shared: self.shared.clone(),
            alive,
            opening: false,
            failed: false,
        }
    }
}

impl Streams {
    /// Inbound streams go to `server` from now on, called on their connection's task: a task
    /// it spawns runs next on the same thread, where a hand-off to another task through a
    /// channel would wake another thread. Only the first call has an effect.
    pub(crate) fn serve_with(&self, server: Server) {
        let _ = self.shared.server.set(server);
    }

    /// A ready stream to `peer`, if a connection to it has one. Its connection's handler opens
    /// another in its place once it is dropped.
    pub fn take(&self, peer: PeerId) -> Option<InUse> {
        let mut connections = self.shared.connections();
        let connection = connections
            .values_mut()
            .find(|c| c.peer == peer && !c.spare.is_empty())?;
        let alive = connection.alive.upgrade()?;
        let stream = connection.spare.pop()?;
        Some(InUse {
            stream,
            refill: connection.waker.take(),
            _alive: alive,
        })
    }

    /// Ready streams to `peer` (for tests).
    #[cfg(test)]
    pub(crate) fn ready(&self, peer: PeerId) -> usize {
        self.shared
            .connections()
            .values()
            .filter(|c| c.peer == peer)
            .map(|c| c.spare.len())
            .sum()
    }
}

/// A stream taken for one request; its connection stays open until it is dropped.
pub struct InUse {
    /// The stream, its protocol proposed (in 0-RTT negotiation it leaves with the first write).
    pub stream: Stream,
    refill: Option<Waker>,
    _alive: Arc<()>,
}

impl Drop for InUse {
    /// Tells the connection's handler to open a stream in place of this one: once the request
    /// is over, so that opening it (which starts a timer, a wake-up of another thread) is not
    /// on the request's way; the other ready streams serve meanwhile.
    fn drop(&mut self) {
        if let Some(waker) = self.refill.take() {
            waker.wake();
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(connection, peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(connection, peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        // Another behaviour may deny a connection this one made a handler for: forget it too.
        let gone = match event {
            FromSwarm::ConnectionClosed(c) => c.connection_id,
            FromSwarm::DialFailure(f) => f.connection_id,
            FromSwarm::ListenFailure(f) => f.connection_id,
            _ => return,
        };
        self.shared.connections().remove(&gone);
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's `/kith/dm/1` streams.
pub struct Handler {
    connection: ConnectionId,
    peer: PeerId,
    shared: Arc<Shared>,
    /// More than one holder: a stream of this connection is in use.
    alive: Arc<()>,
    /// An outbound stream is being opened.
    opening: bool,
    /// Opening a stream failed: this connection has no spare streams (requests on it go
    /// through request-response).
    failed: bool,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.shared.protocol.clone()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        Arc::strong_count(&self.alive) > 1
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if self.opening || self.failed {
            return Poll::Pending;
        }
        let mut connections = self.shared.connections();
        let Some(connection) = connections.get_mut(&self.connection) else {
            return Poll::Pending;
        };
        if connection.spare.len() >= SPARE_STREAMS {
            connection.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        self.opening = true;
        Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
            protocol: SubstreamProtocol::new(ReadyUpgrade::new(self.shared.protocol.clone()), ()),
        })
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                if let Some(serve) = self.shared.server.get() {
                    serve(self.peer, stream);
                    return;
                }
                let event = Event::InboundDm {
                    peer: self.peer,
                    stream,
                };
                if self.shared.inbound.try_send(event).is_err() {
                    // The peer sees its stream reset and tries again later.
                    tracing::warn!(peer = %self.peer, "node busy: dropping an inbound dm stream");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: mut stream,
                ..
            }) => {
                self.opening = false;
                stream.ignore_for_keep_alive();
                if let Some(connection) = self.shared.connections().get_mut(&self.connection) {
                    connection.spare.push(stream);
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                tracing::debug!(peer = %self.peer, %error, "cannot open a spare dm stream");
                self.opening = false;
                self.failed = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{noise, tcp, yamux, Swarm};

    fn swarm(inbound: mpsc::Sender<Event>) -> (Swarm<Behaviour>, Streams) {
        let (behaviour, streams) =
            Behaviour::new(StreamProtocol::new(kith_protocol::dm::PROTOCOL), inbound);
        let swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp transport")
            .with_behaviour(|_| behaviour)
            .expect("behaviour")
            .with_swarm_config(|c| {
                c.with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
                    // Ready streams do not keep a connection open, and libp2p's default idle
                    // timeout is zero.
                    .with_idle_connection_timeout(std::time::Duration::from_secs(60))
            })
            .build();
        (swarm, streams)
    }

    /// Drives both swarms until `done` holds (failing after ten seconds).
    async fn drive(a: &mut Swarm<Behaviour>, b: &mut Swarm<Behaviour>, done: impl Fn() -> bool) {
        let drive = async {
            while !done() {
                // Connection tasks open streams without a swarm event: look again now and then.
                tokio::select! {
                    _ = a.select_next_some() => {}
                    _ = b.select_next_some() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), drive)
            .await
            .expect("the swarms got there");
    }

    #[tokio::test]
    async fn a_ready_stream_carries_a_request_to_the_other_sides_engine() {
        let (a_events, _a_inbound) = mpsc::channel(8);
        let (b_events, mut b_inbound) = mpsc::channel(8);
        let (mut a, a_streams) = swarm(a_events);
        let (mut b, _) = swarm(b_events);
        b.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("address"))
            .expect("listen");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
                break address;
            }
        };
        let b_peer = *b.local_peer_id();
        assert!(a_streams.take(b_peer).is_none(), "no connection, no stream");
        a.dial(addr).expect("dial");
        // Spare streams open without a word to the other side.
        drive(&mut a, &mut b, || a_streams.ready(b_peer) == SPARE_STREAMS).await;
        assert!(
            b_inbound.try_recv().is_err(),
            "the other side saw a spare stream"
        );

        let mut taken = a_streams.take(b_peer).expect("a ready stream");
        assert_eq!(a_streams.ready(b_peer), SPARE_STREAMS - 1);
        let exchange = async move {
            taken.stream.write_all(b"hello").await?;
            taken.stream.close().await?;
            let mut answer = Vec::new();
            taken.stream.read_to_end(&mut answer).await?;
            std::io::Result::Ok(answer)
        };
        let serve = async {
            let Some(Event::InboundDm { peer, mut stream }) = b_inbound.recv().await else {
                panic!("no inbound stream");
            };
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await?;
            stream.write_all(b"answer").await?;
            stream.close().await?;
            std::io::Result::Ok((peer, request))
        };
        let both = async { tokio::try_join!(exchange, serve) };
        tokio::pin!(both);
        let (answer, (peer, request)) = loop {
            tokio::select! {
                done = &mut both => break done.expect("request and answer"),
                _ = a.select_next_some() => {}
                _ = b.select_next_some() => {}
            }
        };
        assert_eq!(peer, *a.local_peer_id());
        assert_eq!(request, b"hello");
        assert_eq!(answer, b"answer");
        // The handler opened another in place of the one taken.
        drive(&mut a, &mut b, || a_streams.ready(b_peer) == SPARE_STREAMS).await;

        // A closed connection takes its ready streams with it.
        let a_peer = *a.local_peer_id();
        b.disconnect_peer_id(a_peer).expect("connected");
        drive(&mut a, &mut b, || a_streams.ready(b_peer) == 0).await;
        assert!(a_streams.take(b_peer).is_none());
    }
}
