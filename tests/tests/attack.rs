//! The attack benchmark's harness, kept from rotting: one short round of it (baseline, control
//! and the garbage attack) against the debug `kith-relay` binary. No timing is asserted: only that the
//! attack ran and was refused, and that every honest message was stored and delivered.

use kith_tests::attack::{self, Attack, Settings};
use kith_tests::init_logs;
use kith_tests::process::binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_attack_round_delivers_every_honest_message() -> anyhow::Result<()> {
    init_logs();
    let settings = Settings::quick(binary("kith-relay")?);
    let report = attack::run(&settings, &[Attack::Garbage]).await?;
    let unattacked = [&report.baseline, &report.control];
    for row in unattacked.into_iter().chain(&report.attacks) {
        assert!(row.honest_tried > 0, "{row:?}");
        assert_eq!(row.honest_lost, 0, "{row:?}");
        assert_eq!(row.honest_not_stored, 0, "{row:?}");
        assert!(row.disk_bytes > 0 && row.log_bytes > 0, "{row:?}");
    }
    let garbage = &report.attacks[0];
    assert!(garbage.attempted > 0, "{garbage:?}");
    assert!(
        garbage.refused > 0,
        "the relay refused no garbage: {garbage:?}"
    );
    assert_eq!(report.baseline.refused, 0, "{:?}", report.baseline);
    assert!(report.markdown().contains("| garbage |"));
    assert!(report.markdown().contains("| control: "));
    Ok(())
}

/// A peer sending nothing but garbage on the group and keys protocols is answered and counted
/// each time, and logged at most a few times: its refusals must not fill the relay's disk
/// through the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_peer_is_counted_not_logged_each_time() -> anyhow::Result<()> {
    use futures::StreamExt;
    use kith_net::codec::Message;
    use kith_tests::attack::relay::Relay;
    use kith_tests::RawBehaviourEvent;
    use libp2p::request_response::Event;
    use libp2p::swarm::SwarmEvent;

    init_logs();
    // Not banned within this test's frames (bans have their own test in `hostile`).
    let limits = attack::Limits {
        malformed_request_burst_per_peer: 1_000,
        ..attack::Limits::default()
    };
    let relay = Relay::spawn(&binary("kith-relay")?, &limits).await?;
    let mut peer = kith_tests::RawPeer::new()?;
    peer.swarm.add_peer_address(relay.peer, relay.addr.clone());
    // CBOR of the wrong shape, framed.
    let garbage = vec![0, 0, 0, 3, 0x83, 0x01, 0x02];
    // Rounds of 20 on each protocol: fewer streams at once than the relay's limit per
    // connection (whose refusals libp2p logs itself).
    const ROUNDS: usize = 3;
    const EACH: usize = 20;
    for _ in 0..ROUNDS {
        for _ in 0..EACH {
            let b = peer.swarm.behaviour_mut();
            b.group
                .send_request(&relay.peer, Message::Raw(garbage.clone()));
            b.keys
                .send_request(&relay.peer, Message::Raw(garbage.clone()));
        }
        let mut answered = 0;
        tokio::time::timeout(kith_tests::DEADLINE, async {
            while answered < 2 * EACH {
                match peer.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(RawBehaviourEvent::Group(
                        Event::Message { .. } | Event::OutboundFailure { .. },
                    ))
                    | SwarmEvent::Behaviour(RawBehaviourEvent::Keys(
                        Event::Message { .. } | Event::OutboundFailure { .. },
                    )) => answered += 1,
                    _ => {}
                }
            }
        })
        .await?;
    }
    let total = (2 * EACH * ROUNDS) as u64;
    let refused = kith_tests::wait_for("every frame counted", || async {
        let n = relay.refused().await.ok()?;
        (n >= total).then_some(n)
    })
    .await?;
    let log = std::fs::read_to_string(&relay.log)?;
    let lines = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        lines <= 4,
        "{refused} refusals of one peer wrote {lines} WARN lines:\n{log}"
    );
    relay.stop()?;
    Ok(())
}

/// The node's side of the harness: one short round (baseline and the stranger flood) against
/// the debug `kith` binary. No timing is asserted: only that the attack ran alongside the
/// honest sender, and that every honest message of the unattacked node was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_node_attack_round_runs_and_the_baseline_accepts_everything() -> anyhow::Result<()>
{
    use kith_tests::attack::node::{self, NodeAttack};
    init_logs();
    let settings = Settings::quick(binary("kith-relay")?);
    let rows = node::run(&binary("kith")?, &settings, &[NodeAttack::StrangerFlood]).await?;
    let [baseline, flood] = rows.as_slice() else {
        anyhow::bail!("{} rows", rows.len());
    };
    assert!(baseline.honest_sent > 0, "{baseline:?}");
    assert_eq!(baseline.honest_failed, 0, "{baseline:?}");
    assert!(flood.attempted > 0, "{flood:?}");
    assert!(flood.honest_sent > 0, "{flood:?}");
    assert!(node::markdown(&rows).contains("| stranger-flood |"));
    Ok(())
}
