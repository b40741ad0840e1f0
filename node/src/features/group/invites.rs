//! Invitations: a group this node was added to by a **stranger** (a peer that is not one of the
//! user's contacts) is not joined by itself.
//!
//! - When following the chain makes this node a member through an operation signed by a
//!   stranger, the group becomes a pending invitation (`GI/<group>` in the store) and a
//!   `group_invitation` event goes out once. The keys still follow the chain, so nothing sent
//!   meanwhile is lost; but the group is left out of `kith group list` and the conversation
//!   list, its topic is not subscribed, its messages raise no `message` events, its files do
//!   not download by themselves, nothing can be sent to it and reading it sends no receipts.
//! - `kith group accept GROUP` (or adding the inviter as a contact) joins it: the record goes,
//!   the topic is subscribed, and the messages kept meanwhile show.
//! - `kith group decline GROUP [--block]` leaves the group through its chain (so its relay
//!   stops copying anything to this node), drops what it kept of it, and keeps the record as
//!   declined so the group stays out of sight; `--block` also blocks the inviter, whose
//!   envelopes (a new add among them) are then refused. An add by a blocked peer is declined
//!   without asking.
//! - Being added again later, by whomever, replaces a declined record: a contact's add joins,
//!   a stranger's is a new invitation.

use std::collections::HashMap;

use kith_protocol::{cbor, GroupId};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::{invalid, lock, ChangeKind, GroupView, State};
use crate::clock::now_ms;
use crate::core::store::{Batch, Store, StoreError};
use crate::core::{Node, NodeError, NodeEvent};

const PREFIX: &[u8] = b"GI/";

/// Largest invitation record accepted from the store.
const MAX_RECORD_BYTES: usize = 256;

fn key(group: &GroupId) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(group.as_bytes());
    key
}

/// One invitation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Invitation {
    /// The stranger whose operation made this node a member.
    pub(crate) inviter: PeerId,
    /// When it came (unix ms, this node's clock).
    pub(crate) at_ms: u64,
    /// Declined: kept so that the group stays out of sight.
    pub(crate) declined: bool,
}

/// The invitations, by group (pending and declined).
pub(crate) type Invitations = HashMap<GroupId, Invitation>;

/// The invitations in the store; records that do not parse are skipped with a warning.
pub(crate) fn load(store: &Store) -> Result<Invitations, StoreError> {
    let mut out = HashMap::new();
    for (k, v) in store.scan_raw(PREFIX)? {
        let group = k.get(PREFIX.len()..).and_then(GroupId::from_slice);
        match (group, cbor::decode::<Invitation>(&v, MAX_RECORD_BYTES)) {
            (Some(group), Ok(record)) => {
                out.insert(group, record);
            }
            (_, Err(e)) => tracing::warn!(key = ?k, error = %e, "skipping a damaged invitation"),
            (None, _) => tracing::warn!(key = ?k, "skipping an invitation with a bad key"),
        }
    }
    Ok(out)
}

fn put(batch: &mut Batch, group: &GroupId, record: &Invitation) -> Result<(), NodeError> {
    let bytes = cbor::encode(record, MAX_RECORD_BYTES).map_err(invalid)?;
    batch.put_raw(key(group), bytes);
    Ok(())
}

/// One entry of `kith group invitations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitationView {
    /// The group id.
    pub group_id: String,
    /// Its name.
    pub name: String,
    /// The stranger who added this node.
    pub inviter: String,
    /// How many members it has (this node included).
    pub members: usize,
    /// Messages kept while the invitation waits.
    pub messages: usize,
    /// When the invitation came (unix ms).
    pub invited_at_ms: u64,
}

/// What `kith group decline` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclineView {
    /// The group id.
    pub group_id: String,
    /// Its name.
    pub name: String,
    /// Messages of the group that were dropped.
    pub dropped: usize,
    /// Whether the inviter is blocked now.
    pub blocked: bool,
}

impl Node {
    fn invitation(&self, group: &GroupId) -> Option<Invitation> {
        lock(&self.groups().invites).get(group).cloned()
    }

    /// Whether `group` is kept out of sight: an invitation waiting for the user, or declined.
    pub(crate) fn out_of_sight(&self, group: &GroupId) -> bool {
        lock(&self.groups().invites).contains_key(group)
    }

    /// Whether the user declined the invitation to `group`.
    pub(crate) fn is_declined(&self, group: &GroupId) -> bool {
        lock(&self.groups().invites)
            .get(group)
            .is_some_and(|i| i.declined)
    }

    /// Following the chain just made this node a member of `state` through an operation of
    /// `by`: a stranger's add becomes an invitation (written into `batch`), and whoever adds
    /// this node again replaces a declined record. Returns the event to announce it with.
    pub(super) fn note_membership(
        &self,
        state: &State,
        by: PeerId,
        batch: &mut Batch,
    ) -> Result<Option<NodeEvent>, NodeError> {
        let group = state.group;
        let stranger = by != self.peer_id() && self.contact_of(&by).is_none();
        let blocked = self.plugins().gate.is_blocked(&by);
        let previous = self.invitation(&group);
        if !stranger {
            if previous.is_some() {
                batch.remove_raw(key(&group));
                lock(&self.groups().invites).remove(&group);
            }
            return Ok(None);
        }
        if previous.as_ref().is_some_and(|p| !p.declined) {
            return Ok(None);
        }
        let record = Invitation {
            inviter: by,
            at_ms: now_ms(),
            declined: blocked,
        };
        put(batch, &group, &record)?;
        lock(&self.groups().invites).insert(group, record);
        if blocked {
            tracing::info!(%group, inviter = %by, "a blocked peer added this node to a group; declined");
            return Ok(None);
        }
        tracing::info!(%group, inviter = %by, "a stranger added this node to a group; it waits as an invitation");
        Ok(Some(NodeEvent::GroupInvitation {
            group_id: group.to_string(),
            name: state.name.clone(),
            inviter: by.to_string(),
        }))
    }

