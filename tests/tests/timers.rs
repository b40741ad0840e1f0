//! In-process tests of temporary chats: a timed message is seen, then gone on both sides and
//! after a restart; one for an offline recipient is never seen, leaves the relay's files, and
//! its sender sees `expired`; timer changes in a group apply per message, with a member
//! offline; a relay refuses an envelope past its expiry (beyond the tolerated skew); a
//! permanent chat exports.

use std::path::{Path, PathBuf};

use kith_net::codec::Message;
use kith_node::NodeEvent;
use kith_protocol::envelope::Header;
use kith_protocol::{mailbox, Body, Destination, Envelope, MessageId, MessageState, Reject};
use kith_tests::scan::holders;
use kith_tests::texts;
use kith_tests::{befriend, init_logs, wait_for, RawPeer, TestNode};
use libp2p::Multiaddr;
use tokio::sync::broadcast;

/// The clock skew the relays of these tests tolerate (the nodes' loopback config has 1 s).
const RELAY_SKEW_MS: u64 = 500;

async fn start_relay(dir: &Path) -> anyhow::Result<(kith_relay::Running, Multiaddr)> {
    let config = kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        expiry_skew_ms: RELAY_SKEW_MS,
        ..kith_relay::Config::ephemeral(dir)
    };
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

fn has_text(node: &TestNode, with: &str, text: &str) -> bool {
    texts(node, with).iter().any(|t| t == text)
}

/// Whether `events` announced the expiry of message `id`.
async fn saw_expiry(events: &mut broadcast::Receiver<NodeEvent>, id: &str) -> Option<MessageState> {
    // The state is written before the event goes out: wait for it, within the deadline.
    let deadline = tokio::time::Instant::now() + kith_tests::DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(NodeEvent::Expired { id: got, state, .. })) if got == id => return Some(state),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            _ => return None,
        }
    }
}

