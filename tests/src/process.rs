//! Running the real `kith` and `kith-relay` binaries the way a user does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The path of a workspace binary built next to the test executable (`cargo test --workspace`
/// builds every binary before running tests).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no parent directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run the tests with `cargo test --workspace` (it builds every binary)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `kith --home HOME ARGS...` to completion.
pub fn kith(home: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary("kith")?)
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KITH_LOG", "warn")
        .output()?)
}

/// Runs a kith command that must succeed and print one JSON document.
pub fn kith_json(home: &Path, args: &[&str]) -> Result<Value> {
    let out = kith(home, args)?;
    if !out.status.success() {
        bail!(
            "kith {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "kith {args:?} printed {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A child process that is killed when dropped.
pub struct Daemon(pub Child);

impl Daemon {
    /// Starts `binary ARGS...` in the background, its stderr to `log`.
    pub fn spawn(binary: &Path, args: &[&str], log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(binary)
            .args(args)
            .env("KITH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self(child))
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(self.0.wait()?)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
