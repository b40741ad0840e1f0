//! Groups: signed, versioned membership operations, the pure state machine that validates them,
//! and the `/kith/group/1` wire messages.
//!
//! A group is an ordered, per-group channel of operations. Each [`Op`] names the version of the
//! group it applies to and travels signed inside an [`Envelope`] (`to: Group(id)`,
//! `body: GroupOp`), so its author is the envelope's `from`. The group's home relay orders the
//! chain: the first valid operation for a version wins and moves the group to `version + 1`; a
//! competing one gets [`Response::Conflict`] with the current state. Relays and members both run
//! every operation through [`State::apply`] (or [`State::create`]), so a relay cannot forge
//! membership and a member cannot skip a version. Later, end-to-end group encryption (MLS) will
//! carry its commits as further [`Change`] variants on the same channel.
//!
//! Flow on `/kith/group/1` (node → the group's home relay):
//!
//! - [`Request::Submit`] an operation → [`Response::Applied`] (durably stored) or
//!   [`Response::Conflict`] (another operation took that version) or [`Response::Refused`]
//!   (invalid for the group's state).
//! - [`Request::Get`] the operations after a version → [`Response::Ops`]; a member replays them
//!   through [`State::apply`] to validate and catch up.
//! - [`Request::Post`] a group message (uploaded once) → [`Response::Stored`] once the relay has
//!   durably fanned it out into every other member's mailbox; online members also get it on the
//!   gossipsub topic [`topic`].

use std::collections::BTreeSet;

use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

use crate::envelope::{Body, BodyError, Envelope, Header, SealError, VerifyError};
use crate::ids::{GroupId, MessageId};
use crate::limits::MAX_MAILBOX_FRAME_BYTES;
use crate::reject::Reject;
use crate::state::MessageState;
use crate::Destination;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/group/1";

/// Largest frame on this protocol (a page of operations).
pub const MAX_FRAME_BYTES: usize = MAX_MAILBOX_FRAME_BYTES;

/// Largest request frame: each request carries at most one envelope, and a `Submit` its
/// commit and Welcome.
pub const MAX_REQUEST_BYTES: usize =
    crate::limits::MAX_ENVELOPE_BYTES + 2 * MAX_HANDSHAKE_PART_BYTES + 1024;

/// Most bytes of commits and Welcomes in one [`Response::Ops`] page: a page stops early rather
/// than exceed it (always at least one operation).
pub const MAX_PAGE_HANDSHAKE_BYTES: usize = 2 * 1024 * 1024;

/// Default most members of a group (a relay and node setting).
pub const DEFAULT_MAX_MEMBERS: usize = 200;

/// Hard cap on members named by one operation, whatever the settings say (bounds decoding).
pub const MAX_MEMBERS_PER_OP: usize = 4_096;

/// Longest group name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;

/// Longest relay address in a create operation, in bytes.
pub const MAX_RELAY_ADDR_BYTES: usize = 512;

/// Most operations in one [`Response::Ops`] page.
pub const MAX_OPS_PER_PAGE: u32 = 256;

/// Prefix of a group's gossipsub topic.
pub const TOPIC_PREFIX: &str = "kith/g/";

/// The gossipsub topic of a group: `kith/g/<group id>`.
pub fn topic(group: &GroupId) -> String {
    format!("{TOPIC_PREFIX}{group}")
}

