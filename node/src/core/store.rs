//! The node's durable store: one sled tree with prefixed keys, written in atomic batches and made
//! durable by a flush. A lone flush runs on its caller's thread; flushes asked for while one is
//! under way go to a group-commit flusher (one sync serves every write waiting for it).
//!
//! Key layout (all integers big-endian so that byte order is numeric order):
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `v` | — | schema version (`u32`) |
//! | `stopped-cleanly` | — | empty: the last process closed the store ([`Store::started_clean`]) |
//! | `m/` | from, message id | [`StoredMessage`] |
//! | `i/` | message id | from (for lookups by id alone) |
//! | `c/` | peer, lamport, from, message id | empty: a conversation in display order |
//! | `l/` | peer | the conversation's Lamport clock (`u64`) |
//! | `o/` | message id | [`OutboxEntry`]: envelopes waiting for delivery |
//! | `K/` | contact's peer id | [`Contact`] (one name per peer; names unique) |
//! | `G/` | group id | the group's [`State`](kith_protocol::group::State) as last validated |
//! | `gc/` | group id, lamport, from, message id | empty: a group conversation in display order |
//! | `gm/` | message id | group id: the message belongs to a group conversation |
//! | `gs/` | message id | per-member states of an outgoing group message |
//! | `gl/` | group id | the group conversation's Lamport clock (`u64`) |
//! | `a/` | message id | the message's attachment record (the file feature) |
//! | `f/` | message id | why an outgoing message is `failed` (UTF-8) |
//! | `R/` | peer | a stranger whose messages wait in the requests list (the strangers feature) |
//! | `B/` | peer | a blocked peer (the strangers feature) |
//! | `x/` | (the crypto module's own layout) | Olm account, sessions and peers' identity keys ([`crate::core::crypto`]) |
//! | `ex/` | deadline, from, message id | empty: messages of temporary chats by the time they are deleted (the temporary-chats feature) |
//! | `et/` | message id | [`Expired`]: what is left of a deleted message (its final state) |
//! | `T/` | peer | [`TimerRecord`]: a one-to-one conversation's timer |
//! | `Tg/` | group id | [`TimerRecord`]: a group conversation's timer |
//! | `tl/` | message id | the timer a history line announces (`Option<u64>` seconds) |
//!
//! A peer id is stored as its bytes behind a one-byte length, so keys of different peers never
//! interleave.
//!
//! The record (`m/`) and outbox entry (`o/`) of a message of a temporary chat are stored sealed
//! under the key of its expiry bucket (`kith_net::shred`), kept beside the database in
//! `db.expiry-keys`; the sweep destroys a bucket's key once its messages are deleted, so what
//! sled's log still holds of them can no longer be read.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use kith_protocol::group::State as GroupState;
use kith_protocol::{cbor, Envelope, GroupId, MessageId, MessageState, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

/// The schema this release writes. Bump it, and add a migration in [`Store::open`], when the key
/// layout or a value's encoding changes.
///
/// - 2: contacts are keyed by peer id (`K/`) instead of by name (`k/`); [`Store::open`] moves
///   contacts of a version-1 store.
pub const SCHEMA_VERSION: u32 = 2;

/// Largest value this store writes or reads back.
const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode: written by a newer release, or damaged.
    #[error("store: damaged value under {key}: {detail}")]
    Damaged {
        /// The key, printed.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// The store was written by a newer release.
    #[error("store schema {found} is newer than this release understands ({SCHEMA_VERSION}); upgrade kith")]
    NewerSchema {
        /// The version on disk.
        found: u32,
    },
    /// The flusher task has stopped (the node is shutting down).
    #[error("store is shutting down")]
    Closed,
    /// The expiry key file could not be read or replaced.
    #[error("store: {0}")]
    Keys(#[from] kith_net::shred::KeysError),
}

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Received.
    In,
    /// Sent by this node.
    Out,
}

/// One chat message as the node keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The sender's id for it.
    pub id: MessageId,
    /// In or out.
    pub direction: Direction,
    /// The sender.
    pub from: PeerId,
    /// The other side of the conversation.
    pub peer: PeerId,
    /// The text.
    pub text: String,
    /// The sender's clock.
    pub sent_at_ms: u64,
    /// The conversation's logical clock when it was sent.
    pub lamport: u64,
    /// The tick: for outgoing messages what the recipient confirmed; for incoming ones
    /// `delivered` until the user reads it, then `read`.
    pub state: MessageState,
    /// When it disappears, if it is temporary.
    pub expires_at_ms: Option<u64>,
}

impl StoredMessage {
    /// An incoming message as it is first stored: `delivered`, in the sender's conversation.
    pub fn received(envelope: &Envelope, text: String) -> Self {
        Self {
            id: envelope.id,
            direction: Direction::In,
            from: envelope.from,
            peer: envelope.from,
            text,
            sent_at_ms: envelope.sent_at_ms,
            lamport: envelope.lamport,
            state: MessageState::Delivered,
            expires_at_ms: envelope.expires_at_ms,
        }
    }
}

/// An envelope waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The envelope, signed, ready to go (once sealed, see `unsealed`).
    pub envelope: Envelope,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (unix ms).
    pub due_ms: u64,
    /// What it carries: one-to-one bodies are encrypted, so the outbox cannot look.
    #[serde(default)]
    pub kind: EntryKind,
    /// The envelope's body is still the plaintext: it is encrypted for its recipient
    /// ([`crate::core::crypto`]) on an attempt once a session can be had, and never leaves before.
    #[serde(default)]
    pub unsealed: bool,
}

impl OutboxEntry {
    /// A new entry, due now.
    pub fn new(envelope: Envelope, kind: EntryKind, unsealed: bool, now_ms: u64) -> Self {
        Self {
            envelope,
            attempts: 0,
            due_ms: now_ms,
            kind,
            unsealed,
        }
    }
}

/// What an outbox entry carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A chat message or a file: its state moves with the answers.
    #[default]
    Message,
    /// A delivered or read receipt.
    Receipt,
    /// A control message (a re-send request).
    Control,
}

/// A contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The name the user gave it (unique).
    pub name: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Direct addresses to try, as multiaddr strings.
    pub addrs: Vec<String>,
    /// Its home relays, as multiaddr strings ending in `/p2p/<relay>`.
    pub relays: Vec<String>,
}

fn peer_key(prefix: &[u8], peer: &PeerId) -> Vec<u8> {
    let bytes = peer.to_bytes();
    let mut key = Vec::with_capacity(prefix.len() + 1 + bytes.len() + 40);
    key.extend_from_slice(prefix);
    key.push(bytes.len() as u8);
    key.extend_from_slice(&bytes);
    key
}

fn message_key(from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = peer_key(b"m/", from);
    key.extend_from_slice(id.as_bytes());
    key
}

