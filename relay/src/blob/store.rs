//! The relay's chunk store: sealed blobs appended to segment files under `<data>/blobs/`
//! (`<n>.seg`, at most [`SEGMENT_BYTES`] each), indexed in memory by BLAKE3 hash.
//!
//! A segment is a run of records, each a header and the blob:
//!
//! ```text
//! magic "kbr1" | blob length u32 LE | blob hash [32] | expires_at_ms u64 LE | owner length u8 |
//! owner (peer id bytes) | first 8 bytes of BLAKE3(everything before) | blob
//! ```
//!
//! **Durability by group commit.** A `put` appends its record to the active segment and waits
//! until an `fdatasync` of that segment covers it; the first waiter runs the sync and every
//! record appended meanwhile rides on the next one, so one sync serves many concurrent chunks.
//! The record is its own index entry (hash, owner, expiry), so once the sync returns the chunk
//! and its index entry are both on disk: only then does the blob enter the in-memory index and
//! `put` return (and the relay answer `Stored`). A failed sync marks the store broken: no later
//! `put` succeeds until a restart, because after a failed `fsync` the page cache no longer tells
//! what is on disk.
//!
//! **Start.** The index is rebuilt by reading every record header; a later record of a hash
//! replaces an earlier one. Only the newest segment can end in records that were never synced
//! (older ones were synced in full before the next one began, and every start begins a new
//! segment), so its records' blobs are hashed too; the first bad record (torn header, short or
//! mismatching blob) ends it, and the file is cut there. Nothing after it was ever acknowledged,
//! since a sync covers a prefix of the file.
//!
//! **Quota and expiry.** Quota counts the live blobs per uploader, in memory. A segment is
//! deleted as soon as none of its records is live (expired, purged, or replaced by a newer
//! record); a blob's expiry is at most one TTL away, so no segment outlives its newest record
//! by more than that. Storing a blob that is already here writes nothing unless its expiry
//! needs renewing by more than a [`RENEW_SLACK_DIVISOR`]th of the TTL (or another peer uploads
//! it), in which case a fresh record replaces the old one.
//!
//! Relays older than this format kept one file per blob with a sled index (tree `blobs`); those
//! blobs are moved into segments at start. All methods block: call them from `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kith_protocol::blob::{Hash, HASH_BYTES, MAX_BLOB_BYTES};
use kith_protocol::{cbor, PeerId};
use serde::{Deserialize, Serialize};

/// Name of the blob directory inside the data directory.
pub const DIR: &str = "blobs";

/// Largest segment file: a new one begins once the next record would not fit.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// A stored blob is renewed (written again) only when that moves its expiry by more than the
/// TTL divided by this.
pub const RENEW_SLACK_DIVISOR: u64 = 8;

/// Longest owner (peer id) a record holds.
const MAX_OWNER_BYTES: usize = 128;

const MAGIC: [u8; 4] = *b"kbr1";

/// Magic, blob length, hash, expiry, owner length.
const FIXED_HEADER_BYTES: usize = 4 + 4 + HASH_BYTES + 8 + 1;

/// The header's own check.
const CHECK_BYTES: usize = 8;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system failed.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
    /// The index of the old format failed.
    #[error("blob index: {0}")]
    Sled(#[from] sled::Error),
    /// An earlier sync failed: nothing more is stored until a restart.
    #[error("blob store: an earlier sync failed; restart the relay")]
    Broken,
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
    /// Every uploader's blobs together hold the relay's whole blob budget.
    #[error("the blob store holds its whole budget of {budget} bytes")]
    Budget {
        /// The budget.
        budget: u64,
    },
    /// The disk failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The store's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes one uploader may have stored.
    pub quota_bytes_per_peer: u64,
    /// Most bytes all uploaders together may have stored (the blob store's disk budget).
    pub budget_bytes: u64,
    /// How long a blob is kept, in milliseconds.
    pub ttl_ms: u64,
}

