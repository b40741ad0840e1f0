//! The relay's request-response protocols in one behaviour.
//!
//! Each `request_response::Behaviour` keeps, for every connection, an entry in its peer table
//! and a connection handler with its own queues, channel and stream set, whether or not the peer
//! ever speaks its protocol. With one behaviour per protocol, an idle connection paid for that
//! five times over. Here one behaviour serves `/kith/mailbox/1`, `/kith/presence/1`,
//! `/kith/group/1`, `/kith/blob/1` and `/kith/keys/1` inbound and `/kith/dm/1` outbound (the relay's pushes), and
//! [`Codec`] picks each stream's frames by the protocol negotiated on it. The wire protocols,
//! their names and frame limits are those of the per-protocol codecs in [`kith_net`].
//!
//! A request-response behaviour offers every protocol it supports outbound on each request it
//! sends, so only `/kith/dm/1` is outbound here: a push can never be negotiated as anything else.
//!
//! Answers keep their protocol's type: an inbound request comes with a [`Channel`] that only its
//! own protocol's response fits, and [`respond`] wraps the response for the shared behaviour.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncWrite};
use kith_net::codec::{Budget, Message};
use kith_net::{BlobCodec, DmCodec, GroupCodec, KeysCodec, MailboxCodec, PresenceCodec};
use kith_protocol::{blob, dm, group, mailbox, prekeys, presence};
use libp2p::request_response::{
    self, InboundFailure, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::ConnectionId;
use libp2p::{PeerId, StreamProtocol};

/// The shared behaviour.
pub type Behaviour = request_response::Behaviour<Codec>;

/// The behaviour with every protocol in its direction, kith's timeout, at most
/// `max_streams_per_connection` requests open on a connection (the protocols together; libp2p
/// drops a stream beyond it), and every frame read counted against `budget`.
pub fn behaviour(budget: Budget, max_streams_per_connection: usize) -> Behaviour {
    let inbound = [
        mailbox::PROTOCOL,
        presence::PROTOCOL,
        group::PROTOCOL,
        blob::PROTOCOL,
        prekeys::PROTOCOL,
    ]
    .map(|name| (StreamProtocol::new(name), ProtocolSupport::Inbound));
    let outbound = (StreamProtocol::new(dm::PROTOCOL), ProtocolSupport::Outbound);
    request_response::Behaviour::with_codec(
        Codec {
            budget,
            connection: false,
        },
        inbound.into_iter().chain([outbound]),
        kith_net::request_response_config().with_max_concurrent_streams(max_streams_per_connection),
    )
}

/// A request of any of the relay's protocols.
#[derive(Debug)]
pub enum Request {
    /// `/kith/mailbox/1`, inbound.
    Mailbox(Message<mailbox::Request>),
    /// `/kith/presence/1`, inbound.
    Presence(Message<presence::Request>),
    /// `/kith/group/1`, inbound.
    Group(Message<group::Request>),
    /// `/kith/blob/1`, inbound.
    Blob(Message<blob::Request>),
    /// `/kith/keys/1`, inbound.
    Keys(Message<prekeys::Request>),
    /// `/kith/dm/1`, outbound: a push.
    Dm(Message<dm::Request>),
}

impl Request {
    /// Whether the request decoded (a refusal for the relay's load, `Busy`, says nothing either
    /// way and is not).
    pub fn is_well_formed(&self) -> bool {
        matches!(
            self,
            Request::Mailbox(Message::Valid(_))
                | Request::Presence(Message::Valid(_))
                | Request::Group(Message::Valid(_))
                | Request::Blob(Message::Valid(_))
                | Request::Keys(Message::Valid(_))
                | Request::Dm(Message::Valid(_))
        )
    }
}

/// A response of any of the relay's protocols.
#[derive(Debug)]
pub enum Response {
    /// `/kith/mailbox/1`.
    Mailbox(mailbox::Response),
    /// `/kith/presence/1`.
    Presence(presence::Response),
    /// `/kith/group/1`.
    Group(group::Response),
    /// `/kith/blob/1`.
    Blob(blob::Response),
    /// `/kith/keys/1`.
    Keys(prekeys::Response),
    /// `/kith/dm/1`.
    Dm(dm::Response),
}

impl Request {
    /// The name of the request's protocol.
    fn protocol(&self) -> &'static str {
        match self {
            Request::Mailbox(_) => mailbox::PROTOCOL,
            Request::Presence(_) => presence::PROTOCOL,
            Request::Group(_) => group::PROTOCOL,
            Request::Blob(_) => blob::PROTOCOL,
            Request::Keys(_) => prekeys::PROTOCOL,
            Request::Dm(_) => dm::PROTOCOL,
        }
    }
}