fn conversation_key(peer: &PeerId, lamport: u64, from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = peer_key(b"c/", peer);
    key.extend_from_slice(&lamport.to_be_bytes());
    let from = from.to_bytes();
    key.push(from.len() as u8);
    key.extend_from_slice(&from);
    key.extend_from_slice(id.as_bytes());
    key
}

fn outbox_key(id: &MessageId) -> Vec<u8> {
    let mut key = b"o/".to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn id_key(id: &MessageId) -> Vec<u8> {
    let mut key = b"i/".to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn failure_key(id: &MessageId) -> Vec<u8> {
    let mut key = b"f/".to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn attachment_key(id: &MessageId) -> Vec<u8> {
    let mut key = b"a/".to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Store values are plain structs well under the limit; encoding cannot fail for them.
    cbor::encode(value, MAX_VALUE_BYTES).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    cbor::decode(bytes, MAX_VALUE_BYTES).map_err(|e| StoreError::Damaged {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

/// A key and its value, as [`Store::scan_raw`] lists them.
pub(crate) type RawEntry = (Vec<u8>, Vec<u8>);

/// A batch of writes applied atomically by [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    /// Keys to set (`Some`) or remove (`None`), in order.
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Values to seal under an expiry bucket's key before they are written: index into `ops`
    /// and the bucket's end.
    sealed: Vec<(usize, u64)>,
}
impl Batch {
    /// A new, empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `other`'s changes after this batch's, in their order.
    pub fn extend(&mut self, other: Batch) {
        let offset = self.ops.len();
        self.ops.extend(other.ops);
        self.sealed
            .extend(other.sealed.into_iter().map(|(i, end)| (i + offset, end)));
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    /// Sets a value that is sealed under the key of the expiry bucket of `deadline_ms`
    /// (when there is one) as it is written.
    fn insert_expiring(&mut self, key: Vec<u8>, value: Vec<u8>, deadline_ms: Option<u64>) {
        if let Some(at) = deadline_ms {
            self.sealed
                .push((self.ops.len(), kith_net::shred::bucket_end(at)));
        }
        self.insert(key, value);
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// Stores (or overwrites) a message and its conversation index entry.
    ///
    /// The message itself comes last: applied in order ([`Store::apply_in_order`]), a crash
    /// part way leaves at most index entries that point at nothing (skipped when read), and a
    /// redelivery, not seeing the message, writes it all again.
    pub fn put_message(&mut self, msg: &StoredMessage) {
        if let Some(at) = msg.expires_at_ms {
            self.insert(expiry_key(at, &msg.from, &msg.id), Vec::new());
        }
        self.insert(
            conversation_key(&msg.peer, msg.lamport, &msg.from, &msg.id),
            Vec::new(),
        );
        if msg.direction == Direction::Out {
            self.insert(id_key(&msg.id), msg.from.to_bytes());
        }
        self.insert_expiring(
            message_key(&msg.from, &msg.id),
            encode(msg),
            msg.expires_at_ms,
        );
    }

    /// Raises a conversation's Lamport clock.
    pub fn set_lamport(&mut self, peer: &PeerId, lamport: u64) {
        self.insert(peer_key(b"l/", peer), lamport.to_be_bytes().to_vec());
    }

    /// Puts an envelope in the outbox.
    pub fn put_outbox(&mut self, entry: &OutboxEntry) {
        self.insert_expiring(
            outbox_key(&entry.envelope.id),
            encode(entry),
            entry.envelope.expires_at_ms,
        );
    }

    /// Removes an outbox entry.
    pub fn remove_outbox(&mut self, id: &MessageId) {
        self.remove(outbox_key(id));
    }

    /// Stores (or replaces) the attachment record of message `id` (see the file feature).
    pub fn put_attachment<T: Serialize>(&mut self, id: &MessageId, record: &T) {
        self.insert(attachment_key(id), encode(record));
    }

    /// Sets a key of a module with its own layout under its own prefix ([`crate::core::crypto`]).
    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.insert(key, value);
    }

    /// Removes a key of a module with its own layout ([`crate::core::crypto`]).
    pub(crate) fn remove_raw(&mut self, key: Vec<u8>) {
        self.remove(key);
    }

    /// Stores a contact (replacing the contact of the same peer).
    pub fn put_contact(&mut self, contact: &Contact) {
        self.insert(peer_key(b"K/", &contact.peer_id), encode(contact));
    }

    /// Removes the contact of `peer`.
    pub fn remove_contact(&mut self, peer: &PeerId) {
        self.remove(peer_key(b"K/", peer));
    }

    /// Removes a one-to-one message with its index entries and attachment record (a blocked
    /// request's messages, the strangers feature). The message record goes first, so a crash part
    /// way leaves index entries that point at nothing (skipped when read).
    pub fn remove_conversation_message(&mut self, msg: &StoredMessage) {
        self.remove(message_key(&msg.from, &msg.id));
        self.remove(conversation_key(&msg.peer, msg.lamport, &msg.from, &msg.id));
        self.remove(attachment_key(&msg.id));
        if msg.direction == Direction::Out {
            self.remove(id_key(&msg.id));
        }
    }
}

/// Handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tree: sled::Db,
    /// The expiry buckets' keys of temporary chats' values (`kith_net::shred`).
    shred: Arc<std::sync::Mutex<kith_net::shred::Keys>>,
    flusher: mpsc::Sender<oneshot::Sender<Result<(), StoreError>>>,
    /// [`Store::flush`] calls under way, on either road.
    flushing: Arc<AtomicUsize>,
    /// Which flushes began and which ended (see [`Store::durable_mark`]).
    marks: Arc<FlushMarks>,
    closed: watch::Receiver<bool>,
    /// The last process to use the store closed it (see [`Store::started_clean`]).
    clean: bool,
    /// This process must not leave the clean-stop mark ([`Store::mark_unclean`]).
    unclean: Arc<AtomicBool>,
}

/// Resolves once the store is closed: every handle dropped, the last flush done and the
/// database released (so the same directory can be opened again).
pub struct Closed(watch::Receiver<bool>);

impl Closed {
    /// Waits for the close.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|closed| *closed).await;
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its flusher task.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let shred = kith_net::shred::Keys::open(&dir.with_extension("expiry-keys"))?;
        let tree = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        // Taken away, and that on disk, before anything else is written: a crash from now on
        // leaves no mark.
        let clean = tree.remove(CLEAN_STOP_KEY)?.is_some();
        if clean {
            tree.flush()?;
        }
        match tree.get(b"v")? {
            None => {
                tree.insert(b"v", &SCHEMA_VERSION.to_be_bytes())?;
                tree.flush()?;
            }
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Damaged {
                        key: "v".into(),
                        detail: "schema version is not 4 bytes".into(),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema { found });
                }
                if found < 2 {
                    migrate_contacts_by_peer(&tree)?;
                }
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        let (closed_tx, closed) = watch::channel(false);
        // The flusher ends by itself once every handle is dropped; `closed()` waits for that.
        // It is a thread of its own: a flush blocks, and a waiter is then one wakeup away.
        let flushing = tree.clone();
        let marks = Arc::new(FlushMarks::default());
        let loop_marks = marks.clone();
        let unclean = Arc::new(AtomicBool::new(false));
        let loop_unclean = unclean.clone();
        std::thread::Builder::new()
            .name("kith-store-flush".into())
            .spawn(move || flush_loop(flushing, &loop_marks, &loop_unclean, rx, closed_tx))
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(Self {
            tree,
            shred: Arc::new(std::sync::Mutex::new(shred)),
            flusher: tx,
            flushing: Default::default(),
            marks,
            closed,
            clean,
            unclean,
        })
    }

    /// Whether the last process to use this store closed it (every handle dropped and the
    /// last flush done), rather than crashing or being killed. A new store did not start
    /// clean.
    pub fn started_clean(&self) -> bool {
        self.clean
    }

    /// Keeps this process from leaving the clean-stop mark, so that the next start is taken
    /// for one after a crash: for a write that failed after what it recorded was acted on (a
    /// sealed message that left before its session's new state was written).
    pub fn mark_unclean(&self) {
        self.unclean.store(true, Ordering::Release);
    }

    /// A future that resolves once every handle to this store is dropped and it is flushed.
    pub fn closed(&self) -> Closed {
        Closed(self.closed.clone())
    }

    /// Applies `batch` atomically and waits until it is on disk.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.flush().await
    }

    /// Applies `batch` atomically without waiting for the disk (for changes that are safe to
    /// lose in a crash, such as an outbox entry that would only be sent again).
    pub fn apply(&self, mut batch: Batch) -> Result<(), StoreError> {
        self.seal_expiring(&mut batch)?;
        match batch.ops.len() {
            0 => {}
            // sled's `apply_batch` takes a process-wide write lock that waits for every flush
            // in progress: a single change does not need it.
            1 => {
                let Some((key, value)) = batch.ops.pop() else {
                    return Ok(());
                };
                match value {
                    Some(value) => drop(self.tree.insert(key, value)?),
                    None => drop(self.tree.remove(key)?),
                }
            }
            _ => {
                let mut atomic = sled::Batch::default();
                for (key, value) in batch.ops {
                    match value {
                        Some(value) => atomic.insert(key, value),
                        None => atomic.remove(key),
                    }
                }
                self.tree.apply_batch(atomic)?;
            }
        }
        Ok(())
    }

    /// Applies `batch` one change at a time, in the order it was built, without waiting for
    /// the disk. Only for batches built so that any first part of them that survives a crash
    /// is harmless (see [`Batch::put_message`]): it spares sled's `apply_batch`, whose
    /// process-wide lock waits for every flush in progress.
    pub fn apply_in_order(&self, mut batch: Batch) -> Result<(), StoreError> {
        self.seal_expiring(&mut batch)?;
        for (key, value) in batch.ops {
            match value {
                Some(value) => drop(self.tree.insert(key, value)?),
                None => drop(self.tree.remove(key)?),
            }
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk. Concurrent callers share one flush.
    ///
    /// A caller with no other flush under way flushes on its own thread: a lone write (one
    /// message answered, say) is then on disk after one sync, with no wake-up of the flusher
    /// thread and none back, which together cost more than the sync itself. Callers that come
    /// while another flush is under way go to the flusher, which serves them together, so at
    /// most one async worker per store is ever held by a sync.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let under_way = FlushUnderWay::enter(&self.flushing);
        if under_way.alone {
            return self.marks.flush(&self.tree).map_err(StoreError::from);
        }
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send(tx)
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A mark of the writes applied so far, for [`Store::durable`]: the number of flushes begun.
    pub fn durable_mark(&self) -> u64 {
        self.marks.begun.load(Ordering::Acquire)
    }

    /// Waits until everything written before `mark` was taken ([`Store::durable_mark`]) is on
    /// disk: at once when a flush that began after it has ended, else with a flush.
    pub async fn durable(&self, mark: u64) -> Result<(), StoreError> {
        if self.marks.ended.load(Ordering::Acquire) > mark {
            return Ok(());
        }
        self.flush().await
    }

    /// How many [`Store::flush`] calls are under way.
    #[cfg(test)]
    fn flushes_under_way(&self) -> usize {
        self.flushing.load(Ordering::Acquire)
    }

    /// The value of a key of a module with its own layout ([`crate::core::crypto`]).
    pub(crate) fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Every key and value under `prefix` (a module with its own layout: [`crate::core::crypto`]).
    pub(crate) fn scan_raw(&self, prefix: &[u8]) -> Result<Vec<RawEntry>, StoreError> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(prefix) {
            let (key, value) = entry?;
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Sets (`Some`) or removes (`None`) one key of a module with its own layout, not flushed.
    pub(crate) fn set_raw(&self, key: &[u8], value: Option<Vec<u8>>) -> Result<(), StoreError> {
        match value {
            Some(value) => drop(self.tree.insert(key, value)?),
            None => drop(self.tree.remove(key)?),
        }
        Ok(())
    }

    /// A message by sender and id.
    pub fn message(
        &self,
        from: &PeerId,
        id: &MessageId,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(from, id);
        match self.tree.get(&key)? {
            Some(v) => self.decode_expiring(&key, &v),
            None => Ok(None),
        }
    }

    /// Seals the values of `batch` that belong to messages with an expiry.
    fn seal_expiring(&self, batch: &mut Batch) -> Result<(), StoreError> {
        if batch.sealed.is_empty() {
            return Ok(());
        }
        let mut keys = self.shred.lock().unwrap_or_else(|p| p.into_inner());
        for (index, end) in std::mem::take(&mut batch.sealed) {
            if let Some((_, Some(value))) = batch.ops.get_mut(index) {
                *value = keys.seal(end, value)?;
            }
        }
        Ok(())
    }

    /// Decodes a value that may be sealed under an expiry bucket's key; `None` when its key is
    /// destroyed (its message is gone: only a crash between the two deletions leaves one).
    fn decode_expiring<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<Option<T>, StoreError> {
        if bytes.first() != Some(&kith_net::shred::SEALED_MARK) {
            return decode(key, bytes).map(Some);
        }
        let opened = self
            .shred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_sealed(bytes);
        opened.map(|plain| decode(key, &plain)).transpose()
    }

    /// Destroys the expiry keys of buckets that ended at or before `now_ms` (every message
    /// sealed under them was deleted first); returns how many.
    pub fn destroy_expiry_keys(&self, now_ms: u64) -> Result<usize, StoreError> {
        Ok(self
            .shred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .destroy_ended(now_ms)?)
    }

    /// The attachment record of message `id`, if it has one.
    pub fn attachment<T: serde::de::DeserializeOwned>(
        &self,
        id: &MessageId,
    ) -> Result<Option<T>, StoreError> {
        let key = attachment_key(id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Every attachment record, by message id.
    pub fn attachments<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<(MessageId, T)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(b"a/") {
            let (key, value) = entry?;
            let Some(id) = key.get(2..).and_then(MessageId::from_slice) else {
                continue;
            };
            out.push((id, decode(&key, &value)?));
        }
        Ok(out)
    }

    /// Why outgoing message `id` is `failed`, if it is.
    pub fn outgoing_failure(&self, id: &MessageId) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(failure_key(id))?
            .map(|reason| String::from_utf8_lossy(&reason).into_owned()))
    }

    /// Marks message `id` of `from` `failed` for `reason` (kept for `kith status`), unless it
    /// already went further. Returns the message when its state changed.
    pub fn fail(
        &self,
        from: &PeerId,
        id: &MessageId,
        reason: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        // The reason first: a failed state is never shown without it.
        self.tree.insert(failure_key(id), reason.as_bytes())?;
        self.advance_state(from, id, MessageState::Failed)
    }

    /// One of this node's outgoing messages by id.
    pub fn outgoing(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let Some(from) = self.tree.get(id_key(id))? else {
            return Ok(None);
        };
        let from = PeerId::from_bytes(&from).map_err(|e| StoreError::Damaged {
            key: format!("i/{id}"),
            detail: e.to_string(),
        })?;
        self.message(&from, id)
    }

    /// A conversation's messages in display order (oldest first).
    pub fn conversation(&self, peer: &PeerId) -> Result<Vec<StoredMessage>, StoreError> {
        let prefix = peer_key(b"c/", peer);
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let rest = &key[prefix.len()..];
            // lamport (8), from length (1), from, id (16)
            let parsed = rest.get(8).and_then(|&len| {
                let from = rest.get(9..9 + len as usize)?;
                let id = rest.get(9 + len as usize..)?;
                Some((PeerId::from_bytes(from).ok()?, MessageId::from_slice(id)?))
            });
            let Some((from, id)) = parsed else {
                return Err(StoreError::Damaged {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "conversation key does not parse".into(),
                });
            };
            if let Some(msg) = self.message(&from, &id)? {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// Every peer with at least one message.
    pub fn conversations(&self) -> Result<Vec<PeerId>, StoreError> {
        // One step per peer through the conversation index: read the first key of a peer's
        // range, then jump past that range.
        let mut out = Vec::new();
        let mut from = b"c/".to_vec();
        while let Some(entry) = self.tree.range(from.clone()..).next() {
            let (key, _) = entry?;
            if !key.starts_with(b"c/") {
                break;
            }
            let len = key.get(2).copied().unwrap_or(0) as usize;
            let Some(peer) = key.get(3..3 + len).and_then(|b| PeerId::from_bytes(b).ok()) else {
                return Err(StoreError::Damaged {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "conversation key without a peer id".into(),
                });
            };
            out.push(peer);
            // The smallest key after every key starting with this peer's prefix.
            from = peer_key(b"c/", &peer);
            while from.last() == Some(&0xff) {
                from.pop();
            }
            match from.last_mut() {
                Some(last) => *last += 1,
                None => break,
            }
        }
        Ok(out)
    }

    /// A conversation's Lamport clock (0 when it is new).
    pub fn lamport(&self, peer: &PeerId) -> Result<u64, StoreError> {
        let recorded = self
            .tree
            .get(peer_key(b"l/", peer))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        // The conversation index is ordered by Lamport time: its last key holds the highest
        // one seen or sent, so a message needs no clock write of its own.
        let prefix = peer_key(b"c/", peer);
        let indexed = match self.tree.scan_prefix(&prefix).next_back() {
            Some(entry) => {
                let (key, _) = entry?;
                key.get(prefix.len()..prefix.len() + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0)
            }
            None => 0,
        };
        Ok(recorded.max(indexed))
    }

    /// Moves a message's state forward (never back), atomically. Returns the new state, or
    /// `None` when there is no such message or the state did not change.
    pub fn advance_state(
        &self,
        from: &PeerId,
        id: &MessageId,
        to: MessageState,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(from, id);
        let mut changed = None;
        self.tree.fetch_and_update(&key, |old| {
            let old = old?;
            let Ok(Some(mut msg)) = self.decode_expiring::<StoredMessage>(&key, old) else {
                return Some(old.to_vec());
            };
            let next = msg.state.advance(to);
            if next == msg.state {
                return Some(old.to_vec());
            }
            msg.state = next;
            let mut bytes = encode(&msg);
            if let Some(at) = msg.expires_at_ms {
                let end = kith_net::shred::bucket_end(at);
                let mut keys = self.shred.lock().unwrap_or_else(|p| p.into_inner());
                match keys.seal(end, &bytes) {
                    Ok(sealed) => bytes = sealed,
                    // Keeps the old state rather than write the record in the clear.
                    Err(_) => return Some(old.to_vec()),
                }
            }
            changed = Some(msg);
            Some(bytes)
        })?;
        Ok(changed)
    }

    /// Every outbox entry.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(b"o/") {
            let (key, value) = entry?;
            match self.decode_expiring(&key, &value)? {
                Some(entry) => out.push(entry),
                // An expired message's entry whose key is already destroyed.
                None => drop(self.tree.remove(&key)?),
            }
        }
        Ok(out)
    }

    /// Every contact, sorted by name.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let mut contacts = self
            .tree
            .scan_prefix(b"K/")
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect::<Result<Vec<Contact>, _>>()?;
        contacts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(contacts)
    }
}

/// Schema 1 to 2: contacts keyed by name (`k/NAME`) move to their peer id (`K/PEER`), in one
/// atomic batch with the new version. A peer that had several names keeps the first (by name);
/// the others are logged, since one peer under two names is what this change forbids.
fn migrate_contacts_by_peer(tree: &sled::Db) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut kept: BTreeMap<PeerId, String> = BTreeMap::new();
    for entry in tree.scan_prefix(b"k/") {
        let (key, value) = entry?;
        batch.remove(key.clone());
        let contact: Contact = match decode(&key, &value) {
            Ok(contact) => contact,
            Err(e) => {
                tracing::warn!(error = %e, "dropping a damaged contact while migrating the store");
                continue;
            }
        };
        if let Some(first) = kept.get(&contact.peer_id) {
            tracing::warn!(
                peer = %contact.peer_id, kept = %first, dropped = %contact.name,
                "a peer had two contact names; keeping the first"
            );
            continue;
        }
        kept.insert(contact.peer_id, contact.name.clone());
        batch.insert(peer_key(b"K/", &contact.peer_id), encode(&contact));
    }
    batch.insert(b"v", &SCHEMA_VERSION.to_be_bytes());
    tree.apply_batch(batch)?;
    tree.flush()?;
    Ok(())
}

fn group_key(prefix: &[u8], group: &GroupId) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(group.as_bytes());
    key
}

fn group_conversation_key(group: &GroupId, lamport: u64, from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = group_key(b"gc/", group);
    key.extend_from_slice(&lamport.to_be_bytes());
    let from = from.to_bytes();
    key.push(from.len() as u8);
    key.extend_from_slice(&from);
    key.extend_from_slice(id.as_bytes());
    key
}

fn id_prefixed(prefix: &[u8], id: &MessageId) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// Per-member states of an outgoing group message.
pub type MemberStates = BTreeMap<PeerId, MessageState>;

fn encode_members(states: &MemberStates) -> Vec<u8> {
    let list: Vec<(serde_bytes::ByteBuf, MessageState)> = states
        .iter()
        .map(|(p, s)| (serde_bytes::ByteBuf::from(p.to_bytes()), *s))
        .collect();
    encode(&list)
}

fn decode_members(key: &[u8], bytes: &[u8]) -> Result<MemberStates, StoreError> {
    let list: Vec<(serde_bytes::ByteBuf, MessageState)> = decode(key, bytes)?;
    Ok(list
        .into_iter()
        .filter_map(|(p, s)| Some((PeerId::from_bytes(&p).ok()?, s)))
        .collect())
}

/// Group conversations and membership (see the key layout above).
impl Batch {
    /// Stores a group's validated state.
    pub fn put_group(&mut self, state: &GroupState) {
        self.insert(group_key(b"G/", &state.group), encode(state));
    }

    /// Stores a message of a group conversation (instead of [`Batch::put_message`]).
    pub fn put_group_message(&mut self, msg: &StoredMessage, group: &GroupId) {
        if let Some(at) = msg.expires_at_ms {
            self.insert(expiry_key(at, &msg.from, &msg.id), Vec::new());
        }
        self.insert_expiring(
            message_key(&msg.from, &msg.id),
            encode(msg),
            msg.expires_at_ms,
        );
        self.insert(
            group_conversation_key(group, msg.lamport, &msg.from, &msg.id),
            Vec::new(),
        );
        self.insert(id_prefixed(b"gm/", &msg.id), group.as_bytes().to_vec());
        if msg.direction == Direction::Out {
            self.insert(id_key(&msg.id), msg.from.to_bytes());
        }
    }

    /// Raises a group conversation's Lamport clock.
    pub fn set_group_lamport(&mut self, group: &GroupId, lamport: u64) {
        self.insert(group_key(b"gl/", group), lamport.to_be_bytes().to_vec());
    }

    /// Sets the per-member states of an outgoing group message.
    pub fn put_member_states(&mut self, id: &MessageId, states: &MemberStates) {
        self.insert(id_prefixed(b"gs/", id), encode_members(states));
    }
}

impl Store {
    /// Every group this node knows, members or not.
    pub fn groups(&self) -> Result<Vec<GroupState>, StoreError> {
        self.tree
            .scan_prefix(b"G/")
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    /// A group conversation's messages in display order (oldest first).
    pub fn group_conversation(&self, group: &GroupId) -> Result<Vec<StoredMessage>, StoreError> {
        let prefix = group_key(b"gc/", group);
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let rest = &key[prefix.len()..];
            let parsed = rest.get(8).and_then(|&len| {
                let from = rest.get(9..9 + len as usize)?;
                let id = rest.get(9 + len as usize..)?;
                Some((PeerId::from_bytes(from).ok()?, MessageId::from_slice(id)?))
            });
            let Some((from, id)) = parsed else {
                return Err(StoreError::Damaged {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "group conversation key does not parse".into(),
                });
            };
            if let Some(msg) = self.message(&from, &id)? {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// The group a message belongs to, if it belongs to one.
    pub fn message_group(&self, id: &MessageId) -> Result<Option<GroupId>, StoreError> {
        Ok(self
            .tree
            .get(id_prefixed(b"gm/", id))?
            .and_then(|v| GroupId::from_slice(&v)))
    }

    /// A group conversation's Lamport clock (0 when it is new).
    pub fn group_lamport(&self, group: &GroupId) -> Result<u64, StoreError> {
        Ok(self
            .tree
            .get(group_key(b"gl/", group))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// The per-member states of an outgoing group message.
    pub fn member_states(&self, id: &MessageId) -> Result<MemberStates, StoreError> {
        let key = id_prefixed(b"gs/", id);
        match self.tree.get(&key)? {
            Some(v) => decode_members(&key, &v),
            None => Ok(MemberStates::new()),
        }
    }

    /// Moves members' states forward (never back) atomically; `None` for a member means every
    /// member. Returns the new states and the members that moved, if any did.
    pub fn advance_members(
        &self,
        id: &MessageId,
        member: Option<&PeerId>,
        to: MessageState,
    ) -> Result<Option<(MemberStates, Vec<PeerId>)>, StoreError> {
        let key = id_prefixed(b"gs/", id);
        let mut changed = None;
        self.tree.fetch_and_update(&key, |old| {
            // Run again when another writer got there first: start from scratch.
            changed = None;
            let old = old?;
            let Ok(mut states) = decode_members(&key, old) else {
                return Some(old.to_vec());
            };
            let mut moved = Vec::new();
            for (peer, state) in states.iter_mut() {
                if member.is_none_or(|m| m == peer) && *state < to {
                    *state = to;
                    moved.push(*peer);
                }
            }
            if moved.is_empty() {
                return Some(old.to_vec());
            }
            let bytes = encode_members(&states);
            changed = Some((states, moved));
            Some(bytes)
        })?;
        Ok(changed)
    }
}

/// Which conversation index a page is read from.
#[derive(Debug, Clone, Copy)]
pub enum Thread<'a> {
    /// A one-to-one conversation with this peer.
    Peer(&'a PeerId),
    /// A group conversation.
    Group(&'a GroupId),
}

impl Thread<'_> {
    fn prefix(&self) -> Vec<u8> {
        match self {
            Thread::Peer(peer) => peer_key(b"c/", peer),
            Thread::Group(group) => group_key(b"gc/", group),
        }
    }
}

/// Reading conversations a page at a time, newest first, for user interfaces.
impl Store {
    /// A conversation's messages from the newest backwards, starting just before `before`
    /// (the message's Lamport time, sender and id: its place in the index) or at the end.
    /// Nothing is read ahead: a caller that takes 50 messages reads 50 records.
    pub fn newest_first(
        &self,
        thread: Thread<'_>,
        before: Option<(u64, &PeerId, &MessageId)>,
    ) -> impl Iterator<Item = Result<StoredMessage, StoreError>> + '_ {
        let prefix = thread.prefix();
        let end = match before {
            Some((lamport, from, id)) => match thread {
                Thread::Peer(peer) => conversation_key(peer, lamport, from, id),
                Thread::Group(group) => group_conversation_key(group, lamport, from, id),
            },
            None => {
                // The smallest key after every key with this prefix.
                let mut end = prefix.clone();
                while end.last() == Some(&0xff) {
                    end.pop();
                }
                if let Some(last) = end.last_mut() {
                    *last += 1;
                }
                end
            }
        };
        let start = prefix.clone();
        self.tree.range(start..end).rev().filter_map(move |entry| {
            let (key, _) = match entry {
                Ok(entry) => entry,
                Err(e) => return Some(Err(e.into())),
            };
            let rest = key.get(prefix.len()..).unwrap_or_default();
            let parsed = rest.get(8).and_then(|&len| {
                let from = rest.get(9..9 + len as usize)?;
                let id = rest.get(9 + len as usize..)?;
                Some((PeerId::from_bytes(from).ok()?, MessageId::from_slice(id)?))
            });
            let Some((from, id)) = parsed else {
                return Some(Err(StoreError::Damaged {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "conversation key does not parse".into(),
                }));
            };
            self.message(&from, &id).transpose()
        })
    }
}

/// One [`Store::flush`] call counted in the store's calls under way, for as long as it lives
/// (a caller that gives up waiting is no longer counted).
struct FlushUnderWay<'a> {
    count: &'a AtomicUsize,
    /// No other call was under way when this one began.
    alone: bool,
}

impl<'a> FlushUnderWay<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let alone = count.fetch_add(1, Ordering::AcqRel) == 0;
        Self { count, alone }
    }
}

impl Drop for FlushUnderWay<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Present while the store is closed after a clean stop (written by the last flush, removed
/// when the store is opened).
const CLEAN_STOP_KEY: &[u8] = b"stopped-cleanly";

/// Flushes numbered in the order they begin. A flush makes durable everything applied before
/// it began, so once flush `n` has ended, so is everything applied before flush `n` began, and
/// before any flush numbered lower began.
#[derive(Default)]
struct FlushMarks {
    /// Flushes begun.
    begun: AtomicU64,
    /// The highest number of a flush that ended well.
    ended: AtomicU64,
}

impl FlushMarks {
    fn flush(&self, tree: &sled::Db) -> sled::Result<()> {
        let number = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
        tree.flush()?;
        self.ended.fetch_max(number, Ordering::AcqRel);
        Ok(())
    }
}

/// The least time between the end of one flush and the start of the next.
const FLUSH_SPACING: Duration = Duration::from_millis(1);

/// The group-commit flusher: every waiter that queued while a flush ran shares the next one.
fn flush_loop(
    tree: sled::Db,
    marks: &FlushMarks,
    unclean: &AtomicBool,
    mut rx: mpsc::Receiver<oneshot::Sender<Result<(), StoreError>>>,
    closed: watch::Sender<bool>,
) {
    let mut waiting = Vec::new();
    // When the last flush ended, and whether writers were queueing for it.
    let mut last_flush: Option<(std::time::Instant, bool)> = None;
    while let Some(first) = rx.blocking_recv() {
        waiting.push(first);
        // Under load, flushes come back to back and each covers few writes, while every flush
        // costs a log write, a sync and several thread wakeups. When writers are queueing, the
        // next flush starts no sooner than a millisecond after the last one, so that it serves
        // many more. A writer with nobody queueing before it is flushed at once.
        if let Some((at, busy)) = last_flush {
            let gap = FLUSH_SPACING.saturating_sub(at.elapsed());
            if busy && !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        while let Ok(next) = rx.try_recv() {
            waiting.push(next);
        }
        let result = marks.flush(&tree);
        // Queueing means several writers shared this flush or others came while it ran; it is
        // judged before the waiters are released, whose next writes are not a queue.
        let busy = waiting.len() > 1 || !rx.is_empty();
        for waiter in waiting.drain(..) {
            let _ = waiter.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Sled(e.clone())),
            });
        }
        last_flush = Some((std::time::Instant::now(), busy));
    }
    // Last flush on shutdown, so nothing applied without waiting is lost on a clean stop; the
    // clean-stop mark is the last write, so it is on disk only if everything before it is.
    let last = if unclean.load(Ordering::Acquire) {
        Ok(())
    } else {
        tree.insert(CLEAN_STOP_KEY, Vec::new()).map(|_| ())
    };
    if let Err(e) = last.and_then(|()| tree.flush().map(|_| ())) {
        tracing::error!(error = %e, "final store flush failed");
    }
    drop(tree);
    let _ = closed.send(true);
}

fn expiry_key(deadline_ms: u64, from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = b"ex/".to_vec();
    key.extend_from_slice(&deadline_ms.to_be_bytes());
    let from = from.to_bytes();
    key.push(from.len() as u8);
    key.extend_from_slice(&from);
    key.extend_from_slice(id.as_bytes());
    key
}

/// A conversation's disappearing-message timer and the change that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerRecord {
    /// The timer in seconds; `None` when the conversation is permanent.
    pub secs: Option<u64>,
    /// The conversation's Lamport time of the change: a later change wins.
    pub lamport: u64,
    /// Who made the change (ties of Lamport time go to the larger peer id bytes).
    #[serde(with = "serde_bytes")]
    pub from: Vec<u8>,
    /// In a group: only admins may change the timer.
    #[serde(default)]
    pub admins_only: bool,
}

/// What is left of a deleted message of a temporary chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expired {
    /// The conversation: a peer id or a group id, printed.
    pub conversation: String,
    /// Which way it went.
    pub direction: Direction,
    /// Its final state: `expired` for an outgoing message that was never delivered.
    pub state: MessageState,
    /// When it was deleted (unix ms).
    pub deleted_at_ms: u64,
}

