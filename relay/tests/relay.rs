//! In-process tests of the relay: real TCP + noise + yamux on 127.0.0.1, temp data dirs.

mod harness;

use anyhow::{bail, Context};
use harness::{config, eventually, Client, ManualClock};
use kith_net::codec::Message;
use kith_protocol::mailbox::{Response, MAX_FRAME_BYTES, MAX_REQUEST_BYTES};
use kith_protocol::{frame, Destination, GroupId, Reject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Result = anyhow::Result<()>;

fn assert_stored(response: &Response) {
    assert!(
        matches!(response, Response::Stored { .. }),
        "expected Stored, got {response:?}"
    );
}

fn assert_rejected(response: &Response, expected: Reject) {
    match response {
        Response::Rejected { reason, .. } => assert_eq!(*reason, expected),
        other => panic!("expected Rejected({expected:?}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_fetch_ack() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(config(dir.path())).await?;
    let mut alice = Client::connect(&relay).await?;
    let bob_key = libp2p::identity::Keypair::generate_ed25519();
    let bob_id = bob_key.public().to_peer_id();

    let first = alice.seal(bob_id, "hello bob");
    let second = alice.seal(bob_id, "still there?");
    assert_stored(&alice.deposit(first.clone()).await?);
    assert_stored(&alice.deposit(second.clone()).await?);

    // Bob comes online later and fetches.
    let mut bob = client_with_key(&relay, bob_key).await?;
    let items = bob.fetch_all().await?;
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].envelope, first);
    assert_eq!(items[1].envelope, second);
    assert!(items[0].seq < items[1].seq);

    // Paging: one at a time with `more`.
    match bob.fetch(None, 1).await? {
        Response::Batch { items, more, .. } => {
            assert_eq!(items.len(), 1);
            assert!(more);
        }
        other => bail!("unexpected {other:?}"),
    }

    let seqs = items.iter().map(|i| i.seq).collect();
    match bob.ack(seqs).await? {
        Response::Acked { removed, .. } => assert_eq!(removed, 2),
        other => bail!("unexpected {other:?}"),
    }
    assert!(bob.fetch_all().await?.is_empty());
    assert_eq!(relay.mailbox_usage(None).await?.messages, 0);
    relay.shutdown().await?;
    Ok(())
}

/// A client with a given identity (so a test can address it before it connects).
async fn client_with_key(
    relay: &kith_relay::Running,
    key: libp2p::identity::Keypair,
) -> anyhow::Result<Client> {
    let addr = relay.listen_addrs.first().cloned().context("no address")?;
    Client::connect_to(key, relay.peer_id, addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_survives_restart() -> Result {
    let dir = tempfile::tempdir()?;
    let bob_key = libp2p::identity::Keypair::generate_ed25519();
    let bob_id = bob_key.public().to_peer_id();

    let relay = kith_relay::start(config(dir.path())).await?;
    let relay_id = relay.peer_id;
    let mut alice = Client::connect(&relay).await?;
    let envelope = alice.seal(bob_id, "kept across restarts");
    assert_stored(&alice.deposit(envelope.clone()).await?);
    drop(alice);
    relay.shutdown().await?;
    assert!(kith_relay::id_info(dir.path())?.listen_addrs.is_empty());

    let relay = kith_relay::start(config(dir.path())).await?;
    assert_eq!(relay.peer_id, relay_id, "identity is kept");
    // A deposit after the restart gets a higher sequence number than the one before.
    let mut carol = Client::connect(&relay).await?;
    let later = carol.seal(bob_id, "after");
    assert_stored(&carol.deposit(later.clone()).await?);

    let mut bob = client_with_key(&relay, bob_key).await?;
    let items = bob.fetch_all().await?;
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].envelope, envelope);
    assert_eq!(items[1].envelope, later);
    assert!(items[1].seq > items[0].seq);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_read_or_delete_another_mailbox() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(config(dir.path())).await?;
    let bob_key = libp2p::identity::Keypair::generate_ed25519();
    let bob_id = bob_key.public().to_peer_id();
    let mut alice = Client::connect(&relay).await?;
    assert_stored(&alice.deposit(alice.seal(bob_id, "for bob only")).await?);

    let mut carol = Client::connect(&relay).await?;
    assert!(
        carol.fetch_all().await?.is_empty(),
        "carol sees only her own mailbox"
    );

    let mut bob = client_with_key(&relay, bob_key).await?;
    let items = bob.fetch_all().await?;
    assert_eq!(items.len(), 1);

    // Carol names Bob's sequence number: refused, nothing deleted.
    assert_rejected(&carol.ack(vec![items[0].seq]).await?, Reject::NotYours);
    assert_eq!(bob.fetch_all().await?.len(), 1);
    // Unknown sequence numbers are ignored.
    match carol.ack(vec![999_999]).await? {
        Response::Acked { removed, .. } => assert_eq!(removed, 0),
        other => bail!("unexpected {other:?}"),
    }
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_envelopes_are_rejected() -> Result {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(1_000_000);
    let relay = kith_relay::start(kith_relay::Config {
        clock: clock.clock(),
        ..config(dir.path())
    })
    .await?;
    let mut alice = Client::connect(&relay).await?;
    let bob = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();

    let mut forged = alice.seal(bob, "original");
    forged.lamport += 1;
    assert_rejected(&alice.deposit(forged).await?, Reject::BadSignature);

    let group = alice.seal_with(Destination::Group(GroupId([3; 16])), "to a group", None);
    assert_rejected(&alice.deposit(group).await?, Reject::Malformed);

    // Expired beyond the clock skew the relay tolerates.
    let skew = kith_protocol::timer::DEFAULT_SKEW_MS;
    let expired = alice.seal_with(Destination::Peer(bob), "gone", Some(clock.now_ms() - skew));
    assert_rejected(&alice.deposit(expired).await?, Reject::Expired);

    assert_eq!(relay.mailbox_usage(None).await?.messages, 0);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_typed_rejects_and_others_keep_service() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(config(dir.path())).await?;
    let mut mallory = Client::connect(&relay).await?;
    let mut alice = Client::connect(&relay).await?;

    // A header claiming more than a request may hold (one envelope), and nothing after it.
    let oversize = ((MAX_REQUEST_BYTES as u32) + 1).to_be_bytes().to_vec();
    assert_rejected(
        &mallory.request(Message::Raw(oversize)).await?,
        Reject::TooLarge {
            max: MAX_REQUEST_BYTES as u64,
        },
    );

    // Well-framed garbage (a fixed pseudo-random sequence, so the test is deterministic).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for len in [1usize, 7, 64, 1_000] {
        let payload: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let framed = frame::encode(&payload, MAX_FRAME_BYTES)?;
        assert_rejected(
            &mallory.request(Message::Raw(framed)).await?,
            Reject::Malformed,
        );
    }

    // The relay still serves a well-behaved client, and the hostile one too.
    let bob = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    assert_stored(&alice.deposit(alice.seal(bob, "still works")).await?);
    assert!(mallory.fetch_all().await?.is_empty());
    let metrics = relay.metrics().encode();
    assert!(metrics.contains("reason=\"malformed\"} 4"), "{metrics}");
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deposit_is_stored_once() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(config(dir.path())).await?;
    let bob_key = libp2p::identity::Keypair::generate_ed25519();
    let mut alice = Client::connect(&relay).await?;
    let envelope = alice.seal(bob_key.public().to_peer_id(), "once");
    assert_stored(&alice.deposit(envelope.clone()).await?);
    assert_stored(&alice.deposit(envelope.clone()).await?);
    let mut bob = client_with_key(&relay, bob_key).await?;
    let items = bob.fetch_all().await?;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].envelope, envelope);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_for_a_connected_recipient_is_pushed_and_removed() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(config(dir.path())).await?;
    let mut bob = Client::connect(&relay).await?;
    let mut alice = Client::connect(&relay).await?;
    let envelope = alice.seal(bob.peer_id, "live");
    assert_stored(&alice.deposit(envelope.clone()).await?);

    bob.wait_pushes(1).await?;
    assert_eq!(bob.pushes[0], envelope);
    let bob_id = bob.peer_id;
    eventually("the pushed entry to be removed", || async {
        let usage = relay.mailbox_usage(Some(bob_id)).await.ok()?;
        (usage.messages == 0).then_some(())
    })
    .await?;
    assert!(bob.fetch_all().await?.is_empty());
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_has_a_bounded_number_of_pushes_in_flight_and_gets_the_rest_after() -> Result {
    const CAP: usize = 8;
    const SENT: usize = 100;
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        max_pushes_per_recipient: CAP,
        ..config(dir.path())
    })
    .await?;
    let mut bob = Client::connect(&relay).await?;
    bob.hold_pushes();
    let mut alice = Client::connect(&relay).await?;
    let mut sent = Vec::new();
    for i in 0..SENT {
        let envelope = alice.seal(bob.peer_id, &format!("m{i:03}"));
        assert_stored(&alice.deposit(envelope.clone()).await?);
        sent.push(envelope);
    }
    // Each deposit's push was admitted or held back before its answer left.
    let metrics = relay.metrics().encode();
    let held_back = format!("limit=\"pushes_per_recipient\"}} {}", SENT - CAP);
    assert!(metrics.contains(&held_back), "{metrics}");
    bob.wait_pushes(CAP).await?;
    assert_eq!(bob.held.len(), CAP);

    // Once bob answers, the held-back ones come from the mailbox, in order, CAP at a time.
    bob.release_pushes();
    bob.wait_pushes(SENT).await?;
    assert_eq!(bob.pushes, sent, "each once, in order");
    let bob_id = bob.peer_id;
    eventually("every pushed entry removed", || async {
        let usage = relay.mailbox_usage(Some(bob_id)).await.ok()?;
        (usage.messages == 0).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_answers_quota_exceeded() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        mailbox_max_messages: 3,
        ..config(dir.path())
    })
    .await?;
    let bob = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let mut alice = Client::connect(&relay).await?;
    for i in 0..3 {
        assert_stored(&alice.deposit(alice.seal(bob, &format!("m{i}"))).await?);
    }
    assert_rejected(
        &alice.deposit(alice.seal(bob, "one too many")).await?,
        Reject::QuotaExceeded,
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_rate_is_limited_per_peer() -> Result {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(1_000_000);
    let relay = kith_relay::start(kith_relay::Config {
        deposits_per_sec_per_peer: 1,
        deposit_burst_per_peer: 2,
        clock: clock.clock(),
        ..config(dir.path())
    })
    .await?;
    let bob = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let mut alice = Client::connect(&relay).await?;
    assert_stored(&alice.deposit(alice.seal(bob, "1")).await?);
    assert_stored(&alice.deposit(alice.seal(bob, "2")).await?);
    assert_rejected(
        &alice.deposit(alice.seal(bob, "3")).await?,
        Reject::QuotaExceeded,
    );
    // Another depositor has its own bucket.
    let mut carol = Client::connect(&relay).await?;
    assert_stored(&carol.deposit(carol.seal(bob, "c")).await?);
    // A second later Alice has a token again.
    clock.advance_ms(1_000);
    assert_stored(&alice.deposit(alice.seal(bob, "4")).await?);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_purged() -> Result {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(1_000_000);
    let relay = kith_relay::start(kith_relay::Config {
        mailbox_ttl_secs: 60,
        purge_interval_secs: 1,
        clock: clock.clock(),
        ..config(dir.path())
    })
    .await?;
    let bob_key = libp2p::identity::Keypair::generate_ed25519();
    let bob_id = bob_key.public().to_peer_id();
    let mut alice = Client::connect(&relay).await?;
    assert_stored(&alice.deposit(alice.seal(bob_id, "old news")).await?);
    let temporary = alice.seal_with(
        Destination::Peer(bob_id),
        "disappearing",
        Some(clock.now_ms() + 5_000),
    );
    assert_stored(&alice.deposit(temporary).await?);
    assert_eq!(relay.mailbox_usage(Some(bob_id)).await?.messages, 2);

    // The temporary message expires first (after the tolerated clock skew); the purge notices.
    clock.advance_ms(5_000 + kith_protocol::timer::DEFAULT_SKEW_MS);
    eventually("the temporary message to be purged", || async {
        let usage = relay.mailbox_usage(Some(bob_id)).await.ok()?;
        (usage.messages == 1).then_some(())
    })
    .await?;

    // Past the retention period everything goes.
    clock.advance_ms(60_000);
    eventually("the mailbox to be purged", || async {
        let usage = relay.mailbox_usage(Some(bob_id)).await.ok()?;
        (usage.messages == 0).then_some(())
    })
    .await?;
    let mut bob = client_with_key(&relay, bob_key).await?;
    assert!(bob.fetch_all().await?.is_empty());
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_json_and_metrics() -> Result {
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        metrics_addr: Some("127.0.0.1:0".parse()?),
        ..config(dir.path())
    })
    .await?;
    let info = kith_relay::id_info(dir.path())?;
    assert_eq!(info.peer_id, relay.peer_id.to_string());
    let expected: Vec<String> = relay.listen_addrs.iter().map(|a| a.to_string()).collect();
    assert_eq!(info.listen_addrs, expected);
    assert!(expected[0].starts_with("/ip4/127.0.0.1/tcp/"));
    assert!(expected[0].ends_with(&format!("/p2p/{}", relay.peer_id)));

    let mut alice = Client::connect(&relay).await?;
    let bob = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    assert_stored(&alice.deposit(alice.seal(bob, "counted")).await?);

    let addr = relay.metrics_addr().context("metrics address")?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(harness::DEADLINE, stream.read_to_string(&mut body)).await??;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for needle in [
        "kith_relay_deposits_total 1",
        "kith_relay_mailbox_messages 1",
        "kith_relay_connections",
        "kith_relay_flush_seconds_count",
    ] {
        assert!(body.contains(needle), "missing {needle} in {body}");
    }

    relay.shutdown().await?;
    assert!(kith_relay::id_info(dir.path())?.listen_addrs.is_empty());
    Ok(())
}

#[test]
fn id_command_prints_json() -> Result {
    let dir = tempfile::tempdir()?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kith-relay"))
        .args(["--data"])
        .arg(dir.path())
        .args(["id", "--json"])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let peer_id = json["peer_id"].as_str().context("peer_id")?;
    assert!(peer_id.starts_with("12D3"));
    assert_eq!(json["listen_addrs"], serde_json::json!([]));
    // The identity is created once and kept.
    assert_eq!(kith_relay::id_info(dir.path())?.peer_id, peer_id);
    Ok(())
}

mod circuit {
    //! The gateway: a node behind the relay makes a reservation, another reaches it through a
    //! circuit. This fails if the relay does not advertise HOP (no external address).

    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
    use libp2p::{identity, noise, ping, relay, tcp, yamux, Swarm};

    #[derive(NetworkBehaviour)]
    struct Node {
        relay_client: relay::client::Behaviour,
        ping: ping::Behaviour,
    }

    fn node() -> anyhow::Result<Swarm<Node>> {
        Ok(
            libp2p::SwarmBuilder::with_existing_identity(identity::Keypair::generate_ed25519())
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_relay_client(noise::Config::new, yamux::Config::default)?
                .with_behaviour(|_, relay_client| Node {
                    relay_client,
                    ping: ping::Behaviour::default(),
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_reach_each_other_through_a_circuit() -> super::Result {
        let dir = tempfile::tempdir()?;
        let relay = kith_relay::start(super::config(dir.path())).await?;
        let relay_addr = relay.listen_addrs[0].clone();

        let mut listener = node()?;
        listener.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
        let deadline = tokio::time::Instant::now() + super::harness::DEADLINE;
        loop {
            let event = tokio::time::timeout_at(deadline, listener.select_next_some()).await?;
            if let SwarmEvent::Behaviour(NodeEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { .. },
            )) = event
            {
                break;
            }
        }

        let mut dialer = node()?;
        let target = *listener.local_peer_id();
        dialer.dial(
            relay_addr
                .with(Protocol::P2pCircuit)
                .with(Protocol::P2p(target)),
        )?;
        loop {
            tokio::select! {
                event = dialer.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. }
                        if peer_id == target =>
                    {
                        assert!(endpoint.is_relayed());
                        break;
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        anyhow::bail!("dial through the relay failed: {error}")
                    }
                    _ => {}
                },
                _ = listener.select_next_some() => {}
                _ = tokio::time::sleep_until(deadline) => anyhow::bail!("timed out"),
            }
        }
        let metrics = relay.metrics().encode();
        assert!(metrics.contains("kith_relay_reservations 1"), "{metrics}");
        relay.shutdown().await?;
        Ok(())
    }
}
