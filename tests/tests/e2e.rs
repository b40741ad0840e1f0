//! In-process tests of end-to-end encryption for one-to-one chats: what a relay stores for an
//! offline recipient is unreadable, a lost session recovers through the re-send flow, and two
//! people writing to each other first at the same time both get through.

use std::path::{Path, PathBuf};

use kith_node::NodeEvent;
use kith_protocol::MessageState;
use kith_tests::scan::{file_key, files_under, holders, pattern};
use kith_tests::texts;
use kith_tests::{befriend, init_logs, wait_for, TestNode};
use libp2p::Multiaddr;

const MIB: usize = 1024 * 1024;

async fn start_relay(dir: &Path) -> anyhow::Result<(kith_relay::Running, Multiaddr)> {
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir)).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_holds_nothing_readable_for_an_offline_recipient() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (_relay, relay_addr) = start_relay(&relay_dir).await?;
    let mut alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    // Bob's first start published his keys to the relay; then he goes offline.
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    // A contact before the file comes (a stranger's file waits to be asked for).
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    let text = "meet me under the old oak at 23:17, bring the ledger";
    let sent = alice.node().send("bob", text, None).await?;
    let data = pattern(2 * MIB, 7);
    let path = dir.path().join("ledger.bin");
    std::fs::write(&path, &data)?;
    let file = alice.node().send_file("bob", &path).await?;
    wait_for("both are held by the relay", || async {
        (alice.state(&sent.id) == Some(MessageState::Sent)
            && alice.state(&file.id) == Some(MessageState::Sent))
        .then_some(())
    })
    .await?;
    alice.stop().await;
    let key = file_key(&alice.home)?;
    assert_eq!(key.len(), 32);

    // Nothing under the relay's data directory holds the text, the file's bytes or its key.
    let sample = &data[MIB..MIB + 64];
    assert!(!files_under(&relay_dir).is_empty());
    assert_eq!(holders(&relay_dir, text.as_bytes()), Vec::<PathBuf>::new());
    assert_eq!(holders(&relay_dir, sample), Vec::<PathBuf>::new());
    assert_eq!(holders(&relay_dir, &key), Vec::<PathBuf>::new());
    // The scan does find what is there in the clear: alice's own history and file key.
    assert!(!holders(&alice.home, text.as_bytes()).is_empty());
    assert!(!holders(&alice.home, &key).is_empty());

    // Bob comes back and gets both, intact.
    bob.restart_on(bob_addr).await?;
    let both = || async {
        let messages = bob.node().messages(Some("alice")).ok()?;
        let got_text = messages.iter().any(|m| m.text == text);
        let file = messages
            .into_iter()
            .find_map(|m| m.attachment.and_then(|a| a.path))?;
        got_text.then_some(file)
    };
    // Up to three deadlines of the harness: this file shares the machine with a 2,000-message
    // test.
    let mut received = None;
    for _ in 0..3 {
        received = wait_for("bob has the text and the file", both).await.ok();
        if received.is_some() {
            break;
        }
    }
    let received = received.ok_or_else(|| anyhow::anyhow!("bob never got both"))?;
    assert_eq!(std::fs::read(received)?, data);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Alice and bob, contacts of each other with no relay, and bob's listen address.
async fn friends() -> anyhow::Result<(TestNode, TestNode, Multiaddr)> {
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    let bob_addr = bob.addr().await;
    befriend(&alice, "bob", &bob).await?;
    befriend(&bob, "alice", &alice).await?;
    Ok((alice, bob, bob_addr))
}

