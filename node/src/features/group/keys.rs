//! A group's keys: its MLS state ([`crate::core::crypto::mls`]) kept in step with its chain.
//!
//! The chain of signed operations at the group's home relay is MLS's delivery service: every
//! operation that changes the group's keys (create with members, add, remove, update) carries
//! one commit, made in the epoch the chain is at, and the relay takes one commit per epoch in
//! chain order ([`State::apply`]). The commit and an add's Welcome travel beside the operation
//! (a [`Handshake`], matched by the digests the operation signs), so the operation announced
//! through members' mailboxes stays small; members fetch handshakes with the chain.
//!
//! - **Committing.** [`Node::submit_change`] makes this node's commit (claiming a key package
//!   of a member to add), writes it pending, submits the operation with it, and on `Applied`
//!   merges it in the same durable write as the new state; on a conflict it drops it (the
//!   caller catches up and tries again).
//! - **Following.** [`Node::follow_op`] takes each operation of the chain in order: another
//!   member's commit is processed (it must add exactly whom the operation adds and remove no
//!   current member), this node's own pending commit is merged, and a Welcome for an add that
//!   names this node is joined.
//! - **Leaving.** A leaver cannot commit its own removal in MLS. Its `Leave` operation takes it
//!   out of the chain's membership at once; the next member to send or commit first commits an
//!   `Update` that removes every leaver from the keys ([`Node::tidy_keys`]). A leaver can read
//!   only what members send before they have seen its leave.
//! - **Post-compromise security.** Before sending, a member whose last commit in the group is
//!   older than [`Config::group_rekey_after`](crate::Config) or who has sent
//!   [`Config::group_rekey_messages`](crate::Config) since commits a self-update; `kith group
//!   rekey` does so at once ([`Node::change_group`]).
//! - **Messages.** [`Node::seal_group_body`] encrypts a body as an MLS private message of the
//!   current epoch, [`Node::open_group_body`] decrypts one, first catching up on the chain when
//!   it is of a later epoch. Each state change is written in the same durable write as the
//!   message it belongs to.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kith_protocol::group::{Change, Crypto, Handshake, Op, State};
use kith_protocol::prekeys::{Request as KeysRequest, Response as KeysResponse};
use kith_protocol::{cbor, Body, GroupId, Reject};
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;
use tokio::sync::OwnedMutexGuard;

use crate::clock::now_ms;
use crate::core::crypto::mls::{self, Applied, Commit, Member, MlsError};
use crate::core::store::Batch;
use crate::core::{Node, NodeError};
use crate::net::peer_of;

/// A group's MLS state, locked: calls on it, and the writes of what they change, happen one
/// at a time.
pub(crate) type Locked = OwnedMutexGuard<Option<mls::Group>>;

/// Key packages claimed at once when a group is created.
const CLAIMS_AT_ONCE: usize = 16;

/// After an update before a send failed (the relay unreachable, say), sends to the group go
/// in the current epoch without trying again for this long, so that they do not each wait.
const TIDY_BACKOFF: Duration = Duration::from_secs(60);

/// The node's MLS client and the groups' states it has opened.
pub(crate) struct Keys {
    member: Member,
    open: Mutex<HashMap<GroupId, Arc<tokio::sync::Mutex<Option<mls::Group>>>>>,
    /// Messages sent per group since this node's last commit in it.
    sent: Mutex<HashMap<GroupId, u64>>,
    /// When an update before a send last failed, per group.
    tidy_failed: Mutex<HashMap<GroupId, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Keys {
    pub(crate) fn new(member: Member) -> Self {
        Self {
            member,
            open: Mutex::default(),
            sent: Mutex::default(),
            tidy_failed: Mutex::default(),
        }
    }

    fn slot(&self, id: &GroupId) -> Arc<tokio::sync::Mutex<Option<mls::Group>>> {
        lock(&self.open).entry(*id).or_default().clone()
    }
}

fn keys_error(e: MlsError) -> NodeError {
    NodeError::Invalid(format!("group keys: {e}"))
}

/// Where this node's last commit time in a group is kept (milliseconds, big-endian).
fn rekeyed_key(group: &GroupId) -> Vec<u8> {
    let mut key = b"group/rekeyed/".to_vec();
    key.extend_from_slice(group.as_bytes());
    key
}

/// The members a change adds.
fn adds(change: &Change) -> BTreeSet<PeerId> {
    match change {
        Change::Create { members, .. } => members.clone(),
        Change::Add { member } => BTreeSet::from([*member]),
        _ => BTreeSet::new(),
    }
}

/// Peers still in the group's keys that the chain no longer counts as members (leavers).
pub(crate) fn leftovers(state: &State, keys: &mls::Group) -> BTreeSet<PeerId> {
    keys.members()
        .into_iter()
        .filter(|p| !state.is_member(p))
        .collect()
}

fn handshake_of(commit: Commit) -> Handshake {
    Handshake {
        commit: ByteBuf::from(commit.commit),
        welcome: commit.welcome.map(ByteBuf::from),
    }
}

impl Node {
    fn keys(&self) -> &Keys {
        &self.groups().keys
    }