/// Serde helpers for a set of peer ids as a CBOR array of byte strings.
mod peer_set {
    use std::collections::BTreeSet;

    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(set: &BTreeSet<PeerId>, s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<serde_bytes::ByteBuf> = set
            .iter()
            .map(|p| serde_bytes::ByteBuf::from(p.to_bytes()))
            .collect();
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<PeerId>, D::Error> {
        let bytes: Vec<serde_bytes::ByteBuf> = Deserialize::deserialize(d)?;
        if bytes.len() > super::MAX_MEMBERS_PER_OP {
            return Err(serde::de::Error::invalid_length(
                bytes.len(),
                &"at most MAX_MEMBERS_PER_OP peers",
            ));
        }
        bytes
            .iter()
            .map(|b| PeerId::from_bytes(b).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// What an operation changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Creates the group (version 0 → 1). The author becomes its first admin and member.
    Create {
        /// The group's display name.
        name: String,
        /// The group's home relay, a multiaddr ending in `/p2p/<relay id>`.
        relay: String,
        /// Further initial members.
        #[serde(with = "peer_set")]
        members: BTreeSet<PeerId>,
    },
    /// An admin adds a member.
    Add {
        /// The new member.
        #[serde(with = "crate::ids::peer_bytes")]
        member: PeerId,
    },
    /// An admin removes a member.
    Remove {
        /// The member to remove.
        #[serde(with = "crate::ids::peer_bytes")]
        member: PeerId,
    },
    /// The author leaves.
    Leave,
    /// An admin makes a member an admin.
    Promote {
        /// The member to promote.
        #[serde(with = "crate::ids::peer_bytes")]
        member: PeerId,
    },
    /// Any member refreshes its keys (post-compromise security), removing from the group's
    /// keys the peers that already left the chain's membership (a leaver cannot commit its own
    /// removal in MLS).
    Update {
        /// Former members whose leaves the commit removes; none may be a member.
        #[serde(with = "peer_set")]
        removes: BTreeSet<PeerId>,
    },
}

impl Change {
    /// Whether this change carries an MLS commit: those that change the group's keys. A
    /// `Create` does when it names members; `Promote` (admins are the chain's business, not
    /// MLS's) and `Leave` (a leaver cannot commit its own removal) never do.
    pub fn commits(&self) -> bool {
        match self {
            Change::Create { members, .. } => !members.is_empty(),
            Change::Add { .. } | Change::Remove { .. } | Change::Update { .. } => true,
            Change::Leave | Change::Promote { .. } => false,
        }
    }

    /// Whether this change's commit comes with a Welcome (it adds members).
    pub fn welcomes(&self) -> bool {
        match self {
            Change::Create { members, .. } => !members.is_empty(),
            Change::Add { .. } => true,
            _ => false,
        }
    }
}

/// Largest MLS commit or Welcome an operation may carry, in bytes (a group of 200 needs about
/// 72 KiB for the Welcome that creates it).
pub const MAX_HANDSHAKE_PART_BYTES: usize = 1024 * 1024;

/// The digest an operation signs for each handshake part.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// The MLS side of an operation, signed with it: the epoch its commit was made in and the
/// digests of the commit and the Welcome. The bytes travel beside the operation
/// ([`Handshake`]), so the operation announced through every member's mailbox stays small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crypto {
    /// The MLS epoch the commit was made in; the group moves to the next one.
    pub epoch: u64,
    /// BLAKE3 of the commit (a TLS-encoded MLS message).
    #[serde(with = "serde_bytes")]
    pub commit: [u8; 32],
    /// BLAKE3 of the Welcome, for a change that adds members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub welcome: Option<serde_bytes::ByteArray<32>>,
}

impl Crypto {
    /// The MLS side of an operation whose commit, made in `epoch`, and Welcome are these.
    pub fn of(epoch: u64, handshake: &Handshake) -> Self {
        Self {
            epoch,
            commit: digest(&handshake.commit),
            welcome: handshake
                .welcome
                .as_ref()
                .map(|w| serde_bytes::ByteArray::new(digest(w))),
        }
    }
}

/// An operation's MLS commit and Welcome, matched by [`Crypto`]'s digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The commit.
    pub commit: serde_bytes::ByteBuf,
    /// The Welcome for added members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub welcome: Option<serde_bytes::ByteBuf>,
}

impl Handshake {
    /// Checks that these are the bytes `op` signed for (sizes within
    /// [`MAX_HANDSHAKE_PART_BYTES`]).
    pub fn check(&self, op: &Op) -> Result<(), OpError> {
        let Some(crypto) = &op.mls else {
            return Err(OpError::BadHandshake(
                "the operation carries no commit".into(),
            ));
        };
        let too_big = |b: &[u8]| b.len() > MAX_HANDSHAKE_PART_BYTES;
        if too_big(&self.commit) || self.welcome.as_ref().is_some_and(|w| too_big(w)) {
            return Err(OpError::BadHandshake(
                "a commit or Welcome is too large".into(),
            ));
        }
        if digest(&self.commit) != crypto.commit {
            return Err(OpError::BadHandshake(
                "the commit is not the one signed".into(),
            ));
        }
        let welcome = self.welcome.as_ref().map(|w| digest(w));
        if welcome != crypto.welcome.map(|w| w.into_array()) {
            return Err(OpError::BadHandshake(
                "the Welcome is not the one signed".into(),
            ));
        }
        Ok(())
    }
}

/// One membership operation: what changes, in which group, on top of which version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The group.
    pub group: GroupId,
    /// The version this operation applies to (0 for `Create`); the result is `version + 1`.
    pub version: u64,
    /// The change.
    pub change: Change,
    /// Its MLS commit, for a change that carries one ([`Change::commits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mls: Option<Crypto>,
}

