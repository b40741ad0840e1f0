//! `<data>/relay.json`: the running relay's peer id and actual listen addresses.
//!
//! The swarm task rewrites it whenever libp2p reports a new or expired listen address (so ports
//! given as 0 become real ones) and [`crate::Running::shutdown`] removes it, which is how
//! `kith-relay id --json` tells a running relay from a stopped one.

use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// The file's name inside the data directory.
pub const FILE: &str = "relay.json";

/// What `relay.json` and `kith-relay id --json` hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The relay's peer id.
    pub peer_id: String,
    /// Full multiaddrs ending in `/p2p/<peer id>`; empty when the relay is not running.
    pub listen_addrs: Vec<String>,
}

impl Info {
    /// The info for `peer_id` listening on `addrs`.
    pub fn new(peer_id: &PeerId, addrs: &[Multiaddr]) -> Self {
        Self {
            peer_id: peer_id.to_string(),
            listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// Why the file could not be written or removed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateFileError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Writes `info` atomically (temporary file, then rename).
pub fn write(data_dir: &Path, info: &Info) -> Result<(), StateFileError> {
    let path = data_dir.join(FILE);
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| StateFileError { path, source }
    };
    let json = serde_json::to_vec_pretty(info).map_err(|e| StateFileError {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&tmp, json).map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))
}

/// Reads the listen addresses of a running relay; empty if none runs (no file, or unreadable).
pub fn read_listen_addrs(data_dir: &Path) -> Vec<String> {
    std::fs::read(data_dir.join(FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Info>(&bytes).ok())
        .map(|info| info.listen_addrs)
        .unwrap_or_default()
}

/// Removes the file; a missing file is fine.
pub fn remove(data_dir: &Path) -> Result<(), StateFileError> {
    let path = data_dir.join(FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StateFileError { path, source: e })
        }
        _ => Ok(()),
    }
}
