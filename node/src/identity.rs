//! The node's identity: an ed25519 keypair in `<home>/identity.key` (protobuf encoding, 0600).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the key inside the home directory.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `kith init` was run on a home that already has an identity.
    #[error("{0} already holds an identity; refusing to overwrite it (use another --home, or delete the file to start over as a new user)")]
    Exists(PathBuf),
    /// There is no identity yet.
    #[error("no identity in {0}; run `kith init --name NAME` first")]
    Missing(PathBuf),
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key file does not hold a valid key.
    #[error("{0} does not hold a valid ed25519 key")]
    Damaged(PathBuf),
}

/// Creates a new identity in `home`; refuses to overwrite one.
pub fn create(home: &Path) -> Result<Keypair, IdentityError> {
    let path = home.join(KEY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    crate::private::create_home(home).map_err(io)?;
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|_| IdentityError::Damaged(path.clone()))?;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(IdentityError::Exists(path))
        }
        Err(e) => return Err(io(e)),
    };
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(key)
}

/// Loads the identity from `home`.
pub fn load(home: &Path) -> Result<Keypair, IdentityError> {
    let path = home.join(KEY_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IdentityError::Missing(home.to_path_buf()))
        }
        Err(source) => return Err(IdentityError::Io { path, source }),
    };
    Keypair::from_protobuf_encoding(&bytes).map_err(|_| IdentityError::Damaged(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = create(dir.path()).expect("create");
        let loaded = load(dir.path()).expect("load");
        assert_eq!(key.public(), loaded.public());
        assert!(matches!(create(dir.path()), Err(IdentityError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_and_damaged_keys_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load(dir.path()), Err(IdentityError::Missing(_))));
        fs::write(dir.path().join(KEY_FILE), b"junk").expect("write");
        assert!(matches!(load(dir.path()), Err(IdentityError::Damaged(_))));
    }
}
