//! Files as content-addressed, encrypted chunks, and `/kith/blob/1`, the protocol that moves them.
//!
//! A file is cut into [`CHUNK_BYTES`] plaintext chunks. Chunk `i` is sealed with the file's
//! [`Cipher`] (AES-256-GCM; ChaCha20-Poly1305 for files from earlier releases) under a random
//! per-file [`Key`], with the nonce `0u32 ‖ i as u64` (a fresh key per file makes a counter nonce
//! safe) and `i` as associated data; the sealed chunk is named by its BLAKE3
//! [`Hash`]. The list of chunk hashes (the *manifest*, 32 bytes per chunk) is itself cut into
//! blobs of at most [`MANIFEST_HASHES_PER_BLOB`] hashes, each named by its BLAKE3 hash. The signed
//! message carries a [`FileRef`]: name, size, type, the plaintext's BLAKE3 hash, the key and the
//! manifest blobs' hashes. Relays store sealed chunks and manifests but never see the key.
//!
//! Flow on `/kith/blob/1`: a sender asks a relay [`Request::Begin`] with the file size (refused
//! early when too large or over quota), then [`Request::Put`]s each blob (the relay checks the
//! hash before storing, and answers [`Response::Stored`] once it is on disk). A recipient
//! [`Request::Get`]s each blob it does not hold yet from the sender directly or from a relay
//! ([`Response::Blob`] or [`Response::NotFound`]) and checks the hash before writing it.
//!
//! Everything here is pure: no files, no sockets, no clock.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};

use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/blob/1";

/// Plaintext bytes per chunk (the last chunk of a file may be shorter).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Bytes the AEAD adds to each chunk (its tag; both ciphers have 16-byte tags).
pub const TAG_BYTES: usize = 16;

/// Largest blob on the wire: a sealed chunk, or a manifest blob.
pub const MAX_BLOB_BYTES: usize = CHUNK_BYTES + TAG_BYTES;

/// Chunk hashes per manifest blob: one manifest blob covers 2 GiB of file.
pub const MANIFEST_HASHES_PER_BLOB: usize = CHUNK_BYTES / HASH_BYTES;

/// Length of a BLAKE3 hash.
pub const HASH_BYTES: usize = 32;

/// Largest `/kith/blob/1` frame: one blob plus request framing.
pub const MAX_FRAME_BYTES: usize = MAX_BLOB_BYTES + 1024;

/// Largest file name in a [`FileRef`], in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;

/// Largest media type string in a [`FileRef`].
pub const MAX_MIME_BYTES: usize = 127;

/// Largest thumbnail in a [`FileRef`] (a small PNG or JPEG).
pub const MAX_THUMBNAIL_BYTES: usize = 16 * 1024;

/// Most manifest blobs one file may have (bounded by the envelope's body limit): about 3.6 TiB.
pub const MAX_MANIFEST_BLOBS: usize = 1024;

/// A BLAKE3 hash: the name of a blob, or the hash of a whole plaintext file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(#[serde(with = "serde_bytes")] pub [u8; HASH_BYTES]);

impl Hash {
    /// The BLAKE3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl std::str::FromStr for Hash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|_| ParseHashError)?;
        Ok(Self(bytes.try_into().map_err(|_| ParseHashError)?))
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a blob hash is 64 hex digits")]
pub struct ParseHashError;

/// The AEAD that seals a file's chunks. Both take a 256-bit [`Key`] and add a 16-byte tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    /// ChaCha20-Poly1305 (RFC 8439): files from releases whose references name no cipher.
    #[default]
    Chacha20Poly1305,
    /// AES-256-GCM: what files are sealed with now. Where the CPU has AES instructions (x86-64
    /// AES-NI and VAES, ARMv8 crypto extensions) it seals and opens about three times as fast
    /// as ChaCha20-Poly1305, and chunk crypto is a large part of a transfer's CPU time.
    Aes256Gcm,
}

impl Cipher {
    /// The cipher new files are sealed with.
    pub const CURRENT: Cipher = Cipher::Aes256Gcm;
}

