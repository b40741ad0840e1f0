//! Process-level test of temporary chats: `kith chat timer` and `kith export` through the real
//! `kith` binary, with the daemon's default limits (timers of 30 s and more).

use kith_tests::process::{kith, kith_json, start_daemon};
use kith_tests::wait_for;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_timer_and_export_through_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    assert!(kith(&a, &["init", "--name", "alice"])?.status.success());
    assert!(kith(&b, &["init", "--name", "bob"])?.status.success());
    let _alice = start_daemon(&a, &[]).await?;
    let _bob = start_daemon(&b, &[]).await?;
    let alice_id = kith_json(&a, &["id", "--json"])?;
    let bob_id = kith_json(&b, &["id", "--json"])?;
    let addr = |id: &Value| id["listen_addrs"][0].as_str().expect("addr").to_owned();
    let peer = |id: &Value| id["peer_id"].as_str().expect("peer").to_owned();
    let added = kith(
        &a,
        &[
            "contact",
            "add",
            "bob",
            &peer(&bob_id),
            "--addr",
            &addr(&bob_id),
        ],
    )?;
    assert!(added.status.success());
    let added = kith(
        &b,
        &[
            "contact",
            "add",
            "alice",
            &peer(&alice_id),
            "--addr",
            &addr(&alice_id),
        ],
    )?;
    assert!(added.status.success());

    let sent = kith_json(&a, &["send", "bob", "kept for good", "--json"])?;
    let sent_id = sent["id"].as_str().expect("id").to_owned();
    wait_for("delivered", || async {
        let status = kith_json(&a, &["status", &sent_id, "--json"]).ok()?;
        (status["state"] == "delivered").then_some(())
    })
    .await?;

    // Below the shortest timer, or nonsense: refused with a message.
    for bad in ["3s", "5 parsecs", "100d"] {
        let out = kith(&a, &["chat", "timer", "bob", bad, "--json"])?;
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
    let off = kith_json(&a, &["chat", "timer", "bob", "--json"])?;
    assert_eq!(off["with"], "bob");
    assert_eq!(off["timer_secs"], Value::Null);
    let set = kith_json(&a, &["chat", "timer", "bob", "1h", "--json"])?;
    assert_eq!(set["with"], "bob");
    assert_eq!(set["timer_secs"], 3600);
    wait_for("bob has the timer", || async {
        let t = kith_json(&b, &["chat", "timer", "alice", "--json"]).ok()?;
        (t["timer_secs"] == 3600).then_some(())
    })
    .await?;
    let timed = kith_json(&a, &["send", "bob", "for an hour", "--json"])?;
    let history = kith_json(&a, &["messages", "bob", "--json"])?;
    let timed_view = history
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == timed["id"]))
        .expect("the timed message");
    assert!(timed_view["expires_at_ms"].as_u64().is_some());
    let refused = kith(&a, &["export", "bob"])?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("temporary chat"));

    let set = kith_json(&a, &["chat", "timer", "bob", "off", "--json"])?;
    assert_eq!(set["timer_secs"], Value::Null);
    let export = kith(&a, &["export", "bob"])?;
    assert!(export.status.success());
    let lines: Vec<Value> = String::from_utf8(export.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines[0]["format"], "kith-export/1");
    assert_eq!(lines[0]["name"], "bob");
    let texts: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    // The timed message waits to disappear: left out; the timer lines are there.
    assert_eq!(
        texts,
        [
            "kept for good",
            "⏱ disappearing messages: 1h",
            "⏱ disappearing messages: off"
        ]
    );
    assert_eq!(lines[2]["timer"]["timer_secs"], 3600);
    let whole = kith_json(&a, &["export", "bob", "--json"])?;
    assert_eq!(whole["messages"].as_array().map(Vec::len), Some(3));
    Ok(())
}
