//! Group end-to-end encryption with MLS (RFC 9420, `openmls`): the crypto of one member of kith
//! groups, with its state in the node's store.
//!
//! - [`Member`] is this node as an MLS client: its credential (its peer id, signed with its
//!   libp2p ed25519 identity key, [`Signer`]), its key packages (published through
//!   `/kith/keys/1`), and the groups it creates, joins from a Welcome, or loads.
//! - [`Group`] is one group's MLS state: commits that add, remove or refresh members, the
//!   processing of other members' commits, and application messages sealed as MLS
//!   `PrivateMessage`s.
//!
//! Every change openmls makes stays in the group's [`storage::Overlay`] until the caller moves
//! it into its own [`Batch`] ([`Group::stage`]) and commits that batch with the records it
//! belongs to (the message, the chain operation). Callers stage and commit after each call
//! that changes state, before the next call on the same group. A refused input leaves the group
//! as it was stored.
//!
//! `publish` keeps this node's key packages at its home relays (`/kith/keys/1`).
//!
//! Who may change membership (admins) and the order of commits (the relay's chain) are the
//! group operation chain's business; this module checks what MLS can: epochs, membership,
//! signatures, and that every credential is bound to the peer it names
//! ([`kith_net::key_package::check_binding`]).

mod publish;
pub mod storage;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use kith_net::key_package::{self as package, BindingError, PackageError, CIPHERSUITE};
use kith_protocol::{GroupId, PeerId};
use libp2p::identity::Keypair;
use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;

use crate::core::store::{Batch, Store};
pub use kith_net::key_package::{check_binding, Signer};
use storage::{Provider, StorageError};

/// Settings of the group crypto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Past epochs whose message secrets are kept, so that late messages still open; older
    /// ones are deleted (forward secrecy).
    pub max_past_epochs: usize,
    /// Messages of one sender that may arrive out of order within an epoch.
    pub out_of_order_tolerance: u32,
    /// How far ahead of the last one a sender's message may be within an epoch.
    pub maximum_forward_distance: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_past_epochs: 5,
            out_of_order_tolerance: 64,
            maximum_forward_distance: 1000,
        }
    }
}

impl Config {
    fn join_config(&self) -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .max_past_epochs(self.max_past_epochs)
            .use_ratchet_tree_extension(true)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                self.out_of_order_tolerance,
                self.maximum_forward_distance,
            ))
            .build()
    }

    fn create_config(&self) -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .capabilities(package::capabilities())
            .max_past_epochs(self.max_past_epochs)
            .use_ratchet_tree_extension(true)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                self.out_of_order_tolerance,
                self.maximum_forward_distance,
            ))
            .build()
    }
}

/// Why a group crypto operation failed. Every refusal of another peer's input is one of these.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    /// The node's identity is not an ed25519 key.
    #[error("the node's identity is not an ed25519 key")]
    NotEd25519,
    /// The MLS state could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The bytes are no MLS message of the expected kind.
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    /// The message is for another group.
    #[error("an MLS message for another group")]
    WrongGroup,
    /// A commit for an epoch the group has left behind: another commit won that epoch.
    #[error("stale commit for epoch {message}, the group is at epoch {current}")]
    StaleEpoch {
        /// The commit's epoch.
        message: u64,
        /// The group's epoch.
        current: u64,
    },
    /// A message for an epoch the group has not reached: commits are missing.
    #[error(
        "message for epoch {message}, the group is only at epoch {current}; commits are missing"
    )]
    FutureEpoch {
        /// The message's epoch.
        message: u64,
        /// The group's epoch.
        current: u64,
    },
    /// A message of a past epoch whose secrets are deleted (outside the window).
    #[error("message of a past epoch whose keys are gone")]
    EpochGone,
    /// The message's key is gone: it was used already (a copy of a message opened before) or
    /// it is too far behind its sender's chain.
    #[error("the message's key is gone (a copy of an opened message, or far too late)")]
    KeyGone,
    /// The sender is not a member of the group.
    #[error("the sender is not a member of the group")]
    NotMember,
    /// The message does not decrypt under the group's keys (not a member's, or damaged).
    #[error("cannot decrypt: {0}")]
    Undecryptable(String),
    /// A message whose sender's credential is not the peer that sent it, or a leaf whose
    /// credential is not bound to the peer it names.
    #[error("bad credential: {0}")]
    Credential(#[from] BindingError),
    /// A key package that does not check out.
    #[error("refused key package of {peer}: {source}")]
    Package {
        /// Whose package it claimed to be.
        peer: PeerId,
        /// Why.
        source: Box<PackageError>,
    },
    /// A commit that changes membership from a member not allowed to.
    #[error("{0} may not change the group's membership")]
    NotAllowed(PeerId),
    /// A handshake message where an application message was expected, or the reverse.
    #[error("unexpected MLS content: {0}")]
    Unexpected(&'static str),
    /// A Welcome for a group other than the one expected.
    #[error("a Welcome into another group than expected")]
    WelcomeWrongGroup,
    /// A Welcome whose adder is not the expected admin.
    #[error("a Welcome from another member than the expected admin: {0}")]
    WelcomeWrongAdder(BindingError),
    /// A Welcome that cannot be opened with this node's key packages.
    #[error("cannot join from this Welcome: {0}")]
    Welcome(String),
    /// The peer to remove is not a member.
    #[error("{0} is not a member of the group")]
    NoSuchMember(PeerId),
    /// This node was removed from the group (or left it): it can no longer send or commit.
    #[error("this node is no longer a member of the group")]
    Inactive,
    /// Another MLS failure.
    #[error("mls: {0}")]
    Mls(String),
}

fn mls<E: std::fmt::Display>(e: E) -> MlsError {
    MlsError::Mls(e.to_string())
}

/// kith's group id as an MLS group id.
fn mls_group_id(id: &GroupId) -> openmls::group::GroupId {
    openmls::group::GroupId::from_slice(id.as_bytes())
}

fn encode(message: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    message.tls_serialize_detached().map_err(mls)
}

fn decode(bytes: &[u8]) -> Result<MlsMessageIn, MlsError> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed(e.to_string()))
}

