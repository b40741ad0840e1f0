//! The delivery engine: sending, the persistent outbox with retries, inbound verification and
//! storage, receipts and mailbox fetches. [`Node`] is the cloneable handle that the local API,
//! the demo and the tests use.
//!
//! Flow of an outgoing message: [`Node::send`] stores it with its envelope in the outbox and
//! flushes (`pending`); the outbox loop hands it to an attempt task, which tries `/kith/dm/1`
//! directly (known addresses and the contact's relay circuits, raced by the dialer) and marks it
//! `delivered` on `Accepted`; failing that it deposits it at the contact's home relays (`sent`);
//! failing that it is rescheduled with exponential backoff and jitter. Receipts travel the same
//! way, as envelopes in the outbox.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kith_net::codec::Message;
use kith_protocol::envelope::Header;
use kith_protocol::invite::Invite;
use kith_protocol::limits::{MAX_FETCH_BATCH, MAX_IDS_PER_BATCH};
use kith_protocol::{dm, mailbox, Body, Destination, Envelope, MessageId, MessageState};
use kith_protocol::{ReceiptState, Reject};
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::config::{Config, Settings};
use crate::net::{self, circuit_addr, peer_of, NetError};
use crate::shutdown::Signal;
use crate::store::{Batch, Contact, Direction, OutboxEntry, Store, StoreError, StoredMessage};

/// The current time in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An event for the local API's stream and for in-process watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NodeEvent {
    /// A chat message arrived.
    Message {
        /// Its id.
        id: String,
        /// The sender's peer id.
        from: String,
        /// The text.
        text: String,
        /// The sender's clock.
        sent_at_ms: u64,
    },
    /// One of this node's messages changed state (a tick).
    Receipt {
        /// The message id.
        id: String,
        /// The recipient.
        peer: String,
        /// The new state.
        state: MessageState,
    },
    /// A message could not be delivered and will not be retried.
    Failed {
        /// The message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A peer is typing to this node (never stored).
    Typing {
        /// The typing peer's id.
        from: String,
    },
    /// A file transfer moved on ([`crate::media`]).
    Progress {
        /// The message the file is attached to.
        id: String,
        /// `upload` or `download`.
        direction: String,
        /// Bytes of the file transferred so far.
        done: u64,
        /// Bytes in all (for uploads: the file's size times the relays it goes to).
        total: u64,
    },
}

/// Why an operation of the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No contact, peer id or group goes by that name.
    #[error("unknown recipient {0:?}: add it with `kith contact add NAME PEER_ID_OR_INVITE`, or give a peer id")]
    UnknownRecipient(String),
    /// No message with that id.
    #[error("no message with id {0}")]
    UnknownMessage(String),
    /// The input is not acceptable (empty text, too long, bad address...).
    #[error("{0}")]
    Invalid(String),
    /// Nobody who could answer did (the peer and its relays are unreachable or busy).
    #[error("{0}")]
    Unavailable(String),
}

/// Shared state of the running node.
struct Inner {
    key: Keypair,
    me: PeerId,
    settings: Settings,
    config: Config,
    store: Store,
    net: net::Handle,
    events: broadcast::Sender<NodeEvent>,
    /// Home relays by peer id: they may deliver envelopes on others' behalf.
    home_relays: HashMap<PeerId, Multiaddr>,
    /// Per-conversation Lamport clocks, kept here so concurrent sends never share a value.
    lamports: Mutex<HashMap<PeerId, u64>>,
    /// Contacts by peer id, mirrored from the store so that attempts need no store scan.
    contacts: Mutex<HashMap<PeerId, Contact>>,
    outbox: Mutex<Schedule>,
    outbox_wake: Notify,
    next_req_id: std::sync::atomic::AtomicU64,
    presence: crate::presence::State,
    groups: crate::group::Groups,
    media: crate::media::State,
}

/// The in-memory outbox schedule (the store holds the durable copy).
#[derive(Default)]
struct Schedule {
    entries: HashMap<MessageId, OutboxEntry>,
    due: BTreeSet<(u64, MessageId)>,
    in_flight: HashSet<MessageId>,
}

impl Schedule {
    fn insert(&mut self, entry: OutboxEntry) {
        if let Some(old) = self.entries.get(&entry.envelope.id) {
            self.due.remove(&(old.due_ms, old.envelope.id));
        }
        self.due.insert((entry.due_ms, entry.envelope.id));
        self.entries.insert(entry.envelope.id, entry);
    }

    fn remove(&mut self, id: &MessageId) {
        if let Some(old) = self.entries.remove(id) {
            self.due.remove(&(old.due_ms, *id));
        }
        self.in_flight.remove(id);
    }

    /// Makes every entry addressed to `peer` due now.
    fn hurry(&mut self, peer: &PeerId, now: u64) {
        let ids: Vec<_> = self
            .entries
            .values()
            .filter(|e| {
                e.envelope.to == Destination::Peer(*peer)
                    && e.due_ms > now
                    && !self.in_flight.contains(&e.envelope.id)
            })
            .map(|e| e.envelope.id)
            .collect();
        for id in ids {
            if let Some(mut entry) = self.entries.get(&id).cloned() {
                entry.due_ms = now;
                self.insert(entry);
            }
        }
    }
}

