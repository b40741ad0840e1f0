//! MLS key packages through a relay's `/kith/keys/1`: published by their owner and checked
//! against it, handed out once each, then the last-resort package again and again; a package
//! whose credential names another peer is refused.

use std::collections::HashSet;

use kith_node::core::crypto::mls::{Config, Member};
use kith_node::core::store::{Batch, Store};
use kith_protocol::prekeys::{Request, Response};
use kith_protocol::Reject;
use kith_tests::{init_logs, RawPeer};
use serde_bytes::ByteBuf;

/// `count` one-use packages (or one last-resort one) of the member, their private keys written.
fn packages(member: &Member, store: &Store, count: usize, last_resort: bool) -> Vec<ByteBuf> {
    let mut batch = Batch::new();
    let packages = member
        .key_packages(count, last_resort, &mut batch)
        .expect("key packages");
    store.apply(batch).expect("write");
    packages.into_iter().map(ByteBuf::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_checked_handed_out_once_then_the_last_resort_one() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path().join("relay"))).await?;
    let relay_addr = relay.listen_addrs[0].clone();

    let mut owner = RawPeer::new()?;
    let owner_peer = owner.key.public().to_peer_id();
    let store = Store::open(&dir.path().join("owner"))?;
    let member = Member::new(store.clone(), &owner.key, Config::default())?;
    let one_use = packages(&member, &store, 3, false);
    let last_resort = packages(&member, &store, 1, true).remove(0);

    // Another peer's packages, published as the owner's own, are refused.
    let mut mallory = RawPeer::new()?;
    let publish = Request::PublishPackages {
        req_id: 1,
        packages: one_use.clone(),
        last_resort: None,
    };
    match mallory.keys(relay.peer_id, &relay_addr, publish).await? {
        Response::Rejected {
            reason: Reject::Malformed,
            ..
        } => {}
        other => anyhow::bail!("the relay took another peer's packages: {other:?}"),
    }
    // So is a last-resort package in a one-use slot.
    let publish = Request::PublishPackages {
        req_id: 2,
        packages: vec![last_resort.clone()],
        last_resort: None,
    };
    assert!(matches!(
        owner.keys(relay.peer_id, &relay_addr, publish).await?,
        Response::Rejected {
            reason: Reject::Malformed,
            ..
        }
    ));

    let publish = Request::PublishPackages {
        req_id: 3,
        packages: one_use.clone(),
        last_resort: Some(last_resort.clone()),
    };
    match owner.keys(relay.peer_id, &relay_addr, publish).await? {
        Response::PackagesPublished { remaining: 3, .. } => {}
        other => anyhow::bail!("unexpected answer {other:?}"),
    }

    // A claimer gets each one-use package once, each checking out as the owner's.
    let mut claimer = RawPeer::new()?;
    let mut seen = HashSet::new();
    for req_id in 0..5u64 {
        let claim = Request::ClaimPackage {
            req_id,
            peer: owner_peer,
        };
        match claimer.keys(relay.peer_id, &relay_addr, claim).await? {
            Response::ClaimedPackage {
                package,
                last_resort: is_last_resort,
                ..
            } => {
                kith_net::key_package::verify(&package, &owner_peer, Some(is_last_resort))?;
                // Someone else's expectations refuse it.
                assert!(kith_net::key_package::verify(
                    &package,
                    &claimer.key.public().to_peer_id(),
                    None
                )
                .is_err());
                if req_id < 3 {
                    assert!(!is_last_resort, "the last-resort package came too early");
                    assert!(one_use.contains(&package));
                    assert!(
                        seen.insert(package.into_vec()),
                        "a package handed out twice"
                    );
                } else {
                    // Exhausted: the last-resort package, kept for the next claimer.
                    assert!(is_last_resort);
                    assert_eq!(package, last_resort);
                }
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    // A peer with no packages.
    let claim = Request::ClaimPackage {
        req_id: 9,
        peer: mallory.key.public().to_peer_id(),
    };
    assert!(matches!(
        claimer.keys(relay.peer_id, &relay_addr, claim).await?,
        Response::NotFound { req_id: 9 }
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_key_packages_at_its_home_relay() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path().join("relay"))).await?;
    let relay_addr = relay.listen_addrs[0].clone();
    let alice = kith_tests::TestNode::start("alice", vec![relay_addr.clone()]).await?;
    let alice_peer = alice.peer_id();

    // A claimer finds alice's packages at her relay once she published them.
    let claimer = std::sync::Arc::new(tokio::sync::Mutex::new(RawPeer::new()?));
    let first = kith_tests::wait_for("alice's key packages at her relay", || {
        let claimer = claimer.clone();
        let relay_addr = relay_addr.clone();
        let relay_peer = relay.peer_id;
        async move {
            let claim = Request::ClaimPackage {
                req_id: 0,
                peer: alice_peer,
            };
            match claimer
                .lock()
                .await
                .keys(relay_peer, &relay_addr, claim)
                .await
            {
                Ok(Response::ClaimedPackage {
                    package,
                    last_resort: false,
                    ..
                }) => Some(package),
                _ => None,
            }
        }
    })
    .await?;
    kith_net::key_package::verify(&first, &alice_peer, Some(false))?;

    // The rest of the one-use packages, then her last-resort one.
    let mut claimer = claimer.lock().await;
    let mut one_use = 1;
    let last_resort = loop {
        let claim = Request::ClaimPackage {
            req_id: one_use,
            peer: alice_peer,
        };
        match claimer.keys(relay.peer_id, &relay_addr, claim).await? {
            Response::ClaimedPackage {
                package,
                last_resort,
                ..
            } => {
                kith_net::key_package::verify(&package, &alice_peer, Some(last_resort))?;
                if last_resort {
                    break package;
                }
                one_use += 1;
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    };
    assert_eq!(
        one_use,
        kith_protocol::prekeys::MAX_PACKAGES_PER_PUBLISH as u64
    );
    assert!(!last_resort.is_empty());
    Ok(())
}