/// This node as an MLS client.
#[derive(Clone)]
pub struct Member {
    store: Store,
    signer: Arc<Signer>,
    config: Config,
}

impl Member {
    /// This node (identity `key`, an ed25519 key) with its MLS state in `store`.
    pub fn new(store: Store, key: &Keypair, config: Config) -> Result<Self, MlsError> {
        Ok(Self {
            store,
            signer: Arc::new(Signer::new(key).map_err(|_| MlsError::NotEd25519)?),
            config,
        })
    }

    /// This node's peer id.
    pub fn peer(&self) -> PeerId {
        self.signer.peer()
    }

    /// `count` new key packages (TLS encoded), or one last-resort package with `last_resort`;
    /// their private keys are staged into `batch`, which must be on disk before they are
    /// published.
    pub fn key_packages(
        &self,
        count: usize,
        last_resort: bool,
        batch: &mut Batch,
    ) -> Result<Vec<Vec<u8>>, MlsError> {
        let provider = Provider::new(self.store.clone());
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let bundle = package::builder(last_resort)
                .build(
                    CIPHERSUITE,
                    &provider,
                    self.signer.as_ref(),
                    self.signer.credential(),
                )
                .map_err(mls)?;
            out.push(bundle.key_package().tls_serialize_detached().map_err(mls)?);
        }
        provider.overlay().stage(batch);
        Ok(out)
    }

    /// Creates group `id` with this node as its only member (epoch 0). Stage it to keep it.
    pub fn create(&self, id: &GroupId) -> Result<Group, MlsError> {
        let provider = Provider::new(self.store.clone());
        let group = MlsGroup::new_with_group_id(
            &provider,
            self.signer.as_ref(),
            &self.config.create_config(),
            mls_group_id(id),
            self.signer.credential(),
        )
        .map_err(mls)?;
        Ok(self.group(*id, group, provider))
    }

    /// Loads group `id` as stored, if this node has it.
    pub fn load(&self, id: &GroupId) -> Result<Option<Group>, MlsError> {
        let provider = Provider::new(self.store.clone());
        let Some(group) = MlsGroup::load(provider.storage(), &mls_group_id(id)).map_err(mls)?
        else {
            return Ok(None);
        };
        Ok(Some(self.group(*id, group, provider)))
    }

    /// Joins from a Welcome (TLS encoded), refusing it unless it is into group `id` and its
    /// adder is `admin` (the admin whose signed add operation carried it). Stage it to keep it.
    pub fn join(&self, welcome: &[u8], id: &GroupId, admin: &PeerId) -> Result<Group, MlsError> {
        let welcome = match decode(welcome)?.extract() {
            MlsMessageBodyIn::Welcome(welcome) => welcome,
            _ => return Err(MlsError::Unexpected("not a Welcome")),
        };
        let provider = Provider::new(self.store.clone());
        let staged =
            StagedWelcome::new_from_welcome(&provider, &self.config.join_config(), welcome, None)
                .map_err(|e| MlsError::Welcome(e.to_string()))?;
        if staged.group_context().group_id() != &mls_group_id(id) {
            return Err(MlsError::WelcomeWrongGroup);
        }
        let adder = staged.welcome_sender().map_err(mls)?;
        package::check_binding(adder.credential(), adder.signature_key().as_slice(), admin)
            .map_err(MlsError::WelcomeWrongAdder)?;
        // Every leaf of the tree must be bound to the peer it names.
        for member in staged.members() {
            check_member(&member)?;
        }
        let group = staged.into_group(&provider).map_err(mls)?;
        Ok(self.group(*id, group, provider))
    }

    fn group(&self, id: GroupId, mls: MlsGroup, provider: Provider) -> Group {
        Group {
            id,
            mls,
            provider,
            store: self.store.clone(),
            signer: self.signer.clone(),
        }
    }
}

