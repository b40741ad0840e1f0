//! Files, images and video: chunking, upload, download and serving over `/kith/blob/1`.
//!
//! Sending ([`Node::send_file`]): the size is checked against `max_file_bytes` (settings) and
//! against the target relays' limit (`Begin`) before anything is uploaded. The file is then read
//! once, chunk by chunk ([`kith_protocol::blob`]): one thread reads and hashes the plaintext while
//! the others seal chunks with a fresh per-file key, hash them and write them at their place in
//! one pack file, `<home>/blobs/<message id>.pack` (chunk `i` at `i` × [`PACK_STRIDE`]), a few
//! chunks in memory at a time. The manifest blobs go to `<home>/blobs/<hash>`. An index in memory
//! (rebuilt from the attachment records at start) maps each chunk hash to its place in a pack. The
//! message ([`Body::File`]) goes through the normal outbox, while an upload job puts every blob
//! on the recipient's home relays (for a group: the group's relay, once). Uploads retry with
//! backoff until every target relay holds every blob, and resume after a restart.
//!
//! Receiving: the message is stored with its attachment record; files up to
//! `auto_download_max_bytes` are fetched at once, larger ones on [`Node::download`]. A download
//! asks the sender directly (first when it is connected) and the relays (the node's home relays
//! and the group's relay); every blob is checked against its hash, and a bad one is refused
//! (`warn!`) and asked from the next source. Manifest blobs are written to `<home>/blobs/`; each
//! chunk is opened as it arrives and its plaintext written at its place in
//! `<home>/blobs/<message id>.part`, so the file is assembled while it travels. An interrupted
//! download resumes: the chunks already in the part file are found by sealing them again and
//! comparing with the manifest, and only the others are fetched. Once every chunk is in, the part
//! file is synced, its whole-file hash checked, and only then moved to `<home>/files/<name>` (or
//! `--to DIR`) and recorded as the file's path. Progress goes to the event stream as
//! `{"type":"progress","id","direction","done","total"}` (bytes).
//!
//! Serving: a node answers `Get` for blobs it holds (a sender's own chunks, read from its packs),
//! so a recipient that can reach it needs no relay. It refuses `Put` and `Begin`: only relays
//! store for others.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kith_net::codec::Message;
use kith_protocol::blob::{self, Cipher, FileRef, Hash, Key, CHUNK_BYTES, TAG_BYTES};
use kith_protocol::{Body, Envelope, GroupId, MessageId, Reject};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::clock::now_ms;
use crate::core::hooks::{Feature, Files};
use crate::core::store::{Batch, Direction};
use crate::core::AttachmentView;
use crate::core::MessageView;
use crate::core::{Node, NodeError, NodeEvent, Outgoing, Sent};
use crate::net::{self, circuit_addr, peer_of};
use crate::shutdown::Signal;
use futures::future::BoxFuture;

/// Directory of sealed blobs inside the home.
pub const BLOBS_DIR: &str = "blobs";
/// Directory where downloaded files land inside the home (unless `--to DIR`).
pub const FILES_DIR: &str = "files";
/// Blob requests in flight per transfer.
const WINDOW: usize = 16;
/// Bytes from the start of one sealed chunk to the next in a pack file.
pub const PACK_STRIDE: u64 = (CHUNK_BYTES + TAG_BYTES) as u64;
/// Most threads sealing one file.
const MAX_SEAL_THREADS: usize = 4;
/// Read size when hashing a whole assembled file.
const HASH_READ_BYTES: usize = 1024 * 1024;
/// Bytes written to a pack or part file before a background sync starts (see [`WriteBehind`]).
const WRITE_BEHIND_BYTES: u64 = 8 * 1024 * 1024;
/// Longest wait between two rounds of a transfer that keeps failing.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// First wait between two rounds.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(250);

/// How long a transfer waits after its `attempts + 1`-th incomplete try.
fn retry_delay(attempts: u32) -> Duration {
    FIRST_RETRY_DELAY
        .saturating_mul(1u32 << attempts.min(16))
        .min(MAX_RETRY_DELAY)
}
/// Rounds a download asked for by the user tries before it reports what is missing.
const MANUAL_ROUNDS: u32 = 4;
/// Transfers running at once in the background.
const MAX_BACKGROUND_TRANSFERS: usize = 4;
/// Queued background transfers before new ones wait.
const JOB_QUEUE: usize = 1024;
/// Images larger than this get no thumbnail (decoding them costs too much).
const MAX_THUMBNAIL_SOURCE_BYTES: u64 = 64 * 1024 * 1024;
/// Thumbnail edge, in pixels.
const THUMBNAIL_PX: u32 = 64;

/// A file attached to a message, as the node keeps it (under `a/<message id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The reference from the signed message (key included).
    pub file: FileRef,
    /// Sent or received.
    pub direction: Direction,
    /// Who sent it.
    pub from: PeerId,
    /// The group it was sent to, if any.
    pub group: Option<GroupId>,
    /// Where the plaintext file is on this machine, once it is.
    pub path: Option<String>,
    /// Outgoing: every target relay holds every blob.
    pub uploaded: bool,
    /// Outgoing: the relays to upload to (multiaddrs ending in `/p2p/<relay>`).
    pub relays: Vec<String>,
    /// Outgoing: a relay took the message before the upload ended; its `sent` tick waits for
    /// the upload ([`Files::holds_sent`]).
    #[serde(default)]
    pub sent_waits: bool,
}

impl From<&Record> for AttachmentView {
    fn from(r: &Record) -> Self {
        Self {
            name: r.file.name.clone(),
            size: r.file.size,
            mime: r.file.mime.clone(),
            hash: r.file.file_hash.to_hex(),
            path: r.path.clone(),
            downloaded: r.path.is_some(),
            thumbnail: r.file.thumbnail.as_ref().map(hex::encode),
        }
    }
}

/// Counters for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blobs refused because they did not match their hash.
    pub refused_blobs: u64,
    /// Blobs fetched and written.
    pub fetched_blobs: u64,
}

enum Job {
    Upload(MessageId),
    Download(MessageId),
}

/// Where a sealed chunk of one of this node's own files is: chunk `index` of message `id`'s
/// pack file, or, once the pack is gone (the relays hold the file), of its file sealed again.
#[derive(Debug, Clone)]
struct Packed {
    id: MessageId,
    index: u64,
    len: usize,
}

/// The media part of the node's shared state.
pub(crate) struct State {
    jobs: mpsc::Sender<Job>,
    queue: Mutex<Option<mpsc::Receiver<Job>>>,
    /// One lock per file being transferred, so a transfer never runs twice at once.
    locks: Mutex<HashMap<MessageId, Arc<tokio::sync::Mutex<()>>>>,
    /// The chunks of the files this node sent, by hash.
    packed: Mutex<HashMap<Hash, Packed>>,
    /// Set once `packed` holds the packs of the files sent before this start.
    packs_loaded: tokio::sync::OnceCell<()>,
    refused: AtomicU64,
    fetched: AtomicU64,
    /// The last progress step announced per transfer (message, upload?): `progress` events
    /// come once per step, not once per chunk.
    progress_steps: Mutex<HashMap<(MessageId, bool), u64>>,
    /// Held while an outgoing record's `uploaded` or `sent_waits` changes: the upload's end
    /// and a relay taking the message may come at once.
    sent_lock: Mutex<()>,
}

/// `progress` events a transfer announces at most, besides its end.
const PROGRESS_STEPS: u64 = 20;

/// Whether `done` of `total` bytes is worth a `progress` event: the transfer reached a new
/// step (of [`PROGRESS_STEPS`]) or its end. Records the step in `steps`.
fn new_progress_step<K: std::hash::Hash + Eq>(
    steps: &mut HashMap<K, u64>,
    key: K,
    done: u64,
    total: u64,
) -> bool {
    if done >= total {
        steps.remove(&key);
        return true;
    }
    let step = done.saturating_mul(PROGRESS_STEPS) / total.max(1);
    steps.insert(key, step) != Some(step)
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn a_transfer_in_many_chunks_announces_each_step_once() {
        let mut steps = HashMap::new();
        let total = 5 * 1024 * 1024;
        let shown = (1..=total / 4096)
            .filter(|chunk| new_progress_step(&mut steps, "upload", chunk * 4096, total))
            .count() as u64;
        assert_eq!(shown, PROGRESS_STEPS + 1, "each step once, and the end");
        assert!(steps.is_empty(), "forgotten at the end");
    }
}

