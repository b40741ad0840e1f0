//! The honest pair that keeps using the relay while it is attacked: a sender depositing at a
//! steady rate for one recipient, which fetches and acks its mailbox (and answers the relay's
//! pushes, as a node connected to its relay does). The sender obeys `retry_after_ms`.
//!
//! Both run on their own single-threaded runtime in their own thread, so that the attackers'
//! tasks in the benchmark's runtime do not queue in front of them: what their latency shows is
//! the relay's (and the shared machine's) doing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_protocol::{dm, mailbox, Envelope, MessageId};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::watch;

use crate::{RawBehaviourEvent, RawPeer};

/// Bytes of text in each honest message.
const PAYLOAD_BYTES: usize = 200;

/// How often the recipient fetches its mailbox.
const FETCH_EVERY: Duration = Duration::from_millis(100);

/// Most deposits the sender has in flight at once, as a node's outbox bounds its requests to
/// one relay (the relay drops streams beyond `max_streams_per_connection`); more wait their
/// turn, their latency counted from their first turn's start.
const MAX_IN_FLIGHT: usize = 32;

/// How long the sender waits before retrying a deposit that failed without an answer.
const FAILURE_RETRY: Duration = Duration::from_millis(200);

/// What the honest pair observed.
#[derive(Debug, Default)]
pub struct Stats {
    /// Per stored deposit: when it was first tried, and how long until the relay stored it
    /// (retries included).
    pub stored: Vec<(Instant, Duration)>,
    /// When each deposit not yet stored was first tried.
    pub waiting: HashMap<MessageId, Instant>,
    /// Messages the relay answered `Stored`.
    pub deposited: HashSet<MessageId>,
    /// Honest messages the recipient received (fetched or pushed).
    pub received: HashSet<MessageId>,
    /// Refusals the sender was given (each obeyed).
    pub refusals: u64,
}

impl Stats {
    /// Deposit latencies of the messages first tried in `[from, to)`; those still waiting
    /// count with their age at `now` (a lower bound). Sorted.
    pub fn latencies(&self, from: Instant, to: Instant, now: Instant) -> Vec<Duration> {
        let mut out: Vec<Duration> = self
            .stored
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, l)| *l)
            .chain(
                self.waiting
                    .values()
                    .filter(|at| **at >= from && **at < to)
                    .map(|at| now.saturating_duration_since(*at)),
            )
            .collect();
        out.sort();
        out
    }

    /// Honest messages stored by the relay that the recipient has not received.
    pub fn missing(&self) -> usize {
        self.deposited.difference(&self.received).count()
    }
}

