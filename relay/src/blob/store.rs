//! The relay's chunk store: sealed blobs as files under `<data>/blobs/`, named by their BLAKE3
//! hash, with a sled tree (`blobs` in the relay's database) recording who uploaded each one and
//! when it expires.
//!
//! A blob is written to a temporary file, synced, then renamed into place, so a reader never
//! sees half a blob and a `Stored` answer means the bytes are on disk. Quota is counted per
//! uploader in memory, rebuilt from the index at start. All methods block: call them from
//! `spawn_blocking`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kith_protocol::blob::{Hash, MAX_BLOB_BYTES};
use kith_protocol::{cbor, PeerId};
use serde::{Deserialize, Serialize};

/// Name of the blob directory inside the data directory.
pub const DIR: &str = "blobs";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system failed.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
    /// The index failed.
    #[error("blob index: {0}")]
    Sled(#[from] sled::Error),
}

/// Why a `Put` was refused.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The uploader would exceed its quota.
    #[error("quota of {quota} bytes exceeded")]
    Quota {
        /// The quota.
        quota: u64,
    },
    /// The disk or index failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The store's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes one uploader may have stored.
    pub quota_bytes_per_peer: u64,
    /// How long a blob is kept, in milliseconds.
    pub ttl_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(with = "serde_bytes")]
    owner: Vec<u8>,
    size: u64,
    expires_at_ms: u64,
}

/// The chunk store.
pub struct Store {
    dir: PathBuf,
    index: sled::Tree,
    limits: Limits,
    usage: Mutex<HashMap<PeerId, u64>>,
}

impl Store {
    /// Opens the store in `<data_dir>/blobs` with its index in `db`.
    pub fn open(data_dir: &Path, db: &sled::Db, limits: Limits) -> Result<Self, StoreError> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let index = db.open_tree("blobs")?;
        let mut usage: HashMap<PeerId, u64> = HashMap::new();
        for entry in index.iter() {
            let (_, value) = entry?;
            if let Ok(meta) = cbor::decode::<Meta>(&value, 1024) {
                if let Ok(owner) = PeerId::from_bytes(&meta.owner) {
                    *usage.entry(owner).or_default() += meta.size;
                }
            }
        }
        Ok(Self {
            dir,
            index,
            limits,
            usage: Mutex::new(usage),
        })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, u64>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes `owner` has stored now.
    pub fn used_by(&self, owner: &PeerId) -> u64 {
        self.usage().get(owner).copied().unwrap_or(0)
    }

    /// Whether `owner` may start uploading a file of `size` bytes.
    pub fn has_room(&self, owner: &PeerId, size: u64) -> bool {
        self.used_by(owner).saturating_add(size) <= self.limits.quota_bytes_per_peer
    }

