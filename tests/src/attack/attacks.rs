//! The attacks: each starts its attackers as tasks in a [`JoinSet`] and runs until the set is
//! shut down; each attacker counts what it sends in [`Counters`]. They are loopback load
//! generators, paced where a real attacker would be (a write every few hundred milliseconds to
//! keep a trickle going), and otherwise as fast as the relay answers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use kith_net::codec::Message;
use kith_protocol::{blob, group, mailbox, prekeys, presence};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::task::JoinSet;

use crate::bench::payload_envelope;
use crate::RawPeer;

/// One attack of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Many streams on every protocol, each claiming the largest frame its protocol allows and
    /// trickling bytes, from many fresh identities (memory).
    BigFrames,
    /// Many connections from one identity and from many fresh ones that reconnect as fresh
    /// ones again (connection limits, handshakes).
    ConnectionFlood,
    /// Deposits of the largest chat messages for random recipients from fresh identities, each
    /// dropped for a new one at its rate limit (the mailbox's disk budget).
    DepositFill,
    /// Blob uploads of random chunks from fresh identities, each up to its quota (the blob
    /// store's disk budget).
    BlobFill,
    /// Fresh identities create groups naming the victim (the honest recipient) and loop
    /// removing and adding it, each change announced into the victim's mailbox.
    GroupAbuse,
    /// Strangers fill a mailbox, then one sender hammers it with deposits, ignoring
    /// `retry_after_ms`, 64 in flight.
    RetryStorm,
    /// Malformed frames on every protocol the relay serves: random bytes, CBOR of the wrong
    /// shape, empty frames, oversize claims and truncated frames.
    Garbage,
    /// Not an attack: two attacker threads spin and send nothing. A control for what sharing
    /// this machine's cores with the attackers costs the honest pair by itself.
    CpuOnly,
}

impl Attack {
    /// Every attack, in the order the benchmark runs them.
    pub const ALL: [Attack; 7] = [
        Attack::BigFrames,
        Attack::ConnectionFlood,
        Attack::DepositFill,
        Attack::BlobFill,
        Attack::GroupAbuse,
        Attack::RetryStorm,
        Attack::Garbage,
    ];

    /// A short name for tables and `--attack-only`.
    pub fn name(self) -> &'static str {
        match self {
            Attack::BigFrames => "big-frames",
            Attack::ConnectionFlood => "connection-flood",
            Attack::DepositFill => "deposit-fill",
            Attack::BlobFill => "blob-fill",
            Attack::GroupAbuse => "group-abuse",
            Attack::RetryStorm => "retry-storm",
            Attack::Garbage => "garbage",
            Attack::CpuOnly => "cpu-only",
        }
    }

    /// What it does, for the report.
    pub fn describe(self, scale: usize) -> String {
        match self {
            Attack::BigFrames => format!(
                "{} fresh identities, one connection each, hold 2 streams per protocol (mailbox, presence, group, blob, keys), each claiming its protocol's largest request and writing 1 KiB every 250 ms",
                20 * scale
            ),
            Attack::ConnectionFlood => format!(
                "16 connections from one identity and {} fresh identities that each connect, fetch every 200 ms for 1 s, and reconnect as a new identity",
                40 * scale
            ),
            Attack::DepositFill => format!(
                "{} tasks deposit 16 KiB chat messages for random recipients, a fresh identity every 300 deposits (the per-peer burst)",
                8 * scale
            ),
            Attack::BlobFill => format!(
                "{} tasks upload random 256 KiB chunks (Begin, then Put until refused), a fresh identity each time its quota is full",
                2 * scale
            ),
            Attack::GroupAbuse => format!(
                "{} tasks: a fresh identity creates a group naming the victim, then removes and adds it until refused, then a new identity",
                4 * scale
            ),
            Attack::RetryStorm => "4 strangers fill a mailbox to its per-recipient limit (250 deposits each), then one sender deposits into it with 64 in flight, each answer followed by another deposit at once, ignoring retry_after_ms".into(),
            Attack::Garbage => format!(
                "{} tasks send malformed frames on all 5 protocols, 32 in flight each: random bytes, wrong CBOR, empty, oversize claims, truncated; each comes back as a fresh identity when the relay closes or refuses its connection",
                2 * scale
            ),
            Attack::CpuOnly => {
                "no traffic: two attacker threads spin, as busy as the attacks keep them".into()
            }
        }
    }

    /// Parses [`Attack::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// What the attackers sent.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests, streams and connections attempted.
    pub sent: AtomicU64,
}

