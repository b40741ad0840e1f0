//! What the core asks of the features, as traits: the core names no feature. Each feature
//! (`crate::features::*`) implements the traits of the roles it plays and is plugged in by
//! [`crate::start`] through [`Plugins`]; without one, the core behaves as if the feature were
//! absent (the no-op defaults below), which is how the core's own tests run.
//!
//! - [`Feature`]: a feature's background tasks and the network events it serves (iroh's
//!   protocol router in spirit: the core routes, the handler decides).
//! - [`Rooms`]: conversations with many members (groups): resolving their names, sending,
//!   listing, reading, delivering and accepting their envelopes, per-member ticks.
//! - [`Gate`]: who may reach this node (strangers' requests, blocked peers).
//! - [`Files`]: what a message's file adds to it (attachments, downloads).
//! - [`Presence`]: the user's activity and when to tell relays again.
//! - [`Timers`]: temporary chats (expiry of outgoing and incoming messages, timer lines).
//!
//! A feature keeps its state in its own type; [`Plugins`] holds each by type, and the feature
//! reaches its own state from a [`Node`] through [`Node::feature`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kith_protocol::blob::FileRef;
use kith_protocol::group::State as Room;
use kith_protocol::{Body, Envelope, GroupId, MessageId, MessageState, Reject};
use libp2p::PeerId;

use crate::core::store::{Batch, Thread};
use crate::core::{MessageView, Node, NodeError, NodeEvent, Outcome, Sent};
use crate::net;
use crate::shutdown::Signal;

/// A feature as the core runs it.
pub trait Feature: Send + Sync + 'static {
    /// Its background tasks; each ends when `shutdown` fires.
    fn tasks(&self, _node: &Node, _shutdown: &Signal) -> Vec<BoxFuture<'static, ()>> {
        Vec::new()
    }

    /// Serves a network event the core does not handle itself, or hands it back. The future
    /// runs on the core's inbound work set, under its concurrency limit.
    fn serve(
        &self,
        _node: &Node,
        event: Box<net::Event>,
    ) -> Result<BoxFuture<'static, ()>, Box<net::Event>> {
        Err(event)
    }

    /// The body message `id` of ours carried, if this feature made it (a file, a timer change):
    /// for sending it again on a new session.
    fn original_body(&self, _node: &Node, _id: &MessageId) -> Result<Option<Body>, NodeError> {
        Ok(None)
    }
}

