//! Group chats on the node: membership (signed operations, validated by replaying the chain),
//! sending (one upload to the group's home relay), receiving (gossip, pushes and mailbox
//! fetches, deduplicated), batched receipts and per-member message states.
//!
//! Flows:
//!
//! - **Membership.** [`Node::create_group`] and [`Node::change_group`] seal a
//!   [`group::Op`](kith_protocol::group::Op) on top of the group's current version and submit
//!   it over `/kith/group/1` to the group's home relay (the creator's first home relay). On
//!   `Conflict` (another admin won that version) the node syncs the chain, re-checks its change
//!   on the new state and submits again, so concurrent admins end in one agreed state.
//!   Operations that reach the node (announced by the relay through members' mailboxes) are
//!   applied when they name the local version, or trigger a sync ([`Node::sync_group`]) that
//!   replays every missing operation through [`State::apply`]: a member never trusts the relay
//!   for membership. Each operation that changes the group's keys carries its MLS commit, and
//!   the keys follow the chain ([`keys`]: commits, Welcomes, leavers, rekeys).
//! - **Sending.** A group message goes into the outbox like any other; an attempt `Post`s it to
//!   the group's relay, which stores a copy for every other member before answering `Stored`
//!   (`sent` for every member). Until then the message stays `pending` and the last failure is
//!   kept as the reason `kith send` and `kith status` show.
//! - **Receiving.** Gossip on `kith/g/<group id>`, relay pushes and mailbox fetches all end in
//!   [`Node::accept_group`]: signature, membership of the sender and of this node, then a
//!   deduplicated store by `(from, id)` in Lamport order, each message decrypted (MLS) only once
//!   it is known to be new and written with the keys' new state. Gossip is forwarded only if valid, so
//!   a removed member's (or a stranger's) messages go nowhere.
//! - **Receipts.** Each received message is acknowledged to its sender with a `Delivered`
//!   receipt, batched per sender over [`Config::receipt_batch_window`](crate::Config) (one
//!   envelope covers many ids); `kith read GROUP` sends `Read` receipts the same way. The sender
//!   keeps per-member states and shows their minimum.

mod invites;
mod keys;

pub use invites::{DeclineView, InvitationView};

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use kith_protocol::envelope::Header;
use kith_protocol::group::{self, Change, Limits, Op, State};
use kith_protocol::limits::MAX_ENVELOPE_BYTES;
use kith_protocol::{cbor, Body, Destination, Envelope, GroupId, MessageId, MessageState};
use kith_protocol::{ReceiptState, Reject};
use libp2p::gossipsub;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::core::hooks::{Feature, Rooms};
use crate::core::store::{Batch, Direction, EntryKind, StoredMessage};
use crate::core::{MessageView, Node, NodeError, Outcome, Sent};
use crate::net::{self, peer_of};
use crate::shutdown::Signal;
use futures::future::BoxFuture;

/// How many times a membership change is re-submitted after conflicts.
const MAX_CONFLICT_RETRIES: usize = 8;

/// How many times a membership change answered `Busy` is submitted again, each after the wait
/// the relay asked for (at most [`SUBMIT_BUSY_MAX_WAIT_MS`]).
const SUBMIT_BUSY_RETRIES: usize = 10;

/// Longest wait between two submissions of one change, whatever the relay asks.
const SUBMIT_BUSY_MAX_WAIT_MS: u64 = 2_000;

/// The node's in-memory group state (the store holds the durable copy).
pub(crate) struct Groups {
    keys: keys::Keys,
    states: Mutex<HashMap<GroupId, State>>,
    /// Groups a stranger added this node to ([`invites`]).
    invites: Mutex<invites::Invitations>,
    lamports: Mutex<HashMap<GroupId, u64>>,
    receipts: Mutex<HashMap<(PeerId, ReceiptState), Vec<MessageId>>>,
    receipts_wake: Notify,
    /// Serialises chain syncs, so two never apply the same operations.
    sync: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Groups {
    /// Loads the groups and invitations from the store; `member` is this node's MLS client.
    pub(crate) fn load(
        store: &crate::core::store::Store,
        member: crate::core::crypto::mls::Member,
    ) -> Result<Self, crate::core::store::StoreError> {
        let groups = Self {
            keys: keys::Keys::new(member),
            states: Mutex::default(),
            invites: Mutex::new(invites::load(store)?),
            lamports: Mutex::default(),
            receipts: Mutex::default(),
            receipts_wake: Notify::default(),
            sync: tokio::sync::Mutex::default(),
        };
        lock(&groups.states).extend(store.groups()?.into_iter().map(|s| (s.group, s)));
        Ok(groups)
    }

    pub(crate) fn get(&self, group: &GroupId) -> Option<State> {
        lock(&self.states).get(group).cloned()
    }

    fn all(&self) -> Vec<State> {
        lock(&self.states).values().cloned().collect()
    }
}

/// A group as the API shows it (`kith group info --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupView {
    /// The group id.
    pub group_id: String,
    /// Its name.
    pub name: String,
    /// Admins' peer ids.
    pub admins: Vec<String>,
    /// Members' peer ids (admins included).
    pub members: Vec<String>,
    /// Operations applied so far.
    pub version: u64,
    /// The MLS epoch of the group's keys: each commit (create, add, remove, update) moves it
    /// on by one.
    #[serde(default)]
    pub epoch: u64,
    /// Its home relay.
    pub relay: String,
    /// Names of the members this node knows (its contacts, and itself), by peer id.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub member_names: HashMap<String, String>,
    /// Whether this node is a member. A group it left or was removed from stays listed, with
    /// its history, read-only.
    pub member: bool,
}