impl Counters {
    pub(super) fn add(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// The relay under attack.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its peer id.
    pub peer: PeerId,
    /// Its address.
    pub addr: Multiaddr,
    /// The honest recipient, whom group abuse names.
    pub victim: PeerId,
    /// `mailbox_max_messages` of the relay (what fills a mailbox).
    pub mailbox_max_messages: u64,
    /// `mailbox_max_messages_per_sender`.
    pub mailbox_max_messages_per_sender: u64,
    /// `blob_max_file_bytes`.
    pub blob_max_file_bytes: u64,
}

/// Starts `attack` against `target` in `tasks`; `scale` multiplies the number of attackers.
pub fn launch(
    attack: Attack,
    target: &Target,
    scale: usize,
    counters: &Arc<Counters>,
    tasks: &mut JoinSet<()>,
    on: &tokio::runtime::Handle,
) {
    let spawn = |tasks: &mut JoinSet<()>,
                 f: futures::future::BoxFuture<'static, anyhow::Result<()>>| {
        tasks.spawn_on(
            async move {
                if let Err(e) = f.await {
                    tracing::debug!("attacker ended: {e:#}");
                }
            },
            on,
        );
    };
    let t = target.clone();
    let c = counters.clone();
    match attack {
        Attack::BigFrames => {
            for _ in 0..20 * scale {
                spawn(tasks, Box::pin(big_frames(t.clone(), c.clone())));
            }
        }
        Attack::ConnectionFlood => {
            let key = Keypair::generate_ed25519();
            for _ in 0..16 {
                spawn(
                    tasks,
                    Box::pin(hold_connection(t.clone(), c.clone(), key.clone())),
                );
            }
            for _ in 0..40 * scale {
                spawn(tasks, Box::pin(churn_connections(t.clone(), c.clone())));
            }
        }
        Attack::DepositFill => {
            for _ in 0..8 * scale {
                spawn(tasks, Box::pin(deposit_fill(t.clone(), c.clone())));
            }
        }
        Attack::BlobFill => {
            for _ in 0..2 * scale {
                spawn(tasks, Box::pin(blob_fill(t.clone(), c.clone())));
            }
        }
        Attack::GroupAbuse => {
            for _ in 0..4 * scale {
                spawn(tasks, Box::pin(group_abuse(t.clone(), c.clone())));
            }
        }
        Attack::RetryStorm => spawn(tasks, Box::pin(retry_storm(t, c))),
        Attack::Garbage => {
            for _ in 0..2 * scale {
                spawn(tasks, Box::pin(garbage(t.clone(), c.clone())));
            }
        }
        Attack::CpuOnly => {
            for _ in 0..2 {
                spawn(tasks, Box::pin(spin()));
            }
        }
    }
}

/// Keeps a thread busy, yielding every millisecond (so that the task can be shut down).
async fn spin() -> anyhow::Result<()> {
    loop {
        let until = std::time::Instant::now() + Duration::from_millis(1);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        tokio::task::yield_now().await;
    }
}

/// Each request protocol the relay serves, with the largest request it reads.
const PROTOCOLS: [(&str, usize); 5] = [
    (mailbox::PROTOCOL, mailbox::MAX_REQUEST_BYTES),
    (presence::PROTOCOL, presence::MAX_FRAME_BYTES),
    (group::PROTOCOL, group::MAX_REQUEST_BYTES),
    (blob::PROTOCOL, blob::MAX_FRAME_BYTES),
    (prekeys::PROTOCOL, prekeys::MAX_FRAME_BYTES),
];

/// Raw outbound streams on each of the relay's protocols (see `kith_node::net::dm_streams`).
#[derive(NetworkBehaviour)]
#[behaviour(to_swarm = "std::convert::Infallible")]
struct Streams {
    mailbox: kith_node::net::dm_streams::Behaviour,
    presence: kith_node::net::dm_streams::Behaviour,
    group: kith_node::net::dm_streams::Behaviour,
    blob: kith_node::net::dm_streams::Behaviour,
    keys: kith_node::net::dm_streams::Behaviour,
}

