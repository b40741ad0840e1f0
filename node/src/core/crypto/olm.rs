//! The node's Olm account and sessions (vodozemac), kept in the node's sled store as pickles.
//!
//! Store layout (under the store's `x/` prefix):
//!
//! | key | value |
//! |---|---|
//! | `x/a` | [`AccountRecord`]: the account pickle and the published fallback key |
//! | `x/k` | empty: the keys were published to a relay at least once |
//! | `x/e` | the sending epoch (8 bytes, big-endian): raised at each start after an unclean stop |
//! | `x/s/` peer, session id | [`SessionRecord`]: a session pickle and when it was last used |
//! | `x/p/` peer | [`PeerRecord`]: the peer's signed identity key and whether the user verified it |
//! | `x/u/` sender, message id | empty: the message did not decrypt and was asked for again |
//! | `x/o/` sender, message id | empty: an opened receipt (chat messages are known by their record) |
//! | `x/c/` peer | [`order::Chains`]: how far each of the peer's sending chains was opened |
//! | `x/h/` peer, ratchet key, index, message id | [`order::Held`]: a message kept sealed until the ones before it are opened |
//!
//! Every change of a session is written while the lock is held, so that the stored state never
//! goes back: a ratchet step written after a later one would, after a restart, reuse message
//! keys. A sealed message may leave before that write is flushed (so that the sender's flush
//! and the network run at once); a crash can then lose a state that was already used. So a
//! session sends only in the epoch it was made in: each start after an unclean stop (the
//! store says which, [`Store::started_clean`]) raises the epoch, and the sessions of earlier
//! epochs only open messages from then on; the next message to such a peer claims a key and
//! starts a new session. An opened message is written in one write with the session that
//! opened it, the message before the session's new state (see [`Olm::open`]).

use std::collections::HashMap;
use std::sync::Mutex;

use kith_protocol::envelope::{Sealed, OLM_NORMAL, OLM_PRE_KEY};
use kith_protocol::prekeys::{Bundle, Curve25519, KeyError, SignedIdentity, SignedKey};
use kith_protocol::{cbor, Body, MessageId, PeerId};
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use vodozemac::olm::{
    Account, AccountPickle, DecryptionError, OlmMessage, Session, SessionConfig,
    SessionCreationError, SessionPickle,
};
use vodozemac::Curve25519PublicKey;

use super::order::{self, Chains, Held, Position, Verdict};
use crate::core::store::{Batch, Store, StoreError};

/// Largest stored record this module reads back.
const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Most sessions kept per peer (the least recently used goes first).
const MAX_SESSIONS_PER_PEER: usize = 8;

/// Largest plaintext (the CBOR of the inner body) this module opens.
const MAX_PLAINTEXT_BYTES: usize = kith_protocol::limits::MAX_BODY_BYTES;

/// Why a crypto operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode.
    #[error("crypto store: damaged record {0}")]
    Damaged(String),
    /// A peer's keys do not check out.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The body could not be encoded.
    #[error("cannot encode the body: {0}")]
    Encode(String),
    /// vodozemac refused to make a session.
    #[error("cannot create a session: {0}")]
    Session(#[from] SessionCreationError),
}

/// Why an inbound Olm body could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The Olm message does not parse.
    #[error("malformed Olm message: {0}")]
    Malformed(String),
    /// No session of ours decrypts it and it cannot start one: our or the sender's state was
    /// lost, or it was tampered with.
    #[error("cannot decrypt: {0}")]
    Undecryptable(String),
    /// Its plaintext is not a body we accept inside an Olm message.
    #[error("bad inner body: {0}")]
    BadInner(String),
    /// The identity key attached to it is not the sender's.
    #[error(transparent)]
    Identity(#[from] KeyError),
    /// The session that sealed it no longer has its message key: a copy of a message opened
    /// before, or one that arrived after more than the ratchet keeps of skipped keys (40).
    #[error("its message key is used up or gone")]
    KeyGone,
    /// The store failed (nothing was written).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The account as stored.
#[derive(Serialize, Deserialize)]
struct AccountRecord {
    pickle: AccountPickle,
    /// The fallback key as published (vodozemac only lists unpublished ones).
    fallback: Option<Curve25519>,
}

/// A session as stored.
#[derive(Serialize, Deserialize)]
struct SessionRecord {
    pickle: SessionPickle,
    last_used: u64,
    /// The epoch the session was made in: it seals only in that epoch (see the module's
    /// documentation). Records from before epochs were kept have 0, an epoch no start uses.
    #[serde(default)]
    epoch: u64,
}

/// What this node knows of a peer's identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Its signed Olm identity key.
    pub identity: SignedIdentity,
    /// The user compared safety numbers for this key.
    pub verified: bool,
    /// The key replaced another one (until the user verifies the new one).
    pub changed: bool,
}

