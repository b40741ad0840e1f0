//! Crash test with the real `kith-relay` binary: SIGKILL the relay in the middle of a burst of
//! deposits, restart it on the same address, and check that every message the sender saw as
//! `sent` reaches the recipient, that the others are retried, and that the recipient's history
//! holds each message exactly once.

use std::collections::HashSet;
use std::path::Path;

use kith_protocol::MessageState;
use kith_tests::process::{binary, Daemon};
use kith_tests::{init_logs, wait_for, TestNode};
use libp2p::Multiaddr;
use serde_json::Value;

const BURST: usize = 300;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_relay(data: &Path, port: u16, log: &str) -> anyhow::Result<(Daemon, Multiaddr)> {
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let daemon = Daemon::spawn(
        &binary("kith-relay")?,
        &[
            "--data",
            data.to_str().expect("utf-8"),
            "run",
            "--listen",
            &listen,
        ],
        &data.with_extension(log),
    )?;
    let addr = wait_for("relay listening", || async {
        let out = std::process::Command::new(binary("kith-relay").ok()?)
            .args(["--data", data.to_str()?, "id", "--json"])
            .output()
            .ok()?;
        let info: Value = serde_json::from_slice(&out.stdout).ok()?;
        let addr = info["listen_addrs"]
            .as_array()?
            .first()?
            .as_str()?
            .to_owned();
        addr.parse::<Multiaddr>().ok()
    })
    .await?;
    Ok((daemon, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_burst_loses_nothing_acknowledged() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::Builder::new().prefix("kith-crash").tempdir()?;
    let dir = dir.keep();
    let data = dir.join("relay");
    let port = free_port()?;
    let (mut relay, relay_addr) = start_relay(&data, port, "log1").await?;

    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    bob.stop().await;
    alice.node().add_contact("bob", &bob_invite, &[]).await?;

    let mut ids = Vec::with_capacity(BURST);
    for i in 0..BURST {
        ids.push(
            alice
                .node()
                .send("bob", &format!("burst {i:03}"), None)
                .await?
                .id,
        );
    }
    // Kill the relay once part of the burst is acknowledged, while the rest is in flight.
    wait_for("some deposits acknowledged", || async {
        let sent = ids
            .iter()
            .filter(|id| alice.state(id) == Some(MessageState::Sent))
            .count();
        (sent >= BURST / 10).then_some(())
    })
    .await?;
    relay.kill()?;
    let acknowledged: HashSet<String> = ids
        .iter()
        .filter(|id| alice.state(id) == Some(MessageState::Sent))
        .cloned()
        .collect();
    assert!(!acknowledged.is_empty());

    let (_relay, _) = start_relay(&data, port, "log2").await?;
    wait_for("every message sent after the restart", || async {
        ids.iter()
            .all(|id| alice.state(id) >= Some(MessageState::Sent))
            .then_some(())
    })
    .await?;

    bob.restart_on(bob_addr).await?;
    let sender = alice.peer_id().to_string();
    // Bob takes alice as a contact: a stranger's messages would wait in his requests list.
    bob.node().add_contact("alice", &sender, &[]).await?;
    let inbox = wait_for("bob has the whole burst", || async {
        let inbox = bob.node().messages(Some(&sender)).ok()?;
        (inbox.len() >= BURST).then_some(inbox)
    })
    .await?;
    assert_eq!(inbox.len(), BURST, "each message exactly once");
    let received: HashSet<String> = inbox.iter().map(|m| m.id.clone()).collect();
    assert_eq!(received.len(), BURST);
    for id in &acknowledged {
        assert!(received.contains(id), "acknowledged message {id} was lost");
    }
    let texts: Vec<_> = inbox.iter().map(|m| m.text.clone()).collect();
    let expected: Vec<_> = (0..BURST).map(|i| format!("burst {i:03}")).collect();
    assert_eq!(texts, expected, "history in send order");
    Ok(())
}