/// A swarm of `behaviour` for `key` over TCP (noise, yamux), connections idle for a minute.
pub fn tcp_swarm<B: NetworkBehaviour>(
    key: Keypair,
    behaviour: impl FnOnce() -> B,
) -> anyhow::Result<Swarm<B>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| behaviour())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// A frame header claiming `len` bytes.
pub(super) fn header(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

async fn big_frames(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    let (events, _inbound) = tokio::sync::mpsc::channel(1);
    let mut handles = Vec::new();
    let mut make = |name: &'static str| {
        let (behaviour, streams) =
            kith_node::net::dm_streams::Behaviour::new(StreamProtocol::new(name), events.clone());
        handles.push((
            streams,
            PROTOCOLS.iter().find(|p| p.0 == name).map_or(0, |p| p.1),
        ));
        behaviour
    };
    let behaviour = Streams {
        mailbox: make(mailbox::PROTOCOL),
        presence: make(presence::PROTOCOL),
        group: make(group::PROTOCOL),
        blob: make(blob::PROTOCOL),
        keys: make(prekeys::PROTOCOL),
    };
    let mut swarm = tcp_swarm(Keypair::generate_ed25519(), || behaviour)?;
    swarm.dial(t.addr.clone())?;
    c.add(1);
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let _driver = AbortOnDrop(driver);
    let chunk = vec![0xa5u8; 1024];
    let mut held = Vec::new();
    loop {
        for (streams, max) in &handles {
            while let Some(mut taken) = streams.take(t.peer) {
                c.add(1);
                let mut first = header(*max).to_vec();
                first.extend_from_slice(&chunk);
                if taken.stream.write_all(&first).await.is_ok() {
                    held.push(taken);
                }
            }
        }
        let mut kept = Vec::with_capacity(held.len());
        for mut taken in held.drain(..) {
            let ok =
                taken.stream.write_all(&chunk).await.is_ok() && taken.stream.flush().await.is_ok();
            if ok {
                kept.push(taken);
            }
        }
        held = kept;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Aborts its task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn fetch() -> Message<mailbox::Request> {
    Message::Valid(mailbox::Request::Fetch {
        req_id: 1,
        after: None,
        limit: 1,
    })
}

async fn hold_connection(t: Target, c: Arc<Counters>, key: Keypair) -> anyhow::Result<()> {
    let mut peer = RawPeer::with_key(key)?;
    loop {
        c.add(1);
        let _ = peer.mailbox(t.peer, &t.addr, fetch()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn churn_connections(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    loop {
        let mut peer = RawPeer::new()?;
        for _ in 0..5 {
            c.add(1);
            if peer.mailbox(t.peer, &t.addr, fetch()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn deposit_fill(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    loop {
        let mut peer = RawPeer::new()?;
        for i in 0..300u64 {
            let to = Keypair::generate_ed25519().public().to_peer_id();
            let envelope = payload_envelope(&peer.key, to, kith_protocol::limits::MAX_TEXT_BYTES);
            c.add(1);
            let request = Message::Valid(mailbox::Request::Deposit {
                req_id: i,
                envelope,
                class: mailbox::DepositClass::Message,
            });
            if peer.mailbox(t.peer, &t.addr, request).await.is_err() {
                break;
            }
        }
    }
}

/// A swarm speaking `/kith/blob/1`, `/kith/presence/1` and `/kith/keys/1` (besides
/// [`RawPeer`]'s protocols), for uploads and garbage.
#[derive(NetworkBehaviour)]
struct Prober {
    mailbox: request_response::Behaviour<kith_net::MailboxCodec>,
    presence: request_response::Behaviour<kith_net::PresenceCodec>,
    group: request_response::Behaviour<kith_net::GroupCodec>,
    blob: request_response::Behaviour<kith_net::BlobCodec>,
    keys: request_response::Behaviour<kith_net::KeysCodec>,
}

fn prober(key: Keypair) -> anyhow::Result<Swarm<Prober>> {
    fn rr<C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static>(
        codec: C,
        name: &'static str,
    ) -> request_response::Behaviour<C> {
        request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(name), ProtocolSupport::Outbound)],
            kith_net::request_response_config(),
        )
    }
    tcp_swarm(key, || Prober {
        mailbox: rr(
            kith_net::MailboxCodec::new(mailbox::MAX_FRAME_BYTES),
            mailbox::PROTOCOL,
        ),
        presence: rr(
            kith_net::PresenceCodec::new(presence::MAX_FRAME_BYTES),
            presence::PROTOCOL,
        ),
        group: rr(
            kith_net::GroupCodec::new(group::MAX_FRAME_BYTES),
            group::PROTOCOL,
        ),
        blob: rr(
            kith_net::BlobCodec::new(blob::MAX_FRAME_BYTES),
            blob::PROTOCOL,
        ),
        keys: rr(
            kith_net::KeysCodec::new(prekeys::MAX_FRAME_BYTES),
            prekeys::PROTOCOL,
        ),
    })
}

/// Whether an event of the prober is the end of one of its requests (answer or failure).
fn is_answer(event: &SwarmEvent<ProberEvent>) -> bool {
    use request_response::Event as E;
    macro_rules! ends {
        ($e:expr) => {
            matches!(
                $e,
                E::Message {
                    message: request_response::Message::Response { .. },
                    ..
                } | E::OutboundFailure { .. }
            )
        };
    }
    match event {
        SwarmEvent::Behaviour(ProberEvent::Mailbox(e)) => ends!(e),
        SwarmEvent::Behaviour(ProberEvent::Presence(e)) => ends!(e),
        SwarmEvent::Behaviour(ProberEvent::Group(e)) => ends!(e),
        SwarmEvent::Behaviour(ProberEvent::Blob(e)) => ends!(e),
        SwarmEvent::Behaviour(ProberEvent::Keys(e)) => ends!(e),
        _ => false,
    }
}

/// One blob request, answered or failed.
async fn blob_request(
    swarm: &mut Swarm<Prober>,
    relay: PeerId,
    request: blob::Request,
) -> anyhow::Result<blob::Response> {
    let id = swarm
        .behaviour_mut()
        .blob
        .send_request(&relay, Message::Valid(request));
    let answer = async {
        loop {
            if let SwarmEvent::Behaviour(ProberEvent::Blob(event)) = swarm.select_next_some().await
            {
                match event {
                    request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    } if request_id == id => return Ok(response),
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    } if request_id == id => {
                        anyhow::bail!("blob request failed: {error}")
                    }
                    _ => {}
                }
            }
        }
    };
    tokio::time::timeout(crate::DEADLINE, answer).await?
}

async fn blob_fill(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    let mut req_id = 0u64;
    loop {
        let mut swarm = prober(Keypair::generate_ed25519())?;
        swarm.add_peer_address(t.peer, t.addr.clone());
        req_id += 1;
        c.add(1);
        let begin = blob::Request::Begin {
            req_id,
            size: t.blob_max_file_bytes,
        };
        if !matches!(
            blob_request(&mut swarm, t.peer, begin).await,
            Ok(blob::Response::Ready { .. })
        ) {
            continue;
        }
        loop {
            let bytes: Vec<u8> = (0..blob::CHUNK_BYTES).map(|_| rand_byte()).collect();
            req_id += 1;
            c.add(1);
            let put = blob::Request::Put {
                req_id,
                hash: blob::Hash::of(&bytes),
                bytes,
                expires_at_ms: None,
            };
            if !matches!(
                blob_request(&mut swarm, t.peer, put).await,
                Ok(blob::Response::Stored { .. })
            ) {
                break;
            }
        }
    }
}

/// A byte from a cheap generator seeded per thread (random enough that chunks differ).
fn rand_byte() -> u8 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1,
        );
    }
    STATE.with(|s| {
        // xorshift64
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 24) as u8
    })
}

