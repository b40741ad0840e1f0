//! Strangers and blocked peers: who may reach this node and what happens to what they send.
//!
//! A **stranger** is a peer that is not one of the user's contacts. Under `reach = everyone` (the
//! default) a stranger's one-to-one messages are stored like any other (the sender sees
//! `delivered`), but their conversation is a **request**: it is marked `R/<peer>` in the store,
//! left out of `kith messages` and the conversation list, no `Read` receipt goes back, and a
//! file it sends never downloads by itself. `kith requests` lists requests; accepting one makes
//! the peer a contact (and the messages appear in its conversation), blocking one drops the
//! messages and blocks the peer. Adding the peer as a contact any other way accepts it too.
//!
//! Under `reach = contacts` the node refuses strangers' envelopes (`Reject::Refused`, nothing
//! stored, no tick), and its relays refuse strangers' deposits (the policy rides with the
//! presence heartbeats, [`kith_protocol::presence::Policy`]).
//!
//! A **blocked** peer (`B/<peer>`) gets nothing through: its envelopes (messages, receipts,
//! group messages) are refused with `Reject::Refused`, its typing notices and presence queries
//! are ignored, and the relays refuse its deposits into this user's mailbox. `Refused` is not
//! retried: the sender's message ends `failed` with the reason.
//!
//! The lists live in memory (checked on every inbound envelope) and on disk.
//!
//! Requests are bounded, since identities are free: at most [`MAX_REQUESTS`] strangers have a
//! request at once, and a request holds at most [`MAX_REQUEST_MESSAGES`] messages and
//! [`MAX_REQUEST_BYTES`] of bodies. Beyond them a stranger's one-to-one envelopes are refused
//! (`Refused`: its message ends `failed`, nothing stored) until the user accepts or blocks
//! requests. Without them a flood of fresh identities fills the node's disk.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kith_protocol::presence::Reach;
use kith_protocol::{Destination, Envelope, Reject};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::core::hooks::{Feature, Gate};
use crate::core::store::{Batch, Direction, Store, StoreError};
use crate::core::{ContactView, Node, NodeError, NodeEvent};
use futures::future::BoxFuture;

/// Longest preview of a request's last message, in characters.
const PREVIEW_CHARS: usize = 80;

/// Strangers that may have a request at once.
pub const MAX_REQUESTS: usize = 500;

/// Messages a stranger's request may hold.
pub const MAX_REQUEST_MESSAGES: u32 = 200;

/// Bytes of message bodies a stranger's request may hold (texts, file references).
pub const MAX_REQUEST_BYTES: u64 = 256 * 1024;

/// The store key of a request (`R/`) or a block (`B/`) of `peer`.
fn key(prefix: &[u8], peer: &PeerId) -> Vec<u8> {
    let bytes = peer.to_bytes();
    let mut key = Vec::with_capacity(prefix.len() + 1 + bytes.len());
    key.extend_from_slice(prefix);
    key.push(bytes.len() as u8);
    key.extend_from_slice(&bytes);
    key
}

const REQUEST: &[u8] = b"R/";
const BLOCKED: &[u8] = b"B/";

/// The peers under `prefix` in the store; keys that do not parse are skipped with a warning.
fn load_peers(store: &Store, prefix: &[u8]) -> Result<Vec<PeerId>, StoreError> {
    let mut out = Vec::new();
    for (k, _) in store.scan_raw(prefix)? {
        let peer = k
            .get(prefix.len() + 1..)
            .and_then(|bytes| PeerId::from_bytes(bytes).ok());
        match peer {
            Some(peer) => out.push(peer),
            None => tracing::warn!(key = ?k, "skipping a damaged strangers entry"),
        }
    }
    Ok(out)
}

/// The requests and blocks, in memory.
#[derive(Debug, Default)]
pub(crate) struct State {
    lists: Mutex<Lists>,
}

#[derive(Debug, Default)]
struct Lists {
    /// Strangers whose messages wait in the requests list.
    requests: HashMap<PeerId, Request>,
    blocked: HashSet<PeerId>,
}

/// A stranger's request, in memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Request {
    /// Whether the `request` event for it went out.
    announced: bool,
    /// Messages it holds.
    messages: u32,
    /// Bytes of their bodies.
    bytes: u64,
}

/// Why a stranger's envelope finds no room in the requests list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum NoRoom {
    #[error("the requests list holds {MAX_REQUESTS} strangers already")]
    Requests,
    #[error("its request holds {MAX_REQUEST_MESSAGES} messages already")]
    Messages,
    #[error("its request would hold more than {MAX_REQUEST_BYTES} bytes")]
    Bytes,
}

