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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_net::codec::Message;
use kith_protocol::blob::FileRef;
use kith_protocol::envelope::Header;
use kith_protocol::invite::Invite;
use kith_protocol::keys::Keys;
use kith_protocol::limits::{MAX_FETCH_BATCH, MAX_IDS_PER_BATCH};
use kith_protocol::{dm, mailbox, Body, Destination, Envelope, MessageId, MessageState};
use kith_protocol::{ReceiptState, Reject};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinSet;

pub mod admission;
mod backpressure;
pub(crate) mod claims;
pub(crate) mod contacts;
pub mod crypto;
mod give_up;
mod held;
pub mod hooks;
mod inbound;
pub(crate) mod names;
pub mod outbox;
mod seal;
pub mod store;
pub(crate) use give_up::deadline_ms;

use crate::config::{Config, Settings};
use crate::core::crypto::{upgrade_entry, Olm, OpenError};
use crate::core::store::{
    Batch, Contact, Direction, EntryKind, OutboxEntry, Store, StoreError, StoredMessage, Thread,
};
use crate::net::{self, circuit_addr, peer_of, NetError};
use crate::shutdown::Signal;

/// How long a sender or relay is asked to wait when another copy of its message is being
/// stored (see `claims`).
const CLAIMED_RETRY_AFTER_MS: u64 = 500;

/// Senders' decoded keys kept per generation ([`Keys`]): far more than a node's contacts.
const KEY_CACHE_CAPACITY: usize = 256;

/// At most one WARN line a minute per peer about its undecodable requests.
const MALFORMED_LOG_INTERVAL_MS: u64 = 60_000;

/// Strangers' dm requests handled at once ([`admission`]).
const STRANGER_SLOTS: usize = 4;

use crate::clock::now_ms;
use inbound::Checked;
use outbox::{Outbox, Transmit};

/// An event for the local API's stream and for in-process watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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
        /// The conversation it belongs to: the other party's peer id, or the group id.
        conversation: String,
        /// The group id for a group message, `None` (null) for a one-to-one message.
        group: Option<String>,
        /// The sender's contact name (this node's own name for its own messages), if known.
        from_name: Option<String>,
        /// The conversation's name (the contact's or the group's), if known.
        conversation_name: Option<String>,
    },
    /// One of this node's messages changed state (a tick) for one recipient.
    Receipt {
        /// The message id.
        id: String,
        /// The recipient whose state changed (for a group message: that member).
        peer: String,
        /// That recipient's new state.
        state: MessageState,
        /// The conversation: the recipient's peer id, or the group id.
        conversation: String,
        /// The group id for a group message, `None` (null) for a one-to-one message.
        group: Option<String>,
        /// The recipient's contact name, if known.
        peer_name: Option<String>,
    },
    /// A message could not be delivered and will not be retried.
    Failed {
        /// The message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// An attempt to deliver one of this node's messages failed; it stays `pending` and is
    /// tried again.
    Retry {
        /// The message id.
        id: String,
        /// Why the attempt failed.
        reason: String,
        /// When the next attempt is due (unix ms).
        next_attempt_ms: u64,
    },
    /// A peer is typing to this node (never stored).
    Typing {
        /// The typing peer's id.
        from: String,
        /// Its contact name, if known.
        from_name: Option<String>,
    },
    /// A file transfer moved on (the file feature).
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
    /// A peer's end-to-end identity key changed: the contact is no longer verified.
    #[serde(rename = "identity_changed")]
    IdentityChanged {
        /// The peer.
        peer: String,
    },
    /// A stranger's first message arrived: it waits in the requests list (the strangers feature).
    Request {
        /// The stranger's peer id.
        peer_id: String,
        /// Its display name, if known.
        name: Option<String>,
    },
    /// A stranger added this node to a group: it waits as an invitation (`kith group
    /// invitations`) until accepted or declined.
    #[serde(rename = "group_invitation")]
    GroupInvitation {
        /// The group id.
        group_id: String,
        /// The group's name.
        name: String,
        /// The stranger's peer id.
        inviter: String,
    },
    /// A message from a peer could not be decrypted; the sender is asked to send it again.
    Undecryptable {
        /// The message id.
        id: String,
        /// The sender.
        from: String,
    },
    /// A message of a temporary chat reached its expiry and was deleted (the temporary-chats feature).
    Expired {
        /// The message id.
        id: String,
        /// The conversation: the other party's peer id, or the group id.
        conversation: String,
        /// The group id for a group message, `None` (null) for a one-to-one message.
        group: Option<String>,
        /// Its final state: `expired` for an outgoing message that was never delivered.
        state: MessageState,
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
    /// No contact goes by that name.
    #[error("no contact named {0:?} (`kith contact list` shows them)")]
    UnknownContact(String),
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
    /// The settings in effect; `kith settings` and `kith name` change them while the node runs.
    settings: std::sync::RwLock<Settings>,
    config: Config,
    store: Store,
    net: net::Handle,
    events: broadcast::Sender<NodeEvent>,
    /// Home relays by peer id: they may deliver envelopes on others' behalf.
    home_relays: HashMap<PeerId, Multiaddr>,
    /// Per-conversation Lamport clocks, kept here so concurrent sends never share a value.
    lamports: Mutex<HashMap<PeerId, u64>>,
    /// WARN lines about undecodable requests and undecryptable messages, rate-limited per peer
    /// and for new peers.
    malformed_warnings: Mutex<kith_relay::quiet::Warnings>,
    /// Senders' decoded public keys, so a contact's key is not decoded again for each envelope.
    keys: Mutex<Keys>,
    /// Contacts by peer id, mirrored from the store so that attempts need no store scan.
    contacts: Mutex<HashMap<PeerId, Contact>>,
    /// The outbox's schedule and request slots ([`outbox`]).
    outbox: Mutex<Outbox>,
    outbox_wake: Notify,
    /// Waits relays asked for, per relay and recipient ([`backpressure`]).
    holds: Mutex<kith_protocol::hold::Holds>,
    /// The running delivery attempts: the outbox loop reaps them and stops them at shutdown.
    attempts: Mutex<JoinSet<()>>,
    /// Inbound `/kith/dm/1` streams being served (reaped as new ones come, stopped at
    /// shutdown, after which there are none).
    inbound: Mutex<Option<JoinSet<()>>>,
    /// Inbound `/kith/dm/1` requests handled at once (verified, stored and flushed).
    inbound_slots: Semaphore,
    /// Who holds the inbound `/kith/dm/1` streams ([`admission`]).
    admission: admission::Admission,
    /// Strangers' requests handled at once, of `inbound_slots`: contacts never wait behind
    /// more than these.
    stranger_slots: Semaphore,
    /// The rate of strangers' requests, all strangers together ([`admission`]).
    stranger_rate: admission::StrangerRate,
    next_req_id: std::sync::atomic::AtomicU64,
    /// The features plugged in ([`hooks`]).
    plugins: hooks::Plugins,
    /// Why a pending outgoing message has not left yet (its last attempt's failure).
    pending_reasons: Mutex<HashMap<MessageId, String>>,
    /// Senders waiting for the first outcome of their message (`send` with a wait).
    first_outcomes: Mutex<HashMap<MessageId, oneshot::Sender<()>>>,
    /// Inbound messages between their "is it new" check and their flush.
    claims: crate::core::claims::Claims,
    /// When a mailbox fetch last completed (unix ms, 0: never), for `kith status`.
    last_fetch_ms: std::sync::atomic::AtomicU64,
    /// The Olm account and sessions: the only sealer and opener of one-to-one bodies.
    olm: Olm,
    /// Held while a session with a peer is being set up, so that one claim serves everyone
    /// waiting for it.
    claiming: tokio::sync::Mutex<()>,
    /// A send's seal and each inbound open (requests, held messages) wait for their turn here
    /// without holding a thread: Olm's own lock is held through a decryption and its writes,
    /// and a runtime worker blocked on it is a core lost to every other task (under load, about
    /// one switch in ten on a node's workers was such a wait). Rarer seals (receipts, re-sends)
    /// go straight to Olm's lock.
    olm_turn: tokio::sync::Mutex<()>,
}

/// A second copy of an envelope within one batch: stored with the first, like any duplicate
/// (a relay redelivering it still wants the sender told).
fn batch_duplicate(via: PeerId, envelope: Envelope) -> Option<Fresh> {
    (via != envelope.from).then_some(Fresh {
        envelope,
        text: None,
        file_size: None,
    })
}

/// Where a peer may be reached (see [`Node::route`]).
struct Route {
    contact: Option<Contact>,
    addrs: Vec<Multiaddr>,
    relays: Vec<Multiaddr>,
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
    pub plugins: hooks::Plugins,
}

/// The cloneable handle to a running node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// What `kith id` reports.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    /// The conversation: the other party's peer id, or the group id.
    pub conversation: String,
    /// The conversation's name (the contact's or the group's), if known.
    pub conversation_name: Option<String>,
    /// The author's name (a contact's, or this node's own), if known.
    pub from_name: Option<String>,
    /// The attached file, if any (the file feature).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentView>,
    /// When it disappears (unix ms, this node's clock), for a message of a temporary chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// For the history line of a timer change: the timer it set (the temporary-chats feature).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer: Option<TimerLine>,
}

