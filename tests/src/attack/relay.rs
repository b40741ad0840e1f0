//! The relay under attack: the real `kith-relay` binary in a child process with its own data
//! directory, a TOML config with small, stated limits, its log written into its data directory
//! (so that the disk figure includes it), and Prometheus metrics on loopback. Memory, CPU time,
//! disk use and refusals are read from outside: `/proc/<pid>`, the directory, `/metrics`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::process::Daemon;

/// The limits the attacked relay runs with; everything else keeps the relay's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_connections`.
    pub max_connections: u32,
    /// `max_connections_per_peer`.
    pub max_connections_per_peer: u32,
    /// `max_pending_incoming_connections`.
    pub max_pending_incoming_connections: u32,
    /// `new_connections_per_ip_per_sec`.
    pub new_connections_per_ip_per_sec: u32,
    /// `new_connection_burst_per_ip`.
    pub new_connection_burst_per_ip: u32,
    /// `new_connections_per_sec` (everyone together).
    pub new_connections_per_sec: u32,
    /// `new_connection_burst`.
    pub new_connection_burst: u32,
    /// `malformed_requests_per_peer_per_sec`.
    pub malformed_requests_per_peer_per_sec: u32,
    /// `malformed_request_burst_per_peer`.
    pub malformed_request_burst_per_peer: u32,
    /// `ban_secs`.
    pub ban_secs: u64,
    /// `max_streams_per_connection`.
    pub max_streams_per_connection: usize,
    /// `read_buffer_budget_bytes`.
    pub read_buffer_budget_bytes: usize,
    /// `read_buffer_reserved_per_connection_bytes`.
    pub read_buffer_reserved_per_connection_bytes: usize,
    /// `read_buffer_max_per_connection_bytes`.
    pub read_buffer_max_per_connection_bytes: usize,
    /// `mailbox_max_messages` (per recipient).
    pub mailbox_max_messages: u64,
    /// `mailbox_max_bytes` (per recipient).
    pub mailbox_max_bytes: u64,
    /// `mailbox_max_messages_per_sender` (one sender's share of one mailbox).
    pub mailbox_max_messages_per_sender: u64,
    /// `mailbox_budget_bytes` (all mailboxes together).
    pub mailbox_budget_bytes: u64,
    /// `deposits_per_sec_per_peer`.
    pub deposits_per_sec_per_peer: u32,
    /// `deposit_burst_per_peer`.
    pub deposit_burst_per_peer: u32,
    /// `mailbox_full_retry_after_ms`.
    pub mailbox_full_retry_after_ms: u64,
    /// `busy_retry_after_ms`.
    pub busy_retry_after_ms: u64,
    /// `group_ops_per_sec_per_peer`.
    pub group_ops_per_sec_per_peer: u32,
    /// `group_op_burst_per_peer`.
    pub group_op_burst_per_peer: u32,
    /// `group_creations_per_sec` (all peers together).
    pub group_creations_per_sec: u32,
    /// `group_creation_burst`.
    pub group_creation_burst: u32,
    /// `blob_max_file_bytes`.
    pub blob_max_file_bytes: u64,
    /// `blob_quota_bytes_per_peer`.
    pub blob_quota_bytes_per_peer: u64,
    /// `blob_budget_bytes` (all uploaders together).
    pub blob_budget_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_connections_per_peer: 8,
            max_pending_incoming_connections: 64,
            new_connections_per_ip_per_sec: 50,
            new_connection_burst_per_ip: 500,
            new_connections_per_sec: 500,
            new_connection_burst: 1_000,
            malformed_requests_per_peer_per_sec: 1,
            malformed_request_burst_per_peer: 20,
            ban_secs: 600,
            max_streams_per_connection: 64,
            read_buffer_budget_bytes: 8 << 20,
            read_buffer_reserved_per_connection_bytes: 16 << 10,
            read_buffer_max_per_connection_bytes: 4 << 20,
            mailbox_max_messages: 1_000,
            mailbox_max_bytes: 4 << 20,
            mailbox_max_messages_per_sender: 500,
            mailbox_budget_bytes: 32 << 20,
            deposits_per_sec_per_peer: 300,
            deposit_burst_per_peer: 300,
            mailbox_full_retry_after_ms: 1_000,
            busy_retry_after_ms: 200,
            group_ops_per_sec_per_peer: 2,
            group_op_burst_per_peer: 20,
            group_creations_per_sec: 5,
            group_creation_burst: 50,
            blob_max_file_bytes: 8 << 20,
            blob_quota_bytes_per_peer: 8 << 20,
            blob_budget_bytes: 32 << 20,
        }
    }
}