impl Default for State {
    fn default() -> Self {
        let (jobs, queue) = mpsc::channel(JOB_QUEUE);
        Self {
            jobs,
            queue: Mutex::new(Some(queue)),
            locks: Mutex::new(HashMap::new()),
            packed: Mutex::new(HashMap::new()),
            packs_loaded: tokio::sync::OnceCell::new(),
            refused: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            progress_steps: Mutex::new(HashMap::new()),
            sent_lock: Mutex::new(()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why one round of a transfer did not finish.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    /// Some blobs could not be had from any source (or stored at some relay).
    #[error("{missing} of {total} blobs could not be transferred: {detail}")]
    Incomplete {
        missing: usize,
        total: usize,
        detail: String,
    },
    /// A relay refused the file outright (too large); retrying will not help.
    #[error("{0}")]
    Refused(String),
    /// The local disk or store failed.
    #[error("{0}")]
    Local(String),
}

fn local(e: impl std::fmt::Display) -> TransferError {
    TransferError::Local(e.to_string())
}

fn invalid(e: impl std::fmt::Display) -> NodeError {
    NodeError::Invalid(e.to_string())
}

/// The media type of a file, from its first bytes or its extension.
pub fn sniff_mime(name: &str, head: &[u8]) -> String {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return "image/png".into();
    }
    if head.starts_with(&[0xff, 0xd8, 0xff]) {
        return "image/jpeg".into();
    }
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
    .into()
}

/// A file name safe to send and to create: no directories, no control characters, at most
/// [`blob::MAX_NAME_BYTES`] bytes.
pub(crate) fn safe_name(path: &Path) -> String {
    let raw = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    while name.len() > blob::MAX_NAME_BYTES {
        name.pop();
    }
    if name.is_empty() || name == "." || name == ".." {
        name = "file".into();
    }
    name
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes a blob under its hash (temporary file, then rename), unless it is already there.
fn write_blob(dir: &Path, hash: &Hash, bytes: &[u8]) -> std::io::Result<()> {
    let path = dir.join(hash.to_hex());
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!("{}.tmp{}", hash.to_hex(), rand::random::<u32>()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(tmp, path)
}

/// Syncs a file on a thread of its own while it is being written, each time another
/// [`WRITE_BEHIND_BYTES`] are in, so the sync that must come before the file is relied on finds
/// little left to write: the disk works while the chunks are sealed or travel. Its syncs prove
/// nothing; the owner still syncs the whole file at the end. Stopped and joined when dropped.
struct WriteBehind {
    shared: Arc<(Mutex<Pending>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Pending {
    unsynced: u64,
    stop: bool,
}

impl WriteBehind {
    /// Starts syncing `file` (a handle of its own on the file being written). Without a thread
    /// to spare it does nothing, which only makes the final sync longer.
    fn start(file: std::fs::File) -> Self {
        let shared = Arc::new((Mutex::new(Pending::default()), std::sync::Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kith-write-behind".into())
            .spawn(move || {
                let (pending, wake) = &*theirs;
                let mut state = lock(pending);
                loop {
                    if state.stop {
                        return;
                    }
                    if state.unsynced < WRITE_BEHIND_BYTES {
                        state = wake.wait(state).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    state.unsynced = 0;
                    drop(state);
                    if let Err(e) = file.sync_data() {
                        tracing::debug!(error = %e, "background sync failed; the final sync will tell");
                    }
                    state = lock(pending);
                }
            })
            .ok();
        Self { shared, thread }
    }

    /// Records that `bytes` more were written.
    fn wrote(&self, bytes: u64) {
        let (pending, wake) = &*self.shared;
        let mut state = lock(pending);
        state.unsynced += bytes;
        if state.unsynced >= WRITE_BEHIND_BYTES {
            wake.notify_one();
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let (pending, wake) = &*self.shared;
        lock(pending).stop = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes a directory's entries (a rename, a new file) survive a crash. Blocking.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What chunking a file produced.
struct Prepared {
    size: u64,
    file_hash: Hash,
    manifest: Vec<Hash>,
    chunks: Vec<Hash>,
}

/// The name of the pack of message `id`'s file (sent) inside the blob directory.
fn pack_name(id: &MessageId) -> String {
    format!("{id}.pack")
}

/// The name of the partly downloaded file of message `id` inside the blob directory.
fn part_name(id: &MessageId) -> String {
    format!("{id}.part")
}

/// Reads `path` once: seals every chunk into the pack file `pack`, writes the manifest blobs
/// into `dir`. The calling thread reads and hashes the plaintext; up to [`MAX_SEAL_THREADS`]
/// threads seal, hash and write chunks, so at most a few chunks are in memory. Blocking.
fn prepare(
    path: &Path,
    dir: &Path,
    pack: &Path,
    cipher: Cipher,
    key: &Key,
    expected_size: u64,
) -> std::io::Result<Prepared> {
    std::fs::create_dir_all(dir)?;
    let mut file = std::fs::File::open(path)?;
    let count = usize::try_from(blob::chunk_count(expected_size))
        .map_err(|_| std::io::Error::other("the file is too large"))?;
    let mut tmp_name = pack.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let out = std::fs::File::create(&tmp)?;
    let behind = WriteBehind::start(out.try_clone()?);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_SEAL_THREADS);
    let hashes: Mutex<Vec<Option<(Hash, blob::PartHash)>>> = Mutex::new(vec![None; count]);
    let failure: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (to_seal, queue) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(workers);
    let queue = Mutex::new(queue);
    let (to_reuse, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(2 * workers + 2);
    let read: std::io::Result<u64> = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                // Workers drain the queue even after a failure, so the reader never blocks.
                let next = lock(&queue).recv();
                let Ok((index, mut buf)) = next else {
                    return;
                };
                if failed.load(Ordering::Relaxed) {
                    continue;
                }
                let part = blob::part_hash(expected_size, index, &buf);
                let hash = blob::seal_chunk_in_place(cipher, key, index, &mut buf);
                if let Err(e) = out.write_all_at(&buf, index * PACK_STRIDE) {
                    failed.store(true, Ordering::Relaxed);
                    lock(&failure).get_or_insert(e);
                    continue;
                }
                behind.wrote(buf.len() as u64);
                if let Some(slot) = lock(&hashes).get_mut(index as usize) {
                    *slot = Some((hash, part));
                }
                let _ = to_reuse.try_send(buf);
            });
        }
        let mut size = 0u64;
        let mut index = 0u64;
        let result = loop {
            if failed.load(Ordering::Relaxed) {
                break Ok(size);
            }
            let mut buf = spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK_BYTES + TAG_BYTES));
            buf.clear();
            buf.resize(CHUNK_BYTES, 0);
            let n = match read_full(&mut file, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                break Ok(size);
            }
            buf.truncate(n);
            size += n as u64;
            if index as usize >= count {
                // Grew since its size was read: the size check below refuses it.
                break Ok(size);
            }
            if to_seal.send((index, buf)).is_err() {
                break Err(std::io::Error::other("the sealing threads stopped"));
            }
            index += 1;
            if n < CHUNK_BYTES {
                break Ok(size);
            }
        };
        drop(to_seal);
        result
    });
    let outcome = (|| {
        let size = read?;
        if let Some(e) = lock(&failure).take() {
            return Err(e);
        }
        if size != expected_size {
            return Err(std::io::Error::other(format!(
                "the file changed while it was read ({expected_size} bytes, then {size})"
            )));
        }
        let (chunks, parts): (Vec<Hash>, Vec<blob::PartHash>) = std::mem::take(&mut *lock(&hashes))
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| std::io::Error::other("a chunk was not sealed"))?
            .into_iter()
            .unzip();
        let file_hash = blob::file_hash(size, &parts)
            .ok_or_else(|| std::io::Error::other("a chunk was not hashed"))?;
        drop(behind);
        // The message that names these chunks is committed next: they must be on disk first.
        out.sync_data()?;
        drop(out);
        std::fs::rename(&tmp, pack)?;
        Ok((chunks, file_hash))
    })();
    let (chunks, file_hash) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let mut manifest = Vec::new();
    for (bytes, hash) in blob::manifest_blobs(&chunks) {
        write_blob(dir, &hash, &bytes)?;
        std::fs::File::open(dir.join(hash.to_hex()))?.sync_data()?;
        manifest.push(hash);
    }
    // The pack's and the manifest blobs' names.
    sync_dir(dir)?;
    Ok(Prepared {
        size: expected_size,
        file_hash,
        manifest,
        chunks,
    })
}

/// Reads sealed chunk `index` (of `len` bytes) from a pack file. Blocking.
fn read_packed(pack: &Path, index: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(pack)?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, index * PACK_STRIDE)?;
    Ok(buf)
}

/// A PNG thumbnail of at most [`THUMBNAIL_PX`] pixels a side, for PNG and JPEG images. Blocking.
fn thumbnail(path: &Path, mime: &str, size: u64) -> Option<Vec<u8>> {
    if !(mime == "image/png" || mime == "image/jpeg") || size > MAX_THUMBNAIL_SOURCE_BYTES {
        return None;
    }
    let image = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .decode()
        .ok()?;
    let small = image.thumbnail(THUMBNAIL_PX, THUMBNAIL_PX);
    let mut out = std::io::Cursor::new(Vec::new());
    small.write_to(&mut out, image::ImageFormat::Png).ok()?;
    let out = out.into_inner();
    (out.len() <= blob::MAX_THUMBNAIL_BYTES).then_some(out)
}

/// The chunk hashes of a file whose manifest blobs are in `dir`. Blocking.
fn read_manifest(dir: &Path, file: &FileRef) -> Result<Vec<Hash>, TransferError> {
    let mut chunks = Vec::new();
    for (part, hash) in file.manifest.iter().enumerate() {
        let bytes = std::fs::read(dir.join(hash.to_hex())).map_err(local)?;
        blob::verify(hash, &bytes).map_err(local)?;
        chunks.extend(blob::parse_manifest(file.size, part, &bytes).map_err(local)?);
    }
    Ok(chunks)
}

/// Whether `c` is an invisible formatting character: bidirectional controls (which can make
/// `evil\u{202E}gpj.exe` show as `evilexe.jpg`), zero-width characters and other format
/// controls.
fn is_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// The name a received file gets on disk: a sender's name with control and invisible format
/// characters replaced by `_` (the message keeps the name as sent).
fn local_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_control() || is_format_char(c) || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if name.is_empty() || name == "." || name == ".." {
        "file".into()
    } else {
        name
    }
}

/// The `i`-th name tried for `name`: `name` itself, then `stem (i).ext`, the stem cut (on a
/// character boundary) so that the whole stays within [`blob::MAX_NAME_BYTES`].
fn numbered_name(name: &str, i: u32) -> String {
    if i == 0 {
        return name.to_owned();
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && e.len() < 32 => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    let suffix = format!(" ({i}){ext}");
    let mut room = blob::MAX_NAME_BYTES.saturating_sub(suffix.len());
    while room > 0 && !stem.is_char_boundary(room.min(stem.len())) {
        room -= 1;
    }
    let stem = stem.get(..room.min(stem.len())).unwrap_or_default();
    format!("{stem}{suffix}")
}

/// Most names tried in one directory before giving up.
const MAX_NAME_TRIES: u32 = 10_000;

/// Puts `from` into `dir` as `name`, or `name (1)`, ...: moved (`keep` false) or copied. It
/// never replaces a file: each name is claimed atomically (a hard link, or a file created
/// exclusively for a copy), so a file that appears there after any check stays as it is.
/// Blocking.
fn place_file(from: &Path, dir: &Path, name: &str, keep: bool) -> std::io::Result<PathBuf> {
    use std::io::ErrorKind;
    for i in 0..MAX_NAME_TRIES {
        let to = dir.join(numbered_name(name, i));
        if !keep {
            match std::fs::hard_link(from, &to) {
                Ok(()) => {
                    std::fs::remove_file(from)?;
                    return Ok(to);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                // Another file system, or one without hard links: copy instead.
                Err(_) => {}
            }
        }
        let mut out = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
        {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let copied = std::fs::File::open(from)
            .and_then(|mut input| std::io::copy(&mut input, &mut out))
            .and_then(|_| out.sync_all());
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&to);
            return Err(e);
        }
        if !keep {
            std::fs::remove_file(from)?;
        }
        return Ok(to);
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        format!("{MAX_NAME_TRIES} files named like {name:?} already exist"),
    ))
}

/// Which chunks of a partly downloaded file are already in `part`: each is sealed again and
/// compared with its hash in the manifest (a hole or a torn write does not match). Blocking.
fn held_chunks(
    part: &std::fs::File,
    file: &FileRef,
    chunks: &[Hash],
) -> std::io::Result<Vec<bool>> {
    let len = part.metadata()?.len();
    let mut held = vec![false; chunks.len()];
    if len == 0 {
        return Ok(held);
    }
    let mut buf = Vec::with_capacity(CHUNK_BYTES + TAG_BYTES);
    for (index, (hash, have)) in chunks.iter().zip(held.iter_mut()).enumerate() {
        let index = index as u64;
        let plain_len = blob::chunk_len(file.size, index);
        let at = index * CHUNK_BYTES as u64;
        if at + plain_len as u64 > len {
            break;
        }
        buf.clear();
        buf.resize(plain_len, 0);
        part.read_exact_at(&mut buf, at)?;
        *have = blob::seal_chunk_in_place(file.cipher, &file.key, index, &mut buf) == *hash;
    }
    Ok(held)
}

/// The whole-file hash of a download, from each chunk's share ([`blob::part_hash`]) computed as
/// the chunk lands, in whatever order chunks arrive.
struct PartHashes {
    size: u64,
    parts: Vec<Option<blob::PartHash>>,
}

impl PartHashes {
    /// Hashes the chunks already `held` in `part` (a resumed download). Blocking.
    fn new(part: &std::fs::File, size: u64, held: &[bool]) -> std::io::Result<Self> {
        let mut buf = Vec::new();
        let mut parts = vec![None; held.len()];
        for (index, (slot, held)) in parts.iter_mut().zip(held).enumerate() {
            if *held {
                let index = index as u64;
                buf.resize(blob::chunk_len(size, index), 0);
                part.read_exact_at(&mut buf, index * CHUNK_BYTES as u64)?;
                *slot = Some(blob::part_hash(size, index, &buf));
            }
        }
        Ok(Self { size, parts })
    }

    /// Records chunk `index`'s share.
    fn add(&mut self, index: u64, part: blob::PartHash) {
        if let Some(slot) = self.parts.get_mut(index as usize) {
            *slot = Some(part);
        }
    }

    /// The whole-file hash, once every chunk is in.
    fn finish(&self) -> Option<Hash> {
        let parts: Option<Vec<blob::PartHash>> = self.parts.iter().copied().collect();
        blob::file_hash(self.size, &parts?)
    }
}

/// Finishes a download whose every chunk is in `part_path`: syncs it, checks the whole-file
/// hash (`hashed` while it arrived, or read back now), and only then moves it to
/// `dest_dir/<name>`. A file that does not match is deleted. Blocking.
fn finish_part(
    part: &std::fs::File,
    part_path: &Path,
    file: &FileRef,
    dest_dir: &Path,
    hashed: Option<Hash>,
) -> Result<PathBuf, TransferError> {
    part.sync_data().map_err(local)?;
    let got = match hashed {
        Some(hash) => hash,
        None => {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; HASH_READ_BYTES];
            let mut at = 0u64;
            while at < file.size {
                let n = (file.size - at).min(HASH_READ_BYTES as u64) as usize;
                let Some(slice) = buf.get_mut(..n) else {
                    break;
                };
                part.read_exact_at(slice, at).map_err(local)?;
                hasher.update(slice);
                at += n as u64;
            }
            hasher.finalize().into()
        }
    };
    if got != file.file_hash {
        let _ = std::fs::remove_file(part_path);
        return Err(TransferError::Refused(format!(
            "the file's hash is {got}, the message promised {}",
            file.file_hash
        )));
    }
    std::fs::create_dir_all(dest_dir).map_err(local)?;
    place_file(part_path, dest_dir, &local_name(&file.name), false).map_err(local)
}

/// Where blobs of a file can be had.
#[derive(Debug, Clone)]
struct Source {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
}

impl Node {
    fn blobs_dir(&self) -> PathBuf {
        self.config().home.join(BLOBS_DIR)
    }

