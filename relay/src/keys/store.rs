//! The relay's store of published Olm keys: one sled tree (`keys/1`) in the relay's database.
//!
//! | key | value |
//! |---|---|
//! | `i` peer | the owner's [`SignedIdentity`] |
//! | `o` peer, key | one [`SignedKey`] not handed out yet |
//! | `f` peer | the owner's fallback [`SignedKey`] |
//! | `p` peer, BLAKE3 of the package | one MLS key package (TLS bytes) not handed out yet |
//! | `r` peer | the owner's last-resort MLS key package (TLS bytes), handed out again and again |
//!
//! A peer id is stored behind a one-byte length, so keys of different owners never interleave.
//! A one-time key is removed (sled's `remove` returns it to exactly one caller) and flushed
//! before it is handed out, so no key is ever given to two claimers, even across a crash.

use kith_protocol::cbor;
use kith_protocol::prekeys::{
    Bundle, SignedIdentity, SignedKey, MAX_KEY_PACKAGES, MAX_ONE_TIME_KEYS,
};
use kith_protocol::PeerId;

/// Largest record read back.
const MAX_RECORD_BYTES: usize = 4 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("keys store: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode (damaged).
    #[error("keys store: damaged record: {0}")]
    Damaged(String),
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The owner's identity key.
    pub identity: SignedIdentity,
    /// The key handed out.
    pub key: SignedKey,
    /// Whether it is the fallback key.
    pub fallback: bool,
}

/// The keys tree.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

fn owner_key(prefix: u8, peer: &PeerId) -> Vec<u8> {
    let bytes = peer.to_bytes();
    let mut key = Vec::with_capacity(bytes.len() + 2 + 32);
    key.push(prefix);
    key.push(bytes.len() as u8);
    key.extend_from_slice(&bytes);
    key
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    cbor::encode(value, MAX_RECORD_BYTES).map_err(|e| StoreError::Damaged(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    cbor::decode(bytes, MAX_RECORD_BYTES).map_err(|e| StoreError::Damaged(e.to_string()))
}

impl Store {
    /// Opens the keys tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("keys/1")?,
        })
    }

    /// One-time keys held for `owner`.
    pub fn count(&self, owner: &PeerId) -> usize {
        self.tree.scan_prefix(owner_key(b'o', owner)).count()
    }

    /// Stores a bundle already checked against `owner` and flushes; returns the one-time keys
    /// now held. A new identity key drops every key of the old one; one-time keys beyond
    /// [`MAX_ONE_TIME_KEYS`] are not kept.
    pub fn publish(&self, owner: &PeerId, bundle: &Bundle) -> Result<u32, StoreError> {
        let identity_key = owner_key(b'i', owner);
        let known: Option<SignedIdentity> = self
            .tree
            .get(&identity_key)?
            .map(|v| decode(&v))
            .transpose()?;
        if known.as_ref() != Some(&bundle.identity) {
            if known.is_some() {
                tracing::info!(%owner, "a new identity key replaces the old one's keys");
            }
            for entry in self.tree.scan_prefix(owner_key(b'o', owner)) {
                let (key, _) = entry?;
                self.tree.remove(key)?;
            }
            self.tree.insert(&identity_key, encode(&bundle.identity)?)?;
        }
        if let Some(fallback) = &bundle.fallback {
            self.tree
                .insert(owner_key(b'f', owner), encode(fallback)?)?;
        }
        let mut held = self.count(owner);
        for key in &bundle.one_time_keys {
            if held >= MAX_ONE_TIME_KEYS {
                break;
            }
            let mut id = owner_key(b'o', owner);
            id.extend_from_slice(&key.key);
            if self.tree.insert(id, encode(key)?)?.is_none() {
                held += 1;
            }
        }
        self.db.flush()?;
        Ok(held as u32)
    }

    /// Hands out one key of `owner`: a one-time key (removed and flushed before this returns)
    /// while there is one, then the fallback key.
    pub fn claim(&self, owner: &PeerId) -> Result<Option<Claimed>, StoreError> {
        let Some(identity) = self.tree.get(owner_key(b'i', owner))? else {
            return Ok(None);
        };
        let identity: SignedIdentity = decode(&identity)?;
        for entry in self.tree.scan_prefix(owner_key(b'o', owner)) {
            let (id, _) = entry?;
            // Only the caller whose remove takes it hands it out.
            if let Some(value) = self.tree.remove(&id)? {
                self.db.flush()?;
                return Ok(Some(Claimed {
                    identity,
                    key: decode(&value)?,
                    fallback: false,
                }));
            }
        }
        let Some(fallback) = self.tree.get(owner_key(b'f', owner))? else {
            return Ok(None);
        };
        Ok(Some(Claimed {
            identity,
            key: decode(&fallback)?,
            fallback: true,
        }))
    }
}

/// An MLS key package a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedPackage {
    /// The package (TLS bytes).
    pub package: Vec<u8>,
    /// Whether it is the last-resort package (kept, not removed).
    pub last_resort: bool,
}

impl Store {
    /// One-use MLS key packages held for `owner`.
    pub fn package_count(&self, owner: &PeerId) -> usize {
        self.tree.scan_prefix(owner_key(b'p', owner)).count()
    }

