//! Process-level test of encrypted groups under crashes: a member's real `kith` daemon is
//! SIGKILLed, twice, while messages and commits arrive; each time it comes back, and in the end
//! it is in the group's epoch with every message exactly once.

use std::collections::HashMap;

use kith_tests::process::{kith, kith_json, start_daemon};
use kith_tests::{init_logs, wait_for, TestNode};
use libp2p::identity::Keypair;

/// Carol's texts in the group (through the real CLI), counted.
fn texts(home: &std::path::Path) -> Option<HashMap<String, usize>> {
    let list = kith_json(home, &["messages", "friends", "--json"]).ok()?;
    let mut counts = HashMap::new();
    for message in list.as_array()? {
        *counts
            .entry(message["text"].as_str()?.to_owned())
            .or_default() += 1;
    }
    Some(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_commits_and_messages_arrive_ends_in_step() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        ..kith_relay::Config::ephemeral(dir.path().join("relay"))
    })
    .await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol_home = dir.path().join("carol");
    assert!(kith(&carol_home, &["init", "--name", "carol"])?
        .status
        .success());
    let relay_arg = relay_addr.to_string();
    let mut carol = start_daemon(&carol_home, &["--relay", &relay_arg]).await?;
    let carol_peer = kith_json(&carol_home, &["id", "--json"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Members added and removed along the way run no node: their packages wait at the relay.
    let stand_ins: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let stand_in_store = tempfile::tempdir()?;
    kith_tests::publish_packages(
        relay.peer_id,
        &relay_addr,
        &stand_ins,
        stand_in_store.path(),
    )
    .await?;

    let members = [bob.peer_id().to_string(), carol_peer.clone()];
    kith_tests::know(&[&bob], &[&alice]).await?;
    let alice_peer = alice.peer_id().to_string();
    let added = kith(&carol_home, &["contact", "add", "alice", &alice_peer])?;
    assert!(added.status.success(), "{added:?}");
    alice.node().create_group("friends", &members).await?;
    wait_for("carol joined", || async {
        let info = kith_json(&carol_home, &["group", "info", "friends", "--json"]).ok()?;
        (info["epoch"] == 1).then_some(())
    })
    .await?;

    // Alice sends 60 messages; every 15, the membership (and so the epoch) changes.
    let sender = {
        let alice = alice.node().clone();
        let bob = bob.node().clone();
        let stand_ins: Vec<String> = stand_ins
            .iter()
            .map(|k| k.public().to_peer_id().to_string())
            .collect();
        tokio::spawn(async move {
            use kith_node::features::group::ChangeKind::*;
            for i in 0..60 {
                alice.send("friends", &format!("m{i}"), None).await?;
                match i {
                    14 => {
                        alice
                            .change_group("friends", Add, Some(&stand_ins[0]))
                            .await?
                    }
                    29 => bob.change_group("friends", Rekey, None).await?,
                    44 => {
                        alice
                            .change_group("friends", Remove, Some(&stand_ins[0]))
                            .await?
                    }
                    _ => continue,
                };
            }
            anyhow::Ok(())
        })
    };
    // Killed twice, each time once she has some of it.
    for seen in [5, 25] {
        wait_for("carol has some", || async {
            (texts(&carol_home)?.len() >= seen).then_some(())
        })
        .await?;
        carol.kill()?;
        carol = start_daemon(&carol_home, &["--relay", &relay_arg]).await?;
    }
    sender.await??;
    let epoch = alice.node().group_info("friends").await?.epoch;
    assert_eq!(epoch, 4, "three commits after the create");
    wait_for(
        "carol has every message once, in the group's epoch",
        || async {
            let counts = texts(&carol_home)?;
            let info = kith_json(&carol_home, &["group", "info", "friends", "--json"]).ok()?;
            (counts.len() == 60 && info["epoch"] == epoch).then_some(counts)
        },
    )
    .await
    .map_err(|e| {
        // What carol had, and what her daemon said, for a failure seen only on CI.
        let info = kith_json(&carol_home, &["group", "info", "friends", "--json"]).ok();
        let log = std::fs::read_to_string(carol_home.join("daemon.log")).unwrap_or_default();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        anyhow::anyhow!(
            "{e}: carol has {:?} texts, group info {info:?}; her daemon's warnings (last 20 of {}):\n{}",
            texts(&carol_home).map(|t| t.len()),
            said.len(),
            said[said.len().saturating_sub(20)..].join("\n")
        )
    })
    .map(|counts| assert!(counts.values().all(|n| *n == 1), "{counts:?}"))?;
    carol.terminate()?;
    relay.shutdown().await?;
    Ok(())
}
