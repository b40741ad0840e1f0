//! Hostile peers against a relay: memory that strangers cannot make it commit, connections
//! they cannot pile up, and refusals that are counted instead of costing the relay.

use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use kith_net::codec::READ_STEP_BYTES;
use kith_protocol::mailbox;
use kith_tests::{init_logs, wait_for};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::task::JoinSet;

/// A peer with `dm_streams`' behaviour on `/kith/mailbox/1`: each connection keeps two raw
/// streams ready, on which it writes what it wants.
struct Attacker {
    streams: kith_node::dm_streams::Streams,
    _swarm: tokio::task::JoinHandle<()>,
}

impl Attacker {
    fn connect(addr: &Multiaddr) -> anyhow::Result<Self> {
        let (events, _inbound) = tokio::sync::mpsc::channel(8);
        let (behaviour, streams) =
            kith_node::dm_streams::Behaviour::new(StreamProtocol::new(mailbox::PROTOCOL), events);
        let mut swarm: Swarm<_> = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(|_| behaviour)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(addr.clone())?;
        // The connection task opens the ready streams on its own: keep the swarm going.
        let swarm = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        Ok(Self {
            streams,
            _swarm: swarm,
        })
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self._swarm.abort();
    }
}

/// A frame header claiming `len` bytes, then `sent` bytes of it.
fn trickle(len: usize, sent: usize) -> Vec<u8> {
    let mut bytes = (len as u32).to_be_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(0xa5u8, sent));
    bytes
}