    fn transfer_lock(&self, id: MessageId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.media().locks).entry(id).or_default().clone()
    }

    fn record(&self, id: &MessageId) -> Result<Record, NodeError> {
        self.store()
            .attachment::<Record>(id)?
            .ok_or_else(|| NodeError::UnknownMessage(format!("{id} (no file attached)")))
    }

    /// The files of message `id` that go when it expires ([`crate::features::timers`]): the manifest
    /// blobs, the sent pack, the partial download, and a received file; never a file the user
    /// sent from. Its chunks leave the index of packed chunks at once.
    pub(crate) fn expired_files(&self, id: &MessageId) -> Vec<PathBuf> {
        let Ok(Some(record)) = self.store().attachment::<Record>(id) else {
            return Vec::new();
        };
        lock(&self.media().packed).retain(|_, p| p.id != *id);
        let blobs = self.blobs_dir();
        let mut paths = vec![blobs.join(pack_name(id)), blobs.join(part_name(id))];
        paths.extend(record.file.manifest.iter().map(|h| blobs.join(h.to_hex())));
        if record.direction == Direction::In {
            paths.extend(record.path.map(PathBuf::from));
        }
        paths
    }

    /// The attachment of message `id`, if it has one.
    pub fn attachment(&self, id: &MessageId) -> Option<AttachmentView> {
        self.store()
            .attachment::<Record>(id)
            .ok()
            .flatten()
            .map(|r| AttachmentView::from(&r))
    }

