//! Relay benchmarks: durable deposits per second from many senders, fetch throughput,
//! offline→online delivery latency, and the relay's memory per idle connected node, each next to a
//! bare libp2p baseline measured in the same run.
//!
//! The relay (and the bare baseline server) run in a child process — `kith-bench` re-executes
//! itself with a hidden `serve-relay` / `serve-bare` command — so that their memory can be read
//! from `/proc/<pid>/status` without the load generator's own memory in it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_protocol::mailbox;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, ping, relay, tcp, yamux, Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::bench::{payload_envelope, percentile};
use crate::{RawBehaviourEvent, RawPeer};

/// A relay (or bare server) in a child process. It ends when its standard input closes: on drop,
/// or when this process dies in any way (see [`exit_when_parent_goes`]).
pub struct ChildServer {
    child: Child,
    /// The write end of the child's standard input; closing it tells the child to go.
    parent: Option<ChildStdin>,
    /// Its address, with `/p2p/<id>`.
    pub addr: Multiaddr,
    /// Its peer id.
    pub peer: PeerId,
}

impl ChildServer {
    /// Re-executes this binary with `args` and reads the `LISTEN <addr>` line it prints.
    pub fn spawn(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let parent = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("LISTEN ") else {
            bail!("child server printed {line:?}");
        };
        let addr: Multiaddr = addr.parse()?;
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            bail!("child address {addr} has no peer id");
        };
        Ok(Self {
            child,
            parent,
            addr,
            peer,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's resident memory in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // The child exits on end of input, after removing its data.
        drop(self.parent.take());
        let _ = self.child.wait();
    }
}

/// For a [`ChildServer`] child: exits this process once standard input ends, which happens when
/// the parent drops its handle or dies (even killed outright, which no signal handler sees),
/// first removing `data` if given.
pub fn exit_when_parent_goes(data: Option<std::path::PathBuf>) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        if let Some(data) = data {
            let _ = std::fs::remove_dir_all(data);
        }
        std::process::exit(0);
    });
}

/// The relay config the benchmark runs with: the production defaults, except the per-peer
/// deposit rate, which a handful of load generators would otherwise hit at once, and the
/// limits on new connections from one address and in their handshake at once, which the
/// thousand idle nodes all connecting from loopback at once would otherwise hit.
pub fn bench_relay_config(data: &Path) -> kith_relay::Config {
    let mut config = kith_relay::Config::ephemeral(data);
    config.new_connections_per_ip_per_sec = 100_000;
    config.new_connection_burst_per_ip = 100_000;
    config.max_pending_incoming_connections = 4_096;
    config.deposits_per_sec_per_peer = 1_000_000;
    config.deposit_burst_per_peer = 1_000_000;
    config.mailbox_max_messages = 1_000_000;
    config.mailbox_max_bytes = 1 << 30;
    config.mailbox_max_messages_per_sender = config.mailbox_max_messages;
    config.mailbox_max_bytes_per_sender = config.mailbox_max_bytes;
    config.max_pending_mailbox_requests = 65_536;
    config
}

/// Body of the hidden `serve-relay` command: run a relay until killed.
pub async fn serve_relay(data: &Path) -> Result<()> {
    let relay = kith_relay::start(bench_relay_config(data)).await?;
    println!("LISTEN {}", relay.listen_addrs[0]);
    std::future::pending::<()>().await;
    Ok(())
}

#[derive(NetworkBehaviour)]
struct BareServer {
    relay: relay::Behaviour,
    ping: ping::Behaviour,
}

/// Body of the hidden `serve-bare` command: a bare libp2p circuit relay server (TCP, noise,
/// yamux, ping) with the same relay limits as kith's relay, and nothing else.
pub async fn serve_bare() -> Result<()> {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = kith_relay::Config::default();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| BareServer {
            relay: relay::Behaviour::new(
                key.public().to_peer_id(),
                relay::Config {
                    max_reservations: limits.max_reservations,
                    max_reservations_per_peer: limits.max_reservations_per_peer,
                    reservation_rate_limiters: Vec::new(),
                    circuit_src_rate_limiters: Vec::new(),
                    ..relay::Config::default()
                },
            ),
            ping: ping::Behaviour::default(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            swarm.add_external_address(address.clone());
            println!("LISTEN {}", address.with(Protocol::P2p(peer)));
            break;
        }
    }
    loop {
        swarm.select_next_some().await;
    }
}