/// What the engine is built from.
pub(crate) struct Parts {
    pub key: Keypair,
    pub settings: Settings,
    pub config: Config,
    pub store: Store,
    pub net: net::Handle,
    pub net_events: mpsc::Receiver<net::Event>,
    pub shutdown: Signal,
}

/// The cloneable handle to a running node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// What `kith id` reports.
#[derive(Debug, Clone, Serialize)]
pub struct IdInfo {
    /// This node's peer id.
    pub peer_id: String,
    /// Its display name.
    pub name: String,
    /// Its invite.
    pub invite: String,
    /// Its listen addresses, with `/p2p/<id>`.
    pub listen_addrs: Vec<String>,
    /// Whether it sends read receipts.
    pub read_receipts: bool,
    /// Who may see its online state and last seen.
    pub presence: kith_protocol::presence::Visibility,
}

/// A message as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    /// Its id.
    pub id: String,
    /// `in` or `out`.
    pub direction: Direction,
    /// The sender's peer id.
    pub from: String,
    /// The other side of the conversation.
    pub peer: String,
    /// The text.
    pub text: String,
    /// The sender's clock.
    pub sent_at_ms: u64,
    /// The tick.
    pub state: MessageState,
    /// The group conversation it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The attached file, if any ([`crate::media`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<crate::media::AttachmentView>,
}

impl From<StoredMessage> for MessageView {
    fn from(m: StoredMessage) -> Self {
        Self {
            id: m.id.to_string(),
            direction: m.direction,
            from: m.from.to_string(),
            peer: m.peer.to_string(),
            text: m.text,
            sent_at_ms: m.sent_at_ms,
            state: m.state,
            group: None,
            attachment: None,
        }
    }
}

/// A message's state as `kith status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The message id.
    pub id: String,
    /// Its state.
    pub state: MessageState,
    /// Per-member states (empty for one-to-one messages).
    pub members: HashMap<String, MessageState>,
    /// Why a pending message has not gone out yet, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A contact as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ContactView {
    /// Its name.
    pub name: String,
    /// Its peer id.
    pub peer_id: String,
    /// Direct addresses.
    pub addrs: Vec<String>,
    /// Home relays.
    pub relays: Vec<String>,
}

impl From<Contact> for ContactView {
    fn from(c: Contact) -> Self {
        Self {
            name: c.name,
            peer_id: c.peer_id.to_string(),
            addrs: c.addrs,
            relays: c.relays,
        }
    }
}

