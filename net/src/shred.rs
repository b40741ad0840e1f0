//! Crypto-shredding of temporary chats' stored bytes, for the relay's mailbox and the node's
//! store: the bytes of an expired message must leave the disk, and sled, a log-structured
//! store, keeps a removed value in its log segments until it rewrites or reuses them, which it
//! does in its own time.
//!
//! So a value that belongs to a message with an expiry is stored sealed (AES-256-GCM, a random
//! nonce) under the key of its **expiry bucket**: the [`BUCKET_MS`]-long slice of time in which
//! its deletion deadline falls. (The relay also names such a message in its dedup index by a
//! keyed BLAKE3 hash under the same key, [`Keys::blind`], not by its id.) The bucket keys live
//! outside sled, in one small file beside the database (`db.expiry-keys`: records of bucket
//! end `u64` BE and 32 key bytes) that is replaced as a whole (written to a temporary file,
//! synced, renamed over, directory synced) whenever a bucket starts or ends. Once a bucket's
//! end passes, its key is gone from the file and from memory: whatever sled still holds of its
//! values is noise, and they can no longer be read or recognised. Values of permanent chats
//! are stored as before.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The length of an expiry bucket: a timed entry's key is destroyed at most this long after
/// its deadline.
pub const BUCKET_MS: u64 = 10_000;

/// The first byte of a sealed value (a CBOR record starts with a map header instead).
pub const SEALED_MARK: u8 = b'S';

const KEY_BYTES: usize = 32;
const RECORD_BYTES: usize = 8 + KEY_BYTES;

/// The end of the bucket `deadline_ms` falls in (strictly after it).
pub fn bucket_end(deadline_ms: u64) -> u64 {
    (deadline_ms / BUCKET_MS)
        .saturating_add(1)
        .saturating_mul(BUCKET_MS)
}

/// Why the key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Reading or replacing the file failed.
    #[error("expiry key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file's length is not a whole number of records.
    #[error("expiry key file {0} is damaged (length not a multiple of {RECORD_BYTES})")]
    Damaged(PathBuf),
    /// The system's random source failed.
    #[error("no randomness for a key or nonce")]
    Random,
}

/// The bucket keys, in memory and (unless in memory only) in their file.
pub struct Keys {
    path: Option<PathBuf>,
    keys: BTreeMap<u64, [u8; KEY_BYTES]>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("path", &self.path)
            .field("buckets", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keys {
    /// Keys kept in memory only (tests of the store).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            keys: BTreeMap::new(),
            rng: SystemRandom::new(),
        }
    }