/// A file's 256-bit key. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl Key {
    /// A fresh random key.
    pub fn random(rng: &mut impl rand::RngCore) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self(key)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// A file as the signed message describes it ([`crate::Body::File`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The file's name (no directories), at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type, e.g. `image/png`, at most [`MAX_MIME_BYTES`].
    pub mime: String,
    /// BLAKE3 of the whole plaintext.
    pub file_hash: Hash,
    /// The key every chunk is sealed with.
    pub key: Key,
    /// The cipher every chunk is sealed with (missing in references from earlier releases,
    /// whose files are ChaCha20-Poly1305).
    #[serde(default)]
    pub cipher: Cipher,
    /// The manifest blobs' hashes, in order ([`manifest_blob_count`] of them).
    pub manifest: Vec<Hash>,
    /// A small preview image (PNG), at most [`MAX_THUMBNAIL_BYTES`].
    #[serde(with = "serde_bytes")]
    pub thumbnail: Option<Vec<u8>>,
}

/// Why a [`FileRef`] or a blob is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The name is empty, too long, or holds a path separator or control character.
    #[error("bad file name")]
    BadName,
    /// The media type is too long.
    #[error("media type longer than {MAX_MIME_BYTES} bytes")]
    BadMime,
    /// The thumbnail is too large.
    #[error("thumbnail of {len} bytes exceeds {MAX_THUMBNAIL_BYTES}")]
    ThumbnailTooLarge {
        /// Its length.
        len: usize,
    },
    /// The manifest does not have one hash per [`MANIFEST_HASHES_PER_BLOB`] chunks.
    #[error("{got} manifest blobs for a file that needs {want}")]
    BadManifest {
        /// How many the reference names.
        got: usize,
        /// How many the size implies.
        want: usize,
    },
    /// A blob does not hash to the name it was asked or offered under.
    #[error("blob does not match its hash {0}")]
    HashMismatch(Hash),
    /// A sealed chunk does not open with the file's key (or has the wrong length).
    #[error("chunk {index} does not decrypt")]
    Decrypt {
        /// The chunk's index.
        index: u64,
    },
}

/// How many chunks a file of `size` bytes has (an empty file has none).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES as u64)
}

/// A chunk's share of its file's whole BLAKE3 hash: the chaining value of the chunk's subtree in
/// BLAKE3's tree (or, for a file of one chunk, the hash itself). Chunks can be hashed in any
/// order and on any thread, and [`file_hash`] assembles the same hash as hashing the file in one
/// pass — no re-reading chunks that arrived out of order.
pub type PartHash = [u8; 32];

/// The share of chunk `index`, whose plaintext is `plain`, in the hash of a file of `size` bytes.
pub fn part_hash(size: u64, index: u64, plain: &[u8]) -> PartHash {
    use blake3::hazmat::HasherExt;
    if chunk_count(size) <= 1 {
        return *blake3::hash(plain).as_bytes();
    }
    // A chunk is 2^18 bytes at an offset that is a multiple of it: a whole subtree of the tree.
    blake3::Hasher::new()
        .set_input_offset(index.saturating_mul(CHUNK_BYTES as u64))
        .update(plain)
        .finalize_non_root()
}

/// The BLAKE3 hash of a file of `size` bytes from every chunk's [`part_hash`], in file order;
/// `None` when `parts` does not have one per chunk.
pub fn file_hash(size: u64, parts: &[PartHash]) -> Option<Hash> {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    /// The chaining value of the subtree over `parts`, which cover `len` bytes.
    fn subtree(parts: &[PartHash], len: u64) -> PartHash {
        match parts {
            [one] => *one,
            _ => {
                let (left, right) = split(parts, len);
                merge_subtrees_non_root(&left, &right, Mode::Hash)
            }
        }
    }
    /// BLAKE3's split: the left subtree is the largest power of two of chunks that leaves
    /// something on the right (for more than one 256 KiB chunk, a whole number of ours).
    fn split(parts: &[PartHash], len: u64) -> (PartHash, PartHash) {
        let left_len = left_subtree_len(len);
        let k = (left_len / CHUNK_BYTES as u64) as usize;
        (
            subtree(&parts[..k], left_len),
            subtree(&parts[k..], len - left_len),
        )
    }
    if parts.len() as u64 != chunk_count(size) {
        return None;
    }
    Some(match parts {
        [] => Hash::of(&[]),
        [one] => Hash(*one),
        _ => {
            let (left, right) = split(parts, size);
            merge_subtrees_root(&left, &right, Mode::Hash).into()
        }
    })
}

/// The plaintext length of chunk `index` of a file of `size` bytes (0 past the end).
pub fn chunk_len(size: u64, index: u64) -> usize {
    let start = index.saturating_mul(CHUNK_BYTES as u64);
    size.saturating_sub(start).min(CHUNK_BYTES as u64) as usize
}