impl Op {
    /// Checks that `handshake` is what this operation signed: present exactly when it carries
    /// a commit, and matching its digests ([`Handshake::check`]).
    pub fn check_handshake(&self, handshake: Option<&Handshake>) -> Result<(), OpError> {
        match (handshake, &self.mls) {
            (Some(handshake), Some(_)) => handshake.check(self),
            (None, None) => Ok(()),
            (None, Some(_)) => Err(OpError::BadHandshake("the commit is missing".into())),
            (Some(_), None) => Err(OpError::BadHandshake(
                "a commit for a change without one".into(),
            )),
        }
    }

    /// Checks limits that do not depend on the group's state.
    pub fn validate_shape(&self) -> Result<(), OpError> {
        if let Change::Create {
            name,
            relay,
            members,
        } = &self.change
        {
            if name.trim().is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(OpError::BadName);
            }
            if relay.is_empty() || relay.len() > MAX_RELAY_ADDR_BYTES {
                return Err(OpError::BadRelay);
            }
            if members.len() > MAX_MEMBERS_PER_OP {
                return Err(OpError::TooManyMembers {
                    max: MAX_MEMBERS_PER_OP,
                });
            }
        }
        Ok(())
    }
}

/// Limits a validator applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most members (admins included).
    pub max_members: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_members: DEFAULT_MAX_MEMBERS,
        }
    }
}

/// A group's membership at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The group.
    pub group: GroupId,
    /// Its display name.
    pub name: String,
    /// Its home relay (a multiaddr ending in `/p2p/<relay id>`).
    pub relay: String,
    /// Admins (always members too).
    #[serde(with = "peer_set")]
    pub admins: BTreeSet<PeerId>,
    /// Members, admins included.
    #[serde(with = "peer_set")]
    pub members: BTreeSet<PeerId>,
    /// The number of operations applied so far.
    pub version: u64,
    /// The MLS epoch the chain's commits have brought the group to (one commit per epoch).
    #[serde(default)]
    pub epoch: u64,
}

/// Why an operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    /// The operation applies to another version than the group's current one.
    #[error("operation applies to version {got}, but the group is at version {current}")]
    WrongVersion {
        /// The group's version.
        current: u64,
        /// The version the operation names.
        got: u64,
    },
    /// The operation belongs to another group.
    #[error("operation is for another group")]
    WrongGroup,
    /// The group does not exist (here).
    #[error("unknown group")]
    UnknownGroup,
    /// A group with this id already exists.
    #[error("the group already exists")]
    AlreadyExists,
    /// `Create` must be the first operation, and only the first.
    #[error("create must be the first operation of a group, and only the first")]
    MisplacedCreate,
    /// Only current admins may add, remove or promote.
    #[error("{actor} is not an admin of the group")]
    NotAdmin {
        /// Who tried.
        actor: String,
    },
    /// The author (or the target) is not a member.
    #[error("{peer} is not a member of the group")]
    NotMember {
        /// The peer.
        peer: String,
    },
    /// The peer to add is already a member.
    #[error("{peer} is already a member")]
    AlreadyMember {
        /// The peer.
        peer: String,
    },
    /// The peer to promote is already an admin.
    #[error("{peer} is already an admin")]
    AlreadyAdmin {
        /// The peer.
        peer: String,
    },
    /// The group would exceed its member limit.
    #[error("the group is full: at most {max} members")]
    TooManyMembers {
        /// The limit.
        max: usize,
    },
    /// The name is empty or longer than [`MAX_NAME_BYTES`].
    #[error("a group name is 1 to {MAX_NAME_BYTES} bytes")]
    BadName,
    /// The relay address is empty or too long.
    #[error("bad relay address in create")]
    BadRelay,
    /// A change that must carry an MLS commit has none, or one that must not has one.
    #[error("this change must {} an MLS commit{}", if *.required { "carry" } else { "not carry" }, if *.welcome { " with a Welcome" } else { "" })]
    Commit {
        /// Whether a commit is required (else forbidden).
        required: bool,
        /// Whether a Welcome goes with it.
        welcome: bool,
    },
    /// The commit was made in another epoch than the group's (one commit per epoch).
    #[error("the commit is for epoch {got}, but the group is at epoch {current}")]
    WrongEpoch {
        /// The group's epoch.
        current: u64,
        /// The commit's epoch.
        got: u64,
    },
    /// An update may only remove peers that are no longer members.
    #[error("{peer} is still a member: only an admin's remove takes a member out")]
    StillMember {
        /// The peer.
        peer: String,
    },
    /// The commit or Welcome beside an operation is not the one it signed.
    #[error("bad handshake: {0}")]
    BadHandshake(String),
}