impl Lists {
    /// Whether a stranger's envelope of `bytes` (its body) fits: its request has room, or it
    /// has none yet and the list has room for one more.
    fn room(&self, from: &PeerId, bytes: usize) -> Result<(), NoRoom> {
        let Some(request) = self.requests.get(from) else {
            return if self.requests.len() >= MAX_REQUESTS {
                Err(NoRoom::Requests)
            } else {
                Ok(())
            };
        };
        if request.messages >= MAX_REQUEST_MESSAGES {
            return Err(NoRoom::Messages);
        }
        if request.bytes.saturating_add(bytes as u64) > MAX_REQUEST_BYTES {
            return Err(NoRoom::Bytes);
        }
        Ok(())
    }

    /// Counts a message of `bytes` into `from`'s request, opening it; true if it was opened.
    fn count(&mut self, from: &PeerId, bytes: usize) -> bool {
        let opened = !self.requests.contains_key(from);
        let request = self.requests.entry(*from).or_default();
        request.messages = request.messages.saturating_add(1);
        request.bytes = request.bytes.saturating_add(bytes as u64);
        opened
    }
}

impl State {
    /// The lists as the store holds them.
    pub(crate) fn load(store: &Store) -> Result<Self, StoreError> {
        let mut requests = HashMap::new();
        for peer in load_peers(store, REQUEST)? {
            // What it holds, counted as the texts it sent (a body is a little larger).
            let (messages, bytes) = store
                .conversation(&peer)?
                .iter()
                .filter(|m| m.direction == Direction::In)
                .fold((0u32, 0u64), |(n, b), m| {
                    (n.saturating_add(1), b.saturating_add(m.text.len() as u64))
                });
            let request = Request {
                // Announced before the restart (or never to be: nobody was listening then).
                announced: true,
                messages,
                bytes,
            };
            requests.insert(peer, request);
        }
        let lists = Lists {
            requests,
            blocked: load_peers(store, BLOCKED)?.into_iter().collect(),
        };
        Ok(Self {
            lists: Mutex::new(lists),
        })
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `peer` is blocked.
    pub(crate) fn is_blocked(&self, peer: &PeerId) -> bool {
        self.lists().blocked.contains(peer)
    }

    /// Whether `peer`'s messages wait in the requests list.
    pub(crate) fn is_request(&self, peer: &PeerId) -> bool {
        self.lists().requests.contains_key(peer)
    }

    /// The blocked peers.
    pub(crate) fn blocked(&self) -> Vec<PeerId> {
        self.lists().blocked.iter().copied().collect()
    }

    /// The peers with a request.
    fn requests(&self) -> Vec<PeerId> {
        self.lists().requests.keys().copied().collect()
    }
}

/// One entry of `kith requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestView {
    /// The stranger's peer id.
    pub peer_id: String,
    /// Its display name, if known (a stranger's is not, today).
    pub name: Option<String>,
    /// How many messages it sent.
    pub messages: usize,
    /// The sender's clock of its first message (unix ms).
    pub first_ms: u64,
    /// The sender's clock of its last message (unix ms).
    pub last_ms: u64,
    /// The start of its last message (`[file]` for a file).
    pub preview: String,
}

/// What `kith contact block` / `unblock` and `kith requests block` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockView {
    /// The peer.
    pub peer_id: String,
    /// Whether it is blocked now.
    pub blocked: bool,
    /// Messages of its request that were dropped.
    pub dropped: usize,
}

impl Node {
    /// Refuses an inbound envelope its sender may not deliver: anything from a blocked peer,
    /// and a one-to-one envelope from a stranger under `reach = contacts`. Logged at debug
    /// only: a refused peer can send a lot, and its refusals are not faults.
    pub(crate) fn refuse_stranger(&self, via: PeerId, envelope: &Envelope) -> Result<(), Reject> {
        let from = envelope.from;
        if from == self.peer_id() {
            return Ok(());
        }
        if self.strangers().is_blocked(&from) {
            tracing::debug!(%via, %from, id = %envelope.id, "refusing an envelope from a blocked peer");
            return Err(Reject::Refused);
        }
        if !matches!(envelope.to, Destination::Peer(_)) || self.contact_of(&from).is_some() {
            return Ok(());
        }
        if self.settings().reach == Reach::Contacts {
            tracing::debug!(%via, %from, id = %envelope.id, "refusing a stranger's envelope (reach: contacts)");
            return Err(Reject::Refused);
        }
        let room = self.strangers().lists().room(&from, envelope.body.len());
        if let Err(why) = room {
            // A copy of a message its request already holds (its answer was lost) is answered
            // as stored, not refused: the sender's tick must stay true.
            let stored = matches!(why, NoRoom::Messages | NoRoom::Bytes)
                && matches!(self.store().message(&from, &envelope.id), Ok(Some(_)));
            if !stored {
                tracing::debug!(%via, %from, id = %envelope.id, %why, "refusing a stranger's envelope");
                return Err(Reject::Refused);
            }
        }
        Ok(())
    }