/// An attachment as `kith messages` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentView {
    /// The file's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type.
    pub mime: String,
    /// BLAKE3 of the file, hex.
    pub hash: String,
    /// Where the file is on this machine, once it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whether the file is on this machine (`false`: not downloaded; `kith download` fetches
    /// it).
    pub downloaded: bool,
    /// A small PNG preview, hex-encoded, for images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
}

/// A history line of a timer change, as the API shows it inside a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimerLine {
    /// The new timer in seconds, `null` for off.
    pub timer_secs: Option<u64>,
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
            conversation: m.peer.to_string(),
            conversation_name: None,
            from_name: None,
            attachment: None,
            expires_at_ms: m.expires_at_ms,
            timer: None,
        }
    }
}

/// A message's state as `kith status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusView {
    /// The message id.
    pub id: String,
    /// Its state.
    pub state: MessageState,
    /// Per-member states (empty for one-to-one messages).
    pub members: HashMap<String, MessageState>,
    /// Names of the members that this node knows (contacts), by peer id.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub member_names: HashMap<String, String>,
    /// Why a pending message has not gone out yet, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A contact as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ContactView {
    /// Its name.
    pub name: String,
    /// Its peer id.
    pub peer_id: String,
    /// Direct addresses.
    pub addrs: Vec<String>,
    /// Home relays.
    pub relays: Vec<String>,
    /// The user compared safety numbers with it (`kith contact verify --mark`).
    pub verified: bool,
    /// Its identity key changed since it was first seen and is not verified again.
    pub identity_changed: bool,
    /// The user blocked it (the strangers feature).
    pub blocked: bool,
}

impl From<Contact> for ContactView {
    fn from(c: Contact) -> Self {
        Self {
            name: c.name,
            peer_id: c.peer_id.to_string(),
            addrs: c.addrs,
            relays: c.relays,
            verified: false,
            identity_changed: false,
            blocked: false,
        }
    }
}

