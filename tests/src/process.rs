//! Running the real `kith` and `kith-relay` binaries the way a user does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The path of a workspace binary, built (or brought up to date) once per test process with the
/// same profile as the tests: `cargo test` builds only the binaries of the package under test,
/// and `kith` and `kith-relay` belong to other packages.
pub fn binary(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no parent directory")?;
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args([
            "build",
            "--quiet",
            "-p",
            "kith-node",
            "-p",
            "kith-relay",
            "--bins",
        ]);
        if dir.ends_with("release") {
            command.arg("--release");
        }
        match command.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("building the binaries failed ({status})")),
            Err(e) => Err(format!("cannot run cargo to build the binaries: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} was not built", path.display());
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

/// Starts `kith daemon` on `home` (listening on a free loopback port unless `extra` names a
/// `--listen`) with `extra` arguments, and waits until it has written its `api.json`.
pub async fn start_daemon(home: &Path, extra: &[&str]) -> Result<Daemon> {
    let _ = std::fs::remove_file(home.join("api.json"));
    let home_arg = home.to_str().context("home path is not UTF-8")?;
    let mut args = vec!["--home", home_arg, "daemon"];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "/ip4/127.0.0.1/tcp/0"]);
    }
    args.extend(extra);
    let daemon = Daemon::spawn(&binary("kith")?, &args, &home.join("daemon.log"))?;
    crate::wait_for("daemon api.json", || async {
        home.join("api.json").exists().then_some(())
    })
    .await?;
    Ok(daemon)
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
