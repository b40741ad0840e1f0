//! The relay's ed25519 identity, kept in `<data>/identity.key` (protobuf-encoded, mode 0600).
//!
//! The key is created on first use (`run` or `id`) and never rewritten afterwards. It is written
//! to a temporary file first and linked into place, so a crash never leaves half a key and two
//! processes creating it at once agree on one key.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data directory or the key file could not be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file exists but does not hold a protobuf-encoded keypair.
    #[error("identity file {path} does not hold a keypair: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Loads `<data_dir>/identity.key`, creating the directory and a fresh ed25519 key if needed.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io { path, source }
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Decode {
                path,
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::Decode {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    // A unique temporary name per creator, then `hard_link`, which refuses to replace an
    // existing file: when two processes create the identity at once (a `run` and an `id`), one
    // key wins and both use it.
    let tmp = data_dir.join(format!(
        "{KEY_FILE}.{}.{:016x}.tmp",
        std::process::id(),
        rand_suffix()
    ));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(keypair),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Decode {
                path,
                reason: e.to_string(),
            })
        }
        Err(e) => Err(io(&path)(e)),
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(dir.path()).expect("create");
        let again = load_or_create(dir.path()).expect("load");
        assert_eq!(first.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), b"nope").expect("write");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Decode { .. })
        ));
    }
}