/// A message due for deletion: its sender and id.
pub type Due = (PeerId, MessageId);

/// Temporary chats (the temporary-chats feature): timers, the expiry index, deletion and what is left.
impl Batch {
    /// Deletes a message and every index and side record of it (attachment, outbox entry,
    /// group states), then its expiry index entry. The record goes first, so a crash part way
    /// leaves index entries that point at nothing (skipped when read) and an expiry entry that
    /// the next sweep finishes.
    pub fn remove_message(&mut self, msg: &StoredMessage, group: Option<&GroupId>) {
        self.remove(message_key(&msg.from, &msg.id));
        match group {
            Some(group) => {
                self.remove(group_conversation_key(
                    group,
                    msg.lamport,
                    &msg.from,
                    &msg.id,
                ));
                self.remove(id_prefixed(b"gm/", &msg.id));
                self.remove(id_prefixed(b"gs/", &msg.id));
            }
            None => self.remove(conversation_key(&msg.peer, msg.lamport, &msg.from, &msg.id)),
        }
        self.remove(id_key(&msg.id));
        self.remove(outbox_key(&msg.id));
        self.remove(attachment_key(&msg.id));
        self.remove(id_prefixed(b"tl/", &msg.id));
        if let Some(at) = msg.expires_at_ms {
            self.remove(expiry_key(at, &msg.from, &msg.id));
        }
    }