    /// Loads the key file at `path` (none yet is no keys).
    pub fn open(path: &Path) -> Result<Self, KeysError> {
        let io = |source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        if !bytes.len().is_multiple_of(RECORD_BYTES) {
            return Err(KeysError::Damaged(path.to_path_buf()));
        }
        let keys = bytes
            .chunks_exact(RECORD_BYTES)
            .filter_map(|record| {
                let (end, key) = record.split_at(8);
                Some((
                    u64::from_be_bytes(end.try_into().ok()?),
                    key.try_into().ok()?,
                ))
            })
            .collect();
        Ok(Self {
            path: Some(path.to_path_buf()),
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// The key of the bucket ending at `end`, if it still exists.
    pub fn get(&self, end: u64) -> Option<&[u8; KEY_BYTES]> {
        self.keys.get(&end)
    }

    /// The key of the bucket ending at `end`, made (and written to the file) if it is new.
    pub fn get_or_make(&mut self, end: u64) -> Result<[u8; KEY_BYTES], KeysError> {
        if let Some(key) = self.keys.get(&end) {
            return Ok(*key);
        }
        let mut key = [0; KEY_BYTES];
        self.rng.fill(&mut key).map_err(|_| KeysError::Random)?;
        self.keys.insert(end, key);
        self.persist()?;
        Ok(key)
    }

    /// The earliest bucket end, when a key is next destroyed.
    pub fn next_end(&self) -> Option<u64> {
        self.keys.keys().next().copied()
    }

    /// Destroys the keys of buckets that ended at or before `now_ms`; returns how many.
    pub fn destroy_ended(&mut self, now_ms: u64) -> Result<usize, KeysError> {
        let kept = self.keys.split_off(&now_ms.saturating_add(1));
        let ended = std::mem::replace(&mut self.keys, kept);
        if ended.is_empty() {
            return Ok(0);
        }
        self.persist()?;
        Ok(ended.len())
    }

    /// Replaces the key file with the keys in memory: a new file, synced, renamed over the old
    /// one, then the directory synced (the old file's blocks go back to the file system).
    fn persist(&self) -> Result<(), KeysError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let io = |source| KeysError::Io {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("expiry-keys.tmp");
        let mut bytes = Vec::with_capacity(self.keys.len() * RECORD_BYTES);
        for (end, key) in &self.keys {
            bytes.extend_from_slice(&end.to_be_bytes());
            bytes.extend_from_slice(key);
        }
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Seals `plaintext` under the key of the bucket ending at `end`.
    pub fn seal(&mut self, end: u64, plaintext: &[u8]) -> Result<Vec<u8>, KeysError> {
        let key = self.get_or_make(end)?;
        let mut nonce = [0; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| KeysError::Random)?;
        let sealing =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).map_err(|_| KeysError::Random)?);
        let mut body = plaintext.to_vec();
        sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(end.to_be_bytes()),
                &mut body,
            )
            .map_err(|_| KeysError::Random)?;
        let mut out = Vec::with_capacity(1 + 8 + NONCE_LEN + body.len());
        out.push(SEALED_MARK);
        out.extend_from_slice(&end.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value made by [`Keys::seal`]; `None` once its bucket's key is destroyed, or if
    /// it was damaged.
    pub fn open_sealed(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let rest = sealed.strip_prefix(&[SEALED_MARK])?;
        let end = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let nonce: [u8; NONCE_LEN] = rest.get(8..8 + NONCE_LEN)?.try_into().ok()?;
        let mut body = rest.get(8 + NONCE_LEN..)?.to_vec();
        let key = self.keys.get(&end)?;
        let opening = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
        let plain = opening
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(end.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }

    /// A name for `bytes` that only the bucket's key links to them (keyed BLAKE3, 16 bytes).
    pub fn blind(&self, end: u64, bytes: &[u8]) -> Option<[u8; 16]> {
        let key = self.keys.get(&end)?;
        let hash = blake3::keyed_hash(key, bytes);
        hash.as_bytes()[..16].try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_until_their_bucket_ends() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.expiry-keys");
        let mut keys = Keys::open(&path).expect("open");
        let end = bucket_end(12_345);
        assert_eq!(end, 20_000);
        assert_eq!(bucket_end(20_000), 30_000);
        let sealed = keys.seal(end, b"meet at noon").expect("seal");
        assert!(!sealed.windows(4).any(|w| w == b"meet"));
        assert_eq!(
            keys.open_sealed(&sealed).as_deref(),
            Some(&b"meet at noon"[..])
        );
        let name = keys.blind(end, b"id").expect("blind");
        // The file holds the key; a reopened set opens the value.
        let key = *keys.get(end).expect("key");
        let file = std::fs::read(&path).expect("read");
        assert!(file.windows(KEY_BYTES).any(|w| w == key));
        let reopened = Keys::open(&path).expect("reopen");
        assert_eq!(
            reopened.open_sealed(&sealed).as_deref(),
            Some(&b"meet at noon"[..])
        );
        assert_eq!(reopened.blind(end, b"id"), Some(name));
        // A tampered value does not open.
        let mut bad = sealed.clone();
        if let Some(last) = bad.last_mut() {
            *last ^= 1;
        }
        assert_eq!(keys.open_sealed(&bad), None);

        assert_eq!(keys.next_end(), Some(end));
        assert_eq!(keys.destroy_ended(end - 1).expect("destroy"), 0);
        assert_eq!(keys.destroy_ended(end).expect("destroy"), 1);
        assert_eq!(keys.open_sealed(&sealed), None);
        assert_eq!(keys.blind(end, b"id"), None);
        let file = std::fs::read(&path).expect("read");
        assert!(!file.windows(KEY_BYTES).any(|w| w == key));
        assert_eq!(Keys::open(&path).expect("reopen").next_end(), None);
    }

    #[test]
    fn a_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("k");
        std::fs::write(&path, [1, 2, 3]).expect("write");
        assert!(matches!(Keys::open(&path), Err(KeysError::Damaged(_))));
    }
}