/// Conversations with many members (groups).
pub trait Rooms: Send + Sync + 'static {
    /// The room a `TO`/`WITH` argument names, unless a contact goes by that name.
    fn target(&self, _node: &Node, _name: &str) -> Result<Option<Room>, NodeError> {
        Ok(None)
    }

    /// A room this node knows, by id.
    fn room(&self, _room: &GroupId) -> Option<Room> {
        None
    }

    /// The name of a room this node knows.
    fn name_of(&self, _node: &Node, room: &GroupId) -> Option<String> {
        self.room(room).map(|r| r.name)
    }

    /// Sends a text to a room.
    fn send<'a>(
        &'a self,
        _node: &'a Node,
        room: Room,
        _text: &'a str,
        _wait: Option<Duration>,
    ) -> BoxFuture<'a, Result<Sent, NodeError>> {
        Box::pin(async move { Err(NodeError::UnknownRecipient(room.name)) })
    }

    /// Refuses sending to a room this node may not send to now (checked before any work
    /// such as packing a file).
    fn sendable(&self, _node: &Node, _room: &Room) -> Result<(), NodeError> {
        Ok(())
    }

    /// A room's messages.
    fn messages(&self, _node: &Node, _room: &Room) -> Result<Vec<MessageView>, NodeError> {
        Ok(Vec::new())
    }

    /// Every room's messages.
    fn all_messages(&self, _node: &Node) -> Result<Vec<MessageView>, NodeError> {
        Ok(Vec::new())
    }

    /// Marks a room read; how many messages were newly read.
    fn read<'a>(
        &'a self,
        _node: &'a Node,
        _room: &'a Room,
    ) -> BoxFuture<'a, Result<usize, NodeError>> {
        Box::pin(async { Ok(0) })
    }

    /// One delivery attempt of an outgoing envelope addressed to a room.
    fn deliver<'a>(
        &'a self,
        _node: &'a Node,
        _envelope: &'a Envelope,
        room: GroupId,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { Outcome::Failed(format!("unknown group {room}")) })
    }

    /// Verifies and stores an inbound envelope addressed to a room.
    fn accept<'a>(
        &'a self,
        _node: &'a Node,
        _via: PeerId,
        _room: GroupId,
        _envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), Reject>> {
        Box::pin(async { Err(Reject::Malformed) })
    }

    /// Moves an outgoing room message forward, for one member (a receipt) or all (`None`: the
    /// relay stored it for each).
    fn advance_members(
        &self,
        _node: &Node,
        _id: &MessageId,
        _member: Option<&PeerId>,
        _state: MessageState,
    ) -> Result<(), NodeError> {
        Ok(())
    }

    /// Each member's state of an outgoing room message, by peer id (empty if it is not one).
    fn member_states(&self, _node: &Node, _id: &MessageId) -> HashMap<String, MessageState> {
        HashMap::new()
    }

    /// The relay that hosts a room.
    fn relay_of(&self, _room: &GroupId) -> Option<PeerId> {
        None
    }

    /// `peer` became a contact: the rooms it invited this node to are joined.
    fn contact_added<'a>(
        &'a self,
        _node: &'a Node,
        _peer: &'a PeerId,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Who may reach this node.
pub trait Gate: Send + Sync + 'static {
    /// Whether `peer`'s messages wait in the requests list.
    fn is_request(&self, _peer: &PeerId) -> bool {
        false
    }

    /// Whether the user blocked `peer`.
    fn is_blocked(&self, _peer: &PeerId) -> bool {
        false
    }

    /// The peers the user blocked.
    fn blocked(&self) -> Vec<PeerId> {
        Vec::new()
    }

    /// Refuses an inbound envelope from a peer the user does not take messages from.
    fn refuse(&self, _node: &Node, _via: PeerId, _envelope: &Envelope) -> Result<(), Reject> {
        Ok(())
    }

    /// A message from `from` with a body of `bytes` is being stored: a stranger's first one
    /// opens a request.
    fn note(&self, _node: &Node, _from: &PeerId, _bytes: usize, _batch: &mut Batch) {}

    /// What to announce for a stored message from `from`: `None` when it is not a request
    /// (announce the message as usual), `Some(event)` when it is (the request event, once).
    fn announce(&self, _node: &Node, _from: &PeerId) -> Option<Option<NodeEvent>> {
        None
    }

    /// Whether files from `from` may be fetched without the user asking.
    fn auto_download_from(&self, _node: &Node, _from: &PeerId) -> bool {
        true
    }

    /// `peer` became a contact: its request, if any, is settled.
    fn accepted<'a>(
        &'a self,
        _node: &'a Node,
        _peer: &'a PeerId,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async { Ok(()) })
    }

    /// Blocks `peer` (on the node and, with the next heartbeat, at its relays).
    fn block<'a>(&'a self, _node: &'a Node, _peer: PeerId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a file adds to a message.
pub trait Files: Send + Sync + 'static {
    /// Whether the `sent` tick of the outgoing message `id`, which a relay now holds, waits
    /// for its file's upload (the relay does not hold every blob yet). The feature records
    /// the wait and moves the tick itself once the upload is done.
    fn holds_sent(&self, _node: &Node, _id: &MessageId) -> bool {
        false
    }

    /// The views with their attachments filled in.
    fn with_attachments(&self, _node: &Node, views: Vec<MessageView>) -> Vec<MessageView> {
        views
    }

    /// Records the file an inbound message (of `room`, if any) carries, in the message's write.
    fn put_incoming(
        &self,
        _node: &Node,
        _batch: &mut Batch,
        _envelope: &Envelope,
        _file: FileRef,
        _room: Option<GroupId>,
    ) {
    }

    /// An inbound file message was stored: its file may be fetched.
    fn received<'a>(&'a self, _node: &'a Node, _id: MessageId, _size: u64) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The user's presence.