    /// Removes an expiry index entry that points at no message.
    pub fn remove_expiry(&mut self, deadline_ms: u64, from: &PeerId, id: &MessageId) {
        self.remove(expiry_key(deadline_ms, from, id));
    }

    /// Records what is left of a deleted message.
    pub fn put_expired(&mut self, id: &MessageId, expired: &Expired) {
        self.insert(id_prefixed(b"et/", id), encode(expired));
    }

    /// Sets a conversation's timer (a peer's, or a group's).
    pub fn put_timer(&mut self, thread: Thread<'_>, record: &TimerRecord) {
        self.insert(timer_key(thread), encode(record));
    }

    /// Marks message `id` as the history line of a timer change.
    pub fn put_timer_line(&mut self, id: &MessageId, secs: Option<u64>) {
        self.insert(id_prefixed(b"tl/", id), encode(&secs));
    }
}

fn timer_key(thread: Thread<'_>) -> Vec<u8> {
    match thread {
        Thread::Peer(peer) => peer_key(b"T/", peer),
        Thread::Group(group) => group_key(b"Tg/", group),
    }
}

impl Store {
    /// Messages whose deletion time is at or before `now_ms`, with that time, oldest first
    /// (at most `limit`).
    pub fn expiries_due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Due)>, StoreError> {
        let mut out = Vec::new();
        let end = {
            let mut key = b"ex/".to_vec();
            key.extend_from_slice(&now_ms.to_be_bytes());
            key.push(0xff);
            key
        };
        for entry in self.tree.range(b"ex/".to_vec()..end).take(limit) {
            let (key, _) = entry?;
            let parsed = key.get(3..11).and_then(|at| {
                let at = u64::from_be_bytes(<[u8; 8]>::try_from(at).ok()?);
                let len = *key.get(11)? as usize;
                let from = PeerId::from_bytes(key.get(12..12 + len)?).ok()?;
                let id = MessageId::from_slice(key.get(12 + len..)?)?;
                Some((at, (from, id)))
            });
            match parsed {
                Some(due) => out.push(due),
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), "dropping a damaged expiry entry");
                    self.tree.remove(&key)?;
                }
            }
        }
        Ok(out)
    }

    /// The earliest deletion time of a message of a temporary chat.
    pub fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let first = self.tree.scan_prefix(b"ex/").next().transpose()?;
        Ok(first.and_then(|(key, _)| {
            key.get(3..11)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        }))
    }

    /// What is left of a deleted message, if it was one.
    pub fn expired(&self, id: &MessageId) -> Result<Option<Expired>, StoreError> {
        let key = id_prefixed(b"et/", id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// A conversation's timer, if it was ever set.
    pub fn timer(&self, thread: Thread<'_>) -> Result<Option<TimerRecord>, StoreError> {
        let key = timer_key(thread);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// The timer a history line announces, if message `id` is such a line.
    pub fn timer_line(&self, id: &MessageId) -> Result<Option<Option<u64>>, StoreError> {
        let key = id_prefixed(b"tl/", id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kith_protocol::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn msg(from: PeerId, peer: PeerId, lamport: u64, direction: Direction) -> StoredMessage {
        StoredMessage {
            id: MessageId::random(),
            direction,
            from,
            peer,
            text: format!("m{lamport}"),
            sent_at_ms: lamport,
            lamport,
            state: MessageState::Pending,
            expires_at_ms: None,
        }
    }

    #[tokio::test]
    async fn the_index_lists_conversations_and_holds_their_clocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (me, bob, carol) = (peer(), peer(), peer());
        let mut batch = Batch::new();
        for (peer, lamport) in [(bob, 7), (bob, 2), (carol, 1), (carol, u64::MAX - 1)] {
            batch.put_message(&msg(me, peer, lamport, Direction::Out));
        }
        store.commit(batch).await.expect("commit");
        let mut found = store.conversations().expect("conversations");
        found.sort();
        let mut expected = vec![bob, carol];
        expected.sort();
        assert_eq!(found, expected);
        assert_eq!(store.lamport(&bob).expect("lamport"), 7);
        assert_eq!(store.lamport(&carol).expect("lamport"), u64::MAX - 1);
        assert_eq!(store.lamport(&me).expect("lamport"), 0);
    }

    #[tokio::test]
    async fn conversation_is_in_lamport_order_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (me, bob) = (peer(), peer());
        let written = [3, 1, 2].map(|l| msg(if l == 2 { bob } else { me }, bob, l, Direction::Out));
        {
            let store = Store::open(dir.path()).expect("open");
            let mut batch = Batch::new();
            for m in &written {
                batch.put_message(m);
            }
            batch.set_lamport(&bob, 3);
            store.commit(batch).await.expect("commit");
            close(store).await;
        }
        let store = Store::open(dir.path()).expect("reopen");
        let texts: Vec<_> = store
            .conversation(&bob)
            .expect("conversation")
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, ["m1", "m2", "m3"]);
        assert_eq!(store.lamport(&bob).expect("lamport"), 3);
        assert_eq!(store.conversations().expect("list"), vec![bob]);
        assert_eq!(
            store
                .outgoing(&written[0].id)
                .expect("by id")
                .map(|m| m.text),
            Some("m3".into())
        );
    }

    #[tokio::test]
    async fn pages_of_a_long_conversation_read_backwards_from_a_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (me, bob, carol) = (peer(), peer(), peer());
        let mut batch = Batch::new();
        let written: Vec<StoredMessage> = (1..=10_000)
            .map(|l| {
                let from = if l % 3 == 0 { me } else { bob };
                msg(from, bob, l, Direction::In)
            })
            .collect();
        for m in &written {
            batch.put_message(m);
        }
        // Another conversation whose keys sort right after bob's must not leak into his pages.
        batch.put_message(&msg(me, carol, 1, Direction::Out));
        store.commit(batch).await.expect("commit");
        let page = |before: Option<&StoredMessage>, n: usize| -> Vec<u64> {
            store
                .newest_first(
                    Thread::Peer(&bob),
                    before.map(|m| (m.lamport, &m.from, &m.id)),
                )
                .take(n)
                .map(|m| m.expect("read").lamport)
                .collect()
        };
        assert_eq!(page(None, 3), [10_000, 9_999, 9_998]);
        let before = &written[5_000 - 1];
        assert_eq!(page(Some(before), 2), [4_999, 4_998]);
        assert_eq!(page(Some(&written[1]), 50), [1]);
        assert_eq!(page(Some(&written[0]), 50), Vec::<u64>::new());
        assert_eq!(page(None, 20_000).len(), 10_000);
        let carols: Vec<_> = store
            .newest_first(Thread::Peer(&carol), None)
            .map(|m| m.expect("read").text)
            .collect();
        assert_eq!(carols, ["m1"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_are_on_disk_when_they_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (me, bob) = (peer(), peer());
        let written: Vec<StoredMessage> =
            (1..=400).map(|l| msg(me, bob, l, Direction::Out)).collect();
        let store = Store::open(dir.path()).expect("open");
        // Lone commits flush on their own thread, the others through the flusher.
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in written.chunks(4) {
            let (store, chunk) = (store.clone(), chunk.to_vec());
            tasks.spawn(async move {
                for m in chunk {
                    let mut batch = Batch::new();
                    batch.put_message(&m);
                    store.commit(batch).await?;
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task").expect("commit");
        }
        // Every call has ended, so the next lone flush runs on its caller's thread again.
        assert_eq!(store.flushes_under_way(), 0);
        // What a crash now would leave: the files as they are, the store still open (no final
        // flush on close). A commit that returned before its write reached the file is missing.
        let crashed = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), crashed.path());
        drop(store);
        let store = Store::open(crashed.path()).expect("open the copy");
        let lamports: Vec<u64> = store
            .conversation(&bob)
            .expect("conversation")
            .into_iter()
            .map(|m| m.lamport)
            .collect();
        assert_eq!(lamports, (1..=400).collect::<Vec<u64>>());
    }

    /// The store's sled writes each new log segment ahead of its use (`vendor/sled`,
    /// `SegmentAccountant::prefill`). A log grown over many segments must come back whole from
    /// what a crash leaves and from a clean close, and go on growing after a reopen.
    #[tokio::test]
    async fn a_log_grown_over_many_segments_survives_a_crash_and_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (me, bob) = (peer(), peer());
        let long = |lamport: u64| StoredMessage {
            text: format!("{lamport:0>1000}"),
            ..msg(me, bob, lamport, Direction::Out)
        };
        let commit_all = |store: Store, lamports: std::ops::RangeInclusive<u64>| async move {
            for lamport in lamports {
                let mut batch = Batch::new();
                batch.put_message(&long(lamport));
                store.commit(batch).await.expect("commit");
            }
            store
        };
        let lamports_in = |store: &Store| -> Vec<u64> {
            let messages = store.conversation(&bob).expect("conversation");
            for m in &messages {
                assert_eq!(m.text, format!("{:0>1000}", m.lamport), "damaged text");
            }
            messages.into_iter().map(|m| m.lamport).collect()
        };
        let store = commit_all(Store::open(dir.path()).expect("open"), 1..=2_000).await;
        let log_bytes: u64 = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").metadata().expect("metadata").len())
            .sum();
        assert!(
            log_bytes > 4 * 512 * 1024,
            "the log spans few segments: {log_bytes} bytes"
        );
        let crashed = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), crashed.path());
        close(store).await;
        let copy = Store::open(crashed.path()).expect("open the crash image");
        assert_eq!(lamports_in(&copy), (1..=2_000).collect::<Vec<u64>>());
        close(copy).await;
        let store = commit_all(Store::open(dir.path()).expect("reopen"), 2_001..=3_000).await;
        close(store).await;
        let store = Store::open(dir.path()).expect("reopen again");
        assert_eq!(lamports_in(&store), (1..=3_000).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn a_store_knows_whether_the_last_process_closed_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert!(!store.started_clean(), "a new store");
        close(store).await;
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.started_clean(), "closed cleanly");
        // What a crash now leaves: the files of a store still open.
        let crashed = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), crashed.path());
        let copy = Store::open(crashed.path()).expect("open the crash image");
        assert!(!copy.started_clean(), "a crash image");
        close(copy).await;
        let copy = Store::open(crashed.path()).expect("reopen the crash image");
        assert!(copy.started_clean(), "closed cleanly after the crash");
        close(store).await;
        let store = Store::open(dir.path()).expect("open");
        assert!(store.started_clean());
        // A process that acted on a write that then failed leaves no mark.
        store.mark_unclean();
        close(store).await;
        assert!(!Store::open(dir.path()).expect("open").started_clean());
    }

    #[tokio::test]
    async fn writes_before_a_mark_are_on_disk_once_it_is_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (me, bob) = (peer(), peer());
        let mut lamports = Vec::new();
        for lamport in 1..=3 {
            let mut batch = Batch::new();
            batch.put_message(&msg(me, bob, lamport, Direction::Out));
            store.apply(batch).expect("apply");
            let mark = store.durable_mark();
            store.durable(mark).await.expect("durable");
            lamports.push(lamport);
            // A mark taken before the last flush began needs no other.
            let flushed = store.marks.ended.load(Ordering::Acquire);
            store.durable(mark).await.expect("durable again");
            assert_eq!(store.marks.ended.load(Ordering::Acquire), flushed);
            let crashed = tempfile::tempdir().expect("tempdir");
            copy_dir(dir.path(), crashed.path());
            let copy = Store::open(crashed.path()).expect("open the crash image");
            let found: Vec<u64> = copy
                .conversation(&bob)
                .expect("conversation")
                .into_iter()
                .map(|m| m.lamport)
                .collect();
            assert_eq!(found, lamports);
            close(copy).await;
        }
    }

    /// Drops the last handle to `store` and waits until it is flushed and closed.
    pub(crate) async fn close(store: Store) {
        let closed = store.closed();
        drop(store);
        closed.wait().await;
    }

    /// Copies a store's directory as it is (with the store open: what a crash leaves).
    pub(crate) fn copy_dir(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("dir entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                std::fs::create_dir(&target).expect("create dir");
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }

    #[tokio::test]
    async fn a_flush_given_up_is_no_longer_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let first = FlushUnderWay::enter(&store.flushing);
        assert!(first.alone);
        // Another flush is under way, so this one queues at the flusher; dropping it before it
        // is served must not leave it counted. (A flusher quick enough to answer before the
        // first poll ends the call; the next one is then tried.)
        let queued = loop {
            let mut queued = Box::pin(store.flush());
            if futures::poll!(queued.as_mut()).is_pending() {
                break queued;
            }
        };
        assert_eq!(store.flushes_under_way(), 2);
        drop(queued);
        drop(first);
        assert_eq!(store.flushes_under_way(), 0);
        store.flush().await.expect("lone flush");
        assert_eq!(store.flushes_under_way(), 0);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.insert(b"v", &(SCHEMA_VERSION + 1).to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::NewerSchema { .. })
        ));
    }

    #[tokio::test]
    async fn contacts_of_a_version_1_store_move_to_their_peer_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bob, carol) = (peer(), peer());
        let contact = |name: &str, peer_id: PeerId| Contact {
            name: name.into(),
            peer_id,
            addrs: vec![],
            relays: vec![],
        };
        {
            // A version-1 store: contacts by name, bob under two names.
            let db = sled::open(dir.path()).expect("sled");
            db.insert(b"v", &1u32.to_be_bytes()).expect("insert");
            for c in [
                contact("bob", bob),
                contact("junk", bob),
                contact("carol", carol),
            ] {
                let mut key = b"k/".to_vec();
                key.extend_from_slice(c.name.as_bytes());
                db.insert(key, encode(&c)).expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(
            store.contacts().expect("contacts"),
            vec![contact("bob", bob), contact("carol", carol)]
        );
        assert_eq!(store.tree.scan_prefix(b"k/").count(), 0);
        close(store).await;
        // Opened again (now version 2), nothing moves.
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.contacts().expect("contacts").len(), 2);
        let mut batch = Batch::new();
        batch.remove_contact(&bob);
        store.commit(batch).await.expect("remove");
        assert_eq!(
            store.contacts().expect("contacts"),
            vec![contact("carol", carol)]
        );
    }
}