impl Response {
    /// The name of the response's protocol.
    fn protocol(&self) -> &'static str {
        match self {
            Response::Mailbox(_) => mailbox::PROTOCOL,
            Response::Presence(_) => presence::PROTOCOL,
            Response::Group(_) => group::PROTOCOL,
            Response::Blob(_) => blob::PROTOCOL,
            Response::Keys(_) => prekeys::PROTOCOL,
            Response::Dm(_) => dm::PROTOCOL,
        }
    }
}

macro_rules! response_from {
    ($($variant:ident: $ty:ty),*) => {$(
        impl From<$ty> for Response {
            fn from(response: $ty) -> Self {
                Response::$variant(response)
            }
        }
    )*};
}

response_from!(
    Mailbox: mailbox::Response,
    Presence: presence::Response,
    Group: group::Response,
    Blob: blob::Response,
    Keys: prekeys::Response
);

/// Where the answer to one inbound request goes; only a `R` fits.
#[derive(Debug)]
pub struct Channel<R> {
    inner: ResponseChannel<Response>,
    _response: PhantomData<fn(R)>,
}

impl<R> Channel<R> {
    fn new(inner: ResponseChannel<Response>) -> Self {
        Self {
            inner,
            _response: PhantomData,
        }
    }
}

/// Sends `response` on `channel`. `false` when the requester has gone (its connection closed or
/// the request timed out).
pub fn respond<R: Into<Response>>(
    behaviour: &mut Behaviour,
    channel: Channel<R>,
    response: R,
) -> bool {
    behaviour
        .send_response(channel.inner, response.into())
        .is_ok()
}

/// What the shared behaviour reports, sorted by protocol.
#[derive(Debug)]
pub enum Event {
    /// A `/kith/mailbox/1` request.
    Mailbox {
        /// Who asked.
        peer: PeerId,
        /// On which connection.
        connection: ConnectionId,
        /// What it asked.
        request: Message<mailbox::Request>,
        /// Where the answer goes.
        channel: Channel<mailbox::Response>,
    },
    /// A `/kith/presence/1` request.
    Presence {
        /// Who asked.
        peer: PeerId,
        /// What it asked.
        request: Message<presence::Request>,
        /// Where the answer goes.
        channel: Channel<presence::Response>,
    },
    /// A `/kith/group/1` request.
    Group {
        /// Who asked.
        peer: PeerId,
        /// On which connection.
        connection: ConnectionId,
        /// What it asked.
        request: Message<group::Request>,
        /// Where the answer goes.
        channel: Channel<group::Response>,
    },
    /// A `/kith/blob/1` request.
    Blob {
        /// Who asked.
        peer: PeerId,
        /// What it asked.
        request: Message<blob::Request>,
        /// Where the answer goes.
        channel: Channel<blob::Response>,
    },
    /// A `/kith/keys/1` request.
    Keys {
        /// Who asked.
        peer: PeerId,
        /// What it asked.
        request: Message<prekeys::Request>,
        /// Where the answer goes.
        channel: Channel<prekeys::Response>,
    },
    /// The answer to a push.
    Pushed {
        /// The recipient.
        peer: PeerId,
        /// The push it answers.
        request_id: OutboundRequestId,
        /// Its answer.
        response: dm::Response,
    },
    /// A push that got no answer.
    PushFailed {
        /// The recipient.
        peer: PeerId,
        /// The push.
        request_id: OutboundRequestId,
        /// Why.
        error: OutboundFailure,
    },
    /// An inbound request that could not be read or answered.
    InboundFailure {
        /// Who sent it.
        peer: PeerId,
        /// Why.
        error: InboundFailure,
    },
}

impl Event {
    /// The event for `event`, or `None` for what the relay does not act on (a response sent, and
    /// a request or response of a protocol in the other direction, which the codec never reads).
    pub fn classify(event: request_response::Event<Request, Response>) -> Option<Self> {
        use request_response::{Event as E, Message as M};
        Some(match event {
            E::Message {
                peer,
                connection_id,
                message: M::Request {
                    request, channel, ..
                },
            } => match request {
                Request::Mailbox(request) => Event::Mailbox {
                    peer,
                    connection: connection_id,
                    request,
                    channel: Channel::new(channel),
                },
                Request::Presence(request) => Event::Presence {
                    peer,
                    request,
                    channel: Channel::new(channel),
                },
                Request::Group(request) => Event::Group {
                    peer,
                    connection: connection_id,
                    request,
                    channel: Channel::new(channel),
                },
                Request::Blob(request) => Event::Blob {
                    peer,
                    request,
                    channel: Channel::new(channel),
                },
                Request::Keys(request) => Event::Keys {
                    peer,
                    request,
                    channel: Channel::new(channel),
                },
                Request::Dm(_) => return None,
            },
            E::Message {
                peer,
                message:
                    M::Response {
                        request_id,
                        response: Response::Dm(response),
                    },
                ..
            } => Event::Pushed {
                peer,
                request_id,
                response,
            },
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => Event::PushFailed {
                peer,
                request_id,
                error,
            },
            E::InboundFailure { peer, error, .. } => Event::InboundFailure { peer, error },
            _ => return None,
        })
    }
}