/// Checks that `op` carries an MLS commit exactly when its change needs one, made in `epoch`,
/// and returns the epoch after it.
fn next_epoch(op: &Op, epoch: u64) -> Result<u64, OpError> {
    let required = op.change.commits();
    let welcome = op.change.welcomes();
    match &op.mls {
        None if !required => Ok(epoch),
        Some(c) if required && c.welcome.is_some() == welcome => {
            if c.epoch == epoch {
                Ok(epoch + 1)
            } else {
                Err(OpError::WrongEpoch {
                    current: epoch,
                    got: c.epoch,
                })
            }
        }
        _ => Err(OpError::Commit { required, welcome }),
    }
}

impl State {
    /// The state after a `Create` operation by `actor`.
    pub fn create(actor: PeerId, op: &Op, limits: &Limits) -> Result<State, OpError> {
        op.validate_shape()?;
        let Change::Create {
            name,
            relay,
            members,
        } = &op.change
        else {
            return Err(OpError::UnknownGroup);
        };
        if op.version != 0 {
            return Err(OpError::MisplacedCreate);
        }
        let mut all = members.clone();
        all.insert(actor);
        if all.len() > limits.max_members {
            return Err(OpError::TooManyMembers {
                max: limits.max_members,
            });
        }
        let epoch = next_epoch(op, 0)?;
        Ok(State {
            group: op.group,
            name: name.trim().to_owned(),
            relay: relay.clone(),
            admins: BTreeSet::from([actor]),
            members: all,
            version: 1,
            epoch,
        })
    }

    /// The state after `actor`'s operation `op`, or why it is refused. Pure: `self` is unchanged.
    pub fn apply(&self, actor: PeerId, op: &Op, limits: &Limits) -> Result<State, OpError> {
        op.validate_shape()?;
        if op.group != self.group {
            return Err(OpError::WrongGroup);
        }
        if matches!(op.change, Change::Create { .. }) {
            return Err(OpError::AlreadyExists);
        }
        if op.version != self.version {
            return Err(OpError::WrongVersion {
                current: self.version,
                got: op.version,
            });
        }
        let mut next = self.clone();
        next.version += 1;
        let require_admin = || {
            if self.admins.contains(&actor) {
                Ok(())
            } else {
                Err(OpError::NotAdmin {
                    actor: actor.to_string(),
                })
            }
        };
        match &op.change {
            Change::Create { .. } => return Err(OpError::AlreadyExists),
            Change::Add { member } => {
                require_admin()?;
                if self.members.contains(member) {
                    return Err(OpError::AlreadyMember {
                        peer: member.to_string(),
                    });
                }
                if self.members.len() >= limits.max_members {
                    return Err(OpError::TooManyMembers {
                        max: limits.max_members,
                    });
                }
                next.members.insert(*member);
            }
            Change::Remove { member } => {
                require_admin()?;
                if !self.members.contains(member) {
                    return Err(OpError::NotMember {
                        peer: member.to_string(),
                    });
                }
                next.members.remove(member);
                next.admins.remove(member);
            }
            Change::Leave => {
                if !self.members.contains(&actor) {
                    return Err(OpError::NotMember {
                        peer: actor.to_string(),
                    });
                }
                next.members.remove(&actor);
                next.admins.remove(&actor);
            }
            Change::Promote { member } => {
                require_admin()?;
                if !self.members.contains(member) {
                    return Err(OpError::NotMember {
                        peer: member.to_string(),
                    });
                }
                if !next.admins.insert(*member) {
                    return Err(OpError::AlreadyAdmin {
                        peer: member.to_string(),
                    });
                }
            }
            Change::Update { removes } => {
                if !self.members.contains(&actor) {
                    return Err(OpError::NotMember {
                        peer: actor.to_string(),
                    });
                }
                if let Some(peer) = removes.iter().find(|p| self.members.contains(p)) {
                    return Err(OpError::StillMember {
                        peer: peer.to_string(),
                    });
                }
            }
        }
        next.epoch = next_epoch(op, self.epoch)?;
        // A group whose last admin left or was removed is not orphaned: its member with the
        // lowest peer id becomes admin, the same choice on every replica.
        if next.admins.is_empty() {
            if let Some(first) = next.members.iter().next().copied() {
                next.admins.insert(first);
            }
        }
        Ok(next)
    }

