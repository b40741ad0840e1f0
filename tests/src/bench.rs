//! Benchmark building blocks: latency statistics and the bare libp2p baselines that kith's
//! figures are compared against, measured in the same run on the same machine.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use kith_net::codec::Message;
use kith_protocol::envelope::Header;
use kith_protocol::{dm, Body, Destination, Envelope, MessageId};
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::Multiaddr;

use crate::{RawBehaviourEvent, RawPeer};

/// Percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Latency and throughput of one setup.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Median latency of one request, alone on the wire.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Requests per second with many in flight.
    pub per_sec: f64,
}

/// A chat envelope with `payload` bytes of text.
pub fn payload_envelope(
    key: &libp2p::identity::Keypair,
    to: libp2p::PeerId,
    payload: usize,
) -> Envelope {
    Envelope::seal(
        key,
        Header {
            id: MessageId::random(),
            to: Destination::Peer(to),
            sent_at_ms: 0,
            lamport: 1,
            expires_at_ms: None,
        },
        &Body::Chat {
            text: "x".repeat(payload),
        },
    )
    .expect("a small chat body seals")
}

/// A bare libp2p peer on loopback that answers every `/kith/dm/1` request `Accepted` at once
/// (no verification, no store): its peer id, its address, and the task serving it.
async fn bare_dm_server() -> Result<(libp2p::PeerId, Multiaddr, tokio::task::JoinHandle<()>)> {
    let mut server = RawPeer::new()?;
    server
        .swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.swarm.select_next_some().await {
            break address;
        }
    };
    let server_peer = *server.swarm.local_peer_id();
    let serve = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(RawBehaviourEvent::Dm(
                request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) = server.swarm.select_next_some().await
            {
                let req_id = match request {
                    Message::Valid(r) => r.req_id,
                    _ => 0,
                };
                let _ = server
                    .swarm
                    .behaviour_mut()
                    .dm
                    .send_response(channel, dm::Response::Accepted { req_id });
            }
        }
    });
    Ok((server_peer, addr, serve))
}