    /// Fills in the `attachment` of every message view that has one.
    pub(crate) fn with_attachments(
        &self,
        mut views: Vec<crate::core::MessageView>,
    ) -> Vec<crate::core::MessageView> {
        for view in &mut views {
            if let Ok(id) = view.id.parse::<MessageId>() {
                view.attachment = self.attachment(&id);
            }
        }
        views
    }

    /// Transfer counters.
    pub fn media_stats(&self) -> Stats {
        Stats {
            refused_blobs: self.media().refused.load(Ordering::Relaxed),
            fetched_blobs: self.media().fetched.load(Ordering::Relaxed),
        }
    }

    /// Records where the chunks of a file this node sends are (chunk `i` of message `id`'s pack).
    fn add_pack(&self, id: MessageId, chunks: &[Hash], size: u64) {
        let mut packed = lock(&self.media().packed);
        for (index, hash) in chunks.iter().enumerate() {
            let index = index as u64;
            packed.insert(
                *hash,
                Packed {
                    id,
                    index,
                    len: blob::chunk_len(size, index) + TAG_BYTES,
                },
            );
        }
    }

    /// Fills the index of packed chunks from the files sent before this start (once).
    async fn load_packs(&self) {
        self.media()
            .packs_loaded
            .get_or_init(|| async {
                let records = match self.store().attachments::<Record>() {
                    Ok(records) => records,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read attachments");
                        return;
                    }
                };
                let dir = self.blobs_dir();
                let found = tokio::task::spawn_blocking(move || {
                    let mut found = Vec::new();
                    for (id, record) in records {
                        if record.direction != Direction::Out {
                            continue;
                        }
                        // Its pack, or (uploaded) its source file sealed again on demand.
                        match read_manifest(&dir, &record.file) {
                            Ok(chunks) => found.push((id, chunks, record.file.size)),
                            Err(e) => {
                                tracing::warn!(%id, error = %e, "cannot read a sent file's manifest")
                            }
                        }
                    }
                    found
                })
                .await
                .unwrap_or_default();
                for (id, chunks, size) in found {
                    self.add_pack(id, &chunks, size);
                }
            })
            .await;
    }

    /// A blob of this node's own: a chunk from a pack, or a blob file (manifests).
    async fn read_own_blob(&self, hash: &Hash) -> std::io::Result<Vec<u8>> {
        self.load_packs().await;
        let packed = lock(&self.media().packed).get(hash).cloned();
        let Some(p) = packed else {
            return tokio::fs::read(self.blobs_dir().join(hash.to_hex())).await;
        };
        let (pack, index, len) = (self.blobs_dir().join(pack_name(&p.id)), p.index, p.len);
        match tokio::task::spawn_blocking(move || read_packed(&pack, index, len))
            .await
            .map_err(std::io::Error::other)?
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.reseal(&p, *hash).await,
            read => read,
        }
    }

    /// Chunk `p.index` of a sent file whose pack was dropped after its upload: read from the
    /// file the user sent and sealed again (sealing is deterministic: same key, same nonce). A
    /// file that moved or changed since is reported as not found; the relays still have it.
    async fn reseal(&self, p: &Packed, hash: Hash) -> std::io::Result<Vec<u8>> {
        let gone = |why: &str| std::io::Error::new(std::io::ErrorKind::NotFound, why.to_owned());
        let record = self.record(&p.id).map_err(|e| gone(&e.to_string()))?;
        let source = record
            .path
            .ok_or_else(|| gone("the sent file has no path"))?;
        let sent = record.file;
        let (cipher, key, size, index) = (sent.cipher, sent.key, sent.size, p.index);
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&source)?;
            let mut buf = vec![0u8; blob::chunk_len(size, index)];
            file.read_exact_at(&mut buf, index * CHUNK_BYTES as u64)?;
            if blob::seal_chunk_in_place(cipher, &key, index, &mut buf) != hash {
                return Err(gone("the sent file changed since it was sent"));
            }
            Ok(buf)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Sends the file at `path` to a contact, peer id or group. Returns once the message is in
    /// the outbox; the upload to the relays continues in the background.
    pub async fn send_file(&self, to: &str, path: &Path) -> Result<Sent, NodeError> {
        let group = self.plugins().rooms.target(self, to)?;
        let peer = match &group {
            // Refused before the file is read, packed or uploaded.
            Some(room) => {
                self.plugins().rooms.sendable(self, room)?;
                None
            }
            None => Some(self.resolve(to)?),
        };
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(invalid(format!("{} is not a file", path.display())));
        }
        let size = meta.len();
        let max = self.settings().max_file_bytes;
        if size > max {
            return Err(invalid(format!(
                "{} is {size} bytes, above the limit of {max} bytes (max_file_bytes in config.toml); nothing was sent",
                path.display()
            )));
        }
        let relays: Vec<String> = match (&group, &peer) {
            (Some(state), _) => vec![state.relay.clone()],
            (None, Some(peer)) => self.contact_of(peer).map(|c| c.relays).unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        self.check_relays_accept(&relays, size).await?;
        self.plugins().presence.user_active(self);
        let name = safe_name(path);
        let mut head = [0u8; 16];
        let head_len = std::fs::File::open(path)
            .and_then(|mut f| read_full(&mut f, &mut head))
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let mime = sniff_mime(&name, &head[..head_len]);
        let key = Key::random(&mut rand::thread_rng());
        let cipher = Cipher::CURRENT;
        let id = MessageId::random();
        let dir = self.blobs_dir();
        let pack = dir.join(pack_name(&id));
        let started = std::time::Instant::now();
        let (prepared, thumb) = {
            let (source, key, mime, pack) =
                (path.to_owned(), key.clone(), mime.clone(), pack.clone());
            tokio::task::spawn_blocking(move || {
                let prepared = prepare(&source, &dir, &pack, cipher, &key, size)?;
                Ok::<_, std::io::Error>((prepared, thumbnail(&source, &mime, size)))
            })
            .await
            .map_err(|e| invalid(format!("chunking failed: {e}")))?
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?
        };
        tracing::debug!(
            %id,
            bytes = size,
            ms = started.elapsed().as_millis() as u64,
            "file sealed and its pack synced"
        );
        self.add_pack(id, &prepared.chunks, prepared.size);
        let file = FileRef {
            name,
            size: prepared.size,
            mime,
            file_hash: prepared.file_hash,
            key,
            cipher,
            manifest: prepared.manifest,
            thumbnail: thumb,
        };
        let body = Body::File(file.clone());
        body.validate().map_err(invalid)?;
        let record = Record {
            file,
            direction: Direction::Out,
            from: self.peer_id(),
            group: group.as_ref().map(|g| g.group),
            path: Some(
                std::fs::canonicalize(path)
                    .unwrap_or_else(|_| path.to_owned())
                    .to_string_lossy()
                    .into_owned(),
            ),
            uploaded: relays.is_empty(),
            relays,
            sent_waits: false,
        };
        let mut batch = Batch::new();
        batch.put_attachment(&id, &record);
        let sent = match (group, peer) {
            (Some(state), _) => {
                self.send_group_with(state, id, body, "", batch, None)
                    .await?
            }
            (None, Some(peer)) => {
                let message = Outgoing {
                    id,
                    body,
                    text: String::new(),
                    lamport: None,
                    timed: true,
                    batch,
                };
                self.send_to_peer(peer, message, None).await?
            }
            (None, None) => return Err(NodeError::UnknownRecipient(to.to_owned())),
        };
        if !record.uploaded {
            self.queue_job(Job::Upload(id)).await;
        }
        Ok(sent)
    }

    /// Asks each reachable relay whether it takes a file of `size` bytes; a refusal is an error
    /// before any upload. An unreachable relay is not an error: the upload retries later.
    async fn check_relays_accept(&self, relays: &[String], size: u64) -> Result<(), NodeError> {
        for relay in relays {
            let Some((peer, addr)) = parse_relay(relay) else {
                continue;
            };
            let request = blob::Request::Begin {
                req_id: self.req_id(),
                size,
            };
            match self.net().blob(peer, vec![addr], request).await {
                Ok(blob::Response::Rejected {
                    reason: Reject::TooLarge { max },
                    ..
                }) => {
                    return Err(invalid(format!(
                        "the file is {size} bytes; relay {peer} takes files of at most {max} bytes; nothing was sent"
                    )))
                }
                Ok(blob::Response::Rejected {
                    reason: Reject::QuotaExceeded,
                    ..
                }) => {
                    return Err(NodeError::Unavailable(format!(
                        "relay {peer} has no room for {size} more bytes from you; nothing was sent"
                    )))
                }
                Ok(_) => {}
                Err(e) => tracing::info!(relay = %peer, error = %e, "relay unreachable; the upload will retry"),
            }
        }
        Ok(())
    }

    /// Adds the attachment record of an incoming file to `batch` (stored with the message).
    pub(crate) fn put_incoming_file(
        &self,
        batch: &mut Batch,
        envelope: &Envelope,
        file: FileRef,
        group: Option<GroupId>,
    ) {
        let record = Record {
            file,
            direction: Direction::In,
            from: envelope.from,
            group,
            path: None,
            uploaded: false,
            relays: Vec::new(),
            sent_waits: false,
        };
        batch.put_attachment(&envelope.id, &record);
    }

    /// Whether a file of `room` (none for one-to-one) may download by itself: not one of a
    /// group this node has not joined (an invitation) or no longer sends to.
    fn room_downloads(&self, room: Option<&GroupId>) -> bool {
        let rooms = &self.plugins().rooms;
        room.and_then(|g| rooms.room(g))
            .is_none_or(|room| rooms.sendable(self, &room).is_ok())
    }

    /// Called once an incoming file's message is stored: starts the download if it is small.
    pub(crate) async fn file_received(&self, id: MessageId, size: u64) {
        if size <= self.settings().auto_download_max_bytes {
            self.queue_job(Job::Download(id)).await;
        }
    }

    async fn queue_job(&self, job: Job) {
        if self.media().jobs.send(job).await.is_err() {
            tracing::debug!("media loop stopped; the transfer resumes at the next start");
        }
    }

    /// The transfers to resume at start: uploads not finished, and downloads that would have
    /// started by themselves. Decided when the node starts (see [`Feature::tasks`]), before
    /// anything the user does next (accepting an invitation, say) can change the answer.
    fn resume_jobs(&self) -> std::collections::VecDeque<(u32, Job)> {
        let mut waiting = std::collections::VecDeque::new();
        match self.store().attachments::<Record>() {
            Ok(records) => {
                for (id, record) in records {
                    match record.direction {
                        Direction::Out if !record.uploaded => {
                            waiting.push_back((0, Job::Upload(id)))
                        }
                        Direction::In
                            if record.path.is_none()
                                && record.file.size <= self.settings().auto_download_max_bytes
                                && self.auto_download_from(&record.from)
                                && self.room_downloads(record.group.as_ref()) =>
                        {
                            waiting.push_back((0, Job::Download(id)))
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read attachments"),
        }
        waiting
    }

    /// Runs background transfers, starting with `waiting` (those resumed at start).
    async fn media_loop(
        self,
        mut shutdown: Signal,
        mut waiting: std::collections::VecDeque<(u32, Job)>,
    ) {
        let Some(mut queue) = lock(&self.media().queue).take() else {
            return;
        };
        self.load_packs().await;
        let mut work = JoinSet::new();
        // Jobs waiting for their next attempt, soonest first. A job that failed for a reason that
        // may pass (its sources are offline, say) waits here, not in one of the running slots:
        // files that cannot be had right now never hold up the others.
        let mut later: Vec<(tokio::time::Instant, u32, Job)> = Vec::new();
        // When each download was first tried here (its deadline counts from this too).
        let mut first_tried: HashMap<MessageId, u64> = HashMap::new();
        loop {
            let now = tokio::time::Instant::now();
            while let Some(at) = later.iter().position(|(due, ..)| *due <= now) {
                let (_, attempts, job) = later.swap_remove(at);
                waiting.push_back((attempts, job));
            }
            while work.len() < MAX_BACKGROUND_TRANSFERS {
                let Some((attempts, job)) = waiting.pop_front() else {
                    break;
                };
                let first_ms = match job {
                    Job::Download(id) => *first_tried.entry(id).or_insert_with(now_ms),
                    Job::Upload(_) => now_ms(),
                };
                let node = self.clone();
                work.spawn(async move {
                    let again = node.attempt(&job, first_ms).await;
                    (attempts, job, again)
                });
            }
            let next_due = later.iter().map(|(due, ..)| *due).min();
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(done) = work.join_next(), if !work.is_empty() => match done {
                    Ok((attempts, job, true)) => {
                        let delay = retry_delay(attempts);
                        later.push((tokio::time::Instant::now() + delay, attempts + 1, job));
                    }
                    Ok((_, Job::Download(id), false)) => {
                        first_tried.remove(&id);
                    }
                    Ok((_, _, false)) => {}
                    Err(e) => tracing::error!(error = %e, "transfer task failed"),
                },
                _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
                job = queue.recv() => match job {
                    Some(job) => waiting.push_back((0, job)),
                    None => break,
                },
            }
        }
        work.shutdown().await;
    }

    /// One attempt at a background job; returns whether it should be tried again later. A
    /// download first tried at `first_ms` gives up (`failed` event) once its deadline passed.
    async fn attempt(&self, job: &Job, first_ms: u64) -> bool {
        if let Job::Download(id) = *job {
            if let Some(reason) = self.download_given_up(id, first_ms) {
                tracing::warn!(%id, %reason, "download given up");
                self.emit(NodeEvent::Failed {
                    id: id.to_string(),
                    reason,
                });
                return false;
            }
        }
        let (id, outcome, what) = match *job {
            Job::Upload(id) => (id, self.upload(id).await, "upload"),
            Job::Download(id) => (
                id,
                self.download_once(id, None).await.map(|_| ()),
                "download",
            ),
        };
        match outcome {
            Ok(()) => false,
            Err(TransferError::Refused(reason)) => {
                tracing::warn!(%id, %reason, "{what} failed for good");
                self.emit(NodeEvent::Failed {
                    id: id.to_string(),
                    reason,
                });
                false
            }
            Err(e) => {
                tracing::info!(%id, error = %e, "{what} incomplete; will retry");
                true
            }
        }
    }

    /// Why the download of message `id`, first tried at `first_ms`, is given up, if its
    /// deadline (the mailbox TTL after the message was sent, or first tried) has passed.
    fn download_given_up(&self, id: MessageId, first_ms: u64) -> Option<String> {
        let record = self.store().attachment::<Record>(&id).ok().flatten()?;
        let sent_at_ms = self
            .store()
            .message(&record.from, &id)
            .ok()
            .flatten()
            .map_or(first_ms, |m| m.sent_at_ms);
        let ttl = self.config().mailbox_ttl;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        (now_ms() >= crate::core::deadline_ms(sent_at_ms, first_ms, ttl_ms)).then(|| {
            format!(
                "download did not finish within the mailbox TTL ({} s) after the message was sent",
                ttl.as_secs()
            )
        })
    }

    fn progress(&self, id: MessageId, direction: &str, done: u64, total: u64) {
        let key = (id, direction == "upload");
        if !new_progress_step(&mut lock(&self.media().progress_steps), key, done, total) {
            return;
        }
        self.emit(NodeEvent::Progress {
            id: id.to_string(),
            direction: direction.to_owned(),
            done,
            total,
        });
    }

    /// One round of uploading every blob of an outgoing file to every target relay.
    async fn upload(&self, id: MessageId) -> Result<(), TransferError> {
        let transfer = self.transfer_lock(id);
        let _guard = transfer.lock().await;
        let record = self.record(&id).map_err(local)?;
        if record.uploaded {
            return Ok(());
        }
        let dir = self.blobs_dir();
        let chunks = {
            let (dir, file) = (dir.clone(), record.file.clone());
            tokio::task::spawn_blocking(move || read_manifest(&dir, &file))
                .await
                .map_err(local)??
        };
        let size = record.file.size;
        let total = size.saturating_mul(record.relays.len() as u64);
        let done = AtomicU64::new(0);
        // A temporary chat's file: the relays keep its chunks no longer than the message.
        let expires_at_ms = self
            .store()
            .outgoing(&id)
            .ok()
            .flatten()
            .and_then(|m| m.expires_at_ms);
        let mut failures = Vec::new();
        for relay in &record.relays {
            let Some((peer, addr)) = parse_relay(relay) else {
                tracing::warn!(%relay, "skipping a relay address without /p2p/");
                continue;
            };
            let begin = blob::Request::Begin {
                req_id: self.req_id(),
                size,
            };
            match self.net().blob(peer, vec![addr.clone()], begin).await {
                Ok(blob::Response::Ready { .. }) => {}
                Ok(blob::Response::Rejected {
                    reason: Reject::TooLarge { max },
                    ..
                }) => {
                    return Err(TransferError::Refused(format!(
                        "relay {peer} takes files of at most {max} bytes"
                    )))
                }
                Ok(other) => {
                    failures.push(format!("relay {peer}: {other:?}"));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("relay {peer}: {e}"));
                    continue;
                }
            }
            let mut blobs: Vec<(Hash, usize)> =
                record.file.manifest.iter().map(|h| (*h, 0usize)).collect();
            for (i, h) in chunks.iter().enumerate() {
                blobs.push((*h, blob::chunk_len(size, i as u64)));
            }
            let results: Vec<Result<(), String>> = futures::stream::iter(blobs)
                .map(|(hash, plain_len)| {
                    let (addr, done) = (&addr, &done);
                    async move {
                        let bytes = self
                            .read_own_blob(&hash)
                            .await
                            .map_err(|e| format!("blob {hash}: {e}"))?;
                        let request = blob::Request::Put {
                            req_id: self.req_id(),
                            hash,
                            bytes,
                            expires_at_ms,
                        };
                        match self.net().blob(peer, vec![addr.clone()], request).await {
                            Ok(blob::Response::Stored { .. }) => {
                                let now = done.fetch_add(plain_len as u64, Ordering::Relaxed)
                                    + plain_len as u64;
                                if plain_len > 0 {
                                    self.progress(id, "upload", now, total);
                                }
                                Ok(())
                            }
                            Ok(other) => Err(format!("relay {peer}: {other:?}")),
                            Err(e) => Err(format!("relay {peer}: {e}")),
                        }
                    }
                })
                .buffer_unordered(WINDOW)
                .collect()
                .await;
            let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
            if let Some(first) = failed.first() {
                failures.push(format!("{} blobs failed, first: {first}", failed.len()));
            }
        }
        if !failures.is_empty() {
            return Err(TransferError::Incomplete {
                missing: failures.len(),
                total: record.relays.len(),
                detail: failures.join("; "),
            });
        }
        let sent_waits = {
            let _record = lock(&self.media().sent_lock);
            // Read again: a relay may have taken the message meanwhile.
            let mut record = self.record(&id).map_err(local)?;
            record.uploaded = true;
            let mut batch = Batch::new();
            batch.put_attachment(&id, &record);
            self.store().apply(batch).map_err(local)?;
            record.sent_waits
        };
        self.store().flush().await.map_err(local)?;
        tracing::info!(%id, relays = record.relays.len(), "file uploaded");
        if sent_waits {
            self.record_sent(&id, record.group.is_some());
        }
        // The relays hold every chunk now: the pack, a sealed copy of the whole file, is no
        // longer worth its disk space. Chunks asked of this node are sealed again from the file.
        let pack = self.blobs_dir().join(pack_name(&id));
        if let Err(e) = tokio::fs::remove_file(&pack).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%id, error = %e, "cannot delete an uploaded file's pack");
            }
        }
        Ok(())
    }

    /// Where to look for the blobs of `record`: the sender (first if connected), this node's
    /// home relays and the group's relay.
    async fn sources(&self, record: &Record) -> Vec<Source> {
        let mut sender_addrs = Vec::new();
        if let Some(contact) = self.contact_of(&record.from) {
            sender_addrs.extend(contact.addrs.iter().filter_map(|a| a.parse().ok()));
            for relay in &contact.relays {
                if let Ok(relay) = relay.parse::<Multiaddr>() {
                    sender_addrs.push(circuit_addr(&relay, record.from));
                }
            }
        }
        let sender = Source {
            peer: record.from,
            addrs: sender_addrs,
        };
        let mut relays: Vec<Source> = Vec::new();
        let mut seen = HashSet::new();
        let group_relay = record
            .group
            .and_then(|g| self.plugins().rooms.room(&g))
            .map(|s| s.relay);
        for addr in self
            .home_relays()
            .values()
            .map(|a| a.to_string())
            .chain(group_relay)
        {
            if let Some((peer, addr)) = parse_relay(&addr) {
                if seen.insert(peer) {
                    relays.push(Source {
                        peer,
                        addrs: vec![addr],
                    });
                }
            }
        }
        if record.from == self.peer_id() {
            return relays;
        }
        if self.net().is_connected(record.from).await {
            std::iter::once(sender).chain(relays).collect()
        } else {
            relays.into_iter().chain(std::iter::once(sender)).collect()
        }
    }

    /// Gets one blob from the first source that has it and whose bytes match the hash, and
    /// hands it to `accept` on the blocking thread that checked the hash (one hop for both).
    async fn fetch<T: Send + 'static>(
        &self,
        sources: &[Source],
        start: usize,
        hash: Hash,
        mut accept: impl FnOnce(Vec<u8>) -> T + Send + 'static,
    ) -> Result<T, String> {
        let mut why = Vec::new();
        for k in 0..sources.len() {
            let Some(source) = sources.get((start + k) % sources.len()) else {
                continue;
            };
            let request = blob::Request::Get {
                req_id: self.req_id(),
                hash,
            };
            match self
                .net()
                .blob(source.peer, source.addrs.clone(), request)
                .await
            {
                Ok(blob::Response::Blob { bytes, .. }) => {
                    // Hashing 256 KiB would hold up the async workers that drive the other
                    // streams. A blob that does not match hands `accept` back for the next source.
                    let checked =
                        tokio::task::spawn_blocking(move || match blob::verify(&hash, &bytes) {
                            Ok(()) => Ok(accept(bytes)),
                            Err(e) => Err((accept, e)),
                        });
                    match checked.await {
                        Ok(Ok(accepted)) => return Ok(accepted),
                        Err(e) => return Err(e.to_string()),
                        Ok(Err((back, e))) => {
                            accept = back;
                            self.media().refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(source = %source.peer, %hash, error = %e, "refusing a blob that does not match its hash; asking elsewhere");
                            why.push(format!("{}: bad blob", source.peer));
                        }
                    }
                }
                Ok(blob::Response::NotFound { .. }) => {
                    why.push(format!("{}: not found", source.peer))
                }
                Ok(other) => why.push(format!("{}: {other:?}", source.peer)),
                Err(e) => why.push(format!("{}: {e}", source.peer)),
            }
        }
        Err(if why.is_empty() {
            "no source".into()
        } else {
            why.join(", ")
        })
    }

    /// Fetches the blobs in `wanted` (manifest blobs) that are not on disk yet, `WINDOW` at a
    /// time, and writes them to the blob directory.
    async fn fetch_missing(
        &self,
        id: MessageId,
        sources: &[Source],
        wanted: Vec<(Hash, u64)>,
        done: &AtomicU64,
        total: u64,
    ) -> Result<(), TransferError> {
        let dir = self.blobs_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(local)?;
        let count = wanted.len();
        let mut missing = Vec::new();
        for (hash, plain_len) in wanted {
            if tokio::fs::try_exists(dir.join(hash.to_hex()))
                .await
                .unwrap_or(false)
            {
                done.fetch_add(plain_len, Ordering::Relaxed);
            } else {
                missing.push((hash, plain_len));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        self.progress(id, "download", done.load(Ordering::Relaxed), total);
        let failed: Vec<String> = futures::stream::iter(missing.into_iter().enumerate())
            .map(|(n, (hash, plain_len))| {
                let dir = dir.clone();
                async move {
                    self.fetch(sources, n, hash, move |bytes| {
                        write_blob(&dir, &hash, &bytes)
                    })
                    .await?
                    .map_err(|e| e.to_string())?;
                    self.media().fetched.fetch_add(1, Ordering::Relaxed);
                    let now = done.fetch_add(plain_len, Ordering::Relaxed) + plain_len;
                    if plain_len > 0 {
                        self.progress(id, "download", now, total);
                    }
                    Ok::<(), String>(())
                }
            })
            .buffer_unordered(WINDOW)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(TransferError::Incomplete {
                missing: failed.len(),
                total: count,
                detail: first.clone(),
            }),
        }
    }

    /// One round of downloading an incoming file; returns where it is.
    async fn download_once(
        &self,
        id: MessageId,
        to: Option<&Path>,
    ) -> Result<PathBuf, TransferError> {
        let lock = self.transfer_lock(id);
        let _guard = lock.lock().await;
        let mut record = self.record(&id).map_err(local)?;
        if let Some(path) = &record.path {
            let path = PathBuf::from(path);
            return match to {
                Some(dir) if path.parent() != Some(dir) => {
                    let (path, dir, name) =
                        (path.clone(), dir.to_owned(), record.file.name.clone());
                    tokio::task::spawn_blocking(move || {
                        std::fs::create_dir_all(&dir)?;
                        place_file(&path, &dir, &local_name(&name), true)
                    })
                    .await
                    .map_err(local)?
                    .map_err(local)
                }
                _ => Ok(path),
            };
        }
        let sources = self.sources(&record).await;
        if sources.is_empty() {
            return Err(TransferError::Incomplete {
                missing: 1,
                total: 1,
                detail: "no source: the sender is unknown and there is no relay".into(),
            });
        }
        let size = record.file.size;
        let done = AtomicU64::new(0);
        let manifest = record.file.manifest.iter().map(|h| (*h, 0)).collect();
        self.fetch_missing(id, &sources, manifest, &done, size)
            .await?;
        let dir = self.blobs_dir();
        let chunks = {
            let (dir, file) = (dir.clone(), record.file.clone());
            tokio::task::spawn_blocking(move || read_manifest(&dir, &file))
                .await
                .map_err(local)?
        };
        let chunks = match chunks {
            Ok(chunks) => chunks,
            Err(e) => {
                // A manifest that hashes right but does not parse: the sender built it wrong.
                return Err(TransferError::Refused(format!("bad manifest: {e}")));
            }
        };
        let part_path = dir.join(part_name(&id));
        let (part, held) = {
            let (part_path, file, chunks) =
                (part_path.clone(), record.file.clone(), chunks.clone());
            tokio::task::spawn_blocking(move || {
                let part = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&part_path)?;
                let held = held_chunks(&part, &file, &chunks)?;
                part.set_len(file.size)?;
                Ok::<_, std::io::Error>((Arc::new(part), held))
            })
            .await
            .map_err(local)?
            .map_err(local)?
        };
        let behind = Arc::new(WriteBehind::start(part.try_clone().map_err(local)?));
        let hashed = self
            .fetch_chunks(id, &sources, &record.file, &chunks, held, (&part, &behind))
            .await?;
        let dest_dir = to
            .map(Path::to_owned)
            .unwrap_or_else(|| self.config().home.join(FILES_DIR));
        let path = {
            let file = record.file.clone();
            tokio::task::spawn_blocking(move || {
                drop(behind);
                finish_part(&part, &part_path, &file, &dest_dir, hashed)
            })
            .await
            .map_err(local)??
        };
        record.path = Some(path.to_string_lossy().into_owned());
        let mut batch = Batch::new();
        batch.put_attachment(&id, &record);
        self.store().commit(batch).await.map_err(local)?;
        self.progress(id, "download", size, size);
        // The file is here: the manifest blobs are no longer needed.
        tokio::task::spawn_blocking(move || {
            for hash in &record.file.manifest {
                let _ = std::fs::remove_file(dir.join(hash.to_hex()));
            }
        })
        .await
        .map_err(local)?;
        tracing::info!(%id, path = %path.display(), "file downloaded");
        Ok(path)
    }

    /// Fetches the chunks of `file` not `held` yet, `WINDOW` at a time: each is checked against
    /// its hash, opened, and its plaintext written at its place in `part` (synced behind the
    /// writes by `behind`). Returns the whole-file hash, computed on the way.
    async fn fetch_chunks(
        &self,
        id: MessageId,
        sources: &[Source],
        file: &FileRef,
        chunks: &[Hash],
        held: Vec<bool>,
        (part, behind): (&Arc<std::fs::File>, &Arc<WriteBehind>),
    ) -> Result<Option<Hash>, TransferError> {
        let size = file.size;
        let mut held_bytes = 0u64;
        let mut missing = Vec::new();
        for (index, (hash, have)) in chunks.iter().zip(&held).enumerate() {
            let index = index as u64;
            if *have {
                held_bytes += blob::chunk_len(size, index) as u64;
            } else {
                missing.push((index, *hash));
            }
        }
        self.progress(id, "download", held_bytes, size);
        let hashes = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || PartHashes::new(&part, size, &held))
                .await
                .map_err(local)?
                .map_err(local)?
        };
        let hashes = Arc::new(Mutex::new(hashes));
        let hashed = || lock(&hashes).finish();
        if missing.is_empty() {
            return Ok(hashed());
        }
        let count = missing.len();
        let done = AtomicU64::new(held_bytes);
        let failures: Vec<TransferError> = futures::stream::iter(missing.into_iter().enumerate())
            .map(|(n, (index, hash))| {
                let (part, key, done) = (part.clone(), file.key.clone(), &done);
                let cipher = file.cipher;
                let behind = behind.clone();
                let hashes = hashes.clone();
                async move {
                    // Checked, opened, written and hashed on one blocking thread.
                    let accept = move |mut bytes: Vec<u8>| {
                        blob::open_chunk_in_place(cipher, &key, size, index, &mut bytes).map_err(
                            |e| {
                                TransferError::Refused(format!(
                                "chunk {index} ({hash}) matches the manifest but does not open: {e}"
                            ))
                            },
                        )?;
                        part.write_all_at(&bytes, index * CHUNK_BYTES as u64)
                            .map_err(local)?;
                        behind.wrote(bytes.len() as u64);
                        let share = blob::part_hash(size, index, &bytes);
                        lock(&hashes).add(index, share);
                        Ok::<(), TransferError>(())
                    };
                    self.fetch(sources, n, hash, accept)
                        .await
                        .map_err(|detail| TransferError::Incomplete {
                            missing: 1,
                            total: count,
                            detail,
                        })??;
                    self.media().fetched.fetch_add(1, Ordering::Relaxed);
                    let plain_len = blob::chunk_len(size, index) as u64;
                    let now = done.fetch_add(plain_len, Ordering::Relaxed) + plain_len;
                    self.progress(id, "download", now, size);
                    Ok::<(), TransferError>(())
                }
            })
            .buffer_unordered(WINDOW)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        let mut incomplete = 0;
        let mut first = None;
        for failure in failures {
            match failure {
                TransferError::Incomplete { detail, .. } => {
                    incomplete += 1;
                    first.get_or_insert(detail);
                }
                // A chunk that does not open will not open from any source; a disk error is ours.
                other => return Err(other),
            }
        }
        match first {
            None => Ok(hashed()),
            Some(detail) => Err(TransferError::Incomplete {
                missing: incomplete,
                total: count,
                detail,
            }),
        }
    }

    /// Downloads the file attached to message `id` (into `<home>/files`, or `to`), resuming
    /// from the chunks already here. Returns the attachment with its `path`.
    pub async fn download(&self, id: &str, to: Option<&Path>) -> Result<AttachmentView, NodeError> {
        let parsed: MessageId = id
            .parse()
            .map_err(|e: kith_protocol::ids::ParseIdError| invalid(e))?;
        let record = match self.store().attachment::<Record>(&parsed)? {
            Some(record) => record,
            None if self.status(id).is_ok() => {
                return Err(invalid(format!(
                    "message {id} is a text message: it has no file to download"
                )))
            }
            None => return Err(NodeError::UnknownMessage(id.to_owned())),
        };
        self.plugins().presence.user_active(self);
        let mut last = String::new();
        for round in 0..MANUAL_ROUNDS {
            if round > 0 {
                tokio::time::sleep(retry_delay(round - 1)).await;
            }
            match self.download_once(parsed, to).await {
                Ok(path) => {
                    let mut view = AttachmentView::from(&record);
                    view.path = Some(path.to_string_lossy().into_owned());
                    view.downloaded = true;
                    return Ok(view);
                }
                Err(TransferError::Refused(reason)) => return Err(invalid(reason)),
                Err(TransferError::Local(reason)) => return Err(invalid(reason)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(NodeError::Unavailable(format!(
            "download of {id} incomplete ({last}); run it again to resume"
        )))
    }

    /// Answers a `/kith/blob/1` request from another node: `Get` for blobs held here.
    pub(crate) async fn serve_blob(
        &self,
        peer: PeerId,
        request: Message<blob::Request>,
        channel: ResponseChannel<blob::Response>,
    ) {
        let response = match request {
            Message::Valid(blob::Request::Get { req_id, hash }) => {
                match self.read_own_blob(&hash).await {
                    Ok(bytes) if bytes.len() <= blob::MAX_BLOB_BYTES => {
                        blob::Response::Blob { req_id, bytes }
                    }
                    _ => blob::Response::NotFound { req_id },
                }
            }
            Message::Valid(other) => {
                tracing::warn!(%peer, "refusing a blob upload: nodes only serve their own files");
                blob::Response::Rejected {
                    req_id: other.req_id(),
                    reason: Reject::Malformed,
                }
            }
            Message::Invalid { reason, detail } => {
                self.malformed_from(peer, blob::PROTOCOL, &reason, &detail)
                    .await;
                blob::Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => blob::Response::Rejected {
                req_id: 0,
                reason: Reject::Malformed,
            },
        };
        self.net().respond_blob(channel, response).await;
    }
}

fn parse_relay(addr: &str) -> Option<(PeerId, Multiaddr)> {
    let addr: Multiaddr = addr.parse().ok()?;
    Some((peer_of(&addr)?, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_names_lose_invisible_format_characters() {
        assert_eq!(local_name("evil\u{202E}gpj.exe"), "evil_gpj.exe");
        assert_eq!(local_name("a\u{200B}b\u{2066}c\u{FEFF}"), "a_b_c_");
        assert_eq!(local_name("photo.jpg"), "photo.jpg");
        assert_eq!(local_name(".."), "file");
    }

    #[test]
    fn a_numbered_name_stays_within_the_limit() {
        let long = format!("{}.txt", "é".repeat(200));
        assert!(long.len() > blob::MAX_NAME_BYTES - 5);
        for i in [1, 99, 12_345] {
            let name = numbered_name(&long, i);
            assert!(name.len() <= blob::MAX_NAME_BYTES, "{}", name.len());
            assert!(name.ends_with(&format!(" ({i}).txt")), "{name}");
        }
        assert_eq!(numbered_name("a.b", 2), "a (2).b");
        assert_eq!(numbered_name("noext", 1), "noext (1)");
    }

    #[test]
    fn placing_a_file_never_replaces_one() {
        let dir = tempfile::tempdir().expect("dir");
        let existing = dir.path().join("f.txt");
        std::fs::write(&existing, "mine").expect("write");
        let part = dir.path().join("part");
        std::fs::write(&part, "theirs").expect("write");
        let placed = place_file(&part, dir.path(), "f.txt", false).expect("placed");
        assert_eq!(placed, dir.path().join("f (1).txt"));
        assert_eq!(std::fs::read_to_string(&existing).expect("read"), "mine");
        assert_eq!(std::fs::read_to_string(&placed).expect("read"), "theirs");
        assert!(!part.exists());
        let copy = place_file(&placed, dir.path(), "f.txt", true).expect("copied");
        assert_eq!(copy, dir.path().join("f (2).txt"));
        assert!(placed.exists());
    }

    #[test]
    fn mime_by_magic_then_extension() {
        assert_eq!(sniff_mime("x.bin", b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff_mime("x", &[0xff, 0xd8, 0xff, 0xe0]), "image/jpeg");
        assert_eq!(sniff_mime("clip.MP4", b"...."), "video/mp4");
        assert_eq!(sniff_mime("notes", b"hello"), "application/octet-stream");
    }

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name(Path::new("/tmp/a b.png")), "a b.png");
        assert_eq!(safe_name(Path::new("/")), "file");
        assert_eq!(safe_name(Path::new("x\ny")), "x_y");
    }

    #[test]
    fn prepare_then_assemble_round_trips_resumes_and_refuses_a_bad_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("data.bin");
        let data: Vec<u8> = (0..(CHUNK_BYTES * 5 + 1000))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&src, &data).expect("write");
        let blobs = dir.path().join("blobs");
        let pack = blobs.join("m.pack");
        let key = Key([3u8; 32]);
        let cipher = Cipher::CURRENT;
        let prepared =
            prepare(&src, &blobs, &pack, cipher, &key, data.len() as u64).expect("prepare");
        let file = FileRef {
            name: "data.bin".into(),
            size: prepared.size,
            mime: "application/octet-stream".into(),
            file_hash: prepared.file_hash,
            key,
            cipher,
            manifest: prepared.manifest,
            thumbnail: None,
        };
        file.validate().expect("valid");
        assert_eq!(file.file_hash, Hash::of(&data));
        let chunks = read_manifest(&blobs, &file).expect("manifest");
        assert_eq!(chunks, prepared.chunks);
        assert_eq!(chunks.len(), 6);
        // Every packed chunk is the sealed chunk its hash names.
        let sealed: Vec<Vec<u8>> = (0..chunks.len() as u64)
            .map(|i| {
                let bytes =
                    read_packed(&pack, i, blob::chunk_len(file.size, i) + TAG_BYTES).expect("read");
                blob::verify(&chunks[i as usize], &bytes).expect("hash");
                bytes
            })
            .collect();
        // A download that got chunks 0, 2 and 5 before it stopped.
        let part_path = blobs.join("m.part");
        let part = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .expect("part");
        part.set_len(file.size).expect("len");
        let put = |i: usize| {
            let mut bytes = sealed[i].clone();
            blob::open_chunk_in_place(file.cipher, &file.key, file.size, i as u64, &mut bytes)
                .expect("opens");
            part.write_all_at(&bytes, (i * CHUNK_BYTES) as u64)
                .expect("write");
        };
        for i in [0, 2, 5] {
            put(i);
        }
        assert_eq!(
            held_chunks(&part, &file, &chunks).expect("scan"),
            [true, false, true, false, false, true]
        );
        for i in [1, 3, 4] {
            put(i);
        }
        let out = dir.path().join("out");
        // The hash assembled from chunks landing out of order, some already held at the start.
        let held = [false, true, false, false, true, false];
        let mut hashes = PartHashes::new(&part, file.size, &held).expect("held chunks");
        for i in [2, 0, 5, 3] {
            let mut plain = vec![0u8; blob::chunk_len(file.size, i)];
            part.read_exact_at(&mut plain, i * CHUNK_BYTES as u64)
                .expect("read");
            assert_eq!(hashes.finish(), None);
            hashes.add(i, blob::part_hash(file.size, i, &plain));
        }
        assert_eq!(hashes.finish(), Some(file.file_hash));
        let path = finish_part(&part, &part_path, &file, &out, None).expect("finish");
        assert_eq!(std::fs::read(&path).expect("read"), data);
        assert!(!part_path.exists());
        // A file whose whole hash does not match is refused and deleted, never moved into place.
        std::fs::write(&part_path, &data[1..]).expect("write");
        let part = std::fs::File::open(&part_path).expect("open");
        let short = FileRef {
            size: data.len() as u64 - 1,
            ..file.clone()
        };
        assert!(matches!(
            finish_part(&part, &part_path, &short, &out, None),
            Err(TransferError::Refused(_))
        ));
        assert!(!part_path.exists());
        assert_eq!(std::fs::read_dir(&out).expect("out").count(), 1);
    }

    #[test]
    fn thumbnails_are_small_pngs() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("big.png");
        image::RgbImage::from_fn(400, 200, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .save(&src)
            .expect("save");
        let size = std::fs::metadata(&src).expect("meta").len();
        let thumb = thumbnail(&src, "image/png", size).expect("a thumbnail");
        let back = image::load_from_memory(&thumb).expect("decodes");
        assert!(back.width() <= THUMBNAIL_PX && back.height() <= THUMBNAIL_PX);
        assert!(thumbnail(&src, "application/octet-stream", size).is_none());
    }
}

// ---- plugged into the core ------------------------------------------------------------------

impl Node {
    /// The file feature's state.
    pub(crate) fn media(&self) -> &State {
        self.feature::<State>()
            .expect("the file feature is plugged in by `start`")
    }
}

impl Feature for State {
    fn tasks(&self, node: &Node, shutdown: &Signal) -> Vec<BoxFuture<'static, ()>> {
        let resume = node.resume_jobs();
        vec![Box::pin(node.clone().media_loop(shutdown.clone(), resume))]
    }

    fn serve(
        &self,
        node: &Node,
        event: Box<net::Event>,
    ) -> Result<BoxFuture<'static, ()>, Box<net::Event>> {
        match *event {
            net::Event::InboundBlob {
                peer,
                request,
                channel,
            } => {
                let node = node.clone();
                Ok(Box::pin(async move {
                    node.serve_blob(peer, request, channel).await;
                }))
            }
            other => Err(Box::new(other)),
        }
    }

    fn original_body(&self, node: &Node, id: &MessageId) -> Result<Option<Body>, NodeError> {
        Ok(node
            .store()
            .attachment::<Record>(id)?
            .map(|record| Body::File(record.file)))
    }
}

impl Files for State {
    fn holds_sent(&self, node: &Node, id: &MessageId) -> bool {
        let _record = lock(&self.sent_lock);
        let Ok(Some(mut record)) = node.store().attachment::<Record>(id) else {
            return false;
        };
        if record.direction != Direction::Out || record.uploaded {
            return false;
        }
        record.sent_waits = true;
        let mut batch = Batch::new();
        batch.put_attachment(id, &record);
        if let Err(e) = node.store().apply(batch) {
            // The tick then shows at once, as before uploads held it.
            tracing::error!(%id, error = %e, "cannot record that a sent tick waits for the upload");
            return false;
        }
        true
    }

    fn with_attachments(&self, node: &Node, views: Vec<MessageView>) -> Vec<MessageView> {
        node.with_attachments(views)
    }

    fn put_incoming(
        &self,
        node: &Node,
        batch: &mut Batch,
        envelope: &Envelope,
        file: FileRef,
        room: Option<GroupId>,
    ) {
        node.put_incoming_file(batch, envelope, file, room);
    }

    fn received<'a>(&'a self, node: &'a Node, id: MessageId, size: u64) -> BoxFuture<'a, ()> {
        Box::pin(node.file_received(id, size))
    }
}
