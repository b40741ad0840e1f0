//! In-process tests of end-to-end encrypted groups (MLS): what a stranger on the group's topic
//! and the relay's disk see, what a removed member and a leaver can read, and a member that was
//! offline across membership changes catching up.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use kith_tests::scan::{file_key, files_under, holders, pattern};
use kith_tests::{init_logs, wait_for, TestNode};
use kith_tests::{texts, wait_texts};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, noise, tcp, yamux, Multiaddr};

/// Three members on one relay, in group "friends" created by alice.
struct Members {
    relay: kith_relay::Running,
    relay_addr: Multiaddr,
    relay_dir: PathBuf,
    alice: TestNode,
    bob: TestNode,
    carol: TestNode,
    group: String,
    dir: tempfile::TempDir,
}

async fn members() -> anyhow::Result<Members> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let (relay, relay_addr) = kith_tests::start_group_relay(&relay_dir).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    let others = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    kith_tests::know(&[&bob, &carol], &[&alice]).await?;
    let created = alice.node().create_group("friends", &others).await?;
    assert_eq!(created.epoch, 1, "creating with members is one commit");
    for node in [&bob, &carol] {
        wait_for("member joined the group's keys", || async {
            let info = node.node().group_info(&created.group_id).await.ok()?;
            (info.epoch == 1).then_some(())
        })
        .await?;
    }
    Ok(Members {
        relay,
        relay_addr,
        relay_dir,
        alice,
        bob,
        carol,
        group: created.group_id,
        dir,
    })
}

async fn epoch(node: &TestNode, group: &str) -> anyhow::Result<u64> {
    Ok(node.node().group_info(group).await?.epoch)
}

/// What a stranger on the topic saw: messages, and the topics peers announced to it.
enum Heard {
    Message(Vec<u8>),
    Subscribed(String),
}