/// Reads and writes each stream with the codec of the protocol negotiated on it. Each
/// protocol's requests have a limit sized to what they carry (a mailbox or group request holds
/// one envelope), and every frame read counts against the relay's one [`Budget`], within its
/// connection's share of it.
///
/// The codec learns its connection from how `request_response` clones it: the behaviour's codec
/// is cloned once for each new connection (into that connection's handler), and the handler's
/// codec once per stream. So a clone of the behaviour's codec takes a fresh connection share
/// ([`Budget::for_connection`]), and a clone of a connection's codec keeps its share.
#[derive(Debug)]
pub struct Codec {
    budget: Budget,
    /// Whether this is a connection's codec (else the behaviour's own).
    connection: bool,
}

impl Clone for Codec {
    fn clone(&self) -> Self {
        let budget = if self.connection {
            self.budget.clone()
        } else {
            self.budget.for_connection()
        };
        Self {
            budget,
            connection: true,
        }
    }
}

impl Codec {
    fn mailbox(&self) -> MailboxCodec {
        MailboxCodec::with_limits(mailbox::MAX_REQUEST_BYTES, mailbox::MAX_FRAME_BYTES)
            .with_budget(self.budget.clone())
    }

    fn presence(&self) -> PresenceCodec {
        PresenceCodec::new(presence::MAX_FRAME_BYTES).with_budget(self.budget.clone())
    }

    fn group(&self) -> GroupCodec {
        GroupCodec::with_limits(group::MAX_REQUEST_BYTES, group::MAX_FRAME_BYTES)
            .with_budget(self.budget.clone())
    }

    fn blob(&self) -> BlobCodec {
        BlobCodec::new(blob::MAX_FRAME_BYTES).with_budget(self.budget.clone())
    }

    fn dm(&self) -> DmCodec {
        DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(self.budget.clone())
    }

    fn keys(&self) -> KeysCodec {
        KeysCodec::new(prekeys::MAX_FRAME_BYTES).with_budget(self.budget.clone())
    }
}

/// A message on a stream of another protocol, or a stream of a protocol the relay does not
/// speak in that direction. libp2p only negotiates the protocols it was given and a [`Channel`]
/// only takes its own protocol's response, so this is a bug, not a peer's doing.
fn wrong_protocol(protocol: &StreamProtocol, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} does not belong on a {protocol} stream"),
    )
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        match protocol.as_ref() {
            mailbox::PROTOCOL => {
                (self.mailbox().read_request(protocol, io).await).map(Request::Mailbox)
            }
            presence::PROTOCOL => {
                (self.presence().read_request(protocol, io).await).map(Request::Presence)
            }
            group::PROTOCOL => (self.group().read_request(protocol, io).await).map(Request::Group),
            blob::PROTOCOL => (self.blob().read_request(protocol, io).await).map(Request::Blob),
            prekeys::PROTOCOL => (self.keys().read_request(protocol, io).await).map(Request::Keys),
            _ => Err(wrong_protocol(protocol, "a request to the relay")),
        }
    }

    async fn read_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        match protocol.as_ref() {
            dm::PROTOCOL => (self.dm().read_response(protocol, io).await).map(Response::Dm),
            _ => Err(wrong_protocol(protocol, "a response to the relay")),
        }
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        request: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            Request::Dm(request) if protocol.as_ref() == dm::PROTOCOL => {
                self.dm().write_request(protocol, io, request).await
            }
            other => Err(wrong_protocol(
                protocol,
                &format!("a {} request", other.protocol()),
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        response: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match (protocol.as_ref(), response) {
            (mailbox::PROTOCOL, Response::Mailbox(r)) => {
                self.mailbox().write_response(protocol, io, r).await
            }
            (presence::PROTOCOL, Response::Presence(r)) => {
                self.presence().write_response(protocol, io, r).await
            }
            (group::PROTOCOL, Response::Group(r)) => {
                self.group().write_response(protocol, io, r).await
            }
            (blob::PROTOCOL, Response::Blob(r)) => {
                self.blob().write_response(protocol, io, r).await
            }
            (prekeys::PROTOCOL, Response::Keys(r)) => {
                self.keys().write_response(protocol, io, r).await
            }
            (_, other) => Err(wrong_protocol(
                protocol,
                &format!("a {} response", other.protocol()),
            )),
        }
    }
}
