//! Process-level test: the real `kith` binary, driven through the command-line contract.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kith_tests::process::{binary, kith, kith_json, start_daemon, Daemon};
use kith_tests::wait_for;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_through_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));

    assert!(kith(&a, &["init", "--name", "alice"])?.status.success());
    assert!(kith(&b, &["init", "--name", "bob"])?.status.success());
    let again = kith(&a, &["init", "--name", "alice"])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    // Without a daemon: id works offline, other commands say how to start one.
    let offline = kith_json(&a, &["id", "--json"])?;
    assert_eq!(offline["name"], "alice");
    assert_eq!(offline["listen_addrs"], Value::Array(vec![]));
    let no_daemon = kith(&a, &["messages", "--json"])?;
    assert!(!no_daemon.status.success());
    assert!(String::from_utf8_lossy(&no_daemon.stderr).contains("kith daemon"));
    let bad_flag = kith(&a, &["send", "--bogus"])?;
    assert!(!bad_flag.status.success());

    let _alice = start_daemon(&a, &[]).await?;
    let mut bob = start_daemon(&b, &[]).await?;

    let alice_id = kith_json(&a, &["id", "--json"])?;
    let bob_id = kith_json(&b, &["id", "--json"])?;
    let bob_peer = bob_id["peer_id"].as_str().expect("peer_id").to_owned();
    let bob_addr = bob_id["listen_addrs"][0]
        .as_str()
        .expect("an address")
        .to_owned();
    assert!(bob_addr.ends_with(&format!("/p2p/{bob_peer}")));
    assert!(bob_id["invite"]
        .as_str()
        .expect("invite")
        .starts_with("kith:"));

    let add = kith(
        &a,
        &["contact", "add", "bob", &bob_peer, "--addr", &bob_addr],
    )?;
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let alice_invite = alice_id["invite"].as_str().expect("invite");
    let alice_addr = alice_id["listen_addrs"][0].as_str().expect("an address");
    assert!(kith(
        &b,
        &[
            "contact",
            "add",
            "alice",
            alice_invite,
            "--addr",
            alice_addr
        ]
    )?
    .status
    .success());
    let contacts = kith_json(&a, &["contact", "list", "--json"])?;
    assert_eq!(contacts[0]["name"], "bob");
    assert_eq!(contacts[0]["peer_id"], bob_peer.as_str());

    // Bob watches events while alice writes.
    let mut events = Command::new(binary("kith")?)
        .args(["--home", b.to_str().expect("utf-8"), "events", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = events.stdout.take().expect("piped stdout");
    let first_event = std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    // The stream is subscribed once the daemon has the connection; retry sends until an event shows.
    let sent = kith_json(&a, &["send", "bob", "hello from the cli", "--json"])?;
    let id = sent["id"].as_str().expect("id").to_owned();
    assert!(["pending", "sent", "delivered"].contains(&sent["state"].as_str().expect("state")));

    wait_for("delivered", || async {
        let status = kith_json(&a, &["status", &id, "--json"]).ok()?;
        (status["state"] == "delivered").then_some(())
    })
    .await?;
    let status = kith_json(&a, &["status", &id, "--json"])?;
    assert_eq!(status["members"], serde_json::json!({}));

    let inbox = kith_json(&b, &["messages", "alice", "--json"])?;
    assert_eq!(inbox.as_array().map(Vec::len), Some(1));
    assert_eq!(inbox[0]["direction"], "in");
    assert_eq!(inbox[0]["text"], "hello from the cli");
    assert_eq!(inbox[0]["from"], alice_id["peer_id"]);
    assert_eq!(inbox[0]["id"], id.as_str());
    assert!(inbox[0]["sent_at_ms"].as_u64().is_some());

    assert!(kith(&b, &["read", "alice"])?.status.success());
    wait_for("read", || async {
        let status = kith_json(&a, &["status", &id, "--json"]).ok()?;
        (status["state"] == "read").then_some(())
    })
    .await?;

    // Both sides print the same safety number; --mark records that it was compared.
    let at_a = kith_json(&a, &["contact", "verify", "bob", "--json"])?;
    let at_b = kith_json(&b, &["contact", "verify", "alice", "--json"])?;
    assert_eq!(at_a["safety_number"], at_b["safety_number"]);
    assert_eq!(at_a["peer_id"], bob_peer.as_str());
    assert_eq!(at_a["verified"], false);
    let digits = at_a["safety_number"].as_str().expect("safety number");
    assert_eq!(digits.chars().filter(char::is_ascii_digit).count(), 60);
    let marked = kith_json(&a, &["contact", "verify", "bob", "--mark", "--json"])?;
    assert_eq!(marked["verified"], true);
    assert_eq!(marked["safety_number"], at_a["safety_number"]);

    // A second message makes sure the event stream has something to show even if it subscribed
    // after the first one.
    kith_json(&a, &["send", "bob", "second", "--json"])?;
    let line = tokio::task::spawn_blocking(move || first_event.join())
        .await?
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let event: Value = serde_json::from_str(line.trim())?;
    assert_eq!(event["type"], "message");
    let _ = events.kill();
    let _ = events.wait();

    let unknown = kith(&a, &["send", "nobody", "hi"])?;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown recipient"));

    // A clean stop removes the API file, and history survives.
    assert!(bob.terminate()?.success());
    assert!(!b.join("api.json").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_relays_are_remembered_for_the_invite_and_the_next_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("dora");
    assert!(kith(&home, &["init", "--name", "dora"])?.status.success());
    let relay_peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    // Nobody listens there: the daemon keeps re-dialing, which is fine for this test.
    let relay = format!("/ip4/127.0.0.1/tcp/9/p2p/{relay_peer}");
    let mut daemon = Daemon::spawn(
        &binary("kith")?,
        &[
            "--home",
            home.to_str().expect("utf-8 path"),
            "daemon",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--relay",
            &relay,
        ],
        &home.join("daemon.log"),
    )?;
    wait_for("daemon api.json", || async {
        home.join("api.json").exists().then_some(())
    })
    .await?;
    assert!(daemon.terminate()?.success());

    let offline = kith_json(&home, &["id", "--json"])?;
    let invite =
        kith_protocol::invite::Invite::decode(offline["invite"].as_str().expect("invite"))?;
    assert_eq!(invite.relays, vec![relay.clone()]);
    let printed = kith(&home, &["id", "--invite"])?;
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        offline["invite"].as_str().expect("invite")
    );
    Ok(())
}
