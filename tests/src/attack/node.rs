//! The node under attack: a real `kith` daemon that a contact sends direct messages to while
//! strangers attack it from loopback (`kith-bench --attack-node`).
//!
//! Each phase starts a fresh daemon (its own home), adds the honest sender as a contact, and
//! has the sender send a 200-byte chat every `1 / honest_rate` s over `/kith/dm/1`, one at a
//! time. A message's latency is counted from the moment it was due, not from when the previous
//! one let it go, so a stall counts for every message it held up. The attackers run on the
//! attackers' core, as for the relay ([`super::cpu_split`]), and the daemon and the honest
//! sender on the others.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{AsyncWriteExt, StreamExt};
use kith_net::codec::Message;
use kith_protocol::dm;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::task::JoinSet;

use super::attacks::{garbage_frames, header, tcp_swarm, AbortOnDrop, Counters};
use super::relay::{cpu_of, disk_usage, rss_kib, spawn_pinned};
use super::Settings;
use crate::bench::{payload_envelope, percentile};
use crate::process::Daemon;
use crate::RawPeer;

/// One attack on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAttack {
    /// Fresh identities hold streams on `/kith/dm/1`, each claiming the largest frame and
    /// trickling bytes (memory).
    BigFrames,
    /// Fresh identities send malformed dm frames until the node bans them, then come back as
    /// new ones (bans, log).
    Garbage,
    /// Fresh identities send well-formed 1 KiB chats as fast as the node answers, each until
    /// the node refuses it (its request is full), then a new one (the requests list's disk).
    StrangerFlood,
    /// Fresh identities connect, stay a second saying nothing, and come back as new ones
    /// (handshakes, connection limits).
    ConnectionFlood,
}

impl NodeAttack {
    /// Every attack on a node, in the order the benchmark runs them.
    pub const ALL: [NodeAttack; 4] = [
        NodeAttack::BigFrames,
        NodeAttack::Garbage,
        NodeAttack::StrangerFlood,
        NodeAttack::ConnectionFlood,
    ];

    /// The attack's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            NodeAttack::BigFrames => "dm-big-frames",
            NodeAttack::Garbage => "dm-garbage",
            NodeAttack::StrangerFlood => "stranger-flood",
            NodeAttack::ConnectionFlood => "connection-flood",
        }
    }

    /// What it does, for the text under the table.
    pub fn describe(self, scale: usize) -> String {
        match self {
            NodeAttack::BigFrames => format!(
                "{} fresh identities, one connection each, hold streams on `/kith/dm/1`, each claiming the largest dm frame and writing 1 KiB every 250 ms",
                20 * scale
            ),
            NodeAttack::Garbage => format!(
                "{} tasks send malformed dm frames (random bytes, wrong CBOR, empty, oversize claims, truncated), one at a time, each as a fresh identity again once the node bans or drops it",
                4 * scale
            ),
            NodeAttack::StrangerFlood => format!(
                "{} tasks send well-formed 1 KiB chats from strangers as fast as the node answers, each identity until the node refuses it, then a fresh one",
                4 * scale
            ),
            NodeAttack::ConnectionFlood => format!(
                "{} tasks each connect as a fresh identity, stay a second without a request, and reconnect as a new one",
                20 * scale
            ),
        }
    }
}

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct NodeRow {
    /// `baseline` or the attack's name.
    pub attack: &'static str,
    /// Requests, streams and connections the attackers attempted.
    pub attempted: u64,
    /// The node's `VmRSS` before the attack, MiB.
    pub rss_before_mib: f64,
    /// Its peak growth during the attack, MiB.
    pub rss_growth_mib: f64,
    /// The honest messages' p99 latency, due → `Accepted`, ms.
    pub honest_p99_ms: f64,
    /// Honest messages sent during the attack.
    pub honest_sent: usize,
    /// Honest messages not accepted (refused, or the request failed): the sender does not
    /// retry, so each is an attempt a node would have to make again.
    pub honest_failed: usize,
    /// How much the node's home grew on disk during the phase, MiB (log included).
    pub disk_growth_mib: f64,
    /// The node's CPU time during the attack, s.
    pub cpu_secs: f64,
}

