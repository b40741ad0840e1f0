//! The group benchmark: one message to a 200-member group whose members are in-process nodes on
//! loopback, some online and some offline. Measures when every member has it and when the
//! sender sees every member's `delivered`, and the relay's CPU time and the process's memory
//! during it.
//!
//! The relay runs on its own tokio runtime whose threads are named [`RELAY_THREAD`], so its CPU
//! time can be read per thread from `/proc/self/task/*/stat` while 200 nodes share the process.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kith_node::NodeEvent;
use kith_protocol::MessageState;
use libp2p::Multiaddr;
use tokio::sync::oneshot;

use crate::{wait_for, TestNode};

/// Name of the relay runtime's threads.
pub const RELAY_THREAD: &str = "kith-relay-rt";

/// What the benchmark measured.
#[derive(Debug, Clone)]
pub struct GroupFigures {
    /// Members (sender included).
    pub members: usize,
    /// Members online when the message was sent (sender excluded).
    pub online: usize,
    /// Members offline when it was sent.
    pub offline: usize,
    /// Send → the last online member has it.
    pub online_all: Duration,
    /// Send → the median online member has it.
    pub online_p50: Duration,
    /// Send → the sender sees every online member `delivered`.
    pub online_receipts: Duration,
    /// Offline members' return (all restarted) → the last of them has it.
    pub offline_after_return: Duration,
    /// Offline members' return → the sender sees all members `delivered` (the message state).
    pub all_receipts_after_return: Duration,
    /// The relay's CPU time (user + system) from the send to the last receipt.
    pub relay_cpu: Duration,
    /// Wall time of the same interval.
    pub wall: Duration,
    /// The whole process's resident memory at the end (all nodes and the relay).
    pub process_rss_kib: u64,
    /// The process's peak resident memory.
    pub process_hwm_kib: u64,
    /// Creating the group with every member in one step (claims, one commit, the relay
    /// applies it), as the creator waits for it.
    pub create_call: Duration,
    /// The same start → every member joined the group's keys (epoch 1).
    pub create_all: Duration,
    /// Adding one member: the admin's change (claim, commit, the relay applies it).
    pub add_call: Duration,
    /// The same start → every member in the new epoch (the newcomer joined).
    pub add_all: Duration,
    /// Removing one member: the admin's change.
    pub remove_call: Duration,
    /// The same start → every remaining member in the new epoch.
    pub remove_all: Duration,
}

/// Waits until every node shows group `id` at `epoch` (its local view).
async fn all_at_epoch(nodes: &[&TestNode], id: &str, epoch: u64) -> Result<()> {
    for node in nodes {
        wait_for("member in the epoch", || async {
            node.node()
                .group_list()
                .iter()
                .any(|g| g.group_id == id && g.epoch == epoch)
                .then_some(())
        })
        .await?;
    }
    Ok(())
}

fn clock_ticks_per_sec() -> u64 {
    // Linux's USER_HZ is 100 on every supported architecture.
    100
}

/// CPU time of this process's threads named `name`, from `/proc/self/task/*/stat`.
pub fn threads_cpu(name: &str) -> Duration {
    let mut ticks = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the command (which is in parentheses): utime is 14th, stime 15th overall.
        if let Some(rest) = stat.rsplit(')').next() {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
            let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
            ticks += utime + stime;
        }
    }
    Duration::from_millis(ticks * 1000 / clock_ticks_per_sec())
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
pub fn process_memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A relay on its own runtime (threads named [`RELAY_THREAD`]); dropping `stop` shuts it down.
struct RelayThread {
    addr: Multiaddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl RelayThread {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = kith_relay::Config {
            gossip_heartbeat_interval_ms: 200,
            ..kith_relay::Config::ephemeral(dir.path())
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(RELAY_THREAD)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("relay runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                match kith_relay::start(config).await {
                    Ok(relay) => {
                        let _ = ready_tx.send(Ok(relay.listen_addrs[0].clone()));
                        let _ = stopped.await;
                        let _ = relay.shutdown().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                    }
                }
            });
        });
        let addr = ready_rx.recv().context("relay thread died")??;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        })
    }
}

