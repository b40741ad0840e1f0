//! Hostile peers against a relay: memory that strangers cannot make it commit, connections
//! they cannot pile up, and refusals that are counted instead of costing the relay.

use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use kith_net::codec::READ_STEP_BYTES;
use kith_protocol::mailbox;
use kith_tests::{init_logs, wait_for};
use libp2p::{Multiaddr, PeerId};
use tokio::task::JoinSet;

/// A peer with `dm_streams`' behaviour on `/kith/mailbox/1`: each connection keeps two raw
/// streams ready, on which it writes what it wants.
struct Attacker {
    streams: kith_node::net::dm_streams::Streams,
    _swarm: tokio::task::JoinHandle<()>,
}

impl Attacker {
    fn connect(addr: &Multiaddr) -> anyhow::Result<Self> {
        let (streams, swarm) = kith_tests::raw_streams(addr, mailbox::PROTOCOL)?;
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
) -> anyhow::Result<Vec<kith_node::net::dm_streams::InUse>> {
    let mut held = Vec::new();
    for attacker in attackers {
        for _ in 0..kith_node::net::dm_streams::SPARE_STREAMS {
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
    let streams = attackers.len() * kith_node::net::dm_streams::SPARE_STREAMS;

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
    // Room for 8 streams' first steps, and no reserve per connection.
    config.read_buffer_budget_bytes = 8 * READ_STEP_BYTES;
    config.read_buffer_reserved_per_connection_bytes = 0;
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

/// Peers holding many streams with large claims spend the shared read budget, yet another
/// connection's deposit is read from that connection's own reserve: its sender is not starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_claims_of_other_connections_do_not_starve_a_small_deposit() -> anyhow::Result<()> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination, Envelope, MessageId};
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    // Room in the shared budget for 5 streams' first steps, no more; each connection has a
    // reserve of one step, which an attacker's first stream takes.
    config.read_buffer_budget_bytes = 5 * READ_STEP_BYTES;
    config.read_buffer_reserved_per_connection_bytes = READ_STEP_BYTES;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let attackers = (0..10)
        .map(|_| Attacker::connect(&addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut held = Vec::new();
    // Claims until the shared budget refuses some: each attacker holds its streams, then opens
    // more.
    for _ in 0..4 {
        held.extend(
            hold_streams(
                &attackers,
                relay.peer_id,
                &trickle(mailbox::MAX_REQUEST_BYTES, 100),
            )
            .await?,
        );
    }
    wait_for("the shared budget to refuse claims", || async {
        (relay.metrics().limit_hits("read_buffer_budget") > 0).then_some(())
    })
    .await?;
    let refused = relay.metrics().limit_hits("read_buffer_budget");

    let mut honest = kith_tests::RawPeer::new()?;
    let envelope = Envelope::seal(
        &honest.key,
        Header {
            id: MessageId::random(),
            to: Destination::Peer(PeerId::random()),
            sent_at_ms: 1,
            lamport: 1,
            expires_at_ms: None,
        },
        &Body::Chat {
            text: "hello".into(),
        },
    )?;
    let answer = honest
        .mailbox(
            relay.peer_id,
            &addr,
            kith_net::codec::Message::Valid(mailbox::Request::Deposit {
                req_id: 1,
                envelope,
                class: mailbox::DepositClass::Message,
            }),
        )
        .await?;
    assert!(
        matches!(answer, mailbox::Response::Stored { .. }),
        "{answer:?}"
    );
    // The attackers still hold the shared budget: the deposit did not find room in it.
    assert!(relay.metrics().read_buffer_held() >= 5 * READ_STEP_BYTES);
    assert!(relay.metrics().limit_hits("read_buffer_budget") >= refused);
    drop(held);
    drop(attackers);
    relay.shutdown().await?;
    Ok(())
}

/// Dials `addr` from each of `peers` and keeps their swarms running until the set is shut down.
fn dial_all(peers: Vec<kith_tests::RawPeer>, addr: &Multiaddr) -> anyhow::Result<JoinSet<()>> {
    let mut running = JoinSet::new();
    for mut raw in peers {
        raw.swarm.dial(addr.clone())?;
        running.spawn(async move {
            loop {
                raw.swarm.select_next_some().await;
            }
        });
    }
    Ok(running)
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
    let mut peers = dial_all(
        (0..4)
            .map(|_| kith_tests::RawPeer::with_key(key.clone()))
            .collect::<Result<_, _>>()?,
        &addr,
    )?;
    wait_for("two connections refused", || async {
        (relay.metrics().limit_hits("connections_per_peer") >= 2).then_some(())
    })
    .await?;
    assert_eq!(relay.metrics().connections.get(), 2);
    peers.shutdown().await;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_beyond_an_addresses_rate_are_closed_before_the_handshake(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    // Three at once from one address, then one a second.
    config.new_connections_per_ip_per_sec = 1;
    config.new_connection_burst_per_ip = 3;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    // Fresh identities, as a churning stranger uses: the per-peer limit does not see them.
    let mut peers = dial_all(
        (0..6)
            .map(|_| kith_tests::RawPeer::new())
            .collect::<Result<_, _>>()?,
        &addr,
    )?;
    // Refusals are counted at accept, before the admitted ones finish their handshakes (on
    // the newcomers' lane): wait for both.
    wait_for(
        "connections beyond the burst refused, the admitted ones up",
        || async {
            let m = relay.metrics();
            (m.limit_hits("connections_per_ip_rate") >= 2 && m.connections.get() >= 3).then_some(())
        },
    )
    .await?;
    // The admitted ones stay up; no refused one got through its handshake.
    let connected = relay.metrics().connections.get();
    assert!((3..=4).contains(&connected), "{connected} connections");
    peers.shutdown().await;
    relay.shutdown().await?;
    Ok(())
}

/// A mailbox request that frames well but is not CBOR of any request.
fn malformed_request() -> kith_net::codec::Message<mailbox::Request> {
    kith_net::codec::Message::Raw(kith_tests::malformed_frame())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_keeps_sending_malformed_requests_is_banned_and_others_are_not(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.malformed_requests_per_peer_per_sec = 1;
    config.malformed_request_burst_per_peer = 5;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let relay_peer = relay.peer_id;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut bad = kith_tests::RawPeer::with_key(key.clone())?;
    // Within the burst each one is answered as malformed, on the same connection.
    for _ in 0..5 {
        let answer = bad.mailbox(relay_peer, &addr, malformed_request()).await?;
        assert!(
            matches!(
                answer,
                mailbox::Response::Rejected {
                    reason: kith_protocol::Reject::Malformed,
                    ..
                }
            ),
            "{answer:?}"
        );
    }
    assert_eq!(relay.metrics().limit_hits("malformed_requests"), 0);
    // The one beyond it bans the peer: its connection closes.
    let _ = bad.mailbox(relay_peer, &addr, malformed_request()).await;
    wait_for("the peer banned and disconnected", || async {
        (relay.metrics().limit_hits("malformed_requests") == 1
            && relay.metrics().connections.get() == 0)
            .then_some(())
    })
    .await?;
    // It cannot come back under the same identity, even with a well-formed request.
    let mut again = kith_tests::RawPeer::with_key(key)?;
    let fetch = || {
        kith_net::codec::Message::Valid(mailbox::Request::Fetch {
            req_id: 1,
            after: None,
            limit: 10,
        })
    };
    assert!(again.mailbox(relay_peer, &addr, fetch()).await.is_err());
    assert!(relay.metrics().limit_hits("banned_peer") >= 1);
    // Another peer is served as before.
    let mut good = kith_tests::RawPeer::new()?;
    let answer = good.mailbox(relay_peer, &addr, fetch()).await?;
    assert!(
        matches!(answer, mailbox::Response::Batch { .. }),
        "{answer:?}"
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_to_the_relays_lane_with_a_well_formed_request_and_back_for_good_when_struck(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    // No minimum age: the unit tests of `lanes` check it.
    config.newcomer_ms = 0;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let relay_peer = relay.peer_id;
    let metrics = relay.metrics();
    let fetch = || {
        kith_net::codec::Message::Valid(mailbox::Request::Fetch {
            req_id: 1,
            after: None,
            limit: 10,
        })
    };
    let is_batch = |answer: &mailbox::Response| matches!(answer, mailbox::Response::Batch { .. });

    // A peer whose first request is malformed stays a newcomer, even once it behaves: it is
    // still served, from the newcomers' lane.
    let mut rude = kith_tests::RawPeer::new()?;
    rude.mailbox(relay_peer, &addr, malformed_request()).await?;
    assert!(is_batch(&rude.mailbox(relay_peer, &addr, fetch()).await?));
    assert_eq!(metrics.lane_moves("relay"), 0);

    // A peer whose first request is well formed moves to the relay's lane.
    let mut polite = kith_tests::RawPeer::new()?;
    assert!(is_batch(&polite.mailbox(relay_peer, &addr, fetch()).await?));
    assert_eq!(metrics.lane_moves("relay"), 1);

    // Struck once (far from a ban), it moves back, and well-formed requests no longer move it.
    polite
        .mailbox(relay_peer, &addr, malformed_request())
        .await?;
    assert_eq!(metrics.lane_moves("newcomers"), 1);
    assert!(is_batch(&polite.mailbox(relay_peer, &addr, fetch()).await?));
    assert_eq!(metrics.lane_moves("relay"), 1);
    assert_eq!(metrics.limit_hits("malformed_requests"), 0);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claim_flood_is_refused_counted_and_costs_another_claimer_nothing(
) -> anyhow::Result<()> {
    use kith_protocol::prekeys::{Request, Response};
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path())).await?;
    let addr = relay.listen_addrs[0].clone();
    let owner = PeerId::random();
    let claim = |req_id| Request::Claim {
        req_id,
        peer: owner,
    };
    let mut flooder = kith_tests::RawPeer::new()?;
    let mut refused = 0;
    for req_id in 0..300 {
        match flooder.keys(relay.peer_id, &addr, claim(req_id)).await? {
            Response::NotFound { .. } => {}
            Response::Rejected {
                reason: kith_protocol::Reject::QuotaExceeded,
                ..
            } => refused += 1,
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    // The burst is 200 claims, refilled at 20 a second.
    assert!(refused >= 50, "only {refused} of 300 claims refused");
    assert_eq!(relay.metrics().limit_hits("key_claim_rate"), refused);
    let mut other = kith_tests::RawPeer::new()?;
    assert!(matches!(
        other.keys(relay.peer_id, &addr, claim(0)).await?,
        Response::NotFound { .. }
    ));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_filling_the_mailbox_budget_do_not_shut_a_users_mailbox() -> anyhow::Result<()> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination, Envelope, MessageId, Reject};
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.mailbox_budget_bytes = 512 * 1024;
    config.mailbox_reserved_bytes_per_user = 128 * 1024;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let deposit = |from: &kith_tests::RawPeer, to: PeerId, text: String| -> anyhow::Result<_> {
        let envelope = Envelope::seal(
            &from.key,
            Header {
                id: MessageId::random(),
                to: Destination::Peer(to),
                sent_at_ms: 1,
                lamport: 1,
                expires_at_ms: None,
            },
            &Body::Chat { text },
        )?;
        Ok(kith_net::codec::Message::Valid(mailbox::Request::Deposit {
            req_id: 1,
            envelope,
            class: mailbox::DepositClass::Message,
        }))
    };

    // Bob fetches here: he is one of the relay's users.
    let mut bob = kith_tests::RawPeer::new()?;
    let bob_id = bob.key.public().to_peer_id();
    let fetch = kith_net::codec::Message::Valid(mailbox::Request::Fetch {
        req_id: 1,
        after: None,
        limit: 10,
    });
    bob.mailbox(relay.peer_id, &addr, fetch.clone()).await?;

    // A stranger fills the budget with 8 KiB texts for ids nobody fetches.
    let mut stranger = kith_tests::RawPeer::new()?;
    let mut stored = 0;
    loop {
        let nobody = PeerId::random();
        let request = deposit(&stranger, nobody, "x".repeat(8 * 1024))?;
        match stranger.mailbox(relay.peer_id, &addr, request).await? {
            mailbox::Response::Stored { .. } => stored += 1,
            mailbox::Response::Rejected {
                reason: Reject::QuotaExceeded,
                retry_after_ms: Some(_),
                ..
            } => break,
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
        assert!(stored < 100, "the budget never filled");
    }
    // The shared part (the budget less bob's reserve) took them: about 20 KiB each on disk.
    assert!((10..20).contains(&stored), "{stored} stored");

    // Bob's mailbox still takes mail, from the stranger too, as far as his reserve goes.
    let mut carol = kith_tests::RawPeer::new()?;
    for sender in [&mut carol, &mut stranger] {
        let request = deposit(sender, bob_id, "still reaches bob".into())?;
        let answer = sender.mailbox(relay.peer_id, &addr, request).await?;
        assert!(
            matches!(answer, mailbox::Response::Stored { .. }),
            "{answer:?}"
        );
    }
    match bob.mailbox(relay.peer_id, &addr, fetch).await? {
        mailbox::Response::Batch { items, .. } => assert_eq!(items.len(), 2),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_restart_waiting_messages_leave_at_once() -> anyhow::Result<()> {
    use kith_protocol::MessageState;
    use kith_tests::TestNode;
    init_logs();
    let relay_dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(relay_dir.path())).await?;
    let relay_addr = relay.listen_addrs[0].clone();

    // Alice's retries wait long (the first one 30 to 60 s): only hurrying can beat that.
    let home = tempfile::tempdir()?;
    TestNode::init_home(home.path(), "alice")?;
    let mut config = kith_node::Config::loopback(home.path());
    config.relays = vec![relay_addr.clone()];
    config.backoff = kith_protocol::retry::Backoff {
        base_ms: 60_000,
        max_ms: 60_000,
    };
    let alice = TestNode::start_in(config).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    // The relay goes down; alice's messages fail once and wait for their retry.
    relay.shutdown().await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(alice.node().send("bob", &format!("r{i}"), None).await?.id);
    }
    wait_for("every first attempt to fail", || async {
        ids.iter()
            .all(|id| alice.node().outbox_attempts(id).is_some_and(|n| n >= 1))
            .then_some(())
    })
    .await?;

    // It comes back on the same address: alice re-dials it (every 3 s) and sends at once.
    let mut config = kith_relay::Config::ephemeral(relay_dir.path());
    config.listen = vec![relay_addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()];
    let back = std::time::Instant::now();
    let relay = kith_relay::start(config).await?;
    wait_for("every message sent", || async {
        ids.iter()
            .all(|id| alice.state(id) == Some(MessageState::Sent))
            .then_some(())
    })
    .await?;
    println!(
        "5 messages sent {:?} after the relay came back",
        back.elapsed()
    );
    assert!(back.elapsed() < Duration::from_secs(15));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_mailbox_is_full_is_not_shown_sent() -> anyhow::Result<()> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination, Envelope, MessageId, MessageState};
    use kith_tests::TestNode;
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.gossip_heartbeat_interval_ms = 200;
    config.mailbox_max_messages = 3;
    let relay = kith_relay::start(config).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let mut carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    let members = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    kith_tests::know(&[&bob, &carol], &[&alice]).await?;
    let created = alice.node().create_group("friends", &members).await?;
    for node in [&bob, &carol] {
        wait_for("member knows the group", || async {
            node.node()
                .group_list()
                .iter()
                .any(|g| g.group_id == created.group_id)
                .then_some(())
        })
        .await?;
    }
    let carol_addr = carol.addr().await;
    let carol_id = carol.peer_id();
    carol.stop().await;

    // A stranger fills carol's mailbox while she is away.
    let mut raw = kith_tests::RawPeer::new()?;
    for i in 0..3 {
        let envelope = Envelope::seal(
            &raw.key,
            Header {
                id: MessageId::random(),
                to: Destination::Peer(carol_id),
                sent_at_ms: 1,
                lamport: i + 1,
                expires_at_ms: None,
            },
            &Body::Chat {
                text: format!("junk {i}"),
            },
        )?;
        let request = kith_net::codec::Message::Valid(mailbox::Request::Deposit {
            req_id: i,
            envelope,
            class: mailbox::DepositClass::Message,
        });
        let answer = raw.mailbox(relay.peer_id, &relay_addr, request).await?;
        assert!(
            matches!(answer, mailbox::Response::Stored { .. }),
            "{answer:?}"
        );
    }

    let sent = alice.node().send("friends", "hello", None).await?;
    let member = |who: PeerId| {
        alice
            .node()
            .status(&sent.id)
            .ok()
            .and_then(|s| s.members.get(&who.to_string()).copied())
    };
    wait_for("bob's copy stored", || async {
        (member(bob.peer_id()) >= Some(MessageState::Sent)).then_some(())
    })
    .await?;
    assert!(relay.metrics().limit_hits("mailbox_quota") >= 1);
    assert_eq!(
        member(carol_id),
        Some(MessageState::Pending),
        "carol has no copy"
    );
    assert_eq!(alice.state(&sent.id), Some(MessageState::Pending));

    // Carol comes back and empties her mailbox: alice's retry stores her copy.
    carol.restart_on(carol_addr).await?;
    wait_for("carol gets the message", || async {
        carol
            .node()
            .messages(Some(&created.group_id))
            .ok()?
            .iter()
            .any(|m| m.text == "hello")
            .then_some(())
    })
    .await?;
    wait_for("carol's tick", || async {
        (member(carol_id) >= Some(MessageState::Sent)).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

/// Fresh identities each get a burst of group operations of their own, and creating a group is
/// how they start: creations have a relay-wide rate, refused before anything is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_creations_have_a_relay_wide_rate() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.group_creations_per_sec = 1;
    config.group_creation_burst = 3;
    let relay = kith_relay::start(config).await?;
    let victim = PeerId::random();
    let mut applied = 0;
    let mut busy = 0;
    // One peer, well within its own burst: only the relay-wide rate refuses.
    let mut peer = kith_tests::RawPeer::new()?;
    for _ in 0..10 {
        match create_group(&mut peer, &relay, victim).await? {
            None => applied += 1,
            Some(retry_after_ms) => {
                assert_eq!(retry_after_ms, 1_000);
                busy += 1;
            }
        }
    }
    // The burst of 3, and at most a few more as the bucket refills during the test.
    assert!((3..8).contains(&applied), "{applied} applied");
    assert_eq!(relay.metrics().limit_hits("group_creation_rate"), busy);
    relay.shutdown().await?;
    Ok(())
}

/// Submits the creation of a fresh group naming `victim` as `peer`: `None` if it was applied,
/// the wait the relay asked for if it was refused `Busy`.
async fn create_group(
    peer: &mut kith_tests::RawPeer,
    relay: &kith_relay::Running,
    victim: PeerId,
) -> anyhow::Result<Option<u64>> {
    use kith_protocol::group::{self, Change, Request, Response};
    let addr = relay.listen_addrs[0].clone();
    let (op, handshake) = kith_tests::op_with_junk_commit(
        kith_protocol::GroupId::random(),
        0,
        0,
        Change::Create {
            name: "spam".into(),
            relay: addr.to_string(),
            members: std::collections::BTreeSet::from([victim]),
        },
    );
    let op = group::seal_op(&peer.key, op, 1)?;
    let submit = Request::Submit {
        req_id: 1,
        op,
        handshake,
    };
    match peer.group(relay.peer_id, &addr, submit).await? {
        Response::Applied { .. } => Ok(None),
        Response::Rejected {
            reason: kith_protocol::Reject::Busy { retry_after_ms },
            ..
        } => Ok(Some(retry_after_ms)),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomers_share_one_group_operation_rate_and_users_keep_their_own() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    // A well-formed first request makes a user at once; a malformed one a newcomer for good.
    config.newcomer_ms = 0;
    config.group_newcomer_ops_per_sec = 1;
    config.group_newcomer_op_burst = 3;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let victim = PeerId::random();

    // Fresh identities, each well within its own burst: only the newcomers' shared rate
    // refuses them.
    let mut applied = 0;
    for _ in 0..8 {
        let mut stranger = kith_tests::RawPeer::new()?;
        stranger
            .mailbox(relay.peer_id, &addr, malformed_request())
            .await?;
        if create_group(&mut stranger, &relay, victim).await?.is_none() {
            applied += 1;
        }
    }
    // The burst of 3, and at most a few more as the bucket refills during the test.
    assert!((3..6).contains(&applied), "{applied} applied");
    let refused = relay.metrics().limit_hits("group_newcomer_op_rate");
    assert_eq!(refused, 8 - applied);

    // A user of the relay is not held back by the newcomers' rate.
    let mut user = kith_tests::RawPeer::new()?;
    let fetch = kith_net::codec::Message::Valid(mailbox::Request::Fetch {
        req_id: 1,
        after: None,
        limit: 10,
    });
    user.mailbox(relay.peer_id, &addr, fetch).await?;
    for _ in 0..5 {
        assert_eq!(create_group(&mut user, &relay, victim).await?, None);
    }
    assert_eq!(
        relay.metrics().limit_hits("group_newcomer_op_rate"),
        refused
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_read_a_groups_chain() -> anyhow::Result<()> {
    use kith_protocol::group::{OpError, Request, Response};
    use kith_tests::TestNode;
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path())).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let created = alice
        .node()
        .create_group("friends", &[bob.peer_id().to_string()])
        .await?;
    let group: kith_protocol::GroupId = created.group_id.parse()?;
    let get = Request::Get {
        req_id: 1,
        group,
        after_version: 0,
        limit: 16,
    };
    let mut stranger = kith_tests::RawPeer::new()?;
    let answer = stranger
        .group(relay.peer_id, &relay_addr, get.clone())
        .await?;
    assert!(
        matches!(
            answer,
            Response::Refused {
                reason: OpError::NotMember { .. },
                ..
            }
        ),
        "{answer:?}"
    );
    let mut member = kith_tests::RawPeer::with_key(kith_node::identity::load(&bob.home)?)?;
    let answer = member.group(relay.peer_id, &relay_addr, get).await?;
    assert!(
        matches!(answer, Response::Ops { ref ops, .. } if ops.len() == 1),
        "{answer:?}"
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_fan_out_counts_against_the_posters_rate() -> anyhow::Result<()> {
    use kith_protocol::MessageState;
    use kith_tests::TestNode;
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.gossip_heartbeat_interval_ms = 200;
    // Four deposits at once, then one a second: the group's creation (announced to two
    // members) and one message (two copies) take it all.
    config.deposits_per_sec_per_peer = 1;
    config.deposit_burst_per_peer = 4;
    let relay = kith_relay::start(config).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    let members = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    kith_tests::know(&[&bob, &carol], &[&alice]).await?;
    let created = alice.node().create_group("friends", &members).await?;
    let first = alice.node().send(&created.group_id, "one", None).await?;
    let second = alice.node().send(&created.group_id, "two", None).await?;
    wait_for("the second post refused for the rate", || async {
        (relay.metrics().limit_hits("group_fan_out_rate") > 0).then_some(())
    })
    .await?;
    // Both get through as the bucket refills, each once.
    for id in [&first.id, &second.id] {
        wait_for("sent", || async {
            (alice.state(id) >= Some(MessageState::Sent)).then_some(())
        })
        .await?;
    }
    wait_for("bob has both", || async {
        let texts: Vec<_> = bob
            .node()
            .messages(Some(&created.group_id))
            .ok()?
            .into_iter()
            .map(|m| m.text)
            .collect();
        (texts == ["one", "two"]).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_whose_relays_are_unknown_stays_pending_with_a_reason() -> anyhow::Result<()> {
    use kith_protocol::MessageState;
    use kith_tests::TestNode;
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path())).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![]).await?;
    let bob_id = bob.peer_id().to_string();
    let bob_addr = bob.addr().await;
    bob.stop().await;
    // Alice knows bob's peer id and a direct address, not his relays.
    alice
        .node()
        .add_contact("bob", &bob_id, &[bob_addr.to_string()])
        .await?;
    let sent = alice.node().send("bob", "hello?", None).await?;
    let reason = wait_for("a reason", || async {
        alice.node().status(&sent.id).ok()?.reason
    })
    .await?;
    assert!(reason.contains("home relays are unknown"), "{reason}");
    assert_eq!(alice.state(&sent.id), Some(MessageState::Pending));
    assert_eq!(
        relay.metrics().deposits.get(),
        0,
        "nothing deposited at alice's relay"
    );
    // Bob comes back on his address: the message goes directly.
    bob.restart_on(bob_addr).await?;
    wait_for("delivered", || async {
        (alice.state(&sent.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_fills_only_its_share_of_a_mailbox_and_is_told_when_to_come_back(
) -> anyhow::Result<()> {
    use kith_protocol::envelope::Header;
    use kith_protocol::{Body, Destination, Envelope, Keypair, MessageId, Reject};
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.mailbox_max_messages = 10;
    config.mailbox_max_messages_per_sender = 2;
    config.mailbox_full_retry_after_ms = 4_000;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let victim = PeerId::random();
    let envelope = |key: &Keypair, text: &str| {
        Envelope::seal(
            key,
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
    let deposit = |envelope| {
        kith_net::codec::Message::Valid(mailbox::Request::Deposit {
            req_id: 1,
            envelope,
            class: mailbox::DepositClass::Message,
        })
    };
    let mut flooder = kith_tests::RawPeer::new()?;
    for text in ["one", "two"] {
        let e = envelope(&flooder.key, text)?;
        let answer = flooder.mailbox(relay.peer_id, &addr, deposit(e)).await?;
        assert!(
            matches!(answer, mailbox::Response::Stored { .. }),
            "{answer:?}"
        );
    }
    let third = envelope(&flooder.key, "three")?;
    let answer = flooder
        .mailbox(relay.peer_id, &addr, deposit(third))
        .await?;
    assert_eq!(
        answer,
        mailbox::Response::Rejected {
            req_id: 1,
            reason: Reject::QuotaExceeded,
            retry_after_ms: Some(4_000)
        }
    );
    assert_eq!(relay.metrics().limit_hits("mailbox_sender_share"), 1);
    // The victim's mailbox still has room for everyone else.
    let mut friend = kith_tests::RawPeer::new()?;
    let e = envelope(&friend.key, "hello")?;
    let answer = friend.mailbox(relay.peer_id, &addr, deposit(e)).await?;
    assert!(
        matches!(answer, mailbox::Response::Stored { .. }),
        "{answer:?}"
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_depositor_that_ignores_the_wait_it_was_asked_for_is_banned_and_a_polite_one_is_not(
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use kith_protocol::Reject;
    init_logs();
    let dir = tempfile::tempdir()?;
    let now = Arc::new(AtomicU64::new(1_000_000));
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.clock = kith_relay::clock::Clock::from_fn({
        let now = now.clone();
        move || now.load(Ordering::SeqCst)
    });
    config.mailbox_max_messages = 1;
    config.mailbox_full_retry_after_ms = 1_000;
    config.malformed_requests_per_peer_per_sec = 1;
    config.malformed_request_burst_per_peer = 3;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let relay_peer = relay.peer_id;
    let victim = PeerId::random();
    let deposit = |key: &libp2p::identity::Keypair| {
        kith_net::codec::Message::Valid(mailbox::Request::Deposit {
            req_id: 1,
            envelope: kith_tests::bench::payload_envelope(key, victim, 10),
            class: mailbox::DepositClass::Message,
        })
    };
    let waits = || relay.metrics().limit_hits("ignored_retry_after");
    let refused_for = |answer: &mailbox::Response| match answer {
        mailbox::Response::Rejected {
            reason: Reject::QuotaExceeded,
            retry_after_ms,
            ..
        } => *retry_after_ms,
        _ => None,
    };

    let mut storm = kith_tests::RawPeer::new()?;
    let answer = storm
        .mailbox(relay_peer, &addr, deposit(&storm.key))
        .await?;
    assert!(
        matches!(answer, mailbox::Response::Stored { .. }),
        "{answer:?}"
    );
    // The mailbox is full: come back in a second.
    let answer = storm
        .mailbox(relay_peer, &addr, deposit(&storm.key))
        .await?;
    assert_eq!(refused_for(&answer), Some(1_000), "{answer:?}");
    // Still in the grace (a deposit that was on its way): refused, no strike.
    let answer = storm
        .mailbox(relay_peer, &addr, deposit(&storm.key))
        .await?;
    assert_eq!(refused_for(&answer), Some(1_000), "{answer:?}");
    assert_eq!(waits(), 0);

    // A polite depositor refused at the same time comes back once its wait is over.
    let mut polite = kith_tests::RawPeer::new()?;
    let answer = polite
        .mailbox(relay_peer, &addr, deposit(&polite.key))
        .await?;
    assert_eq!(refused_for(&answer), Some(1_000), "{answer:?}");

    // 600 ms later, past the grace: each deposit of the storm is early, a strike.
    now.fetch_add(600, Ordering::SeqCst);
    let answer = storm
        .mailbox(relay_peer, &addr, deposit(&storm.key))
        .await?;
    assert_eq!(refused_for(&answer), Some(400), "{answer:?}");
    assert_eq!(waits(), 1);
    assert_eq!(relay.metrics().limit_hits("malformed_requests"), 0);
    // Beyond the strike burst, the storm is banned and its connection closed.
    for _ in 0..20 {
        if storm
            .mailbox(relay_peer, &addr, deposit(&storm.key))
            .await
            .is_err()
            || relay.metrics().limit_hits("malformed_requests") == 1
        {
            break;
        }
    }
    wait_for("the storm banned and disconnected", || async {
        (relay.metrics().limit_hits("malformed_requests") == 1).then_some(())
    })
    .await?;
    assert!(waits() >= 4, "{} early deposits", waits());

    // The polite one waited the whole second: refused again (still full), but no strike, and
    // it stays connected and served.
    now.fetch_add(400, Ordering::SeqCst);
    let before = waits();
    let answer = polite
        .mailbox(relay_peer, &addr, deposit(&polite.key))
        .await?;
    assert_eq!(refused_for(&answer), Some(1_000), "{answer:?}");
    assert_eq!(waits(), before);
    assert_eq!(relay.metrics().limit_hits("malformed_requests"), 1);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_beyond_the_relays_pace_wait_for_their_turn_and_are_served(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mut config = kith_relay::Config::ephemeral(dir.path());
    config.new_connections_per_sec = 4;
    config.new_connection_burst = 2;
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    let relay_peer = relay.peer_id;
    let fetch = || {
        kith_net::codec::Message::Valid(mailbox::Request::Fetch {
            req_id: 1,
            after: None,
            limit: 10,
        })
    };
    // Eight peers connect at once: two fit the burst, the others wait in the listen backlog
    // while the relay pauses accepting, and every one is served in its turn (none refused).
    let mut peers = JoinSet::new();
    for _ in 0..8 {
        let addr = addr.clone();
        peers.spawn(async move {
            let mut peer = kith_tests::RawPeer::new()?;
            peer.mailbox(relay_peer, &addr, fetch()).await
        });
    }
    while let Some(answer) = peers.join_next().await {
        let answer = answer??;
        assert!(
            matches!(answer, mailbox::Response::Batch { .. }),
            "{answer:?}"
        );
    }
    assert!(relay.metrics().limit_hits("new_connections_rate") >= 1);
    assert_eq!(relay.metrics().limit_hits("connections_per_ip_rate"), 0);
    relay.shutdown().await?;
    Ok(())
}