/// How many manifest blobs a file of `size` bytes has (at least one, possibly empty).
pub fn manifest_blob_count(size: u64) -> usize {
    (chunk_count(size).div_ceil(MANIFEST_HASHES_PER_BLOB as u64) as usize).max(1)
}

impl FileRef {
    /// Checks the reference's own limits.
    pub fn validate(&self) -> Result<(), BlobError> {
        let bad_char = |c: char| c == '/' || c == '\\' || c.is_control();
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_BYTES
            || self.name.chars().any(bad_char)
            || self.name == "."
            || self.name == ".."
        {
            return Err(BlobError::BadName);
        }
        if self.mime.len() > MAX_MIME_BYTES {
            return Err(BlobError::BadMime);
        }
        if let Some(thumb) = &self.thumbnail {
            if thumb.len() > MAX_THUMBNAIL_BYTES {
                return Err(BlobError::ThumbnailTooLarge { len: thumb.len() });
            }
        }
        let want = manifest_blob_count(self.size);
        if self.manifest.len() != want || want > MAX_MANIFEST_BLOBS {
            return Err(BlobError::BadManifest {
                got: self.manifest.len(),
                want,
            });
        }
        Ok(())
    }
}

/// The 96-bit nonce of chunk `index`: four zero bytes, then `index` big-endian.
fn nonce_bytes(index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    nonce
}

/// `ring`'s implementation of `cipher` under `key`. `UnboundKey::new` fails only on a key of
/// the wrong length, which a [`Key`] cannot be.
fn aead(cipher: Cipher, key: &Key) -> Result<LessSafeKey, ring::error::Unspecified> {
    let algorithm = match cipher {
        Cipher::Chacha20Poly1305 => &CHACHA20_POLY1305,
        Cipher::Aes256Gcm => &AES_256_GCM,
    };
    UnboundKey::new(algorithm, &key.0).map(LessSafeKey::new)
}

/// Seals plaintext chunk `index` with `key`; returns the sealed bytes and their hash.
pub fn seal_chunk(cipher: Cipher, key: &Key, index: u64, plain: &[u8]) -> (Vec<u8>, Hash) {
    let mut sealed = Vec::with_capacity(plain.len() + TAG_BYTES);
    sealed.extend_from_slice(plain);
    let hash = seal_chunk_in_place(cipher, key, index, &mut sealed);
    (sealed, hash)
}

/// Seals plaintext chunk `index` in `buf` (the tag is appended); returns the sealed chunk's hash.
/// The same bytes as [`seal_chunk`], without a copy.
pub fn seal_chunk_in_place(cipher: Cipher, key: &Key, index: u64, buf: &mut Vec<u8>) -> Hash {
    let nonce = Nonce::assume_unique_for_key(nonce_bytes(index));
    let aad = index.to_be_bytes();
    // Sealing fails only for inputs beyond 2^38 bytes; a chunk is 256 KiB.
    let sealed =
        aead(cipher, key).and_then(|c| c.seal_in_place_separate_tag(nonce, Aad::from(aad), buf));
    if let Ok(tag) = sealed {
        buf.extend_from_slice(tag.as_ref());
    }
    Hash::of(buf)
}

/// Checks that `sealed` hashes to `expected` (do this before writing a received blob).
pub fn verify(expected: &Hash, sealed: &[u8]) -> Result<(), BlobError> {
    if Hash::of(sealed) == *expected {
        Ok(())
    } else {
        Err(BlobError::HashMismatch(*expected))
    }
}

