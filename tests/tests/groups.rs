//! In-process end-to-end tests of group chats: members on one relay, delivery through gossip and
//! the relay's fan-out, per-member ticks, membership rules, concurrency and forgeries.

use std::collections::BTreeSet;

use kith_net::codec::Message;
use kith_protocol::group::{self, Change, Op, OpError, Request, Response};
use kith_protocol::{dm, Destination, GroupId, MessageState, Reject};
use kith_tests::{init_logs, wait_for, RawPeer, TestNode};
use kith_tests::{texts, wait_texts};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;

struct Fixture {
    relay: kith_relay::Running,
    relay_addr: Multiaddr,
    alice: TestNode,
    bob: TestNode,
    carol: TestNode,
    group: String,
    _dir: tempfile::TempDir,
}

/// A relay, three members, and a group "friends" created by alice that the others know.
async fn fixture() -> anyhow::Result<Fixture> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let (relay, relay_addr) = kith_tests::start_group_relay(dir.path()).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
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
    Ok(Fixture {
        relay,
        relay_addr,
        alice,
        bob,
        carol,
        group: created.group_id,
        _dir: dir,
    })
}

/// A node's TCP listen address (not its relay circuit).
async fn direct_addr(node: &TestNode) -> anyhow::Result<Multiaddr> {
    node.node()
        .listen_addrs()
        .await
        .into_iter()
        .find(|a| !a.to_string().contains("p2p-circuit"))
        .ok_or_else(|| anyhow::anyhow!("no direct address"))
}

