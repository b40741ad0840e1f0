//! File transfer benchmarks: a file sent directly (recipient online, chunks fetched from the
//! sender) and through a relay (uploaded while the recipient is offline, then downloaded from the
//! relay with the sender gone), next to a bare libp2p baseline that moves the same bytes in the
//! same run: request-response over the same transport and codec with 256 KiB answers served from
//! memory (no encryption, no hashing, no disk), 16 requests in flight like kith's transfers.
//!
//! Memory: the relay runs in a child process and its RSS is sampled during the transfer; the
//! benchmark process (sender and recipient together) samples its own RSS, so a transfer that
//! buffered the whole file would show it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_net::BlobCodec;
use kith_node::{Config, NodeEvent, Settings};
use kith_protocol::blob::{self, Hash, CHUNK_BYTES};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol, Swarm};

use crate::relay_bench::ChildServer;
use crate::TestNode;

/// What one transfer measured.
pub struct Transfer {
    /// Bytes per second of file.
    pub bytes_per_sec: f64,
    /// Peak RSS growth of this process during the transfer, in KiB.
    pub local_rss_growth_kib: u64,
    /// Peak RSS of the relay process during the transfer, in KiB (0 when there is no relay).
    pub relay_rss_peak_kib: u64,
    /// The relay's RSS before the transfer, in KiB.
    pub relay_rss_before_kib: u64,
}

fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples this process's and (if given) the relay's RSS every 20 ms until dropped.
struct RssSampler {
    local_peak: Arc<AtomicU64>,
    relay_peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(relay: Option<u32>) -> Self {
        let local_peak = Arc::new(AtomicU64::new(own_rss_kib()));
        let relay_peak = Arc::new(AtomicU64::new(0));
        let (l, r) = (local_peak.clone(), relay_peak.clone());
        let task = tokio::spawn(async move {
            loop {
                l.fetch_max(own_rss_kib(), Ordering::Relaxed);
                if let Some(pid) = relay {
                    if let Some(kib) = pid_rss_kib(pid) {
                        r.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            local_peak,
            relay_peak,
            task,
        }
    }

    fn stop(self) -> (u64, u64) {
        self.task.abort();
        (
            self.local_peak.load(Ordering::Relaxed),
            self.relay_peak.load(Ordering::Relaxed),
        )
    }
}

fn pid_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Writes a file of `len` pseudo-random bytes.
pub fn write_file(dir: &Path, len: usize) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("payload.bin");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut written = 0;
    let mut buf = Vec::with_capacity(64 * 1024);
    while written < len {
        buf.clear();
        while buf.len() < 64 * 1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        let n = buf.len().min(len - written);
        out.write_all(&buf[..n])?;
        written += n;
    }
    out.flush()?;
    Ok(path)
}

fn blob_swarm() -> Result<Swarm<request_response::Behaviour<BlobCodec>>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                BlobCodec::new(blob::MAX_FRAME_BYTES),
                [(StreamProtocol::new(blob::PROTOCOL), ProtocolSupport::Full)],
                kith_net::request_response_config(),
            )
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// The baseline: `bytes` moved as 256 KiB request-response answers from memory, 16 in flight.
pub async fn bare_stream(bytes: usize) -> Result<f64> {
    let mut server = blob_swarm()?;
    server.listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let server_peer = *server.local_peer_id();
    let payload = vec![0xa5u8; CHUNK_BYTES + blob::TAG_BYTES];
    let serve = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) = server.select_next_some().await
            {
                let req_id = match request {
                    Message::Valid(r) => r.req_id(),
                    _ => 0,
                };
                let _ = server.behaviour_mut().send_response(
                    channel,
                    blob::Response::Blob {
                        req_id,
                        bytes: payload.clone(),
                    },
                );
            }
        }
    });
    let mut client = blob_swarm()?;
    client.dial(
        addr.with_p2p(server_peer)
            .map_err(|a| anyhow::anyhow!("{a}"))?,
    )?;
    let count = bytes.div_ceil(CHUNK_BYTES);
    let get = |i: usize| {
        Message::Valid(blob::Request::Get {
            req_id: i as u64,
            hash: Hash::of(&i.to_le_bytes()),
        })
    };
    let started = Instant::now();
    let (mut sent, mut done, mut in_flight) = (0, 0, 0);
    while done < count {
        while in_flight < 16 && sent < count {
            client.behaviour_mut().send_request(&server_peer, get(sent));
            sent += 1;
            in_flight += 1;
        }
        match client.select_next_some().await {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { .. },
                ..
            }) => {
                done += 1;
                in_flight -= 1;
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                bail!("baseline request failed: {error}")
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    serve.abort();
    Ok(bytes as f64 / elapsed.as_secs_f64())
}