/// Opens sealed chunk `index` of a file of `size` bytes: checks the length, then the AEAD tag.
pub fn open_chunk(
    cipher: Cipher,
    key: &Key,
    size: u64,
    index: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, BlobError> {
    let mut buf = sealed.to_vec();
    open_chunk_in_place(cipher, key, size, index, &mut buf)?;
    Ok(buf)
}

/// Opens sealed chunk `index` of a file of `size` bytes in `buf`, which then holds the
/// plaintext (the tag is removed). On error `buf` holds garbage.
pub fn open_chunk_in_place(
    cipher: Cipher,
    key: &Key,
    size: u64,
    index: u64,
    buf: &mut Vec<u8>,
) -> Result<(), BlobError> {
    let plain_len = chunk_len(size, index);
    if index >= chunk_count(size) || buf.len() != plain_len + TAG_BYTES {
        return Err(BlobError::Decrypt { index });
    }
    let nonce = Nonce::assume_unique_for_key(nonce_bytes(index));
    let aad = index.to_be_bytes();
    aead(cipher, key)
        .and_then(|c| c.open_in_place(nonce, Aad::from(aad), buf).map(|_| ()))
        .map_err(|_| BlobError::Decrypt { index })?;
    buf.truncate(plain_len);
    Ok(())
}

/// Builds the manifest blobs for a list of chunk hashes (in order); returns each with its hash.
pub fn manifest_blobs(chunks: &[Hash]) -> Vec<(Vec<u8>, Hash)> {
    if chunks.is_empty() {
        return vec![(Vec::new(), Hash::of(&[]))];
    }
    chunks
        .chunks(MANIFEST_HASHES_PER_BLOB)
        .map(|part| {
            let bytes: Vec<u8> = part.iter().flat_map(|h| h.0).collect();
            let hash = Hash::of(&bytes);
            (bytes, hash)
        })
        .collect()
}

/// Parses manifest blob `part` of a file of `size` bytes (already checked against its hash):
/// returns the chunk hashes it lists, refusing a blob with the wrong count.
pub fn parse_manifest(size: u64, part: usize, bytes: &[u8]) -> Result<Vec<Hash>, BlobError> {
    let total = chunk_count(size);
    let first = (part as u64).saturating_mul(MANIFEST_HASHES_PER_BLOB as u64);
    let want = total
        .saturating_sub(first)
        .min(MANIFEST_HASHES_PER_BLOB as u64) as usize;
    if bytes.len() != want * HASH_BYTES {
        return Err(BlobError::BadManifest {
            got: bytes.len() / HASH_BYTES,
            want,
        });
    }
    Ok(bytes
        .chunks_exact(HASH_BYTES)
        .map(|c| {
            let mut h = [0u8; HASH_BYTES];
            h.copy_from_slice(c);
            Hash(h)
        })
        .collect())
}

/// A `/kith/blob/1` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Before uploading a file's blobs: may a file of `size` bytes be stored? Lets a relay refuse
    /// an over-limit or over-quota file before a single chunk travels.
    Begin {
        /// Echoed in the response.
        req_id: u64,
        /// The file's size in bytes.
        size: u64,
    },
    /// Store this blob (relays only).
    Put {
        /// Echoed in the response.
        req_id: u64,
        /// Its BLAKE3 hash.
        hash: Hash,
        /// The blob, at most [`MAX_BLOB_BYTES`].
        #[serde(with = "crate::cbor::bytes")]
        bytes: Vec<u8>,
        /// The expiry of the message of a temporary chat the blob belongs to: the relay keeps
        /// it no longer (see [`crate::timer`]) and refuses it once that has passed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_ms: Option<u64>,
    },
    /// Send this blob if you hold it.
    Get {
        /// Echoed in the response.
        req_id: u64,
        /// Its BLAKE3 hash.
        hash: Hash,
    },
}

impl Request {
    /// The request's id.
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Begin { req_id, .. }
            | Request::Put { req_id, .. }
            | Request::Get { req_id, .. } => *req_id,
        }
    }
}