async fn group_abuse(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    use kith_protocol::group::{Change, Request, Response};
    let relay_addr = t.addr.to_string();
    loop {
        let mut peer = RawPeer::new()?;
        let group = kith_protocol::GroupId::random();
        let mut version = 0u64;
        let mut changes = std::iter::once(Change::Create {
            name: "spam".into(),
            relay: relay_addr.clone(),
            members: BTreeSet::from([t.victim]),
        })
        .chain(
            [
                Change::Remove { member: t.victim },
                Change::Add { member: t.victim },
            ]
            .into_iter()
            .cycle(),
        );
        for change in changes.by_ref() {
            // Junk commits: the relay orders them by epoch without reading them. Each of these
            // operations commits, so the epoch keeps step with the version.
            let (op, handshake) = crate::op_with_junk_commit(group, version, version, change);
            let op = group::seal_op(&peer.key, op, 1)?;
            c.add(1);
            match peer
                .group(
                    t.peer,
                    &t.addr,
                    Request::Submit {
                        req_id: version,
                        op,
                        handshake,
                    },
                )
                .await
            {
                Ok(Response::Applied { version: v, .. }) => version = v,
                _ => break,
            }
        }
    }
}

async fn retry_storm(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    let victim = Keypair::generate_ed25519().public().to_peer_id();
    // Fill the victim's mailbox: each stranger up to its share and its burst.
    let per_stranger = t.mailbox_max_messages_per_sender.min(250);
    let strangers = t.mailbox_max_messages.div_ceil(per_stranger.max(1));
    for _ in 0..strangers {
        deposits(&mut RawPeer::new()?, &t, victim, Some(per_stranger), &c).await;
    }
    // The storm: each refusal answered by another deposit at once.
    deposits(&mut RawPeer::new()?, &t, victim, None, &c).await;
    Ok(())
}