impl Drop for RelayThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One message to a group of `members` (sender included), `offline` of them offline.
pub async fn one_message_to_a_group(members: usize, offline: usize) -> Result<GroupFigures> {
    let relay = RelayThread::start()?;
    let relays = vec![relay.addr.clone()];
    let sender = TestNode::start("sender", relays.clone()).await?;
    let mut others = Vec::with_capacity(members - 1);
    for i in 0..members - 1 {
        others.push(TestNode::start(&format!("m{i}"), relays.clone()).await?);
    }
    // Joins later, to time an add (started now, so its key packages are at the relay).
    let mut newcomer = TestNode::start("newcomer", relays.clone()).await?;
    let ids: Vec<String> = others.iter().map(|n| n.peer_id().to_string()).collect();
    // Members know the sender: its group is joined at once, not an invitation.
    let mut knowing: Vec<&TestNode> = others.iter().collect();
    knowing.push(&newcomer);
    crate::know(&knowing, &[&sender]).await?;
    let create_started = Instant::now();
    let created = sender.node().create_group("bench", &ids).await?;
    let create_call = create_started.elapsed();
    all_at_epoch(&others.iter().collect::<Vec<_>>(), &created.group_id, 1).await?;
    let create_all = create_started.elapsed();
    // The last `offline` members go offline, keeping their homes and addresses.
    let mut away = Vec::new();
    for node in others.iter_mut().rev().take(offline) {
        let addr = node
            .node()
            .listen_addrs()
            .await
            .into_iter()
            .find(|a| !a.to_string().contains("p2p-circuit"))
            .context("a member has no direct address")?;
        node.stop().await;
        away.push(addr);
    }
    let online = members - 1 - offline;

    // Every online member watches for the message.
    let started = Instant::now();
    let mut arrivals = tokio::task::JoinSet::new();
    for node in others.iter().take(online) {
        let mut events = node.node().subscribe();
        arrivals.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::Message { .. }) => return Some(Instant::now()),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                }
            }
        });
    }
    let cpu_before = threads_cpu(RELAY_THREAD);
    let wall_started = Instant::now();
    let sent = sender
        .node()
        .send(&created.group_id, "hello, two hundred", None)
        .await?;
    let mut times = Vec::with_capacity(online);
    while let Some(arrival) = arrivals.join_next().await {
        let at = arrival?.context("a member stopped")?;
        times.push(at.duration_since(started));
    }
    times.sort();
    let online_all = times.last().copied().unwrap_or_default();
    let online_p50 = crate::bench::percentile(&times, 50.0);

    let online_peers: Vec<String> = others
        .iter()
        .take(online)
        .map(|n| n.peer_id().to_string())
        .collect();
    let states = |node: &TestNode| -> HashMap<String, MessageState> {
        node.node()
            .status(&sent.id)
            .map(|s| s.members)
            .unwrap_or_default()
    };
    wait_for("online members' receipts", || async {
        let s = states(&sender);
        online_peers
            .iter()
            .all(|p| s.get(p).is_some_and(|st| *st >= MessageState::Delivered))
            .then_some(())
    })
    .await?;
    let online_receipts = started.elapsed();

    // The offline members return.
    let returning = others.len() - offline;
    let mut watchers = tokio::task::JoinSet::new();
    let returned_at = Instant::now();
    for (node, addr) in others
        .iter_mut()
        .skip(returning)
        .zip(away.into_iter().rev())
    {
        node.restart_on(addr).await?;
        let mut events = node.node().subscribe();
        let already = !node.node().messages(Some(&created.group_id))?.is_empty();
        watchers.spawn(async move {
            if already {
                return Some(Instant::now());
            }
            loop {
                match events.recv().await {
                    Ok(NodeEvent::Message { .. }) => return Some(Instant::now()),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                }
            }
        });
    }
    let mut offline_after_return = Duration::ZERO;
    while let Some(arrival) = watchers.join_next().await {
        let at = arrival?.context("a returning member stopped")?;
        offline_after_return = offline_after_return.max(at.duration_since(returned_at));
    }
    wait_for("every member's receipt", || async {
        (sender.state(&sent.id) >= Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let all_receipts_after_return = returned_at.elapsed();
    let wall = wall_started.elapsed();
    let relay_cpu = threads_cpu(RELAY_THREAD).saturating_sub(cpu_before);
    let (process_rss_kib, process_hwm_kib) = process_memory_kib();

    // One member of the 200 removed, then one added (the group is full until the removal):
    // until every member is in each new epoch.
    use kith_node::features::group::ChangeKind;
    let epoch = sender.node().group_info(&created.group_id).await?.epoch;
    let leaving = others[0].peer_id().to_string();
    let remove_started = Instant::now();
    sender
        .node()
        .change_group(&created.group_id, ChangeKind::Remove, Some(&leaving))
        .await?;
    let remove_call = remove_started.elapsed();
    let mut everyone: Vec<&TestNode> = others.iter().skip(1).collect();
    all_at_epoch(&everyone, &created.group_id, epoch + 1).await?;
    let remove_all = remove_started.elapsed();
    let newcomer_id = newcomer.peer_id().to_string();
    let add_started = Instant::now();
    sender
        .node()
        .change_group(&created.group_id, ChangeKind::Add, Some(&newcomer_id))
        .await?;
    let add_call = add_started.elapsed();
    everyone.push(&newcomer);
    all_at_epoch(&everyone, &created.group_id, epoch + 2).await?;
    let add_all = add_started.elapsed();
    newcomer.stop().await;
    for mut node in others {
        node.stop().await;
    }
    let mut sender = sender;
    sender.stop().await;
    drop(relay);
    Ok(GroupFigures {
        members,
        online,
        offline,
        online_all,
        online_p50,
        online_receipts,
        offline_after_return,
        all_receipts_after_return,
        relay_cpu,
        wall,
        process_rss_kib,
        process_hwm_kib,
        create_call,
        create_all,
        add_call,
        add_all,
        remove_call,
        remove_all,
    })
}