/// A `/kith/blob/1` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// `Begin` accepted: upload away.
    Ready {
        /// The request's id.
        req_id: u64,
    },
    /// The blob is on disk.
    Stored {
        /// The request's id.
        req_id: u64,
    },
    /// The blob asked for.
    Blob {
        /// The request's id.
        req_id: u64,
        /// Its bytes (check them against the hash before use).
        #[serde(with = "crate::cbor::bytes")]
        bytes: Vec<u8>,
    },
    /// Not held here.
    NotFound {
        /// The request's id.
        req_id: u64,
    },
    /// Refused (too large, quota, busy, hash mismatch as `Malformed`...).
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
            Response::Ready { req_id }
            | Response::Stored { req_id }
            | Response::Blob { req_id, .. }
            | Response::NotFound { req_id }
            | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor;

    fn key() -> Key {
        Key([7u8; 32])
    }

    #[test]
    fn chunk_math() {
        let c = CHUNK_BYTES as u64;
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(c), 1);
        assert_eq!(chunk_count(c + 1), 2);
        assert_eq!(chunk_len(c + 1, 0), CHUNK_BYTES);
        assert_eq!(chunk_len(c + 1, 1), 1);
        assert_eq!(chunk_len(c + 1, 2), 0);
        assert_eq!(manifest_blob_count(0), 1);
        assert_eq!(manifest_blob_count(2 << 30), 1);
        assert_eq!(manifest_blob_count((2 << 30) + 1), 2);
    }

    const CIPHERS: [Cipher; 2] = [Cipher::Aes256Gcm, Cipher::Chacha20Poly1305];

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let plain = vec![42u8; 1000];
        let size = 3 * CHUNK_BYTES as u64 + 1000;
        for cipher in CIPHERS {
            let (sealed, hash) = seal_chunk(cipher, &key(), 3, &plain);
            assert_eq!(sealed.len(), 1000 + TAG_BYTES);
            verify(&hash, &sealed).expect("hash matches");
            assert_eq!(
                open_chunk(cipher, &key(), size, 3, &sealed).expect("opens"),
                plain
            );
            // Another index, another key, another cipher, or one flipped bit: refused.
            assert!(open_chunk(cipher, &key(), size, 2, &sealed).is_err());
            assert!(open_chunk(cipher, &Key([8u8; 32]), size, 3, &sealed).is_err());
            let other = CIPHERS.into_iter().find(|c| *c != cipher).expect("two");
            assert!(open_chunk(other, &key(), size, 3, &sealed).is_err());
            let mut bad = sealed.clone();
            bad[10] ^= 1;
            assert_eq!(verify(&hash, &bad), Err(BlobError::HashMismatch(hash)));
            assert!(open_chunk(cipher, &key(), size, 3, &bad).is_err());
        }
    }

    #[test]
    fn a_reference_without_a_cipher_is_chacha_and_new_ones_say_aes() {
        let file = FileRef {
            name: "a.txt".into(),
            size: 1,
            mime: "text/plain".into(),
            file_hash: Hash::of(b"a"),
            key: key(),
            cipher: Cipher::CURRENT,
            manifest: vec![Hash::of(b"m")],
            thumbnail: None,
        };
        let bytes = cbor::encode(&file, 1 << 20).expect("encodes");
        let back: FileRef = cbor::decode(&bytes, 1 << 20).expect("decodes");
        assert_eq!(back.cipher, Cipher::Aes256Gcm);
        // An earlier release's reference: the same fields but no `cipher`.
        #[derive(Serialize)]
        struct Earlier<'a> {
            name: &'a str,
            size: u64,
            mime: &'a str,
            file_hash: Hash,
            key: Key,
            manifest: Vec<Hash>,
            #[serde(with = "serde_bytes")]
            thumbnail: Option<Vec<u8>>,
        }
        let earlier = Earlier {
            name: "a.txt",
            size: 1,
            mime: "text/plain",
            file_hash: Hash::of(b"a"),
            key: key(),
            manifest: vec![Hash::of(b"m")],
            thumbnail: None,
        };
        let bytes = cbor::encode(&earlier, 1 << 20).expect("encodes");
        let back: FileRef = cbor::decode(&bytes, 1 << 20).expect("decodes");
        assert_eq!(back.cipher, Cipher::Chacha20Poly1305);
        assert_eq!(back.key, key());
    }

    /// Chunk 9 of a file under the key `[7; 32]`, plaintext bytes `(31 j + 5) mod 256`, sealed
    /// by an independent implementation (OpenSSL's, through Python's `cryptography`): nonce
    /// `0u32 ‖ 9u64` big-endian, associated data `9u64` big-endian, tag appended. ChaCha20-Poly1305
    /// is RFC 8439's.
    const KNOWN_SEALED_CHUNK_9: &str = "3314595fab5636281723bb1cd2793b3a91a2856d00c6f181f4d72a3c\
        983e691ba6f33d8d2337448ddfe7df9974929605312237deaef53f5926e40cb512207e5b807a7c3d75336e01\
        f394c7357c6d4e862a2d0c9555e5";

    /// The same chunk sealed with AES-256-GCM.
    const KNOWN_AES_SEALED_CHUNK_9: &str =
        "f8f8f7d2ddb4e3f3b0510aaf5f2c736e60a3c0efb68915bacb13ee7\
        4522178fcace8c80bb3ffe4bf9b3984075064598892ccd2be87f538d1fc264e540afe9ff57b56b0e6259d7bb\
        ac057c45078e4de67dab4037a96e3";

    #[test]
    fn sealing_matches_a_known_answer() {
        let plain: Vec<u8> = (0..70u32).map(|j| ((j * 31 + 5) % 256) as u8).collect();
        let size = 9 * CHUNK_BYTES as u64 + 70;
        for (cipher, known) in [
            (Cipher::Chacha20Poly1305, KNOWN_SEALED_CHUNK_9),
            (Cipher::Aes256Gcm, KNOWN_AES_SEALED_CHUNK_9),
        ] {
            let known = hex::decode(known).expect("hex");
            let (sealed, hash) = seal_chunk(cipher, &key(), 9, &plain);
            assert_eq!(sealed, known, "{cipher:?}");
            assert_eq!(hash, Hash::of(&known));
            let opened = open_chunk(cipher, &key(), size, 9, &known).expect("opens");
            assert_eq!(opened, plain, "{cipher:?}");
        }
    }

    #[test]
    fn sealing_is_the_wire_format_of_the_rustcrypto_construction() {
        // The construction chunks were sealed with before `ring`: same key, nonce, associated
        // data and tag position, so chunks sealed by either open with the other.
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{ChaCha20Poly1305, Nonce};
        let rustcrypto = ChaCha20Poly1305::new(&key().0.into());
        let chacha = Cipher::Chacha20Poly1305;
        let size = 10 * CHUNK_BYTES as u64 - 3;
        for index in [0u64, 9] {
            let plain: Vec<u8> = (0..chunk_len(size, index))
                .map(|i| (i % 253) as u8)
                .collect();
            let aad = index.to_be_bytes();
            let nonce = Nonce::from(nonce_bytes(index));
            let mut buf = plain.clone();
            let hash = seal_chunk_in_place(chacha, &key(), index, &mut buf);
            let reference = rustcrypto
                .encrypt(
                    &nonce,
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .expect("seals");
            assert_eq!(buf, reference);
            assert_eq!(
                seal_chunk(chacha, &key(), index, &plain),
                (reference.clone(), hash)
            );
            let opened = rustcrypto
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &buf,
                        aad: &aad,
                    },
                )
                .expect("the old code opens ring's chunk");
            assert_eq!(opened, plain);
            open_chunk_in_place(chacha, &key(), size, index, &mut buf).expect("opens");
            assert_eq!(buf, plain);
        }
        let mut short = vec![0u8; TAG_BYTES - 1];
        assert_eq!(
            open_chunk_in_place(chacha, &key(), size, 9, &mut short),
            Err(BlobError::Decrypt { index: 9 })
        );
    }

    #[test]
    fn manifest_round_trip() {
        let hashes: Vec<Hash> = (0..5u8).map(|i| Hash::of(&[i])).collect();
        let size = 5 * CHUNK_BYTES as u64 - 7;
        let blobs = manifest_blobs(&hashes);
        assert_eq!(blobs.len(), manifest_blob_count(size));
        let (bytes, hash) = &blobs[0];
        verify(hash, bytes).expect("hash");
        assert_eq!(parse_manifest(size, 0, bytes).expect("parses"), hashes);
        assert!(parse_manifest(size + CHUNK_BYTES as u64, 0, bytes).is_err());
    }

    #[test]
    fn file_ref_limits() {
        let good = FileRef {
            name: "cat.png".into(),
            size: 10,
            mime: "image/png".into(),
            file_hash: Hash::of(b"x"),
            key: key(),
            cipher: Cipher::CURRENT,
            manifest: vec![Hash::of(b"m")],
            thumbnail: None,
        };
        good.validate().expect("valid");
        for name in ["", "../etc", "a/b", "..", "a\nb"] {
            let bad = FileRef {
                name: name.into(),
                ..good.clone()
            };
            assert_eq!(bad.validate(), Err(BlobError::BadName), "{name:?}");
        }
        let bad = FileRef {
            manifest: vec![],
            ..good.clone()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_full_put_fits_a_frame() {
        let request = Request::Put {
            req_id: u64::MAX,
            hash: Hash::of(b""),
            bytes: vec![0xff; MAX_BLOB_BYTES],
            expires_at_ms: Some(u64::MAX),
        };
        let bytes = cbor::encode(&request, MAX_FRAME_BYTES).expect("fits");
        let back: Request = cbor::decode(&bytes, MAX_FRAME_BYTES).expect("decodes");
        assert_eq!(back, request);
    }

    #[test]
    fn file_hash_from_parts_is_the_hash_of_the_file() {
        let c = CHUNK_BYTES;
        for size in [
            0,
            1,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c + 5,
            4 * c,
            5 * c + 1000,
            8 * c + 1,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let parts: Vec<PartHash> = data
                .chunks(c)
                .enumerate()
                .map(|(i, plain)| part_hash(size as u64, i as u64, plain))
                .collect();
            assert_eq!(
                file_hash(size as u64, &parts),
                Some(Hash::of(&data)),
                "size {size}"
            );
        }
        let one = [part_hash(3 * c as u64, 0, &[0; 10])];
        assert_eq!(file_hash(3 * c as u64, &one), None);
    }
}