    /// The group's MLS state, locked (loaded from the store the first time).
    pub(crate) async fn lock_keys(&self, id: &GroupId) -> Result<Locked, NodeError> {
        let mut slot = self.keys().slot(id).lock_owned().await;
        if slot.is_none() {
            *slot = self.keys().member.load(id).map_err(keys_error)?;
        }
        Ok(slot)
    }

    /// Writes what the group's state changed, with `batch`, durably.
    async fn keep(&self, keys: &mls::Group, mut batch: Batch) -> Result<(), NodeError> {
        keys.stage(&mut batch);
        self.store().commit(batch).await?;
        Ok(())
    }

    /// Claims one key package of each peer, at most [`CLAIMS_AT_ONCE`] at a time.
    pub(crate) async fn claim_packages(
        &self,
        peers: &BTreeSet<PeerId>,
        group_relay: &Multiaddr,
    ) -> Result<Vec<(PeerId, Vec<u8>)>, NodeError> {
        let peers: Vec<PeerId> = peers.iter().copied().collect();
        let claims = peers
            .into_iter()
            .map(|peer| self.claim_package(peer, group_relay));
        let results: Vec<_> = futures::stream::iter(claims)
            .buffer_unordered(CLAIMS_AT_ONCE)
            .collect()
            .await;
        let (mut packages, mut missing) = (Vec::new(), Vec::new());
        for result in results {
            match result {
                Ok(package) => packages.push(package),
                Err(why) => missing.push(why),
            }
        }
        if !missing.is_empty() {
            let count = missing.len();
            if count > 3 {
                let more = format!("and {} more", count - 3);
                missing.truncate(3);
                missing.push(more);
            }
            return Err(NodeError::Unavailable(format!(
                "cannot add {} member(s) without one of their key packages (a node publishes them \
                 to its home relays once it is online; add it as a contact from its invite so its \
                 relays are known, or try again when it is online): {}",
                count,
                missing.join("; ")
            )));
        }
        Ok(packages)
    }

