//! In-process end-to-end tests through a relay: offline delivery with the ticks, and two nodes
//! that can reach each other only through the relay.

use kith_protocol::MessageState;
use kith_tests::{init_logs, wait_for, TestNode};
use libp2p::Multiaddr;

async fn start_relay(dir: &std::path::Path) -> anyhow::Result<(kith_relay::Running, Multiaddr)> {
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir)).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_delivery_sent_then_delivered_then_read() -> anyhow::Result<()> {
    init_logs();
    let relay_dir = tempfile::tempdir()?;
    let (relay, relay_addr) = start_relay(relay_dir.path()).await?;

    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_invite = bob.node().invite().encode();
    let bob_addr = bob.addr().await;
    bob.stop().await;

    // Alice knows bob only by his invite: his peer id and home relay.
    alice.node().add_contact("bob", &bob_invite, &[]).await?;
    let sent = alice.node().send("bob", "are you there?", None).await?;
    wait_for("sent (stored by the relay)", || async {
        (alice.state(&sent.id) == Some(MessageState::Sent)).then_some(())
    })
    .await?;

    // Bob comes back, fetches his mailbox, and the receipt travels back to alice.
    bob.restart_on(bob_addr).await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;
    wait_for("bob has the message", || async {
        let inbox = bob.node().messages(Some("alice")).ok()?;
        (inbox.len() == 1).then_some(())
    })
    .await?;
    wait_for("delivered", || async {
        (alice.state(&sent.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    bob.node().read("alice").await?;
    wait_for("read", || async {
        (alice.state(&sent.id) == Some(MessageState::Read)).then_some(())
    })
    .await?;
    let inbox = bob.node().messages(Some("alice"))?;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].text, "are you there?");
    relay.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_reachable_only_through_the_relay_chat() -> anyhow::Result<()> {
    init_logs();
    let relay_dir = tempfile::tempdir()?;
    let (relay, relay_addr) = start_relay(relay_dir.path()).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    // No direct addresses: invites only.
    alice
        .node()
        .add_contact("bob", &bob.node().invite().encode(), &[])
        .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;

    let hello = alice
        .node()
        .send("bob", "hello via the relay", None)
        .await?;
    wait_for("delivered to bob", || async {
        (alice.state(&hello.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let reply = bob.node().send("alice", "hello back", None).await?;
    wait_for("delivered to alice", || async {
        (bob.state(&reply.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let texts: Vec<_> = alice
        .node()
        .messages(Some("bob"))?
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["hello via the relay", "hello back"]);
    relay.shutdown().await?;
    Ok(())
}

#[test]
fn the_example_relay_config_parses_and_matches_the_defaults() -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/relay.example.toml");
    let example = kith_relay::Config::from_toml_file(&path)?;
    let defaults = kith_relay::Config::default();
    assert_eq!(example.listen, defaults.listen);
    assert_eq!(example.max_circuit_bytes, defaults.max_circuit_bytes);
    assert_eq!(
        example.max_circuit_duration_secs,
        defaults.max_circuit_duration_secs
    );
    assert_eq!(example.mailbox_ttl_secs, defaults.mailbox_ttl_secs);
    assert_eq!(example.mailbox_max_messages, defaults.mailbox_max_messages);
    assert_eq!(example.mailbox_max_bytes, defaults.mailbox_max_bytes);
    assert_eq!(
        example.mailbox_max_messages_per_sender,
        defaults.mailbox_max_messages_per_sender
    );
    assert_eq!(
        example.mailbox_max_bytes_per_sender,
        defaults.mailbox_max_bytes_per_sender
    );
    assert_eq!(
        example.mailbox_max_delivered_ids,
        defaults.mailbox_max_delivered_ids
    );
    assert_eq!(
        example.deposits_per_sec_per_peer,
        defaults.deposits_per_sec_per_peer
    );
    assert_eq!(
        example.mailbox_reserved_bytes_per_user,
        defaults.mailbox_reserved_bytes_per_user
    );
    assert_eq!(
        (
            example.group_newcomer_ops_per_sec,
            example.group_newcomer_op_burst
        ),
        (
            defaults.group_newcomer_ops_per_sec,
            defaults.group_newcomer_op_burst
        )
    );
    Ok(())
}