/// Sends `count` messages of `text` to `to` from `node`, 512 sends in flight.
pub async fn send_many(
    node: kith_node::Node,
    to: &'static str,
    text: String,
    count: usize,
) -> Result<()> {
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..count {
        let node = node.clone();
        let text = text.clone();
        sends.spawn(async move { node.send(to, &text, None).await });
        if sends.len() >= 512 {
            if let Some(r) = sends.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = sends.join_next().await {
        r??;
    }
    Ok(())
}

/// Bare libp2p request-response (TCP, noise, yamux, kith's codec) with a server that answers
/// `Accepted` at once: no verification, no store. `latency_samples` sequential requests, then
/// `count` requests with `window` in flight. With `zero_rtt` the client negotiates each stream's
/// protocol without a round trip, as kith nodes do; libp2p's default waits for one.
pub async fn bare_request_response(
    payload: usize,
    latency_samples: usize,
    count: usize,
    window: usize,
    zero_rtt: bool,
) -> Result<Figures> {
    let mut bare = BareDm::start(payload, zero_rtt).await?;
    let mut samples = Vec::with_capacity(latency_samples);
    bare.time(latency_samples, &mut samples).await?;
    samples.sort();
    Ok(Figures {
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        per_sec: bare.per_sec(count, window).await?,
    })
}

/// A bare request-response client connected to a server that answers `Accepted` at once (see
/// [`bare_request_response`]), ready to time requests.
pub struct BareDm {
    client: RawPeer,
    server_peer: libp2p::PeerId,
    addr: Multiaddr,
    envelope: Envelope,
    serve: tokio::task::JoinHandle<()>,
}

impl BareDm {
    /// Starts the server, connects (in 0-RTT negotiation with `zero_rtt`) and warms up.
    pub async fn start(payload: usize, zero_rtt: bool) -> Result<Self> {
        let (server_peer, addr, serve) = bare_dm_server().await?;
        let client = match zero_rtt {
            true => RawPeer::zero_rtt()?,
            false => RawPeer::new()?,
        };
        let envelope = payload_envelope(&client.key, server_peer, payload);
        let mut bare = Self {
            client,
            server_peer,
            addr,
            envelope,
            serve,
        };
        bare.request(0).await?;
        Ok(bare)
    }

    fn message(&self, i: u64) -> Message<dm::Request> {
        Message::Valid(dm::Request::new(i, self.envelope.clone()))
    }

    async fn request(&mut self, i: u64) -> Result<dm::Response> {
        let request = self.message(i);
        self.client.dm(self.server_peer, &self.addr, request).await
    }

    /// Times `n` requests one after another, adding each latency to `into`.
    pub async fn time(&mut self, n: usize, into: &mut Vec<Duration>) -> Result<()> {
        for i in 0..n {
            let started = Instant::now();
            self.request(i as u64).await?;
            into.push(started.elapsed());
        }
        Ok(())
    }

    /// Requests per second for `count` requests with `window` in flight.
    pub async fn per_sec(&mut self, count: usize, window: usize) -> Result<f64> {
        let envelope = &self.envelope;
        dm_window(&mut self.client, self.server_peer, count, window, |i| {
            Message::Valid(dm::Request::new(i as u64, envelope.clone()))
        })
        .await
    }
}

/// `count` `/kith/dm/1` requests from `client` to `peer` with `window` in flight, request `i`
/// made by `request(i)`; each must be answered `Accepted`. Returns requests per second.
async fn dm_window(
    client: &mut RawPeer,
    peer: libp2p::PeerId,
    count: usize,
    window: usize,
    request: impl Fn(usize) -> Message<dm::Request>,
) -> Result<f64> {
    let started = Instant::now();
    let (mut sent, mut done, mut in_flight) = (0usize, 0usize, 0usize);
    while done < count {
        while in_flight < window && sent < count {
            client
                .swarm
                .behaviour_mut()
                .dm
                .send_request(&peer, request(sent));
            sent += 1;
            in_flight += 1;
        }
        match client.swarm.select_next_some().await {
            SwarmEvent::Behaviour(RawBehaviourEvent::Dm(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            })) => {
                anyhow::ensure!(
                    matches!(response, dm::Response::Accepted { .. }),
                    "refused: {response:?}"
                );
                done += 1;
                in_flight -= 1;
            }
            SwarmEvent::Behaviour(RawBehaviourEvent::Dm(
                request_response::Event::OutboundFailure { error, .. },
            )) => anyhow::bail!("request failed: {error}"),
            _ => {}
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

impl Drop for BareDm {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

/// The node store's durable write: `samples` single commits one after another (the latency of
/// one flush), `samples` more each after an idle gap, then `count` commits from `concurrency`
/// tasks at once (group commit at work).
/// Every commit changes a value (sled skips a write that changes nothing, and its flush then has
/// nothing to sync).
pub async fn store_commits(
    samples: usize,
    count: usize,
    concurrency: usize,
) -> Result<StoreFigures> {
    use kith_node::core::store::{Batch, Contact, Store};
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let batch = move |i: usize| {
        let mut batch = Batch::new();
        batch.put_contact(&Contact {
            name: format!("c{}", i % 1000),
            peer_id: peer,
            addrs: vec![format!("{i:0>100}")],
            relays: vec![],
        });
        batch
    };
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        store.commit(batch(i)).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    // One at a time with the disk idle in between, as in the send → delivered loop: a sync that
    // follows another at once is cheaper on this machine's virtual disk than a lone one.
    let mut lone = Vec::with_capacity(samples);
    for i in 0..samples {
        let idle = Instant::now();
        while idle.elapsed() < LONE_COMMIT_GAP {
            std::hint::spin_loop();
        }
        let started = Instant::now();
        store.commit(batch(samples + i)).await?;
        lone.push(started.elapsed());
    }
    lone.sort();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let store = store.clone();
        let per = count / concurrency;
        tasks.spawn(async move {
            for i in 0..per {
                store.commit(batch(worker * per + i)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    Ok(StoreFigures {
        back_to_back: Figures {
            p50: percentile(&latencies, 50.0),
            p99: percentile(&latencies, 99.0),
            per_sec: (count / concurrency * concurrency) as f64 / elapsed.as_secs_f64(),
        },
        lone_p50: percentile(&lone, 50.0),
        lone_p99: percentile(&lone, 99.0),
    })
}

/// The idle time before each lone commit of [`store_commits`]: about one send → delivered round.
pub const LONE_COMMIT_GAP: Duration = Duration::from_micros(500);

/// What [`store_commits`] measured.
pub struct StoreFigures {
    /// Commits one right after another (p50, p99), and from many tasks at once (per second).
    pub back_to_back: Figures,
    /// Median commit after [`LONE_COMMIT_GAP`] of idle time.
    pub lone_p50: Duration,
    /// 99th percentile commit after [`LONE_COMMIT_GAP`] of idle time.
    pub lone_p99: Duration,
}

/// Only the recipient side of kith: a bare peer sends `count` pre-signed envelopes with `window`
/// in flight to a kith node, which verifies, stores and flushes each before answering.
pub async fn kith_inbound_only(payload: usize, count: usize, window: usize) -> Result<f64> {
    let bob = crate::TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    let bob_peer = bob.peer_id();
    let mut client = RawPeer::new()?;
    let envelopes: Vec<_> = (0..count)
        .map(|_| payload_envelope(&client.key, bob_peer, payload))
        .collect();
    client
        .dm(
            bob_peer,
            &addr,
            Message::Valid(dm::Request::new(
                0,
                payload_envelope(&client.key, bob_peer, payload),
            )),
        )
        .await?;
    dm_window(&mut client, bob_peer, count, window, |i| {
        Message::Valid(dm::Request::new(i as u64, envelopes[i].clone()))
    })
    .await
}