/// Stops `node`, puts `store` (a copy of a store directory) in place of its store, and starts it
/// again at `addr`.
async fn restart_from(node: &mut TestNode, store: &Path, addr: Multiaddr) -> anyhow::Result<()> {
    node.stop().await;
    std::fs::remove_dir_all(node.home.join("db"))?;
    copy_dir(store, &node.home.join("db"))?;
    node.restart_on(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_a_backup_gets_messages_again_through_a_re_send() -> anyhow::Result<()>
{
    init_logs();
    let dir = tempfile::tempdir()?;
    let (alice, mut bob, bob_addr) = friends().await?;

    // A backup of bob's store before he ever talked to alice.
    bob.stop().await;
    let backup = dir.path().join("backup");
    copy_dir(&bob.home.join("db"), &backup)?;
    bob.restart_on(bob_addr.clone()).await?;

    let first = alice.node().send("bob", "one", None).await?;
    wait_for("first delivered", || async {
        (alice.state(&first.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    bob.node().send("alice", "two", None).await?;
    wait_for("alice has bob's answer", || async {
        (texts(&alice, "bob") == ["one", "two"]).then_some(())
    })
    .await?;

    // Bob's disk dies; he restores the backup: his sessions with alice are gone.
    restart_from(&mut bob, &backup, bob_addr).await?;
    let mut events = bob.node().subscribe();

    // Alice's next message is on the session bob lost: he cannot read it, says so, and asks
    // for it again; alice sends it again on a new session and it replaces the entry.
    let third = alice.node().send("bob", "three", None).await?;
    let undecryptable = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::Undecryptable { id, .. }) => return Ok(id),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await??;
    assert_eq!(undecryptable, third.id);
    wait_for("bob reads the message sent again", || async {
        (texts(&bob, "alice") == ["three"]).then_some(())
    })
    .await?;
    // The conversation goes on both ways on the new session.
    bob.node().send("alice", "four", None).await?;
    wait_for("alice has it", || async {
        (texts(&alice, "bob") == ["one", "two", "three", "four"]).then_some(())
    })
    .await?;
    Ok(())
}

/// The sending epoch rests on the store's clean-stop mark: a daemon stopped with SIGTERM
/// leaves it (its sessions go on sealing after a restart), one killed with SIGKILL does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_cleanly_marks_its_store_and_a_killed_one_does_not() -> anyhow::Result<()>
{
    use kith_node::core::store::Store;
    use kith_tests::process::{kith, start_daemon};
    init_logs();
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("alice");
    assert!(kith(&home, &["init", "--name", "alice"])?.status.success());
    let started_clean = || async {
        let store = Store::open(&home.join("db"))?;
        let clean = store.started_clean();
        let closed = store.closed();
        drop(store);
        closed.wait().await;
        anyhow::Ok(clean)
    };
    let mut daemon = start_daemon(&home, &[]).await?;
    assert!(daemon.terminate()?.success());
    assert!(started_clean().await?, "stopped with SIGTERM");
    let mut daemon = start_daemon(&home, &[]).await?;
    daemon.kill()?;
    assert!(!started_clean().await?, "killed");
    Ok(())
}

/// A sealed message may leave before its sender's flush: a crash can then lose the session
/// state it used. Here bob's store comes back as it was before his second message (what a
/// crash just after sending it could leave, without the clean-stop mark); reusing that state
/// would seal the third message with the second one's key, which alice already used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_back_from_a_crash_seals_on_a_new_session() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let (alice, mut bob, bob_addr) = friends().await?;
    let mut events = alice.node().subscribe();

    bob.node()
        .send("alice", "one", Some(std::time::Duration::from_secs(10)))
        .await?;
    // The files of bob's running store after his first message: a crash image.
    let image = dir.path().join("image");
    copy_dir(&bob.home.join("db"), &image)?;
    bob.node()
        .send("alice", "two", Some(std::time::Duration::from_secs(10)))
        .await?;
    wait_for("alice has both", || async {
        (texts(&alice, "bob") == ["one", "two"]).then_some(())
    })
    .await?;

    restart_from(&mut bob, &image, bob_addr).await?;
    bob.node().send("alice", "three", None).await?;
    // (The third message has the second one's Lamport time, which bob lost: the two may
    // show in either order.)
    let sorted = |node: &TestNode, with: &str| {
        let mut texts = texts(node, with);
        texts.sort();
        texts
    };
    wait_for("alice reads the third", || async {
        (sorted(&alice, "bob") == ["one", "three", "two"]).then_some(())
    })
    .await?;
    // Opened at the first try: nothing was undecryptable, so nothing was asked for again.
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, NodeEvent::Undecryptable { .. }),
            "alice could not decrypt a message: {event:?}"
        );
    }
    // And the conversation goes on both ways.
    alice.node().send("bob", "four", None).await?;
    wait_for("bob reads the answer", || async {
        (sorted(&bob, "alice") == ["four", "one", "three"]).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_writing_first_at_the_same_time_both_get_through() -> anyhow::Result<()> {
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    befriend(&alice, "bob", &bob).await?;
    befriend(&bob, "alice", &alice).await?;
    // Neither has a session: both claim a key of the other and send pre-key messages at once.
    let (a, b) = tokio::join!(
        alice.node().send("bob", "hi bob", None),
        bob.node().send("alice", "hi alice", None)
    );
    let (a, b) = (a?, b?);
    wait_for("both delivered", || async {
        (alice.state(&a.id) == Some(MessageState::Delivered)
            && bob.state(&b.id) == Some(MessageState::Delivered))
        .then_some(())
    })
    .await?;
    // Then a quick exchange in both directions, each side on whichever session it picked.
    for i in 0..5 {
        let (to_bob, to_alice) = (format!("a{i}"), format!("b{i}"));
        let (a, b) = tokio::join!(
            alice.node().send("bob", &to_bob, None),
            bob.node().send("alice", &to_alice, None)
        );
        let (a, b) = (a?, b?);
        wait_for("both delivered", || async {
            (alice.state(&a.id) == Some(MessageState::Delivered)
                && bob.state(&b.id) == Some(MessageState::Delivered))
            .then_some(())
        })
        .await?;
    }
    let mut at_bob: Vec<String> = texts(&bob, "alice")
        .into_iter()
        .filter(|t| t.starts_with('a') || t == "hi bob")
        .collect();
    at_bob.sort();
    assert_eq!(at_bob, ["a0", "a1", "a2", "a3", "a4", "hi bob"]);
    let mut at_alice: Vec<String> = texts(&alice, "bob")
        .into_iter()
        .filter(|t| t.starts_with('b') || t == "hi alice")
        .collect();
    at_alice.sort();
    assert_eq!(at_alice, ["b0", "b1", "b2", "b3", "b4", "hi alice"]);
    // Nothing showed up as undecryptable.
    assert!(!texts(&bob, "alice")
        .iter()
        .chain(texts(&alice, "bob").iter())
        .any(|t| t == kith_node::core::crypto::UNDECRYPTABLE_TEXT));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_key_lets_a_new_contact_write_once_one_time_keys_ran_out() -> anyhow::Result<()>
{
    use kith_protocol::prekeys::{Request, Response};
    init_logs();
    let dir = tempfile::tempdir()?;
    let (relay, relay_addr) = start_relay(&dir.path().join("relay")).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_peer = bob.peer_id();
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    bob.stop().await;

    // Someone claims every one-time key bob left at the relay: each comes once, signed by bob.
    let mut raw = kith_tests::RawPeer::new()?;
    let mut seen = std::collections::HashSet::new();
    let fallback = loop {
        let claim = Request::Claim {
            req_id: seen.len() as u64,
            peer: bob_peer,
        };
        match raw.keys(relay.peer_id, &relay_addr, claim).await? {
            Response::Claimed {
                identity,
                key,
                fallback,
                ..
            } => {
                identity.verify(&bob_peer)?;
                key.verify(&bob_peer, fallback)?;
                if fallback {
                    break key;
                }
                assert!(seen.insert(key.key), "a one-time key handed out twice");
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    };
    assert_eq!(seen.len(), kith_protocol::prekeys::MAX_ONE_TIME_KEYS);
    assert!(!seen.contains(&fallback.key));

    // A new contact still writes to bob, offline, through the fallback key.
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    carol.node().add_contact("bob", &bob_invite, &[]).await?;
    let sent = carol
        .node()
        .send("bob", "hello from a newcomer", None)
        .await?;
    wait_for("held by the relay", || async {
        (carol.state(&sent.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;
    assert!(relay.metrics().keys_fallback_claims.get() >= 2);
    bob.restart_on(bob_addr).await?;
    let carol_peer = carol.peer_id().to_string();
    // Bob takes carol as a contact: a stranger's messages would wait in his requests list.
    bob.node().add_contact("carol", &carol_peer, &[]).await?;
    wait_for("bob reads it", || async {
        let texts: Vec<String> = bob
            .node()
            .messages(Some(&carol_peer))
            .ok()?
            .into_iter()
            .map(|m| m.text)
            .collect();
        (texts == ["hello from a newcomer"]).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_replayed_or_tampered_with_on_the_way_gets_nowhere() -> anyhow::Result<()> {
    use kith_net::codec::Message;
    use kith_protocol::{dm, mailbox, Body, Reject};
    init_logs();
    let dir = tempfile::tempdir()?;
    let (relay, relay_addr) = start_relay(&dir.path().join("relay")).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;
    let sent = alice.node().send("bob", "pay carol 10", None).await?;
    wait_for("held by the relay", || async {
        (alice.state(&sent.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;

    // What the relay holds (read here with bob's key, as the relay itself could): a sealed body.
    let mut as_bob = kith_tests::RawPeer::with_key(kith_node::identity::load(&bob.home)?)?;
    let fetch = mailbox::Request::Fetch {
        req_id: 1,
        after: None,
        limit: 10,
    };
    let mailbox::Response::Batch { items, .. } = as_bob
        .mailbox(relay.peer_id, &relay_addr, Message::Valid(fetch))
        .await?
    else {
        anyhow::bail!("no batch");
    };
    drop(as_bob);
    let captured = items
        .into_iter()
        .map(|item| item.envelope)
        .find(|e| e.id.to_string() == sent.id)
        .ok_or_else(|| anyhow::anyhow!("the message is not in the mailbox"))?;
    assert!(matches!(captured.body()?, Body::Olm(_)));

    bob.restart_on(bob_addr.clone()).await?;
    let alice_peer = alice.peer_id().to_string();
    // Bob takes alice as a contact: a stranger's messages would wait in his requests list.
    bob.node().add_contact("alice", &alice_peer, &[]).await?;
    let texts = |bob: &TestNode| -> Vec<String> {
        bob.node()
            .messages(Some(&alice_peer))
            .map(|m| m.into_iter().map(|m| m.text).collect())
            .unwrap_or_default()
    };
    wait_for("bob reads it", || async {
        (texts(&bob) == ["pay carol 10"]).then_some(())
    })
    .await?;

    // Played again on the way (here straight to bob, on a connection as alice): accepted as
    // the duplicate it is, and shown once. While another copy (the relay's push racing bob's
    // fetch) is still being stored, the answer is `Busy`: asked again, it is `Accepted`.
    let mut as_alice = kith_tests::RawPeer::with_key(kith_node::identity::load(&alice.home)?)?;
    let deadline = tokio::time::Instant::now() + kith_tests::DEADLINE;
    loop {
        let replay = Message::Valid(dm::Request::new(1, captured.clone()));
        match as_alice.dm(bob.peer_id(), &bob_addr, replay).await? {
            dm::Response::Accepted { req_id: 1 } => break,
            dm::Response::Rejected {
                reason: kith_protocol::Reject::Busy { retry_after_ms },
                ..
            } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(retry_after_ms)).await;
            }
            other => anyhow::bail!("the replay was answered {other:?}"),
        }
    }
    // One byte of the sealed body flipped: refused.
    let mut tampered = captured.clone();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_eq!(
        as_alice
            .dm(
                bob.peer_id(),
                &bob_addr,
                Message::Valid(dm::Request::new(2, tampered))
            )
            .await?,
        dm::Response::Rejected {
            req_id: 2,
            reason: Reject::BadSignature
        }
    );
    assert_eq!(texts(&bob), ["pay carol 10"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_numbers_match_and_a_changed_identity_key_unverifies_the_contact(
) -> anyhow::Result<()> {
    init_logs();
    let (alice, mut bob, bob_addr) = friends().await?;
    // Added by peer id and address only: no identity key is known before a first message.
    assert!(alice.node().verify_contact("bob", false).is_err());
    let hello = alice.node().send("bob", "hello", None).await?;
    wait_for("delivered", || async {
        (alice.state(&hello.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;

    // Both sides compute the same 60 digits.
    let at_alice = alice.node().verify_contact("bob", false)?;
    let at_bob = bob.node().verify_contact("alice", false)?;
    assert_eq!(at_alice.safety_number, at_bob.safety_number);
    assert_eq!(
        at_alice
            .safety_number
            .chars()
            .filter(char::is_ascii_digit)
            .count(),
        60
    );
    assert!(!at_alice.verified);
    assert!(alice.node().verify_contact("bob", true)?.verified);
    let listed = alice.node().contacts()?;
    assert!(listed.iter().any(|c| c.name == "bob" && c.verified));

    // Bob reinstalls (same peer id, new end-to-end identity) and writes again.
    bob.stop().await;
    std::fs::remove_dir_all(bob.home.join("db"))?;
    bob.restart_on(bob_addr).await?;
    befriend(&bob, "alice", &alice).await?;
    let mut events = alice.node().subscribe();
    bob.node().send("alice", "new install", None).await?;
    let changed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::IdentityChanged { peer }) => return Ok(peer),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await??;
    assert_eq!(changed, bob.peer_id().to_string());
    let now = alice.node().verify_contact("bob", false)?;
    assert!(!now.verified);
    assert!(now.identity_changed);
    assert_ne!(now.safety_number, at_alice.safety_number);
    let listed = alice.node().contacts()?;
    assert!(listed
        .iter()
        .any(|c| c.name == "bob" && !c.verified && c.identity_changed));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_each_way_through_a_relay_with_the_recipient_restarting(
) -> anyhow::Result<()> {
    const EACH: usize = 1000;
    init_logs();
    let dir = tempfile::tempdir()?;
    let (_relay, relay_addr) = start_relay(&dir.path().join("relay")).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_addr = bob.addr().await;
    // From invites only: the relay is the way between them (its circuits, its mailboxes).
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;

    let from_alice = {
        let node = alice.node().clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(EACH);
            for i in 0..EACH {
                ids.push(node.send("bob", &format!("a{i:04}"), None).await?.id);
            }
            anyhow::Ok(ids)
        })
    };
    for i in 0..EACH / 2 {
        bob.node().send("alice", &format!("b{i:04}"), None).await?;
    }
    // Bob restarts in the middle of it all.
    bob.restart_on(bob_addr).await?;
    for i in EACH / 2..EACH {
        bob.node().send("alice", &format!("b{i:04}"), None).await?;
    }
    from_alice.await??;

    let all = |node: &TestNode, with: &str, prefix: char| -> Option<Vec<String>> {
        let texts: Vec<String> = node
            .node()
            .messages(Some(with))
            .ok()?
            .into_iter()
            .filter(|m| m.text.starts_with(prefix))
            .map(|m| m.text)
            .collect();
        (texts.len() >= EACH).then_some(texts)
    };
    let mut at_bob = None;
    let mut at_alice = None;
    // Up to a minute in all: three deadlines of the harness.
    for _ in 0..3 {
        at_bob = wait_for("bob has alice's thousand", || async {
            all(&bob, "alice", 'a')
        })
        .await
        .ok();
        at_alice = wait_for("alice has bob's thousand", || async {
            all(&alice, "bob", 'b')
        })
        .await
        .ok();
        if at_bob.is_some() && at_alice.is_some() {
            break;
        }
    }
    let expected =
        |prefix: char| -> Vec<String> { (0..EACH).map(|i| format!("{prefix}{i:04}")).collect() };
    assert_eq!(at_bob, Some(expected('a')), "each once, in send order");
    assert_eq!(at_alice, Some(expected('b')), "each once, in send order");
    Ok(())
}

/// `kith daemon` for `home` with `relay` as its home relay, once its API is up.
async fn start_daemon(
    home: &Path,
    relay: &Multiaddr,
) -> anyhow::Result<kith_tests::process::Daemon> {
    let _ = std::fs::remove_file(home.join("api.json"));
    let relay = relay.to_string();
    let home_arg = home.display().to_string();
    let daemon = kith_tests::process::Daemon::spawn(
        &kith_tests::process::binary("kith")?,
        &[
            "--home",
            &home_arg,
            "daemon",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--relay",
            &relay,
        ],
        &home.join("daemon.log"),
    )?;
    wait_for("the daemon's api.json", || async {
        home.join("api.json").exists().then_some(())
    })
    .await?;
    Ok(daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_killed_again_and_again_while_messages_open_gets_each_once(
) -> anyhow::Result<()> {
    use kith_tests::process::{kith, kith_json};
    init_logs();
    let dir = tempfile::tempdir()?;
    let (_relay, relay_addr) = start_relay(&dir.path().join("relay")).await?;
    let bob_home = dir.path().join("bob");
    assert!(kith(&bob_home, &["init", "--name", "bob"])?
        .status
        .success());
    let mut bob = start_daemon(&bob_home, &relay_addr).await?;
    let invite = String::from_utf8(kith(&bob_home, &["id", "--invite"])?.stdout)?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    alice.node().add_contact("bob", invite.trim(), &[]).await?;

    // Alice writes while bob's daemon is SIGKILLed three times (at a quarter, a half and three
    // quarters of the messages delivered), each time wherever it is: opening, storing, holding.
    const TOTAL: usize = 120;
    let sender = alice.node().clone();
    let sending = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(TOTAL);
        for i in 0..TOTAL {
            ids.push(sender.send("bob", &format!("k{i:03}"), None).await?.id);
        }
        anyhow::Ok(ids)
    });
    let delivered = |alice: &TestNode| {
        alice
            .node()
            .messages(Some("bob"))
            .map(|m| {
                m.iter()
                    .filter(|m| m.state >= MessageState::Delivered)
                    .count()
            })
            .unwrap_or(0)
    };
    for round in 1..=3 {
        wait_for("a share of the messages delivered", || async {
            (delivered(&alice) >= round * TOTAL / 4).then_some(())
        })
        .await?;
        bob.kill()?;
        bob = start_daemon(&bob_home, &relay_addr).await?;
    }
    let ids = sending.await??;
    wait_for("every message delivered", || async {
        (delivered(&alice) == TOTAL).then_some(())
    })
    .await?;

    // Bob has each message once, readable: no "could not decrypt" entry is left.
    let alice_id = alice.peer_id().to_string();
    // Bob takes alice as a contact: a stranger's messages wait in his requests list.
    assert!(kith(&bob_home, &["contact", "add", "alice", &alice_id])?
        .status
        .success());
    let inbox = wait_for("bob's history complete and readable", || async {
        let inbox = kith_json(&bob_home, &["messages", &alice_id, "--json"]).ok()?;
        let list = inbox.as_array()?.clone();
        let readable = list
            .iter()
            .all(|m| m["text"].as_str().is_some_and(|t| t.starts_with('k')));
        (list.len() >= TOTAL && readable).then_some(list)
    })
    .await?;
    assert_eq!(inbox.len(), TOTAL, "each message once");
    let mut got: Vec<String> = inbox
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    got.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(got, want);
    let mut texts: Vec<String> = inbox
        .iter()
        .filter_map(|m| m["text"].as_str().map(str::to_owned))
        .collect();
    texts.sort();
    let expected: Vec<String> = (0..TOTAL).map(|i| format!("k{i:03}")).collect();
    assert_eq!(texts, expected);
    bob.terminate()?;
    Ok(())
}