/// Checks that a leaf's credential is bound to the peer it names.
fn check_member(member: &openmls::group::Member) -> Result<PeerId, MlsError> {
    let peer = package::named_peer(&member.credential)
        .ok_or(MlsError::Credential(BindingError::NoPeerId))?;
    package::check_binding(&member.credential, &member.signature_key, &peer)?;
    Ok(peer)
}

/// A commit made by this node, pending until the group's relay orders it: merge it with
/// [`Group::merge_pending`] once the chain applied it, or drop it with
/// [`Group::discard_pending`] when another commit won the epoch.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The commit (a TLS-encoded MLS message) for the members.
    pub commit: Vec<u8>,
    /// The Welcome for added members, if any.
    pub welcome: Option<Vec<u8>>,
    /// The epoch the commit was made in (the group moves to the next one).
    pub epoch: u64,
}

/// What another member's commit changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The epoch the group is now in.
    pub epoch: u64,
    /// Members it added.
    pub added: Vec<PeerId>,
    /// Members it removed.
    pub removed: Vec<PeerId>,
    /// Whether it removed this node.
    pub removed_self: bool,
}

/// One group's MLS state, with changes not yet staged.
pub struct Group {
    id: GroupId,
    mls: MlsGroup,
    provider: Provider,
    store: Store,
    signer: Arc<Signer>,
}