    /// Stores MLS key packages already checked against `owner` (one-use ones beyond
    /// [`MAX_KEY_PACKAGES`] are not kept; a last-resort one replaces the one held) and
    /// flushes; returns the one-use packages now held.
    pub fn publish_packages(
        &self,
        owner: &PeerId,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
    ) -> Result<u32, StoreError> {
        if let Some(package) = last_resort {
            self.tree.insert(owner_key(b'r', owner), package)?;
        }
        let mut held = self.package_count(owner);
        for package in packages {
            if held >= MAX_KEY_PACKAGES {
                break;
            }
            let mut id = owner_key(b'p', owner);
            id.extend_from_slice(blake3::hash(package).as_bytes());
            if self.tree.insert(id, package.as_slice())?.is_none() {
                held += 1;
            }
        }
        self.db.flush()?;
        Ok(held as u32)
    }

    /// Hands out one MLS key package of `owner`: a one-use package (removed and flushed before
    /// this returns) while there is one, then the last-resort package.
    pub fn claim_package(&self, owner: &PeerId) -> Result<Option<ClaimedPackage>, StoreError> {
        for entry in self.tree.scan_prefix(owner_key(b'p', owner)) {
            let (id, _) = entry?;
            // Only the caller whose remove takes it hands it out.
            if let Some(value) = self.tree.remove(&id)? {
                self.db.flush()?;
                return Ok(Some(ClaimedPackage {
                    package: value.to_vec(),
                    last_resort: false,
                }));
            }
        }
        Ok(self
            .tree
            .get(owner_key(b'r', owner))?
            .map(|value| ClaimedPackage {
                package: value.to_vec(),
                last_resort: true,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_protocol::Keypair;

    fn bundle(owner: &Keypair, identity: u8, keys: std::ops::Range<u8>) -> Bundle {
        Bundle {
            identity: SignedIdentity::sign(owner, [identity; 32]).expect("sign"),
            one_time_keys: keys
                .map(|k| SignedKey::sign(owner, [k; 32], false).expect("sign"))
                .collect(),
            fallback: Some(SignedKey::sign(owner, [255; 32], true).expect("sign")),
        }
    }

    #[test]
    fn each_one_time_key_goes_once_then_the_fallback_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("db");
        let store = Store::open(&db).expect("store");
        let alice = Keypair::generate_ed25519();
        let owner = alice.public().to_peer_id();
        assert_eq!(store.claim(&owner).expect("claim"), None);
        assert_eq!(
            store
                .publish(&owner, &bundle(&alice, 1, 0..3))
                .expect("publish"),
            3
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let claimed = store.claim(&owner).expect("claim").expect("a key");
            assert!(!claimed.fallback);
            assert!(seen.insert(claimed.key.key), "a key handed out twice");
        }
        for _ in 0..2 {
            let claimed = store.claim(&owner).expect("claim").expect("fallback");
            assert!(claimed.fallback);
            assert_eq!(claimed.key.key, [255; 32]);
        }
        // Publishing the same keys again keeps at most the limit; a new identity drops the old.
        assert_eq!(
            store
                .publish(&owner, &bundle(&alice, 1, 10..12))
                .expect("publish"),
            2
        );
        assert_eq!(
            store
                .publish(&owner, &bundle(&alice, 2, 20..21))
                .expect("publish"),
            1
        );
        let claimed = store.claim(&owner).expect("claim").expect("a key");
        assert_eq!(claimed.key.key, [20; 32]);
        assert_eq!(claimed.identity.key, [2; 32]);
    }

    #[test]
    fn a_claimed_key_stays_claimed_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alice = Keypair::generate_ed25519();
        let owner = alice.public().to_peer_id();
        let first = {
            let db = sled::open(dir.path()).expect("db");
            let store = Store::open(&db).expect("store");
            store
                .publish(&owner, &bundle(&alice, 1, 0..2))
                .expect("publish");
            store.claim(&owner).expect("claim").expect("a key").key.key
        };
        let db = sled::open(dir.path()).expect("db");
        let store = Store::open(&db).expect("store");
        let second = store.claim(&owner).expect("claim").expect("a key");
        assert!(!second.fallback);
        assert_ne!(second.key.key, first);
        assert!(
            store
                .claim(&owner)
                .expect("claim")
                .expect("fallback")
                .fallback
        );
    }

    #[test]
    fn each_key_package_goes_once_then_the_last_resort_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("db");
        let store = Store::open(&db).expect("store");
        let owner = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(store.claim_package(&owner).expect("claim"), None);
        let packages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 40]).collect();
        assert_eq!(
            store
                .publish_packages(&owner, &packages, Some(&[9; 40]))
                .expect("publish"),
            3
        );
        // The same packages again are held once.
        assert_eq!(
            store
                .publish_packages(&owner, &packages, None)
                .expect("publish"),
            3
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let claimed = store
                .claim_package(&owner)
                .expect("claim")
                .expect("a package");
            assert!(!claimed.last_resort);
            assert!(seen.insert(claimed.package), "a package handed out twice");
        }
        for _ in 0..2 {
            let claimed = store
                .claim_package(&owner)
                .expect("claim")
                .expect("last resort");
            assert!(claimed.last_resort);
            assert_eq!(claimed.package, vec![9; 40]);
        }
        // At most MAX_KEY_PACKAGES are held.
        let many: Vec<Vec<u8>> = (0..=MAX_KEY_PACKAGES as u32)
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        assert_eq!(
            store
                .publish_packages(&owner, &many, None)
                .expect("publish"),
            MAX_KEY_PACKAGES as u32
        );
        // Olm keys of the same owner are untouched by package claims, and the reverse.
        assert_eq!(store.count(&owner), 0);
    }
}