    /// A chat message of `from` with a body of `bytes` is being stored in `batch`: a
    /// stranger's opens (or adds to) a request.
    pub(crate) fn note_request(&self, from: &PeerId, bytes: usize, batch: &mut Batch) {
        if *from == self.peer_id() || self.contact_of(from).is_some() {
            return;
        }
        let mut lists = self.strangers().lists();
        if lists.count(from, bytes) {
            batch.put_raw(
                key(REQUEST, from),
                crate::clock::now_ms().to_be_bytes().to_vec(),
            );
        }
    }

    /// The event for a flushed chat message of `from`: `message` as always, or for a request
    /// `request` the first time and nothing afterwards (its messages are not shown until the
    /// request is accepted).
    pub(crate) fn request_event(&self, from: &PeerId) -> Option<Option<NodeEvent>> {
        let mut lists = self.strangers().lists();
        let request = lists.requests.get_mut(from)?;
        if request.announced {
            return Some(None);
        }
        request.announced = true;
        Some(Some(NodeEvent::Request {
            peer_id: from.to_string(),
            name: None,
        }))
    }

    /// Whether a file of `from` may download without being asked: not a stranger's.
    pub(crate) fn auto_download_from(&self, from: &PeerId) -> bool {
        *from == self.peer_id() || self.contact_of(from).is_some()
    }

    /// Every request, newest last message first.
    pub fn requests(&self) -> Result<Vec<RequestView>, NodeError> {
        let mut out = Vec::new();
        for peer in self.strangers().requests() {
            let incoming: Vec<_> = self
                .store()
                .conversation(&peer)?
                .into_iter()
                .filter(|m| m.direction == Direction::In)
                .collect();
            let Some(last) = incoming.iter().max_by_key(|m| (m.sent_at_ms, m.lamport)) else {
                continue;
            };
            let preview = if last.text.is_empty() {
                "[file]".to_owned()
            } else {
                last.text.chars().take(PREVIEW_CHARS).collect()
            };
            out.push(RequestView {
                peer_id: peer.to_string(),
                name: None,
                messages: incoming.len(),
                first_ms: incoming.iter().map(|m| m.sent_at_ms).min().unwrap_or(0),
                last_ms: last.sent_at_ms,
                preview,
            });
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.last_ms));
        Ok(out)
    }

    /// The peer of a request: its peer id, or the unique request whose peer id ends with `who`.
    fn request_peer(&self, who: &str) -> Result<PeerId, NodeError> {
        let who = who.trim();
        if let Ok(peer) = who.parse::<PeerId>() {
            if self.strangers().is_request(&peer) {
                return Ok(peer);
            }
        }
        let matches: Vec<PeerId> = self
            .strangers()
            .requests()
            .into_iter()
            .filter(|p| !who.is_empty() && p.to_string().ends_with(who))
            .collect();
        match matches.as_slice() {
            [peer] => Ok(*peer),
            [] => Err(NodeError::UnknownRecipient(format!(
                "{who} (no request from it; `kith requests` lists them)"
            ))),
            _ => Err(NodeError::Invalid(format!(
                "{who:?} matches several requests; give the whole peer id"
            ))),
        }
    }

    /// Accepts a request: the peer becomes contact `name` (by default the last 8 characters of
    /// its peer id) and its messages show in its conversation.
    pub async fn accept_request(
        &self,
        who: &str,
        name: Option<&str>,
    ) -> Result<ContactView, NodeError> {
        let peer = self.request_peer(who)?;
        let id = peer.to_string();
        let default_name = id
            .get(id.len().saturating_sub(8)..)
            .unwrap_or(&id)
            .to_owned();
        let name = name.unwrap_or(&default_name);
        // Adding the contact clears the request (see `forget_request`).
        self.add_contact(name, &id, &[]).await
    }

    /// The peer became a contact: its request, if any, is over.
    pub(crate) async fn forget_request(&self, peer: &PeerId) -> Result<(), NodeError> {
        if self.strangers().lists().requests.remove(peer).is_none() {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.remove_raw(key(REQUEST, peer));
        self.store().apply(batch)?;
        self.store().flush().await?;
        Ok(())
    }

    /// Blocks the sender of a request and drops its messages.
    pub async fn block_request(&self, who: &str) -> Result<BlockView, NodeError> {
        let peer = self.request_peer(who)?;
        self.block_peer(peer, true).await
    }

    /// Blocks a contact (by name) or any peer (by peer id). Its conversation stays.
    pub async fn block(&self, who: &str) -> Result<BlockView, NodeError> {
        let peer = self.resolve(who)?;
        self.block_known(peer).await
    }

    /// Blocks `peer`; a request's messages go with it, whichever way it is blocked.
    async fn block_known(&self, peer: PeerId) -> Result<BlockView, NodeError> {
        let drop_request = self.strangers().is_request(&peer);
        self.block_peer(peer, drop_request).await
    }

    /// Unblocks a contact (by name) or any peer (by peer id).
    pub async fn unblock(&self, who: &str) -> Result<BlockView, NodeError> {
        let peer = self.resolve(who)?;
        let was = self.strangers().lists().blocked.remove(&peer);
        if was {
            let mut batch = Batch::new();
            batch.remove_raw(key(BLOCKED, &peer));
            self.store().apply(batch)?;
            self.store().flush().await?;
            self.plugins().presence.wake();
        }
        Ok(BlockView {
            peer_id: peer.to_string(),
            blocked: false,
            dropped: 0,
        })
    }

    async fn block_peer(&self, peer: PeerId, drop_request: bool) -> Result<BlockView, NodeError> {
        if peer == self.peer_id() {
            return Err(NodeError::Invalid("you cannot block yourself".into()));
        }
        let mut batch = Batch::new();
        let mut dropped = 0;
        if drop_request {
            for msg in self.store().conversation(&peer)? {
                batch.remove_conversation_message(&msg);
                dropped += 1;
            }
            batch.remove_raw(key(REQUEST, &peer));
        }
        batch.put_raw(
            key(BLOCKED, &peer),
            crate::clock::now_ms().to_be_bytes().to_vec(),
        );
        {
            let mut lists = self.strangers().lists();
            lists.blocked.insert(peer);
            if drop_request {
                lists.requests.remove(&peer);
            }
        }
        self.store().apply(batch)?;
        self.store().flush().await?;
        // The relays learn the new policy with the next heartbeat, sent now.
        self.plugins().presence.wake();
        tracing::info!(%peer, dropped, "blocked");
        Ok(BlockView {
            peer_id: peer.to_string(),
            blocked: true,
            dropped,
        })
    }
}

