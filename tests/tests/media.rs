//! In-process end-to-end tests of file sharing (`/kith/blob/1`): a large file to an offline
//! recipient through the relay with the download interrupted half way, a tampered chunk on the
//! relay, over-limit files refused before any upload, and a file to a group.

use std::path::{Path, PathBuf};

use kith_node::{Config, NodeEvent, Settings};
use kith_protocol::MessageState;
use kith_tests::{init_logs, wait_for, TestNode};
use libp2p::Multiaddr;

const MIB: usize = 1024 * 1024;

async fn start_relay(
    dir: &Path,
    tweak: impl FnOnce(&mut kith_relay::Config),
) -> anyhow::Result<(kith_relay::Running, Multiaddr)> {
    let mut config = kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        ..kith_relay::Config::ephemeral(dir)
    };
    tweak(&mut config);
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

/// Writes `len` bytes of a cheap pseudo-random pattern (no two chunks alike).
fn write_file(dir: &Path, name: &str, len: usize, seed: u64) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, kith_tests::scan::pattern(len, seed))?;
    Ok(path)
}

/// The distinct blobs a relay's store holds, each with its record in a segment file.
fn relay_blobs(dir: &Path) -> Vec<kith_relay::blob::store::Record> {
    let mut seen = std::collections::HashSet::new();
    let mut records = kith_relay::blob::store::records(dir).unwrap_or_default();
    records.reverse();
    records.retain(|r| seen.insert(r.hash));
    records
}