/// What a send returns.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// The new message's id.
    pub id: String,
    /// Its state when the call returned.
    pub state: MessageState,
    /// Why it is still pending, when that is known (a group's relay unreachable, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Node {
    /// Starts the engine's tasks on an already running network and store.
    pub(crate) fn start(parts: Parts, tasks: &mut JoinSet<()>) -> Result<Self, NodeError> {
        let Parts {
            key,
            settings,
            config,
            store,
            net,
            net_events,
            shutdown,
        } = parts;
        let me = key.public().to_peer_id();
        let home_relays = config
            .relays
            .iter()
            .filter_map(|a| Some((peer_of(a)?, a.clone())))
            .collect();
        let (events, _) = broadcast::channel(4096);
        let mut schedule = Schedule::default();
        for entry in store.outbox()? {
            schedule.insert(entry);
        }
        let store_groups = store.groups()?;
        let contacts = store
            .contacts()?
            .into_iter()
            .map(|c| (c.peer_id, c))
            .collect();
        let node = Node {
            inner: Arc::new(Inner {
                key,
                me,
                settings,
                config,
                store,
                net,
                events,
                home_relays,
                lamports: Mutex::new(HashMap::new()),
                contacts: Mutex::new(contacts),
                outbox: Mutex::new(schedule),
                outbox_wake: Notify::new(),
                next_req_id: std::sync::atomic::AtomicU64::new(1),
                presence: crate::presence::State::default(),
                groups: crate::group::Groups::load(store_groups),
                media: crate::media::State::default(),
            }),
        };
        tasks.spawn(node.clone().net_loop(net_events, shutdown.clone()));
        tasks.spawn(node.clone().outbox_loop(shutdown.clone()));
        tasks.spawn(node.clone().heartbeat_loop(shutdown.clone()));
        tasks.spawn(node.clone().group_loop(shutdown.clone()));
        tasks.spawn(node.clone().media_loop(shutdown.clone()));
        tasks.spawn(node.clone().poll_loop(shutdown));
        Ok(node)
    }

    // ---- access for the group module (`group.rs`) ----

    pub(crate) fn key(&self) -> &Keypair {
        &self.inner.key
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn net(&self) -> &net::Handle {
        &self.inner.net
    }

    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub(crate) fn home_relays(&self) -> &HashMap<PeerId, Multiaddr> {
        &self.inner.home_relays
    }

    pub(crate) fn media(&self) -> &crate::media::State {
        &self.inner.media
    }

    pub(crate) fn groups(&self) -> &crate::group::Groups {
        &self.inner.groups
    }

    /// Puts an entry (already durable) on the outbox schedule.
    pub(crate) fn enqueue(&self, entry: OutboxEntry) {
        self.schedule(entry);
    }

    /// Moves one of this node's outgoing messages forward and tells the watchers.
    pub(crate) fn advance_state(
        &self,
        id: &MessageId,
        state: MessageState,
    ) -> Result<(), StoreError> {
        self.advance(&self.inner.me, id, state)
    }

    pub(crate) fn req_id(&self) -> u64 {
        self.inner
            .next_req_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The presence state (for `presence.rs`).
    pub(crate) fn presence_state(&self) -> &crate::presence::State {
        &self.inner.presence
    }

    /// The network handle, settings, config and home relays (for `presence.rs`).
    pub(crate) fn parts(
        &self,
    ) -> (
        &net::Handle,
        &Settings,
        &Config,
        &HashMap<PeerId, Multiaddr>,
    ) {
        (
            &self.inner.net,
            &self.inner.settings,
            &self.inner.config,
            &self.inner.home_relays,
        )
    }

    /// The peer ids of every contact (for the presence policy).
    pub(crate) fn contact_peers(&self) -> Vec<PeerId> {
        self.inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.me
    }

    /// Subscribes to the event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, event: NodeEvent) {
        let _ = self.inner.events.send(event);
    }

    /// This node's invite.
    pub fn invite(&self) -> Invite {
        Invite {
            peer_id: self.inner.me,
            name: self.inner.settings.name.clone(),
            relays: self
                .inner
                .config
                .relays
                .iter()
                .map(|a| a.to_string())
                .collect(),
        }
    }

    /// What `kith id` shows.
    pub async fn id_info(&self) -> IdInfo {
        IdInfo {
            peer_id: self.inner.me.to_string(),
            name: self.inner.settings.name.clone(),
            invite: self.invite().encode(),
            listen_addrs: self
                .inner
                .net
                .listen_addrs()
                .await
                .iter()
                .map(|a| a.to_string())
                .collect(),
            read_receipts: self.inner.settings.read_receipts,
            presence: self.inner.settings.presence,
        }
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.net.listen_addrs().await
    }

    /// Adds (or replaces) a contact from a peer id or an invite, with extra direct addresses.
    pub async fn add_contact(
        &self,
        name: &str,
        peer_or_invite: &str,
        addrs: &[String],
    ) -> Result<ContactView, NodeError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 64 {
            return Err(NodeError::Invalid(
                "a contact name is 1 to 64 characters".into(),
            ));
        }
        let (peer_id, relays) = if let Ok(peer) = peer_or_invite.trim().parse::<PeerId>() {
            (peer, Vec::new())
        } else {
            let invite = Invite::decode(peer_or_invite).map_err(|e| {
                NodeError::Invalid(format!(
                    "{peer_or_invite:?} is neither a peer id nor an invite: {e}"
                ))
            })?;
            (invite.peer_id, invite.relays)
        };
        for addr in addrs.iter().chain(&relays) {
            addr.parse::<Multiaddr>()
                .map_err(|e| NodeError::Invalid(format!("bad address {addr:?}: {e}")))?;
        }
        for relay in &relays {
            let ok = relay
                .parse::<Multiaddr>()
                .ok()
                .and_then(|a| peer_of(&a))
                .is_some();
            if !ok {
                return Err(NodeError::Invalid(format!(
                    "relay address {relay:?} must end in /p2p/<relay peer id>"
                )));
            }
        }
        let contact = Contact {
            name: name.to_owned(),
            peer_id,
            addrs: addrs.to_vec(),
            relays,
        };
        let mut batch = Batch::new();
        batch.put_contact(&contact);
        self.inner.store.commit(batch).await?;
        self.inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer_id, contact.clone());
        // Anything waiting for this peer may now have a route.
        self.inner
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hurry(&peer_id, now_ms());
        self.inner.outbox_wake.notify_one();
        // The presence policy lists contacts: tell the relays soon.
        self.presence_state().wake();
        Ok(contact.into())
    }

    /// Every contact.
    pub fn contacts(&self) -> Result<Vec<ContactView>, NodeError> {
        Ok(self
            .inner
            .store
            .contacts()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub(crate) fn contact_of(&self, peer: &PeerId) -> Option<Contact> {
        self.inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// Resolves a contact name or a peer id.
    pub fn resolve(&self, who: &str) -> Result<PeerId, NodeError> {
        if let Some(c) = self
            .inner
            .store
            .contacts()?
            .into_iter()
            .find(|c| c.name == who)
        {
            return Ok(c.peer_id);
        }
        who.trim()
            .parse::<PeerId>()
            .map_err(|_| NodeError::UnknownRecipient(who.to_owned()))
    }

    pub(crate) fn next_lamport(&self, peer: &PeerId) -> Result<u64, NodeError> {
        let mut lamports = self
            .inner
            .lamports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = match lamports.get(peer) {
            Some(l) => *l,
            None => self.inner.store.lamport(peer)?,
        };
        let next = current + 1;
        lamports.insert(*peer, next);
        Ok(next)
    }

    fn observe_lamport(&self, peer: &PeerId, seen: u64) -> Result<u64, NodeError> {
        let mut lamports = self
            .inner
            .lamports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = match lamports.get(peer) {
            Some(l) => *l,
            None => self.inner.store.lamport(peer)?,
        };
        let next = current.max(seen);
        lamports.insert(*peer, next);
        Ok(next)
    }

    /// Sends a chat message to a contact name or peer id. Returns once it is durably in the
    /// outbox, or, if `wait` is given, once the first delivery attempt settles (or `wait` passes).
    pub async fn send(
        &self,
        to: &str,
        text: &str,
        wait: Option<Duration>,
    ) -> Result<Sent, NodeError> {
        if let Some(group) = self.group_target(to)? {
            if text.is_empty() {
                return Err(NodeError::Invalid(
                    "refusing to send an empty message".into(),
                ));
            }
            return self.send_group(group, text, wait).await;
        }
        let peer = self.resolve(to)?;
        self.mark_user_activity();
        if text.is_empty() {
            return Err(NodeError::Invalid(
                "refusing to send an empty message".into(),
            ));
        }
        let body = Body::Chat {
            text: text.to_owned(),
        };
        body.validate()
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let lamport = self.next_lamport(&peer)?;
        let header = Header {
            id: MessageId::random(),
            to: Destination::Peer(peer),
            sent_at_ms: now_ms(),
            lamport,
            expires_at_ms: None,
        };
        let envelope = Envelope::seal(&self.inner.key, header, &body)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let id = envelope.id;
        let stored = StoredMessage {
            id,
            direction: Direction::Out,
            from: self.inner.me,
            peer,
            text: text.to_owned(),
            sent_at_ms: envelope.sent_at_ms,
            lamport,
            state: MessageState::Pending,
            expires_at_ms: None,
        };
        let mut events = wait.map(|_| self.subscribe());
        let mut batch = Batch::new();
        batch.put_message(&stored);
        batch.set_lamport(&peer, lamport);
        let entry = OutboxEntry {
            envelope,
            attempts: 0,
            due_ms: now_ms(),
        };
        batch.put_outbox(&entry);
        // The first attempt may start while the outbox write is being flushed: delivering is
        // not acknowledging anything, and a message that got out before a crash is only
        // delivered, never lost. The caller hears back once the write is on disk.
        self.inner.store.apply(batch)?;
        self.schedule(entry);
        self.inner.store.flush().await?;
        let mut state = MessageState::Pending;
        if let (Some(wait), Some(events)) = (wait, events.as_mut()) {
            let id_text = id.to_string();
            let _ = tokio::time::timeout(wait, async {
                loop {
                    match events.recv().await {
                        Ok(NodeEvent::Receipt { id, state: s, .. }) if id == id_text => {
                            state = state.advance(s);
                            return;
                        }
                        Ok(NodeEvent::Failed { id, .. }) if id == id_text => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                        _ => {}
                    }
                }
            })
            .await;
            if let Ok(Some(m)) = self.inner.store.outgoing(&id) {
                state = state.advance(m.state);
            }
        }
        Ok(Sent {
            id: id.to_string(),
            state,
            note: None,
        })
    }

    fn schedule(&self, entry: OutboxEntry) {
        self.inner
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry);
        self.inner.outbox_wake.notify_one();
    }

    /// A conversation (by contact name or peer id), or every message when `with` is `None`.
    pub fn messages(&self, with: Option<&str>) -> Result<Vec<MessageView>, NodeError> {
        Ok(self.with_attachments(self.messages_without_files(with)?))
    }

    fn messages_without_files(&self, with: Option<&str>) -> Result<Vec<MessageView>, NodeError> {
        if let Some(group) = with.map(|w| self.group_target(w)).transpose()?.flatten() {
            return self.group_messages(&group);
        }
        let peers = match with {
            Some(who) => vec![self.resolve(who)?],
            None => self.inner.store.conversations()?,
        };
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.inner.store.conversation(&peer)?);
        }
        if with.is_none() {
            out.sort_by_key(|m| (m.sent_at_ms, m.lamport));
            let mut views: Vec<MessageView> = out.into_iter().map(Into::into).collect();
            views.extend(self.all_group_messages()?);
            views.sort_by_key(|m| m.sent_at_ms);
            return Ok(views);
        }
        Ok(out.into_iter().map(Into::into).collect())
    }

    /// Marks a conversation read and, unless turned off, sends `Read` receipts.
    /// Returns how many messages were newly read.
    pub async fn read(&self, with: &str) -> Result<usize, NodeError> {
        if let Some(group) = self.group_target(with)? {
            self.mark_user_activity();
            return self.read_group(&group).await;
        }
        let peer = self.resolve(with)?;
        self.mark_user_activity();
        let mut ids = Vec::new();
        for msg in self.inner.store.conversation(&peer)? {
            if msg.direction == Direction::In && msg.state < MessageState::Read {
                self.inner
                    .store
                    .advance_state(&msg.from, &msg.id, MessageState::Read)?;
                ids.push(msg.id);
            }
        }
        if ids.is_empty() {
            return Ok(0);
        }
        if self.inner.settings.read_receipts {
            self.queue_receipts(peer, ReceiptState::Read, &ids).await?;
        } else {
            self.inner.store.flush().await?;
        }
        Ok(ids.len())
    }

    /// Seals receipts for `ids` (in batches) and puts them in the outbox, durably.
    pub(crate) async fn queue_receipts(
        &self,
        to: PeerId,
        state: ReceiptState,
        ids: &[MessageId],
    ) -> Result<(), NodeError> {
        let mut batch = Batch::new();
        let mut entries = Vec::new();
        for chunk in ids.chunks(MAX_IDS_PER_BATCH) {
            let header = Header {
                id: MessageId::random(),
                to: Destination::Peer(to),
                sent_at_ms: now_ms(),
                lamport: 0,
                expires_at_ms: None,
            };
            let body = Body::Receipt {
                state,
                ids: chunk.to_vec(),
            };
            let envelope = Envelope::seal(&self.inner.key, header, &body)
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
            let entry = OutboxEntry {
                envelope,
                attempts: 0,
                due_ms: now_ms(),
            };
            batch.put_outbox(&entry);
            entries.push(entry);
        }
        self.inner.store.commit(batch).await?;
        for entry in entries {
            self.schedule(entry);
        }
        Ok(())
    }

    /// A message's state, by id.
    pub fn status(&self, id: &str) -> Result<StatusView, NodeError> {
        let parsed: MessageId = id
            .parse()
            .map_err(|e: kith_protocol::ids::ParseIdError| NodeError::Invalid(e.to_string()))?;
        if let Some(m) = self.inner.store.outgoing(&parsed)? {
            let reason = (m.state == MessageState::Pending)
                .then(|| self.inner.groups.reason(&m.id))
                .flatten();
            return Ok(StatusView {
                id: m.id.to_string(),
                state: m.state,
                members: self.member_view(&m.id),
                reason,
            });
        }
        // An incoming message: search the conversations (rare; ids are unique per sender).
        for peer in self.inner.store.conversations()? {
            if let Some(m) = self.inner.store.message(&peer, &parsed)? {
                return Ok(StatusView {
                    id: m.id.to_string(),
                    state: m.state,
                    members: HashMap::new(),
                    reason: None,
                });
            }
        }
        Err(NodeError::UnknownMessage(id.to_owned()))
    }

    // ---- inbound ----------------------------------------------------------------------------

    async fn net_loop(self, mut events: mpsc::Receiver<net::Event>, mut shutdown: Signal) {
        let limit = Arc::new(Semaphore::new(self.inner.config.max_in_flight));
        let mut work = JoinSet::new();
        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(done) = work.join_next(), if !work.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "inbound task failed");
                    }
                    continue;
                }
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            match event {
                net::Event::InboundDm {
                    peer,
                    request,
                    channel,
                } => {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        break;
                    };
                    let node = self.clone();
                    work.spawn(async move {
                        node.handle_dm(peer, *request, channel).await;
                        drop(permit);
                    });
                }
                net::Event::InboundPresence {
                    peer,
                    request,
                    channel,
                } => self.handle_presence(peer, request, channel).await,
                net::Event::Connected { peer } => {
                    self.inner
                        .outbox
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .hurry(&peer, now_ms());
                    self.inner.outbox_wake.notify_one();
                }
                net::Event::Gossip {
                    source,
                    message_id,
                    topic,
                    data,
                } => {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        break;
                    };
                    let node = self.clone();
                    work.spawn(async move {
                        node.handle_gossip(source, message_id, topic, data).await;
                        drop(permit);
                    });
                }
                net::Event::InboundBlob {
                    peer,
                    request,
                    channel,
                } => {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        break;
                    };
                    let node = self.clone();
                    work.spawn(async move {
                        node.serve_blob(peer, request, channel).await;
                        drop(permit);
                    });
                }
                net::Event::RelayConnected { relay } => {
                    self.presence_state().wake();
                    let node = self.clone();
                    work.spawn(async move { node.fetch_mailbox(relay).await });
                }
            }
        }
        work.shutdown().await;
    }

    async fn handle_dm(
        &self,
        peer: PeerId,
        request: Message<dm::Request>,
        channel: ResponseChannel<dm::Response>,
    ) {
        let response = match request {
            Message::Valid(dm::Request { req_id, envelope }) => {
                match self.accept(peer, envelope).await {
                    Ok(()) => dm::Response::Accepted { req_id },
                    Err(reason) => dm::Response::Rejected { req_id, reason },
                }
            }
            Message::Invalid { reason, detail } => {
                tracing::warn!(%peer, %detail, "refusing undecodable dm request");
                dm::Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => dm::Response::Rejected {
                req_id: 0,
                reason: Reject::Malformed,
            },
        };
        self.inner.net.respond_dm(channel, response).await;
    }

    /// Verifies and stores an envelope that `via` handed us; `Ok` only once it is on disk.
    async fn accept(&self, via: PeerId, envelope: Envelope) -> Result<(), Reject> {
        let from = envelope.from;
        if let Err(e) = envelope.verify() {
            tracing::warn!(%via, %from, id = %envelope.id, error = %e, "refusing envelope");
            return Err(match e {
                kith_protocol::VerifyError::UnsupportedVersion(_) => Reject::UnsupportedVersion,
                kith_protocol::VerifyError::BodyTooLarge { max, .. } => {
                    Reject::TooLarge { max: max as u64 }
                }
                _ => Reject::BadSignature,
            });
        }
        if let Destination::Group(group) = envelope.to {
            return self.accept_group(via, group, envelope).await;
        }
        if envelope.to != Destination::Peer(self.inner.me) {
            tracing::warn!(%via, %from, id = %envelope.id, "refusing envelope for someone else");
            return Err(Reject::WrongRecipient);
        }
        let relayed = via != from;
        if relayed && !self.inner.home_relays.contains_key(&via) {
            tracing::warn!(%via, %from, id = %envelope.id, "refusing envelope: sender is not the connection's peer");
            return Err(Reject::WrongSender);
        }
        if envelope.is_expired(now_ms()) {
            return Err(Reject::Expired);
        }
        let body = envelope.body().map_err(|e| {
            tracing::warn!(%via, %from, id = %envelope.id, error = %e, "refusing envelope with a bad body");
            Reject::Malformed
        })?;
        let store_failed = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot store an inbound envelope");
            Reject::StoreFailed
        };
        // A file is stored like a chat message (empty text) plus its attachment record.
        let (body, file) = match body {
            Body::File(file) => (
                Body::Chat {
                    text: String::new(),
                },
                Some(file),
            ),
            other => (other, None),
        };
        match body {
            Body::Chat { text } => {
                let existing = self
                    .inner
                    .store
                    .message(&from, &envelope.id)
                    .map_err(|e| store_failed(&e))?;
                if existing.is_some() {
                    tracing::debug!(%from, id = %envelope.id, "duplicate delivery");
                } else {
                    let lamport = self
                        .observe_lamport(&from, envelope.lamport)
                        .map_err(|e| store_failed(&e))?;
                    let msg = StoredMessage {
                        id: envelope.id,
                        direction: Direction::In,
                        from,
                        peer: from,
                        text: text.clone(),
                        sent_at_ms: envelope.sent_at_ms,
                        lamport: envelope.lamport,
                        state: MessageState::Delivered,
                        expires_at_ms: envelope.expires_at_ms,
                    };
                    let mut batch = Batch::new();
                    batch.put_message(&msg);
                    batch.set_lamport(&from, lamport);
                    if let Some(file) = file.clone() {
                        self.put_incoming_file(&mut batch, &envelope, file, None);
                    }
                    self.inner
                        .store
                        .commit(batch)
                        .await
                        .map_err(|e| store_failed(&e))?;
                    self.emit(NodeEvent::Message {
                        id: envelope.id.to_string(),
                        from: from.to_string(),
                        text,
                        sent_at_ms: envelope.sent_at_ms,
                    });
                    if let Some(file) = &file {
                        self.file_received(envelope.id, file.size).await;
                    }
                }
                if relayed {
                    // The sender did not see our answer: tell it with a receipt.
                    self.queue_receipts(from, ReceiptState::Delivered, &[envelope.id])
                        .await
                        .map_err(|e| store_failed(&e))?;
                }
            }
            // Turned into a chat message with an attachment above.
            Body::File(_) => return Err(Reject::Malformed),
            Body::GroupOp(_) => {
                tracing::warn!(%via, %from, "refusing a group operation addressed to a peer");
                return Err(Reject::Malformed);
            }
            Body::Receipt { state, ids } => {
                for id in ids {
                    let Ok(Some(msg)) = self.inner.store.outgoing(&id) else {
                        continue;
                    };
                    if let Ok(Some(_)) = self.inner.store.message_group(&id) {
                        // Group message: the receipt moves this member's state only.
                        self.advance_group_members(&id, Some(&from), state.into())
                            .map_err(|e| store_failed(&e))?;
                        continue;
                    }
                    if msg.peer != from {
                        tracing::warn!(%from, %id, "ignoring a receipt for another peer's message");
                        continue;
                    }
                    self.advance(&msg.from, &id, state.into())
                        .map_err(|e| store_failed(&e))?;
                }
                self.inner
                    .store
                    .flush()
                    .await
                    .map_err(|e| store_failed(&e))?;
            }
        }
        Ok(())
    }

    /// Moves an outgoing message's state forward and tells the watchers.
    fn advance(
        &self,
        from: &PeerId,
        id: &MessageId,
        state: MessageState,
    ) -> Result<(), StoreError> {
        if let Some(msg) = self.inner.store.advance_state(from, id, state)? {
            self.emit(NodeEvent::Receipt {
                id: id.to_string(),
                peer: msg.peer.to_string(),
                state: msg.state,
            });
        }
        Ok(())
    }

    /// Drains this node's mailbox at a home relay: store, acknowledge.
    async fn fetch_mailbox(&self, relay: PeerId) {
        let Some(addr) = self.inner.home_relays.get(&relay).cloned() else {
            return;
        };
        let mut after = None;
        loop {
            let request = mailbox::Request::Fetch {
                req_id: self.req_id(),
                after,
                limit: MAX_FETCH_BATCH,
            };
            let (items, more) = match self
                .inner
                .net
                .mailbox(relay, vec![addr.clone()], request)
                .await
            {
                Ok(mailbox::Response::Batch { items, more, .. }) => (items, more),
                Ok(other) => {
                    tracing::warn!(%relay, ?other, "unexpected mailbox answer to a fetch");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%relay, error = %e, "mailbox fetch failed");
                    return;
                }
            };
            let mut seqs = Vec::with_capacity(items.len());
            for item in items {
                after = Some(item.seq);
                match self.accept(relay, item.envelope).await {
                    Ok(()) => seqs.push(item.seq),
                    Err(reason) if reason.is_retryable() => {}
                    Err(reason) => {
                        tracing::warn!(%relay, seq = item.seq, %reason, "dropping a bad mailbox entry");
                        seqs.push(item.seq);
                    }
                }
            }
            if !seqs.is_empty() {
                let ack = mailbox::Request::Ack {
                    req_id: self.req_id(),
                    seqs,
                };
                if let Err(e) = self.inner.net.mailbox(relay, vec![addr.clone()], ack).await {
                    tracing::debug!(%relay, error = %e, "mailbox ack failed; entries will come again and be deduplicated");
                }
            }
            if !more {
                return;
            }
        }
    }

    async fn poll_loop(self, mut shutdown: Signal) {
        if self.inner.home_relays.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(self.inner.config.mailbox_poll_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tick.tick() => {
                    for relay in self.inner.home_relays.keys() {
                        if self.inner.net.is_connected(*relay).await {
                            self.fetch_mailbox(*relay).await;
                        }
                    }
                }
            }
        }
    }

    // ---- outbox -----------------------------------------------------------------------------

    async fn outbox_loop(self, mut shutdown: Signal) {
        let limit = Arc::new(Semaphore::new(self.inner.config.max_in_flight));
        let mut attempts = JoinSet::new();
        loop {
            let now = now_ms();
            let (ready, next_due) = {
                let mut schedule = self.inner.outbox.lock().unwrap_or_else(|p| p.into_inner());
                let budget = limit.available_permits().max(1);
                let mut ready = Vec::new();
                let mut next_due = None;
                while let Some(&(due_ms, id)) = schedule.due.first() {
                    if due_ms > now || ready.len() >= budget {
                        next_due = Some(due_ms.max(now));
                        break;
                    }
                    schedule.due.pop_first();
                    if schedule.in_flight.insert(id) {
                        if let Some(entry) = schedule.entries.get(&id) {
                            ready.push(entry.clone());
                        }
                    }
                }
                (ready, next_due)
            };
            for entry in ready {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let node = self.clone();
                attempts.spawn(async move {
                    node.attempt(entry).await;
                    drop(permit);
                });
            }
            let sleep = match next_due {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = self.inner.outbox_wake.notified() => {}
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        attempts.shutdown().await;
    }

    /// One delivery attempt for an outbox entry.
    async fn attempt(&self, entry: OutboxEntry) {
        let to = match entry.envelope.to {
            Destination::Peer(to) => to,
            Destination::Group(group) => {
                let outcome = self.deliver_group(&entry.envelope, group).await;
                self.finish(&entry, outcome);
                return;
            }
        };
        let contact = self.contact_of(&to);
        let mut addrs: Vec<Multiaddr> = Vec::new();
        let mut relays: Vec<Multiaddr> = Vec::new();
        if let Some(c) = &contact {
            addrs.extend(c.addrs.iter().filter_map(|a| a.parse().ok()));
            relays.extend(c.relays.iter().filter_map(|a| a.parse().ok()));
        }
        if relays.is_empty() {
            // A peer whose relays we do not know (a stranger who wrote to us, say) most likely
            // shares ours: a community relay. Try its circuit there, and its mailbox there.
            relays.extend(self.inner.home_relays.values().cloned());
        }
        addrs.extend(relays.iter().map(|r| circuit_addr(r, to)));

        // A receipt for a peer we know no direct route to (a group member who is not a contact)
        // goes straight to the relays, which push it to a connected recipient: a group's
        // receipts must not cost one relayed circuit each.
        let is_receipt = matches!(entry.envelope.body(), Ok(Body::Receipt { .. }));
        if is_receipt
            && contact.as_ref().is_none_or(|c| c.addrs.is_empty())
            && !self.inner.net.is_connected(to).await
        {
            let outcome = self.deposit(&entry.envelope, &relays).await;
            if !matches!(outcome, Outcome::Retry(_)) {
                self.finish(&entry, outcome);
                return;
            }
        }

        let request = Message::Valid(dm::Request {
            req_id: self.req_id(),
            envelope: entry.envelope.clone(),
        });
        let direct = tokio::time::timeout(
            self.inner.config.delivery_timeout,
            self.inner.net.send_dm(to, addrs, request),
        )
        .await;
        let outcome = match direct {
            Ok(Ok(dm::Response::Accepted { .. })) => Outcome::Delivered,
            Ok(Ok(dm::Response::Rejected { reason, .. })) if !reason.is_retryable() => {
                tracing::warn!(%to, id = %entry.envelope.id, %reason, "recipient refused the message");
                Outcome::Failed(format!("recipient refused it: {reason}"))
            }
            other => {
                let why = match other {
                    Ok(Ok(dm::Response::Rejected { reason, .. })) => reason.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => NetError::Timeout.to_string(),
                    Ok(Ok(dm::Response::Accepted { .. })) => String::new(),
                };
                tracing::debug!(%to, id = %entry.envelope.id, %why, "direct delivery failed");
                self.deposit(&entry.envelope, &relays).await
            }
        };
        self.finish(&entry, outcome);
    }

    /// Deposits an envelope at the recipient's home relays; `Sent` if at least one stored it.
    async fn deposit(&self, envelope: &Envelope, relays: &[Multiaddr]) -> Outcome {
        // Relays cannot read bodies: tell them which deposits are receipts, shed first under load.
        let class = match envelope.body() {
            Ok(Body::Receipt { .. }) => mailbox::DepositClass::Receipt,
            _ => mailbox::DepositClass::Message,
        };
        let mut stored = false;
        let mut reasons = Vec::new();
        for relay in relays {
            let Some(relay_peer) = peer_of(relay) else {
                continue;
            };
            let request = mailbox::Request::Deposit {
                req_id: self.req_id(),
                envelope: envelope.clone(),
                class,
            };
            match self
                .inner
                .net
                .mailbox(relay_peer, vec![relay.clone()], request)
                .await
            {
                Ok(mailbox::Response::Stored { .. }) => stored = true,
                Ok(mailbox::Response::Rejected { reason, .. }) => {
                    tracing::info!(%relay, %reason, "relay refused a deposit");
                    if !reason.is_retryable() {
                        return Outcome::Failed(format!("relay refused it: {reason}"));
                    }
                    reasons.push(reason.to_string());
                }
                Ok(other) => reasons.push(format!("unexpected answer {other:?}")),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        if stored {
            Outcome::Sent
        } else {
            Outcome::Retry(if relays.is_empty() {
                "recipient unreachable and it has no home relay".into()
            } else {
                reasons.join("; ")
            })
        }
    }

    fn finish(&self, entry: &OutboxEntry, outcome: Outcome) {
        let id = entry.envelope.id;
        let is_chat = matches!(entry.envelope.body(), Ok(Body::Chat { .. } | Body::File(_)));
        let state = match &outcome {
            Outcome::Delivered => Some(MessageState::Delivered),
            Outcome::Sent => Some(MessageState::Sent),
            _ => None,
        };
        if let (Some(state), true) = (state, is_chat) {
            let recorded = match entry.envelope.to {
                // The relay holds a copy for every member: each member is `sent`.
                Destination::Group(_) => self
                    .advance_group_members(&id, None, state)
                    .map_err(|e| e.to_string()),
                Destination::Peer(_) => self
                    .advance(&self.inner.me, &id, state)
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = recorded {
                tracing::error!(%id, error = %e, "cannot record a delivery");
            }
        }
        let mut batch = Batch::new();
        match outcome {
            Outcome::Delivered | Outcome::Sent => {
                batch.remove_outbox(&id);
                self.inner
                    .outbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Outcome::Failed(reason) => {
                batch.remove_outbox(&id);
                self.inner
                    .outbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                self.emit(NodeEvent::Failed {
                    id: id.to_string(),
                    reason,
                });
            }
            Outcome::Retry(reason) => {
                let jitter: f64 = rand::thread_rng().gen();
                let delay = self.inner.config.backoff.delay_ms(entry.attempts, jitter);
                tracing::debug!(%id, attempts = entry.attempts + 1, delay_ms = delay, %reason, "will retry");
                let next = OutboxEntry {
                    envelope: entry.envelope.clone(),
                    attempts: entry.attempts + 1,
                    due_ms: now_ms() + delay,
                };
                batch.put_outbox(&next);
                let mut schedule = self.inner.outbox.lock().unwrap_or_else(|p| p.into_inner());
                schedule.in_flight.remove(&id);
                schedule.insert(next);
            }
        }
        // Losing this write in a crash only means one more (deduplicated) attempt.
        if let Err(e) = self.inner.store.apply(batch) {
            tracing::error!(%id, error = %e, "cannot update the outbox");
        }
        self.inner.outbox_wake.notify_one();
    }
}

pub(crate) enum Outcome {
    Delivered,
    Sent,
    Retry(String),
    Failed(String),
}