impl Group {
    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.mls.epoch().as_u64()
    }

    /// Whether this node is still a member.
    pub fn is_active(&self) -> bool {
        self.mls.is_active()
    }

    /// The members' peer ids, in leaf order.
    pub fn members(&self) -> Vec<PeerId> {
        self.mls
            .members()
            .filter_map(|m| package::named_peer(&m.credential))
            .collect()
    }

    /// Whether a commit of this node is waiting for the relay's order.
    pub fn has_pending(&self) -> bool {
        self.mls.pending_commit().is_some()
    }

    /// Moves every change since the last call into `batch`, to be written with the records it
    /// belongs to. Commit the batch before the next call on this group.
    pub fn stage(&self, batch: &mut Batch) {
        self.provider.overlay().stage(batch);
    }

    /// Drops changes not staged and reloads the group as stored (after a refused input).
    fn restore(&mut self) -> Result<(), MlsError> {
        self.provider.overlay().discard();
        let loaded =
            MlsGroup::load(self.provider.storage(), &mls_group_id(&self.id)).map_err(mls)?;
        if let Some(stored) = loaded {
            self.mls = stored;
        }
        Ok(())
    }

    /// Runs `f`; on an error, returns the group to its stored state.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, MlsError>,
    ) -> Result<T, MlsError> {
        match f(self) {
            Ok(value) => Ok(value),
            Err(e) => {
                if let Err(reload) = self.restore() {
                    tracing::error!(group = %self.id, error = %reload, "cannot reload MLS state");
                }
                Err(e)
            }
        }
    }

    fn operational(&self) -> Result<(), MlsError> {
        if self.mls.is_active() {
            Ok(())
        } else {
            Err(MlsError::Inactive)
        }
    }

    /// A commit adding the owners of `packages` (claimed key packages, each checked against
    /// its peer) and the Welcome for them.
    pub fn add(&mut self, packages: &[(PeerId, Vec<u8>)]) -> Result<Commit, MlsError> {
        self.operational()?;
        let mut checked = Vec::with_capacity(packages.len());
        for (peer, bytes) in packages {
            checked.push(package::verify(bytes, peer, None).map_err(|source| {
                MlsError::Package {
                    peer: *peer,
                    source: Box::new(source),
                }
            })?);
        }
        let epoch = self.epoch();
        self.guarded(|g| {
            let (commit, welcome, _) = g
                .mls
                .add_members(&g.provider, g.signer.as_ref(), &checked)
                .map_err(mls)?;
            Ok(Commit {
                commit: encode(&commit)?,
                welcome: Some(encode(&welcome)?),
                epoch,
            })
        })
    }

    /// A commit removing `peers`.
    pub fn remove(&mut self, peers: &[PeerId]) -> Result<Commit, MlsError> {
        self.operational()?;
        let mut leaves = Vec::with_capacity(peers.len());
        for peer in peers {
            let leaf = self
                .mls
                .members()
                .find(|m| package::named_peer(&m.credential).as_ref() == Some(peer))
                .ok_or(MlsError::NoSuchMember(*peer))?;
            leaves.push(leaf.index);
        }
        let epoch = self.epoch();
        self.guarded(|g| {
            let (commit, welcome, _) = g
                .mls
                .remove_members(&g.provider, g.signer.as_ref(), &leaves)
                .map_err(mls)?;
            Ok(Commit {
                commit: encode(&commit)?,
                welcome: welcome.as_ref().map(encode).transpose()?,
                epoch,
            })
        })
    }

    /// A commit that refreshes this node's leaf (post-compromise security): once merged, state
    /// copied before it no longer reads the group.
    pub fn self_update(&mut self) -> Result<Commit, MlsError> {
        self.operational()?;
        let epoch = self.epoch();
        self.guarded(|g| {
            let bundle = g
                .mls
                .self_update(
                    &g.provider,
                    g.signer.as_ref(),
                    LeafNodeParameters::default(),
                )
                .map_err(mls)?;
            Ok(Commit {
                commit: encode(bundle.commit())?,
                welcome: None,
                epoch,
            })
        })
    }

    /// The relay applied this node's pending commit: the group moves to the next epoch.
    pub fn merge_pending(&mut self) -> Result<(), MlsError> {
        self.guarded(|g| g.mls.merge_pending_commit(&g.provider).map_err(mls))
    }

    /// Another commit won the epoch: forget this node's pending one (to catch up, then retry).
    pub fn discard_pending(&mut self) -> Result<(), MlsError> {
        self.guarded(|g| {
            g.mls
                .clear_pending_commit(g.provider.storage())
                .map_err(mls)
        })
    }

    /// Parses `bytes` as a protocol message of this group, refusing other groups and epochs
    /// the group is not in.
    fn protocol_message(&self, bytes: &[u8]) -> Result<ProtocolMessage, MlsError> {
        let message = decode(bytes)?
            .try_into_protocol_message()
            .map_err(|e| MlsError::Malformed(e.to_string()))?;
        if message.group_id() != self.mls.group_id() {
            return Err(MlsError::WrongGroup);
        }
        Ok(message)
    }

    fn process(&mut self, message: ProtocolMessage) -> Result<ProcessedMessage, MlsError> {
        self.mls
            .process_message(&self.provider, message)
            .map_err(|e| match e {
                ProcessMessageError::ValidationError(ValidationError::UnknownMember) => {
                    MlsError::NotMember
                }
                ProcessMessageError::ValidationError(ValidationError::NoPastEpochData) => {
                    MlsError::EpochGone
                }
                // No secrets for the message's epoch, or its generation is far behind.
                ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
                    MessageDecryptionError::SecretTreeError(SecretTreeError::TooDistantInThePast),
                )) => MlsError::EpochGone,
                ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
                    MessageDecryptionError::SecretTreeError(SecretTreeError::SecretReuseError),
                )) => MlsError::KeyGone,
                ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(e)) => {
                    MlsError::Undecryptable(e.to_string())
                }
                ProcessMessageError::ValidationError(ValidationError::WrongEpoch) => {
                    MlsError::EpochGone
                }
                ProcessMessageError::GroupStateError(_) => MlsError::Inactive,
                other => MlsError::Undecryptable(other.to_string()),
            })
    }

    /// Processes a commit of `sender` (the peer that signed the envelope carrying it), ordered
    /// by the relay's chain; `may_change_membership` says whether the sender is an admin. The
    /// commit must be for the current epoch; it is merged at once.
    pub fn process_commit(
        &mut self,
        bytes: &[u8],
        sender: &PeerId,
        may_change_membership: bool,
    ) -> Result<Applied, MlsError> {
        self.process_commit_checked(bytes, sender, &|applied: &Applied| {
            if (!applied.added.is_empty() || !applied.removed.is_empty()) && !may_change_membership
            {
                Err(MlsError::NotAllowed(*sender))
            } else {
                Ok(())
            }
        })
    }

    /// Processes a commit of `sender` like [`Group::process_commit`], with `allow` deciding
    /// whether what it changes (its `added` and `removed`) is acceptable before it is merged.
    pub fn process_commit_checked(
        &mut self,
        bytes: &[u8],
        sender: &PeerId,
        allow: &dyn Fn(&Applied) -> Result<(), MlsError>,
    ) -> Result<Applied, MlsError> {
        let message = self.protocol_message(bytes)?;
        if !message.is_handshake_message() {
            return Err(MlsError::Unexpected("an application message, not a commit"));
        }
        let (current, at) = (self.epoch(), message.epoch().as_u64());
        if at < current {
            return Err(MlsError::StaleEpoch {
                message: at,
                current,
            });
        }
        if at > current {
            return Err(MlsError::FutureEpoch {
                message: at,
                current,
            });
        }
        self.operational()?;
        let sender = *sender;
        self.guarded(|g| {
            let processed = g.process(message)?;
            let Sender::Member(leaf) = *processed.sender() else {
                return Err(MlsError::NotMember);
            };
            let author = g.mls.member_at(leaf).ok_or(MlsError::NotMember)?;
            package::check_binding(&author.credential, &author.signature_key, &sender)?;
            let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content()
            else {
                return Err(MlsError::Unexpected("a proposal, not a commit"));
            };
            let mut added = Vec::new();
            for add in staged.add_proposals() {
                let leaf = add.add_proposal().key_package().leaf_node();
                let peer = package::named_peer(leaf.credential())
                    .ok_or(MlsError::Credential(BindingError::NoPeerId))?;
                package::check_binding(leaf.credential(), leaf.signature_key().as_slice(), &peer)?;
                added.push(peer);
            }
            let mut removed = Vec::new();
            for remove in staged.remove_proposals() {
                let leaf = remove.remove_proposal().removed();
                if let Some(member) = g.mls.member_at(leaf) {
                    removed.extend(package::named_peer(&member.credential));
                }
            }
            let removed_self = staged.self_removed();
            allow(&Applied {
                epoch: current + 1,
                added: added.clone(),
                removed: removed.clone(),
                removed_self,
            })?;
            // A refreshed leaf must stay bound to its owner.
            if let Some(leaf) = staged.update_path_leaf_node() {
                package::check_binding(
                    leaf.credential(),
                    leaf.signature_key().as_slice(),
                    &sender,
                )?;
            }
            for update in staged.update_proposals() {
                let leaf = update.update_proposal().leaf_node();
                package::check_binding(
                    leaf.credential(),
                    leaf.signature_key().as_slice(),
                    &sender,
                )?;
            }
            g.mls
                .merge_staged_commit(&g.provider, *staged)
                .map_err(mls)?;
            Ok(Applied {
                epoch: g.epoch(),
                added,
                removed,
                removed_self,
            })
        })
    }

    /// Seals application bytes as an MLS `PrivateMessage` (TLS encoded) of the current epoch.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.operational()?;
        self.guarded(|g| {
            let message = g
                .mls
                .create_message(&g.provider, g.signer.as_ref(), plaintext)
                .map_err(mls)?;
            encode(&message)
        })
    }

    /// Opens an application message of `sender` (the peer that signed its envelope): of the
    /// current epoch, or of one of the past epochs still in the window.
    pub fn decrypt(&mut self, bytes: &[u8], sender: &PeerId) -> Result<Vec<u8>, MlsError> {
        let message = self.protocol_message(bytes)?;
        if message.is_handshake_message() {
            return Err(MlsError::Unexpected("a commit, not an application message"));
        }
        let (current, at) = (self.epoch(), message.epoch().as_u64());
        if at > current {
            return Err(MlsError::FutureEpoch {
                message: at,
                current,
            });
        }
        let sender = *sender;
        self.guarded(|g| {
            let processed = g.process(message).map_err(|e| match e {
                // In the current epoch, a generation far behind its sender's chain.
                MlsError::EpochGone if at == current => MlsError::KeyGone,
                other => other,
            })?;
            if !matches!(processed.sender(), Sender::Member(_)) {
                return Err(MlsError::NotMember);
            }
            // The leaf signed the message; it was bound to its peer when it joined or last
            // refreshed, so the credential names the peer whose key signed.
            if package::named_peer(processed.credential()) != Some(sender) {
                return Err(MlsError::Credential(BindingError::WrongIdentity {
                    expected: sender,
                    found: package::named_peer(processed.credential())
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "no peer id".into()),
                }));
            }
            match processed.into_content() {
                ProcessedMessageContent::ApplicationMessage(message) => Ok(message.into_bytes()),
                _ => Err(MlsError::Unexpected("not an application message")),
            }
        })
    }

    /// The store this group's state lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }
}
