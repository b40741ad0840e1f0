//! Retries end: a message that cannot leave the outbox within the mailbox TTL becomes `failed`
//! with a reason (status and event), and so does a download that cannot finish in time. The
//! TTL is shortened through `Config::mailbox_ttl`.

use std::time::Duration;

use kith_node::{Config, NodeEvent};
use kith_protocol::MessageState;
use kith_tests::{init_logs, wait_for, TestNode};

/// Starts a node named `name` whose mailbox TTL is `ttl`.
async fn start_with_ttl(
    name: &str,
    ttl: Duration,
) -> anyhow::Result<(TestNode, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    TestNode::init_home(dir.path(), name)?;
    let mut config = Config::loopback(dir.path());
    config.mailbox_ttl = ttl;
    Ok((TestNode::start_in(config).await?, dir))
}

/// Waits for a `failed` event about message `id`; returns its reason.
async fn failed_event(
    events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    id: &str,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::Failed { id: failed, reason }) if failed == id => return Ok(reason),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => return Err(anyhow::anyhow!("events ended: {e}")),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no failed event for {id}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_leave_within_the_ttl_fails_with_a_reason() -> anyhow::Result<()> {
    init_logs();
    let (alice, _alice_home) = start_with_ttl("alice", Duration::from_secs(3)).await?;
    let mut bob = TestNode::start("bob", vec![]).await?;
    let bob_id = bob.peer_id().to_string();
    let bob_addr = bob.addr().await;
    bob.stop().await;
    alice
        .node()
        .add_contact("bob", &bob_id, &[bob_addr.to_string()])
        .await?;
    let mut events = alice.node().subscribe();
    let sent = alice.node().send("bob", "are you there?", None).await?;
    let reason = failed_event(&mut events, &sent.id).await?;
    assert!(reason.contains("mailbox TTL"), "{reason}");
    let status = alice.node().status(&sent.id)?;
    assert_eq!(status.state, MessageState::Failed);
    let shown = status.reason.unwrap_or_default();
    assert!(shown.contains("mailbox TTL"), "{shown}");
    // Nothing of it is left to retry, and the state survives a restart.
    assert_eq!(alice.node().outbox_attempts(&sent.id), None);
    let mut alice = alice;
    let addr = alice.addr().await;
    alice.restart_on(addr).await?;
    assert_eq!(alice.state(&sent.id), Some(MessageState::Failed));
    wait_for("the reason after a restart", || async {
        alice.node().status(&sent.id).ok()?.reason
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_cannot_finish_within_the_ttl_fails() -> anyhow::Result<()> {
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    // Bob's TTL has passed by the time any message reaches him.
    let (bob, _bob_home) = start_with_ttl("bob", Duration::from_millis(1)).await?;
    kith_tests::befriend(&alice, "bob", &bob).await?;
    kith_tests::befriend(&bob, "alice", &alice).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, vec![b'k'; 100_000])?;
    let mut events = bob.node().subscribe();
    let sent = alice.node().send_file("bob", &path).await?;
    let reason = failed_event(&mut events, &sent.id).await?;
    assert!(reason.contains("download"), "{reason}");
    let messages = bob.node().messages(Some("alice"))?;
    let attachment = messages
        .iter()
        .find(|m| m.id == sent.id)
        .and_then(|m| m.attachment.clone())
        .expect("the file message is stored");
    assert_eq!(attachment.path, None, "nothing was downloaded");
    Ok(())
}