impl From<&State> for GroupView {
    fn from(s: &State) -> Self {
        Self {
            group_id: s.group.to_string(),
            name: s.name.clone(),
            admins: s.admins.iter().map(|p| p.to_string()).collect(),
            members: s.members.iter().map(|p| p.to_string()).collect(),
            version: s.version,
            epoch: s.epoch,
            relay: s.relay.clone(),
            member_names: HashMap::new(),
            member: false,
        }
    }
}

/// A membership change asked for by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Add a member (admins only).
    Add,
    /// Remove a member (admins only).
    Remove,
    /// Make a member an admin (admins only).
    Promote,
    /// Leave the group.
    Leave,
    /// Refresh this node's keys in the group (an MLS self-update), removing leavers.
    Rekey,
}

fn invalid(e: impl std::fmt::Display) -> NodeError {
    NodeError::Invalid(e.to_string())
}

impl Node {
    fn group_limits(&self) -> Limits {
        Limits {
            max_members: self.config().max_group_members,
        }
    }

    /// Resolves a group name or id among the groups this node knows, those it left or was
    /// removed from included (their history stays readable). By name, a group this node is a
    /// member of comes first.
    pub fn find_group(&self, name_or_id: &str) -> Option<State> {
        let mut groups = self.groups().all();
        // A declined invitation is out of sight for good.
        groups.retain(|s| !self.is_declined(&s.group));
        if let Ok(id) = name_or_id.trim().parse::<GroupId>() {
            if let Some(s) = groups.iter().find(|s| s.group == id) {
                return Some(s.clone());
            }
        }
        let me = self.peer_id();
        let mut named: Vec<State> = groups
            .into_iter()
            .filter(|s| s.name == name_or_id)
            .collect();
        named.sort_by_key(|s| (!s.is_member(&me), self.out_of_sight(&s.group), s.group));
        named.into_iter().next()
    }

    /// The group a `TO`/`WITH` argument names, unless a contact goes by that name.
    pub(crate) fn group_target(&self, to: &str) -> Result<Option<State>, NodeError> {
        if self.contact_named(to).is_some() {
            return Ok(None);
        }
        Ok(self.find_group(to))
    }

    fn group_of(&self, name_or_id: &str) -> Result<State, NodeError> {
        self.find_group(name_or_id)
            .ok_or_else(|| NodeError::UnknownRecipient(name_or_id.to_owned()))
    }

    fn relay_of(state: &State) -> Result<(PeerId, Multiaddr), NodeError> {
        let addr: Multiaddr = state
            .relay
            .parse()
            .map_err(|e| invalid(format!("group relay address {:?}: {e}", state.relay)))?;
        let peer = peer_of(&addr)
            .ok_or_else(|| invalid(format!("group relay address {addr} has no /p2p/ part")))?;
        Ok((peer, addr))
    }

    /// A group's view with the names of the members this node knows.
    pub(crate) fn named_view(&self, state: &State) -> GroupView {
        let mut view = GroupView::from(state);
        view.member_names = state
            .members
            .iter()
            .filter_map(|p| Some((p.to_string(), self.name_of(p)?)))
            .collect();
        view.member = state.is_member(&self.peer_id());
        view
    }

    /// Every group this node knows: those it is a member of first, then those it left or was
    /// removed from (`member: false`), each by name. Invitations are not among them
    /// ([`Node::group_invitations`]).
    pub fn group_list(&self) -> Vec<GroupView> {
        let mut list: Vec<GroupView> = self
            .groups()
            .all()
            .iter()
            .filter(|s| !self.out_of_sight(&s.group))
            .map(|s| self.named_view(s))
            .collect();
        list.sort_by(|a, b| {
            (!a.member, &a.name, &a.group_id).cmp(&(!b.member, &b.name, &b.group_id))
        });
        list
    }

    /// A group's membership, synced with its home relay when it is reachable.
    pub async fn group_info(&self, name_or_id: &str) -> Result<GroupView, NodeError> {
        let state = self.group_of(name_or_id)?;
        let state = match self.sync_group(&state.group, None).await {
            Ok(Some(s)) => s,
            _ => state,
        };
        Ok(self.named_view(&state))
    }

