//! openmls's state in the node's sled store, written in the same durable write as the message or
//! commit it belongs to.
//!
//! openmls writes its state (the ratchet tree, epoch secrets, the secret tree that hands out
//! message keys, pending commits, key packages' private keys...) through a
//! [`StorageProvider`] at each call. kith needs that state on disk in the same atomic write as
//! the records it belongs to (the decrypted message, the accepted chain operation), so that a
//! crash between the two can neither make a redelivered message unreadable nor show it twice.
//!
//! [`Overlay`] is that provider: writes and deletes go to a map in memory, reads see that map
//! first and the store after. Nothing reaches the store until the caller moves the overlay's
//! changes into its own [`Batch`] with [`Overlay::stage`] and commits that batch. Dropping an
//! overlay (a refused message, a failed write, a crash) leaves the stored state as it was.
//!
//! Layout: every key is `mls/` + openmls's label + `/` + the JSON of openmls's key + the storage
//! version (big endian u16); values are openmls's JSON (as in openmls's own providers).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use openmls_rust_crypto::RustCrypto;
use openmls_traits::storage::{traits, StorageProvider, CURRENT_VERSION};
use openmls_traits::OpenMlsProvider;
use serde::Serialize;

use crate::core::store::{Batch, Store, StoreError};

/// The prefix of every MLS key in the node's store.
pub const PREFIX: &[u8] = b"mls/";

/// Why the MLS state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store failed.
    #[error("mls storage: {0}")]
    Store(#[from] StoreError),
    /// A value could not be encoded.
    #[error("mls storage: cannot encode a value: {0}")]
    Encode(String),
    /// A stored value does not decode (damaged).
    #[error("mls storage: damaged value under {label}: {detail}")]
    Damaged {
        /// openmls's label of the value.
        label: &'static str,
        /// What went wrong.
        detail: String,
    },
}

const KEY_PACKAGE: &str = "KeyPackage";
const PSK: &str = "Psk";
const ENCRYPTION_KEY_PAIR: &str = "EncryptionKeyPair";
const SIGNATURE_KEY_PAIR: &str = "SignatureKeyPair";
const EPOCH_KEY_PAIRS: &str = "EpochKeyPairs";
const TREE: &str = "Tree";
const GROUP_CONTEXT: &str = "GroupContext";
const INTERIM_TRANSCRIPT_HASH: &str = "InterimTranscriptHash";
const CONFIRMATION_TAG: &str = "ConfirmationTag";
const JOIN_CONFIG: &str = "MlsGroupJoinConfig";
const OWN_LEAF_NODES: &str = "OwnLeafNodes";
const GROUP_STATE: &str = "GroupState";
const QUEUED_PROPOSAL: &str = "QueuedProposal";
const PROPOSAL_QUEUE_REFS: &str = "ProposalQueueRefs";
const OWN_LEAF_NODE_INDEX: &str = "OwnLeafNodeIndex";
const EPOCH_SECRETS: &str = "EpochSecrets";
const RESUMPTION_PSK_STORE: &str = "ResumptionPsk";
const MESSAGE_SECRETS: &str = "MessageSecrets";

/// openmls's values and keys in CBOR, like the rest of the store (deterministic for a given
/// value, so an encoded key or list item compares by its bytes).
fn cbor<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| StorageError::Encode(e.to_string()))?;
    Ok(out)
}

fn from_cbor<V: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<V, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

/// Labels whose values are written in postcard instead: a group's message secrets, rewritten on
/// every message sent or opened. openmls serialises its byte strings as sequences of numbers,
/// and CBOR spends an item header on each; with the past epochs' member leaves inside, that
/// encoding was about nine tenths of the cost of each message. (postcard cannot read every
/// openmls type — some need self-describing input — so the others stay CBOR.)
const POSTCARD_LABELS: [&str; 1] = [MESSAGE_SECRETS];

fn encode_value<T: Serialize + ?Sized>(label: &str, value: &T) -> Result<Vec<u8>, StorageError> {
    if POSTCARD_LABELS.contains(&label) {
        postcard::to_allocvec(value).map_err(|e| StorageError::Encode(e.to_string()))
    } else {
        cbor(value)
    }
}

fn decode_value<V: serde::de::DeserializeOwned>(label: &str, bytes: &[u8]) -> Result<V, String> {
    if POSTCARD_LABELS.contains(&label) {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    } else {
        from_cbor(bytes)
    }
}