/// Runs the baseline and `attacks` against fresh `kith` daemons started from `kith`.
pub async fn run(kith: &Path, settings: &Settings, attacks: &[NodeAttack]) -> Result<Vec<NodeRow>> {
    eprintln!("[attack-node] baseline: honest traffic only…");
    let mut rows = vec![phase(kith, settings, None).await.context("baseline")?];
    for (i, attack) in attacks.iter().enumerate() {
        eprintln!(
            "[attack-node {}/{}] {}: {}…",
            i + 1,
            attacks.len(),
            attack.name(),
            attack.describe(settings.scale)
        );
        rows.push(
            phase(kith, settings, Some(*attack))
                .await
                .with_context(|| attack.name())?,
        );
    }
    Ok(rows)
}

/// The figures as a markdown table, with the targets checked against the baseline (the first
/// row).
pub fn markdown(rows: &[NodeRow]) -> String {
    let mut md = String::from(
        "| attack | attempted | node RSS growth (≤ 64 MiB) | honest p99 (≤ 2× baseline) | honest attempts not accepted (0) | disk growth (≤ 128 MiB) | node CPU |\n|---|---|---|---|---|---|---|\n",
    );
    let base = rows.first().map_or(0.0, |r| r.honest_p99_ms);
    for r in rows {
        let mark = |ok: bool| if ok { "✅" } else { "❌" };
        let is_base = r.attack == "baseline";
        let ratio = if base > 0.0 {
            r.honest_p99_ms / base
        } else {
            0.0
        };
        let (rss, p99, failed, disk) = if is_base {
            (String::new(), String::new(), String::new(), String::new())
        } else {
            (
                format!(" {}", mark(r.rss_growth_mib <= 64.0)),
                format!(" ({ratio:.1}×) {}", mark(ratio <= 2.0)),
                format!(" {}", mark(r.honest_failed == 0)),
                format!(" {}", mark(r.disk_growth_mib <= 128.0)),
            )
        };
        md += &format!(
            "| {} | {} | {:.1} MiB (of {:.0}){rss} | {:.1} ms ({} sent){p99} | {}{failed} | {:.1} MiB{disk} | {:.2} s |\n",
            r.attack,
            if is_base { "—".to_owned() } else { r.attempted.to_string() },
            r.rss_growth_mib,
            r.rss_before_mib,
            r.honest_p99_ms,
            r.honest_sent,
            r.honest_failed,
            r.disk_growth_mib,
            r.cpu_secs,
        );
    }
    md
}

/// A `kith` daemon in a home of its own.
struct Node {
    daemon: Daemon,
    home: tempfile::TempDir,
    peer: PeerId,
    addr: Multiaddr,
}