    /// Creates a group at this node's first home relay with the given initial members.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<GroupView, NodeError> {
        let relay = self.config().relays.first().cloned().ok_or_else(|| {
            invalid("a group needs a home relay: start the daemon with --relay MULTIADDR")
        })?;
        let me = self.peer_id();
        let mut set = BTreeSet::new();
        for who in members {
            let peer = self.resolve(who)?;
            if peer != me {
                set.insert(peer);
            }
        }
        let id = GroupId::random();
        let change = Change::Create {
            name: name.trim().to_owned(),
            relay: relay.to_string(),
            members: set.clone(),
        };
        // Checked before any key package is claimed (the commit it lacks is made below).
        let planned = Op {
            group: id,
            version: 0,
            change: change.clone(),
            mls: None,
        };
        match State::create(me, &planned, &self.group_limits()) {
            Ok(_) | Err(group::OpError::Commit { .. }) => {}
            Err(e) => return Err(invalid(e)),
        }
        let (mut keys, handshake) = self.create_keys(&id, &set, &relay).await?;
        let op = Op {
            mls: handshake.as_ref().map(|h| group::Crypto::of(0, h)),
            ..planned
        };
        let state = State::create(me, &op, &self.group_limits()).map_err(invalid)?;
        match self.submit_op(&state, op, handshake).await? {
            group::Response::Applied { .. } => {}
            other => {
                return Err(invalid(format!(
                    "the relay did not create the group: {other:?}"
                )))
            }
        }
        self.created(state.clone(), &mut keys).await?;
        tracing::info!(group = %state.group, name = %state.name, "group created");
        Ok(self.named_view(&state))
    }

    /// Applies a membership change (add, remove, promote, leave) or refreshes this node's keys
    /// (rekey: an `Update` that also removes leavers' leaves) through the group's relay,
    /// re-submitting on top of the new state after a conflict.
    pub async fn change_group(
        &self,
        name_or_id: &str,
        kind: ChangeKind,
        who: Option<&str>,
    ) -> Result<GroupView, NodeError> {
        let group = self.group_of(name_or_id)?.group;
        let target = match (kind, who) {
            (ChangeKind::Leave | ChangeKind::Rekey, _) => None,
            (_, Some(who)) => Some(self.resolve(who)?),
            (_, None) => return Err(invalid("say whom to add, remove or promote")),
        };
        let me = self.peer_id();
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let state = match self.sync_group(&group, None).await {
                Ok(Some(s)) => s,
                Ok(None) => return Err(NodeError::UnknownRecipient(name_or_id.to_owned())),
                Err(e) => return Err(e),
            };
            let mut keys = self.lock_keys(&group).await?;
            let change = match (kind, target) {
                (ChangeKind::Add, Some(member)) => Change::Add { member },
                (ChangeKind::Remove, Some(member)) => Change::Remove { member },
                (ChangeKind::Promote, Some(member)) => Change::Promote { member },
                (ChangeKind::Rekey, _) => Change::Update {
                    removes: keys
                        .as_ref()
                        .map(|k| keys::leftovers(&state, k))
                        .unwrap_or_default(),
                },
                _ => Change::Leave,
            };
            // Checked on the chain before a commit is made (the epoch check stands in for it).
            let planned = Op {
                group,
                version: state.version,
                change: change.clone(),
                mls: None,
            };
            match state.apply(me, &planned, &self.group_limits()) {
                Ok(_) | Err(group::OpError::Commit { .. }) => {}
                // Someone else made the same change while we raced: the goal is reached.
                Err(
                    group::OpError::AlreadyMember { .. }
                    | group::OpError::AlreadyAdmin { .. }
                    | group::OpError::NotMember { .. },
                ) if attempt > 0 => return Ok(self.named_view(&state)),
                Err(e) => return Err(invalid(e)),
            }
            if let Some(next) = self.submit_change(&state, change, &mut keys).await? {
                return Ok(self.named_view(&next));
            }
            tracing::info!(%group, attempt, "group changed meanwhile; syncing and retrying");
        }
        Err(invalid("the group keeps changing; try again"))
    }

    /// Signs `op` and submits it, with its commit and Welcome, to the group's relay;
    /// `Refused` and `Rejected` become errors.
    async fn submit_op(
        &self,
        state: &State,
        op: Op,
        handshake: Option<group::Handshake>,
    ) -> Result<group::Response, NodeError> {
        let (relay, addr) = Self::relay_of(state)?;
        let op = group::seal_op(self.key(), op, now_ms()).map_err(invalid)?;
        // A relay that is busy (or holds back a connection it does not know yet) says when to
        // come back: the node waits that long, a few times, before it gives up.
        let mut retries = 0;
        let answer = loop {
            let request = group::Request::Submit {
                req_id: self.req_id(),
                op: op.clone(),
                handshake: handshake.clone(),
            };
            let response = self.net().group(relay, vec![addr.clone()], request).await;
            match &response {
                Ok(group::Response::Rejected {
                    reason: Reject::Busy { retry_after_ms },
                    ..
                }) if retries < SUBMIT_BUSY_RETRIES => {
                    retries += 1;
                    let wait = *retry_after_ms;
                    tracing::debug!(%relay, group = %state.group, wait, "the group's relay is busy; waiting as it asks");
                    tokio::time::sleep(Duration::from_millis(wait.min(SUBMIT_BUSY_MAX_WAIT_MS)))
                        .await;
                }
                _ => break response,
            }
        };
        match answer {
            Ok(group::Response::Refused { reason, .. }) => Err(invalid(reason)),
            Ok(group::Response::Rejected { reason, .. }) => {
                Err(invalid(format!("the group's relay refused: {reason}")))
            }
            Ok(answer) => Ok(answer),
            Err(e) => Err(invalid(format!(
                "the group's home relay {relay} is unreachable: {e}"
            ))),
        }
    }

    /// Stores a validated state and (un)subscribes the group's topic as membership says.
    async fn save_group(&self, state: State) -> Result<(), NodeError> {
        self.save_group_with(state, Batch::new()).await
    }

    /// Stores a validated state with `batch` (its keys' change) in one durable write.
    async fn save_group_with(&self, state: State, mut batch: Batch) -> Result<(), NodeError> {
        batch.put_group(&state);
        self.store().commit(batch).await?;
        let member = state.is_member(&self.peer_id()) && !self.out_of_sight(&state.group);
        let was = self
            .groups()
            .get(&state.group)
            .is_some_and(|old| old.is_member(&self.peer_id()));
        let topic = group::topic(&state.group);
        lock(&self.groups().states).insert(state.group, state);
        if member {
            self.net().subscribe(topic, true).await;
        } else if was {
            self.net().subscribe(topic, false).await;
        }
        Ok(())
    }

    /// Fetches the operations this node has not seen from the group's relay, validates them by
    /// replaying, and stores the result. `relay` is where to ask for a group not known yet.
    pub(crate) async fn sync_group(
        &self,
        group: &GroupId,
        relay: Option<(PeerId, Multiaddr)>,
    ) -> Result<Option<State>, NodeError> {
        let _one_at_a_time = self.groups().sync.lock().await;
        let local = self.groups().get(group);
        let (relay, addr) = match (&local, relay) {
            (Some(state), _) => Self::relay_of(state)?,
            (None, Some(r)) => r,
            (None, None) => return Ok(None),
        };
        let mut state = local.clone();
        let mut keys = self.lock_keys(group).await?;
        let me = self.peer_id();
        let mut invitations = Vec::new();
        loop {
            let request = group::Request::Get {
                req_id: self.req_id(),
                group: *group,
                after_version: state.as_ref().map_or(0, |s| s.version),
                limit: group::MAX_OPS_PER_PAGE,
            };
            let (ops, more, handshakes) =
                match self.net().group(relay, vec![addr.clone()], request).await {
                    Ok(group::Response::Ops {
                        ops,
                        more,
                        handshakes,
                        ..
                    }) => (ops, more, handshakes),
                    Ok(other) => {
                        return Err(invalid(format!("unexpected answer to a sync: {other:?}")))
                    }
                    Err(e) => {
                        return Err(invalid(format!(
                            "the group's home relay {relay} is unreachable: {e}"
                        )))
                    }
                };
            for (index, envelope) in ops.iter().enumerate() {
                let refuse = |e: &dyn std::fmt::Display| {
                    tracing::warn!(%group, %relay, error = %e, "refusing the relay's group chain");
                    invalid(format!("the group's chain does not validate: {e}"))
                };
                let op = group::open_op(envelope).map_err(|e| refuse(&e))?;
                if op.group != *group {
                    return Err(refuse(&"an operation of another group"));
                }
                let next = match &state {
                    None => State::create(envelope.from, &op, &self.group_limits()),
                    Some(s) => s.apply(envelope.from, &op, &self.group_limits()),
                }
                .map_err(|e| refuse(&e))?;
                // The keys follow the chain; a commit that does not process is logged and the
                // chain goes on (messages of later epochs then do not open).
                let mut batch = Batch::new();
                let joined =
                    !state.as_ref().is_some_and(|s| s.is_member(&me)) && next.is_member(&me);
                if joined {
                    if let Some(event) = self.note_membership(&next, envelope.from, &mut batch)? {
                        invitations.push(event);
                    }
                }
                let handshake = handshakes.get(index).and_then(Option::as_ref);
                if let Err(e) =
                    self.follow_op(&mut keys, envelope.from, &op, &next, handshake, &mut batch)
                {
                    tracing::warn!(%group, version = next.version, author = %envelope.from, error = %e, "cannot follow the group's keys through an operation");
                }
                batch.put_group(&next);
                self.store().apply(batch)?;
                state = Some(next);
            }
            if !more || ops.is_empty() {
                break;
            }
        }
        drop(keys);
        if let Some(s) = &state {
            if local.as_ref() != Some(s) {
                self.save_group(s.clone()).await?;
            }
        }
        for event in invitations {
            self.emit(event);
        }
        Ok(state)
    }

    /// Handles an operation announced to us: apply it if it names our version, else sync.
    async fn on_group_op(&self, via: PeerId, envelope: Envelope, op: Op) -> Result<(), Reject> {
        let local = self.groups().get(&op.group);
        if let Some(state) = &local {
            if op.version < state.version {
                return Ok(());
            }
            if op.version == state.version {
                let next = state
                    .apply(envelope.from, &op, &self.group_limits())
                    .map_err(|e| {
                        tracing::warn!(%via, group = %op.group, error = %e, "refusing a group operation");
                        Reject::Malformed
                    })?;
                // A change of the keys needs its commit, which comes with the chain (sync), unless
                // it takes this node out: then the keys are no longer its business (and the
                // relay no longer shows it the chain).
                if op.mls.is_none() || !next.is_member(&self.peer_id()) {
                    return self.save_group(next).await.map_err(|e| {
                        tracing::error!(error = %e, "cannot store a group");
                        Reject::StoreFailed
                    });
                }
            }
        }
        let hint = self.home_relays().get(&via).map(|a| (via, a.clone()));
        match self.sync_group(&op.group, hint).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(%via, group = %op.group, error = %e, "group sync failed");
                Err(Reject::Busy {
                    retry_after_ms: 1_000,
                })
            }
        }
    }

    /// Verifies and stores an envelope addressed to a group (a message or an operation).
    pub(crate) async fn accept_group(
        &self,
        via: PeerId,
        group_id: GroupId,
        envelope: Envelope,
    ) -> Result<(), Reject> {
        self.plugins().timers.check(self, &envelope)?;
        let from = envelope.from;
        let body = self.open_room_body(&envelope)?;
        let ciphertext = match body {
            Body::GroupOp(op) if op.group == group_id => {
                return self.on_group_op(via, envelope, op).await
            }
            Body::Mls { ciphertext } => ciphertext,
            _ => {
                tracing::warn!(%via, %from, "refusing a group envelope of the wrong kind (group content travels encrypted)");
                return Err(Reject::Malformed);
            }
        };
        let me = self.peer_id();
        let mut state = self.groups().get(&group_id);
        let current = |s: &Option<State>| {
            s.as_ref()
                .is_some_and(|s| s.is_member(&from) && s.is_member(&me))
        };
        if !current(&state) {
            // Our view may be behind (an add we have not seen yet): catch up once.
            let hint = self.home_relays().get(&via).map(|a| (via, a.clone()));
            if let Ok(synced) = self.sync_group(&group_id, hint).await {
                state = synced;
            }
        }
        if !current(&state) {
            tracing::warn!(%via, %from, group = %group_id, "dropping a group message: sender or this node is not a member");
            return Err(Reject::WrongRecipient);
        }
        if self.is_declined(&group_id) {
            tracing::debug!(%from, group = %group_id, "dropping a message of a declined group");
            return Ok(());
        }
        let invited = self.out_of_sight(&group_id);
        let store_failed = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot store a group message");
            Reject::StoreFailed
        };
        // Held until it is stored and announced: a copy arriving meanwhile (gossip and the
        // relay's fan-out) is a duplicate.
        let crate::core::claims::Claimed::Mine(mut claim) = self.claims().claim(from, envelope.id)
        else {
            tracing::debug!(%from, id = %envelope.id, "another copy of a group message is (being) stored");
            return Ok(());
        };
        if self
            .store()
            .message(&from, &envelope.id)
            .map_err(|e| store_failed(&e))?
            .is_some()
        {
            tracing::debug!(%from, id = %envelope.id, "duplicate group message");
            // The first copy may still be on its way to disk (its write is visible before its
            // flush): this one is acknowledged only once that flush is done, so a crash cannot
            // lose a message whose every copy was acknowledged.
            self.store().flush().await.map_err(|e| store_failed(&e))?;
            return Ok(());
        }
        // Opened only now: a copy of a message opened before has no key left.
        let mut batch = Batch::new();
        let (inner, keys) = self
            .open_group_body(&group_id, from, &ciphertext, &mut batch)
            .await?;
        if let Err(e) = inner.validate() {
            tracing::warn!(%via, %from, error = %e, "refusing a group message with a bad body");
            return Err(Reject::Malformed);
        }
        let mut file = None;
        let mut timer = None;
        let mut text = match inner {
            Body::Chat { text } => text,
            Body::File(f) => {
                file = Some(f);
                String::new()
            }
            Body::Timer { secs, admins_only } => {
                timer = Some((secs, admins_only));
                String::new()
            }
            _ => {
                tracing::warn!(%via, %from, "refusing a group message whose content is of the wrong kind");
                return Err(Reject::Malformed);
            }
        };
        let lamport = {
            let mut lamports = lock(&self.groups().lamports);
            let current = match lamports.get(&group_id) {
                Some(l) => *l,
                None => self.store().group_lamport(&group_id).unwrap_or(0),
            };
            let next = kith_protocol::lamport::observe(current, envelope.lamport);
            lamports.insert(group_id, next);
            next
        };
        if let (Some((secs, admins_only)), Some(state)) = (timer, state.as_ref()) {
            text = self.plugins().timers.stage(
                self,
                &envelope,
                Some(state),
                secs,
                admins_only,
                &mut batch,
            )?;
        }
        let msg = self.received(&envelope, text.clone());
        batch.put_group_message(&msg, &group_id);
        batch.set_group_lamport(&group_id, lamport);
        if let Some(file) = file.clone() {
            self.plugins()
                .files
                .put_incoming(self, &mut batch, &envelope, file, Some(group_id));
        }
        self.store()
            .commit(batch)
            .await
            .map_err(|e| store_failed(&e))?;
        drop(keys);
        claim.stored();
        // An invitation's messages are kept quietly until the user joins.
        if !invited {
            self.emit(self.message_event(&envelope, Some(group_id), text));
        }
        self.batch_receipt(from, ReceiptState::Delivered, envelope.id);
        if let Some(file) = file.as_ref().filter(|_| !invited) {
            self.plugins()
                .files
                .received(self, envelope.id, file.size)
                .await;
        }
        Ok(())
    }

    /// Validates a gossip message and reports the verdict (valid ones are forwarded).
    pub(crate) async fn handle_gossip(
        &self,
        source: PeerId,
        message_id: gossipsub::MessageId,
        topic: String,
        data: Vec<u8>,
    ) {
        let verdict = match cbor::decode::<Envelope>(&data, MAX_ENVELOPE_BYTES) {
            Ok(envelope) => match (self.verify(&envelope), envelope.to) {
                // A blocked peer's group messages are not shown; others may still want them.
                (Ok(()), Destination::Group(_))
                    if self.plugins().gate.is_blocked(&envelope.from) =>
                {
                    tracing::debug!(%source, from = %envelope.from, "dropping a blocked peer's gossip");
                    gossipsub::MessageAcceptance::Ignore
                }
                (Ok(()), Destination::Group(g)) if group::topic(&g) == topic => {
                    match self.accept_group(source, g, envelope).await {
                        Ok(()) => gossipsub::MessageAcceptance::Accept,
                        Err(reason) => {
                            tracing::debug!(%source, %reason, "gossip refused");
                            gossipsub::MessageAcceptance::Reject
                        }
                    }
                }
                _ => {
                    tracing::warn!(%source, %topic, "refusing forged or misdirected gossip");
                    gossipsub::MessageAcceptance::Reject
                }
            },
            Err(e) => {
                tracing::warn!(%source, %topic, error = %e, "refusing undecodable gossip");
                gossipsub::MessageAcceptance::Reject
            }
        };
        self.net()
            .validate_gossip(source, message_id, verdict)
            .await;
    }

    fn batch_receipt(&self, to: PeerId, state: ReceiptState, id: MessageId) {
        lock(&self.groups().receipts)
            .entry((to, state))
            .or_default()
            .push(id);
        self.groups().receipts_wake.notify_one();
    }

    /// Subscribes to the groups' topics, then sends batched receipts until shutdown.
    pub(crate) async fn group_loop(self, mut shutdown: Signal) {
        let me = self.peer_id();
        for state in self.groups().all() {
            if state.is_member(&me) && !self.out_of_sight(&state.group) {
                self.net().subscribe(group::topic(&state.group), true).await;
            }
        }
        let window = self.config().receipt_batch_window;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = self.groups().receipts_wake.notified() => {}
            }
            // Let more receipts join this batch.
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(window) => {}
            }
            let batches: Vec<_> = lock(&self.groups().receipts).drain().collect();
            for ((to, state), ids) in batches {
                if let Err(e) = self.queue_receipts(to, state, &ids).await {
                    tracing::error!(%to, error = %e, "cannot queue group receipts");
                }
            }
        }
    }

    /// Sends a chat message to a group: stored with a pending state per member, then uploaded
    /// once by the outbox.
    pub(crate) async fn send_group(
        &self,
        state: State,
        text: &str,
        wait: Option<Duration>,
    ) -> Result<Sent, NodeError> {
        let body = Body::Chat {
            text: text.to_owned(),
        };
        self.send_group_with(state, MessageId::random(), body, text, Batch::new(), wait)
            .await
    }

    /// Sends `body` (shown as `text`) to a group as message `id`, with `batch` (extra writes,
    /// such as a file's attachment record) committed together with it.
    pub(crate) async fn send_group_with(
        &self,
        state: State,
        id: MessageId,
        body: Body,
        text: &str,
        mut batch: Batch,
        wait: Option<Duration>,
    ) -> Result<Sent, NodeError> {
        let me = self.peer_id();
        self.group_sendable(&state)?;
        body.validate().map_err(invalid)?;
        // Leavers out of the keys, and this node's keys refreshed when due, first.
        let (state, mut keys) = self.tidy_keys(state).await?;
        let group_id = state.group;
        let lamport = {
            let mut lamports = lock(&self.groups().lamports);
            let current = match lamports.get(&group_id) {
                Some(l) => *l,
                None => self.store().group_lamport(&group_id)?,
            };
            let next = kith_protocol::lamport::next(current);
            lamports.insert(group_id, next);
            next
        };
        let sent_at_ms = now_ms();
        // A timer change itself stays; everything else carries the timer in force.
        let expires_at_ms = match body {
            Body::Timer { .. } => None,
            _ => self.plugins().timers.expiry_for(
                self,
                crate::core::store::Thread::Group(&group_id),
                sent_at_ms,
            )?,
        };
        let header = Header {
            id,
            to: Destination::Group(group_id),
            sent_at_ms,
            lamport,
            expires_at_ms,
        };
        let sealed = self.seal_group_body(&mut keys, &body, &mut batch)?;
        let entry = self.compose(header, &sealed, EntryKind::Message)?;
        let envelope = &entry.envelope;
        let id = envelope.id;
        let msg = StoredMessage {
            id,
            direction: Direction::Out,
            from: me,
            peer: me,
            text: text.to_owned(),
            sent_at_ms: envelope.sent_at_ms,
            lamport,
            state: MessageState::Pending,
            expires_at_ms,
        };
        let members = state
            .members
            .iter()
            .filter(|m| **m != me)
            .map(|m| (*m, MessageState::Pending))
            .collect();
        batch.put_group_message(&msg, &group_id);
        batch.set_group_lamport(&group_id, lamport);
        batch.put_member_states(&id, &members);
        batch.put_outbox(&entry);
        self.store().commit(batch).await?;
        drop(keys);
        // Watched only once stored (nothing to leak when that fails) and before it can leave.
        let first = wait.map(|_| self.watch_first_outcome(id));
        self.enqueue(entry);
        let current = match (wait, first) {
            (Some(wait), Some(first)) => self.first_outcome(id, first, wait).await,
            _ => MessageState::Pending,
        };
        let note = (current == MessageState::Pending)
            .then(|| self.pending_reason(&id))
            .flatten()
            .map(|why| format!("not sent yet, will retry: {why}"));
        Ok(Sent {
            id: id.to_string(),
            state: current,
            note,
        })
    }

    /// Refuses sending to a group this node is no longer a member of, or has not joined (an
    /// invitation).
    pub(crate) fn group_sendable(&self, state: &State) -> Result<(), NodeError> {
        if !state.is_member(&self.peer_id()) {
            return Err(invalid(format!(
                "you are no longer a member of {}: its history stays readable, but nothing can be sent to it",
                state.name
            )));
        }
        self.check_joined(state)
    }

    /// One outbox attempt for a group message: upload it to the group's relay.
    pub(crate) async fn deliver_group(&self, envelope: &Envelope, group_id: GroupId) -> Outcome {
        let Some(state) = self.groups().get(&group_id) else {
            return Outcome::Failed(format!("unknown group {group_id}"));
        };
        let (relay, addr) = match Self::relay_of(&state) {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let request = group::Request::Post {
            req_id: self.req_id(),
            envelope: envelope.clone(),
        };
        let outcome = match tokio::time::timeout(
            self.config().delivery_timeout,
            self.net().group(relay, vec![addr], request),
        )
        .await
        {
            Ok(Ok(group::Response::Stored { missed, .. })) if missed.is_empty() => Outcome::Sent,
            Ok(Ok(group::Response::Stored { missed, .. })) => {
                self.stored_but_missed(envelope, &state, &missed)
            }
            Ok(Ok(group::Response::Refused { reason, .. })) => {
                Outcome::Failed(format!("the group's relay refused it: {reason}"))
            }
            Ok(Ok(group::Response::Rejected { reason, .. })) if !reason.is_retryable() => {
                Outcome::Failed(format!("the group's relay refused it: {reason}"))
            }
            Ok(Ok(group::Response::Rejected { reason, .. })) => {
                Outcome::Retry(format!("the group's relay is busy: {reason}"))
            }
            Ok(Ok(other)) => Outcome::Retry(format!("unexpected answer {other:?}")),
            Ok(Err(e)) => Outcome::Retry(format!("the group's home relay is unreachable: {e}")),
            Err(_) => Outcome::Retry("the group's home relay did not answer in time".into()),
        };
        let why = match &outcome {
            Outcome::Retry(why) | Outcome::Failed(why) => Some(why.clone()),
            _ => None,
        };
        self.set_pending_reason(envelope.id, why);
        outcome
    }

    /// The group's relay stored `envelope` for every member but `missed` (their mailboxes are
    /// full): the others are `sent`, the missed ones stay `pending`, and the message is posted
    /// again later (the relay stores it only for those who lack it).
    fn stored_but_missed(
        &self,
        envelope: &Envelope,
        state: &State,
        missed: &BTreeSet<PeerId>,
    ) -> Outcome {
        let me = self.peer_id();
        for member in state
            .members
            .iter()
            .filter(|m| **m != me && !missed.contains(m))
        {
            if let Err(e) =
                self.advance_group_members(&envelope.id, Some(member), MessageState::Sent)
            {
                tracing::error!(id = %envelope.id, error = %e, "cannot record a member's tick");
            }
        }
        let names: Vec<String> = missed.iter().map(|p| p.to_string()).collect();
        Outcome::Retry(format!(
            "not stored for {} member(s) whose mailbox is full ({}); will retry for them",
            missed.len(),
            names.join(", ")
        ))
    }

    /// Moves the per-member states of an outgoing group message (one member, or all) forward
    /// and the message's own state to their minimum.
    pub(crate) fn advance_group_members(
        &self,
        id: &MessageId,
        member: Option<&PeerId>,
        state: MessageState,
    ) -> Result<(), NodeError> {
        let changed = self.store().advance_members(id, member, state)?;
        if changed.is_none() && member.is_none() && self.store().member_states(id)?.is_empty() {
            // A group of one: the relay storing it is as far as it goes.
            return Ok(self.advance_state(id, state.min(MessageState::Sent))?);
        }
        if let Some((states, moved)) = changed {
            let overall = group::overall_state(states.values().copied());
            self.advance_state(id, overall)?;
            // Recorded first: whoever hears of a change reads it back.
            let group = self.store().message_group(id)?;
            for peer in moved {
                let state = states.get(&peer).copied().unwrap_or(state);
                self.emit(self.receipt_event(id, peer, group, state));
            }
        }
        Ok(())
    }

    /// Per-member states of an outgoing group message, for `kith status` (empty otherwise).
    pub(crate) fn member_view(&self, id: &MessageId) -> HashMap<String, MessageState> {
        self.store()
            .member_states(id)
            .unwrap_or_default()
            .into_iter()
            .map(|(p, s)| (p.to_string(), s))
            .collect()
    }

    /// A group conversation, oldest first.
    pub(crate) fn group_messages(&self, state: &State) -> Result<Vec<MessageView>, NodeError> {
        Ok(self
            .store()
            .group_conversation(&state.group)?
            .into_iter()
            .map(|m| {
                let mut view = MessageView::from(m);
                view.group = Some(state.group.to_string());
                view.conversation = state.group.to_string();
                view
            })
            .collect())
    }

    /// Every known group conversation's messages.
    pub(crate) fn all_group_messages(&self) -> Result<Vec<MessageView>, NodeError> {
        let mut out = Vec::new();
        for state in self.groups().all() {
            if self.out_of_sight(&state.group) {
                continue;
            }
            out.extend(self.group_messages(&state)?);
        }
        Ok(out)
    }

    /// Marks a group conversation read and sends `Read` receipts, batched per sender.
    pub(crate) async fn read_group(&self, state: &State) -> Result<usize, NodeError> {
        let mut by_sender: HashMap<PeerId, Vec<MessageId>> = HashMap::new();
        for msg in self.store().group_conversation(&state.group)? {
            if msg.direction == Direction::In && msg.state < MessageState::Read {
                self.store()
                    .advance_state(&msg.from, &msg.id, MessageState::Read)?;
                by_sender.entry(msg.from).or_default().push(msg.id);
            }
        }
        let count = by_sender.values().map(Vec::len).sum();
        // A group this node left or was removed from tells its former members nothing, and
        // one it has not joined yet (an invitation) tells its members nothing either.
        if self.settings().read_receipts
            && state.is_member(&self.peer_id())
            && !self.out_of_sight(&state.group)
        {
            for (to, ids) in by_sender {
                self.queue_receipts(to, ReceiptState::Read, &ids).await?;
            }
        }
        self.store().flush().await?;
        Ok(count)
    }
}

