//! In-process end-to-end tests of one-to-one messaging between two nodes on loopback.

use kith_net::codec::Message;
use kith_protocol::envelope::Header;
use kith_protocol::{dm, Body, Destination, Envelope, MessageId, MessageState, Reject};
use kith_tests::texts;
use kith_tests::{befriend, init_logs, wait_for, RawPeer, TestNode};

/// Makes alice and bob each other's contacts.
async fn acquaint(alice: &TestNode, bob: &TestNode) -> anyhow::Result<()> {
    befriend(alice, "bob", bob).await?;
    befriend(bob, "alice", alice).await
}

/// Alice and bob, started on loopback and each other's contacts.
async fn friends() -> anyhow::Result<(TestNode, TestNode)> {
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    acquaint(&alice, &bob).await?;
    Ok((alice, bob))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_ticks() -> anyhow::Result<()> {
    init_logs();
    let (alice, bob) = friends().await?;

    let sent = alice.node().send("bob", "hello bob", None).await?;
    wait_for("delivered", || async {
        (alice.state(&sent.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let inbox = bob.node().messages(Some("alice"))?;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].text, "hello bob");
    assert_eq!(inbox[0].from, alice.peer_id().to_string());

    assert_eq!(bob.node().read("alice").await?, 1);
    wait_for("read", || async {
        (alice.state(&sent.id) == Some(MessageState::Read)).then_some(())
    })
    .await?;
    // Reading again sends nothing new.
    assert_eq!(bob.node().read("alice").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_quick_sends_arrive_once_and_in_order() -> anyhow::Result<()> {
    init_logs();
    let (alice, bob) = friends().await?;

    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            alice
                .node()
                .send("bob", &format!("m{i:02}"), None)
                .await?
                .id,
        );
    }
    wait_for("all 50 delivered", || async {
        ids.iter()
            .all(|id| alice.state(id) == Some(MessageState::Delivered))
            .then_some(())
    })
    .await?;
    let expected: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
    assert_eq!(texts(&bob, "alice"), expected);
    assert_eq!(texts(&alice, "bob"), expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_connected_requests_leave_on_ready_streams() -> anyhow::Result<()> {
    init_logs();
    let (alice, bob) = friends().await?;
    // Not connected yet: the claim of one of bob's keys (the first message needs a session)
    // dials; the message itself then finds a ready stream on that connection.
    let wait = Some(std::time::Duration::from_secs(10));
    let first = alice.node().send("bob", "first", wait).await?;
    assert_eq!(first.state, MessageState::Delivered);
    let before = alice.node().dm_paths();
    assert_eq!(before.ready_stream, 1, "{before:?}");
    assert_eq!(before.request_response, 0, "{before:?}");
    // Then each one, sent once the one before was delivered, finds a stream ready.
    for i in 0..20 {
        let sent = alice.node().send("bob", &format!("m{i:02}"), wait).await?;
        assert_eq!(sent.state, MessageState::Delivered, "message {i}");
    }
    let after = alice.node().dm_paths();
    assert_eq!(after.request_response, 0, "{after:?}");
    assert_eq!(after.ready_stream, 21, "{after:?}");
    let mut expected = vec!["first".to_owned()];
    expected.extend((0..20).map(|i| format!("m{i:02}")));
    assert_eq!(texts(&bob, "alice"), expected);
    // Bob's answers (read receipts) go back on ready streams of the same connection.
    assert_eq!(bob.node().read("alice").await?, 21);
    wait_for("read", || async {
        (alice.state(&first.id) == Some(MessageState::Read)).then_some(())
    })
    .await?;
    assert_eq!(bob.node().dm_paths().request_response, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_dm_streams_do_not_hold_up_other_senders() -> anyhow::Result<()> {
    use futures::{AsyncWriteExt, StreamExt};
    init_logs();
    // Bob handles one request at a time.
    let home = tempfile::tempdir()?;
    TestNode::init_home(home.path(), "bob")?;
    let mut config = kith_node::Config::loopback(home.path());
    config.max_in_flight = 1;
    let bob = TestNode::start_in(config).await?;
    let alice = TestNode::start("alice", vec![]).await?;
    acquaint(&alice, &bob).await?;

    // A peer opens dm streams to bob and sends the first byte of a request on each, and no more.
    let (events, _inbound) = tokio::sync::mpsc::channel(8);
    let (behaviour, streams) = kith_node::net::dm_streams::Behaviour::new(
        libp2p::StreamProtocol::new(dm::PROTOCOL),
        events,
    );
    let mut silent = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| behaviour)?
        .with_swarm_config(|c| {
            c.with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
                .with_idle_connection_timeout(std::time::Duration::from_secs(60))
        })
        .build();
    silent.dial(bob.tcp_addr().await)?;
    // The swarm's connection task opens the ready streams on its own: keep the swarm going
    // and wait for them.
    let keep_polling = tokio::spawn(async move {
        loop {
            silent.select_next_some().await;
        }
    });
    let mut held = Vec::new();
    for _ in 0..kith_node::net::dm_streams::SPARE_STREAMS {
        let mut taken = wait_for("a ready stream to bob", || async {
            streams.take(bob.peer_id())
        })
        .await?;
        taken.stream.write_all(&[0]).await?;
        taken.stream.flush().await?;
        held.push(taken);
    }

    // Their requests wait to be read (for up to 10 s), holding no slot: alice's goes through.
    let wait = Some(std::time::Duration::from_secs(5));
    let sent = alice.node().send("bob", "through", wait).await?;
    assert_eq!(sent.state, MessageState::Delivered);
    assert_eq!(texts(&bob, "alice"), ["through"]);
    keep_polling.abort();
    drop(held);
    Ok(())
}

fn chat(key: &libp2p::identity::Keypair, to: libp2p::PeerId, lamport: u64, text: &str) -> Envelope {
    Envelope::seal(
        key,
        Header {
            id: MessageId::random(),
            to: Destination::Peer(to),
            sent_at_ms: 1,
            lamport,
            expires_at_ms: None,
        },
        &Body::Chat { text: text.into() },
    )
    .expect("seal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_delivery_is_stored_once_and_retries_keep_send_order() -> anyhow::Result<()> {
    init_logs();
    let bob = TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    let mut raw = RawPeer::new()?;
    // A contact: a stranger's messages would wait in bob's requests list.
    let raw_id = raw.key.public().to_peer_id().to_string();
    bob.node().add_contact("raw", &raw_id, &[]).await?;
    let sender = raw.key.public().to_peer_id();

    let first = chat(&raw.key, bob.peer_id(), 1, "first");
    let second = chat(&raw.key, bob.peer_id(), 2, "second");
    // The second arrives before the first (a retry reordered them), and the first arrives twice
    // (its answer was lost, so the sender sent it again).
    for env in [&second, &first, &first] {
        let answer = raw
            .dm(
                bob.peer_id(),
                &addr,
                Message::Valid(dm::Request::new(7, env.clone())),
            )
            .await?;
        assert_eq!(answer, dm::Response::Accepted { req_id: 7 });
    }
    assert_eq!(texts(&bob, &sender.to_string()), ["first", "second"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_input_is_rejected() -> anyhow::Result<()> {
    init_logs();
    let bob = TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    let mut raw = RawPeer::new()?;
    // A contact: a stranger's messages would wait in bob's requests list.
    let raw_id = raw.key.public().to_peer_id().to_string();
    bob.node().add_contact("raw", &raw_id, &[]).await?;
    let mallory = libp2p::identity::Keypair::generate_ed25519();

    let ask = |envelope: Envelope| Message::Valid(dm::Request::new(1, envelope));
    let rejected = |reason| dm::Response::Rejected { req_id: 1, reason };

    // A tampered text.
    let mut forged = chat(&raw.key, bob.peer_id(), 1, "pay alice");
    forged.body = kith_protocol::cbor::encode(
        &Body::Chat {
            text: "pay mallory".into(),
        },
        1024,
    )?;
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, ask(forged)).await?,
        rejected(Reject::BadSignature)
    );

    // Signed by someone else than the connection's peer.
    let impostor = chat(&mallory, bob.peer_id(), 1, "hi, it's mallory");
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, ask(impostor)).await?,
        rejected(Reject::WrongSender)
    );

    // Addressed to someone else.
    let misdirected = chat(&raw.key, mallory.public().to_peer_id(), 1, "not for bob");
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, ask(misdirected)).await?,
        rejected(Reject::WrongRecipient)
    );

    // Random bytes, and a frame header claiming 4 GiB.
    let garbage = kith_protocol::frame::encode(&[0xde, 0xad, 0xbe, 0xef], 64)?;
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, Message::Raw(garbage)).await?,
        dm::Response::Rejected {
            req_id: 0,
            reason: Reject::Malformed
        }
    );
    let bomb = u32::MAX.to_be_bytes().to_vec();
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, Message::Raw(bomb)).await?,
        dm::Response::Rejected {
            req_id: 0,
            reason: Reject::TooLarge {
                max: dm::MAX_FRAME_BYTES as u64
            }
        }
    );

    // Nothing of that was stored, and bob still takes good messages.
    assert!(bob.node().messages(None)?.is_empty());
    let good = chat(&raw.key, bob.peer_id(), 1, "honest");
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, ask(good)).await?,
        dm::Response::Accepted { req_id: 1 }
    );
    assert_eq!(bob.node().messages(None)?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_history_and_resume_the_outbox() -> anyhow::Result<()> {
    init_logs();
    let mut alice = TestNode::start("alice", vec![]).await?;
    let mut bob = TestNode::start("bob", vec![]).await?;
    let bob_addr = bob.addr().await;
    acquaint(&alice, &bob).await?;

    let first = alice.node().send("bob", "before", None).await?;
    wait_for("first delivered", || async {
        (alice.state(&first.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;

    // Bob goes away; alice writes; alice restarts too; then bob comes back on his address.
    bob.stop().await;
    let pending = alice.node().send("bob", "while you were out", None).await?;
    assert_eq!(alice.state(&pending.id), Some(MessageState::Pending));
    let alice_addr = alice.addr().await;
    alice.restart_on(alice_addr).await?;
    assert_eq!(texts(&alice, "bob"), ["before", "while you were out"]);
    bob.restart_on(bob_addr).await?;
    // Bob's history survived his restart. Alice's resumed outbox may already have reached him
    // by the time we look, so only the first message is certain here.
    assert_eq!(
        texts(&bob, "alice").first().map(String::as_str),
        Some("before")
    );

    wait_for("resumed outbox delivered", || async {
        (alice.state(&pending.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    assert_eq!(texts(&bob, "alice"), ["before", "while you were out"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_judged_envelope_by_envelope() -> anyhow::Result<()> {
    init_logs();
    let bob = TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    let mut raw = RawPeer::new()?;
    // A contact: a stranger's messages would wait in bob's requests list.
    let raw_id = raw.key.public().to_peer_id().to_string();
    bob.node().add_contact("raw", &raw_id, &[]).await?;
    let sender = raw.key.public().to_peer_id();
    let mallory = libp2p::identity::Keypair::generate_ed25519();

    let first = chat(&raw.key, bob.peer_id(), 1, "one");
    let mut forged = chat(&raw.key, bob.peer_id(), 2, "two");
    forged.body = kith_protocol::cbor::encode(
        &Body::Chat {
            text: "forged".into(),
        },
        1024,
    )?;
    let impostor = chat(&mallory, bob.peer_id(), 3, "from mallory");
    let third = chat(&raw.key, bob.peer_id(), 4, "three");
    // The same message twice in one batch is stored once and accepted twice.
    let batch = vec![
        first.clone(),
        forged,
        impostor,
        third.clone(),
        first.clone(),
    ];
    let answer = raw
        .dm(
            bob.peer_id(),
            &addr,
            Message::Valid(dm::Request::batch(9, batch).expect("a small batch")),
        )
        .await?;
    assert_eq!(
        answer,
        dm::Response::Partly {
            req_id: 9,
            refused: vec![
                dm::Refused {
                    index: 1,
                    reason: Reject::BadSignature
                },
                dm::Refused {
                    index: 2,
                    reason: Reject::WrongSender
                },
            ],
        }
    );
    assert_eq!(texts(&bob, &sender.to_string()), ["one", "three"]);

    // A batch over the limit is refused whole, before anything is stored.
    let too_many: Vec<Envelope> = (0..=dm::MAX_BATCH as u64)
        .map(|i| chat(&raw.key, bob.peer_id(), 10 + i, "many"))
        .collect();
    let request = dm::Request {
        req_id: 10,
        envelope: too_many[0].clone(),
        more: too_many[1..].to_vec(),
    };
    assert!(!request.is_within_limits());
    assert_eq!(
        raw.dm(bob.peer_id(), &addr, Message::Valid(request))
            .await?,
        dm::Response::Rejected {
            req_id: 10,
            reason: Reject::TooLarge {
                max: dm::MAX_BATCH as u64
            }
        }
    );
    assert_eq!(texts(&bob, &sender.to_string()), ["one", "three"]);
    Ok(())
}