/// The store key of openmls's `key` under `label`.
fn store_key(label: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX.len() + label.len() + 1 + key.len() + 2);
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(label.as_bytes());
    out.push(b'/');
    out.extend_from_slice(key);
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    out
}

/// openmls's storage over the node's store: changes stay in memory until [`Overlay::stage`].
pub struct Overlay {
    store: Store,
    /// Keys set (`Some`) or removed (`None`) since the overlay was made or last staged.
    pending: Mutex<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Overlay {
    /// An overlay with no changes over `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether there are changes not staged yet.
    pub fn is_dirty(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Moves every change made so far into `batch` (in key order; the batch is applied
    /// atomically by [`Store::commit`]). The overlay keeps reading them from the store once the
    /// batch is written; a batch that is never written loses them.
    pub fn stage(&self, batch: &mut Batch) {
        for (key, value) in std::mem::take(&mut *self.lock()) {
            match value {
                Some(value) => batch.put_raw(key, value),
                None => batch.remove_raw(key),
            }
        }
    }

    /// Forgets every change not staged yet.
    pub fn discard(&self) {
        self.lock().clear();
    }

    fn raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(value) = self.lock().get(key) {
            return Ok(value.clone());
        }
        Ok(self.store.get_raw(key)?)
    }

    fn write(&self, label: &str, key: &[u8], value: Vec<u8>) {
        self.lock().insert(store_key(label, key), Some(value));
    }

    fn delete(&self, label: &str, key: &[u8]) {
        self.lock().insert(store_key(label, key), None);
    }

    fn read<V: serde::de::DeserializeOwned>(
        &self,
        label: &'static str,
        key: &[u8],
    ) -> Result<Option<V>, StorageError> {
        match self.raw(&store_key(label, key))? {
            Some(bytes) => decode_value(label, &bytes)
                .map(Some)
                .map_err(|detail| StorageError::Damaged { label, detail }),
            None => Ok(None),
        }
    }

    /// A list value: the JSON of a list of JSON values.
    fn read_raw_list(&self, label: &'static str, key: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        Ok(self.read::<Vec<Vec<u8>>>(label, key)?.unwrap_or_default())
    }

    fn read_list<V: serde::de::DeserializeOwned>(
        &self,
        label: &'static str,
        key: &[u8],
    ) -> Result<Vec<V>, StorageError> {
        self.read_raw_list(label, key)?
            .iter()
            .map(|item| from_cbor(item).map_err(|detail| StorageError::Damaged { label, detail }))
            .collect()
    }

    fn append(&self, label: &'static str, key: &[u8], item: Vec<u8>) -> Result<(), StorageError> {
        let mut list = self.read_raw_list(label, key)?;
        list.push(item);
        self.write(label, key, cbor(&list)?);
        Ok(())
    }

    fn remove_item(
        &self,
        label: &'static str,
        key: &[u8],
        item: &[u8],
    ) -> Result<(), StorageError> {
        let mut list = self.read_raw_list(label, key)?;
        if let Some(at) = list.iter().position(|stored| stored == item) {
            list.remove(at);
        }
        self.write(label, key, cbor(&list)?);
        Ok(())
    }

    fn put<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &self,
        label: &str,
        key: &K,
        value: &V,
    ) -> Result<(), StorageError> {
        self.write(label, &cbor(key)?, encode_value(label, value)?);
        Ok(())
    }

    fn get<K: Serialize + ?Sized, V: serde::de::DeserializeOwned>(
        &self,
        label: &'static str,
        key: &K,
    ) -> Result<Option<V>, StorageError> {
        self.read(label, &cbor(key)?)
    }

    fn remove<K: Serialize + ?Sized>(&self, label: &str, key: &K) -> Result<(), StorageError> {
        self.delete(label, &cbor(key)?);
        Ok(())
    }
}

fn epoch_key_pairs_id(
    group_id: &impl Serialize,
    epoch: &impl Serialize,
    leaf_index: u32,
) -> Result<Vec<u8>, StorageError> {
    let mut key = cbor(group_id)?;
    key.extend_from_slice(&cbor(epoch)?);
    key.extend_from_slice(&cbor(&leaf_index)?);
    Ok(key)
}

/// What openmls calls with: RustCrypto (audited RustCrypto primitives) and the [`Overlay`].
pub struct Provider {
    crypto: RustCrypto,
    storage: Overlay,
}

impl Provider {
    /// A provider over `store`, with no changes yet.
    pub fn new(store: Store) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: Overlay::new(store),
        }
    }

    /// The overlay.
    pub fn overlay(&self) -> &Overlay {
        &self.storage
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Overlay;

    fn storage(&self) -> &Overlay {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

impl StorageProvider<CURRENT_VERSION> for Overlay {
    type Error = StorageError;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), StorageError> {
        self.put(JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), StorageError> {
        self.append(OWN_LEAF_NODES, &cbor(group_id)?, cbor(leaf_node)?)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), StorageError> {
        self.put(QUEUED_PROPOSAL, &(group_id, proposal_ref), proposal)?;
        self.append(PROPOSAL_QUEUE_REFS, &cbor(group_id)?, cbor(proposal_ref)?)
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), StorageError> {
        self.put(TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), StorageError> {
        self.put(INTERIM_TRANSCRIPT_HASH, group_id, interim_transcript_hash)
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), StorageError> {
        self.put(GROUP_CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), StorageError> {
        self.put(CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), StorageError> {
        self.put(GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), StorageError> {
        self.put(MESSAGE_SECRETS, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), StorageError> {
        self.put(RESUMPTION_PSK_STORE, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), StorageError> {
        self.put(OWN_LEAF_NODE_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), StorageError> {
        self.put(EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), StorageError> {
        self.put(SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), StorageError> {
        self.put(ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), StorageError> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        self.write(EPOCH_KEY_PAIRS, &key, cbor(key_pairs)?);
        Ok(())
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), StorageError> {
        self.put(KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), StorageError> {
        self.put(PSK, psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, StorageError> {
        self.get(JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, StorageError> {
        self.read_list(OWN_LEAF_NODES, &cbor(group_id)?)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, StorageError> {
        self.read_list(PROPOSAL_QUEUE_REFS, &cbor(group_id)?)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, StorageError> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS, &cbor(group_id)?)?;
        let mut out = Vec::with_capacity(refs.len());
        for proposal_ref in refs {
            let proposal = self
                .get(QUEUED_PROPOSAL, &(group_id, &proposal_ref))?
                .ok_or(StorageError::Damaged {
                    label: QUEUED_PROPOSAL,
                    detail: "a queued proposal's reference without the proposal".into(),
                })?;
            out.push((proposal_ref, proposal));
        }
        Ok(out)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, StorageError> {
        self.get(TREE, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, StorageError> {
        self.get(GROUP_CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, StorageError> {
        self.get(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, StorageError> {
        self.get(CONFIRMATION_TAG, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, StorageError> {
        self.get(GROUP_STATE, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, StorageError> {
        self.get(MESSAGE_SECRETS, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, StorageError> {
        self.get(RESUMPTION_PSK_STORE, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, StorageError> {
        self.get(OWN_LEAF_NODE_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, StorageError> {
        self.get(EPOCH_SECRETS, group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, StorageError> {
        self.get(SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, StorageError> {
        self.get(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, StorageError> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        Ok(self.read(EPOCH_KEY_PAIRS, &key)?.unwrap_or_default())
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, StorageError> {
        self.get(KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, StorageError> {
        self.get(PSK, psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), StorageError> {
        self.remove_item(PROPOSAL_QUEUE_REFS, &cbor(group_id)?, &cbor(proposal_ref)?)?;
        self.remove(QUEUED_PROPOSAL, &(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(GROUP_CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(MESSAGE_SECRETS, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(RESUMPTION_PSK_STORE, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(OWN_LEAF_NODE_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.remove(EPOCH_SECRETS, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS, &cbor(group_id)?)?;
        for proposal_ref in refs {
            self.remove(QUEUED_PROPOSAL, &(group_id, proposal_ref))?;
        }
        self.remove(PROPOSAL_QUEUE_REFS, group_id)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), StorageError> {
        self.remove(SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), StorageError> {
        self.remove(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), StorageError> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        self.delete(EPOCH_KEY_PAIRS, &key);
        Ok(())
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), StorageError> {
        self.remove(KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), StorageError> {
        self.remove(PSK, psk_id)
    }
}