impl Node {
    /// Creates an identity, starts the daemon on a free loopback port, and adds `contact` as a
    /// contact.
    async fn spawn(kith: &Path, contact: PeerId) -> Result<Self> {
        let home = tempfile::Builder::new()
            .prefix("kith-attack-node")
            .tempdir()?;
        let home_arg = home.path().to_str().context("non-UTF-8 path")?.to_owned();
        let run = |args: &[&str]| -> Result<Vec<u8>> {
            let out = Command::new(kith)
                .arg("--home")
                .arg(&home_arg)
                .args(args)
                .env("KITH_LOG", "warn")
                .output()?;
            if !out.status.success() {
                bail!("kith {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(out.stdout)
        };
        run(&["init", "--name", "victim"])?;
        let log = home.path().join("daemon.log");
        let args = [
            "--home",
            home_arg.as_str(),
            "daemon",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ];
        let daemon = spawn_pinned(kith, &args, &log)?;
        let api = home.path().join("api.json");
        crate::wait_for("the node's api.json", || async {
            api.exists().then_some(())
        })
        .await
        .with_context(|| format!("{} did not start; see {}", kith.display(), log.display()))?;
        run(&["contact", "add", "honest", &contact.to_string()])?;
        let id: serde_json::Value = serde_json::from_slice(&run(&["id", "--json"])?)?;
        let addr: Multiaddr = id["listen_addrs"][0]
            .as_str()
            .context("the node lists no address")?
            .parse()?;
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            bail!("node address {addr} has no peer id");
        };
        Ok(Self {
            daemon,
            home,
            peer,
            addr,
        })
    }
}

/// Each honest message: when it was due, and its latency if it was accepted.
type Sent = Arc<Mutex<Vec<(Instant, Option<Duration>)>>>;

/// The honest sender, on a thread of its own beside the node.
struct Honest {
    sent: Sent,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Honest {
    fn start(key: Keypair, node: PeerId, addr: Multiaddr, rate: u32) -> Self {
        let sent = Sent::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            if let Some((cpus, _)) = super::cpu_split() {
                super::pin(&cpus);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut raw = RawPeer::with_key(key.clone())?;
                let mut tick =
                    tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut req_id = 0;
                while !st.load(Ordering::Relaxed) {
                    let due = tick.tick().await.into_std();
                    req_id += 1;
                    let envelope = payload_envelope(&key, node, 200);
                    let request = Message::Valid(dm::Request::new(req_id, envelope));
                    let accepted = matches!(
                        raw.dm(node, &addr, request).await,
                        Ok(dm::Response::Accepted { .. })
                    );
                    let latency = accepted.then(|| due.elapsed());
                    s.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((due, latency));
                }
                Ok(())
            })
        });
        Self {
            sent,
            stop,
            thread: Some(thread),
        }
    }

    /// Messages due in `[from, to)`: their accepted latencies, sorted, and how many failed.
    fn between(&self, from: Instant, to: Instant) -> (Vec<Duration>, usize) {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let mut latencies = Vec::new();
        let mut failed = 0;
        for (_, latency) in sent.iter().filter(|(due, _)| *due >= from && *due < to) {
            match latency {
                Some(l) => latencies.push(*l),
                None => failed += 1,
            }
        }
        latencies.sort();
        (latencies, failed)
    }

    fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the honest sender panicked"),
            None => Ok(()),
        }
    }
}

async fn phase(kith: &Path, settings: &Settings, attack: Option<NodeAttack>) -> Result<NodeRow> {
    let attackers = super::attackers_runtime()?;
    let key = Keypair::generate_ed25519();
    let mut node = Node::spawn(kith, key.public().to_peer_id()).await?;
    let honest = Honest::start(key, node.peer, node.addr.clone(), settings.honest_rate);
    crate::wait_for("the honest sender's first message", || async {
        let (accepted, _) =
            honest.between(Instant::now() - Duration::from_secs(3600), Instant::now());
        (!accepted.is_empty()).then_some(())
    })
    .await?;
    tokio::time::sleep(settings.warmup).await;

    let pid = node.daemon.0.id();
    let rss_before = rss_kib(pid)?;
    let cpu_before = cpu_of(pid)?;
    let disk_before = disk_usage(node.home.path());
    let counters = Arc::new(Counters::default());
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    if let Some(attack) = attack {
        launch(
            attack,
            node.peer,
            &node.addr,
            settings.scale,
            &counters,
            &mut tasks,
            attackers.handle(),
        );
    }
    let mut rss_peak =
        super::peak_rss(started, settings.attack, rss_before, || rss_kib(pid)).await?;
    tasks.shutdown().await;
    let stopped = Instant::now();
    let cpu = cpu_of(pid)?.saturating_sub(cpu_before);
    rss_peak = rss_peak.max(rss_kib(pid)?);
    honest.stop.store(true, Ordering::Relaxed);
    // The last message in flight is answered (or fails) within the harness's deadline.
    let (latencies, failed) = honest.between(started, stopped);
    honest.finish()?;
    let disk_after = disk_usage(node.home.path());
    node.daemon.kill()?;
    Ok(NodeRow {
        attack: attack.map_or("baseline", NodeAttack::name),
        attempted: counters.sent.load(Ordering::Relaxed),
        rss_before_mib: rss_before as f64 / 1024.0,
        rss_growth_mib: rss_peak.saturating_sub(rss_before) as f64 / 1024.0,
        honest_p99_ms: percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
        honest_sent: latencies.len() + failed,
        honest_failed: failed,
        disk_growth_mib: disk_after.saturating_sub(disk_before) as f64 / (1024.0 * 1024.0),
        cpu_secs: cpu.as_secs_f64(),
    })
}