/// What a send returns.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
            plugins,
        } = parts;
        let me = key.public().to_peer_id();
        let home_relays = config
            .relays
            .iter()
            .filter_map(|a| Some((peer_of(a)?, a.clone())))
            .collect();
        let (events, _) = broadcast::channel(4096);
        let changed = events.clone();
        let olm = Olm::load(
            store.clone(),
            key.clone(),
            Box::new(move |peer| {
                let _ = changed.send(NodeEvent::IdentityChanged {
                    peer: peer.to_string(),
                });
            }),
        )
        .map_err(|e| NodeError::Invalid(format!("cannot load the Olm account: {e}")))?;
        let mut schedule = Outbox::new(outbox::Limits {
            max_in_flight: config.max_in_flight,
            max_in_flight_per_peer: config.max_in_flight_per_peer,
            max_batch: sealed_batch(config.max_in_flight_per_peer),
            max_queued: config.max_in_flight * dm::MAX_BATCH,
            backoff: config.backoff,
        });
        let mut stored = store.outbox()?;
        // In the order they were written, as near as the store tells (see `outbox`).
        stored.sort_by_key(|e| e.envelope.sent_at_ms);
        for entry in stored {
            schedule.insert(upgrade_entry(entry));
        }
        let contacts = store
            .contacts()?
            .into_iter()
            .map(|c| (c.peer_id, c))
            .collect();
        let max_in_flight = config.max_in_flight;
        let node = Node {
            inner: Arc::new(Inner {
                key,
                me,
                settings: std::sync::RwLock::new(settings),
                config,
                store,
                net,
                events,
                home_relays,
                lamports: Mutex::new(HashMap::new()),
                malformed_warnings: Mutex::new(kith_relay::quiet::Warnings::new(
                    MALFORMED_LOG_INTERVAL_MS,
                )),
                keys: Mutex::new(Keys::new(KEY_CACHE_CAPACITY)),
                contacts: Mutex::new(contacts),
                outbox: Mutex::new(schedule),
                outbox_wake: Notify::new(),
                holds: Mutex::new(kith_protocol::hold::Holds::new()),
                attempts: Mutex::new(JoinSet::new()),
                inbound: Mutex::new(Some(JoinSet::new())),
                inbound_slots: Semaphore::new(max_in_flight),
                admission: admission::Admission::default(),
                stranger_slots: Semaphore::new(STRANGER_SLOTS),
                stranger_rate: admission::StrangerRate::default(),
                next_req_id: std::sync::atomic::AtomicU64::new(1),
                plugins,
                pending_reasons: Mutex::new(HashMap::new()),
                first_outcomes: Mutex::new(HashMap::new()),
                claims: crate::core::claims::Claims::default(),
                last_fetch_ms: std::sync::atomic::AtomicU64::new(0),
                olm,
                claiming: tokio::sync::Mutex::new(()),
                olm_turn: tokio::sync::Mutex::new(()),
            }),
        };
        // A weak reference: the network handle, which the node holds, holds this.
        let weak = Arc::downgrade(&node.inner);
        node.inner.net.serve_dm_with(move |peer, stream| {
            if let Some(inner) = weak.upgrade() {
                Node { inner }.spawn_serve_dm(peer, stream);
            }
        });
        tasks.spawn(node.clone().net_loop(net_events, shutdown.clone()));
        tasks.spawn(node.clone().outbox_loop(shutdown.clone()));
        for feature in node.inner.plugins.all() {
            for task in feature.tasks(&node, &shutdown) {
                tasks.spawn(task);
            }
        }
        tasks.spawn(node.clone().held_loop(shutdown.clone()));
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

    /// The settings in effect (a copy: they may change while the node runs).
    pub(crate) fn settings(&self) -> Settings {
        self.inner
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the settings in effect with `change` and saves them to `<home>/config.toml`;
    /// returns the new settings.
    pub(crate) fn change_settings(
        &self,
        change: impl FnOnce(&mut Settings),
    ) -> Result<Settings, crate::config::SettingsError> {
        let mut settings = self
            .inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut changed = settings.clone();
        change(&mut changed);
        if changed != *settings {
            changed.save(&self.inner.config.home)?;
            *settings = changed;
        }
        Ok(settings.clone())
    }

    pub(crate) fn home_relays(&self) -> &HashMap<PeerId, Multiaddr> {
        &self.inner.home_relays
    }

    /// The features plugged in, by role.
    pub(crate) fn plugins(&self) -> &hooks::Plugins {
        &self.inner.plugins
    }

    /// A plugged-in feature's own state (see [`hooks`]).
    pub(crate) fn feature<T: hooks::Feature>(&self) -> Option<&T> {
        self.inner.plugins.get::<T>()
    }

    /// Records (or, with `None`, clears) why pending message `id` has not left yet.
    pub(crate) fn set_pending_reason(&self, id: MessageId, reason: Option<String>) {
        let mut reasons = self
            .inner
            .pending_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(why) => {
                reasons.insert(id, why);
            }
            None => {
                reasons.remove(&id);
            }
        }
    }

    /// A channel that hears when the first delivery attempt of outgoing message `id` settles
    /// (delivered, sent, retried or failed): `send` answers with the tick it then has.
    pub(crate) fn watch_first_outcome(&self, id: MessageId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .first_outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        rx
    }

    /// Waits up to `wait` for `first` (see `watch_first_outcome`), then reads message `id`'s
    /// tick.
    pub(crate) async fn first_outcome(
        &self,
        id: MessageId,
        first: oneshot::Receiver<()>,
        wait: Duration,
    ) -> MessageState {
        let _ = tokio::time::timeout(wait, first).await;
        self.inner
            .first_outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match self.inner.store.outgoing(&id) {
            Ok(Some(m)) => m.state,
            _ => MessageState::Pending,
        }
    }

    /// The first attempt of message `id` settled: whoever waits for it hears.
    fn settled_first(&self, id: &MessageId) {
        let waiting = self
            .inner
            .first_outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(tx) = waiting {
            let _ = tx.send(());
        }
    }

    pub(crate) fn pending_reason(&self, id: &MessageId) -> Option<String> {
        self.inner
            .pending_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn olm(&self) -> &Olm {
        &self.inner.olm
    }

    pub(crate) fn claiming(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.claiming
    }

    /// Puts an entry (already durable) on the outbox schedule.
    pub(crate) fn enqueue(&self, entry: OutboxEntry) {
        self.schedule(entry);
    }

    /// The outbox's schedule.
    pub(crate) fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.inner.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves one of this node's outgoing group messages forward (its overall state); the
    /// watchers hear of each member's change instead (see `advance_group_members`).
    pub(crate) fn advance_state(
        &self,
        id: &MessageId,
        state: MessageState,
    ) -> Result<(), StoreError> {
        self.inner
            .store
            .advance_state(&self.inner.me, id, state)
            .map(|_| ())
    }

    pub(crate) fn req_id(&self) -> u64 {
        self.inner
            .next_req_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Inbound messages being stored (for `group.rs`).
    pub(crate) fn claims(&self) -> &crate::core::claims::Claims {
        &self.inner.claims
    }

    /// The network handle, settings, config and home relays (for `presence.rs`).
    pub(crate) fn parts(&self) -> (&net::Handle, Settings, &Config, &HashMap<PeerId, Multiaddr>) {
        (
            &self.inner.net,
            self.settings(),
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

    /// `/kith/dm/1` requests this node sent so far, by the road they took.
    pub fn dm_paths(&self) -> net::DmPaths {
        self.inner.net.dm_paths()
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
            name: self.settings().name,
            relays: self
                .inner
                .config
                .relays
                .iter()
                .map(|a| a.to_string())
                .collect(),
            identity: Some(self.inner.olm.identity().clone()),
        }
    }

    /// What `kith id` shows.
    pub async fn id_info(&self) -> IdInfo {
        let settings = self.settings();
        IdInfo {
            peer_id: self.inner.me.to_string(),
            name: settings.name,
            invite: self.invite().encode(),
            listen_addrs: self
                .inner
                .net
                .listen_addrs()
                .await
                .iter()
                .map(|a| a.to_string())
                .collect(),
            read_receipts: settings.read_receipts,
            presence: settings.presence,
        }
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.net.listen_addrs().await
    }

    /// Adds a contact from a peer id or an invite, with extra direct addresses. Adding the same
    /// peer under the same name again updates its addresses; a name or a peer already taken is
    /// refused (see [`Node::rename_contact`] and [`Node::remove_contact`]).
    pub async fn add_contact(
        &self,
        name: &str,
        peer_or_invite: &str,
        addrs: &[String],
    ) -> Result<ContactView, NodeError> {
        let name = crate::core::contacts::valid_name(name)?;
        let (peer_id, relays) = if let Ok(peer) = peer_or_invite.trim().parse::<PeerId>() {
            (peer, Vec::new())
        } else {
            let invite = Invite::decode(peer_or_invite).map_err(|e| {
                tracing::debug!(error = %e, "not an invite");
                let shown: String = peer_or_invite.chars().take(24).collect();
                NodeError::Invalid(format!(
                    "{shown:?}… is neither a peer id nor an invite (`kith id --invite` prints one; copy the whole line)"
                ))
            })?;
            if let Some(identity) = &invite.identity {
                self.inner
                    .olm
                    .learn_identity(&invite.peer_id, identity)
                    .map_err(|e| {
                        NodeError::Invalid(format!(
                            "the invite's identity key does not check out: {e}"
                        ))
                    })?;
            }
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
        self.save_new_contact(&contact).await?;
        // Anything waiting for this peer may now have a route.
        self.outbox().hurry(&peer_id, now_ms());
        self.inner.outbox_wake.notify_one();
        // The presence policy lists contacts: tell the relays soon.
        self.inner.plugins.presence.wake();
        Ok(contact.into())
    }

    /// Every contact.
    pub fn contacts(&self) -> Result<Vec<ContactView>, NodeError> {
        Ok(self
            .inner
            .store
            .contacts()?
            .into_iter()
            .map(|c| {
                let (verified, identity_changed) = self.verification(&c.peer_id);
                ContactView {
                    verified,
                    identity_changed,
                    blocked: self.inner.plugins.gate.is_blocked(&c.peer_id),
                    ..c.into()
                }
            })
            .collect())
    }

    /// The in-memory mirror of the contacts, by peer id (for `contacts.rs`).
    pub(crate) fn contacts_mirror(&self) -> &Mutex<HashMap<PeerId, Contact>> {
        &self.inner.contacts
    }

    pub(crate) fn contact_of(&self, peer: &PeerId) -> Option<Contact> {
        self.inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// The peer of the contact called `name`, from the in-memory mirror of the contacts.
    pub(crate) fn contact_named(&self, name: &str) -> Option<PeerId> {
        self.inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|c| c.name == name)
            .map(|c| c.peer_id)
    }

    /// Resolves a contact name or a peer id.
    pub fn resolve(&self, who: &str) -> Result<PeerId, NodeError> {
        if let Some(peer) = self.contact_named(who) {
            return Ok(peer);
        }
        who.trim()
            .parse::<PeerId>()
            .map_err(|_| NodeError::UnknownRecipient(who.to_owned()))
    }

    pub(crate) fn next_lamport(&self, peer: &PeerId) -> Result<u64, NodeError> {
        self.move_lamport(peer, kith_protocol::lamport::next)
    }

    fn observe_lamport(&self, peer: &PeerId, seen: u64) -> Result<u64, NodeError> {
        self.move_lamport(peer, |current| {
            kith_protocol::lamport::observe(current, seen)
        })
    }

    /// Moves the conversation with `peer` to the clock `step` gives from its current one.
    fn move_lamport(&self, peer: &PeerId, step: impl FnOnce(u64) -> u64) -> Result<u64, NodeError> {
        let mut lamports = self
            .inner
            .lamports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = match lamports.get(peer) {
            Some(l) => *l,
            None => self.inner.store.lamport(peer)?,
        };
        let next = step(current);
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
        let rooms = &self.inner.plugins.rooms;
        if let Some(room) = rooms.target(self, to)? {
            if text.trim().is_empty() {
                return Err(NodeError::Invalid(
                    "refusing to send an empty message".into(),
                ));
            }
            return rooms.send(self, room, text, wait).await;
        }
        let peer = self.resolve(to)?;
        self.inner.plugins.presence.user_active(self);
        if text.trim().is_empty() {
            return Err(NodeError::Invalid(
                "refusing to send an empty message".into(),
            ));
        }
        let message = Outgoing {
            id: MessageId::random(),
            body: Body::Chat {
                text: text.to_owned(),
            },
            text: text.to_owned(),
            lamport: None,
            timed: true,
            batch: Batch::new(),
        };
        self.send_to_peer(peer, message, wait).await
    }

    /// The one way a one-to-one message goes out: composed (sealed if a session exists),
    /// recorded `pending` with its outbox entry and the caller's writes, flushed, and handed to
    /// its first attempt. With `wait`, answers once that attempt settles (or `wait` passes).
    pub(crate) async fn send_to_peer(
        &self,
        peer: PeerId,
        message: Outgoing,
        wait: Option<Duration>,
    ) -> Result<Sent, NodeError> {
        let Outgoing {
            id,
            body,
            text,
            lamport,
            timed,
            batch: extra,
        } = message;
        let lamport = match lamport {
            Some(lamport) => lamport,
            None => self.next_lamport(&peer)?,
        };
        let sent_at_ms = now_ms();
        let expires_at_ms = match timed {
            true => self
                .inner
                .plugins
                .timers
                .expiry_for(self, Thread::Peer(&peer), sent_at_ms)?,
            false => None,
        };
        let header = Header {
            id,
            to: Destination::Peer(peer),
            sent_at_ms,
            lamport,
            expires_at_ms,
        };
        // The session's new state is written once the message is on its way (below).
        let composed = {
            let _turn = self.inner.olm_turn.lock().await;
            self.compose_unwritten(header, &body, EntryKind::Message)
        };
        let entry = match composed {
            Ok(entry) => entry,
            Err(e) => {
                self.write_sessions();
                return Err(e);
            }
        };
        let stored = StoredMessage {
            id,
            direction: Direction::Out,
            from: self.inner.me,
            peer,
            text,
            sent_at_ms,
            lamport,
            state: MessageState::Pending,
            expires_at_ms,
        };
        let mut batch = Batch::new();
        // The outbox entry first: if a crash keeps only part of this, the message still goes
        // out; the message record (which deduplication and the history look at) last. The
        // conversation index records the clock (see `Store::lamport`).
        batch.put_outbox(&entry);
        batch.extend(extra);
        batch.put_message(&stored);
        // Watched before it can leave.
        let first = wait.map(|_| self.watch_first_outcome(id));
        // The message may leave before its records are written and while they are flushed:
        // the writes, the flush and the trip to the recipient take their time side by side.
        // Its attempt settles only once the records are on disk (see `settle`), and a session
        // whose new state a crash loses never seals again (see `crypto::olm`). The caller
        // hears of it once it is on disk.
        // No await from the seal to here: a send dropped in between (its caller gone) would
        // leave the session's new state unwritten, and a clean stop would then keep the older
        // one, which seals again with message keys already used.
        let dispatched = self.write_and_dispatch(entry, batch);
        self.write_sessions();
        if let Err(e) = dispatched {
            self.settled_first(&id);
            return Err(e);
        }
        self.inner.store.flush().await?;
        let state = match (wait, first) {
            (Some(wait), Some(first)) => self.first_outcome(id, first, wait).await,
            _ => MessageState::Pending,
        };
        Ok(Sent {
            id: id.to_string(),
            state,
            note: None,
        })
    }

    /// Applies `batch`, which records the new outgoing message `entry` (not flushed), and starts
    /// its first attempt. When nothing else is being delivered the request leaves at once, even
    /// before `batch` is applied (the attempt settles only after it is); otherwise the entry
    /// goes to the outbox loop, which batches what queues behind busy requests.
    fn write_and_dispatch(&self, entry: OutboxEntry, batch: Batch) -> Result<(), NodeError> {
        let lone = match entry.envelope.to {
            // Receipts may take another road (see `attempt_peer`); an unsealed message waits
            // for a session (see `seal_pending`).
            Destination::Peer(peer) if entry.kind != EntryKind::Receipt && !entry.unsealed => {
                self.outbox().claim_idle(now_ms(), &entry).then_some(peer)
            }
            _ => None,
        };
        let Some(peer) = lone else {
            self.inner.store.apply_in_order(batch)?;
            self.schedule(entry);
            return Ok(());
        };
        let Route { addrs, relays, .. } = self.route(peer);
        let id = entry.envelope.id;
        let (go, ready) = tokio::sync::oneshot::channel();
        let request = Message::Valid(dm::Request::new(self.req_id(), entry.envelope.clone()));
        let entries = vec![entry];
        let node = self.clone();
        // Spawned before the request is handed over: the swarm task, woken by the request, then
        // runs next on this thread (a task spawned after it would take its place and push it to
        // the back of the queue).
        self.spawn_attempt(async move {
            if let Ok((direct, written)) = ready.await {
                node.settle(peer, entries, &relays, written, direct).await;
            }
        });
        let direct = self.inner.net.send_dm(peer, addrs, request);
        if let Err(e) = self.inner.store.apply_in_order(batch) {
            // Not recorded: forget the attempt (its answer, if any, goes nowhere).
            self.outbox().remove(&id);
            self.release_peer_slot(&peer);
            return Err(e.into());
        }
        // Taken before the caller's flush begins (see `settle`).
        let _ = go.send((direct, self.inner.store.durable_mark()));
        Ok(())
    }

    /// Writes the sessions' new states left by [`Node::compose_unwritten`]. A failure is logged
    /// and marks the store to start unclean (`Olm::write_unwritten`); the message it sealed is
    /// already on its way.
    fn write_sessions(&self) {
        if let Err(e) = self.olm().write_unwritten() {
            tracing::error!(error = %e, "cannot write the new state of a session");
        }
    }

    /// Forgets an outbox entry that was deleted from the store (an expired message).
    pub(crate) fn forget_outbox(&self, id: &MessageId) {
        self.outbox().remove(id);
    }

    /// An attempt to `peer` ended: its request slot is free for what queued behind it.
    fn release_peer_slot(&self, peer: &PeerId) {
        self.outbox().peer_done(peer);
        self.inner.outbox_wake.notify_one();
    }

    fn schedule(&self, entry: OutboxEntry) {
        self.outbox().insert(entry);
        self.inner.outbox_wake.notify_one();
    }

    /// A conversation (by contact name or peer id), or every message when `with` is `None`.
    pub fn messages(&self, with: Option<&str>) -> Result<Vec<MessageView>, NodeError> {
        let plugins = &self.inner.plugins;
        let mut views = plugins
            .files
            .with_attachments(self, self.messages_without_files(with)?);
        self.name_messages(&mut views);
        plugins.timers.with_lines(self, &mut views);
        Ok(views)
    }

    fn messages_without_files(&self, with: Option<&str>) -> Result<Vec<MessageView>, NodeError> {
        let rooms = &self.inner.plugins.rooms;
        if let Some(room) = with.map(|w| rooms.target(self, w)).transpose()?.flatten() {
            return rooms.messages(self, &room);
        }
        let mut peers = match with {
            Some(who) => vec![self.resolve(who)?],
            None => self.inner.store.conversations()?,
        };
        // A stranger's messages wait in the requests list until it is accepted: they are left
        // out of the overview, and shown when the user names the peer (to read a request before
        // accepting or blocking it; reading sends it no receipt).
        if with.is_none() {
            peers.retain(|p| !self.inner.plugins.gate.is_request(p));
        }
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.inner.store.conversation(&peer)?);
        }
        if with.is_none() {
            out.sort_by_key(|m| (m.sent_at_ms, m.lamport));
            let mut views: Vec<MessageView> = out.into_iter().map(Into::into).collect();
            views.extend(rooms.all_messages(self)?);
            views.sort_by_key(|m| m.sent_at_ms);
            return Ok(views);
        }
        Ok(out.into_iter().map(Into::into).collect())
    }

    /// Marks a conversation read and, unless turned off, sends `Read` receipts.
    /// Returns how many messages were newly read.
    pub async fn read(&self, with: &str) -> Result<usize, NodeError> {
        let plugins = &self.inner.plugins;
        if let Some(room) = plugins.rooms.target(self, with)? {
            plugins.presence.user_active(self);
            return plugins.rooms.read(self, &room).await;
        }
        let peer = self.resolve(with)?;
        plugins.presence.user_active(self);
        if plugins.gate.is_request(&peer) {
            // Not shown yet, so not read: no receipt goes to a stranger before it is accepted.
            return Ok(0);
        }
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
        if self.settings().read_receipts {
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
            let entry = self.compose(header, &body, EntryKind::Receipt)?;
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
            let reason = match m.state {
                MessageState::Pending => self.pending_reason(&m.id),
                MessageState::Failed => self.inner.store.outgoing_failure(&m.id)?,
                _ => None,
            };
            let members = self.inner.plugins.rooms.member_states(self, &m.id);
            let member_names = members
                .keys()
                .filter_map(|p| Some((p.clone(), self.name_of(&p.parse().ok()?)?)))
                .collect();
            return Ok(StatusView {
                id: m.id.to_string(),
                state: m.state,
                members,
                member_names,
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
                    member_names: HashMap::new(),
                    reason: None,
                });
            }
        }
        if let Some(expired) = self.inner.store.expired(&parsed)? {
            return Ok(StatusView {
                id: id.to_owned(),
                state: expired.state,
                members: HashMap::new(),
                member_names: HashMap::new(),
                reason: Some("deleted: its disappearing-message timer ran out".into()),
            });
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
                net::Event::InboundDm { peer, stream } => self.spawn_serve_dm(peer, stream),
                net::Event::Connected { peer } => {
                    if self.standing(&peer) == admission::Standing::Contact {
                        self.inner.net.trust(&peer);
                    }
                    self.reconnected(peer)
                }
                net::Event::RelayConnected { relay } => {
                    self.inner.plugins.presence.wake();
                    let node = self.clone();
                    work.spawn(async move {
                        node.fetch_mailbox(relay).await;
                        node.publish_keys(relay).await;
                    });
                }
                net::Event::InboundKeys {
                    peer,
                    request,
                    channel,
                } => {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        break;
                    };
                    let node = self.clone();
                    work.spawn(async move {
                        node.serve_keys(peer, request, channel).await;
                        drop(permit);
                    });
                }
                // Gossip, presence and file requests: the features serve them.
                event => {
                    let Some(served) = self.feature_serving(event) else {
                        continue;
                    };
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        break;
                    };
                    work.spawn(async move {
                        served.await;
                        drop(permit);
                    });
                }
            }
        }
        work.shutdown().await;
        let inbound = self
            .inner
            .inbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut inbound) = inbound {
            inbound.shutdown().await;
        }
    }

    /// The work of the feature that serves `event`, if one does.
    fn feature_serving(
        &self,
        event: net::Event,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        let mut event = Box::new(event);
        for feature in self.inner.plugins.all() {
            match feature.serve(self, event) {
                Ok(work) => return Some(work),
                Err(unserved) => event = unserved,
            }
        }
        tracing::debug!(?event, "no feature serves this network event");
        None
    }

    /// Serves an inbound `/kith/dm/1` stream on a task of its own, if `peer` has room for one
    /// ([`admission`]).
    fn spawn_serve_dm(&self, peer: PeerId, stream: libp2p::Stream) {
        let standing = self.standing(&peer);
        let ticket = match self.inner.admission.admit(peer, standing) {
            Ok(ticket) => ticket,
            Err(full) => {
                // The sender sees its stream reset and tries again later.
                tracing::debug!(%peer, ?standing, limit = full.name(), "no room for an inbound dm stream; dropping it");
                return;
            }
        };
        let node = self.clone();
        let mut inbound = self.inner.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let Some(inbound) = inbound.as_mut() else {
            return; // Shutting down.
        };
        while inbound.try_join_next().is_some() {}
        inbound.spawn(async move {
            let _ticket = ticket;
            node.serve_dm(peer, standing, stream).await
        });
    }

    /// Whether each of `peer`'s connections runs on the newcomers' lane (`true`: a stranger's)
    /// or on the node's runtime (a contact's or a home relay's).
    pub fn on_newcomers_lane(&self, peer: &PeerId) -> Vec<bool> {
        self.inner.net.on_newcomers_lane(peer)
    }

    /// Inbound `/kith/dm/1` streams being served, all peers together.
    pub fn inbound_dm_streams(&self) -> usize {
        self.inner.admission.len()
    }

    /// Whether `peer` is a home relay, a contact or a stranger.
    fn standing(&self, peer: &PeerId) -> admission::Standing {
        if self.inner.home_relays.contains_key(peer) {
            admission::Standing::Relay
        } else if self
            .inner
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(peer)
        {
            admission::Standing::Contact
        } else {
            admission::Standing::Stranger
        }
    }

    /// Serves one inbound `/kith/dm/1` stream: the request, then the answer once what it
    /// carries is on disk. A slot (of `max_in_flight`) is taken only once the request is read,
    /// so that peers who open streams and send nothing (or slowly) hold up no one else. A
    /// stranger's request must also fit the strangers' rate and take one of their few slots.
    async fn serve_dm(
        &self,
        peer: PeerId,
        standing: admission::Standing,
        mut stream: libp2p::Stream,
    ) {
        let request = match net::read_dm(&mut stream).await {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "inbound dm request not read");
                return;
            }
        };
        let mut _stranger_slot = None;
        if standing == admission::Standing::Stranger {
            // Undecodable requests are not rated: they are struck, which bans their sender.
            let rated = match &request {
                Message::Valid(request) => self
                    .inner
                    .stranger_rate
                    .take(request.len(), now_ms())
                    .err()
                    .map(|wait| (request.req_id, wait)),
                _ => None,
            };
            if let Some((req_id, wait)) = rated {
                let busy = dm::Response::Rejected {
                    req_id,
                    reason: Reject::Busy {
                        retry_after_ms: wait,
                    },
                };
                if let Err(e) = net::answer_dm(stream, busy).await {
                    tracing::debug!(%peer, error = %e, "dm answer not sent");
                }
                return;
            }
            let Ok(slot) = self.inner.stranger_slots.acquire().await else {
                return;
            };
            _stranger_slot = Some(slot);
        }
        let Ok(_slot) = self.inner.inbound_slots.acquire().await else {
            return;
        };
        let response = self.handle_dm(peer, request).await;
        if let Err(e) = net::answer_dm(stream, response).await {
            // The sender hears nothing and tries again; the copy it sends is dropped as a
            // duplicate.
            tracing::debug!(%peer, error = %e, "dm answer not sent");
        }
    }

    /// Logs an undecodable `protocol` request of `peer` (at most one WARN line a minute per
    /// peer, and first lines for at most 20 new peers a minute: a stranger cycling identities
    /// must not fill the disk through the log), and counts it against `peer` when it is a
    /// stranger (not a contact, not a home relay): one that keeps sending them is banned for a
    /// while ([`kith_relay::strikes`]). A frame refused for want of room (`Busy`) does not count.
    pub(crate) async fn malformed_from(
        &self,
        peer: PeerId,
        protocol: &str,
        reason: &Reject,
        detail: &str,
    ) {
        {
            let mut warnings = self
                .inner
                .malformed_warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            kith_relay::warn_refused!(warnings, now_ms(), peer, protocol, %reason, detail, "refusing an undecodable request");
        }
        if !kith_relay::strikes::is_strike(reason)
            || peer == self.peer_id()
            || self.contact_of(&peer).is_some()
            || self.inner.home_relays.contains_key(&peer)
        {
            return;
        }
        self.inner.net.strike(peer).await;
    }

    /// The answer to a `/kith/dm/1` request from `peer`.
    async fn handle_dm(&self, peer: PeerId, request: Message<dm::Request>) -> dm::Response {
        match request {
            Message::Valid(request) if !request.is_within_limits() => {
                tracing::warn!(%peer, envelopes = request.len(), "refusing an oversize dm batch");
                dm::Response::Rejected {
                    req_id: request.req_id,
                    reason: Reject::TooLarge {
                        max: dm::MAX_BATCH as u64,
                    },
                }
            }
            Message::Valid(request) => {
                let req_id = request.req_id;
                let outcomes = self.accept_all(peer, request.into_envelopes()).await;
                dm::Response::for_outcomes(req_id, &outcomes)
            }
            Message::Invalid { reason, detail } => {
                self.malformed_from(peer, dm::PROTOCOL, &reason, &detail)
                    .await;
                dm::Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => dm::Response::Rejected {
                req_id: 0,
                reason: Reject::Malformed,
            },
        }
    }

    /// Verifies and stores envelopes that `via` handed us, each on its own merits, with one
    /// flush for all of them; an `Ok` outcome means that envelope is on disk.
    async fn accept_all(&self, via: PeerId, envelopes: Vec<Envelope>) -> Vec<Result<(), Reject>> {
        let mut outcomes = Vec::with_capacity(envelopes.len());
        // Written but not yet flushed: announced (and acknowledged) only after the flush.
        let mut unflushed: Vec<(usize, Option<Fresh>)> = Vec::new();
        // Held until the end: another copy arriving meanwhile is turned away.
        let mut claims = Vec::new();
        // Senders of sealed envelopes: messages of theirs held back may open now.
        let mut sealed_from: Vec<PeerId> = Vec::new();
        for envelope in envelopes {
            let index = outcomes.len();
            if !sealed_from.contains(&envelope.from) {
                sealed_from.push(envelope.from);
            }
            let outcome = match self.check(via, &envelope) {
                Err(reason) => Err(reason),
                Ok(Checked::Group(group)) => {
                    self.inner
                        .plugins
                        .rooms
                        .accept(self, via, group, envelope)
                        .await
                }
                Ok(Checked::Sealed(sealed)) => match self.claim_inbound(&envelope, &mut claims) {
                    Err(reason) => Err(reason),
                    Ok(false) => {
                        unflushed.push((index, batch_duplicate(via, envelope)));
                        Ok(())
                    }
                    Ok(true) => {
                        let staged = {
                            let _turn = self.inner.olm_turn.lock().await;
                            self.stage_sealed(via, envelope, sealed, true)
                        };
                        staged.map(|fresh| {
                            if fresh.as_ref().is_some_and(|f| f.text.is_some()) {
                                // A new message: copies arriving after its flush are duplicates.
                                if let Some(claim) = claims.last_mut() {
                                    claim.stored();
                                }
                            }
                            unflushed.push((index, fresh))
                        })
                    }
                },
                Ok(Checked::Plain(body)) => match self.claim_inbound(&envelope, &mut claims) {
                    Err(reason) => Err(reason),
                    Ok(false) => {
                        unflushed.push((index, batch_duplicate(via, envelope)));
                        Ok(())
                    }
                    Ok(true) => self.stage_plain(via, envelope, body).map(|fresh| {
                        if fresh.as_ref().is_some_and(|f| f.text.is_some()) {
                            // A new message: copies arriving after its flush are duplicates.
                            if let Some(claim) = claims.last_mut() {
                                claim.stored();
                            }
                        }
                        unflushed.push((index, fresh))
                    }),
                },
                Ok(Checked::Resend(ids, new_session)) => self
                    .stage_resend(envelope.from, ids, new_session)
                    .map(|()| unflushed.push((index, None))),
            };
            outcomes.push(outcome);
        }
        if unflushed.is_empty() {
            return outcomes;
        }
        if let Err(e) = self.inner.store.flush().await {
            tracing::error!(error = %e, "cannot store inbound envelopes");
            for (index, _) in unflushed {
                outcomes[index] = Err(Reject::StoreFailed);
            }
            return outcomes;
        }
        for (index, fresh) in unflushed {
            if let Some(fresh) = fresh {
                if let Err(reason) = self.announce(via, fresh).await {
                    outcomes[index] = Err(reason);
                }
            }
        }
        drop(claims);
        for from in sealed_from {
            self.open_held(from).await;
        }
        outcomes
    }

    /// Checks `envelope`'s signature with its sender's cached key.
    pub(crate) fn verify(&self, envelope: &Envelope) -> Result<(), kith_protocol::VerifyError> {
        let key = self
            .inner
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&envelope.from);
        match key {
            Some(key) => envelope.verify_with(&key),
            None => Err(kith_protocol::VerifyError::UnknownKey(envelope.from)),
        }
    }

    /// The checks every inbound envelope passes: signature, recipient, the connection's peer,
    /// expiry and a body we understand.
    fn check(&self, via: PeerId, envelope: &Envelope) -> Result<Checked, Reject> {
        if let Err(e) = self.verify(envelope) {
            tracing::warn!(%via, from = %envelope.from, id = %envelope.id, error = %e, "refusing envelope");
            return Err(inbound::verify_reject(&e));
        }
        let via_home_relay = self.inner.home_relays.contains_key(&via);
        let plugins = &self.inner.plugins;
        match inbound::address(self.inner.me, via, via_home_relay, envelope)? {
            inbound::Addressed::Room(group) => {
                plugins.gate.refuse(self, via, envelope)?;
                Ok(Checked::Group(group))
            }
            inbound::Addressed::Me => {
                plugins.gate.refuse(self, via, envelope)?;
                plugins.timers.check(self, envelope)?;
                inbound::classify(via, envelope)
            }
        }
    }

    /// Claims an inbound one-to-one envelope until it is flushed and announced (see `claims`):
    /// `Ok(true)` to go on and store it, `Ok(false)` when this batch already holds a copy, and
    /// `Busy` while another copy (a relay's push racing the node's own fetch) is being stored:
    /// the sender or relay asks again later and then hears that it is there.
    fn claim_inbound<'a>(
        &'a self,
        envelope: &Envelope,
        claims: &mut Vec<crate::core::claims::Claim<'a>>,
    ) -> Result<bool, Reject> {
        let from = envelope.from;
        match self.inner.claims.claim(from, envelope.id) {
            crate::core::claims::Claimed::Mine(claim) => {
                claims.push(claim);
                Ok(true)
            }
            // Stored a moment ago by another copy, or held by a copy in this batch.
            crate::core::claims::Claimed::Stored => Ok(false),
            crate::core::claims::Claimed::Busy
                if claims.iter().any(|c| c.is(from, envelope.id)) =>
            {
                Ok(false)
            }
            crate::core::claims::Claimed::Busy => {
                tracing::debug!(%from, id = %envelope.id, "another copy is being stored");
                Err(Reject::Busy {
                    retry_after_ms: CLAIMED_RETRY_AFTER_MS,
                })
            }
        }
    }

    /// Writes a one-to-one body that came in the clear (not flushed); `Some` when it is a
    /// chat message new to us.
    fn stage_plain(
        &self,
        via: PeerId,
        envelope: Envelope,
        body: Body,
    ) -> Result<Option<Fresh>, Reject> {
        let from = envelope.from;
        if let Body::Receipt { state, ids } = body {
            return match self.stage_receipt(from, state, ids) {
                Ok(()) => Ok(None),
                Err(Inbound::Refused(reason)) => Err(reason),
                Err(Inbound::Open(_)) => Err(Reject::Malformed),
            };
        }
        let existing = self
            .inner
            .store
            .message(&from, &envelope.id)
            .map_err(|e| store_failed(&e))?;
        if existing.is_some() {
            tracing::debug!(%from, id = %envelope.id, "duplicate delivery");
            // Already stored, but a relay redelivering it wants the sender told again.
            return Ok((via != from).then_some(Fresh {
                envelope,
                text: None,
                file_size: None,
            }));
        }
        let (text, file) = match body {
            Body::Chat { text } => (text, None),
            // A file is stored like a chat message (empty text) plus its attachment record.
            Body::File(file) => (String::new(), Some(file)),
            _ => return Err(Reject::Malformed),
        };
        let mut batch = Batch::new();
        let fresh = match self.stage_chat(&envelope, text, file, &mut batch) {
            Ok(fresh) => fresh,
            Err(Inbound::Refused(reason)) => return Err(reason),
            Err(Inbound::Open(_)) => return Err(Reject::Malformed),
        };
        // The message itself lands last, so a crash part way is redelivered in full; the
        // answer waits for the flush anyway.
        self.inner
            .store
            .apply_in_order(batch)
            .map_err(|e| store_failed(&e))?;
        Ok(Some(fresh))
    }

    /// Opens a sealed envelope and writes what it carries with the session's new state in one
    /// atomic write (not flushed); `Some` when it is a chat message new to us.
    fn stage_sealed(
        &self,
        via: PeerId,
        envelope: Envelope,
        sealed: kith_protocol::envelope::Sealed,
        may_hold: bool,
    ) -> Result<Option<Fresh>, Reject> {
        let from = envelope.from;
        let relayed = via != from;
        let duplicate = |envelope: Envelope| {
            tracing::debug!(%from, id = %envelope.id, "duplicate delivery");
            // Already stored, but a relay redelivering it wants the sender told again.
            relayed.then_some(Fresh {
                envelope,
                text: None,
                file_size: None,
            })
        };
        // A copy of a message already stored is not opened again (its key is used up).
        let existing = self
            .inner
            .store
            .message(&from, &envelope.id)
            .map_err(|e| store_failed(&e))?;
        let undecryptable = || {
            self.inner
                .olm
                .is_undecryptable(&from, &envelope.id)
                .unwrap_or(false)
        };
        if existing.is_some() && !undecryptable() {
            return Ok(duplicate(envelope));
        }
        if self
            .inner
            .olm
            .was_opened(&from, &envelope.id)
            .map_err(|e| store_failed(&e))?
        {
            return Ok(duplicate(envelope));
        }
        if may_hold {
            let verdict = self
                .inner
                .olm
                .verdict(&from, &sealed)
                .map_err(|e| store_failed(&e))?;
            if verdict == crate::core::crypto::order::Verdict::Hold {
                return self.hold_sealed(envelope, &sealed, relayed);
            }
        }
        let sealed_receipt = sealed.receipt;
        let opened = self
            .inner
            .olm
            .open(&from, &envelope.id, &sealed, |body, batch| {
                match body {
                    Body::Chat { text } => self.stage_chat(&envelope, text, None, batch).map(Some),
                    // A file is stored like a chat message (empty text) plus its attachment record.
                    Body::File(file) => self
                        .stage_chat(&envelope, String::new(), Some(file), batch)
                        .map(Some),
                    Body::Receipt { state, ids } => {
                        self.stage_receipt(from, state, ids)?;
                        Ok(None)
                    }
                    Body::Timer { secs, admins_only } => {
                        let line = self
                            .inner
                            .plugins
                            .timers
                            .stage(self, &envelope, None, secs, admins_only, batch)
                            .map_err(Inbound::Refused)?;
                        self.stage_chat(&envelope, line, None, batch).map(Some)
                    }
                    _ => Err(Inbound::Refused(Reject::Malformed)),
                }
            });
        match opened {
            Ok(fresh) => Ok(fresh),
            Err(Inbound::Refused(reason)) => Err(reason),
            Err(Inbound::Open(OpenError::Store(e))) => Err(store_failed(&e)),
            Err(Inbound::Open(
                e @ (OpenError::Malformed(_) | OpenError::BadInner(_) | OpenError::Identity(_)),
            )) => {
                tracing::warn!(%via, %from, id = %envelope.id, error = %e, "refusing a sealed envelope");
                Err(Reject::Malformed)
            }
            // A receipt that does not open is dropped: receipts are not kept to be sent again,
            // and a lost one only leaves a tick behind.
            Err(Inbound::Open(e @ (OpenError::KeyGone | OpenError::Undecryptable(_))))
                if sealed_receipt =>
            {
                tracing::warn!(%via, %from, id = %envelope.id, error = %e, "dropping a receipt that does not decrypt");
                Ok(None)
            }
            // Neither stored nor opened before: its key went (it came too far out of order).
            Err(Inbound::Open(OpenError::KeyGone)) => self
                .stage_undecryptable(envelope, "its message key is gone", false)
                .map(|()| None),
            Err(Inbound::Open(OpenError::Undecryptable(why))) => self
                .stage_undecryptable(envelope, &why, true)
                .map(|()| None),
        }
    }

    /// Adds an opened chat envelope to `batch`, which the crypto module writes atomically with
    /// the session that opened it.
    fn stage_chat(
        &self,
        envelope: &Envelope,
        text: String,
        file: Option<FileRef>,
        batch: &mut Batch,
    ) -> Result<Fresh, Inbound> {
        let from = envelope.from;
        self.observe_lamport(&from, envelope.lamport)
            .map_err(|e| Inbound::Refused(store_failed(&e)))?;
        let msg = self.received(envelope, text.clone());
        let bytes = envelope.body.len();
        self.inner.plugins.gate.note(self, &from, bytes, batch);
        let file_size = file.as_ref().map(|f| f.size);
        if let Some(file) = file {
            self.inner
                .plugins
                .files
                .put_incoming(self, batch, envelope, file, None);
        }
        batch.put_message(&msg);
        Ok(Fresh {
            envelope: envelope.clone(),
            text: Some(text),
            file_size,
        })
    }

    /// Tells the watchers about a flushed chat envelope, starts its download, and sends the
    /// receipt a relay's sender is waiting for.
    async fn announce(&self, via: PeerId, fresh: Fresh) -> Result<(), Reject> {
        let Fresh {
            envelope,
            text,
            file_size,
        } = fresh;
        let plugins = &self.inner.plugins;
        if let Some(text) = text {
            match plugins.gate.announce(self, &envelope.from) {
                Some(request) => request.into_iter().for_each(|e| self.emit(e)),
                None => self.emit(self.message_event(&envelope, None, text)),
            }
        }
        if let Some(size) =
            file_size.filter(|_| plugins.gate.auto_download_from(self, &envelope.from))
        {
            plugins.files.received(self, envelope.id, size).await;
        }
        if via != envelope.from {
            // The sender did not see our answer: tell it with a receipt.
            self.queue_receipts(envelope.from, ReceiptState::Delivered, &[envelope.id])
                .await
                .map_err(|e| store_failed(&e))?;
        }
        Ok(())
    }

    /// Applies a checked receipt to our outgoing messages (not flushed).
    fn stage_receipt(
        &self,
        from: PeerId,
        state: ReceiptState,
        ids: Vec<MessageId>,
    ) -> Result<(), Inbound> {
        for id in ids {
            let Ok(Some(msg)) = self.inner.store.outgoing(&id) else {
                continue;
            };
            if let Ok(Some(_)) = self.inner.store.message_group(&id) {
                // Group message: the receipt moves this member's state only.
                self.inner
                    .plugins
                    .rooms
                    .advance_members(self, &id, Some(&from), state.into())
                    .map_err(|e| Inbound::Refused(store_failed(&e)))?;
                continue;
            }
            if msg.peer != from {
                tracing::warn!(%from, %id, "ignoring a receipt for another peer's message");
                continue;
            }
            self.advance(&msg.from, &id, state.into())
                .map_err(|e| Inbound::Refused(store_failed(&e)))?;
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
            self.emit(self.receipt_event(id, msg.peer, None, msg.state));
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
            after = items.last().map(|item| item.seq).or(after);
            let (numbers, envelopes): (Vec<u64>, Vec<Envelope>) = items
                .into_iter()
                .map(|item| (item.seq, item.envelope))
                .unzip();
            // One flush for the whole batch.
            let outcomes = self.accept_all(relay, envelopes).await;
            for (seq, outcome) in numbers.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => seqs.push(seq),
                    Err(reason) if reason.is_retryable() => {}
                    // A blocked peer or a stranger (`strangers`): dropped, logged there.
                    Err(Reject::Refused) => seqs.push(seq),
                    Err(reason) => {
                        tracing::warn!(%relay, seq, %reason, "dropping a bad mailbox entry");
                        seqs.push(seq);
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
                self.inner
                    .last_fetch_ms
                    .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    }

    /// When a mailbox fetch last completed (unix ms), if one did.
    pub(crate) fn last_fetch_ms(&self) -> Option<u64> {
        match self
            .inner
            .last_fetch_ms
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Envelopes waiting in the outbox (messages and receipts).
    pub(crate) fn outbox_len(&self) -> usize {
        self.outbox().len()
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
                            self.publish_keys(*relay).await;
                        }
                    }
                }
            }
        }
    }

    // ---- outbox -----------------------------------------------------------------------------

    /// Drives the outbox ([`outbox`]): hands due entries to attempts as request slots free up,
    /// and sleeps until the next one is due or something wakes it.
    async fn outbox_loop(self, mut shutdown: Signal) {
        loop {
            let now = now_ms();
            let due = self.outbox().poll_due(now);
            for entry in due {
                if let Some(why) = self.outbox_given_up(&entry, now) {
                    self.finish(&entry, Outcome::Failed(why));
                } else if let Some(until) = self.held_until(&entry, now) {
                    self.outbox().wait(&entry, until);
                } else {
                    self.outbox().queue(entry);
                }
            }
            loop {
                let Some(transmit) = self.outbox().poll_transmit() else {
                    break;
                };
                let node = self.clone();
                match transmit {
                    Transmit::Peer { to, entries } => self.spawn_attempt(async move {
                        node.attempt_peer(to, entries).await;
                    }),
                    Transmit::Group(entry) => self.spawn_attempt(async move {
                        node.attempt_group(entry).await;
                    }),
                }
            }
            // Finished attempts only need reaping; each one wakes us itself.
            while self
                .inner
                .attempts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_join_next()
                .is_some()
            {}
            let sleep = match self.outbox().poll_timeout() {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = self.inner.outbox_wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        let mut attempts = std::mem::take(
            &mut *self
                .inner
                .attempts
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        attempts.shutdown().await;
    }

    /// Runs a delivery attempt among the node's attempts (stopped at shutdown), holding one of
    /// the outbox's request slots. Its end frees the slot and wakes the outbox loop: the slot
    /// may be what a queued message waits for.
    fn spawn_attempt(&self, attempt: impl std::future::Future<Output = ()> + Send + 'static) {
        let node = self.clone();
        self.inner
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(async move {
                attempt.await;
                node.outbox().request_done();
                node.inner.outbox_wake.notify_one();
            });
    }

    /// One delivery attempt for an entry addressed to a group.
    async fn attempt_group(&self, entry: OutboxEntry) {
        let Destination::Group(group) = entry.envelope.to else {
            return;
        };
        let outcome = self
            .inner
            .plugins
            .rooms
            .deliver(self, &entry.envelope, group)
            .await;
        self.finish(&entry, outcome);
    }

    /// One delivery attempt for outbox entries addressed to `to` (holding one of its request
    /// slots, freed once the recipient answered), in one request: direct (or
    /// through its relays' circuits), and for each one the recipient did not take, a deposit at
    /// its home relays.
    async fn attempt_peer(&self, to: PeerId, entries: Vec<OutboxEntry>) {
        let Route {
            contact,
            addrs,
            relays,
        } = self.route(to);
        // A receipt for a peer we know no direct route to (a group member who is not a contact)
        // goes straight to the relays, which push it to a connected recipient: a group's
        // receipts must not cost one relayed circuit each.
        let is_receipt = |e: &OutboxEntry| e.kind == EntryKind::Receipt;
        let mut entries = self.seal_pending(to, entries, &addrs, &relays).await;
        if entries.iter().any(is_receipt)
            && contact.as_ref().is_none_or(|c| c.addrs.is_empty())
            && !self.inner.net.is_connected(to).await
        {
            let (receipts, rest): (Vec<_>, Vec<_>) = entries.into_iter().partition(is_receipt);
            entries = rest;
            for entry in receipts {
                let outcome = self.deposit(&entry, &relays).await;
                if matches!(outcome, Outcome::Retry(_)) {
                    entries.push(entry);
                } else {
                    self.finish(&entry, outcome);
                }
            }
        }
        // The entries were written before they were queued (perhaps not flushed yet).
        let written = self.inner.store.durable_mark();
        let Some(direct) = self.start_direct(to, &entries, addrs) else {
            self.release_peer_slot(&to);
            return;
        };
        self.settle(to, entries, &relays, written, direct).await;
    }

    /// Where `to` may be reached: its known addresses and relays (ours if it has none listed),
    /// with a circuit through each relay.
    fn route(&self, to: PeerId) -> Route {
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
        Route {
            contact,
            addrs,
            relays,
        }
    }

    /// Hands `entries` to the network as one `/kith/dm/1` request to `to` (it leaves before the
    /// returned future is first polled); `None` if there is nothing to send.
    fn start_direct(
        &self,
        to: PeerId,
        entries: &[OutboxEntry],
        addrs: Vec<Multiaddr>,
    ) -> Option<impl std::future::Future<Output = Result<dm::Response, NetError>> + Send + 'static>
    {
        let (first, more) = entries.split_first()?;
        let request = Message::Valid(dm::Request {
            req_id: self.req_id(),
            envelope: first.envelope.clone(),
            more: more.iter().map(|e| e.envelope.clone()).collect(),
        });
        Some(self.inner.net.send_dm(to, addrs, request))
    }

    /// Waits for the recipient's answer to a direct request carrying `entries`, then settles each
    /// one: delivered, refused for good, or deposited at `relays` when the recipient did not
    /// take it. `written` is a [`Store::durable_mark`] taken after the entries were written:
    /// they are shown delivered only once that is durable. (Taken late, it would wait for a
    /// flush of writes that do not concern them.)
    async fn settle(
        &self,
        to: PeerId,
        entries: Vec<OutboxEntry>,
        relays: &[Multiaddr],
        written: u64,
        direct: impl std::future::Future<Output = Result<dm::Response, NetError>>,
    ) {
        let direct = tokio::time::timeout(self.inner.config.delivery_timeout, direct).await;
        // The request to `to` is over: its slot is free for what queued behind it, while these
        // entries settle (a deposit at the relays, say).
        self.release_peer_slot(&to);
        // Per entry: taken, refused by the recipient (`Ok(reason)`), or not answered.
        let answers: Vec<Result<(), Result<Reject, String>>> = match direct {
            Ok(Ok(response)) => (0..entries.len())
                .map(|i| response.outcome(i).map_err(Ok))
                .collect(),
            Ok(Err(e)) => vec![Err(Err(e.to_string())); entries.len()],
            Err(_) => vec![Err(Err(NetError::Timeout.to_string())); entries.len()],
        };
        // Settled (delivered, or sent through a relay) only once the sender's own records of
        // them are on disk; by now the flush that covers them has usually ended.
        if let Err(e) = self.inner.store.durable(written).await {
            tracing::error!(%to, error = %e, "cannot store outgoing messages");
            for entry in &entries {
                self.finish(entry, Outcome::Retry(e.to_string()));
            }
            return;
        }
        let results = futures::future::join_all(entries.iter().zip(answers).map(
            |(entry, answer)| async move {
                let outcome = match answer {
                    Ok(()) => Outcome::Delivered,
                    Err(Ok(reason)) if !reason.is_retryable() => {
                        tracing::warn!(%to, id = %entry.envelope.id, %reason, "recipient refused the message");
                        Outcome::Failed(format!("recipient refused it: {reason}"))
                    }
                    Err(why) => {
                        let why = why.map_or_else(|e| e, |reason| reason.to_string());
                        tracing::debug!(%to, id = %entry.envelope.id, %why, "direct delivery failed");
                        match self.no_deposit_reason(to, &entry.envelope, entry.kind) {
                            Some(reason) => Outcome::Retry(reason),
                            None => self.deposit(entry, relays).await,
                        }
                    }
                };
                (entry, outcome)
            },
        ))
        .await;
        for (entry, outcome) in results {
            self.finish(entry, outcome);
        }
    }

    /// Deposits an entry's envelope at the recipient's home relays; `Sent` if at least one
    /// stored it.
    async fn deposit(&self, entry: &OutboxEntry, relays: &[Multiaddr]) -> Outcome {
        let envelope = &entry.envelope;
        // Relays cannot read bodies: tell them which deposits are receipts, shed first under load.
        let class = match entry.kind {
            EntryKind::Receipt => mailbox::DepositClass::Receipt,
            EntryKind::Message | EntryKind::Control => mailbox::DepositClass::Message,
        };
        let mut stored = false;
        let mut reasons = Vec::new();
        for relay in relays {
            let Some(relay_peer) = peer_of(relay) else {
                continue;
            };
            if let Some(until) = self.held_at(relay_peer, envelope) {
                reasons.push(format!("{relay} asked to wait until {until} (unix ms)"));
                continue;
            }
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
                Ok(mailbox::Response::Stored { .. }) => {
                    stored = true;
                    self.deposit_stored(relay_peer, envelope);
                }
                Ok(mailbox::Response::Rejected {
                    reason,
                    retry_after_ms,
                    ..
                }) => {
                    tracing::debug!(%relay, %reason, ?retry_after_ms, "relay refused a deposit");
                    if let Some(after) = retry_after_ms.filter(|_| reason.is_retryable()) {
                        self.deposit_refused(relay_peer, envelope, after);
                    }
                    if !reason.is_retryable() {
                        self.deposits_done(envelope);
                        return Outcome::Failed(format!("relay refused it: {reason}"));
                    }
                    reasons.push(reason.to_string());
                }
                Ok(other) => reasons.push(format!("unexpected answer {other:?}")),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        self.deposits_done(envelope);
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

    pub(crate) fn finish(&self, entry: &OutboxEntry, outcome: Outcome) {
        let outcome = self.retry_or_give_up(entry, outcome);
        let id = entry.envelope.id;
        let is_chat = entry.kind == EntryKind::Message;
        if self.replaced(entry, &outcome) {
            return;
        }
        let state = match &outcome {
            Outcome::Delivered => Some(MessageState::Delivered),
            Outcome::Sent if is_chat && self.sent_waits_for_upload(&id) => None,
            Outcome::Sent => Some(MessageState::Sent),
            _ => None,
        };
        let mut batch = Batch::new();
        match outcome {
            Outcome::Delivered | Outcome::Sent => {
                batch.remove_outbox(&id);
                self.outbox().settled(&id);
            }
            Outcome::Failed(reason) => {
                batch.remove_outbox(&id);
                self.outbox().settled(&id);
                if is_chat {
                    // Shown by `kith status`, with the reason.
                    match self.inner.store.fail(&self.inner.me, &id, &reason) {
                        Ok(Some(msg)) => {
                            self.emit(self.receipt_event(&id, msg.peer, None, msg.state))
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(%id, error = %e, "cannot record a failure"),
                    }
                }
                self.emit(NodeEvent::Failed {
                    id: id.to_string(),
                    reason,
                });
            }
            Outcome::Retry(reason) => {
                let jitter: f64 = rand::thread_rng().gen();
                // Tried once more at its deadline at the latest, then given up.
                let deadline = self.outbox_deadline_ms(entry);
                let next = self.outbox().retry(entry, now_ms(), jitter, deadline);
                tracing::debug!(%id, attempts = next.attempts, due_ms = next.due_ms, %reason, "will retry");
                if is_chat && matches!(entry.envelope.to, Destination::Peer(_)) {
                    // Shown by `kith status` while the message is pending.
                    self.set_pending_reason(id, Some(reason.clone()));
                }
                if is_chat {
                    self.emit(NodeEvent::Retry {
                        id: id.to_string(),
                        reason,
                        next_attempt_ms: next.due_ms,
                    });
                }
                batch.put_outbox(&next);
            }
        }
        // Recorded (and announced) once the schedule let go of it: whoever hears of it may send
        // again at once.
        if let (Some(state), true) = (state, is_chat) {
            let recorded = match entry.envelope.to {
                // The relay holds a copy for every member: each member is `sent`.
                Destination::Group(_) => self
                    .inner
                    .plugins
                    .rooms
                    .advance_members(self, &id, None, state)
                    .map_err(|e| e.to_string()),
                Destination::Peer(_) => self
                    .advance(&self.inner.me, &id, state)
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = recorded {
                tracing::error!(%id, error = %e, "cannot record a delivery");
            }
        }
        // Losing this write in a crash only means one more (deduplicated) attempt.
        if let Err(e) = self.inner.store.apply(batch) {
            tracing::error!(%id, error = %e, "cannot update the outbox");
        }
        self.settled_first(&id);
        self.inner.outbox_wake.notify_one();
    }
}

impl Node {
    /// The outbox's copies of `unsealed` entries become their `sealed` versions (same ids, due
    /// times and attempts), unless a re-send took their place meanwhile: an attempt's outcome
    /// then settles the entry it carried, not a copy that no longer leaves.
    pub(crate) fn sealed_in_place(&self, sealed: &[(OutboxEntry, OutboxEntry)]) {
        let mut outbox = self.outbox();
        for (unsealed, entry) in sealed {
            outbox.seal_in_place(unsealed, entry);
        }
    }

    /// Records the `sent` tick of outgoing message `id` that waited for its file's upload
    /// (for a group's, every member's).
    pub(crate) fn record_sent(&self, id: &MessageId, group: bool) {
        let recorded = if group {
            self.inner
                .plugins
                .rooms
                .advance_members(self, id, None, MessageState::Sent)
                .map_err(|e| e.to_string())
        } else {
            self.advance(&self.inner.me, id, MessageState::Sent)
                .map_err(|e| e.to_string())
        };
        if let Err(e) = recorded {
            tracing::error!(%id, error = %e, "cannot record a sent tick");
        }
    }

    /// Whether the `sent` tick of message `id` waits for its file's upload: `sent` means a
    /// relay holds the message and everything the recipient needs to open it.
    fn sent_waits_for_upload(&self, id: &MessageId) -> bool {
        self.inner.plugins.files.holds_sent(self, id)
    }

    /// Whether a re-send (see `crypto::session`) took the place of `entry` in the outbox while
    /// this attempt ran: the new entry stays, due; only the old copy's tick is recorded.
    fn replaced(&self, entry: &OutboxEntry, outcome: &Outcome) -> bool {
        let id = entry.envelope.id;
        if !self.outbox().take_replaced(entry) {
            return false;
        }
        let state = match outcome {
            Outcome::Delivered => Some(MessageState::Delivered),
            Outcome::Sent if self.sent_waits_for_upload(&id) => None,
            Outcome::Sent => Some(MessageState::Sent),
            _ => None,
        };
        if let (Some(state), EntryKind::Message, Destination::Peer(_)) =
            (state, entry.kind, entry.envelope.to)
        {
            if let Err(e) = self.advance(&self.inner.me, &id, state) {
                tracing::error!(%id, error = %e, "cannot record a delivery");
            }
        }
        self.settled_first(&id);
        self.inner.outbox_wake.notify_one();
        true
    }
}

/// Why an inbound sealed envelope was not taken.
pub(crate) enum Inbound {
    /// It did not open.
    Open(OpenError),
    /// What it carries is refused.
    Refused(Reject),
}

impl From<OpenError> for Inbound {
    fn from(e: OpenError) -> Self {
        Inbound::Open(e)
    }
}

/// An inbound chat envelope written but not yet flushed.
struct Fresh {
    envelope: Envelope,
    /// `None` for a duplicate (nothing to announce).
    text: Option<String>,
    file_size: Option<u64>,
}

/// Most sealed envelopes in one request to a peer when `per_peer` requests may be in flight to
/// it: together they stay within the window a recipient opens a chain's messages in
/// ([`crypto::order::WINDOW`]), however its handling of concurrent requests reorders them.
fn sealed_batch(per_peer: usize) -> usize {
    (crypto::order::WINDOW as usize / per_peer.max(1)).clamp(1, dm::MAX_BATCH)
}

fn store_failed(e: &dyn std::fmt::Display) -> Reject {
    tracing::error!(error = %e, "cannot store an inbound envelope");
    Reject::StoreFailed
}

/// A one-to-one message to send ([`Node::send_to_peer`]).
pub(crate) struct Outgoing {
    /// Its id.
    pub id: MessageId,
    /// What it carries.
    pub body: Body,
    /// Its line in the sender's history.
    pub text: String,
    /// Its Lamport time, if the caller took one already.
    pub lamport: Option<u64>,
    /// Whether it carries the conversation's timer (a timer change itself does not).
    pub timed: bool,
    /// The caller's writes that go with it (a file's records, a timer's).
    pub batch: Batch,
}

/// How one delivery attempt of an outbox entry ended.
pub enum Outcome {
    /// The recipient stored it.
    Delivered,
    /// A relay the recipient fetches from stored it.
    Sent,
    /// Not taken for now; tried again after a backoff (why).
    Retry(String),
    /// Refused for good (why).
    Failed(String),
}