    /// Whether `peer` is a member.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.members.contains(peer)
    }
}

/// Why an operation envelope is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpEnvelopeError {
    /// The envelope does not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The body does not decode or is not a group operation.
    #[error("not a group operation: {0}")]
    NotAnOp(String),
    /// The envelope's destination is not the operation's group.
    #[error("envelope is not addressed to the operation's group")]
    WrongDestination,
}

impl OpEnvelopeError {
    /// The typed wire rejection for this error.
    pub fn reject(&self) -> Reject {
        match self {
            OpEnvelopeError::Verify(VerifyError::UnsupportedVersion(_)) => {
                Reject::UnsupportedVersion
            }
            OpEnvelopeError::Verify(VerifyError::BodyTooLarge { max, .. }) => {
                Reject::TooLarge { max: *max as u64 }
            }
            OpEnvelopeError::Verify(_) => Reject::BadSignature,
            OpEnvelopeError::NotAnOp(_) | OpEnvelopeError::WrongDestination => Reject::Malformed,
        }
    }
}

/// Verifies an operation envelope and returns its operation (the author is `envelope.from`).
pub fn open_op(envelope: &Envelope) -> Result<Op, OpEnvelopeError> {
    envelope.verify()?;
    let op = match envelope.body() {
        Ok(Body::GroupOp(op)) => op,
        Ok(_) => return Err(OpEnvelopeError::NotAnOp("another body".into())),
        Err(e) => return Err(OpEnvelopeError::NotAnOp(e.to_string())),
    };
    if envelope.to != Destination::Group(op.group) {
        return Err(OpEnvelopeError::WrongDestination);
    }
    Ok(op)
}

/// Seals an operation into a signed envelope.
pub fn seal_op(keypair: &Keypair, op: Op, now_ms: u64) -> Result<Envelope, SealError> {
    let header = Header {
        id: MessageId::random(),
        to: Destination::Group(op.group),
        sent_at_ms: now_ms,
        lamport: op.version,
        expires_at_ms: None,
    };
    Envelope::seal(keypair, header, &Body::GroupOp(op))
}

/// Why a chain of operations does not replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// An envelope is unusable.
    #[error("operation {index}: {source}")]
    Envelope {
        /// Its position in the chain.
        index: usize,
        /// Why.
        source: OpEnvelopeError,
    },
    /// An operation is invalid on the state before it.
    #[error("operation {index}: {source}")]
    Op {
        /// Its position in the chain.
        index: usize,
        /// Why.
        source: OpError,
    },
}

/// Replays signed operations on top of `state` (or from scratch when `None`, in which case the
/// first must be `Create`), validating each. Returns the final state.
pub fn replay(
    state: Option<State>,
    ops: &[Envelope],
    limits: &Limits,
) -> Result<Option<State>, ReplayError> {
    let mut state = state;
    for (index, envelope) in ops.iter().enumerate() {
        let op = open_op(envelope).map_err(|source| ReplayError::Envelope { index, source })?;
        let next = match &state {
            None => State::create(envelope.from, &op, limits),
            Some(s) => s.apply(envelope.from, &op, limits),
        };
        state = Some(next.map_err(|source| ReplayError::Op { index, source })?);
    }
    Ok(state)
}

/// A group message's overall state: the minimum over its members' states (WhatsApp's "message
/// info"). With no other member, the message is as far as the relay took it: `sent`.
pub fn overall_state(members: impl IntoIterator<Item = MessageState>) -> MessageState {
    members
        .into_iter()
        .min()
        .unwrap_or(MessageState::Sent)
        .max(MessageState::Pending)
}

/// A request to a group's home relay.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Apply this signed operation (an envelope with a `GroupOp` body).
    Submit {
        /// Echoed in the response.
        req_id: u64,
        /// The operation envelope.
        op: Envelope,
        /// Its commit and Welcome, when the operation carries one ([`Op::mls`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handshake: Option<Handshake>,
    },
    /// The group's operations after `after_version` (0: from the create), oldest first.
    Get {
        /// Echoed in the response.
        req_id: u64,
        /// The group.
        group: GroupId,
        /// Only operations that produce a version above this one.
        after_version: u64,
        /// At most this many (capped at [`MAX_OPS_PER_PAGE`]).
        limit: u32,
    },
    /// Store this group message for every other member and publish it to online members.
    Post {
        /// Echoed in the response.
        req_id: u64,
        /// The envelope, addressed to the group.
        envelope: Envelope,
    },
}