/// Starts one attacker against the node at its address.
type Attacker =
    fn(PeerId, Multiaddr, Arc<Counters>) -> futures::future::BoxFuture<'static, Result<()>>;

fn launch(
    attack: NodeAttack,
    peer: PeerId,
    addr: &Multiaddr,
    scale: usize,
    counters: &Arc<Counters>,
    tasks: &mut JoinSet<()>,
    on: &tokio::runtime::Handle,
) {
    let (count, make): (usize, Attacker) = match attack {
        NodeAttack::BigFrames => (20 * scale, |p, a, c| Box::pin(big_frames(p, a, c))),
        NodeAttack::Garbage => (4 * scale, |p, a, c| Box::pin(garbage(p, a, c))),
        NodeAttack::StrangerFlood => (4 * scale, |p, a, c| Box::pin(stranger_flood(p, a, c))),
        NodeAttack::ConnectionFlood => (20 * scale, |p, a, c| Box::pin(connection_flood(p, a, c))),
    };
    for _ in 0..count {
        let attacker = make(peer, addr.clone(), counters.clone());
        tasks.spawn_on(
            async move {
                if let Err(e) = attacker.await {
                    tracing::debug!("attacker ended: {e:#}");
                }
            },
            on,
        );
    }
}

/// Streams on `/kith/dm/1` claiming the largest frame, 1 KiB written into each every 250 ms,
/// reopened when the node closes them.
async fn big_frames(peer: PeerId, addr: Multiaddr, c: Arc<Counters>) -> Result<()> {
    let (events, _inbound) = tokio::sync::mpsc::channel(1);
    let (behaviour, streams) =
        kith_node::net::dm_streams::Behaviour::new(StreamProtocol::new(dm::PROTOCOL), events);
    let mut swarm = tcp_swarm(Keypair::generate_ed25519(), || behaviour)?;
    swarm.dial(addr)?;
    c.add(1);
    let _driver = AbortOnDrop(tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    }));
    let chunk = vec![0xa5u8; 1024];
    let mut held = Vec::new();
    loop {
        while let Some(mut taken) = streams.take(peer) {
            c.add(1);
            let mut first = header(dm::MAX_FRAME_BYTES).to_vec();
            first.extend_from_slice(&chunk);
            if taken.stream.write_all(&first).await.is_ok() {
                held.push(taken);
            }
        }
        let mut kept = Vec::with_capacity(held.len());
        for mut taken in held.drain(..) {
            if taken.stream.write_all(&chunk).await.is_ok() && taken.stream.flush().await.is_ok() {
                kept.push(taken);
            }
        }
        held = kept;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Malformed dm frames, one at a time, as a fresh identity again whenever the node bans or
/// drops this one.
async fn garbage(peer: PeerId, addr: Multiaddr, c: Arc<Counters>) -> Result<()> {
    let frames = garbage_frames(dm::MAX_FRAME_BYTES);
    loop {
        let mut raw = RawPeer::new()?;
        for frame in frames.iter().cycle() {
            c.add(1);
            if raw
                .dm(peer, &addr, Message::Raw(frame.clone()))
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Well-formed chats from strangers, each identity until the node refuses it.
async fn stranger_flood(peer: PeerId, addr: Multiaddr, c: Arc<Counters>) -> Result<()> {
    loop {
        let mut raw = RawPeer::new()?;
        let key = raw.key.clone();
        for req_id in 1.. {
            c.add(1);
            let request =
                Message::Valid(dm::Request::new(req_id, payload_envelope(&key, peer, 1024)));
            if !matches!(
                raw.dm(peer, &addr, request).await,
                Ok(dm::Response::Accepted { .. })
            ) {
                break;
            }
        }
    }
}

/// Connections from fresh identities that say nothing: each stays a second, then a new
/// identity connects in its place.
async fn connection_flood(_peer: PeerId, addr: Multiaddr, c: Arc<Counters>) -> Result<()> {
    loop {
        let mut raw = RawPeer::new()?;
        c.add(1);
        raw.swarm.dial(addr.clone())?;
        // Kept polled for a second (the handshake and the idle connection), then dropped.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                raw.swarm.select_next_some().await;
            }
        })
        .await;
    }
}