    /// The pending invitations with their groups. One whose inviter took this node out again
    /// is no longer anything to join, and is left out.
    fn pending_invitations(&self) -> Vec<(State, Invitation)> {
        let pending: Vec<(GroupId, Invitation)> = lock(&self.groups().invites)
            .iter()
            .filter(|(_, i)| !i.declined)
            .map(|(g, i)| (*g, i.clone()))
            .collect();
        let me = self.peer_id();
        pending
            .into_iter()
            .filter_map(|(g, i)| Some((self.groups().get(&g).filter(|s| s.is_member(&me))?, i)))
            .collect()
    }

    /// The pending invitation `name_or_id` names.
    fn pending_invitation(&self, name_or_id: &str) -> Result<(State, Invitation), NodeError> {
        let wanted = name_or_id.trim();
        let mut matches: Vec<_> = self
            .pending_invitations()
            .into_iter()
            .filter(|(s, _)| s.group.to_string() == wanted || s.name == wanted)
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(NodeError::UnknownRecipient(format!(
                "{wanted} (no pending group invitation by that name or id; `kith group invitations` lists them)"
            ))),
            _ => Err(invalid(format!(
                "{wanted:?} names several invitations; give the group id"
            ))),
        }
    }

    /// The pending invitations, newest first.
    pub fn group_invitations(&self) -> Result<Vec<InvitationView>, NodeError> {
        let mut out = Vec::new();
        for (state, invitation) in self.pending_invitations() {
            let group = state.group;
            out.push(InvitationView {
                group_id: group.to_string(),
                name: state.name.clone(),
                inviter: invitation.inviter.to_string(),
                members: state.members.len(),
                messages: self.store().group_conversation(&group)?.len(),
                invited_at_ms: invitation.at_ms,
            });
        }
        out.sort_by_key(|v| std::cmp::Reverse(v.invited_at_ms));
        Ok(out)
    }

    /// Joins the group of a pending invitation: it shows like any other from now on.
    pub async fn accept_invitation(&self, name_or_id: &str) -> Result<GroupView, NodeError> {
        let (state, _) = self.pending_invitation(name_or_id)?;
        self.join_invited(&state).await?;
        Ok(self.named_view(&state))
    }

    /// Joins `state`, a member's group kept as an invitation: the record goes, the topic is
    /// subscribed.
    async fn join_invited(&self, state: &State) -> Result<(), NodeError> {
        let mut batch = Batch::new();
        batch.remove_raw(key(&state.group));
        self.store().commit(batch).await?;
        lock(&self.groups().invites).remove(&state.group);
        self.net()
            .subscribe(kith_protocol::group::topic(&state.group), true)
            .await;
        tracing::info!(group = %state.group, "joined the group of an invitation");
        Ok(())
    }

    /// `peer` became a contact: the groups it invited this node to are joined.
    pub(crate) async fn accept_invitations_of(&self, peer: &PeerId) -> Result<(), NodeError> {
        for (state, invitation) in self.pending_invitations() {
            if invitation.inviter == *peer {
                self.join_invited(&state).await?;
            }
        }
        Ok(())
    }

    /// Declines a pending invitation: leaves the group through its chain, drops what was kept
    /// of it, and with `block` blocks the inviter.
    pub async fn decline_invitation(
        &self,
        name_or_id: &str,
        block: bool,
    ) -> Result<DeclineView, NodeError> {
        let (state, invitation) = self.pending_invitation(name_or_id)?;
        let group = state.group;
        self.change_group(&group.to_string(), ChangeKind::Leave, None)
            .await?;
        let mut batch = Batch::new();
        let messages = self.store().group_conversation(&group)?;
        for msg in &messages {
            batch.remove_message(msg, Some(&group));
        }
        let record = Invitation {
            declined: true,
            ..invitation.clone()
        };
        put(&mut batch, &group, &record)?;
        self.store().commit(batch).await?;
        lock(&self.groups().invites).insert(group, record);
        if block {
            self.plugins().gate.block(self, invitation.inviter).await?;
        }
        tracing::info!(%group, dropped = messages.len(), block, "declined a group invitation");
        Ok(DeclineView {
            group_id: group.to_string(),
            name: state.name,
            dropped: messages.len(),
            blocked: block,
        })
    }

    /// Refuses sending to a group that waits as an invitation (or was declined).
    pub(super) fn check_joined(&self, state: &State) -> Result<(), NodeError> {
        match self.invitation(&state.group) {
            Some(i) if !i.declined => Err(invalid(format!(
                "{} is an invitation from {} (not a contact): `kith group accept {}` joins it, `kith group decline {}` leaves it",
                state.name, i.inviter, state.group, state.group
            ))),
            Some(_) => Err(NodeError::UnknownRecipient(state.name.clone())),
            None => Ok(()),
        }
    }
}