/// Waits until the wall clock passes `at_ms` (a condition polled with a deadline).
async fn wait_until(at_ms: u64) -> anyhow::Result<()> {
    wait_for("the clock to pass a time", || async {
        (kith_node::clock::now_ms() > at_ms).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_message_is_seen_then_gone_on_both_sides_and_after_a_restart() -> anyhow::Result<()>
{
    init_logs();
    let mut alice = TestNode::start("alice", vec![]).await?;
    let mut bob = TestNode::start("bob", vec![]).await?;
    let alice_addr = alice.addr().await;
    let bob_addr = bob.addr().await;
    befriend(&alice, "bob", &bob).await?;
    befriend(&bob, "alice", &alice).await?;

    let before = alice.node().send("bob", "this one stays", None).await?;
    let set = alice.node().set_timer("bob", Some(3), None).await?;
    assert_eq!(set.timer_secs, Some(3));
    wait_for("bob applies the timer", || async {
        (bob.node().timer("alice").ok()?.timer_secs == Some(3)).then_some(())
    })
    .await?;
    // The change is a line in both histories, marked as such.
    for (node, with) in [(&alice, "bob"), (&bob, "alice")] {
        let line = node
            .node()
            .messages(Some(with))?
            .into_iter()
            .find(|m| m.timer.is_some())
            .ok_or_else(|| anyhow::anyhow!("no timer line"))?;
        assert_eq!(line.text, "⏱ disappearing messages: 3s");
        assert_eq!(line.timer.map(|t| t.timer_secs), Some(Some(3)));
    }

    let mut alice_events = alice.node().subscribe();
    let mut bob_events = bob.node().subscribe();
    let text = "this message will self-destruct";
    let sent = alice.node().send("bob", text, None).await?;
    let expires = alice
        .node()
        .messages(Some("bob"))?
        .into_iter()
        .find(|m| m.id == sent.id)
        .and_then(|m| m.expires_at_ms)
        .ok_or_else(|| anyhow::anyhow!("the message carries no expiry"))?;
    wait_for("bob sees it, alice sees it delivered", || async {
        (has_text(&bob, "alice", text) && alice.state(&sent.id) == Some(MessageState::Delivered))
            .then_some(())
    })
    .await?;

    wait_for("it is gone on both sides", || async {
        (!has_text(&alice, "bob", text) && !has_text(&bob, "alice", text)).then_some(())
    })
    .await?;
    assert!(
        kith_node::clock::now_ms() >= expires,
        "deleted before its expiry"
    );
    // Neither store's files hold the text in the clear, and once the expiry bucket's key is
    // destroyed nothing under either home can open what sled's log still holds of it.
    assert_eq!(holders(&alice.home, text.as_bytes()), Vec::<PathBuf>::new());
    assert_eq!(holders(&bob.home, text.as_bytes()), Vec::<PathBuf>::new());
    // (The scan does find a permanent message's text.)
    assert!(!holders(&bob.home, b"this one stays").is_empty());
    for home in [&alice.home, &bob.home] {
        wait_for("the expiry key is destroyed", || async {
            let keys = std::fs::read(home.join("db.expiry-keys")).unwrap_or_default();
            keys.is_empty().then_some(())
        })
        .await?;
    }
    assert_eq!(
        saw_expiry(&mut alice_events, &sent.id).await,
        Some(MessageState::Delivered)
    );
    assert_eq!(
        saw_expiry(&mut bob_events, &sent.id).await,
        Some(MessageState::Delivered)
    );
    // The permanent messages and the timer line stay; the status of the gone one says so.
    assert!(has_text(&alice, "bob", "this one stays"));
    assert!(has_text(&bob, "alice", "this one stays"));
    assert_eq!(alice.state(&before.id), Some(MessageState::Delivered));

    // Another one expires while bob is stopped: gone when he starts again, and the first one
    // is still gone after both restart.
    let second = "said while you were away";
    let sent2 = alice.node().send("bob", second, None).await?;
    wait_for("bob sees the second", || async {
        has_text(&bob, "alice", second).then_some(())
    })
    .await?;
    bob.stop().await;
    let expires2 = kith_node::clock::now_ms() + 3_000;
    wait_until(expires2 + 1_000).await?;
    bob.restart_on(bob_addr).await?;
    alice.restart_on(alice_addr).await?;
    wait_for("the second is gone after the restart", || async {
        (!has_text(&bob, "alice", second) && !has_text(&alice, "bob", second)).then_some(())
    })
    .await?;
    for (node, with) in [(&alice, "bob"), (&bob, "alice")] {
        assert!(!has_text(node, with, text));
        assert!(has_text(node, with, "this one stays"));
        assert_eq!(node.node().timer(with)?.timer_secs, Some(3));
    }
    assert_eq!(alice.state(&sent2.id), Some(MessageState::Delivered));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_never_sees_an_expired_message_and_the_relay_drops_it(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (_relay, relay_addr) = start_relay(&relay_dir).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    alice.node().set_timer("bob", Some(3), None).await?;
    wait_for("bob applies the timer", || async {
        (bob.node().timer("alice").ok()?.timer_secs == Some(3)).then_some(())
    })
    .await?;
    bob.stop().await;

    let mut events = alice.node().subscribe();
    let text = "gone before you look";
    let sent = alice.node().send("bob", text, None).await?;
    let sent_at = kith_node::clock::now_ms();
    wait_for("the relay holds it", || async {
        (alice.state(&sent.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;
    // The relay holds it sealed under its expiry bucket's key, which lives in one small file
    // beside the database; the id is nowhere in the clear.
    let id: MessageId = sent.id.parse()?;
    assert_eq!(holders(&relay_dir, id.as_bytes()), Vec::<PathBuf>::new());
    let key_file = std::fs::read(relay_dir.join("db.expiry-keys"))?;
    let keys: Vec<Vec<u8>> = key_file.chunks_exact(40).map(|r| r[8..].to_vec()).collect();
    assert!(!keys.is_empty(), "no expiry key for the held message");
    for key in &keys {
        assert!(!holders(&relay_dir, key).is_empty());
    }

    // At its expiry the sender's copy goes and says `expired`; the relay's files let it go.
    wait_for("the sender sees expired", || async {
        (alice.state(&sent.id) == Some(MessageState::Expired)).then_some(())
    })
    .await?;
    assert!(!has_text(&alice, "bob", text));
    assert_eq!(
        saw_expiry(&mut events, &sent.id).await,
        Some(MessageState::Expired)
    );
    wait_for("the relay's files no longer hold its key", || async {
        keys.iter()
            .all(|key| holders(&relay_dir, key).is_empty())
            .then_some(())
    })
    .await?;

    // Bob comes back after 10 s away: he gets what is permanent, never the expired message.
    wait_until(sent_at + 10_000).await?;
    let mut bob_events = {
        bob.restart_on(bob_addr).await?;
        bob.node().subscribe()
    };
    let after = alice.node().set_timer("bob", None, None).await?;
    wait_for("bob gets the next change", || async {
        (bob.node().timer("alice").ok()?.timer_secs.is_none()).then_some(())
    })
    .await?;
    assert!(!has_text(&bob, "alice", text));
    while let Ok(event) = bob_events.try_recv() {
        if let NodeEvent::Message { id, text: t, .. } = event {
            assert_ne!(id, sent.id, "bob was shown {t:?}");
        }
    }
    assert!(after.id.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_changes_in_a_group_apply_per_message_with_a_member_offline() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let (_relay, relay_addr) = start_relay(dir.path()).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let mut carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    let carol_addr = carol.addr().await;
    kith_tests::know(&[&bob, &carol], &[&alice]).await?;
    let members = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    let group = alice
        .node()
        .create_group("friends", &members)
        .await?
        .group_id;
    for node in [&bob, &carol] {
        wait_for("member knows the group", || async {
            node.node()
                .group_list()
                .iter()
                .any(|g| g.group_id == group)
                .then_some(())
        })
        .await?;
    }
    carol.stop().await;

    alice.node().send(&group, "permanent one", None).await?;
    alice.node().set_timer(&group, Some(3), Some(true)).await?;
    wait_for("bob applies the group's timer", || async {
        let t = bob.node().timer(&group).ok()?;
        (t.timer_secs == Some(3) && t.admins_only).then_some(())
    })
    .await?;
    // Admins only now: bob may not change it.
    assert!(bob.node().set_timer(&group, None, None).await.is_err());
    let timed = alice.node().send(&group, "timed one", None).await?;
    wait_for("bob sees the timed one", || async {
        has_text(&bob, &group, "timed one").then_some(())
    })
    .await?;
    alice.node().set_timer(&group, None, None).await?;
    wait_for("bob applies off", || async {
        bob.node()
            .timer(&group)
            .ok()?
            .timer_secs
            .is_none()
            .then_some(())
    })
    .await?;
    alice.node().send(&group, "permanent two", None).await?;
    wait_for("the timed one is gone at alice and bob", || async {
        (!has_text(&alice, &group, "timed one") && !has_text(&bob, &group, "timed one"))
            .then_some(())
    })
    .await?;
    // Carol was offline for all of it: the timed message expired in her mailbox.
    assert_eq!(alice.state(&timed.id), Some(MessageState::Expired));
    carol.restart_on(carol_addr).await?;
    let lines = [
        "permanent one",
        "⏱ disappearing messages: 3s",
        "⏱ disappearing messages: off",
        "permanent two",
    ];
    for node in [&alice, &bob, &carol] {
        wait_for("the history without the timed message", || async {
            (texts(node, &group) == lines).then_some(())
        })
        .await?;
        let views = node.node().messages(Some(&group))?;
        let timed: Vec<_> = views
            .iter()
            .filter(|m| m.expires_at_ms.is_some())
            .map(|m| (&m.text, m.sent_at_ms, m.expires_at_ms))
            .collect();
        assert!(timed.is_empty(), "messages with an expiry left: {timed:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_an_expired_envelope_within_its_skew_tolerance() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    // The relay's default tolerance: 30 s.
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path())).await?;
    let addr = relay.listen_addrs[0].clone();
    let mut raw = RawPeer::new()?;
    let bob = libp2p::PeerId::random();
    let now = kith_node::clock::now_ms();
    let deposit = |raw: &RawPeer, expires_at_ms: u64| -> anyhow::Result<_> {
        let envelope = Envelope::seal(
            &raw.key,
            Header {
                id: MessageId::random(),
                to: Destination::Peer(bob),
                sent_at_ms: expires_at_ms - 5_000,
                lamport: 1,
                expires_at_ms: Some(expires_at_ms),
            },
            &Body::Chat {
                text: "timed".into(),
            },
        )?;
        Ok(Message::Valid(mailbox::Request::Deposit {
            req_id: 1,
            envelope,
            class: mailbox::DepositClass::Message,
        }))
    };
    let long_gone = deposit(&raw, now - 60_000)?;
    let answer = raw.mailbox(relay.peer_id, &addr, long_gone).await?;
    assert!(
        matches!(
            answer,
            mailbox::Response::Rejected {
                reason: Reject::Expired,
                ..
            }
        ),
        "{answer:?}"
    );
    // A sender whose clock is 10 s behind the relay's: its fresh message looks expired by
    // 5 s here, inside the tolerance, and is stored.
    let skewed = deposit(&raw, now - 5_000)?;
    let answer = raw.mailbox(relay.peer_id, &addr, skewed).await?;
    assert!(
        matches!(answer, mailbox::Response::Stored { .. }),
        "{answer:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_chat_exports_and_a_temporary_one_does_not() -> anyhow::Result<()> {
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    befriend(&alice, "bob", &bob).await?;
    befriend(&bob, "alice", &alice).await?;
    alice.node().send("bob", "hello bob", None).await?;
    wait_for("bob has it", || async {
        has_text(&bob, "alice", "hello bob").then_some(())
    })
    .await?;
    bob.node().send("alice", "hello alice", None).await?;
    wait_for("alice has the answer", || async {
        has_text(&alice, "bob", "hello alice").then_some(())
    })
    .await?;
    let export = alice.node().export("bob")?;
    assert_eq!(export.format, "kith-export/1");
    assert_eq!(export.conversation, bob.peer_id().to_string());
    assert_eq!(export.name.as_deref(), Some("bob"));
    let lines: Vec<_> = export
        .messages
        .iter()
        .map(|m| (m.from.clone(), m.text.clone()))
        .collect();
    assert_eq!(
        lines,
        [
            (alice.peer_id().to_string(), "hello bob".to_owned()),
            (bob.peer_id().to_string(), "hello alice".to_owned()),
        ]
    );
    alice.node().set_timer("bob", Some(60), None).await?;
    assert!(alice.node().export("bob").is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_file_goes_from_both_sides_but_the_original_stays() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    befriend(&alice, "bob", &bob).await?;
    befriend(&bob, "alice", &alice).await?;
    alice.node().set_timer("bob", Some(4), None).await?;
    let original = dir.path().join("plans.txt");
    let content = b"the plans, in full, for four seconds only".repeat(100);
    std::fs::write(&original, &content)?;
    let sent = alice.node().send_file("bob", &original).await?;
    let received = wait_for("bob has the file", || async {
        let path = bob
            .node()
            .messages(Some("alice"))
            .ok()?
            .into_iter()
            .find(|m| m.id == sent.id)?
            .attachment?
            .path?;
        Some(PathBuf::from(path))
    })
    .await?;
    assert_eq!(std::fs::read(&received)?, content);
    let pack = alice.home.join("blobs").join(format!("{}.pack", sent.id));
    wait_for(
        "the message and its files are gone on both sides",
        || async {
            let gone = |node: &TestNode, with: &str| {
                node.node()
                    .messages(Some(with))
                    .map(|ms| ms.iter().all(|m| m.id != sent.id))
                    .unwrap_or(false)
            };
            (gone(&alice, "bob") && gone(&bob, "alice") && !received.exists() && !pack.exists())
                .then_some(())
        },
    )
    .await?;
    assert!(bob.node().attachment(&sent.id.parse()?).is_none());
    // Nothing of the file's bytes is left under bob's home; the sender's original stays.
    assert_eq!(holders(&bob.home, &content[..64]), Vec::<PathBuf>::new());
    assert_eq!(std::fs::read(&original)?, content);
    Ok(())
}
