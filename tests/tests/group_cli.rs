//! Process-level test of the group commands: the real `kith` binary (two daemons) against an
//! in-process relay, checking the JSON shapes of the command-line contract.

use kith_tests::process::{kith, kith_json, start_daemon};
use kith_tests::wait_for;
use serde_json::Value;

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands_print_the_contract_shapes() -> anyhow::Result<()> {
    kith_tests::init_logs();
    let dir = tempfile::tempdir()?;
    let relay = kith_relay::start(kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        ..kith_relay::Config::ephemeral(dir.path().join("relay"))
    })
    .await?;
    let relay_addr = relay.listen_addrs[0].to_string();
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    assert!(kith(&a, &["init", "--name", "alice"])?.status.success());
    assert!(kith(&b, &["init", "--name", "bob"])?.status.success());
    let _alice = start_daemon(&a, &["--relay", &relay_addr]).await?;
    let _bob = start_daemon(&b, &["--relay", &relay_addr]).await?;
    let bob_peer = kith_json(&b, &["id", "--json"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let alice_peer = kith_json(&a, &["id", "--json"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let created = kith_json(
        &a,
        &["group", "create", "club", "--member", &bob_peer, "--json"],
    )?;
    assert_eq!(keys(&created), ["group_id", "name"]);
    assert_eq!(created["name"], "club");
    let group_id = created["group_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(group_id.len(), 32);

    let info = kith_json(&a, &["group", "info", "club", "--json"])?;
    for key in ["group_id", "name", "admins", "members", "version", "epoch"] {
        assert!(info.get(key).is_some(), "{key} missing in {info}");
    }
    assert_eq!(info["epoch"], 1, "creating with a member is one commit");
    assert_eq!(info["admins"], serde_json::json!([alice_peer]));
    assert_eq!(info["members"].as_array().map(Vec::len), Some(2));
    assert_eq!(info["version"], 1);
    let list = kith_json(&a, &["group", "list", "--json"])?;
    assert_eq!(list[0]["group_id"], group_id.as_str());

    // Alice is a stranger to bob: her group waits as an invitation, out of his list.
    let invitations = wait_for("bob is invited", || async {
        let list = kith_json(&b, &["group", "invitations", "--json"]).ok()?;
        (list.as_array()?.len() == 1).then_some(list)
    })
    .await?;
    assert_eq!(
        keys(&invitations[0]),
        [
            "group_id",
            "invited_at_ms",
            "inviter",
            "members",
            "messages",
            "name"
        ]
    );
    assert_eq!(invitations[0]["group_id"], group_id.as_str());
    assert_eq!(invitations[0]["inviter"], alice_peer.as_str());
    assert_eq!(
        kith_json(&b, &["group", "list", "--json"])?,
        serde_json::json!([])
    );
    let refused = kith(&b, &["send", "club", "hi?"])?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("kith group accept"),
        "{refused:?}"
    );

    // What the group sends meanwhile is kept (and delivered), but not shown.
    let sent = kith_json(&a, &["send", "club", "hello club", "--json"])?;
    let id = sent["id"].as_str().unwrap_or_default().to_owned();
    wait_for("delivered to bob", || async {
        let status = kith_json(&a, &["status", &id, "--json"]).ok()?;
        (status["members"][&bob_peer] == "delivered" && status["state"] == "delivered")
            .then_some(())
    })
    .await?;
    assert_eq!(
        kith_json(&b, &["messages", "--json"])?,
        serde_json::json!([])
    );
    let joined = kith_json(&b, &["group", "accept", "club", "--json"])?;
    assert_eq!(joined["group_id"], group_id.as_str());
    assert_eq!(joined["member"], true);
    let list = kith_json(&b, &["group", "list", "--json"])?;
    assert_eq!(list[0]["group_id"], group_id.as_str());
    assert_eq!(
        kith_json(&b, &["group", "invitations", "--json"])?,
        serde_json::json!([])
    );

    // As a non-admin bob cannot add.
    let refused = kith(&b, &["group", "add", &group_id, &alice_peer])?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not an admin"));
    let status = kith_json(&a, &["status", &id, "--json"])?;
    assert_eq!(keys(&status), ["id", "members", "state"]);
    let inbox = kith_json(&b, &["messages", "club", "--json"])?;
    assert_eq!(inbox[0]["text"], "hello club");
    assert_eq!(inbox[0]["from"], alice_peer.as_str());
    assert!(kith(&b, &["read", &group_id])?.status.success());
    wait_for("read by bob", || async {
        let status = kith_json(&a, &["status", &id, "--json"]).ok()?;
        (status["state"] == "read").then_some(())
    })
    .await?;

    // Refreshing one's keys moves the group to the next epoch.
    let rekeyed = kith(&a, &["group", "rekey", "club"])?;
    assert!(rekeyed.status.success(), "{rekeyed:?}");
    assert!(String::from_utf8_lossy(&rekeyed.stdout).contains("now at epoch 2"));
    assert_eq!(
        kith_json(&a, &["group", "info", "club", "--json"])?["epoch"],
        2
    );
    assert!(kith(&a, &["group", "promote", "club", &bob_peer])?
        .status
        .success());
    assert!(kith(&b, &["group", "leave", "club"])?.status.success());
    // Bob keeps the group, marked, and its history, by name.
    let list = kith_json(&b, &["group", "list", "--json"])?;
    assert_eq!(list[0]["group_id"], group_id.as_str());
    assert_eq!(list[0]["member"], false);
    let kept = kith_json(&b, &["messages", "club", "--json"])?;
    assert_eq!(kept[0]["text"], "hello club");
    let refused = kith(&b, &["send", "club", "anyone?"])?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no longer a member"),
        "{refused:?}"
    );
    let info = kith_json(&a, &["group", "info", "club", "--json"])?;
    assert_eq!(info["members"], serde_json::json!([alice_peer]));
    assert_eq!(info["version"], 4);
    relay.shutdown().await?;
    Ok(())
}