/// Deposits small messages for `to`, 64 in flight, each answer (whatever it says) followed by
/// the next deposit at once: `count` of them, or until the task is stopped.
async fn deposits(peer: &mut RawPeer, t: &Target, to: PeerId, count: Option<u64>, c: &Counters) {
    peer.swarm.add_peer_address(t.peer, t.addr.clone());
    let (mut sent, mut answered) = (0u64, 0u64);
    let send = |peer: &mut RawPeer, sent: &mut u64| {
        if count.is_some_and(|n| *sent >= n) {
            return;
        }
        *sent += 1;
        c.add(1);
        peer.swarm.behaviour_mut().mailbox.send_request(
            &t.peer,
            Message::Valid(mailbox::Request::Deposit {
                req_id: *sent,
                envelope: payload_envelope(&peer.key, to, 100),
                class: mailbox::DepositClass::Message,
            }),
        );
    };
    for _ in 0..64 {
        send(peer, &mut sent);
    }
    while count.is_none_or(|n| answered < n) {
        // Once the relay bans this peer, every request fails at once (the dial is refused), so
        // the swarm may always have an event ready: yield, or the task could never be stopped.
        tokio::task::yield_now().await;
        if let SwarmEvent::Behaviour(crate::RawBehaviourEvent::Mailbox(
            request_response::Event::Message {
                message: request_response::Message::Response { .. },
                ..
            }
            | request_response::Event::OutboundFailure { .. },
        )) = peer.swarm.select_next_some().await
        {
            answered += 1;
            send(peer, &mut sent);
        }
    }
}

/// The malformed frames sent on each protocol: (bytes, as written, header included).
pub(super) fn garbage_frames(max: usize) -> Vec<Vec<u8>> {
    let framed = |body: &[u8]| {
        let mut f = header(body.len()).to_vec();
        f.extend_from_slice(body);
        f
    };
    let random: Vec<u8> = (0..512).map(|_| rand_byte()).collect();
    let mut wrong_cbor = Vec::new();
    let _ = ciborium::into_writer(&("Deposit", 7u8, [1u8, 2, 3]), &mut wrong_cbor);
    // An array nested far deeper than any request.
    let deep = vec![0x81u8; 4096];
    let mut truncated = header(1000).to_vec();
    truncated.extend_from_slice(&[0xa1; 10]);
    vec![
        framed(&random),
        framed(&wrong_cbor),
        framed(&deep),
        framed(&[]),
        header(max + 1).to_vec(),
        header(u32::MAX as usize).to_vec(),
        truncated,
        vec![0x00, 0x01],
    ]
}

/// Sends garbage with one identity until the relay closes its connection or refuses it (a
/// ban), then comes back as a fresh identity.
async fn garbage(t: Target, c: Arc<Counters>) -> anyhow::Result<()> {
    let frames: Vec<(usize, Vec<u8>)> = PROTOCOLS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, max))| garbage_frames(*max).into_iter().map(move |f| (i, f)))
        .collect();
    loop {
        garbage_as_one(&t, &c, &frames).await?;
    }
}

async fn garbage_as_one(
    t: &Target,
    c: &Counters,
    frames: &[(usize, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut swarm = prober(Keypair::generate_ed25519())?;
    swarm.add_peer_address(t.peer, t.addr.clone());
    let mut next = frames.iter().cycle();
    let mut send = |swarm: &mut Swarm<Prober>| {
        let Some((protocol, frame)) = next.next() else {
            return;
        };
        c.add(1);
        let b = swarm.behaviour_mut();
        let raw = frame.clone();
        match protocol {
            0 => drop(b.mailbox.send_request(&t.peer, Message::Raw(raw))),
            1 => drop(b.presence.send_request(&t.peer, Message::Raw(raw))),
            2 => drop(b.group.send_request(&t.peer, Message::Raw(raw))),
            3 => drop(b.blob.send_request(&t.peer, Message::Raw(raw))),
            _ => drop(b.keys.send_request(&t.peer, Message::Raw(raw))),
        }
    };
    for _ in 0..32 {
        send(&mut swarm);
    }
    loop {
        let event = swarm.select_next_some().await;
        if matches!(
            event,
            SwarmEvent::ConnectionClosed { .. } | SwarmEvent::OutgoingConnectionError { .. }
        ) {
            return Ok(());
        }
        if is_answer(&event) {
            send(&mut swarm);
        }
    }
}