#[derive(NetworkBehaviour)]
struct IdleClient {
    relay_client: relay::client::Behaviour,
    ping: ping::Behaviour,
}

/// Connects `count` idle nodes (TCP, noise, yamux, a circuit reservation, ping) to `server` and
/// returns the server's RSS growth per node in KiB, once every reservation is accepted.
pub async fn rss_per_idle_node(server: &ChildServer, count: usize) -> Result<f64> {
    let before = server.rss_kib()?;
    let (ready_tx, mut ready_rx) = mpsc::channel(count);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..count {
        let addr = server.addr.clone();
        let ready = ready_tx.clone();
        clients.spawn(async move {
            let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_relay_client(noise::Config::new, yamux::Config::default)?
                .with_behaviour(|_, relay_client| IdleClient {
                    relay_client,
                    ping: ping::Behaviour::default(),
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
                .build();
            swarm.listen_on(addr.with(Protocol::P2pCircuit))?;
            loop {
                if let SwarmEvent::Behaviour(IdleClientEvent::RelayClient(
                    relay::client::Event::ReservationReqAccepted { .. },
                )) = swarm.select_next_some().await
                {
                    let _ = ready.send(()).await;
                    break;
                }
            }
            loop {
                swarm.select_next_some().await;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        });
    }
    drop(ready_tx);
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in 0..count {
        match tokio::time::timeout_at(deadline.into(), ready_rx.recv()).await {
            Ok(Some(())) => {}
            _ => bail!("only {n} of {count} idle nodes got a reservation"),
        }
    }
    // Let the relay settle (identify, ping) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib()?;
    clients.shutdown().await;
    Ok(after.saturating_sub(before) as f64 / count as f64)
}

/// `senders` bare peers deposit `per_sender` envelopes of `payload` bytes each (window `window`
/// per sender) for 100 recipients; returns durable deposits per second.
pub async fn deposits_per_sec(
    relay: &ChildServer,
    senders: usize,
    per_sender: usize,
    window: usize,
    payload: usize,
) -> Result<f64> {
    let recipients: Vec<PeerId> = (0..100)
        .map(|_| Keypair::generate_ed25519().public().to_peer_id())
        .collect();
    let mut peers = Vec::new();
    for _ in 0..senders {
        let mut peer = RawPeer::new()?;
        let envelopes: Vec<_> = (0..per_sender)
            .map(|i| payload_envelope(&peer.key, recipients[i % recipients.len()], payload))
            .collect();
        // Connect before the clock starts.
        peer.mailbox(
            relay.peer,
            &relay.addr,
            Message::Valid(mailbox::Request::Fetch {
                req_id: 0,
                after: None,
                limit: 1,
            }),
        )
        .await?;
        peers.push((peer, envelopes));
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (mut peer, envelopes) in peers {
        let relay_peer = relay.peer;
        tasks.spawn(async move {
            let (mut sent, mut done, mut in_flight) = (0usize, 0usize, 0usize);
            while done < envelopes.len() {
                while in_flight < window && sent < envelopes.len() {
                    peer.swarm.behaviour_mut().mailbox.send_request(
                        &relay_peer,
                        Message::Valid(mailbox::Request::Deposit {
                            req_id: sent as u64,
                            envelope: envelopes[sent].clone(),
                            class: Default::default(),
                        }),
                    );
                    sent += 1;
                    in_flight += 1;
                }
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Mailbox(event)) =
                    peer.swarm.select_next_some().await
                {
                    match event {
                        libp2p::request_response::Event::Message {
                            message: libp2p::request_response::Message::Response { response, .. },
                            ..
                        } => {
                            if !matches!(response, mailbox::Response::Stored { .. }) {
                                bail!("deposit refused: {response:?}");
                            }
                            done += 1;
                            in_flight -= 1;
                        }
                        libp2p::request_response::Event::OutboundFailure { error, .. } => {
                            bail!("deposit failed: {error}")
                        }
                        _ => {}
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok((senders * per_sender) as f64 / started.elapsed().as_secs_f64())
}

/// Deposits `count` envelopes for one recipient, then the recipient fetches and acks them all in
/// batches; returns fetched messages per second.
pub async fn fetch_per_sec(relay: &ChildServer, count: usize, payload: usize) -> Result<f64> {
    let recipient_key = Keypair::generate_ed25519();
    let recipient = recipient_key.public().to_peer_id();
    let mut sender = RawPeer::new()?;
    for i in 0..count {
        let envelope = payload_envelope(&sender.key, recipient, payload);
        let answer = sender
            .mailbox(
                relay.peer,
                &relay.addr,
                Message::Valid(mailbox::Request::Deposit {
                    req_id: i as u64,
                    envelope,
                    class: Default::default(),
                }),
            )
            .await?;
        if !matches!(answer, mailbox::Response::Stored { .. }) {
            bail!("deposit refused: {answer:?}");
        }
    }
    let mut owner = RawPeer::with_key(recipient_key)?;
    let started = Instant::now();
    let (mut fetched, mut after) = (0usize, None);
    loop {
        let answer = owner
            .mailbox(
                relay.peer,
                &relay.addr,
                Message::Valid(mailbox::Request::Fetch {
                    req_id: 1,
                    after,
                    limit: kith_protocol::limits::MAX_FETCH_BATCH,
                }),
            )
            .await?;
        let mailbox::Response::Batch { items, more, .. } = answer else {
            bail!("fetch refused: {answer:?}");
        };
        fetched += items.len();
        after = items.last().map(|i| i.seq).or(after);
        let seqs = items.iter().map(|i| i.seq).collect();
        owner
            .mailbox(
                relay.peer,
                &relay.addr,
                Message::Valid(mailbox::Request::Ack { req_id: 2, seqs }),
            )
            .await?;
        if !more {
            break;
        }
    }
    if fetched != count {
        bail!("fetched {fetched} of {count}");
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Offline→online delivery: a message waits in the relay; the recipient's node starts; the time
/// from the start call (store open, listeners, relay dial, fetch) until the message is in its
/// store. Returns (p50, p99).
pub async fn offline_to_online(
    relay: &ChildServer,
    samples: usize,
) -> Result<(Duration, Duration)> {
    let mut bob = crate::TestNode::start("bob", vec![relay.addr.clone()]).await?;
    let bob_addr = bob.addr().await;
    let bob_peer = bob.peer_id();
    let mut alice = RawPeer::new()?;
    // A contact's message is shown at once; a stranger's would wait in the requests list.
    let alice_peer = alice.key.public().to_peer_id().to_string();
    bob.node().add_contact("alice", &alice_peer, &[]).await?;
    bob.stop().await;
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let envelope = payload_envelope(&alice.key, bob_peer, 100);
        let id = envelope.id.to_string();
        let answer = alice
            .mailbox(
                relay.peer,
                &relay.addr,
                Message::Valid(mailbox::Request::Deposit {
                    req_id: i as u64,
                    envelope,
                    class: Default::default(),
                }),
            )
            .await?;
        if !matches!(answer, mailbox::Response::Stored { .. }) {
            bail!("deposit refused: {answer:?}");
        }
        let started = Instant::now();
        bob.restart_on(bob_addr.clone()).await?;
        let node = bob.node().clone();
        let mut events = node.subscribe();
        if node.status(&id).is_err() {
            tokio::time::timeout(crate::DEADLINE, async {
                loop {
                    match events.recv().await {
                        Ok(kith_node::NodeEvent::Message { id: got, .. }) if got == id => {
                            return Ok(())
                        }
                        Ok(_) => {}
                        Err(e) => bail!("event stream: {e}"),
                    }
                }
            })
            .await??;
        }
        latencies.push(started.elapsed());
        drop((node, events));
        bob.stop().await;
    }
    latencies.sort();
    Ok((percentile(&latencies, 50.0), percentile(&latencies, 99.0)))
}