impl Limits {
    /// The disk budget these limits give the relay's stores (mailbox and blobs).
    pub fn disk_budget_bytes(&self) -> u64 {
        self.mailbox_budget_bytes + self.blob_budget_bytes
    }

    /// The relay's TOML config for these limits, with metrics served at `metrics`.
    pub fn toml(&self, metrics: std::net::SocketAddr) -> String {
        format!(
            "metrics_addr = \"{metrics}\"\n\
             max_connections = {}\n\
             max_connections_per_peer = {}\n\
             max_pending_incoming_connections = {}\n\
             new_connections_per_ip_per_sec = {}\n\
             new_connection_burst_per_ip = {}\n\
             new_connections_per_sec = {}\n\
             new_connection_burst = {}\n\
             malformed_requests_per_peer_per_sec = {}\n\
             malformed_request_burst_per_peer = {}\n\
             ban_secs = {}\n\
             max_streams_per_connection = {}\n\
             read_buffer_budget_bytes = {}\n\
             read_buffer_reserved_per_connection_bytes = {}\n\
             read_buffer_max_per_connection_bytes = {}\n\
             mailbox_max_messages = {}\n\
             mailbox_max_bytes = {}\n\
             mailbox_max_messages_per_sender = {}\n\
             mailbox_budget_bytes = {}\n\
             deposits_per_sec_per_peer = {}\n\
             deposit_burst_per_peer = {}\n\
             mailbox_full_retry_after_ms = {}\n\
             busy_retry_after_ms = {}\n\
             group_ops_per_sec_per_peer = {}\n\
             group_op_burst_per_peer = {}\n\
             group_creations_per_sec = {}\n\
             group_creation_burst = {}\n\
             blob_max_file_bytes = {}\n\
             blob_quota_bytes_per_peer = {}\n\
             blob_budget_bytes = {}\n",
            self.max_connections,
            self.max_connections_per_peer,
            self.max_pending_incoming_connections,
            self.new_connections_per_ip_per_sec,
            self.new_connection_burst_per_ip,
            self.new_connections_per_sec,
            self.new_connection_burst,
            self.malformed_requests_per_peer_per_sec,
            self.malformed_request_burst_per_peer,
            self.ban_secs,
            self.max_streams_per_connection,
            self.read_buffer_budget_bytes,
            self.read_buffer_reserved_per_connection_bytes,
            self.read_buffer_max_per_connection_bytes,
            self.mailbox_max_messages,
            self.mailbox_max_bytes,
            self.mailbox_max_messages_per_sender,
            self.mailbox_budget_bytes,
            self.deposits_per_sec_per_peer,
            self.deposit_burst_per_peer,
            self.mailbox_full_retry_after_ms,
            self.busy_retry_after_ms,
            self.group_ops_per_sec_per_peer,
            self.group_op_burst_per_peer,
            self.group_creations_per_sec,
            self.group_creation_burst,
            self.blob_max_file_bytes,
            self.blob_quota_bytes_per_peer,
            self.blob_budget_bytes,
        )
    }
}

/// A running `kith-relay` process; killed (and its directory removed) when dropped.
pub struct Relay {
    daemon: Daemon,
    /// Its data directory (store, identity, `relay.json`, `relay.log`).
    pub data: PathBuf,
    /// Its log file, inside `data`.
    pub log: PathBuf,
    /// Its address, ending in `/p2p/<id>`.
    pub addr: Multiaddr,
    /// Its peer id.
    pub peer: PeerId,
    metrics: std::net::SocketAddr,
    http: reqwest::Client,
    /// Holds the config file and the data directory.
    dir: tempfile::TempDir,
}