// ---- plugged into the core ------------------------------------------------------------------

impl Node {
    /// The strangers feature's state.
    pub(crate) fn strangers(&self) -> &State {
        self.feature::<State>()
            .expect("the strangers feature is plugged in by `start`")
    }
}

impl Feature for State {}

impl Gate for State {
    fn is_request(&self, peer: &PeerId) -> bool {
        State::is_request(self, peer)
    }

    fn is_blocked(&self, peer: &PeerId) -> bool {
        State::is_blocked(self, peer)
    }

    fn blocked(&self) -> Vec<PeerId> {
        State::blocked(self)
    }

    fn refuse(&self, node: &Node, via: PeerId, envelope: &Envelope) -> Result<(), Reject> {
        node.refuse_stranger(via, envelope)
    }

    fn note(&self, node: &Node, from: &PeerId, bytes: usize, batch: &mut Batch) {
        node.note_request(from, bytes, batch);
    }

    fn announce(&self, node: &Node, from: &PeerId) -> Option<Option<NodeEvent>> {
        node.request_event(from)
    }

    fn auto_download_from(&self, node: &Node, from: &PeerId) -> bool {
        node.auto_download_from(from)
    }

    fn accepted<'a>(
        &'a self,
        node: &'a Node,
        peer: &'a PeerId,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(node.forget_request(peer))
    }

    fn block<'a>(&'a self, node: &'a Node, peer: PeerId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move { node.block_known(peer).await.map(|_| ()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_in_number_messages_and_bytes() {
        let mut lists = Lists::default();
        let first = PeerId::random();
        assert_eq!(lists.room(&first, 100), Ok(()));
        assert!(
            lists.count(&first, 100),
            "the first message opens a request"
        );
        assert!(!lists.count(&first, 100));
        for _ in 2..MAX_REQUEST_MESSAGES {
            assert_eq!(lists.room(&first, 1), Ok(()));
            lists.count(&first, 1);
        }
        assert_eq!(lists.room(&first, 1), Err(NoRoom::Messages));

        let big = PeerId::random();
        lists.count(&big, MAX_REQUEST_BYTES as usize - 10);
        assert_eq!(lists.room(&big, 10), Ok(()));
        assert_eq!(lists.room(&big, 11), Err(NoRoom::Bytes));

        while lists.requests.len() < MAX_REQUESTS {
            lists.count(&PeerId::random(), 1);
        }
        assert_eq!(lists.room(&PeerId::random(), 1), Err(NoRoom::Requests));
        // A stranger with a request keeps what its request has room for.
        assert_eq!(lists.room(&big, 10), Ok(()));
    }
}