// ---- plugged into the core ------------------------------------------------------------------

impl Node {
    /// The group feature's state.
    pub(crate) fn groups(&self) -> &Groups {
        self.feature::<Groups>()
            .expect("the group feature is plugged in by `start`")
    }
}

impl Feature for Groups {
    fn tasks(&self, node: &Node, shutdown: &Signal) -> Vec<BoxFuture<'static, ()>> {
        vec![Box::pin(node.clone().group_loop(shutdown.clone()))]
    }

    fn serve(
        &self,
        node: &Node,
        event: Box<net::Event>,
    ) -> Result<BoxFuture<'static, ()>, Box<net::Event>> {
        match *event {
            net::Event::Gossip {
                source,
                message_id,
                topic,
                data,
            } => {
                let node = node.clone();
                Ok(Box::pin(async move {
                    node.handle_gossip(source, message_id, topic, data).await;
                }))
            }
            other => Err(Box::new(other)),
        }
    }
}

impl Rooms for Groups {
    fn target(&self, node: &Node, name: &str) -> Result<Option<State>, NodeError> {
        node.group_target(name)
    }

    fn room(&self, room: &GroupId) -> Option<State> {
        self.get(room)
    }

    fn send<'a>(
        &'a self,
        node: &'a Node,
        room: State,
        text: &'a str,
        wait: Option<Duration>,
    ) -> BoxFuture<'a, Result<Sent, NodeError>> {
        Box::pin(node.send_group(room, text, wait))
    }

    fn messages(&self, node: &Node, room: &State) -> Result<Vec<MessageView>, NodeError> {
        node.group_messages(room)
    }

    fn all_messages(&self, node: &Node) -> Result<Vec<MessageView>, NodeError> {
        node.all_group_messages()
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        room: &'a State,
    ) -> BoxFuture<'a, Result<usize, NodeError>> {
        Box::pin(node.read_group(room))
    }

    fn deliver<'a>(
        &'a self,
        node: &'a Node,
        envelope: &'a Envelope,
        room: GroupId,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(node.deliver_group(envelope, room))
    }

    fn accept<'a>(
        &'a self,
        node: &'a Node,
        via: PeerId,
        room: GroupId,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), Reject>> {
        Box::pin(node.accept_group(via, room, envelope))
    }

    fn advance_members(
        &self,
        node: &Node,
        id: &MessageId,
        member: Option<&PeerId>,
        state: MessageState,
    ) -> Result<(), NodeError> {
        node.advance_group_members(id, member, state)
    }

    fn member_states(&self, node: &Node, id: &MessageId) -> HashMap<String, MessageState> {
        node.member_view(id)
    }

    fn relay_of(&self, room: &GroupId) -> Option<PeerId> {
        let relay: Multiaddr = self.get(room)?.relay.parse().ok()?;
        peer_of(&relay)
    }

    fn sendable(&self, node: &Node, room: &State) -> Result<(), NodeError> {
        node.group_sendable(room)
    }

    fn contact_added<'a>(
        &'a self,
        node: &'a Node,
        peer: &'a PeerId,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(node.accept_invitations_of(peer))
    }
}
