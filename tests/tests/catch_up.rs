//! In-process test of an offline catch-up under load: while bob fetches his mailbox, the relay
//! pushes him the deposits that keep arriving and alice retries directly, so copies of one
//! message race each other into bob's node. Each message must be stored and announced once.

use std::collections::HashMap;

use kith_node::NodeEvent;
use kith_protocol::MessageState;
use kith_tests::{init_logs, wait_for, TestNode};

/// Messages per catch-up.
const MESSAGES: usize = 400;
/// Catch-ups repeated (the race does not show in every one).
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_announces_each_message_once() -> anyhow::Result<()> {
    init_logs();
    let relay_dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(relay_dir.path())).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let mut bob = TestNode::start("bob", vec![relay_addr.clone()]).await?;
    let bob_addr = bob.addr().await;
    alice
        .node()
        .add_contact(
            "bob",
            &bob.node().invite().encode(),
            &[bob_addr.to_string()],
        )
        .await?;
    bob.node()
        .add_contact("alice", &alice.node().invite().encode(), &[])
        .await?;

    let mut expected = 0;
    for round in 0..ROUNDS {
        bob.stop().await;
        let mut ids = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let text = format!("round {round} message {i}");
            ids.push(alice.node().send("bob", &text, None).await?.id);
        }
        // Bob comes back while alice's deposits are still arriving at the relay (it takes
        // them at a limited rate): pushes, fetches and direct retries overlap.
        wait_for("the first deposits", || async {
            (alice.state(&ids[MESSAGES / 8]) == Some(MessageState::Sent)).then_some(())
        })
        .await?;
        bob.restart_on(bob_addr.clone()).await?;
        let mut events = bob.node().subscribe();
        expected += MESSAGES;
        wait_for("bob has every message", || async {
            let stored = bob.node().messages(Some("alice")).ok()?.len();
            (stored == expected).then_some(())
        })
        .await?;
        // Every copy is in: what was announced twice has been by now (an announcement follows
        // its copy's flush, and alice hears "delivered" only after bob's flush too).
        wait_for("every message delivered", || async {
            ids.iter()
                .all(|id| alice.state(id) >= Some(MessageState::Delivered))
                .then_some(())
        })
        .await?;
        let mut announced: HashMap<String, usize> = HashMap::new();
        while let Ok(event) = events.try_recv() {
            if let NodeEvent::Message { id, .. } = event {
                *announced.entry(id).or_default() += 1;
            }
        }
        let twice: Vec<_> = announced.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "round {round}: {} of {} messages announced more than once",
            twice.len(),
            announced.len()
        );
    }
    relay.shutdown().await?;
    Ok(())
}

/// Copies of the same batch that arrive at once (two requests from the sender, as when a relay
/// pushes what the recipient is also fetching) are stored and announced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_racing_each_other_are_announced_once() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use kith_net::codec::Message;
    use kith_protocol::envelope::Header;
    use kith_protocol::{dm, Body, Destination, Envelope, MessageId};
    use kith_tests::{RawBehaviourEvent, RawPeer};
    use libp2p::request_response;
    use libp2p::swarm::SwarmEvent;

    init_logs();
    let bob = TestNode::start("bob", vec![]).await?;
    let addr = bob.addr().await;
    let mut raw = RawPeer::new()?;
    raw.swarm.add_peer_address(bob.peer_id(), addr);
    // A contact: a stranger's messages would be announced as a request, not one by one.
    let raw_id = raw.key.public().to_peer_id().to_string();
    bob.node().add_contact("raw", &raw_id, &[]).await?;
    let mut events = bob.node().subscribe();
    let mut lamport = 0;
    for round in 0..20 {
        let batch: Vec<Envelope> = (0..dm::MAX_BATCH)
            .map(|i| {
                lamport += 1;
                Envelope::seal(
                    &raw.key,
                    Header {
                        id: MessageId::random(),
                        to: Destination::Peer(bob.peer_id()),
                        sent_at_ms: 1,
                        lamport,
                        expires_at_ms: None,
                    },
                    &Body::Chat {
                        text: format!("{round}/{i}"),
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        let mut waiting = Vec::new();
        for copy in 0..3 {
            let request = dm::Request::batch(copy, batch.clone()).expect("a batch");
            waiting.push(
                raw.swarm
                    .behaviour_mut()
                    .dm
                    .send_request(&bob.peer_id(), Message::Valid(request)),
            );
        }
        tokio::time::timeout(kith_tests::DEADLINE, async {
            while !waiting.is_empty() {
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Dm(
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, .. },
                        ..
                    }
                    | request_response::Event::OutboundFailure { request_id, .. },
                )) = raw.swarm.select_next_some().await
                {
                    waiting.retain(|w| *w != request_id);
                }
            }
        })
        .await?;
        wait_for("the batch stored", || async {
            let stored = bob.node().messages(None).ok()?.len();
            (stored == (round + 1) * dm::MAX_BATCH).then_some(())
        })
        .await?;
    }
    let mut announced: HashMap<String, usize> = HashMap::new();
    while let Ok(event) = events.try_recv() {
        if let NodeEvent::Message { id, .. } = event {
            *announced.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = announced.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "announced more than once: {twice:?}");
    assert_eq!(announced.len(), 20 * dm::MAX_BATCH);
    Ok(())
}