struct Kept {
    session: Session,
    last_used: u64,
    /// See [`SessionRecord::epoch`].
    epoch: u64,
}

struct State {
    account: Account,
    fallback: Option<Curve25519>,
    /// Sessions by peer, loaded from the store on first use.
    sessions: HashMap<PeerId, Vec<Kept>>,
    clock: u64,
    /// The sending epoch of this start (see the module's documentation).
    epoch: u64,
    /// Sessions that sealed with their new state not yet written ([`Olm::seal_unwritten`]).
    unwritten: Vec<(PeerId, String)>,
}

/// The account, the sessions and the peers' identity keys.
pub struct Olm {
    key: Keypair,
    me: PeerId,
    identity: SignedIdentity,
    store: Store,
    state: Mutex<State>,
    on_identity_changed: Box<dyn Fn(PeerId) + Send + Sync>,
    /// Whether the keys were ever published to a relay.
    published: tokio::sync::watch::Sender<bool>,
    /// Held while keys are being published, so that two connections to a relay do not both
    /// top it up.
    publishing: tokio::sync::Mutex<()>,
    /// Claims for this node's own keys, per claimer.
    claims: Mutex<kith_relay::mailbox::rate::RateLimiter>,
}

/// Claims of this node's own keys one peer may make a second, sustained.
const OWN_CLAIMS_PER_SEC: u32 = 2;

/// Claims of this node's own keys one peer may make at once.
const OWN_CLAIM_BURST: u32 = 20;

const ACCOUNT_KEY: &[u8] = b"x/a";

const PUBLISHED_KEY: &[u8] = b"x/k";

const EPOCH_KEY: &[u8] = b"x/e";

fn peer_part(peer: &PeerId) -> Vec<u8> {
    let bytes = peer.to_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(bytes.len() as u8);
    out.extend_from_slice(&bytes);
    out
}

/// The peer at the start of a key's rest (as [`peer_part`] wrote it) and what follows it.
fn split_peer(rest: &[u8]) -> Option<(PeerId, &[u8])> {
    let len = usize::from(*rest.first()?);
    let bytes = rest.get(1..1 + len)?;
    let peer = PeerId::from_bytes(bytes).ok()?;
    Some((peer, rest.get(1 + len..)?))
}

fn sessions_prefix(peer: &PeerId) -> Vec<u8> {
    let mut key = b"x/s/".to_vec();
    key.extend(peer_part(peer));
    key
}

fn session_key(peer: &PeerId, session_id: &str) -> Vec<u8> {
    let mut key = sessions_prefix(peer);
    key.extend_from_slice(session_id.as_bytes());
    key
}

fn peer_key(peer: &PeerId) -> Vec<u8> {
    let mut key = b"x/p/".to_vec();
    key.extend(peer_part(peer));
    key
}

fn undecryptable_key(from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = b"x/u/".to_vec();
    key.extend(peer_part(from));
    key.extend_from_slice(id.as_bytes());
    key
}

fn opened_key(from: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut key = b"x/o/".to_vec();
    key.extend(peer_part(from));
    key.extend_from_slice(id.as_bytes());
    key
}

/// An open that could not write what it changed: a store failure, whatever the crypto layer
/// called it.
fn store_failure(e: CryptoError) -> OpenError {
    OpenError::Store(match e {
        CryptoError::Store(e) => e,
        other => StoreError::Damaged {
            key: "x/".into(),
            detail: other.to_string(),
        },
    })
}

/// A held message as [`Olm::ready`] lists it: its store key (to remove once dealt with) and
/// its envelope's bytes.
pub type HeldEntry = (Vec<u8>, Vec<u8>);