pub trait Presence: Send + Sync + 'static {
    /// The user did something (sent, read): they are active.
    fn user_active(&self, _node: &Node) {}

    /// Something presence depends on changed (a contact, a relay connection): tell relays soon.
    fn wake(&self) {}
}

/// Temporary chats.
pub trait Timers: Send + Sync + 'static {
    /// When a message sent now in `thread` expires, if the conversation has a timer.
    fn expiry_for(
        &self,
        _node: &Node,
        _thread: Thread<'_>,
        _sent_at_ms: u64,
    ) -> Result<Option<u64>, NodeError> {
        Ok(None)
    }

    /// Refuses an inbound envelope that has expired already.
    fn check(&self, _node: &Node, _envelope: &Envelope) -> Result<(), Reject> {
        Ok(())
    }

    /// Stores an inbound timer change (of `room`, if any) in `batch`; the text of its history
    /// line.
    fn stage(
        &self,
        _node: &Node,
        _envelope: &Envelope,
        _room: Option<&Room>,
        _secs: Option<u64>,
        _admins_only: bool,
        _batch: &mut Batch,
    ) -> Result<String, Reject> {
        Err(Reject::Malformed)
    }

    /// The views with their timer lines filled in.
    fn with_lines(&self, _node: &Node, _views: &mut [MessageView]) {}
}

/// No feature: every role's defaults.
struct Absent;

impl Rooms for Absent {}
impl Gate for Absent {}
impl Files for Absent {}
impl Presence for Absent {}
impl Timers for Absent {}

/// The features plugged into a node.
pub struct Plugins {
    features: Vec<Arc<dyn Feature>>,
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    pub(crate) rooms: Arc<dyn Rooms>,
    pub(crate) gate: Arc<dyn Gate>,
    pub(crate) files: Arc<dyn Files>,
    pub(crate) presence: Arc<dyn Presence>,
    pub(crate) timers: Arc<dyn Timers>,
}

impl Default for Plugins {
    fn default() -> Self {
        let absent = Arc::new(Absent);
        Self {
            features: Vec::new(),
            by_type: HashMap::new(),
            rooms: absent.clone(),
            gate: absent.clone(),
            files: absent.clone(),
            presence: absent.clone(),
            timers: absent,
        }
    }
}

impl Plugins {
    /// Plugs in a feature: its tasks and network events, and its state, which the feature then
    /// reaches through [`Node::feature`].
    pub fn feature<T: Feature>(mut self, feature: Arc<T>) -> Self {
        self.by_type.insert(TypeId::of::<T>(), feature.clone());
        self.features.push(feature);
        self
    }

    /// Plugs in the rooms (groups).
    pub fn rooms(mut self, rooms: Arc<dyn Rooms>) -> Self {
        self.rooms = rooms;
        self
    }

    /// Plugs in the gate (strangers).
    pub fn gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    /// Plugs in files (media).
    pub fn files(mut self, files: Arc<dyn Files>) -> Self {
        self.files = files;
        self
    }

    /// Plugs in presence.
    pub fn presence(mut self, presence: Arc<dyn Presence>) -> Self {
        self.presence = presence;
        self
    }

    /// Plugs in temporary chats.
    pub fn timers(mut self, timers: Arc<dyn Timers>) -> Self {
        self.timers = timers;
        self
    }

    /// The plugged-in features, in the order they were plugged in.
    pub(crate) fn all(&self) -> &[Arc<dyn Feature>] {
        &self.features
    }

    /// A feature's state, by type.
    pub(crate) fn get<T: Feature>(&self) -> Option<&T> {
        self.by_type.get(&TypeId::of::<T>())?.downcast_ref::<T>()
    }
}
