//! Hosted groups on disk: each group's current state and its chain of signed operations.
//!
//! Key layout (sled tree `groups`):
//!
//! | key | value |
//! |---|---|
//! | `s` group-id | the group's current [`State`] (CBOR) |
//! | `o` group-id version | the signed operation envelope that produced `version` (CBOR) |
//! | `h` group-id version | that operation's MLS commit and Welcome ([`Handshake`], CBOR), if any |
//!
//! The relay keeps commits and Welcomes to hand them to members catching up; it cannot read
//! them (a Welcome is encrypted to the added members' key packages, a commit to the members).
//!
//! Versions are big-endian so that a range scan returns the chain in order. A change is one
//! atomic batch; it is durable only after [`Store::flush`].

use std::collections::HashMap;

use kith_protocol::group::{Handshake, State, MAX_HANDSHAKE_PART_BYTES, MAX_PAGE_HANDSHAKE_BYTES};
use kith_protocol::{cbor, Envelope, GroupId};

const STATE: u8 = b's';
const OP: u8 = b'o';
const HANDSHAKE: u8 = b'h';

/// Largest stored value: a state of a full group or one operation envelope.
const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Largest stored handshake (a commit and a Welcome).
const MAX_HANDSHAKE_BYTES: usize = 2 * MAX_HANDSHAKE_PART_BYTES + 1024;

/// A page of a chain: operations, their handshakes, and whether more follow.
pub type Page = (Vec<Envelope>, Vec<Option<Handshake>>, bool);

/// Why a group store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("group store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("group store: damaged value: {0}")]
    Damaged(String),
    /// A value does not encode (a bug, not input).
    #[error("group store: cannot encode: {0}")]
    Encode(String),
}

/// The group store.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

fn state_key(group: &GroupId) -> Vec<u8> {
    let mut key = vec![STATE];
    key.extend_from_slice(group.as_bytes());
    key
}

fn op_key(group: &GroupId, version: u64) -> Vec<u8> {
    keyed(OP, group, version)
}

fn handshake_key(group: &GroupId, version: u64) -> Vec<u8> {
    keyed(HANDSHAKE, group, version)
}

fn keyed(prefix: u8, group: &GroupId, version: u64) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(group.as_bytes());
    key.extend_from_slice(&version.to_be_bytes());
    key
}

impl Store {
    /// Opens the `groups` tree of `db` and loads every group's state.
    pub fn open(db: &sled::Db) -> Result<(Self, HashMap<GroupId, State>), StoreError> {
        let tree = db.open_tree("groups")?;
        let mut states = HashMap::new();
        for entry in tree.scan_prefix([STATE]) {
            let (_, value) = entry?;
            let state: State = cbor::decode(&value, MAX_VALUE_BYTES)
                .map_err(|e| StoreError::Damaged(e.to_string()))?;
            states.insert(state.group, state);
        }
        Ok((
            Self {
                db: db.clone(),
                tree,
            },
            states,
        ))
    }

    /// Records `op` (with its commit and Welcome), which produced `state`, atomically (not yet
    /// durable).
    pub fn append(
        &self,
        state: &State,
        op: &Envelope,
        handshake: Option<&Handshake>,
    ) -> Result<(), StoreError> {
        let state_bytes =
            cbor::encode(state, MAX_VALUE_BYTES).map_err(|e| StoreError::Encode(e.to_string()))?;
        let op_bytes =
            cbor::encode(op, MAX_VALUE_BYTES).map_err(|e| StoreError::Encode(e.to_string()))?;
        let mut batch = sled::Batch::default();
        batch.insert(state_key(&state.group), state_bytes);
        batch.insert(op_key(&state.group, state.version), op_bytes);
        if let Some(handshake) = handshake {
            let bytes = cbor::encode(handshake, MAX_HANDSHAKE_BYTES)
                .map_err(|e| StoreError::Encode(e.to_string()))?;
            batch.insert(handshake_key(&state.group, state.version), bytes);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes every change so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Up to `limit` operations producing versions above `after_version`, oldest first, with
    /// their handshakes, and whether more follow. A page also stops before its handshakes pass
    /// [`MAX_PAGE_HANDSHAKE_BYTES`] (it always holds at least one operation).
    pub fn ops(
        &self,
        group: &GroupId,
        after_version: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let start = op_key(group, after_version.saturating_add(1));
        let end = op_key(group, u64::MAX);
        let damaged = |e: cbor::DecodeError| StoreError::Damaged(e.to_string());
        let (mut ops, mut handshakes, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        for entry in self.tree.range(start..=end) {
            if ops.len() >= limit {
                return Ok((ops, handshakes, true));
            }
            let (key, value) = entry?;
            let mut hs_key = key.to_vec();
            hs_key[0] = HANDSHAKE;
            let handshake = self.tree.get(hs_key)?;
            let size = value.len() + handshake.as_ref().map_or(0, |h| h.len());
            if !ops.is_empty() && bytes + size > MAX_PAGE_HANDSHAKE_BYTES {
                return Ok((ops, handshakes, true));
            }
            bytes += size;
            ops.push(cbor::decode(&value, MAX_VALUE_BYTES).map_err(damaged)?);
            handshakes.push(match handshake {
                Some(h) => Some(cbor::decode(&h, MAX_HANDSHAKE_BYTES).map_err(damaged)?),
                None => None,
            });
        }
        Ok((ops, handshakes, false))
    }
}