impl Request {
    /// The request's id.
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Submit { req_id, .. }
            | Request::Get { req_id, .. }
            | Request::Post { req_id, .. } => *req_id,
        }
    }
}

/// The relay's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The operation is durably applied; the group is now at `version`.
    Applied {
        /// The request's id.
        req_id: u64,
        /// The new version.
        version: u64,
    },
    /// Another operation already took that version; here is the current state.
    Conflict {
        /// The request's id.
        req_id: u64,
        /// The group's current state.
        state: State,
    },
    /// Operations, oldest first.
    Ops {
        /// The request's id.
        req_id: u64,
        /// Signed operation envelopes.
        ops: Vec<Envelope>,
        /// Whether more follow.
        more: bool,
        /// The operations' commits and Welcomes, one entry per operation (`None` for one that
        /// carries no commit).
        #[serde(default)]
        handshakes: Vec<Option<Handshake>>,
    },
    /// The message is durably stored for every other member but those in `missed`.
    Stored {
        /// The request's id.
        req_id: u64,
        /// How many members' mailboxes got a copy.
        recipients: u32,
        /// Members whose mailbox refused the copy (full): they did not get it, and the sender
        /// must not show them `sent`. Absent (empty) from older relays, which did not say.
        #[serde(default, skip_serializing_if = "BTreeSet::is_empty", with = "peer_set")]
        missed: BTreeSet<PeerId>,
    },
    /// The operation or message is invalid for the group's state.
    Refused {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: OpError,
    },
    /// The request is refused for a reason that is not about the group (malformed, busy...).
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
    },
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Applied { req_id, .. }
            | Response::Conflict { req_id, .. }
            | Response::Ops { req_id, .. }
            | Response::Stored { req_id, .. }
            | Response::Refused { req_id, .. }
            | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}