/// Blob files in a node's blob directory (temporary files excluded).
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| !n.to_string_lossy().contains(".tmp"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn attachment(node: &TestNode, with: &str) -> Option<(String, kith_node::core::AttachmentView)> {
    let messages = node.node().messages(Some(with)).ok()?;
    let m = messages.into_iter().find(|m| m.attachment.is_some())?;
    Some((m.id.clone(), m.attachment?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_reaches_an_offline_recipient_and_resumes_after_an_interruption(
) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (relay, relay_addr) = start_relay(&relay_dir, |_| {}).await?;
    let mut alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    // A contact before the file comes (a stranger's file waits to be asked for).
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    let source = write_file(dir.path(), "video.mp4", 20 * MIB, 1)?;
    let sent = alice.node().send_file("bob", &source).await?;
    let chunks = 20 * MIB / (256 * 1024);
    wait_for("the relay holds every chunk and the manifest", || async {
        (relay_blobs(&relay_dir).len() == chunks + 1).then_some(())
    })
    .await?;
    wait_for("the message is sent", || async {
        (alice.state(&sent.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;
    let (_, sent_view) = attachment(&alice, "bob").expect("alice's attachment");
    // The sender goes away: everything must come from the relay.
    alice.stop().await;

    bob.restart_on(bob_addr.clone()).await?;
    let (id, view) = wait_for("bob has the file message", || async {
        attachment(&bob, "alice")
    })
    .await?;
    assert_eq!(id, sent.id);
    assert_eq!(view.size, 20 * MIB as u64);
    assert_eq!(view.mime, "video/mp4");
    assert_eq!(
        view.path, None,
        "20 MiB is above the automatic download limit"
    );

    // Download, and pull the plug half way.
    let mut events = bob.node().subscribe();
    let node = bob.node().clone();
    let download_id = id.clone();
    let download = tokio::spawn(async move { node.download(&download_id, None).await });
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Ok(NodeEvent::Progress { done, total, .. }) = events.recv().await {
                if done * 2 >= total {
                    return;
                }
            }
        }
    })
    .await?;
    download.abort();
    let _ = download.await;
    bob.stop().await;
    let chunk = 256 * 1024u64;

    // The resumed download starts from what is already on disk and fetches only the rest.
    bob.restart_on(bob_addr).await?;
    let mut events = bob.node().subscribe();
    let done = bob.node().download(&id, None).await?;
    let held = loop {
        match events.try_recv() {
            Ok(NodeEvent::Progress {
                id: of,
                direction,
                done,
                total,
            }) if of == id && direction == "download" => {
                assert_eq!(total, 20 * MIB as u64);
                break done;
            }
            Ok(_) => {}
            Err(e) => anyhow::bail!("no download progress event: {e}"),
        }
    };
    let held_chunks = (held / chunk) as usize;
    assert!(
        held_chunks >= chunks / 2 && held_chunks < chunks,
        "held {held_chunks} of {chunks} chunks"
    );
    let fetched = bob.node().media_stats().fetched_blobs as usize;
    assert!(
        fetched <= chunks - held_chunks,
        "resumed: fetched {fetched} blobs, {held_chunks} chunks were already here"
    );
    let path = done.path.expect("a path");
    assert_eq!(std::fs::read(&path)?, std::fs::read(&source)?);
    assert_eq!(done.hash, sent_view.hash);
    let (_, listed) = attachment(&bob, "alice").expect("listed");
    assert_eq!(listed.path.as_deref(), Some(path.as_str()));
    // The manifest and the partial file are gone once the file is whole.
    assert!(blob_files(&bob.home).is_empty());
    // `--to DIR` copies the finished file.
    let elsewhere = dir.path().join("elsewhere");
    let copy = bob.node().download(&id, Some(&elsewhere)).await?;
    assert!(Path::new(&copy.path.expect("path")).starts_with(&elsewhere));
    bob.stop().await;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_is_refused_then_fetched_from_the_sender() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (relay, relay_addr) = start_relay(&relay_dir, |_| {}).await?;
    let mut alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    let alice_addr = alice.addr().await;
    let alice_id = alice.peer_id().to_string();
    // A contact before the file comes (a stranger's file waits to be asked for).
    bob.node()
        .add_contact("alice", &alice_id, &[alice_addr.to_string()])
        .await?;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    let source = write_file(dir.path(), "photo.bin", MIB, 2)?;
    alice.node().send_file("bob", &source).await?;
    wait_for("the relay holds the file", || async {
        (relay_blobs(&relay_dir).len() == 5).then_some(())
    })
    .await?;
    // Uploaded: alice drops her sealed copy of the file (below, she seals chunks again from it).
    wait_for("alice's pack is deleted", || async {
        (!blob_files(&alice.home)
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "pack")))
        .then_some(())
    })
    .await?;
    // Damage every full chunk the relay holds.
    for record in relay_blobs(&relay_dir) {
        if record.len > 1024 {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&record.path)?;
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, record.offset + 100)?;
            file.write_all_at(&[byte[0] ^ 0x5a], record.offset + 100)?;
        }
    }

    // The sender goes offline: the relay's copies are all bob can get, and he refuses them.
    alice.stop().await;
    bob.restart_on(bob_addr).await?;
    let (id, _) = wait_for("bob has the message", || async {
        attachment(&bob, "alice")
    })
    .await?;
    wait_for("bob refuses every damaged chunk", || async {
        (bob.node().media_stats().refused_blobs >= 4).then_some(())
    })
    .await?;
    assert_eq!(attachment(&bob, "alice").and_then(|(_, v)| v.path), None);
    assert_eq!(
        bob.node().media_stats().fetched_blobs,
        1,
        "only the manifest was good"
    );

    // The sender is back: the same chunks come from it and pass the check.
    alice.restart_on(alice_addr).await?;
    let view = bob.node().download(&id, None).await?;
    assert_eq!(
        std::fs::read(view.path.expect("path"))?,
        std::fs::read(&source)?
    );
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_files_are_refused_before_any_upload() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (relay, relay_addr) =
        start_relay(&relay_dir, |c| c.blob_max_file_bytes = MIB as u64).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;

    // The node's own limit.
    let home = dir.path().join("alice");
    std::fs::create_dir_all(&home)?;
    TestNode::init_home(&home, "alice")?;
    let mut settings = Settings::load(&home)?;
    settings.max_file_bytes = 512 * 1024;
    settings.save(&home)?;
    let mut config = Config::loopback(&home);
    config.relays = vec![relay_addr.clone()];
    let alice = TestNode::start_in(config).await?;
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    let big = write_file(dir.path(), "big.bin", 2 * MIB, 3)?;
    let err = alice
        .node()
        .send_file("bob", &big)
        .await
        .expect_err("over the node's limit");
    assert!(
        err.to_string().contains("above the limit of 524288 bytes"),
        "{err}"
    );

    // The relay's limit, checked before a chunk travels.
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    carol
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    let err = carol
        .node()
        .send_file("bob", &big)
        .await
        .expect_err("over the relay's limit");
    assert!(err.to_string().contains("at most 1048576 bytes"), "{err}");

    assert!(relay_blobs(&relay_dir).is_empty(), "nothing was uploaded");
    assert!(blob_files(&alice.home).is_empty() && blob_files(&carol.home).is_empty());
    assert!(alice.node().messages(Some("bob"))?.is_empty());
    assert!(carol.node().messages(Some("bob"))?.is_empty());
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_file_is_uploaded_once_and_reaches_every_member() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (relay, relay_addr) = start_relay(&relay_dir, |_| {}).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    let members = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    kith_tests::know(&[&bob, &carol], &[&alice]).await?;
    let group = alice.node().create_group("friends", &members).await?;
    for node in [&bob, &carol] {
        wait_for("member knows the group", || async {
            node.node()
                .group_list()
                .iter()
                .any(|g| g.group_id == group.group_id)
                .then_some(())
        })
        .await?;
    }
    // Typed by its magic bytes (it is not a real image, so it gets no thumbnail).
    let png = {
        let path = dir.path().join("cat.png");
        let mut bytes = Vec::new();
        let data = std::fs::read(write_file(dir.path(), "noise", 600 * 1024, 4)?)?;
        bytes.extend_from_slice(b"\x89PNG\r\n\x1a\n");
        bytes.extend_from_slice(&data);
        std::fs::write(&path, bytes)?;
        path
    };
    alice.node().send_file("friends", &png).await?;
    for node in [&bob, &carol] {
        let view = wait_for("the member has the file", || async {
            attachment(node, &group.group_id).and_then(|(_, v)| v.path.is_some().then_some(v))
        })
        .await?;
        assert_eq!(view.mime, "image/png");
        assert_eq!(
            std::fs::read(view.path.expect("path"))?,
            std::fs::read(&png)?
        );
    }
    // One upload: the relay holds each blob once (3 chunks and a manifest).
    wait_for("the group's relay holds the file once", || async {
        (relay_blobs(&relay_dir).len() == 4).then_some(())
    })
    .await?;
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_cannot_be_had_now_do_not_hold_up_the_others() -> anyhow::Result<()> {
    use kith_net::codec::Message;
    use kith_protocol::blob::{Cipher, FileRef, Hash, Key};
    use kith_protocol::envelope::Header;
    use kith_protocol::{dm, Body, Destination, Envelope, MessageId};

    init_logs();
    let dir = tempfile::tempdir()?;
    let bob = TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    // More small files than bob runs transfers at once, from a peer that leaves right after:
    // none of them can be fetched, and bob keeps retrying them.
    let mut raw = kith_tests::RawPeer::new()?;
    for i in 0..6u8 {
        let file = FileRef {
            name: format!("gone-{i}.bin"),
            size: 1000,
            mime: "application/octet-stream".into(),
            file_hash: Hash::of(&[i]),
            key: Key([i; 32]),
            cipher: Cipher::CURRENT,
            manifest: vec![Hash::of(&[i, i])],
            thumbnail: None,
        };
        let header = Header {
            id: MessageId::random(),
            to: Destination::Peer(bob.peer_id()),
            sent_at_ms: 1,
            lamport: u64::from(i) + 1,
            expires_at_ms: None,
        };
        let envelope = Envelope::seal(&raw.key, header, &Body::File(file))?;
        let request = Message::Valid(dm::Request::new(u64::from(i), envelope));
        assert_eq!(
            raw.dm(bob.peer_id(), &addr, request).await?,
            dm::Response::Accepted {
                req_id: u64::from(i)
            }
        );
    }
    drop(raw);
    // A file from a contact who is online still arrives.
    let alice = TestNode::start("alice", vec![]).await?;
    kith_tests::befriend(&alice, "bob", &bob).await?;
    kith_tests::befriend(&bob, "alice", &alice).await?;
    let path = write_file(dir.path(), "later.bin", 300 * 1024, 9)?;
    alice.node().send_file("bob", &path).await?;
    let view = wait_for("the reachable file is downloaded", || async {
        attachment(&bob, "alice").and_then(|(_, v)| v.path.is_some().then_some(v))
    })
    .await?;
    assert_eq!(
        std::fs::read(view.path.expect("path"))?,
        std::fs::read(&path)?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_sent_tick_waits_until_every_relay_of_the_recipient_holds_it() -> anyhow::Result<()>
{
    init_logs();
    let dir = tempfile::tempdir()?;
    let (_first, first_addr) = start_relay(&dir.path().join("first"), |_| {}).await?;
    let second_dir = dir.path().join("second");
    let (second, second_addr) = start_relay(&second_dir, |_| {}).await?;
    let alice = TestNode::start("alice", vec![first_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![first_addr, second_addr.clone()]).await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    let hello = alice.node().send("bob", "hello", None).await?;
    wait_for("hello delivered", || async {
        (alice.state(&hello.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    bob.stop().await;

    // Bob's second relay is down: the first takes the message, the upload to the second waits.
    second.shutdown().await?;
    let path = write_file(dir.path(), "notes.bin", MIB, 3)?;
    let file = alice.node().send_file("bob", &path).await?;
    wait_for("the first relay took the message", || async {
        (alice.node().health().await.pending_outbox == 0).then_some(())
    })
    .await?;
    assert_eq!(
        alice.state(&file.id),
        Some(MessageState::Pending),
        "not sent while a relay of bob's lacks the file"
    );

    // The second relay comes back where it was: the upload ends, and only then is it sent.
    let listen: Multiaddr = second_addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    let (_second, _) = start_relay(&second_dir, |c| c.listen = vec![listen]).await?;
    wait_for("sent once both relays hold it", || async {
        (alice.state(&file.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;
    Ok(())
}
