//! In-process tests of the event stream's contract: every `message` and `receipt` event says
//! which conversation it belongs to (a peer or a group) and carries the names this node knows.

use kith_node::NodeEvent;
use kith_protocol::MessageState;
use kith_tests::{init_logs, wait_for, TestNode, DEADLINE};
use serde_json::{json, Value};
use tokio::sync::broadcast::Receiver;

/// The next event (as JSON) for which `pick` holds, within the deadline.
async fn next_event(
    events: &mut Receiver<NodeEvent>,
    pick: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = serde_json::to_value(events.recv().await?)?;
            if pick(&event) {
                return Ok(event);
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_events_name_the_conversation_and_the_people() -> anyhow::Result<()> {
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    // Names of one's own choosing, not the display names.
    let bob_addr = bob.addr().await.to_string();
    let alice_addr = alice.addr().await.to_string();
    alice
        .node()
        .add_contact("bobby", &bob.peer_id().to_string(), &[bob_addr])
        .await?;
    bob.node()
        .add_contact("ally", &alice.peer_id().to_string(), &[alice_addr])
        .await?;
    let (a, b) = (alice.peer_id().to_string(), bob.peer_id().to_string());

    let mut at_bob = bob.node().subscribe();
    let mut at_alice = alice.node().subscribe();
    let sent = alice.node().send("bobby", "hi", None).await?;
    let id = sent.id.clone();
    let message = next_event(&mut at_bob, |e| e["type"] == "message").await?;
    assert_eq!(
        message,
        json!({
            "type": "message", "id": id, "from": a, "text": "hi",
            "sent_at_ms": message["sent_at_ms"], "conversation": a, "group": null,
            "from_name": "ally", "conversation_name": "ally",
        })
    );
    let delivered = next_event(&mut at_alice, |e| {
        e["type"] == "receipt" && e["state"] == "delivered"
    })
    .await?;
    assert_eq!(
        delivered,
        json!({
            "type": "receipt", "id": id, "peer": b, "state": "delivered",
            "conversation": b, "group": null, "peer_name": "bobby",
        })
    );
    bob.node().read("ally").await?;
    let read = next_event(&mut at_alice, |e| {
        e["type"] == "receipt" && e["state"] == "read"
    })
    .await?;
    assert_eq!(read["peer"], b.as_str());
    assert_eq!(read["peer_name"], "bobby");
    // Health: no relays, and bob is reached directly.
    let health = alice.node().health().await;
    assert!(health.relays.is_empty());
    assert_eq!(health.contacts.len(), 1);
    assert_eq!(
        (health.contacts[0].name.as_str(), health.contacts[0].path),
        ("bobby", "direct")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_events_carry_the_group_and_each_member() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        ..kith_relay::Config::ephemeral(dir.path())
    })
    .await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let carol = TestNode::start("carol", vec![relay_addr]).await?;
    bob.node()
        .add_contact("ally", &alice.peer_id().to_string(), &[])
        .await?;
    alice
        .node()
        .add_contact("bobby", &bob.peer_id().to_string(), &[])
        .await?;
    let members = [bob.peer_id().to_string(), carol.peer_id().to_string()];
    let group = alice
        .node()
        .create_group("friends", &members)
        .await?
        .group_id;
    // To carol, alice is a stranger: her group is an invitation that carol accepts.
    wait_for("carol is invited", || async {
        let list = carol.node().group_invitations().ok()?;
        list.iter().any(|i| i.group_id == group).then_some(())
    })
    .await?;
    carol.node().accept_invitation(&group).await?;
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
    let (a, b, c) = (
        alice.peer_id().to_string(),
        bob.peer_id().to_string(),
        carol.peer_id().to_string(),
    );

    let mut at_alice = alice.node().subscribe();
    let mut at_bob = bob.node().subscribe();
    let mut at_carol = carol.node().subscribe();
    let id = alice.node().send("friends", "hello all", None).await?.id;

    let at_bob_msg = next_event(&mut at_bob, |e| e["type"] == "message").await?;
    assert_eq!(
        at_bob_msg,
        json!({
            "type": "message", "id": id, "from": a, "text": "hello all",
            "sent_at_ms": at_bob_msg["sent_at_ms"], "conversation": group, "group": group,
            "from_name": "ally", "conversation_name": "friends",
        })
    );
    // Carol has no contact for alice: the author's name is unknown to her.
    let at_carol_msg = next_event(&mut at_carol, |e| e["type"] == "message").await?;
    assert_eq!(at_carol_msg["group"], group.as_str());
    assert_eq!(at_carol_msg["from_name"], Value::Null);

    // Each member's delivery comes back as its own event, naming that member.
    let mut delivered_to = Vec::new();
    while delivered_to.len() < 2 {
        let e = next_event(&mut at_alice, |e| {
            e["type"] == "receipt" && e["state"] == "delivered"
        })
        .await?;
        assert_eq!(e["id"], id.as_str());
        assert_eq!(e["conversation"], group.as_str());
        assert_eq!(e["group"], group.as_str());
        assert_ne!(e["peer"], a.as_str(), "never the sender's own id");
        delivered_to.push(e["peer"].as_str().unwrap_or_default().to_owned());
    }
    delivered_to.sort();
    let mut expected = vec![b.clone(), c.clone()];
    expected.sort();
    assert_eq!(delivered_to, expected);

    // One member reads: the sender hears of it, though the message as a whole is not read.
    bob.node().read("friends").await?;
    let read = next_event(&mut at_alice, |e| {
        e["type"] == "receipt" && e["state"] == "read"
    })
    .await?;
    assert_eq!(read["peer"], b.as_str());
    assert_eq!(read["peer_name"], "bobby");
    assert_eq!(read["group"], group.as_str());
    assert_eq!(alice.state(&id), Some(MessageState::Delivered));

    // Names where they are known: group info and per-member status.
    let info = alice.node().group_info("friends").await?;
    assert_eq!(info.member_names.get(&b).map(String::as_str), Some("bobby"));
    assert_eq!(info.member_names.get(&a).map(String::as_str), Some("alice"));
    assert_eq!(
        info.member_names.get(&c),
        None,
        "carol is no contact of alice's"
    );
    let status = alice.node().status(&id)?;
    assert_eq!(
        status.member_names.get(&b).map(String::as_str),
        Some("bobby")
    );

    // Health: the relay is connected with a reservation; bob, who has no direct address, is
    // reached through the relay's circuit once a message went to him.
    let direct = alice.node().send("bobby", "just you", None).await?;
    wait_for("delivered through the circuit", || async {
        (alice.state(&direct.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let health = wait_for("the reservation held", || async {
        let health = alice.node().health().await;
        health
            .relays
            .first()
            .is_some_and(|r| r.reserved)
            .then_some(health)
    })
    .await?;
    assert!(health.relays[0].connected && health.relays[0].error.is_none());
    assert_eq!(health.contacts[0].path, "relayed", "{:?}", health.contacts);
    assert!(health.last_mailbox_fetch_ms.is_some());
    drop(relay);
    Ok(())
}