    /// Claims a key package of `peer`: from its home relays (as its contact says), the group's
    /// relay, or the peer itself when connected; a peer just started may not have published
    /// yet, so this asks again for up to [`Config::package_claim_wait`](crate::Config).
    async fn claim_package(
        &self,
        peer: PeerId,
        group_relay: &Multiaddr,
    ) -> Result<(PeerId, Vec<u8>), String> {
        let mut sources: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        let mut relays: Vec<Multiaddr> = self
            .contact_of(&peer)
            .map(|c| c.relays.iter().filter_map(|r| r.parse().ok()).collect())
            .unwrap_or_default();
        relays.push(group_relay.clone());
        for relay in &relays {
            if let Some(id) = peer_of(relay) {
                if !sources.iter().any(|(p, _)| *p == id) {
                    sources.push((id, vec![relay.clone()]));
                }
            }
        }
        let deadline = Instant::now() + self.config().package_claim_wait;
        loop {
            let mut reasons = Vec::new();
            let mut asked = sources.clone();
            if self.net().is_connected(peer).await {
                asked.push((peer, Vec::new()));
            }
            for (source, addrs) in asked {
                let request = KeysRequest::ClaimPackage {
                    req_id: self.req_id(),
                    peer,
                };
                match self.net().keys(source, addrs, request).await {
                    Ok(KeysResponse::ClaimedPackage {
                        package,
                        last_resort,
                        ..
                    }) => {
                        tracing::debug!(%peer, from = %source, last_resort, "claimed a key package");
                        return Ok((peer, package.into_vec()));
                    }
                    Ok(KeysResponse::NotFound { .. }) => reasons.push(format!("{source}: none")),
                    Ok(KeysResponse::Rejected { reason, .. }) => {
                        reasons.push(format!("{source}: {reason}"))
                    }
                    Ok(other) => reasons.push(format!("{source}: unexpected answer {other:?}")),
                    Err(e) => reasons.push(format!("{source}: {e}")),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{peer} ({})", reasons.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// This node's commit for `change` on `state`, written pending before it leaves: if the
    /// relay applies it and this node crashes before hearing so, the chain's copy is merged.
    async fn make_commit(
        &self,
        state: &State,
        change: &Change,
        keys: &mut mls::Group,
    ) -> Result<Handshake, NodeError> {
        let relay: Multiaddr = state
            .relay
            .parse()
            .map_err(|e| NodeError::Invalid(format!("group relay address: {e}")))?;
        let commit = match change {
            Change::Add { member } => {
                let packages = self
                    .claim_packages(&BTreeSet::from([*member]), &relay)
                    .await?;
                keys.add(&packages)
            }
            Change::Remove { member } => {
                let mut peers = leftovers(state, keys);
                peers.insert(*member);
                keys.remove(&peers.into_iter().collect::<Vec<_>>())
            }
            Change::Update { removes } if removes.is_empty() => keys.self_update(),
            Change::Update { removes } => keys.remove(&removes.iter().copied().collect::<Vec<_>>()),
            _ => return Err(NodeError::Invalid("this change carries no commit".into())),
        }
        .map_err(keys_error)?;
        self.keep(keys, Batch::new()).await?;
        Ok(handshake_of(commit))
    }

    /// Submits `change` on top of `state` (with this node's commit when the change carries
    /// one). `Ok(Some(next))`: applied, the commit merged and `next` stored in one durable
    /// write. `Ok(None)`: another operation took that version (the commit is dropped; catch up
    /// and try again).
    pub(crate) async fn submit_change(
        &self,
        state: &State,
        change: Change,
        keys: &mut Locked,
    ) -> Result<Option<State>, NodeError> {
        let me = self.peer_id();
        let mut handshake = None;
        if change.commits() {
            let Some(active) = keys.as_mut().filter(|k| k.is_active()) else {
                return Err(NodeError::Invalid(format!(
                    "this node holds no keys for {}: it cannot change the group",
                    state.name
                )));
            };
            if active.epoch() != state.epoch {
                return Err(NodeError::Invalid(format!(
                    "this node's keys for {} are at epoch {} but its chain is at {}; it cannot \
                     commit until they agree",
                    state.name,
                    active.epoch(),
                    state.epoch
                )));
            }
            handshake = Some(self.make_commit(state, &change, active).await?);
        }
        let op = Op {
            group: state.group,
            version: state.version,
            mls: handshake.as_ref().map(|h| Crypto::of(state.epoch, h)),
            change,
        };
        let next = state
            .apply(me, &op, &self.group_limits())
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let answer = self.submit_op(state, op, handshake.clone()).await;
        let applied = matches!(
            &answer,
            Ok(kith_protocol::group::Response::Applied { version, .. }) if *version == next.version
        );
        let mut batch = Batch::new();
        if let (Some(_), Some(keys)) = (&handshake, keys.as_mut()) {
            if applied {
                keys.merge_pending().map_err(keys_error)?;
                self.note_commit(&state.group, &mut batch);
            } else if answer.is_ok() {
                // Refused or lost a race: the commit is void. (After an error the relay may
                // have applied it: it stays pending, merged when the chain shows it.)
                keys.discard_pending().map_err(keys_error)?;
            }
            keys.stage(&mut batch);
        }
        match answer {
            Ok(_) if applied => {
                self.save_group_with(next.clone(), batch).await?;
                Ok(Some(next))
            }
            Ok(kith_protocol::group::Response::Applied { .. })
            | Ok(kith_protocol::group::Response::Conflict { .. }) => {
                self.store().commit(batch).await?;
                Ok(None)
            }
            Ok(other) => {
                self.store().commit(batch).await?;
                Err(NodeError::Invalid(format!("unexpected answer {other:?}")))
            }
            Err(e) => {
                self.store().commit(batch).await?;
                Err(e)
            }
        }
    }

    /// Records a commit of this node in `group` (the rekey policy counts from it).
    fn note_commit(&self, group: &GroupId, batch: &mut Batch) {
        lock(&self.keys().sent).remove(group);
        lock(&self.keys().tidy_failed).remove(group);
        batch.put_raw(rekeyed_key(group), now_ms().to_be_bytes().to_vec());
    }

    /// Whether this node should refresh its keys in `group` before sending.
    fn rekey_due(&self, group: &GroupId) -> bool {
        let sent = lock(&self.keys().sent).get(group).copied().unwrap_or(0);
        if sent >= self.config().group_rekey_messages {
            return true;
        }
        let last = match self.store().get_raw(&rekeyed_key(group)) {
            Ok(Some(bytes)) => bytes.try_into().map(u64::from_be_bytes).unwrap_or_default(),
            // Never recorded (joined, not yet committed): count from the first check.
            Ok(None) => {
                let mut batch = Batch::new();
                batch.put_raw(rekeyed_key(group), now_ms().to_be_bytes().to_vec());
                if let Err(e) = self.store().apply(batch) {
                    tracing::warn!(%group, error = %e, "cannot record a group's key age");
                }
                return false;
            }
            Err(_) => return false,
        };
        now_ms().saturating_sub(last) >= self.config().group_rekey_after.as_millis() as u64
    }

    /// Before sending to the group: resolves a commit of this node left pending (by catching
    /// up on the chain), removes leavers from the keys and refreshes this node's keys when the
    /// rekey policy says so, each as an `Update` through the relay. Returns the group's keys,
    /// locked, and its state; a failure to tidy is logged and the message goes in the current
    /// epoch.
    pub(crate) async fn tidy_keys(&self, state: State) -> Result<(State, Locked), NodeError> {
        let mut state = state;
        let backing_off = lock(&self.keys().tidy_failed)
            .get(&state.group)
            .is_some_and(|at| at.elapsed() < TIDY_BACKOFF);
        if backing_off {
            let keys = self.lock_keys(&state.group).await?;
            return Ok((state, keys));
        }
        for _ in 0..4 {
            let mut keys = self.lock_keys(&state.group).await?;
            let Some(active) = keys.as_ref().filter(|k| k.is_active()) else {
                return Ok((state, keys));
            };
            let pending = active.has_pending();
            let removes = leftovers(&state, active);
            if !pending && removes.is_empty() && !self.rekey_due(&state.group) {
                return Ok((state, keys));
            }
            if pending {
                drop(keys);
                state = match self.catch_up(&state).await {
                    Ok(state) => state,
                    Err(e) => return self.untidy(state, "resolve a pending commit", e).await,
                };
                let mut keys = self.lock_keys(&state.group).await?;
                if let Some(k) = keys.as_mut().filter(|k| k.has_pending()) {
                    // The chain is read to its end and does not hold it: the relay never took it.
                    k.discard_pending().map_err(keys_error)?;
                    self.keep(k, Batch::new()).await?;
                }
                continue;
            }
            let why = if removes.is_empty() {
                "rekey"
            } else {
                "remove leavers"
            };
            match self
                .submit_change(&state, Change::Update { removes }, &mut keys)
                .await
            {
                Ok(Some(next)) => {
                    tracing::info!(group = %state.group, epoch = next.epoch, why, "group keys updated");
                    return Ok((next, keys));
                }
                Ok(None) => {
                    drop(keys);
                    state = match self.catch_up(&state).await {
                        Ok(state) => state,
                        Err(e) => return self.untidy(state, why, e).await,
                    };
                }
                Err(e) => {
                    drop(keys);
                    return self.untidy(state, why, e).await;
                }
            }
        }
        let keys = self.lock_keys(&state.group).await?;
        Ok((state, keys))
    }

    /// An update before a send failed: the message goes in the current epoch, and sends to the
    /// group do not try again for [`TIDY_BACKOFF`].
    async fn untidy(
        &self,
        state: State,
        why: &str,
        error: NodeError,
    ) -> Result<(State, Locked), NodeError> {
        tracing::warn!(group = %state.group, why, %error, "cannot update the group's keys; sending in the current epoch");
        lock(&self.keys().tidy_failed).insert(state.group, Instant::now());
        let keys = self.lock_keys(&state.group).await?;
        Ok((state, keys))
    }

    /// Syncs the group's chain and returns its state.
    async fn catch_up(&self, state: &State) -> Result<State, NodeError> {
        Ok(self
            .sync_group(&state.group, None)
            .await?
            .unwrap_or_else(|| state.clone()))
    }

    /// Brings the group's keys along with one operation of its chain, `op` by `author`, which
    /// produced `next`; staged into `batch`. A failure leaves the keys where they were (the
    /// chain goes on; messages of later epochs then do not open) and says why.
    pub(crate) fn follow_op(
        &self,
        keys: &mut Option<mls::Group>,
        author: PeerId,
        op: &Op,
        next: &State,
        handshake: Option<&Handshake>,
        batch: &mut Batch,
    ) -> Result<(), MlsError> {
        op.check_handshake(handshake)
            .map_err(|e| MlsError::Malformed(e.to_string()))?;
        // Checked: both or neither.
        let (Some(crypto), Some(handshake)) = (&op.mls, handshake) else {
            return Ok(());
        };
        let me = self.peer_id();
        let added = adds(&op.change);
        match keys.as_mut().filter(|k| k.is_active()) {
            Some(k) if k.epoch() > crypto.epoch => Ok(()),
            Some(k) if k.epoch() < crypto.epoch => Err(MlsError::FutureEpoch {
                message: crypto.epoch,
                current: k.epoch(),
            }),
            Some(k) if author == me && k.has_pending() => {
                k.merge_pending()?;
                self.note_commit(&op.group, batch);
                k.stage(batch);
                Ok(())
            }
            Some(k) => {
                let removed_member = match &op.change {
                    Change::Remove { member } => Some(*member),
                    _ => None,
                };
                let allow = |applied: &Applied| {
                    let expected: Vec<PeerId> = added.iter().copied().collect();
                    let mut got = applied.added.clone();
                    got.sort();
                    let wrong_removal = applied.removed.iter().any(|p| next.is_member(p))
                        || removed_member.is_some_and(|m| !applied.removed.contains(&m));
                    if got != expected || wrong_removal {
                        return Err(MlsError::NotAllowed(author));
                    }
                    Ok(())
                };
                let applied = k.process_commit_checked(&handshake.commit, &author, &allow)?;
                k.stage(batch);
                if applied.removed_self {
                    tracing::info!(group = %op.group, "removed from the group's keys");
                }
                Ok(())
            }
            None if added.contains(&me) => {
                let Some(welcome) = &handshake.welcome else {
                    return Err(MlsError::Malformed("an add without a Welcome".into()));
                };
                let joined = self.keys().member.join(welcome, &op.group, &author)?;
                if joined.epoch() != crypto.epoch + 1 {
                    return Err(MlsError::Welcome(format!(
                        "the Welcome is for epoch {}, the chain's commit makes {}",
                        joined.epoch(),
                        crypto.epoch + 1
                    )));
                }
                joined.stage(batch);
                *keys = Some(joined);
                tracing::info!(group = %op.group, epoch = crypto.epoch + 1, "joined the group's keys");
                Ok(())
            }
            // A commit from before this node joined (or after it left).
            None => Ok(()),
        }
    }

    /// Encrypts `body` for the group's members in the current epoch, staging the change into
    /// `batch` (write it before `keys` is released).
    pub(crate) fn seal_group_body(
        &self,
        keys: &mut Locked,
        body: &Body,
        batch: &mut Batch,
    ) -> Result<Body, NodeError> {
        let Some(k) = keys.as_mut().filter(|k| k.is_active()) else {
            return Err(NodeError::Invalid(
                "this node holds no keys for the group (it was removed, or has not caught up \
                 with its chain); nothing can be sent to it"
                    .into(),
            ));
        };
        let plaintext = cbor::encode(body, kith_protocol::limits::MAX_BODY_BYTES)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let ciphertext = k.encrypt(&plaintext).map_err(keys_error)?;
        k.stage(batch);
        *lock(&self.keys().sent).entry(k.id()).or_default() += 1;
        Ok(Body::Mls { ciphertext })
    }

    /// Decrypts a group message of `from`, catching up on the chain first when it is of an
    /// epoch this node has not reached. Returns the inner body and the group's keys, locked,
    /// with the change staged into `batch` (write it before they are released).
    pub(crate) async fn open_group_body(
        &self,
        group: &GroupId,
        from: PeerId,
        ciphertext: &[u8],
        batch: &mut Batch,
    ) -> Result<(Body, Locked), Reject> {
        for first in [true, false] {
            let mut keys = self.lock_keys(group).await.map_err(|e| {
                tracing::error!(%group, error = %e, "cannot load a group's keys");
                Reject::StoreFailed
            })?;
            let opened = match keys.as_mut() {
                Some(k) => k.decrypt(ciphertext, &from),
                None => Err(MlsError::Inactive),
            };
            match opened {
                Ok(plaintext) => {
                    let body: Body = cbor::decode(&plaintext, kith_protocol::limits::MAX_BODY_BYTES)
                        .map_err(|e| {
                            tracing::warn!(%group, %from, error = %e, "refusing a group message whose content does not decode");
                            Reject::Malformed
                        })?;
                    if let Some(k) = keys.as_ref() {
                        k.stage(batch);
                    }
                    return Ok((body, keys));
                }
                // Commits are missing (or this node's Welcome is not processed yet): catch up.
                Err(MlsError::FutureEpoch { .. } | MlsError::Inactive) if first => {
                    drop(keys);
                    if let Err(e) = self.sync_group(group, None).await {
                        tracing::debug!(%group, error = %e, "cannot catch up on a group's chain");
                        return Err(Reject::Busy {
                            retry_after_ms: 1_000,
                        });
                    }
                }
                Err(MlsError::FutureEpoch { message, current }) => {
                    tracing::warn!(%group, %from, message, current, "a group message of an epoch the chain has not reached");
                    return Err(Reject::Busy {
                        retry_after_ms: 1_000,
                    });
                }
                Err(e) => {
                    tracing::warn!(%group, %from, error = %e, "refusing a group message that does not open");
                    return Err(Reject::Malformed);
                }
            }
        }
        Err(Reject::Malformed)
    }

    /// Creates the MLS side of a new group `id` with `members`: its keys (epoch 0) and, when
    /// there are members, the commit adding them and their Welcome, kept pending on disk.
    pub(crate) async fn create_keys(
        &self,
        id: &GroupId,
        members: &BTreeSet<PeerId>,
        relay: &Multiaddr,
    ) -> Result<(Locked, Option<Handshake>), NodeError> {
        let packages = if members.is_empty() {
            Vec::new()
        } else {
            self.claim_packages(members, relay).await?
        };
        let mut slot = self.keys().slot(id).lock_owned().await;
        let mut keys = self.keys().member.create(id).map_err(keys_error)?;
        let handshake = if packages.is_empty() {
            None
        } else {
            Some(handshake_of(keys.add(&packages).map_err(keys_error)?))
        };
        self.keep(&keys, Batch::new()).await?;
        *slot = Some(keys);
        Ok((slot, handshake))
    }

    /// The relay created the group: merge the commit adding its members (if any) with the
    /// group's first state, in one durable write.
    pub(crate) async fn created(&self, state: State, keys: &mut Locked) -> Result<(), NodeError> {
        let mut batch = Batch::new();
        if let Some(k) = keys.as_mut() {
            if k.has_pending() {
                k.merge_pending().map_err(keys_error)?;
            }
            self.note_commit(&state.group, &mut batch);
            k.stage(&mut batch);
        }
        self.save_group_with(state, batch).await
    }
}
