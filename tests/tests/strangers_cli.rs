//! Process-level test of the stranger policy through the real `kith` binary: `kith requests`
//! (list, accept, block), `kith contact block|unblock` and `kith settings --reach`, with the JSON
//! shapes the command-line contract names.

use kith_tests::process::{kith, kith_json, start_daemon};
use kith_tests::wait_for;
use serde_json::Value;

fn ok(output: std::process::Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `from` writes `text` to bob (its contact) and waits for `delivered`.
async fn write_to_bob(from: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let sent = kith_json(from, &["send", "bob", text, "--json"])?;
    let id = sent["id"].as_str().unwrap_or_default().to_owned();
    wait_for("delivered", || async {
        let status = kith_json(from, &["status", &id, "--json"]).ok()?;
        (status["state"] == "delivered").then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_listed_accepted_and_blocked_through_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b, c) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    for (home, name) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        ok(kith(home, &["init", "--name", name])?)?;
    }
    let _alice = start_daemon(&a, &[]).await?;
    let _bob = start_daemon(&b, &[]).await?;
    let _carol = start_daemon(&c, &[]).await?;
    let bob_id = kith_json(&b, &["id", "--json"])?;
    let bob_peer = bob_id["peer_id"].as_str().unwrap_or_default().to_owned();
    let bob_addr = bob_id["listen_addrs"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let alice_peer = kith_json(&a, &["id", "--json"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let carol_peer = kith_json(&c, &["id", "--json"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for home in [&a, &c] {
        ok(kith(
            home,
            &["contact", "add", "bob", &bob_peer, "--addr", &bob_addr],
        )?)?;
    }
    let settings = kith_json(&b, &["settings", "--json"])?;
    assert_eq!(settings["reach"], "everyone");

    write_to_bob(&a, "hi bob, alice here").await?;
    write_to_bob(&c, "win a prize").await?;
    write_to_bob(&c, "click here").await?;

    // Neither shows among bob's messages; both are requests.
    assert_eq!(
        kith_json(&b, &["messages", "--json"])?,
        Value::Array(vec![])
    );
    let requests = kith_json(&b, &["requests", "--json"])?;
    let list = requests.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2, "{requests}");
    let of = |peer: &str| {
        list.iter()
            .find(|r| r["peer_id"] == peer)
            .cloned()
            .unwrap_or_default()
    };
    let from_carol = of(&carol_peer);
    assert_eq!(from_carol["messages"], 2);
    assert_eq!(from_carol["preview"], "click here");
    assert_eq!(from_carol["name"], Value::Null);
    assert!(from_carol["first_ms"].as_u64() <= from_carol["last_ms"].as_u64());
    assert!(from_carol["first_ms"].as_u64().is_some());
    assert_eq!(of(&alice_peer)["messages"], 1);

    // Accept alice under a name: her message shows in her conversation.
    let accepted = kith_json(
        &b,
        &[
            "requests",
            "accept",
            &alice_peer,
            "--name",
            "alice",
            "--json",
        ],
    )?;
    assert_eq!(accepted["name"], "alice");
    assert_eq!(accepted["peer_id"], alice_peer.as_str());
    let inbox = kith_json(&b, &["messages", "alice", "--json"])?;
    assert_eq!(inbox.as_array().map(Vec::len), Some(1));
    assert_eq!(inbox[0]["text"], "hi bob, alice here");

    // Block carol: her messages go, and what she sends next fails at her end.
    let blocked = kith_json(&b, &["requests", "block", &carol_peer, "--json"])?;
    assert_eq!(blocked["blocked"], true);
    assert_eq!(blocked["dropped"], 2);
    assert_eq!(
        kith_json(&b, &["requests", "--json"])?,
        Value::Array(vec![])
    );
    let sent = kith_json(&c, &["send", "bob", "hello?", "--json"])?;
    let id = sent["id"].as_str().unwrap_or_default().to_owned();
    wait_for("carol's message failed", || async {
        let status = kith_json(&c, &["status", &id, "--json"]).ok()?;
        (status["state"] == "failed").then_some(())
    })
    .await?;

    // Blocking a contact shows in the contact list; unblocking undoes it.
    let blocked = kith_json(&b, &["contact", "block", "alice", "--json"])?;
    assert_eq!(blocked["blocked"], true);
    assert_eq!(blocked["dropped"], 0);
    let contacts = kith_json(&b, &["contact", "list", "--json"])?;
    assert_eq!(contacts[0]["name"], "alice");
    assert_eq!(contacts[0]["blocked"], true);
    let unblocked = kith_json(&b, &["contact", "unblock", "alice", "--json"])?;
    assert_eq!(unblocked["blocked"], false);
    assert_eq!(
        kith_json(&b, &["contact", "list", "--json"])?[0]["blocked"],
        false
    );

    // reach = contacts, shown by `kith settings`.
    let settings = kith_json(&b, &["settings", "--reach", "contacts", "--json"])?;
    assert_eq!(settings["reach"], "contacts");
    assert_eq!(kith_json(&b, &["settings", "--json"])?["reach"], "contacts");
    let bad = kith(&b, &["settings", "--reach", "nobody"])?;
    assert!(!bad.status.success());
    Ok(())
}