fn member_state(node: &TestNode, id: &str, member: libp2p::PeerId) -> Option<MessageState> {
    node.node()
        .status(id)
        .ok()?
        .members
        .get(&member.to_string())
        .copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_get_each_message_once_with_per_member_ticks() -> anyhow::Result<()> {
    let f = fixture().await?;
    let info = f.alice.node().group_info("friends").await?;
    assert_eq!(info.members.len(), 3);
    assert_eq!(info.admins, vec![f.alice.peer_id().to_string()]);
    assert_eq!(info.version, 1);

    let first = f.alice.node().send("friends", "hello all", None).await?;
    let second = f.alice.node().send(&f.group, "second", None).await?;
    for node in [&f.bob, &f.carol] {
        wait_texts(node, "friends", &["hello all", "second"]).await?;
    }
    let reply = f.bob.node().send("friends", "hi alice", None).await?;
    wait_texts(&f.carol, "friends", &["hello all", "second", "hi alice"]).await?;
    wait_texts(&f.alice, &f.group, &["hello all", "second", "hi alice"]).await?;

    // Every member's delivered receipt comes back; the message state is the minimum.
    for id in [&first.id, &second.id] {
        wait_for("delivered to both", || async {
            (f.alice.state(id) == Some(MessageState::Delivered)).then_some(())
        })
        .await?;
    }
    wait_for("bob's reply delivered", || async {
        (f.bob.state(&reply.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let status = f.alice.node().status(&first.id)?;
    assert_eq!(status.members.len(), 2);
    assert!(status
        .members
        .values()
        .all(|s| *s == MessageState::Delivered));

    // Bob reads: his member state is read, the message stays delivered (carol has not).
    assert_eq!(f.bob.node().read("friends").await?, 2);
    wait_for("bob read", || async {
        (member_state(&f.alice, &first.id, f.bob.peer_id()) == Some(MessageState::Read))
            .then_some(())
    })
    .await?;
    assert_eq!(
        member_state(&f.alice, &first.id, f.carol.peer_id()),
        Some(MessageState::Delivered)
    );
    assert_eq!(f.alice.state(&first.id), Some(MessageState::Delivered));
    f.carol.node().read(&f.group).await?;
    wait_for("read by all", || async {
        (f.alice.state(&first.id) == Some(MessageState::Read)).then_some(())
    })
    .await?;
    // Messages still show once each (gossip, pushes and mailbox copies are deduplicated).
    assert_eq!(texts(&f.carol, "friends").len(), 3);
    f.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_gets_messages_on_return() -> anyhow::Result<()> {
    let mut f = fixture().await?;
    let carol_addr = direct_addr(&f.carol).await?;
    let carol = f.carol.peer_id();
    f.carol.stop().await;
    let sent = f
        .alice
        .node()
        .send("friends", "while you were out", None)
        .await?;
    wait_texts(&f.bob, "friends", &["while you were out"]).await?;
    wait_for("bob delivered, carol sent", || async {
        (member_state(&f.alice, &sent.id, f.bob.peer_id()) == Some(MessageState::Delivered)
            && member_state(&f.alice, &sent.id, carol) == Some(MessageState::Sent))
        .then_some(())
    })
    .await?;
    assert_eq!(f.alice.state(&sent.id), Some(MessageState::Sent));

    f.carol.restart_on(carol_addr).await?;
    wait_texts(&f.carol, "friends", &["while you were out"]).await?;
    wait_for("delivered to all", || async {
        (f.alice.state(&sent.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    f.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_change_membership_and_concurrent_admins_agree() -> anyhow::Result<()> {
    let f = fixture().await?;
    // Dave and erin run no node: their key packages wait at the relay.
    let (dave_key, erin_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let stand_ins = tempfile::tempdir()?;
    kith_tests::publish_packages(
        f.relay.peer_id,
        &f.relay_addr,
        &[dave_key.clone(), erin_key.clone()],
        stand_ins.path(),
    )
    .await?;
    let dave = dave_key.public().to_peer_id().to_string();
    let erin = erin_key.public().to_peer_id().to_string();
    let carol = f.carol.peer_id().to_string();
    use kith_node::features::group::ChangeKind::*;

    let refused = f.bob.node().change_group("friends", Add, Some(&dave)).await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not an admin"), "{err}");
    let refused = f
        .bob
        .node()
        .change_group("friends", Remove, Some(&carol))
        .await;
    assert!(refused.is_err());
    assert_eq!(f.alice.node().group_info("friends").await?.members.len(), 3);

    let bob = f.bob.peer_id().to_string();
    f.alice
        .node()
        .change_group("friends", Promote, Some(&bob))
        .await?;
    wait_for("bob is admin", || async {
        let info = f.bob.node().group_info("friends").await.ok()?;
        info.admins.contains(&bob).then_some(())
    })
    .await?;

    // Two admins add at the same time, on the same version: one wins, the other re-submits.
    let (a, b) = tokio::join!(
        f.alice.node().change_group("friends", Add, Some(&dave)),
        f.bob.node().change_group("friends", Add, Some(&erin)),
    );
    a?;
    b?;
    let expected: BTreeSet<String> = [
        f.alice.peer_id().to_string(),
        bob.clone(),
        carol.clone(),
        dave.clone(),
        erin.clone(),
    ]
    .into();
    for node in [&f.alice, &f.bob, &f.carol] {
        wait_for("one agreed state", || async {
            let info = node.node().group_info("friends").await.ok()?;
            let members: BTreeSet<String> = info.members.into_iter().collect();
            // One chain, one epoch: create (1), then one commit per add.
            (members == expected && info.version == 4 && info.epoch == 3).then_some(())
        })
        .await?;
    }
    f.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_receives_nothing_new() -> anyhow::Result<()> {
    let f = fixture().await?;
    f.alice.node().send("friends", "before", None).await?;
    wait_texts(&f.carol, "friends", &["before"]).await?;
    let carol = f.carol.peer_id().to_string();
    f.alice
        .node()
        .change_group(
            "friends",
            kith_node::features::group::ChangeKind::Remove,
            Some(&carol),
        )
        .await?;
    wait_for("carol learns she is out", || async {
        let list = f.carol.node().group_list();
        (list.len() == 1 && !list[0].member).then_some(())
    })
    .await?;
    // The group stays in her list, read-only, and its history stays hers, by name too.
    let names: Vec<String> = f
        .carol
        .node()
        .messages(Some("friends"))?
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(names, ["before"]);
    // Copies from before the removal may still wait for her next fetch; nothing new may join.
    let waiting = f.relay.mailbox_usage(Some(f.carol.peer_id())).await?;
    let after = f.alice.node().send("friends", "after", None).await?;
    wait_texts(&f.bob, "friends", &["before", "after"]).await?;
    wait_for("delivered to the remaining member", || async {
        (f.alice.state(&after.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let status = f.alice.node().status(&after.id)?;
    assert!(!status.members.contains_key(&carol));
    // Nothing new waits for carol at the relay, and she has nothing new.
    let usage = f.relay.mailbox_usage(Some(f.carol.peer_id())).await?;
    assert!(
        usage.messages <= waiting.messages,
        "{usage:?} > {waiting:?}"
    );
    assert_eq!(texts(&f.carol, &f.group), ["before"]);
    // Her own posts are refused too, saying why.
    let sent = f.carol.node().send(&f.group, "still here?", None).await;
    let refused = sent.expect_err("a removed member cannot post").to_string();
    assert!(refused.contains("no longer a member"), "{refused}");
    assert_eq!(f.carol.node().group_list()[0].group_id, f.group);
    f.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_201st_member_is_refused() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let (relay, relay_addr) = kith_tests::start_group_relay(dir.path()).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    // 199 members that run no node: their key packages wait at the relay.
    let keys: Vec<Keypair> = (0..199).map(|_| Keypair::generate_ed25519()).collect();
    let stand_ins = tempfile::tempdir()?;
    kith_tests::publish_packages(relay.peer_id, &relay_addr, &keys, stand_ins.path()).await?;
    let others: Vec<String> = keys
        .iter()
        .map(|k| k.public().to_peer_id().to_string())
        .collect();
    let created = alice.node().create_group("big", &others).await?;
    let info = alice.node().group_info(&created.group_id).await?;
    assert_eq!(info.members.len(), 200);
    let extra = Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let refused = alice
        .node()
        .change_group(
            "big",
            kith_node::features::group::ChangeKind::Add,
            Some(&extra),
        )
        .await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("the group is full: at most 200 members"),
        "{err}"
    );
    assert_eq!(alice.node().group_info("big").await?.members.len(), 200);
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_operations_are_refused_by_relay_and_members() -> anyhow::Result<()> {
    let f = fixture().await?;
    let group: GroupId = f.group.parse()?;
    let relay_peer = f.relay.peer_id;
    let mallory = Keypair::generate_ed25519();
    let mut raw = RawPeer::with_key(mallory.clone())?;
    let (add_op, handshake) = kith_tests::op_with_junk_commit(
        group,
        1,
        1,
        Change::Add {
            member: mallory.public().to_peer_id(),
        },
    );
    let add = |version| Op {
        version,
        ..add_op.clone()
    };

    // A stranger's add, on the right version: not an admin.
    let forged = group::seal_op(&mallory, add(1), 1)?;
    let answer = raw
        .group(
            relay_peer,
            &f.relay_addr,
            Request::Submit {
                req_id: 1,
                op: forged.clone(),
                handshake: handshake.clone(),
            },
        )
        .await?;
    assert!(
        matches!(
            answer,
            Response::Refused {
                reason: OpError::NotAdmin { .. },
                ..
            }
        ),
        "{answer:?}"
    );
    // An admin's operation with a changed target: the signature no longer matches.
    let alice_key = kith_node::identity::load(&f.alice.home)?;
    let mut tampered = group::seal_op(&alice_key, add(1), 1)?;
    tampered.from = f.bob.peer_id();
    let answer = raw
        .group(
            relay_peer,
            &f.relay_addr,
            Request::Submit {
                req_id: 2,
                op: tampered,
                handshake: handshake.clone(),
            },
        )
        .await?;
    assert!(
        matches!(
            answer,
            Response::Rejected {
                reason: Reject::BadSignature,
                ..
            }
        ),
        "{answer:?}"
    );
    // A version that skips ahead: a conflict with the current state, nothing applied.
    let skipping = group::seal_op(&alice_key, add(7), 1)?;
    let answer = raw
        .group(
            relay_peer,
            &f.relay_addr,
            Request::Submit {
                req_id: 3,
                op: skipping,
                handshake: handshake.clone(),
            },
        )
        .await?;
    assert!(
        matches!(answer, Response::Conflict { ref state, .. } if state.version == 1),
        "{answer:?}"
    );
    // A post from a non-member.
    let post = kith_protocol::Envelope::seal(
        &mallory,
        kith_protocol::envelope::Header {
            id: kith_protocol::MessageId::random(),
            to: Destination::Group(group),
            sent_at_ms: 0,
            lamport: 1,
            expires_at_ms: None,
        },
        &kith_protocol::Body::Chat { text: "hi".into() },
    )?;
    let answer = raw
        .group(
            relay_peer,
            &f.relay_addr,
            Request::Post {
                req_id: 4,
                envelope: post.clone(),
            },
        )
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

    // A member's (alice's) message that is no MLS message, and a stranger's that claims to be.
    let junk = |key: &Keypair| {
        kith_protocol::Envelope::seal(
            key,
            kith_protocol::envelope::Header {
                id: kith_protocol::MessageId::random(),
                to: Destination::Group(group),
                sent_at_ms: 0,
                lamport: 2,
                expires_at_ms: None,
            },
            &kith_protocol::Body::Mls {
                ciphertext: vec![0x55; 200],
            },
        )
    };
    let malformed = junk(&alice_key)?;
    let strangers = junk(&mallory)?;

    // Members validate too: the forged add, the stranger's messages (in the clear and not) and
    // a member's undecryptable one, handed to bob directly.
    let bob_addr = direct_addr(&f.bob).await?;
    for (i, envelope) in [forged, post, malformed, strangers].into_iter().enumerate() {
        let answer = raw
            .dm(
                f.bob.peer_id(),
                &bob_addr,
                Message::Valid(dm::Request::new(i as u64, envelope)),
            )
            .await?;
        assert!(
            matches!(answer, dm::Response::Rejected { .. }),
            "{answer:?}"
        );
    }
    let info = f.bob.node().group_info("friends").await?;
    assert_eq!(info.version, 1);
    assert!(!info
        .members
        .contains(&mallory.public().to_peer_id().to_string()));
    assert!(texts(&f.bob, "friends").is_empty());
    f.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_group_relay_keeps_sends_pending_and_says_why() -> anyhow::Result<()> {
    let f = fixture().await?;
    f.relay.shutdown().await?;
    let sent = f
        .alice
        .node()
        .send(
            "friends",
            "anyone?",
            Some(std::time::Duration::from_secs(1)),
        )
        .await?;
    assert_eq!(sent.state, MessageState::Pending);
    let note = sent.note.unwrap_or_default();
    assert!(note.contains("relay"), "{note}");
    let status = f.alice.node().status(&sent.id)?;
    assert_eq!(status.state, MessageState::Pending);
    assert!(status.reason.is_some_and(|r| r.contains("relay")));
    assert!(status.members.values().all(|s| *s == MessageState::Pending));
    Ok(())
}
