//! Writes valid inputs for every fuzz target (`kith_net::fuzz::seeds`) into
//! `<dir>/<target>/seed-<n>`, where `fuzz/run.sh` starts fuzzing from them.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    for (n, (target, bytes)) in kith_net::fuzz::seeds().into_iter().enumerate() {
        let folder = dir.join(target);
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join(format!("seed-{n:03}")), bytes)?;
    }
    Ok(())
}