async fn node(dir: &Path, name: &str, relays: Vec<Multiaddr>) -> Result<TestNode> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)?;
    TestNode::init_home(&home, name)?;
    let mut settings = Settings::load(&home)?;
    settings.auto_download_max_bytes = 1 << 40;
    settings.save(&home)?;
    let mut config = Config::loopback(&home);
    config.relays = relays;
    TestNode::start_in(config).await
}

async fn until_path(node: &TestNode, with: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = node
            .node()
            .messages(Some(with))?
            .iter()
            .any(|m| m.attachment.as_ref().is_some_and(|a| a.path.is_some()));
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the file never arrived");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A file of `bytes` from one node to another that is online: send (chunk, seal, hash) until
/// the recipient holds the whole, checked file.
pub async fn direct(bytes: usize) -> Result<Transfer> {
    let dir = tempfile::tempdir()?;
    let source = write_file(dir.path(), bytes)?;
    let alice = node(dir.path(), "alice", Vec::new()).await?;
    let bob = node(dir.path(), "bob", Vec::new()).await?;
    crate::befriend(&alice, "bob", &bob).await?;
    crate::befriend(&bob, "alice", &alice).await?;
    let before = own_rss_kib();
    let sampler = RssSampler::start(None);
    let started = Instant::now();
    alice.node().send_file("bob", &source).await?;
    until_path(&bob, "alice").await?;
    let elapsed = started.elapsed();
    let (local_peak, _) = sampler.stop();
    Ok(Transfer {
        bytes_per_sec: bytes as f64 / elapsed.as_secs_f64(),
        local_rss_growth_kib: local_peak.saturating_sub(before),
        relay_rss_peak_kib: 0,
        relay_rss_before_kib: 0,
    })
}

/// A file of `bytes` through a relay in a child process: uploaded while the recipient is
/// offline, then downloaded from the relay with the sender stopped. Returns the upload and the
/// download.
pub async fn through_relay(bytes: usize) -> Result<(Transfer, Transfer)> {
    let relay = ChildServer::spawn(&["serve-relay"])?;
    let dir = tempfile::tempdir()?;
    let source = write_file(dir.path(), bytes)?;
    let mut alice = node(dir.path(), "alice", vec![relay.addr.clone()]).await?;
    let mut bob = node(dir.path(), "bob", vec![relay.addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let alice_invite = alice.node().invite().encode();
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    let relay_before = relay.rss_kib()?;
    let before = own_rss_kib();
    let mut events = alice.node().subscribe();
    let sampler = RssSampler::start(Some(relay.pid()));
    let started = Instant::now();
    let sent = alice.node().send_file("bob", &source).await?;
    tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::Progress {
                    id, done, total, ..
                }) if id == sent.id && done >= total => return,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                _ => {}
            }
        }
    })
    .await
    .context("upload")?;
    let upload_elapsed = started.elapsed();
    let (local_peak, relay_peak) = sampler.stop();
    let upload = Transfer {
        bytes_per_sec: bytes as f64 / upload_elapsed.as_secs_f64(),
        local_rss_growth_kib: local_peak.saturating_sub(before),
        relay_rss_peak_kib: relay_peak,
        relay_rss_before_kib: relay_before,
    };
    alice.stop().await;

    bob.restart_on("/ip4/127.0.0.1/tcp/0".parse()?).await?;
    bob.node().add_contact("alice", &alice_invite, &[]).await?;
    let relay_before = relay.rss_kib()?;
    let before = own_rss_kib();
    let sampler = RssSampler::start(Some(relay.pid()));
    let started = Instant::now();
    until_path(&bob, "alice").await?;
    let elapsed = started.elapsed();
    let (local_peak, relay_peak) = sampler.stop();
    let download = Transfer {
        bytes_per_sec: bytes as f64 / elapsed.as_secs_f64(),
        local_rss_growth_kib: local_peak.saturating_sub(before),
        relay_rss_peak_kib: relay_peak,
        relay_rss_before_kib: relay_before,
    };
    bob.stop().await;
    Ok((upload, download))
}
