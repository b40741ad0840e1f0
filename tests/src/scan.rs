//! Scanning stored bytes: what a relay's or a node's data directory holds in the clear.

use std::path::{Path, PathBuf};

/// `len` bytes of a cheap pseudo-random pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

/// The files under `dir` whose raw bytes contain `needle`.
pub fn holders(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The file key of the one attachment in the store under `home` (the node must be stopped).
pub fn file_key(home: &Path) -> anyhow::Result<Vec<u8>> {
    use ciborium::Value;
    let store = kith_node::core::store::Store::open(&home.join("db"))?;
    let records = store.attachments::<Value>()?;
    drop(store);
    let field = |value: &Value, name: &str| -> Option<Value> {
        value
            .as_map()?
            .iter()
            .find_map(|(k, v)| (k.as_text() == Some(name)).then(|| v.clone()))
    };
    let (_, record) = records
        .first()
        .ok_or_else(|| anyhow::anyhow!("no attachment"))?;
    let key = field(record, "file")
        .and_then(|file| field(&file, "key"))
        .and_then(|key| key.as_bytes().cloned())
        .ok_or_else(|| anyhow::anyhow!("no file key in the attachment record"))?;
    Ok(key)
}