fn chains_key(peer: &PeerId) -> Vec<u8> {
    let mut key = b"x/c/".to_vec();
    key.extend(peer_part(peer));
    key
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CryptoError> {
    cbor::encode(value, MAX_RECORD_BYTES).map_err(|e| CryptoError::Encode(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, CryptoError> {
    cbor::decode(bytes, MAX_RECORD_BYTES).map_err(|e| CryptoError::Damaged(format!("{what}: {e}")))
}

fn session_record(kept: &Kept) -> Result<Vec<u8>, CryptoError> {
    encode(&SessionRecord {
        pickle: kept.session.pickle(),
        last_used: kept.last_used,
        epoch: kept.epoch,
    })
}

impl Olm {
    /// Loads the account from `store`, or creates (and stores, not flushed) a new one.
    pub fn load(
        store: Store,
        key: Keypair,
        on_identity_changed: Box<dyn Fn(PeerId) + Send + Sync>,
    ) -> Result<Self, CryptoError> {
        let (account, fallback) = match store.get_raw(ACCOUNT_KEY)? {
            Some(bytes) => {
                let record: AccountRecord = decode("account", &bytes)?;
                (Account::from_pickle(record.pickle), record.fallback)
            }
            None => {
                let mut account = Account::new();
                account.generate_fallback_key();
                let fallback = account.fallback_key().values().next().map(|k| k.to_bytes());
                account.mark_keys_as_published();
                let record = AccountRecord {
                    pickle: account.pickle(),
                    fallback,
                };
                // Flushed with the first write that depends on it: nothing is published before
                // a flush, so an account lost in a crash was never used.
                store.set_raw(ACCOUNT_KEY, Some(encode(&record)?))?;
                (account, fallback)
            }
        };
        let epoch = Self::start_epoch(&store)?;
        let identity = SignedIdentity::sign(&key, account.curve25519_key().to_bytes())?;
        let (published, _) = tokio::sync::watch::channel(store.get_raw(PUBLISHED_KEY)?.is_some());
        Ok(Self {
            published,
            publishing: tokio::sync::Mutex::new(()),
            claims: Mutex::new(kith_relay::mailbox::rate::RateLimiter::new(
                OWN_CLAIMS_PER_SEC,
                OWN_CLAIM_BURST,
            )),
            me: key.public().to_peer_id(),
            key,
            identity,
            store,
            state: Mutex::new(State {
                account,
                fallback,
                sessions: HashMap::new(),
                clock: 0,
                epoch,
                unwritten: Vec::new(),
            }),
            on_identity_changed,
        })
    }

    /// The sending epoch of this start: the stored one, raised (and written, not flushed)
    /// when the store was not closed cleanly. Not flushed: a later write that depends on it
    /// (a session of this epoch) comes after it in the store's log, so it is never on disk
    /// without it.
    fn start_epoch(store: &Store) -> Result<u64, CryptoError> {
        let stored = match store.get_raw(EPOCH_KEY)? {
            None => None,
            Some(raw) => Some(
                <[u8; 8]>::try_from(raw.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| CryptoError::Damaged("epoch: not 8 bytes".into()))?,
            ),
        };
        match stored {
            Some(epoch) if store.started_clean() => Ok(epoch),
            _ => {
                let epoch = stored.unwrap_or(0).saturating_add(1);
                store.set_raw(EPOCH_KEY, Some(epoch.to_be_bytes().to_vec()))?;
                Ok(epoch)
            }
        }
    }

    /// This node's signed identity key.
    pub fn identity(&self) -> &SignedIdentity {
        &self.identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sessions of `peer`, loaded from the store if need be.
    fn sessions<'a>(
        &self,
        state: &'a mut State,
        peer: &PeerId,
    ) -> Result<&'a mut Vec<Kept>, CryptoError> {
        if !state.sessions.contains_key(peer) {
            let mut loaded = Vec::new();
            for (_, bytes) in self.store.scan_raw(&sessions_prefix(peer))? {
                let record: SessionRecord = decode("session", &bytes)?;
                state.clock = state.clock.max(record.last_used);
                loaded.push(Kept {
                    session: Session::from_pickle(record.pickle),
                    last_used: record.last_used,
                    epoch: record.epoch,
                });
            }
            // Most recently used first.
            loaded.sort_by_key(|k| std::cmp::Reverse(k.last_used));
            state.sessions.insert(*peer, loaded);
        }
        Ok(state.sessions.entry(*peer).or_default())
    }

    /// Whether a session with `peer` can seal (one made in this epoch exists).
    pub fn has_session(&self, peer: &PeerId) -> Result<bool, CryptoError> {
        let mut state = self.lock();
        let epoch = state.epoch;
        Ok(self
            .sessions(&mut state, peer)?
            .iter()
            .any(|k| k.epoch == epoch))
    }

    /// Encrypts `body` for `to` with the most recently used session of this epoch, or `None`
    /// when there is none (claim a key and [`Olm::start_session`] first). The session's new
    /// state is written (not flushed) before this returns.
    pub fn seal(&self, to: &PeerId, body: &Body) -> Result<Option<Body>, CryptoError> {
        self.seal_with(to, body, true)
    }

    /// [`Olm::seal`], leaving the session's new state to [`Olm::write_unwritten`], which the
    /// caller calls as soon as the message is on its way (its pickle and write then take their
    /// time beside the network's). Until then the state is only in memory: an open of the
    /// peer's messages writes it first, and if writing it fails the store is marked to start
    /// unclean (so the session never seals again from an older state).
    pub fn seal_unwritten(&self, to: &PeerId, body: &Body) -> Result<Option<Body>, CryptoError> {
        self.seal_with(to, body, false)
    }

    /// Writes (not flushed) the new states of sessions sealed with [`Olm::seal_unwritten`].
    pub fn write_unwritten(&self) -> Result<(), CryptoError> {
        let mut state = self.lock();
        self.write_unwritten_locked(&mut state, None)
    }

    /// Writes the unwritten sessions (of `peer` only, when given). A failure marks the store
    /// unclean (see [`Olm::seal_unwritten`]); the sessions stay listed, to be written later.
    fn write_unwritten_locked(
        &self,
        state: &mut State,
        peer: Option<&PeerId>,
    ) -> Result<(), CryptoError> {
        let mut result = Ok(());
        let unwritten = std::mem::take(&mut state.unwritten);
        for (who, id) in unwritten {
            if peer.is_some_and(|p| *p != who) || result.is_err() {
                state.unwritten.push((who, id));
                continue;
            }
            // A session trimmed or forgotten since has nothing left to write.
            let Some(kept) = state
                .sessions
                .get(&who)
                .and_then(|list| list.iter().find(|k| k.session.session_id() == id))
            else {
                continue;
            };
            let written = session_record(kept).and_then(|record| {
                Ok(self.store.set_raw(&session_key(&who, &id), Some(record))?)
            });
            if let Err(e) = written {
                self.store.mark_unclean();
                tracing::error!(peer = %who, error = %e, "cannot write a session's new state");
                state.unwritten.push((who, id));
                result = Err(e);
            }
        }
        result
    }

    fn seal_with(
        &self,
        to: &PeerId,
        body: &Body,
        write: bool,
    ) -> Result<Option<Body>, CryptoError> {
        let plaintext = cbor::encode(body, MAX_PLAINTEXT_BYTES)
            .map_err(|e| CryptoError::Encode(e.to_string()))?;
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let epoch = state.epoch;
        let sessions = self.sessions(&mut state, to)?;
        let Some(kept) = sessions.iter_mut().find(|k| k.epoch == epoch) else {
            return Ok(None);
        };
        let message = match kept.session.encrypt(&plaintext) {
            Ok(message) => message,
            Err(e) => return Err(CryptoError::Encode(e.to_string())),
        };
        kept.last_used = now;
        let id = kept.session.session_id();
        if write {
            let record = session_record(kept)?;
            self.store.set_raw(&session_key(to, &id), Some(record))?;
        } else if !state.unwritten.iter().any(|(p, i)| p == to && *i == id) {
            state.unwritten.push((*to, id));
        }
        let (message_type, ciphertext) = message.to_parts();
        let pre_key = message_type == usize::from(OLM_PRE_KEY);
        Ok(Some(Body::Olm(Sealed {
            message_type: if pre_key { OLM_PRE_KEY } else { OLM_NORMAL },
            ciphertext,
            identity: pre_key.then(|| self.identity.clone()),
            receipt: matches!(body, Body::Receipt { .. }),
        })))
    }

    /// Starts an outbound session with `peer` from a key claimed from it or its relays, after
    /// checking both signatures. Written (not flushed).
    pub fn start_session(
        &self,
        peer: &PeerId,
        identity: &SignedIdentity,
        key: &SignedKey,
        fallback: bool,
    ) -> Result<(), CryptoError> {
        identity.verify(peer)?;
        key.verify(peer, fallback)?;
        self.learn_identity(peer, identity)?;
        let mut state = self.lock();
        let session = state.account.create_outbound_session(
            SessionConfig::version_1(),
            Curve25519PublicKey::from_bytes(identity.key),
            Curve25519PublicKey::from_bytes(key.key),
        )?;
        state.clock += 1;
        let kept = Kept {
            session,
            last_used: state.clock,
            epoch: state.epoch,
        };
        self.store.set_raw(
            &session_key(peer, &kept.session.session_id()),
            Some(session_record(&kept)?),
        )?;
        let sessions = self.sessions(&mut state, peer)?;
        sessions.insert(0, kept);
        self.trim(peer, sessions)?;
        Ok(())
    }

    /// Drops the least recently used sessions beyond [`MAX_SESSIONS_PER_PEER`].
    fn trim(&self, peer: &PeerId, sessions: &mut Vec<Kept>) -> Result<(), CryptoError> {
        while sessions.len() > MAX_SESSIONS_PER_PEER {
            if let Some(old) = sessions.pop() {
                self.store
                    .set_raw(&session_key(peer, &old.session.session_id()), None)?;
            }
        }
        Ok(())
    }

    /// Forgets every session with `peer` (its next message claims a key again).
    pub fn forget_sessions(&self, peer: &PeerId) -> Result<(), CryptoError> {
        let mut state = self.lock();
        let sessions = self.sessions(&mut state, peer)?;
        for old in sessions.drain(..) {
            self.store
                .set_raw(&session_key(peer, &old.session.session_id()), None)?;
        }
        Ok(())
    }

    /// Decrypts an Olm body from `from`, lets `stage` add what it means to a batch, and writes
    /// that batch with the session's new state (and the account's, when a pre-key message used
    /// one of its one-time keys), the message first, so that any part a crash leaves is
    /// harmless. Nothing is written when `stage` fails.
    pub fn open<T, E: From<OpenError>>(
        &self,
        from: &PeerId,
        id: &MessageId,
        sealed: &Sealed,
        stage: impl FnOnce(Body, &mut Batch) -> Result<T, E>,
    ) -> Result<T, E> {
        let message = OlmMessage::from_parts(usize::from(sealed.message_type), &sealed.ciphertext)
            .map_err(|e| OpenError::Malformed(e.to_string()))?;
        // Every pre-key message carries the sender's signed identity: the one already on
        // record (checked when it was recorded) is not checked again.
        if let Some(identity) = &sealed.identity {
            if !self.knows(from, identity) {
                identity.verify(from).map_err(OpenError::from)?;
                self.learn_identity(from, identity)
                    .map_err(|e| OpenError::Undecryptable(e.to_string()))?;
            }
        }
        let mut state = self.lock();
        // What this peer's sessions sealed is on record before anything here can reload them
        // from the store (see `undo`).
        if let Err(e) = self.write_unwritten_locked(&mut state, Some(from)) {
            return Err(store_failure(e).into());
        }
        state.clock += 1;
        let now = state.clock;
        // Try the sessions we have: by session id for a pre-key message, else each in turn.
        let sessions = self
            .sessions(&mut state, from)
            .map_err(|e| OpenError::Undecryptable(e.to_string()))?;
        let mut opened: Option<(usize, Vec<u8>)> = None;
        let mut duplicate = false;
        let mut last_error = String::from("no session with the sender");
        let wanted = match &message {
            OlmMessage::PreKey(m) => Some(m.session_id()),
            OlmMessage::Normal(_) => None,
        };
        for (i, kept) in sessions.iter_mut().enumerate() {
            if wanted
                .as_ref()
                .is_some_and(|w| *w != kept.session.session_id())
            {
                continue;
            }
            match kept.session.decrypt(&message) {
                Ok(plaintext) => {
                    opened = Some((i, plaintext));
                    break;
                }
                Err(DecryptionError::MissingMessageKey(_)) => duplicate = true,
                Err(e) => last_error = e.to_string(),
            }
        }
        let mut batch = Batch::new();
        // A refused plaintext, a failed stage or write: the session moved on in memory only,
        // so the peer's sessions are reloaded from the store (the state before this message).
        let (plaintext, kept, account_changed) = match (opened, &message) {
            (Some((i, plaintext)), _) => (plaintext, sessions.remove(i), false),
            (None, _) if duplicate => return Err(OpenError::KeyGone.into()),
            (None, OlmMessage::PreKey(pre_key)) => {
                let known = self
                    .peer(from)
                    .map_err(|e| OpenError::Undecryptable(e.to_string()))?;
                let Some(known) = known else {
                    return Err(OpenError::Undecryptable(
                        "a pre-key message from a peer whose identity key is unknown".into(),
                    )
                    .into());
                };
                let result = state
                    .account
                    .create_inbound_session(
                        SessionConfig::version_1(),
                        Curve25519PublicKey::from_bytes(known.identity.key),
                        pre_key,
                    )
                    .map_err(|e| OpenError::Undecryptable(e.to_string()))?;
                let kept = Kept {
                    session: result.session,
                    last_used: now,
                    epoch: state.epoch,
                };
                (result.plaintext, kept, true)
            }
            (None, OlmMessage::Normal(_)) => {
                return Err(OpenError::Undecryptable(last_error).into());
            }
        };
        let mut kept = kept;
        kept.last_used = now;
        let inner: Body = match cbor::decode::<Body>(&plaintext, MAX_PLAINTEXT_BYTES) {
            Ok(body) => body,
            Err(e) => {
                drop(kept);
                self.undo(&mut state, from, account_changed);
                return Err(OpenError::BadInner(e.to_string()).into());
            }
        };
        if let Err(e) = inner.validate() {
            drop(kept);
            self.undo(&mut state, from, account_changed);
            return Err(OpenError::BadInner(e.to_string()).into());
        }
        if matches!(
            inner,
            Body::Olm(_) | Body::Mls { .. } | Body::GroupOp(_) | Body::Resend { .. }
        ) {
            drop(kept);
            self.undo(&mut state, from, account_changed);
            return Err(OpenError::BadInner("not a one-to-one content body".into()).into());
        }
        let is_receipt = matches!(inner, Body::Receipt { .. });
        let staged = match stage(inner, &mut batch) {
            Ok(staged) => staged,
            Err(e) => {
                self.undo(&mut state, from, account_changed);
                return Err(e);
            }
        };
        if is_receipt {
            // Receipts are not stored as messages: this marks the copy that may come again
            // (after what the receipt changed).
            batch.put_raw(opened_key(from, id), Vec::new());
        }
        let written = (|| -> Result<(), CryptoError> {
            // A message that once did not decrypt is now replaced.
            batch.remove_raw(undecryptable_key(from, id));
            // The chain's window moves on, and a held copy of this message goes.
            let at = Position::of_message(&message);
            let mut chains = self.chains(from)?;
            chains.opened(&at);
            batch.put_raw(chains_key(from), encode(&chains)?);
            batch.remove_raw(order::held_key(&peer_part(from), &at, id.as_bytes()));
            batch.put_raw(
                session_key(from, &kept.session.session_id()),
                session_record(&kept)?,
            );
            if account_changed {
                batch.put_raw(
                    ACCOUNT_KEY.to_vec(),
                    encode(&AccountRecord {
                        pickle: state.account.pickle(),
                        fallback: state.fallback,
                    })?,
                );
            }
            // In order, not as one sled batch: sled's `apply_batch` takes a process-wide lock
            // that can deadlock with a read splitting a node while the log waits for a
            // segment (seen as a hang under load). The order makes any first part that a
            // crash leaves harmless: what the message says, then the message, then the
            // session's new state. Without the state, a copy that comes again is known by its
            // record (or receipt mark) and not opened again; the old state only still holds a
            // key already used.
            self.store.apply_in_order(batch)?;
            Ok(())
        })();
        if let Err(e) = written {
            self.undo(&mut state, from, account_changed);
            return Err(store_failure(e).into());
        }
        let sessions = state.sessions.entry(*from).or_default();
        sessions.insert(0, kept);
        if let Err(e) = self.trim(from, sessions) {
            tracing::warn!(peer = %from, error = %e, "cannot drop an old session");
        }
        Ok(staged)
    }

    /// Forgets what an open that wrote nothing changed in memory: the store holds the state
    /// before it, which opens the message again when it comes back.
    fn undo(&self, state: &mut State, peer: &PeerId, account_changed: bool) {
        self.reload(state, peer);
        if account_changed {
            self.reload_account(state);
        }
    }

    /// Drops the in-memory sessions of `peer`: the next use loads them from the store.
    fn reload(&self, state: &mut State, peer: &PeerId) {
        state.sessions.remove(peer);
    }

    fn reload_account(&self, state: &mut State) {
        match self.store.get_raw(ACCOUNT_KEY) {
            Ok(Some(bytes)) => match decode::<AccountRecord>("account", &bytes) {
                Ok(record) => state.account = Account::from_pickle(record.pickle),
                Err(e) => tracing::error!(error = %e, "cannot reload the Olm account"),
            },
            Ok(None) => tracing::error!("the Olm account is gone from the store"),
            Err(e) => tracing::error!(error = %e, "cannot reload the Olm account"),
        }
    }

    /// How far `peer`'s chains were opened.
    fn chains(&self, peer: &PeerId) -> Result<Chains, CryptoError> {
        match self.store.get_raw(&chains_key(peer))? {
            Some(bytes) => decode("chains", &bytes),
            None => Ok(Chains::default()),
        }
    }

    /// Whether a sealed message of `from` may be opened now, or must wait for the messages
    /// before it in its chain (see [`order`]). One that does not parse is opened (and refused
    /// there, with the reason).
    pub fn verdict(&self, from: &PeerId, sealed: &Sealed) -> Result<Verdict, CryptoError> {
        let Some(at) = Position::of(sealed) else {
            return Ok(Verdict::Open);
        };
        let _state = self.lock();
        Ok(self.chains(from)?.verdict(&at))
    }

    /// Keeps a sealed message of `from` until the ones before it are opened (written, not
    /// flushed): `false` when `from` already has [`order::MAX_HELD_PER_PEER`] held.
    pub fn hold(
        &self,
        from: &PeerId,
        id: &MessageId,
        sealed: &Sealed,
        envelope: Vec<u8>,
        now_ms: u64,
    ) -> Result<bool, CryptoError> {
        let Some(at) = Position::of(sealed) else {
            return Err(CryptoError::Damaged(
                "an Olm message that does not parse".into(),
            ));
        };
        let prefix = order::held_prefix(&peer_part(from));
        if self.store.scan_raw(&prefix)?.len() >= order::MAX_HELD_PER_PEER {
            return Ok(false);
        }
        let held = encode(&Held {
            envelope,
            held_at_ms: now_ms,
        })?;
        self.store.set_raw(
            &order::held_key(&peer_part(from), &at, id.as_bytes()),
            Some(held),
        )?;
        Ok(true)
    }

    /// The held messages of `from` that may be opened now, in chain order: their keys (to
    /// remove once dealt with) and envelopes.
    pub fn ready(&self, from: &PeerId) -> Result<Vec<HeldEntry>, CryptoError> {
        let prefix = order::held_prefix(&peer_part(from));
        let held = self.store.scan_raw(&prefix)?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let chains = {
            let _state = self.lock();
            self.chains(from)?
        };
        let mut out = Vec::new();
        for (key, value) in held {
            let open = key
                .get(prefix.len()..)
                .and_then(order::held_position)
                .is_none_or(|at| chains.verdict(&at) == Verdict::Open);
            if !open {
                continue;
            }
            match decode::<Held>("held message", &value) {
                Ok(held) => out.push((key, held.envelope)),
                // Nothing to open: it goes when the caller removes it.
                Err(e) => {
                    tracing::warn!(peer = %from, error = %e, "dropping a damaged held message");
                    out.push((key, Vec::new()));
                }
            }
        }
        Ok(out)
    }

    /// Removes a held message (not flushed).
    pub fn forget_held(&self, key: &[u8]) -> Result<(), CryptoError> {
        Ok(self.store.set_raw(key, None)?)
    }

    /// The peers with a chain whose oldest held message waited `patience`: each such chain
    /// skips to that message (the ones before it are given up on and asked for again if they
    /// come), so that its held messages open.
    pub fn give_up_waiting(
        &self,
        now_ms: u64,
        patience: std::time::Duration,
    ) -> Result<Vec<PeerId>, CryptoError> {
        let patience = u64::try_from(patience.as_millis()).unwrap_or(u64::MAX);
        let mut overdue: HashMap<PeerId, Vec<Position>> = HashMap::new();
        let mut peers = Vec::new();
        for (key, value) in self.store.scan_raw(b"x/h/")? {
            let Some((peer, rest)) = key.get(4..).and_then(split_peer) else {
                continue;
            };
            if !peers.contains(&peer) {
                peers.push(peer);
            }
            let (Some(at), Ok(held)) = (
                order::held_position(rest),
                decode::<Held>("held message", &value),
            ) else {
                continue;
            };
            if now_ms.saturating_sub(held.held_at_ms) < patience {
                continue;
            }
            let chains = overdue.entry(peer).or_default();
            // Keys list a chain in index order: its first overdue one is its lowest held.
            if !chains.iter().any(|c| c.ratchet == at.ratchet) {
                chains.push(at);
            }
        }
        let _state = self.lock();
        for (peer, positions) in &overdue {
            let mut chains = self.chains(peer)?;
            for at in positions {
                tracing::warn!(%peer, index = at.index, "gave up waiting for earlier messages of a chain; opening what came");
                chains.skip_to(at);
            }
            self.store
                .set_raw(&chains_key(peer), Some(encode(&chains)?))?;
        }
        Ok(peers)
    }

    /// Notes in `batch` that message `id` of `from` did not decrypt.
    pub fn mark_undecryptable(&self, batch: &mut Batch, from: &PeerId, id: &MessageId) {
        batch.put_raw(undecryptable_key(from, id), Vec::new());
    }

    /// Whether envelope `id` of `from` was opened as a receipt.
    pub fn was_opened(&self, from: &PeerId, id: &MessageId) -> Result<bool, CryptoError> {
        Ok(self.store.get_raw(&opened_key(from, id))?.is_some())
    }

    /// Whether message `id` of `from` is stored as one that did not decrypt.
    pub fn is_undecryptable(&self, from: &PeerId, id: &MessageId) -> Result<bool, CryptoError> {
        Ok(self.store.get_raw(&undecryptable_key(from, id))?.is_some())
    }

    /// What this node knows of `peer`'s identity key.
    pub fn peer(&self, peer: &PeerId) -> Result<Option<PeerRecord>, CryptoError> {
        self.store
            .get_raw(&peer_key(peer))?
            .map(|bytes| decode("peer identity", &bytes))
            .transpose()
    }

    /// Whether `identity`, signature included, is the one on record for `peer`.
    fn knows(&self, peer: &PeerId, identity: &SignedIdentity) -> bool {
        matches!(self.peer(peer), Ok(Some(known)) if known.identity == *identity)
    }

    /// Records `peer`'s (checked) identity key; a key that replaces another one is reported,
    /// unverifies the peer, and its old sessions are dropped.
    pub fn learn_identity(
        &self,
        peer: &PeerId,
        identity: &SignedIdentity,
    ) -> Result<(), CryptoError> {
        identity.verify(peer)?;
        let known = self.peer(peer)?;
        let changed = match &known {
            Some(known) if known.identity.key == identity.key => return Ok(()),
            Some(_) => true,
            None => false,
        };
        let record = PeerRecord {
            identity: identity.clone(),
            verified: false,
            changed,
        };
        self.store
            .set_raw(&peer_key(peer), Some(encode(&record)?))?;
        if changed {
            tracing::warn!(%peer, "the peer's identity key changed");
            self.forget_sessions(peer)?;
            (self.on_identity_changed)(*peer);
        }
        Ok(())
    }

    /// Records that the user verified `peer`'s current identity key. `false` when none is known.
    pub fn mark_verified(&self, peer: &PeerId) -> Result<bool, CryptoError> {
        let Some(mut record) = self.peer(peer)? else {
            return Ok(false);
        };
        record.verified = true;
        record.changed = false;
        self.store
            .set_raw(&peer_key(peer), Some(encode(&record)?))?;
        Ok(true)
    }

    /// A fresh one-time key, signed, for a claim made to this node itself. Written (not
    /// flushed): flush before answering.
    pub fn claim_own(&self) -> Result<(SignedIdentity, SignedKey), CryptoError> {
        let mut state = self.lock();
        let created = state.account.generate_one_time_keys(1).created;
        let Some(key) = created.first() else {
            return Err(CryptoError::Encode("no one-time key generated".into()));
        };
        let signed = SignedKey::sign(&self.key, key.to_bytes(), false)?;
        state.account.mark_keys_as_published();
        self.write_account(&state)?;
        Ok((self.identity.clone(), signed))
    }

    /// A bundle with `count` new one-time keys (at most the protocol's maximum) and the fallback
    /// key. Written (not flushed): flush before publishing.
    pub fn bundle(&self, count: usize) -> Result<Bundle, CryptoError> {
        let count = count.min(kith_protocol::prekeys::MAX_ONE_TIME_KEYS);
        let mut state = self.lock();
        let created = if count > 0 {
            state.account.generate_one_time_keys(count).created
        } else {
            Vec::new()
        };
        let one_time_keys = created
            .iter()
            .map(|k| SignedKey::sign(&self.key, k.to_bytes(), false))
            .collect::<Result<Vec<_>, _>>()?;
        let fallback = state
            .fallback
            .map(|k| SignedKey::sign(&self.key, k, true))
            .transpose()?;
        state.account.mark_keys_as_published();
        self.write_account(&state)?;
        Ok(Bundle {
            identity: self.identity.clone(),
            one_time_keys,
            fallback,
        })
    }

    fn write_account(&self, state: &State) -> Result<(), CryptoError> {
        let record = AccountRecord {
            pickle: state.account.pickle(),
            fallback: state.fallback,
        };
        self.store.set_raw(ACCOUNT_KEY, Some(encode(&record)?))?;
        Ok(())
    }

    /// This node's peer id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Whether `claimer` may claim one of this node's own keys now (and counts it).
    pub fn may_claim(&self, claimer: &PeerId, now_ms: u64) -> bool {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(claimer, now_ms)
    }

    /// Waits for the turn to publish keys.
    pub async fn publishing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.publishing.lock().await
    }

    /// Notes that a relay holds this node's keys.
    pub fn note_published(&self) {
        if !*self.published.borrow() {
            if let Err(e) = self.store.set_raw(PUBLISHED_KEY, Some(Vec::new())) {
                tracing::warn!(error = %e, "cannot note the first key publication");
            }
            self.published.send_replace(true);
        }
    }

    /// Waits until this node's keys were published to a relay at least once (now or by an
    /// earlier run).
    pub async fn published(&self) {
        let mut published = self.published.subscribe();
        let _ = published.wait_for(|p| *p).await;
    }
}