/// Where a live blob is and whose it is.
#[derive(Debug, Clone)]
struct Entry {
    segment: u64,
    /// Offset of the blob (after its header) in the segment.
    offset: u64,
    len: u32,
    owner: PeerId,
    expires_at_ms: u64,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Index entries pointing into it, plus puts in progress appending to it: it is deleted
    /// when this falls to zero (and it is not the active segment).
    refs: u64,
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

struct Inner {
    index: HashMap<Hash, Entry>,
    /// Live bytes per uploader, plus the bytes of its puts in progress.
    usage: HashMap<PeerId, u64>,
    segments: BTreeMap<u64, Segment>,
    active: Option<Active>,
    next_segment: u64,
    /// Records appended since start (a sequence number per record).
    appended: u64,
    /// Every record up to this one is synced.
    synced: u64,
    syncing: bool,
    broken: bool,
}

/// The chunk store.
pub struct Store {
    dir: PathBuf,
    limits: Limits,
    inner: Mutex<Inner>,
    synced: Condvar,
}

/// A record as read back from a segment (see [`records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The segment file.
    pub path: PathBuf,
    /// Where the blob starts in it.
    pub offset: u64,
    /// The blob's length.
    pub len: usize,
    /// The blob's hash.
    pub hash: Hash,
    /// Its uploader.
    pub owner: PeerId,
    /// When it expires.
    pub expires_at_ms: u64,
}

fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

fn header_check(header: &[u8]) -> [u8; CHECK_BYTES] {
    let mut check = [0u8; CHECK_BYTES];
    check.copy_from_slice(&blake3::hash(header).as_bytes()[..CHECK_BYTES]);
    check
}

/// The header of a record for `hash` (a blob of `len` bytes).
fn encode_header(hash: &Hash, len: usize, owner: &PeerId, expires_at_ms: u64) -> Vec<u8> {
    let owner = owner.to_bytes();
    let mut header = Vec::with_capacity(FIXED_HEADER_BYTES + owner.len() + CHECK_BYTES);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&(len as u32).to_le_bytes());
    header.extend_from_slice(&hash.0);
    header.extend_from_slice(&expires_at_ms.to_le_bytes());
    header.push(owner.len() as u8);
    header.extend_from_slice(&owner);
    let check = header_check(&header);
    header.extend_from_slice(&check);
    header
}

/// Reads the record at `at` of a segment `file_len` bytes long: its blob's offset and the
/// parsed header, or `None` at the end of the good records (end of file, torn or foreign bytes).
fn read_header(file: &File, at: u64, file_len: u64) -> Option<(u64, Hash, usize, PeerId, u64)> {
    let mut fixed = [0u8; FIXED_HEADER_BYTES];
    if at + FIXED_HEADER_BYTES as u64 > file_len || file.read_exact_at(&mut fixed, at).is_err() {
        return None;
    }
    let (magic, rest) = fixed.split_first_chunk::<4>()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (hash, rest) = rest.split_first_chunk::<HASH_BYTES>()?;
    let (expires, rest) = rest.split_first_chunk::<8>()?;
    let owner_len = usize::from(*rest.first()?);
    let len = u32::from_le_bytes(*len) as usize;
    if *magic != MAGIC || owner_len > MAX_OWNER_BYTES || len > MAX_BLOB_BYTES {
        return None;
    }
    let mut tail = vec![0u8; owner_len + CHECK_BYTES];
    let tail_at = at + FIXED_HEADER_BYTES as u64;
    let data_at = tail_at + tail.len() as u64;
    if data_at + len as u64 > file_len || file.read_exact_at(&mut tail, tail_at).is_err() {
        return None;
    }
    let (owner, check) = tail.split_at(owner_len);
    let mut header = fixed.to_vec();
    header.extend_from_slice(owner);
    if header_check(&header) != check {
        return None;
    }
    let owner = PeerId::from_bytes(owner).ok()?;
    Some((
        data_at,
        Hash(*hash),
        len,
        owner,
        u64::from_le_bytes(*expires),
    ))
}