    /// Stores a blob (already checked against `hash`) for `owner`. Storing a blob that is
    /// already here only renews its expiry.
    pub fn put(
        &self,
        owner: PeerId,
        hash: &Hash,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), PutError> {
        let expires_at_ms = now_ms.saturating_add(self.limits.ttl_ms);
        let key = hash.0;
        let path = self.path(hash);
        if self.index.get(key).map_err(StoreError::from)?.is_some() && path.exists() {
            self.index_insert(&key, owner, bytes.len() as u64, expires_at_ms, false)?;
            return Ok(());
        }
        {
            let mut usage = self.usage();
            let used = usage.entry(owner).or_default();
            if used.saturating_add(bytes.len() as u64) > self.limits.quota_bytes_per_peer {
                return Err(PutError::Quota {
                    quota: self.limits.quota_bytes_per_peer,
                });
            }
            *used += bytes.len() as u64;
        }
        let result = (|| -> Result<(), StoreError> {
            let tmp = self
                .dir
                .join(format!("{}.tmp{}", hash.to_hex(), rand_suffix()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself must survive a crash before `Stored` goes out.
            std::fs::File::open(&self.dir)?.sync_all()?;
            Ok(())
        })();
        if let Err(e) = result {
            self.release(&owner, bytes.len() as u64);
            return Err(e.into());
        }
        self.index_insert(&key, owner, bytes.len() as u64, expires_at_ms, true)?;
        // `Stored` promises the blob can be fetched after a crash: the index entry too.
        self.index.flush().map_err(StoreError::from)?;
        Ok(())
    }

    fn index_insert(
        &self,
        key: &[u8; 32],
        owner: PeerId,
        size: u64,
        expires_at_ms: u64,
        _new: bool,
    ) -> Result<(), StoreError> {
        let meta = Meta {
            owner: owner.to_bytes(),
            size,
            expires_at_ms,
        };
        let value = cbor::encode(&meta, 1024).unwrap_or_default();
        if let Some(old) = self.index.insert(key, value)? {
            // Re-uploaded by someone else: the bytes count against the latest uploader.
            if let Ok(old) = cbor::decode::<Meta>(&old, 1024) {
                if let Ok(prev) = PeerId::from_bytes(&old.owner) {
                    if prev != owner {
                        self.release(&prev, old.size);
                        *self.usage().entry(owner).or_default() += size;
                    }
                }
            }
        }
        Ok(())
    }

    fn release(&self, owner: &PeerId, size: u64) {
        let mut usage = self.usage();
        if let Some(used) = usage.get_mut(owner) {
            *used = used.saturating_sub(size);
            if *used == 0 {
                usage.remove(owner);
            }
        }
    }

    /// Reads a blob, if held and not expired.
    pub fn get(&self, hash: &Hash, now_ms: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(value) = self.index.get(hash.0)? else {
            return Ok(None);
        };
        if cbor::decode::<Meta>(&value, 1024).is_ok_and(|m| m.expires_at_ms <= now_ms) {
            return Ok(None);
        }
        match std::fs::File::open(self.path(hash)) {
            Ok(file) => {
                // Sized from the start: a blob is read with one copy, not a growing buffer.
                let len = file.metadata()?.len().min(MAX_BLOB_BYTES as u64) as usize;
                let mut bytes = Vec::with_capacity(len);
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(file, MAX_BLOB_BYTES as u64),
                    &mut bytes,
                )?;
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes expired blobs; returns how many.
    pub fn purge(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        for entry in self.index.iter() {
            let (key, value) = entry?;
            let Ok(meta) = cbor::decode::<Meta>(&value, 1024) else {
                continue;
            };
            if meta.expires_at_ms > now_ms {
                continue;
            }
            if let Ok(hash) = <[u8; 32]>::try_from(key.as_ref()) {
                let _ = std::fs::remove_file(self.path(&Hash(hash)));
            }
            self.index.remove(&key)?;
            if let Ok(owner) = PeerId::from_bytes(&meta.owner) {
                self.release(&owner, meta.size);
            }
            removed += 1;
        }
        Ok(removed)
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 32 | NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, quota: u64) -> Store {
        let db = sled::Config::new().temporary(true).open().expect("db");
        Store::open(
            dir,
            &db,
            Limits {
                quota_bytes_per_peer: quota,
                ttl_ms: 1_000,
            },
        )
        .expect("store")
    }

    #[test]
    fn put_get_quota_and_expiry() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path(), 10);
        let owner = PeerId::random();
        let blob = b"sealed";
        let hash = Hash::of(blob);
        store.put(owner, &hash, blob, 0).expect("stored");
        assert_eq!(store.get(&hash, 1).expect("get"), Some(blob.to_vec()));
        assert_eq!(store.used_by(&owner), 6);
        // The same blob again costs nothing more.
        store.put(owner, &hash, blob, 0).expect("stored again");
        assert_eq!(store.used_by(&owner), 6);
        let other = b"more bytes";
        assert!(matches!(
            store.put(owner, &Hash::of(other), other, 0),
            Err(PutError::Quota { quota: 10 })
        ));
        assert!(!store.has_room(&owner, 5));
        assert_eq!(store.get(&hash, 1_000).expect("get"), None, "expired");
        assert_eq!(store.purge(1_000).expect("purge"), 1);
        assert_eq!(store.used_by(&owner), 0);
    }
}