/// The running pair; stopped when dropped.
pub struct Honest {
    recipient: PeerId,
    stats: Arc<Mutex<Stats>>,
    sending: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Honest {
    /// Starts the pair against `relay` at `addr`, the sender depositing `rate` messages a second,
    /// on the relay's CPUs or, `beside_attackers`, on the attackers' (see `cpu_split`).
    pub fn start(
        relay: PeerId,
        addr: Multiaddr,
        rate: u32,
        beside_attackers: bool,
    ) -> Result<Self> {
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (sending, sending_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        let recipient_key = libp2p::identity::Keypair::generate_ed25519();
        let recipient = RawPeer::with_key(recipient_key.clone())?;
        let to = recipient_key.public().to_peer_id();
        let sender = RawPeer::new()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("honest".into())
                .spawn(move || {
                    // On the relay's CPUs, off the attackers' core, or on theirs at a higher
                    // priority (see `cpu_split`).
                    if let Some((relay_cpus, attacker_cpus)) = super::cpu_split() {
                        super::pin(if beside_attackers {
                            &attacker_cpus
                        } else {
                            &relay_cpus
                        });
                    }
                    runtime.block_on(async move {
                        let receive = receive(
                            recipient,
                            relay,
                            addr.clone(),
                            stats.clone(),
                            stop_rx.clone(),
                        );
                        let send = send(sender, relay, addr, to, rate, stats, sending_rx, stop_rx);
                        let (a, b) = tokio::join!(send, receive);
                        a.and(b)
                    })
                })?
        };
        Ok(Self {
            recipient: to,
            stats,
            sending,
            stop,
            thread: Some(thread),
        })
    }

    /// The recipient's peer id.
    pub fn recipient(&self) -> PeerId {
        self.recipient
    }

    /// The figures so far.
    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    /// Stops sending new messages; the ones waiting are still retried.
    pub fn stop_sending(&self) {
        let _ = self.sending.send(false);
    }

    /// Stops both and reports an error either met.
    pub fn finish(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the honest pair's thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Honest {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// A deposit not yet stored.
struct Pending {
    envelope: Envelope,
    first: Instant,
}

#[allow(clippy::too_many_arguments)]
async fn send(
    mut peer: RawPeer,
    relay: PeerId,
    addr: Multiaddr,
    to: PeerId,
    rate: u32,
    stats: Arc<Mutex<Stats>>,
    sending: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    peer.swarm.add_peer_address(relay, addr);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut in_flight: HashMap<OutboundRequestId, Pending> = HashMap::new();
    let mut retries: Vec<(Instant, Pending)> = Vec::new();
    let mut queue: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let deposit = |peer: &mut RawPeer, pending: Pending, req_id: &mut u64| {
        *req_id += 1;
        let id = peer.swarm.behaviour_mut().mailbox.send_request(
            &relay,
            Message::Valid(mailbox::Request::Deposit {
                req_id: *req_id,
                envelope: pending.envelope.clone(),
                class: mailbox::DepositClass::Message,
            }),
        );
        (id, pending)
    };
    let mut req_id = 0u64;
    let mut lamport = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick.tick() => {
                let now = Instant::now();
                if *sending.borrow() {
                    lamport += 1;
                    let envelope = honest_envelope(&peer.key, to, lamport)?;
                    lock(&stats).waiting.insert(envelope.id, now);
                    queue.push_back(Pending { envelope, first: now });
                }
                let (due, later) = std::mem::take(&mut retries)
                    .into_iter()
                    .partition::<Vec<_>, _>(|(at, _)| *at <= now);
                retries = later;
                queue.extend(due.into_iter().map(|(_, p)| p));
                while in_flight.len() < MAX_IN_FLIGHT {
                    let Some(p) = queue.pop_front() else { break };
                    let (id, p) = deposit(&mut peer, p, &mut req_id);
                    in_flight.insert(id, p);
                }
            }
            event = peer.swarm.select_next_some() => {
                let SwarmEvent::Behaviour(RawBehaviourEvent::Mailbox(event)) = event else {
                    continue;
                };
                match event {
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    } => {
                        let Some(p) = in_flight.remove(&request_id) else { continue };
                        match response {
                            mailbox::Response::Stored { .. } => {
                                let mut s = lock(&stats);
                                s.waiting.remove(&p.envelope.id);
                                s.deposited.insert(p.envelope.id);
                                s.stored.push((p.first, p.first.elapsed()));
                            }
                            mailbox::Response::Rejected { retry_after_ms, reason, .. } => {
                                lock(&stats).refusals += 1;
                                let wait = retry_after_ms
                                    .map(Duration::from_millis)
                                    .unwrap_or(FAILURE_RETRY);
                                tracing::debug!(?reason, ?wait, "honest deposit refused");
                                retries.push((Instant::now() + wait, p));
                            }
                            other => bail!("unexpected answer to a deposit: {other:?}"),
                        }
                    }
                    request_response::Event::OutboundFailure { request_id, error, .. } => {
                        if let Some(p) = in_flight.remove(&request_id) {
                            tracing::debug!(%error, "honest deposit failed");
                            retries.push((Instant::now() + FAILURE_RETRY, p));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// An honest chat message to `to`.
fn honest_envelope(key: &libp2p::identity::Keypair, to: PeerId, lamport: u64) -> Result<Envelope> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination};
    Ok(Envelope::seal(
        key,
        Header {
            id: MessageId::random(),
            to: Destination::Peer(to),
            sent_at_ms: 1,
            lamport,
            expires_at_ms: None,
        },
        &Body::Chat {
            text: "h".repeat(PAYLOAD_BYTES),
        },
    )?)
}

/// What the recipient is waiting for from the relay.
enum Asked {
    Nothing,
    Fetch(OutboundRequestId),
    Ack(OutboundRequestId, bool),
}

async fn receive(
    mut peer: RawPeer,
    relay: PeerId,
    addr: Multiaddr,
    stats: Arc<Mutex<Stats>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    peer.swarm.add_peer_address(relay, addr);
    let mut tick = tokio::time::interval(FETCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked = Asked::Nothing;
    let mut req_id = 0u64;
    let fetch = |peer: &mut RawPeer, req_id: &mut u64| {
        *req_id += 1;
        Asked::Fetch(peer.swarm.behaviour_mut().mailbox.send_request(
            &relay,
            Message::Valid(mailbox::Request::Fetch {
                req_id: *req_id,
                after: None,
                limit: kith_protocol::limits::MAX_FETCH_BATCH,
            }),
        ))
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick.tick() => {
                if matches!(asked, Asked::Nothing) {
                    asked = fetch(&mut peer, &mut req_id);
                }
            }
            event = peer.swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(RawBehaviourEvent::Dm(request_response::Event::Message {
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    // A push from the relay: keep what it carries, answer as a node would.
                    let response = match request {
                        Message::Valid(request) => {
                            let req_id = request.req_id;
                            let mut s = lock(&stats);
                            for envelope in request.into_envelopes() {
                                s.received.insert(envelope.id);
                            }
                            dm::Response::Accepted { req_id }
                        }
                        _ => dm::Response::Rejected {
                            req_id: 0,
                            reason: kith_protocol::Reject::Malformed,
                        },
                    };
                    let _ = peer.swarm.behaviour_mut().dm.send_response(channel, response);
                }
                SwarmEvent::Behaviour(RawBehaviourEvent::Mailbox(event)) => match event {
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    } => {
                        asked = match (std::mem::replace(&mut asked, Asked::Nothing), response) {
                            (Asked::Fetch(id), mailbox::Response::Batch { items, more, .. })
                                if id == request_id =>
                            {
                                let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
                                {
                                    let mut s = lock(&stats);
                                    for item in &items {
                                        s.received.insert(item.envelope.id);
                                    }
                                }
                                if seqs.is_empty() {
                                    Asked::Nothing
                                } else {
                                    req_id += 1;
                                    Asked::Ack(
                                        peer.swarm.behaviour_mut().mailbox.send_request(
                                            &relay,
                                            Message::Valid(mailbox::Request::Ack { req_id, seqs }),
                                        ),
                                        more,
                                    )
                                }
                            }
                            (Asked::Ack(id, true), _) if id == request_id => {
                                fetch(&mut peer, &mut req_id)
                            }
                            (Asked::Ack(id, false), _) if id == request_id => Asked::Nothing,
                            (_, answer) => {
                                tracing::debug!(?answer, "honest recipient: unexpected answer");
                                Asked::Nothing
                            }
                        };
                    }
                    request_response::Event::OutboundFailure { error, .. } => {
                        tracing::debug!(%error, "honest recipient: request failed");
                        asked = Asked::Nothing;
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
}