impl Relay {
    /// Starts `binary` with `limits` on a free loopback port and waits until it listens.
    pub async fn spawn(binary: &Path, limits: &Limits) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kith-attack").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let log = data.join("relay.log");
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, limits.toml(metrics))?;
        let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
        let (data_arg, config_arg) = (path(&data)?, path(&config)?);
        let args = [
            "--data",
            &data_arg,
            "run",
            "--config",
            &config_arg,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ];
        let daemon = spawn_pinned(binary, &args, &log)?;
        let state = data.join("relay.json");
        let addr = crate::wait_for("the relay to listen", || async {
            let info: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
            info["listen_addrs"]
                .as_array()?
                .first()?
                .as_str()?
                .parse::<Multiaddr>()
                .ok()
        })
        .await
        .with_context(|| format!("{} did not start; see {}", binary.display(), log.display()))?;
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            bail!("relay address {addr} has no peer id");
        };
        Ok(Self {
            daemon,
            data,
            log,
            addr,
            peer,
            metrics,
            http: reqwest::Client::new(),
            dir,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    /// Resident memory, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// CPU time spent so far, user and system together.
    pub fn cpu(&self) -> Result<Duration> {
        cpu_of(self.pid())
    }

    /// Bytes the data directory takes on disk (allocated blocks, log included).
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(&self.data)
    }

    /// The log file's size in bytes.
    pub fn log_bytes(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Requests and connections the relay refused so far: every `kith_relay_rejects_total`
    /// plus the connection limits' hits (a refused connection has no answer to count).
    pub async fn refused(&self) -> Result<u64> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await?
            .text()
            .await?;
        Ok(refusals_in(&text))
    }

    /// Stops the relay with SIGTERM (a clean exit, store flushed); its directory stays until
    /// the returned guard is dropped.
    pub fn stop(mut self) -> Result<tempfile::TempDir> {
        self.daemon.terminate()?;
        Ok(self.dir)
    }
}

/// Sums the refusals in a Prometheus text page (see [`Relay::refused`]).
fn refusals_in(text: &str) -> u64 {
    let connection_limits = [
        "{limit=\"connections\"}",
        "{limit=\"connections_per_peer\"}",
        "{limit=\"pending_connections\"}",
        "{limit=\"connections_per_ip_rate\"}",
        "{limit=\"banned_peer\"}",
    ];
    text.lines()
        .filter(|l| {
            l.starts_with("kith_relay_rejects_total{")
                || l.strip_prefix("kith_relay_limit_hits_total")
                    .is_some_and(|rest| connection_limits.iter().any(|c| rest.starts_with(c)))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Starts `binary ARGS...` (stderr to `log`) from a thread on the relay's CPUs, whose affinity
/// the process inherits: off the attackers' core (see `cpu_split`).
pub(super) fn spawn_pinned(binary: &Path, args: &[&str], log: &Path) -> Result<Daemon> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some((cpus, _)) = super::cpu_split() {
                super::pin(&cpus);
            }
            Daemon::spawn(binary, args, log)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread starting {} panicked", binary.display()))?
    })
}

/// Resident memory of process `pid`, KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}

/// CPU time that process `pid` has spent so far, user and system together.
pub fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc stat")
    };
    // utime and stime are fields 14 and 15, that is 11 and 12 after the name.
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_sec(),
    ))
}

/// The kernel's clock ticks per second, in which `/proc/<pid>/stat` counts CPU time.
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            // Linux's USER_HZ on every common architecture.
            .unwrap_or(100.0)
    })
}

/// Allocated bytes of every file under `dir`.
pub(super) fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_rejects_and_connection_limits_only() {
        let page = "# HELP x\n\
                    kith_relay_rejects_total{reason=\"quota_exceeded\"} 5\n\
                    kith_relay_rejects_total{reason=\"busy\"} 2\n\
                    kith_relay_limit_hits_total{limit=\"connections_per_peer\"} 3\n\
                    kith_relay_limit_hits_total{limit=\"connections_per_ip_rate\"} 4\n\
                    kith_relay_limit_hits_total{limit=\"banned_peer\"} 6\n\
                    kith_relay_limit_hits_total{limit=\"mailbox_quota\"} 5\n\
                    kith_relay_deposits_total 9\n";
        assert_eq!(refusals_in(page), 20);
    }

    #[test]
    fn the_config_parses_as_a_relay_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("relay.toml");
        let toml = Limits::default().toml("127.0.0.1:9".parse().expect("addr"));
        std::fs::write(&path, toml).expect("written");
        let config = kith_relay::Config::from_toml_file(&path).expect("valid relay TOML");
        assert_eq!(config.mailbox_budget_bytes, 32 << 20);
        assert_eq!(config.read_buffer_reserved_per_connection_bytes, 16 << 10);
        assert_eq!(config.group_creation_burst, 50);
        assert!(config.validate().is_ok());
    }
}