/// Reads every good record of one segment, in order; with `check_blobs`, each blob is hashed
/// too and the first mismatch ends the segment. Returns the records and where the good part ends.
fn scan_segment(
    file: &File,
    path: &Path,
    check_blobs: bool,
) -> std::io::Result<(Vec<Record>, u64)> {
    let file_len = file.metadata()?.len();
    let mut records = Vec::new();
    let mut at = 0u64;
    let mut buf = Vec::new();
    while let Some((offset, hash, len, owner, expires_at_ms)) = read_header(file, at, file_len) {
        if check_blobs {
            buf.resize(len, 0);
            file.read_exact_at(&mut buf, offset)?;
            if Hash::of(&buf) != hash {
                break;
            }
        }
        records.push(Record {
            path: path.to_owned(),
            offset,
            len,
            hash,
            owner,
            expires_at_ms,
        });
        at = offset + len as u64;
    }
    Ok((records, at))
}

/// The segment files in `dir`, by id.
fn segment_files(dir: &Path) -> std::io::Result<BTreeMap<u64, PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(id) = segment_id(&path) {
            found.insert(id, path);
        }
    }
    Ok(found)
}

/// Every good record in the store under `data_dir`, blobs checked against their hashes, in
/// order (a later record of a hash replaces an earlier one). For tests and diagnostics: it
/// reads the files without the store's lock, so a record being written is not listed yet.
pub fn records(data_dir: &Path) -> std::io::Result<Vec<Record>> {
    let mut all = Vec::new();
    for path in segment_files(&data_dir.join(DIR))?.into_values() {
        let file = File::open(&path)?;
        all.extend(scan_segment(&file, &path, true)?.0);
    }
    Ok(all)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A blob index entry of the old format (one file per blob).
#[derive(Serialize, Deserialize)]
struct OldMeta {
    #[serde(with = "serde_bytes")]
    owner: Vec<u8>,
    size: u64,
    expires_at_ms: u64,
}

impl Store {
    /// Opens the store in `<data_dir>/blobs`, moving in any blobs of the old format indexed in
    /// `db`.
    pub fn open(data_dir: &Path, db: &sled::Db, limits: Limits) -> Result<Self, StoreError> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let files = segment_files(&dir)?;
        let newest = files.keys().next_back().copied();
        let mut inner = Inner {
            index: HashMap::new(),
            usage: HashMap::new(),
            segments: BTreeMap::new(),
            active: None,
            next_segment: newest.map_or(0, |id| id + 1),
            appended: 0,
            synced: 0,
            syncing: false,
            broken: false,
        };
        for (id, path) in files {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?;
            let last = Some(id) == newest;
            let (records, good_end) = scan_segment(&file, &path, last)?;
            if last && good_end < file.metadata()?.len() {
                tracing::warn!(segment = %path.display(), at = good_end, "cutting a torn tail off the newest blob segment");
                file.set_len(good_end)?;
                file.sync_all()?;
            }
            inner.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    path,
                    refs: 0,
                },
            );
            for r in records {
                let entry = Entry {
                    segment: id,
                    offset: r.offset,
                    len: r.len as u32,
                    owner: r.owner,
                    expires_at_ms: r.expires_at_ms,
                };
                inner.add_ref(id);
                inner.insert(r.hash, entry);
            }
        }
        let dead: Vec<u64> = inner
            .segments
            .iter()
            .filter(|(_, s)| s.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            inner.delete_segment(id);
        }
        let store = Self {
            dir,
            limits,
            inner: Mutex::new(inner),
            synced: Condvar::new(),
        };
        store.import_old(db)?;
        Ok(store)
    }

    /// Moves blobs of the old format (a file per blob, indexed in the `blobs` tree of `db`) into
    /// segments, then deletes the files and the tree's entries.
    fn import_old(&self, db: &sled::Db) -> Result<(), StoreError> {
        let tree = db.open_tree("blobs")?;
        if tree.is_empty() {
            return Ok(());
        }
        let mut inner = self.lock();
        let mut moved = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let (Ok(meta), Ok(hash)) = (
                cbor::decode::<OldMeta>(&value, 1024),
                <[u8; HASH_BYTES]>::try_from(key.as_ref()),
            ) else {
                continue;
            };
            let hash = Hash(hash);
            let (Ok(owner), Ok(bytes)) = (
                PeerId::from_bytes(&meta.owner),
                std::fs::read(self.dir.join(hash.to_hex())),
            ) else {
                continue;
            };
            if bytes.len() > MAX_BLOB_BYTES || Hash::of(&bytes) != hash {
                continue;
            }
            let (segment, offset) =
                inner.append(&self.dir, &hash, &bytes, &owner, meta.expires_at_ms)?;
            let entry = Entry {
                segment,
                offset,
                len: bytes.len() as u32,
                owner,
                expires_at_ms: meta.expires_at_ms,
            };
            moved.push((hash, entry));
        }
        inner.sync_active()?;
        let count = moved.len();
        for (hash, entry) in moved {
            inner.insert(hash, entry);
        }
        drop(inner);
        for entry in tree.iter() {
            let (key, _) = entry?;
            if let Ok(hash) = <[u8; HASH_BYTES]>::try_from(key.as_ref()) {
                let _ = std::fs::remove_file(self.dir.join(Hash(hash).to_hex()));
            }
        }
        tree.clear()?;
        db.flush()?;
        tracing::info!(
            count,
            "moved blobs of the old one-file-per-blob format into segments"
        );
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes `owner` has stored now.
    pub fn used_by(&self, owner: &PeerId) -> u64 {
        self.lock().usage.get(owner).copied().unwrap_or(0)
    }

    /// Whether `owner` may start uploading a file of `size` bytes.
    pub fn has_room(&self, owner: &PeerId, size: u64) -> bool {
        let all: u64 = self.lock().usage.values().sum();
        self.used_by(owner).saturating_add(size) <= self.limits.quota_bytes_per_peer
            && all.saturating_add(size) <= self.limits.budget_bytes
    }

    /// Stores a blob (already checked against `hash`) for `owner`, and returns once it is on
    /// disk. Storing a blob that is already here writes nothing unless its expiry needs renewing.
    pub fn put(
        &self,
        owner: PeerId,
        hash: &Hash,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), PutError> {
        self.put_expiring(owner, hash, bytes, now_ms, None)
    }

    /// [`Store::put`] for a blob of a temporary chat's message: kept until `cap_ms` at the
    /// latest (its expiry plus the tolerated skew) instead of the whole TTL.
    pub fn put_expiring(
        &self,
        owner: PeerId,
        hash: &Hash,
        bytes: &[u8],
        now_ms: u64,
        cap_ms: Option<u64>,
    ) -> Result<(), PutError> {
        if bytes.len() > MAX_BLOB_BYTES {
            return Err(StoreError::Io(std::io::Error::other("blob too large")).into());
        }
        let expires_at_ms = now_ms
            .saturating_add(self.limits.ttl_ms)
            .min(cap_ms.unwrap_or(u64::MAX));
        let slack = self.limits.ttl_ms / RENEW_SLACK_DIVISOR;
        let len = bytes.len() as u64;
        let mut inner = self.lock();
        if inner.broken {
            return Err(StoreError::Broken.into());
        }
        let renewal = match inner.index.get(hash) {
            Some(e) if e.owner == owner => {
                if e.expires_at_ms.saturating_add(slack) >= expires_at_ms {
                    return Ok(());
                }
                true
            }
            _ => false,
        };
        if !renewal {
            let all: u64 = inner.usage.values().sum();
            if all.saturating_add(len) > self.limits.budget_bytes {
                return Err(PutError::Budget {
                    budget: self.limits.budget_bytes,
                });
            }
        }
        {
            let used = inner.usage.entry(owner).or_default();
            // A renewal replaces the owner's own copy: it adds nothing once done.
            if !renewal && used.saturating_add(len) > self.limits.quota_bytes_per_peer {
                return Err(PutError::Quota {
                    quota: self.limits.quota_bytes_per_peer,
                });
            }
            *used += len;
        }
        let (segment, offset) = match inner.append(&self.dir, hash, bytes, &owner, expires_at_ms) {
            Ok(at) => at,
            Err(e) => {
                inner.release(&owner, len);
                return Err(StoreError::from(e).into());
            }
        };
        let seq = inner.appended;
        // Group commit: wait until a sync covers this record, running it if nobody is.
        loop {
            if inner.synced >= seq {
                break;
            }
            if inner.broken {
                inner.release(&owner, len);
                inner.drop_ref(segment);
                return Err(StoreError::Broken.into());
            }
            if inner.syncing {
                inner = self.synced.wait(inner).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let Some(file) = inner.active.as_ref().map(|a| a.file.clone()) else {
                // Records are only ever appended to the active segment.
                inner.synced = inner.appended;
                continue;
            };
            let target = inner.appended;
            inner.syncing = true;
            drop(inner);
            let result = file.sync_data();
            inner = self.lock();
            inner.syncing = false;
            match result {
                Ok(()) => inner.synced = inner.synced.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "blob segment sync failed; refusing further uploads");
                    inner.broken = true;
                }
            }
            self.synced.notify_all();
        }
        // Durable: now the blob may be found, and the bytes count as stored (the put's
        // reference to the segment becomes the index entry's).
        inner.release(&owner, len);
        let entry = Entry {
            segment,
            offset,
            len: len as u32,
            owner,
            expires_at_ms,
        };
        inner.insert(*hash, entry);
        Ok(())
    }

    /// Reads a blob, if held and not expired.
    pub fn get(&self, hash: &Hash, now_ms: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let (file, offset, len) = {
            let inner = self.lock();
            let Some(entry) = inner.index.get(hash) else {
                return Ok(None);
            };
            if entry.expires_at_ms <= now_ms {
                return Ok(None);
            }
            let Some(segment) = inner.segments.get(&entry.segment) else {
                return Ok(None);
            };
            (segment.file.clone(), entry.offset, entry.len as usize)
        };
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, offset)?;
        Ok(Some(bytes))
    }

    /// Forgets expired blobs and deletes the segments left without a live one; returns how
    /// many blobs expired.
    pub fn purge(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let expired: Vec<Hash> = inner
            .index
            .iter()
            .filter(|(_, e)| e.expires_at_ms <= now_ms)
            .map(|(h, _)| *h)
            .collect();
        for hash in &expired {
            inner.remove(hash);
        }
        Ok(expired.len() as u64)
    }

    /// How many blobs are held (expired ones included until the next purge).
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    /// Whether no blob is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Appends a record to the active segment (beginning a new one when it is full); returns
    /// the segment and the blob's offset. The record is not synced yet.
    fn append(
        &mut self,
        dir: &Path,
        hash: &Hash,
        bytes: &[u8],
        owner: &PeerId,
        expires_at_ms: u64,
    ) -> std::io::Result<(u64, u64)> {
        let header = encode_header(hash, bytes.len(), owner, expires_at_ms);
        let record_len = (header.len() + bytes.len()) as u64;
        if self
            .active
            .as_ref()
            .is_none_or(|a| a.len > 0 && a.len + record_len > SEGMENT_BYTES)
        {
            self.rotate(dir)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(std::io::Error::other("no active segment"));
        };
        active.file.write_all_at(&header, active.len)?;
        let offset = active.len + header.len() as u64;
        active.file.write_all_at(bytes, offset)?;
        active.len += record_len;
        let id = active.id;
        self.appended += 1;
        self.add_ref(id);
        Ok((id, offset))
    }

    /// Syncs the active segment in full, then begins a new one.
    fn rotate(&mut self, dir: &Path) -> std::io::Result<()> {
        self.sync_active()?;
        let id = self.next_segment;
        let path = dir.join(segment_name(id));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        // The new file's name must survive a crash before any record in it is acknowledged.
        sync_dir(dir)?;
        let file = Arc::new(file);
        self.next_segment += 1;
        self.segments.insert(
            id,
            Segment {
                file: file.clone(),
                path,
                refs: 0,
            },
        );
        if let Some(old) = self.active.replace(Active { id, file, len: 0 }) {
            self.delete_if_dead(old.id);
        }
        Ok(())
    }

    /// Syncs every record appended so far (used where a sync must not wait for others).
    fn sync_active(&mut self) -> std::io::Result<()> {
        if let Some(active) = &self.active {
            if let Err(e) = active.file.sync_data() {
                self.broken = true;
                return Err(e);
            }
        }
        self.synced = self.appended;
        Ok(())
    }

    fn add_ref(&mut self, id: u64) {
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.refs += 1;
        }
    }

    fn drop_ref(&mut self, id: u64) {
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.refs = segment.refs.saturating_sub(1);
        }
        self.delete_if_dead(id);
    }

    /// Makes `entry` the live copy of `hash`, replacing any older one. The caller holds a
    /// reference to its segment, which the entry takes over.
    fn insert(&mut self, hash: Hash, entry: Entry) {
        *self.usage.entry(entry.owner).or_default() += u64::from(entry.len);
        if let Some(old) = self.index.insert(hash, entry) {
            self.forget(old);
        }
    }

    fn remove(&mut self, hash: &Hash) {
        if let Some(old) = self.index.remove(hash) {
            self.forget(old);
        }
    }

    /// Releases what an entry no longer in the index held.
    fn forget(&mut self, old: Entry) {
        self.release(&old.owner, u64::from(old.len));
        self.drop_ref(old.segment);
    }

    fn release(&mut self, owner: &PeerId, size: u64) {
        if let Some(used) = self.usage.get_mut(owner) {
            *used = used.saturating_sub(size);
            if *used == 0 {
                self.usage.remove(owner);
            }
        }
    }

    /// Deletes segment `id` if no live blob is in it and no put in progress appended to it (the
    /// next put begins a new segment if it was the active one).
    fn delete_if_dead(&mut self, id: u64) {
        if self.segments.get(&id).is_some_and(|s| s.refs == 0) {
            if self.active.as_ref().is_some_and(|a| a.id == id) {
                self.active = None;
            }
            self.delete_segment(id);
        }
    }

    fn delete_segment(&mut self, id: u64) {
        if let Some(segment) = self.segments.remove(&id) {
            if let Err(e) = std::fs::remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), error = %e, "cannot delete an empty blob segment");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const TTL: u64 = 1_000;

    fn db() -> sled::Db {
        sled::Config::new().temporary(true).open().expect("db")
    }

    fn open_with(dir: &Path, db: &sled::Db, quota: u64) -> Store {
        Store::open(
            dir,
            db,
            Limits {
                quota_bytes_per_peer: quota,
                budget_bytes: u64::MAX,
                ttl_ms: TTL,
            },
        )
        .expect("store")
    }

    fn open(dir: &Path, quota: u64) -> Store {
        open_with(dir, &db(), quota)
    }

    fn blob(seed: u8, len: usize) -> (Vec<u8>, Hash) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let hash = Hash::of(&bytes);
        (bytes, hash)
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        segment_files(&dir.join(DIR))
            .expect("list")
            .into_values()
            .collect()
    }

    #[test]
    fn the_budget_of_all_uploaders_together_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(
            dir.path(),
            &db(),
            Limits {
                quota_bytes_per_peer: 100,
                budget_bytes: 10,
                ttl_ms: TTL,
            },
        )
        .expect("open");
        let (alice, bob) = (PeerId::random(), PeerId::random());
        store
            .put(alice, &Hash::of(b"sealed"), b"sealed", 0)
            .expect("fits");
        // Bob is far below his own quota, but the store's budget is spent.
        assert!(!store.has_room(&bob, 6));
        assert!(matches!(
            store.put(bob, &Hash::of(b"second"), b"second", 0),
            Err(PutError::Budget { budget: 10 })
        ));
        store
            .put(bob, &Hash::of(b"four"), b"four", 0)
            .expect("what is left fits");
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
        assert!(store.is_empty());
        assert!(
            segments(dir.path()).is_empty(),
            "the empty segment is deleted"
        );
    }

    #[test]
    fn a_temporary_chats_blob_goes_at_its_message_expiry() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path(), 1_000);
        let owner = PeerId::random();
        let blob = b"timed chunk";
        let hash = Hash::of(blob);
        store
            .put_expiring(owner, &hash, blob, 0, Some(300))
            .expect("stored");
        assert_eq!(store.get(&hash, 299).expect("get"), Some(blob.to_vec()));
        assert_eq!(store.get(&hash, 300).expect("get"), None, "expired");
        assert_eq!(store.purge(300).expect("purge"), 1);
        assert!(store.is_empty());
        assert!(segments(dir.path()).is_empty(), "its segment is deleted");
    }

    #[test]
    fn a_restart_keeps_every_stored_blob_with_its_owner_and_expiry() {
        let dir = tempfile::tempdir().expect("tmp");
        let (alice, bob) = (PeerId::random(), PeerId::random());
        let blobs: Vec<_> = (0..5u8).map(|i| blob(i, 1000 + usize::from(i))).collect();
        {
            let store = open(dir.path(), 1 << 20);
            for (i, (bytes, hash)) in blobs.iter().enumerate() {
                let owner = if i % 2 == 0 { alice } else { bob };
                store.put(owner, hash, bytes, i as u64).expect("stored");
            }
        }
        let store = open(dir.path(), 1 << 20);
        assert_eq!(store.len(), 5);
        for (bytes, hash) in &blobs {
            assert_eq!(store.get(hash, 1).expect("get").as_ref(), Some(bytes));
        }
        assert_eq!(store.used_by(&alice), 1000 + 1002 + 1004);
        assert_eq!(store.used_by(&bob), 1001 + 1003);
        // Expiry came back too: blob i expires at i + TTL.
        assert_eq!(store.get(&blobs[0].1, TTL).expect("get"), None);
        assert!(store.get(&blobs[1].1, TTL).expect("get").is_some());
        assert_eq!(store.purge(TTL + 2).expect("purge"), 3);
        assert_eq!(store.used_by(&alice), 1004);
        // A blob stored after the restart goes to a new segment; all are found again.
        let (bytes, hash) = blob(9, 700);
        store.put(bob, &hash, &bytes, 10).expect("stored");
        drop(store);
        let store = open(dir.path(), 1 << 20);
        assert_eq!(store.get(&hash, 11).expect("get"), Some(bytes));
        assert_eq!(
            store.get(&blobs[4].1, 11).expect("get").as_ref(),
            Some(&blobs[4].0)
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_records_before_it_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = PeerId::random();
        let (a, b, c) = (blob(1, 5000), blob(2, 5000), blob(3, 5000));
        {
            let store = open(dir.path(), 1 << 20);
            for (bytes, hash) in [&a, &b, &c] {
                store.put(owner, hash, bytes, 0).expect("stored");
            }
        }
        let path = segments(dir.path()).pop().expect("a segment");
        let full = std::fs::metadata(&path).expect("meta").len();
        // A crash while c's blob was written: its last bytes never reached the disk, and b's
        // blob has a damaged byte (a write that was never synced).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(full - 100).expect("cut");
        let b_at = records(dir.path()).expect("records")[1].offset;
        file.write_all_at(&[0xff], b_at + 10).expect("damage");
        drop(file);
        let store = open(dir.path(), 1 << 20);
        assert_eq!(store.get(&a.1, 1).expect("get"), Some(a.0.clone()));
        assert_eq!(store.get(&b.1, 1).expect("get"), None);
        assert_eq!(store.get(&c.1, 1).expect("get"), None);
        assert_eq!(store.used_by(&owner), 5000);
        assert!(
            std::fs::metadata(&path).expect("meta").len() < b_at,
            "cut before b"
        );
        // Stored again, they come back; nothing is lost on the next start.
        store.put(owner, &b.1, &b.0, 0).expect("stored");
        store.put(owner, &c.1, &c.0, 0).expect("stored");
        drop(store);
        let store = open(dir.path(), 1 << 20);
        for (bytes, hash) in [&a, &b, &c] {
            assert_eq!(store.get(hash, 1).expect("get").as_ref(), Some(bytes));
        }
        // Garbage at the end of a segment (foreign bytes, a torn header) is ignored too.
        drop(store);
        let path = segments(dir.path()).pop().expect("a segment");
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        std::io::Write::write_all(&mut &file, b"kbr1\xff\xff").expect("garbage");
        let store = open(dir.path(), 1 << 20);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn segments_roll_over_and_are_deleted_once_nothing_in_them_lives() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path(), u64::MAX);
        let owner = PeerId::random();
        let per_segment = (SEGMENT_BYTES as usize).div_ceil(MAX_BLOB_BYTES);
        let mut hashes = Vec::new();
        for i in 0..per_segment + 2 {
            let mut bytes = vec![0u8; MAX_BLOB_BYTES];
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let hash = Hash::of(&bytes);
            // The first segment's blobs expire first.
            store
                .put(owner, &hash, &bytes, i as u64 * 10)
                .expect("stored");
            hashes.push(hash);
        }
        assert_eq!(segments(dir.path()).len(), 2);
        // Purged up to the last blob of the first segment: that segment goes.
        let first_segment_end = (per_segment as u64 - 1) * 10;
        store.purge(first_segment_end + TTL).expect("purge");
        assert_eq!(segments(dir.path()).len(), 1);
        let last = hashes.last().expect("some");
        assert!(store
            .get(last, first_segment_end + TTL)
            .expect("get")
            .is_some());
    }

    #[test]
    fn concurrent_puts_share_syncs_and_are_all_durable() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path(), u64::MAX);
        let owner = PeerId::random();
        let blobs: Vec<_> = (0..32u8).map(|i| blob(i, 20_000)).collect();
        let start = Barrier::new(blobs.len());
        std::thread::scope(|s| {
            for (bytes, hash) in &blobs {
                let (store, start) = (&store, &start);
                s.spawn(move || {
                    start.wait();
                    store.put(owner, hash, bytes, 0).expect("stored");
                });
            }
        });
        drop(store);
        let store = open(dir.path(), u64::MAX);
        for (bytes, hash) in &blobs {
            assert_eq!(store.get(hash, 1).expect("get").as_ref(), Some(bytes));
        }
        assert_eq!(store.used_by(&owner), 32 * 20_000);
    }

    #[test]
    fn another_uploader_takes_over_a_blob_and_renewals_rewrite_only_when_due() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path(), 1 << 20);
        let (alice, bob) = (PeerId::random(), PeerId::random());
        let (bytes, hash) = blob(7, 3000);
        store.put(alice, &hash, &bytes, 0).expect("stored");
        let size = |d: &Path| -> u64 {
            segments(d)
                .iter()
                .map(|p| std::fs::metadata(p).expect("meta").len())
                .sum()
        };
        let written = size(dir.path());
        // Soon after: nothing is written.
        store
            .put(alice, &hash, &bytes, TTL / RENEW_SLACK_DIVISOR)
            .expect("stored");
        assert_eq!(size(dir.path()), written);
        // Later: a fresh record with the new expiry.
        store.put(alice, &hash, &bytes, TTL / 2).expect("stored");
        assert!(size(dir.path()) > written);
        assert!(store.get(&hash, TTL).expect("get").is_some());
        assert_eq!(store.used_by(&alice), 3000);
        // Bob uploads it too: it counts against him now.
        store.put(bob, &hash, &bytes, TTL / 2).expect("stored");
        assert_eq!((store.used_by(&alice), store.used_by(&bob)), (0, 3000));
        drop(store);
        let store = open(dir.path(), 1 << 20);
        assert_eq!((store.used_by(&alice), store.used_by(&bob)), (0, 3000));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn blobs_of_the_old_format_are_moved_into_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = db();
        let owner = PeerId::random();
        let (bytes, hash) = blob(4, 4096);
        std::fs::create_dir_all(dir.path().join(DIR)).expect("dir");
        std::fs::write(dir.path().join(DIR).join(hash.to_hex()), &bytes).expect("write");
        let meta = OldMeta {
            owner: owner.to_bytes(),
            size: bytes.len() as u64,
            expires_at_ms: 500,
        };
        db.open_tree("blobs")
            .expect("tree")
            .insert(hash.0, cbor::encode(&meta, 1024).expect("cbor"))
            .expect("insert");
        let store = open_with(dir.path(), &db, 1 << 20);
        assert_eq!(store.get(&hash, 1).expect("get"), Some(bytes));
        assert_eq!(store.get(&hash, 500).expect("get"), None);
        assert_eq!(store.used_by(&owner), 4096);
        assert!(!dir.path().join(DIR).join(hash.to_hex()).exists());
        assert!(db.open_tree("blobs").expect("tree").is_empty());
    }
}
