//! File modes of the node's home: only its owner may read or write what it holds.
//!
//! The home directory is `0700`; the identity key, API token, settings, `api.json` and the store
//! (every directory `0700`, every file `0600`) are created that way and tightened again at each
//! start, so a home made by an older version, or copied with loose modes, is fixed. Received
//! files under `files/` are protected by the home's own mode. No-ops off Unix.

use std::io;
use std::path::Path;

/// The mode of a directory only its owner may enter.
pub const DIR_MODE: u32 = 0o700;

/// The mode of a file only its owner may read or write.
pub const FILE_MODE: u32 = 0o600;

/// Creates `home` (and missing parents) with mode `0700` if it does not exist.
pub fn create_home(home: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(home)?;
    set_mode(home, DIR_MODE)
}

/// Sets `home` to `0700`, its own files to `0600`, and everything under `db` (the store) to
/// `0700` / `0600`.
pub fn tighten(home: &Path, store_dir: &Path) -> io::Result<()> {
    set_mode(home, DIR_MODE)?;
    for entry in std::fs::read_dir(home)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            set_mode(&entry.path(), FILE_MODE)?;
        }
    }
    if store_dir.is_dir() {
        tighten_tree(store_dir)?;
    }
    Ok(())
}

fn tighten_tree(dir: &Path) -> io::Result<()> {
    set_mode(dir, DIR_MODE)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            tighten_tree(&entry.path())?;
        } else if kind.is_file() {
            set_mode(&entry.path(), FILE_MODE)?;
        }
    }
    Ok(())
}

/// Sets `path`'s permission bits (symbolic links are left alone).
#[cfg(unix)]
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() || meta.permissions().mode() & 0o777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Nothing to do off Unix.
#[cfg(not(unix))]
pub fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn a_loose_home_is_tightened() {
        let dir = tempfile::tempdir().expect("dir");
        let home = dir.path().join("home");
        create_home(&home).expect("create");
        assert_eq!(mode(&home), DIR_MODE);
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("loosen");
        let token = home.join("api.token");
        std::fs::write(&token, "t").expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("loosen");
        let db = home.join("db");
        std::fs::create_dir_all(db.join("blobs")).expect("db");
        std::fs::write(db.join("blobs").join("1"), "x").expect("write");
        std::fs::write(db.join("conf"), "x").expect("write");
        tighten(&home, &db).expect("tighten");
        assert_eq!(mode(&home), DIR_MODE);
        assert_eq!(mode(&token), FILE_MODE);
        assert_eq!(mode(&db), DIR_MODE);
        assert_eq!(mode(&db.join("blobs")), DIR_MODE);
        assert_eq!(mode(&db.join("blobs").join("1")), FILE_MODE);
        assert_eq!(mode(&db.join("conf")), FILE_MODE);
    }
}