/// Opens every attacker's ready streams to `relay` and writes `bytes` on each, keeping them
/// open; returns the held streams.
async fn hold_streams(
    attackers: &[Attacker],
    relay: PeerId,
    bytes: &[u8],
) -> anyhow::Result<Vec<kith_node::dm_streams::InUse>> {
    let mut held = Vec::new();
    for attacker in attackers {
        for _ in 0..kith_node::dm_streams::SPARE_STREAMS {
            let mut taken =
                wait_for("a ready stream", || async { attacker.streams.take(relay) }).await?;
            taken.stream.write_all(bytes).await?;
            taken.stream.flush().await?;
            held.push(taken);
        }
    }
    Ok(held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_claiming_large_frames_and_trickling_keep_relay_memory_bounded(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path())).await?;
    let addr = relay.listen_addrs[0].clone();
    let attackers = (0..20)
        .map(|_| Attacker::connect(&addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let streams = attackers.len() * kith_node::dm_streams::SPARE_STREAMS;

    // Claims of 4 MiB (the old mailbox limit) are refused from the header alone.
    let refused_before = relay.metrics().rejects.get_or_create(&too_large()).get();
    let _claims = hold_streams(&attackers, relay.peer_id, &trickle(4 << 20, 1024)).await?;
    wait_for("4 MiB claims refused", || async {
        let refused = relay.metrics().rejects.get_or_create(&too_large()).get();
        (refused - refused_before >= streams as u64).then_some(())
    })
    .await?;
    assert_eq!(
        relay.metrics().read_buffer_held(),
        0,
        "nothing held for refused claims"
    );
    drop(_claims);

    // Claims of the largest request allowed, with 1 KiB sent on each and no more.
    let sent = 1024;
    let held = hold_streams(
        &attackers,
        relay.peer_id,
        &trickle(mailbox::MAX_REQUEST_BYTES, sent),
    )
    .await?;
    wait_for("the relay to read every stream", || async {
        (relay.metrics().frames_being_read() == streams).then_some(())
    })
    .await?;
    let buffered = relay.metrics().read_buffer_held();
    println!(
        "{streams} streams claiming {} bytes with {sent} sent: relay holds {buffered} bytes",
        mailbox::MAX_REQUEST_BYTES
    );
    assert!(
        buffered <= streams * READ_STEP_BYTES,
        "{buffered} bytes held for {} bytes sent",
        streams * sent
    );
    assert!(relay
        .metrics()
        .encode()
        .contains(&format!("kith_relay_read_buffer_bytes {buffered}")));
    drop(held);
    drop(attackers);
    wait_for("buffers released", || async {
        (relay.metrics().read_buffer_held() == 0).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

fn too_large() -> kith_relay::metrics::RejectLabels {
    kith_relay::metrics::RejectLabels {
        reason: "too_large".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_read_budget_answers_busy_and_counts_it() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    // Room for 8 streams' first steps.
    config.read_buffer_budget_bytes = 8 * READ_STEP_BYTES;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let attackers = (0..10)
        .map(|_| Attacker::connect(&addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let _held = hold_streams(
        &attackers,
        relay.peer_id,
        &trickle(mailbox::MAX_REQUEST_BYTES, 100),
    )
    .await?;
    let hits = wait_for("frames refused for the budget", || async {
        let hits = relay.metrics().limit_hits("read_buffer_budget");
        (hits >= 12).then_some(hits)
    })
    .await?;
    assert!(relay.metrics().encode().contains(&format!(
        "kith_relay_limit_hits_total{{limit=\"read_buffer_budget\"}} {hits}"
    )));
    assert!(relay.metrics().read_buffer_held() <= 8 * READ_STEP_BYTES);
    drop(_held);
    drop(attackers);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_peer_limit_are_refused_and_counted() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.max_connections_per_peer = 2;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut peers = JoinSet::new();
    for _ in 0..4 {
        let mut raw = kith_tests::RawPeer::with_key(key.clone())?;
        raw.swarm.dial(addr.clone())?;
        peers.spawn(async move {
            loop {
                raw.swarm.select_next_some().await;
            }
        });
    }
    wait_for("two connections refused", || async {
        (relay.metrics().limit_hits("connections_per_peer") >= 2).then_some(())
    })
    .await?;
    assert_eq!(relay.metrics().connections.get(), 2);
    peers.shutdown().await;
    relay.shutdown().await?;
    Ok(())
}

fn quota_refusals(relay: &kith_relay::Running) -> u64 {
    relay
        .metrics()
        .rejects
        .get_or_create(&kith_relay::metrics::RejectLabels {
            reason: "quota_exceeded".into(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_holds_its_sender_back_and_every_message_arrives_once() -> anyhow::Result<()>
{
    use kith_tests::TestNode;
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.mailbox_max_messages = 4;
    config.mailbox_full_retry_after_ms = 400;
    let relay = kith_relay::start(config).await?;
    let relay_addr = relay.listen_addrs[0].clone();

    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    // Bob is away and his mailbox takes 4: the rest of alice's messages are refused.
    let total = 200;
    for i in 0..total {
        alice.node().send("bob", &format!("m{i}"), None).await?;
    }
    wait_for("the mailbox to fill and refuse", || async {
        (quota_refusals(&relay) > 0).then_some(())
    })
    .await?;
    // Let the first wave (deposits already on their way) settle, then count refusals over a
    // window: the sender waits as asked, one probe per hold.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(3);
    let before = quota_refusals(&relay);
    tokio::time::sleep(window).await;
    let refused = quota_refusals(&relay) - before;
    println!(
        "{total} messages queued for a full mailbox: {refused} refused deposits in {window:?} \
         (first wave: {before})"
    );
    assert!(
        refused <= 3_000 / 400 + 6,
        "{refused} refused deposits in {window:?}"
    );

    // Bob comes back: every message arrives, once.
    bob.restart_on(bob_addr).await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    let inbox = wait_for("bob has every message", || async {
        let inbox = bob.node().messages(Some("alice")).ok()?;
        (inbox.len() >= total).then_some(inbox)
    })
    .await?;
    let mut texts: Vec<_> = inbox.iter().map(|m| m.text.clone()).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), total);
    assert_eq!(inbox.len(), total, "no message twice");
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_before_checking_signatures_and_says_when_to_come_back(
) -> anyhow::Result<()> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination, Envelope, MessageId, Reject};
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.mailbox_max_messages = 1;
    config.mailbox_full_retry_after_ms = 7_000;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let mut raw = kith_tests::RawPeer::new()?;
    let victim = PeerId::random();
    let envelope = |text: &str| {
        Envelope::seal(
            &raw.key,
            Header {
                id: MessageId::random(),
                to: Destination::Peer(victim),
                sent_at_ms: 1,
                lamport: 1,
                expires_at_ms: None,
            },
            &Body::Chat { text: text.into() },
        )
    };
    let first = envelope("fills it")?;
    let mut forged = envelope("forged")?;
    forged.sig = vec![0; 64];
    let deposit = |envelope| {
        kith_net::codec::Message::Valid(mailbox::Request::Deposit {
            req_id: 1,
            envelope,
            class: mailbox::DepositClass::Message,
        })
    };
    let answer = raw.mailbox(relay.peer_id, &addr, deposit(first)).await?;
    assert!(matches!(answer, mailbox::Response::Stored { .. }));
    // The mailbox is full: a forged deposit is refused for that, before its signature is
    // checked, and told when to come back.
    let answer = raw.mailbox(relay.peer_id, &addr, deposit(forged)).await?;
    assert_eq!(
        answer,
        mailbox::Response::Rejected {
            req_id: 1,
            reason: Reject::QuotaExceeded,
            retry_after_ms: Some(7_000)
        }
    );
    assert_eq!(relay.metrics().limit_hits("mailbox_quota"), 1);
    relay.shutdown().await?;
    Ok(())
}