/// A peer that is no member: it subscribes to the group's gossipsub topic at the relay, as
/// anyone who learnt the group's id may, and keeps every message it is sent there and every
/// topic a peer announces to it.
fn stranger(
    relay: &Multiaddr,
    topic: &str,
) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<Heard>> {
    let key = Keypair::generate_ed25519();
    let behaviour = kith_node::net::gossip::behaviour(&key, Duration::from_millis(200))
        .map_err(anyhow::Error::msg)?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| behaviour)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .behaviour_mut()
        .subscribe(&gossipsub::IdentTopic::new(topic))?;
    swarm.dial(relay.clone())?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = swarm.next().await {
            let heard = match event {
                SwarmEvent::Behaviour(gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                }) => {
                    // Accepted, as a curious peer would, so nothing stops the flow.
                    swarm.behaviour_mut().report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Accept,
                    );
                    Heard::Message(message.data)
                }
                SwarmEvent::Behaviour(gossipsub::Event::Subscribed { topic, .. }) => {
                    Heard::Subscribed(topic.into_string())
                }
                _ => continue,
            };
            if tx.send(heard).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_topic_and_the_relays_disk_see_only_ciphertext() -> anyhow::Result<()> {
    let mut m = members().await?;
    let topic = kith_protocol::group::topic(&m.group.parse()?);
    let mut heard = stranger(&m.relay_addr, &topic)?;

    // The stranger is on the topic before anything is said (the relay floods to it).
    let first = "the vault code is 7311, tell no one";
    let second = "and the spare key is under the third step";
    // Until the stranger's subscription reaches the relay, posts may pass it by: say the
    // first thing until the stranger hears something.
    let mut said = Vec::new();
    let mut captured: Vec<Vec<u8>> = Vec::new();
    let mut announced: Vec<String> = Vec::new();
    let mut keep = |heard: Heard, captured: &mut Vec<Vec<u8>>| match heard {
        Heard::Message(data) => captured.push(data),
        Heard::Subscribed(topic) => announced.push(topic),
    };
    while captured.is_empty() {
        m.alice.node().send("friends", first, None).await?;
        said.push(first);
        if let Ok(Some(heard)) =
            tokio::time::timeout(Duration::from_millis(500), heard.recv()).await
        {
            keep(heard, &mut captured);
        }
        anyhow::ensure!(said.len() < 40, "the stranger never heard the topic");
    }
    m.bob.node().send("friends", second, None).await?;
    said.push(second);
    let data = pattern(300 * 1024, 11);
    let path = m.dir.path().join("plans.bin");
    std::fs::write(&path, &data)?;
    m.alice.node().send_file("friends", &path).await?;
    let mut expected: Vec<&str> = said.iter().copied().chain([""]).collect();
    expected.sort();
    for node in [&m.bob, &m.carol] {
        wait_for("every member has everything", || async {
            let messages = node.node().messages(Some("friends")).ok()?;
            let file = messages.iter().any(|v| v.attachment.is_some());
            let mut texts: Vec<&str> = messages.iter().map(|v| v.text.as_str()).collect();
            texts.sort();
            (file && texts == expected).then_some(())
        })
        .await?;
    }
    // Bob's message and the file reference reach the stranger too (the relay floods).
    while captured.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), heard.recv()).await {
            Ok(Some(heard)) => keep(heard, &mut captured),
            _ => anyhow::bail!("the stranger heard {} messages, not 3", captured.len()),
        }
    }
    while let Ok(heard) = heard.try_recv() {
        keep(heard, &mut captured);
    }
    // The relay floods the topic's messages to its subscribers but announces no topic it
    // hosts: a stranger cannot learn which groups live there.
    assert_eq!(announced, Vec::<String>::new());
    m.alice.stop().await;
    let key = file_key(&m.alice.home)?;

    let sample = &data[100 * 1024..100 * 1024 + 64];
    for (name, needle) in [
        ("first text", first.as_bytes()),
        ("second text", second.as_bytes()),
        ("file bytes", sample),
        ("file key", key.as_slice()),
    ] {
        for data in &captured {
            assert!(!contains(data, needle), "the stranger read the {name}");
        }
        assert_eq!(
            holders(&m.relay_dir, needle),
            Vec::<PathBuf>::new(),
            "the relay's disk holds the {name}"
        );
    }
    assert!(!files_under(&m.relay_dir).is_empty());
    // The scan finds what is there in the clear: alice's own history and file key.
    assert!(!holders(&m.alice.home, first.as_bytes()).is_empty());
    assert!(!holders(&m.alice.home, &key).is_empty());
    m.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_and_departed_members_read_nothing_sent_after() -> anyhow::Result<()> {
    let m = members().await?;
    m.alice.node().send("friends", "before", None).await?;
    for node in [&m.bob, &m.carol] {
        wait_texts(node, "friends", &["before"]).await?;
    }
    // Carol is removed (she keeps running); her keys leave with the removal commit.
    let carol = m.carol.peer_id().to_string();
    use kith_node::features::group::ChangeKind::*;
    let after_removal = m
        .alice
        .node()
        .change_group("friends", Remove, Some(&carol))
        .await?;
    assert_eq!(after_removal.epoch, 2);
    wait_for("carol learns she is out", || async {
        let list = m.carol.node().group_list();
        list.iter()
            .any(|g| g.group_id == m.group && !g.member)
            .then_some(())
    })
    .await?;
    // Bob leaves: a leaver cannot commit its own removal; alice's next send does it first.
    m.bob.node().change_group("friends", Leave, None).await?;
    wait_for("alice sees bob leave", || async {
        let info = m.alice.node().group_info("friends").await.ok()?;
        (!info.members.contains(&m.bob.peer_id().to_string())).then_some(())
    })
    .await?;
    assert_eq!(
        epoch(&m.alice, "friends").await?,
        2,
        "a leave commits nothing"
    );
    m.alice.node().send("friends", "after both", None).await?;
    assert_eq!(
        epoch(&m.alice, "friends").await?,
        3,
        "the send first removed the leaver from the keys"
    );
    let sent_after = m.alice.node().send("friends", "later still", None).await?;
    wait_for("the relay took it", || async {
        (m.alice.state(&sent_after.id) >= Some(kith_protocol::MessageState::Sent)).then_some(())
    })
    .await?;
    // Neither former member shows anything sent after it left.
    for node in [&m.bob, &m.carol] {
        assert_eq!(texts(node, "friends"), ["before"]);
    }
    assert_eq!(
        texts(&m.alice, "friends"),
        ["before", "after both", "later still"]
    );
    m.relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_offline_across_three_membership_changes_reads_everything() -> anyhow::Result<()> {
    let mut m = members().await?;
    let carol_addr = m.carol.addr().await;
    m.carol.stop().await;
    // Dave runs no node: his key packages wait at the relay.
    let dave_key = Keypair::generate_ed25519();
    let stand_ins = tempfile::tempdir()?;
    kith_tests::publish_packages(
        m.relay.peer_id,
        &m.relay_addr,
        std::slice::from_ref(&dave_key),
        stand_ins.path(),
    )
    .await?;
    let dave = dave_key.public().to_peer_id().to_string();
    use kith_node::features::group::ChangeKind::*;
    let alice = m.alice.node();
    alice.send("friends", "one", None).await?;
    alice.change_group("friends", Add, Some(&dave)).await?;
    alice.send("friends", "two", None).await?;
    alice.change_group("friends", Remove, Some(&dave)).await?;
    alice.send("friends", "three", None).await?;
    m.bob.node().change_group("friends", Rekey, None).await?;
    m.bob.node().send("friends", "four", None).await?;
    assert_eq!(epoch(&m.alice, "friends").await?, 4);

    m.carol.restart_on(carol_addr).await?;
    wait_texts(&m.carol, "friends", &["one", "two", "three", "four"]).await?;
    assert_eq!(epoch(&m.carol, "friends").await?, 4);
    // And she writes in the new epoch.
    m.carol.node().send("friends", "back", None).await?;
    wait_texts(&m.bob, "friends", &["one", "two", "three", "four", "back"]).await?;
    m.relay.shutdown().await?;
    Ok(())
}