/// Checks a group operation body's own limits (used by [`Body::validate`]).
pub(crate) fn validate_body(op: &Op) -> Result<(), BodyError> {
    op.validate_shape()
        .map_err(|e| BodyError::BadGroupOp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (Keypair, PeerId) {
        let k = Keypair::generate_ed25519();
        let p = k.public().to_peer_id();
        (k, p)
    }

    /// The MLS side a change needs, with stand-in bytes (the chain checks epochs, not MLS).
    fn crypto(change: &Change, epoch: u64) -> Option<Crypto> {
        let handshake = Handshake {
            commit: serde_bytes::ByteBuf::from(b"commit".to_vec()),
            welcome: change
                .welcomes()
                .then(|| serde_bytes::ByteBuf::from(b"welcome".to_vec())),
        };
        change.commits().then(|| Crypto::of(epoch, &handshake))
    }

    fn create(group: GroupId, members: &[PeerId]) -> Op {
        let change = Change::Create {
            name: "friends".into(),
            relay: "/ip4/127.0.0.1/tcp/1/p2p/x".into(),
            members: members.iter().copied().collect(),
        };
        Op {
            group,
            version: 0,
            mls: crypto(&change, 0),
            change,
        }
    }

    fn op(state: &State, change: Change) -> Op {
        Op {
            group: state.group,
            version: state.version,
            mls: crypto(&change, state.epoch),
            change,
        }
    }

    const LIMITS: Limits = Limits {
        max_members: DEFAULT_MAX_MEMBERS,
    };

    fn group() -> (PeerId, PeerId, PeerId, State) {
        let alice = key().1;
        let bob = key().1;
        let carol = key().1;
        let state =
            State::create(alice, &create(GroupId::random(), &[bob]), &LIMITS).expect("create");
        (alice, bob, carol, state)
    }

    #[test]
    fn one_commit_per_epoch_and_only_where_a_change_needs_one() {
        let (alice, bob, carol, state) = group();
        assert_eq!(state.epoch, 1, "a create naming members commits");
        let add = op(&state, Change::Add { member: carol });
        let added = state.apply(alice, &add, &LIMITS).expect("add");
        assert_eq!(added.epoch, 2);
        // The second commit for epoch 1 (on top of a stale view) is refused.
        let mut stale = op(&added, Change::Remove { member: carol });
        stale.mls.as_mut().expect("commit").epoch = 1;
        assert_eq!(
            added.apply(alice, &stale, &LIMITS),
            Err(OpError::WrongEpoch { current: 2, got: 1 })
        );
        // A promote carries no commit; an add must carry one with a Welcome.
        let mut promote = op(&added, Change::Promote { member: bob });
        assert_eq!(
            added
                .apply(alice, &promote, &LIMITS)
                .expect("promote")
                .epoch,
            2
        );
        promote.mls = crypto(
            &Change::Update {
                removes: BTreeSet::new(),
            },
            2,
        );
        assert!(matches!(
            added.apply(alice, &promote, &LIMITS),
            Err(OpError::Commit {
                required: false,
                ..
            })
        ));
        let mut bare = op(&added, Change::Remove { member: carol });
        bare.mls = None;
        assert!(matches!(
            added.apply(alice, &bare, &LIMITS),
            Err(OpError::Commit { required: true, .. })
        ));
        // Any member may update, removing only peers that already left.
        let update = op(
            &added,
            Change::Update {
                removes: BTreeSet::from([carol]),
            },
        );
        assert!(matches!(
            added.apply(bob, &update, &LIMITS),
            Err(OpError::StillMember { .. })
        ));
        let left = added
            .apply(carol, &op(&added, Change::Leave), &LIMITS)
            .expect("leave");
        assert_eq!(left.epoch, 2, "a leave commits nothing");
        let tidy = op(
            &left,
            Change::Update {
                removes: BTreeSet::from([carol]),
            },
        );
        assert_eq!(left.apply(bob, &tidy, &LIMITS).expect("update").epoch, 3);
    }

    #[test]
    fn a_handshake_must_be_the_one_the_operation_signed() {
        let (_, _, carol, state) = group();
        let handshake = Handshake {
            commit: serde_bytes::ByteBuf::from(vec![1; 40]),
            welcome: Some(serde_bytes::ByteBuf::from(vec![2; 40])),
        };
        let mut add = op(&state, Change::Add { member: carol });
        add.mls = Some(Crypto::of(state.epoch, &handshake));
        assert_eq!(handshake.check(&add), Ok(()));
        let mut swapped = handshake.clone();
        swapped.commit[0] ^= 1;
        assert!(matches!(swapped.check(&add), Err(OpError::BadHandshake(_))));
        let mut no_welcome = handshake.clone();
        no_welcome.welcome = None;
        assert!(matches!(
            no_welcome.check(&add),
            Err(OpError::BadHandshake(_))
        ));
        add.mls = None;
        assert!(matches!(
            handshake.check(&add),
            Err(OpError::BadHandshake(_))
        ));
        // Beside an operation: present exactly when the operation carries a commit.
        assert!(matches!(
            add.check_handshake(Some(&handshake)),
            Err(OpError::BadHandshake(_))
        ));
        assert_eq!(add.check_handshake(None), Ok(()));
        add.mls = Some(Crypto::of(state.epoch, &handshake));
        assert_eq!(add.check_handshake(Some(&handshake)), Ok(()));
        assert!(matches!(
            add.check_handshake(None),
            Err(OpError::BadHandshake(_))
        ));
    }

    #[test]
    fn create_makes_the_author_the_admin() {
        let (alice, bob, _, state) = group();
        assert_eq!(state.version, 1);
        assert_eq!(state.admins, BTreeSet::from([alice]));
        assert_eq!(state.members, BTreeSet::from([alice, bob]));
    }

    #[test]
    fn only_admins_add_remove_and_promote() {
        let (alice, bob, carol, state) = group();
        for change in [
            Change::Add { member: carol },
            Change::Remove { member: alice },
            Change::Promote { member: bob },
        ] {
            assert!(matches!(
                state.apply(bob, &op(&state, change.clone()), &LIMITS),
                Err(OpError::NotAdmin { .. })
            ));
            assert!(matches!(
                state.apply(carol, &op(&state, change), &LIMITS),
                Err(OpError::NotAdmin { .. })
            ));
        }
        let added = state
            .apply(alice, &op(&state, Change::Add { member: carol }), &LIMITS)
            .expect("admin adds");
        assert!(added.is_member(&carol));
        assert_eq!(added.version, 2);
        let promoted = added
            .apply(alice, &op(&added, Change::Promote { member: bob }), &LIMITS)
            .expect("admin promotes");
        let removed = promoted
            .apply(
                bob,
                &op(&promoted, Change::Remove { member: carol }),
                &LIMITS,
            )
            .expect("new admin removes");
        assert!(!removed.is_member(&carol));
    }

    #[test]
    fn anyone_may_leave_but_only_members() {
        let (alice, bob, carol, state) = group();
        let left = state
            .apply(bob, &op(&state, Change::Leave), &LIMITS)
            .expect("leave");
        assert!(!left.is_member(&bob));
        assert!(matches!(
            state.apply(carol, &op(&state, Change::Leave), &LIMITS),
            Err(OpError::NotMember { .. })
        ));
        // The last admin leaving hands the group to a remaining member.
        let alone = state
            .apply(alice, &op(&state, Change::Leave), &LIMITS)
            .expect("admin leaves");
        assert_eq!(alone.admins, BTreeSet::from([bob]));
    }

    #[test]
    fn versions_must_chain() {
        let (alice, _, carol, state) = group();
        let mut stale = op(&state, Change::Add { member: carol });
        stale.version = 0;
        assert_eq!(
            state.apply(alice, &stale, &LIMITS),
            Err(OpError::WrongVersion { current: 1, got: 0 })
        );
        stale.version = 5;
        assert!(matches!(
            state.apply(alice, &stale, &LIMITS),
            Err(OpError::WrongVersion { .. })
        ));
        assert_eq!(
            state.apply(alice, &create(state.group, &[]), &LIMITS),
            Err(OpError::AlreadyExists)
        );
        let mut other = op(&state, Change::Leave);
        other.group = GroupId::random();
        assert_eq!(
            state.apply(alice, &other, &LIMITS),
            Err(OpError::WrongGroup)
        );
    }

    #[test]
    fn the_201st_member_is_refused() {
        let alice = key().1;
        let others: Vec<PeerId> = (0..199).map(|_| key().1).collect();
        let state = State::create(alice, &create(GroupId::random(), &others), &LIMITS)
            .expect("200 members fit");
        assert_eq!(state.members.len(), 200);
        let extra = key().1;
        let refused = state.apply(alice, &op(&state, Change::Add { member: extra }), &LIMITS);
        assert_eq!(refused, Err(OpError::TooManyMembers { max: 200 }));
        assert_eq!(
            refused.map_err(|e| e.to_string()),
            Err("the group is full: at most 200 members".to_owned())
        );
        let mut too_many = others.clone();
        too_many.push(extra);
        assert!(matches!(
            State::create(alice, &create(GroupId::random(), &too_many), &LIMITS),
            Err(OpError::TooManyMembers { max: 200 })
        ));
        // The limit is a parameter.
        let small = Limits { max_members: 2 };
        assert!(State::create(alice, &create(GroupId::random(), &others[..2]), &small).is_err());
    }

    #[test]
    fn signed_chains_replay_and_forgeries_do_not() {
        let (ak, alice) = key();
        let (bk, bob) = key();
        let carol = key().1;
        let group = GroupId::random();
        let c = seal_op(&ak, create(group, &[bob]), 1).expect("seal");
        let add = seal_op(
            &ak,
            Op {
                group,
                version: 1,
                change: Change::Add { member: carol },
                mls: crypto(&Change::Add { member: carol }, 1),
            },
            2,
        )
        .expect("seal");
        let state = replay(None, &[c.clone(), add.clone()], &LIMITS)
            .expect("replays")
            .expect("a state");
        assert_eq!(state.version, 2);
        assert!(state.is_member(&carol));
        assert!(state.admins.contains(&alice));

        // Bob (not an admin) signs an add: refused.
        let forged = seal_op(
            &bk,
            Op {
                group,
                version: 2,
                change: Change::Add { member: carol },
                mls: crypto(&Change::Add { member: carol }, 2),
            },
            3,
        )
        .expect("seal");
        assert!(matches!(
            replay(Some(state.clone()), &[forged], &LIMITS),
            Err(ReplayError::Op {
                source: OpError::NotAdmin { .. },
                ..
            })
        ));
        // An admin's op with a tampered target: bad signature.
        let mut tampered = add.clone();
        tampered.from = bob;
        assert!(matches!(
            replay(Some(state.clone()), &[tampered], &LIMITS),
            Err(ReplayError::Envelope { .. })
        ));
        // A chain that does not start with create.
        assert!(replay(None, &[add], &LIMITS).is_err());
    }

    #[test]
    fn overall_state_is_the_minimum() {
        use MessageState::*;
        assert_eq!(overall_state([Read, Delivered, Read]), Delivered);
        assert_eq!(overall_state([Read, Sent]), Sent);
        assert_eq!(overall_state([]), Sent);
    }

    #[test]
    fn topic_names_the_group() {
        let g = GroupId([0xab; 16]);
        assert_eq!(topic(&g), format!("kith/g/{}", "ab".repeat(16)));
    }
}
