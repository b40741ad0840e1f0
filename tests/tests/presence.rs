//! Presence, last seen, visibility, typing, and graceful degradation under load, end to end:
//! real relays and nodes on loopback, bare peers for strangers and for load.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use kith_node::clock::now_ms;
use kith_node::{Config, NodeEvent, Settings};
use kith_protocol::mailbox::DepositClass;
use kith_protocol::presence::{Activity, Policy, Request, Visibility};
use kith_protocol::MessageState;
use kith_relay::shed::Class;
use kith_tests::bench::payload_envelope;
use kith_tests::presence::{deposit_flood, query_flood, PresencePeer};
use kith_tests::{befriend, init_logs, wait_for, RawPeer, TestNode};
use libp2p::Multiaddr;
use tokio::sync::watch;

async fn start_relay(
    dir: &Path,
    tune: impl FnOnce(&mut kith_relay::Config),
) -> Result<(kith_relay::Running, Multiaddr)> {
    let mut config = kith_relay::Config::ephemeral(dir);
    tune(&mut config);
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

/// A node with fast heartbeats and the given visibility, in `dir`.
async fn node_in(
    dir: &Path,
    name: &str,
    presence: Visibility,
    relays: Vec<Multiaddr>,
) -> Result<TestNode> {
    kith_node::identity::create(dir)?;
    Settings {
        name: name.into(),
        presence,
        ..Settings::default()
    }
    .save(dir)?;
    let mut config = Config::loopback(dir);
    config.relays = relays;
    config.heartbeat_interval = Duration::from_millis(100);
    TestNode::start_in(config).await
}

/// A node's TCP listen address (not a relay circuit).
async fn direct_addr(node: &TestNode) -> Result<Multiaddr> {
    node.node()
        .listen_addrs()
        .await
        .into_iter()
        .find(|a| {
            !a.iter()
                .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
        })
        .ok_or_else(|| anyhow::anyhow!("no direct address"))
}

async fn presence_of(node: &TestNode, who: &str) -> Option<(bool, Option<u64>)> {
    node.node()
        .presence(who)
        .await
        .ok()
        .map(|p| (p.online, p.last_seen_ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_last_seen_typing_and_offline_after_a_clean_stop() -> Result<()> {
    init_logs();
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (relay, relay_addr) = start_relay(dirs[0].path(), |_| {}).await?;
    let alice = node_in(
        dirs[1].path(),
        "alice",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    let mut bob = node_in(
        dirs[2].path(),
        "bob",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    // Invites only: alice reaches bob through the relay.
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;

    wait_for("bob online, never active", || async {
        (presence_of(&alice, "bob").await? == (true, None)).then_some(())
    })
    .await?;

    // A user action moves last seen; background heartbeats after it do not.
    let before = now_ms();
    bob.node().open_chat("alice")?;
    let seen = wait_for("bob's last seen", || async {
        match presence_of(&alice, "bob").await? {
            (true, Some(ms)) if ms >= before => Some(ms),
            _ => None,
        }
    })
    .await?;
    ensure!(seen <= now_ms());
    let beats = relay.metrics().presence_heartbeats.get();
    wait_for("more app heartbeats from bob", || async {
        (relay.metrics().presence_heartbeats.get() >= beats + 5).then_some(())
    })
    .await?;
    assert_eq!(presence_of(&alice, "bob").await, Some((true, Some(seen))));

    // Typing goes through the relay circuit, shows in bob's events, and is stored nowhere.
    let mut events = bob.node().subscribe();
    assert!(alice.node().typing("bob").await?, "typing notice taken");
    let from = alice.peer_id().to_string();
    tokio::time::timeout(kith_tests::DEADLINE, async {
        loop {
            if let Ok(NodeEvent::Typing { from: f, from_name }) = events.recv().await {
                if f == from {
                    assert_eq!(from_name.as_deref(), Some("alice"), "bob's name for alice");
                    return;
                }
            }
        }
    })
    .await?;
    assert!(bob.node().messages(None)?.is_empty());
    assert!(alice.node().messages(None)?.is_empty());
    let json = serde_json::to_value(NodeEvent::Typing {
        from: from.clone(),
        from_name: None,
    })?;
    assert_eq!(
        json,
        serde_json::json!({"type": "typing", "from": from, "from_name": null})
    );

    // A clean stop shows offline within 5 s, with the same last seen.
    let stopped = Instant::now();
    bob.stop().await;
    wait_for("bob offline", || async {
        (presence_of(&alice, "bob").await? == (false, Some(seen))).then_some(())
    })
    .await?;
    ensure!(
        stopped.elapsed() < Duration::from_secs(5),
        "offline only after {:?}",
        stopped.elapsed()
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_heartbeats_show_offline_after_the_threshold() -> Result<()> {
    init_logs();
    let (relay_dir, alice_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (relay, relay_addr) = start_relay(relay_dir.path(), |_| {}).await?;
    let alice = node_in(
        alice_dir.path(),
        "alice",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    // A peer that sends one heartbeat, asks to show offline 300 ms later, and keeps its
    // connection open without another heartbeat (a hung node).
    let mut hung = PresencePeer::new()?;
    let policy = Policy::new(Visibility::Everyone, []);
    let req_id = hung.req_id();
    // Counted from before the heartbeat leaves: the relay stamps it on arrival.
    let beat = Instant::now();
    hung.request(
        relay.peer_id,
        &relay_addr,
        Request::Heartbeat {
            req_id,
            activity: Activity::User,
            offline_after_ms: 300,
            policy_digest: policy.digest(),
            policy: Some(policy),
        },
    )
    .await?;
    let hung_id = hung.peer_id().to_string();
    wait_for("hung peer offline", || async {
        let (online, seen) = presence_of(&alice, &hung_id).await?;
        (!online && seen.is_some()).then_some(())
    })
    .await?;
    // The tracker counts whole milliseconds of wall-clock time, so it may call the peer
    // offline up to one millisecond before 300 ms have fully passed.
    ensure!(
        beat.elapsed() >= Duration::from_millis(299),
        "offline after {:?}, before the 300 ms asked for",
        beat.elapsed()
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_and_nobody_hide_presence_directly_and_through_the_relay() -> Result<()> {
    init_logs();
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (relay, relay_addr) = start_relay(dirs[0].path(), |_| {}).await?;
    let relay_peer = relay.peer_id;
    let mut friend = PresencePeer::new()?;
    let mut stranger = PresencePeer::new()?;
    let friend_id = friend.peer_id().to_string();

    // Carol shows herself to nobody, not even her contacts.
    let carol = node_in(
        dirs[1].path(),
        "carol",
        Visibility::Nobody,
        vec![relay_addr.clone()],
    )
    .await?;
    carol.node().add_contact("friend", &friend_id, &[]).await?;
    wait_for("carol's policy at the relay", || async {
        (relay.metrics().presence_policies.get() >= 1).then_some(())
    })
    .await?;
    // Bob shows himself to his contacts: alice and friend.
    let bob = node_in(
        dirs[2].path(),
        "bob",
        Visibility::Contacts,
        vec![relay_addr.clone()],
    )
    .await?;
    let alice = node_in(
        dirs[3].path(),
        "alice",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    bob.node().add_contact("friend", &friend_id, &[]).await?;
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    alice
        .node()
        .add_contact("carol", &carol.node().invite().encode(), &[])
        .await?;
    assert_eq!(
        alice.node().id_info().await.presence,
        Visibility::Everyone,
        "`kith id` reports the setting"
    );
    assert_eq!(bob.node().id_info().await.presence, Visibility::Contacts);

    // Through the relay: bob's contacts see him online, a stranger sees nothing.
    let (bob_id, carol_id) = (bob.peer_id(), carol.peer_id());
    wait_for("alice sees bob through the relay", || async {
        presence_of(&alice, "bob").await?.0.then_some(())
    })
    .await?;
    // Bob's newest policy (with `friend`) reaches the relay with his next heartbeat: poll.
    let deadline = tokio::time::Instant::now() + kith_tests::DEADLINE;
    while !friend.query(relay_peer, &relay_addr, bob_id).await?.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's contact never saw him online through the relay"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        stranger.query(relay_peer, &relay_addr, bob_id).await?,
        (false, None)
    );
    // Carol is online (her policy reached the relay first) but hidden from everyone.
    assert_eq!(presence_of(&alice, "carol").await, Some((false, None)));
    assert_eq!(
        friend.query(relay_peer, &relay_addr, carol_id).await?,
        (false, None)
    );

    // Directly: the nodes enforce the same policies.
    let (bob_addr, carol_addr) = (direct_addr(&bob).await?, direct_addr(&carol).await?);
    assert!(friend.query(bob_id, &bob_addr, bob_id).await?.0);
    assert_eq!(
        stranger.query(bob_id, &bob_addr, bob_id).await?,
        (false, None)
    );
    assert_eq!(
        friend.query(carol_id, &carol_addr, carol_id).await?,
        (false, None)
    );
    // Alice asks bob himself once they are connected.
    let sent = alice.node().send("bob", "hi", None).await?;
    wait_for("delivered", || async {
        (alice.state(&sent.id) >= Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    assert!(presence_of(&alice, "bob").await.is_some_and(|p| p.0));
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_goes_directly_and_is_never_stored() -> Result<()> {
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    befriend(&alice, "bob", &bob).await?;
    // Only contacts' typing shows.
    befriend(&bob, "alice", &alice).await?;
    let mut events = bob.node().subscribe();
    assert!(alice.node().typing("bob").await?);
    let from = alice.peer_id().to_string();
    tokio::time::timeout(kith_tests::DEADLINE, async {
        loop {
            if let Ok(NodeEvent::Typing { from: f, .. }) = events.recv().await {
                if f == from {
                    return;
                }
            }
        }
    })
    .await?;
    assert!(bob.node().messages(None)?.is_empty());
    // Nobody to tell: no error, nothing queued.
    let nobody = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    assert!(!alice.node().typing(&nobody.to_string()).await?);
    assert!(alice.node().messages(None)?.is_empty());
    Ok(())
}

/// A relay with a small capacity under a flood of presence queries and message deposits, while
/// a node's receipts go through it: message deposits and fetches are never refused, presence and
/// receipts are shed, and every shed receipt arrives once the load ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_presence_and_receipts_never_messages() -> Result<()> {
    init_logs();
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (relay, relay_addr) = start_relay(dirs[0].path(), |c| {
        c.shed_max_in_flight_requests = 8;
        c.shed_max_flush_latency_ms = 0;
        c.deposits_per_sec_per_peer = 1_000_000;
        c.deposit_burst_per_peer = 1_000_000;
        c.mailbox_max_messages = 1_000_000;
        c.mailbox_max_bytes = 1 << 30;
        c.mailbox_max_messages_per_sender = c.mailbox_max_messages;
        c.mailbox_max_bytes_per_sender = c.mailbox_max_bytes;
        c.busy_retry_after_ms = 200;
    })
    .await?;
    let relay_peer = relay.peer_id;
    let mut alice = node_in(
        dirs[1].path(),
        "alice",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    let mut bob = node_in(
        dirs[2].path(),
        "bob",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    let (alice_addr, bob_addr) = (alice.addr().await, bob.addr().await);
    let (alice_id, bob_id) = (alice.peer_id(), bob.peer_id());
    bob.stop().await;

    // Alice leaves messages for bob, then goes offline too: bob's receipts must be deposited.
    const MESSAGES: usize = 30;
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        ids.push(alice.node().send("bob", &format!("m{i}"), None).await?.id);
    }
    wait_for("all sent", || async {
        ids.iter()
            .all(|id| alice.state(id) == Some(MessageState::Sent))
            .then_some(())
    })
    .await?;
    alice.stop().await;

    // The flood: presence queries, and message deposits that keep the relay's queue busy.
    let (stop_tx, stop) = watch::channel(false);
    let queries = tokio::spawn(query_flood(
        PresencePeer::new()?,
        relay_peer,
        relay_addr.clone(),
        bob_id,
        16,
        stop.clone(),
    ));
    let elsewhere = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let load = tokio::spawn(deposit_flood(
        RawPeer::new()?,
        relay_peer,
        relay_addr.clone(),
        DepositClass::Message,
        32,
        None,
        move |key| payload_envelope(key, elsewhere, 100),
        stop.clone(),
    ));
    wait_for("presence shed", || async {
        (relay.metrics().shed_count(Class::Presence) > 0).then_some(())
    })
    .await?;

    // Messages for alice from a stranger, deposited during the load.
    const FOR_ALICE: u64 = 50;
    let stranger = RawPeer::new()?;
    let stranger_id = stranger.key.public().to_peer_id().to_string();
    let for_alice = tokio::spawn(deposit_flood(
        stranger,
        relay_peer,
        relay_addr.clone(),
        DepositClass::Message,
        8,
        Some(FOR_ALICE),
        move |key| payload_envelope(key, alice_id, 100),
        stop.clone(),
    ));

    // Bob comes back under load: his fetch works, his receipts are shed.
    bob.restart_on(bob_addr).await?;
    wait_for("bob fetched every message", || async {
        (bob.node().messages(Some("alice")).ok()?.len() == MESSAGES).then_some(())
    })
    .await?;
    bob.node().read("alice").await?;
    wait_for("receipts shed", || async {
        (relay.metrics().shed_count(Class::Receipt) > 0).then_some(())
    })
    .await?;
    let for_alice = for_alice.await??;
    let _ = stop_tx.send(true);
    let (queries, load) = (queries.await??, load.await??);

    assert_eq!(
        for_alice.ok, FOR_ALICE,
        "every message deposit stored: {for_alice:?}"
    );
    assert_eq!(
        (load.busy, load.other),
        (0, 0),
        "no message deposit refused"
    );
    assert!(load.ok > 0);
    assert!(queries.busy > 0, "presence shed: {queries:?}");
    assert_eq!(relay.metrics().shed_count(Class::Message), 0);

    // The load is over: alice comes back and every receipt arrives.
    alice.restart_on(alice_addr).await?;
    wait_for("every message read", || async {
        ids.iter()
            .all(|id| alice.state(id) == Some(MessageState::Read))
            .then_some(())
    })
    .await?;
    // A stranger's messages wait in alice's requests list.
    wait_for("alice got the stranger's messages", || async {
        let requests = alice.node().requests().ok()?;
        let n = requests.iter().find(|r| r.peer_id == stranger_id)?.messages as u64;
        (n == FOR_ALICE).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

/// The real `kith` binary against an in-process daemon: the `presence` JSON shape, settings in
/// `kith id --json`, and `kith settings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_presence_id_and_settings() -> Result<()> {
    use kith_tests::process::kith_json;
    init_logs();
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (relay, relay_addr) = start_relay(dirs[0].path(), |_| {}).await?;
    let mut alice = node_in(
        dirs[1].path(),
        "alice",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    let bob = node_in(
        dirs[2].path(),
        "bob",
        Visibility::Everyone,
        vec![relay_addr.clone()],
    )
    .await?;
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    wait_for("bob online", || async {
        presence_of(&alice, "bob").await?.0.then_some(())
    })
    .await?;
    let home = alice.home.clone();
    let (h, peer) = (home.clone(), bob.peer_id().to_string());
    let seen = tokio::task::spawn_blocking(move || kith_json(&h, &["presence", "bob", "--json"]))
        .await??;
    assert_eq!(
        seen,
        serde_json::json!({"peer_id": peer, "online": true, "last_seen_ms": null})
    );
    let h = home.clone();
    let id = tokio::task::spawn_blocking(move || kith_json(&h, &["id", "--json"])).await??;
    assert_eq!(id["presence"], "everyone");
    assert_eq!(id["read_receipts"], true);

    alice.stop().await;
    let h = home.clone();
    let settings = tokio::task::spawn_blocking(move || {
        kith_json(
            &h,
            &[
                "settings",
                "--presence",
                "contacts",
                "--read-receipts",
                "off",
                "--json",
            ],
        )
    })
    .await??;
    assert_eq!(settings["presence"], "contacts");
    assert_eq!(settings["read_receipts"], false);
    let h = home.clone();
    let id = tokio::task::spawn_blocking(move || kith_json(&h, &["id", "--json"])).await??;
    assert_eq!(id["presence"], "contacts");
    assert_eq!(id["read_receipts"], false);
    relay.shutdown().await?;
    Ok(())
}
