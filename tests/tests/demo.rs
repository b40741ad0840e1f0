//! Process-level test: `kith demo` runs end to end and exits 0 only when every step happened.

use std::process::Command;

use kith_tests::process::binary;

#[test]
fn the_demo_runs_and_checks_itself() -> anyhow::Result<()> {
    let out = Command::new(binary("kith")?)
        .args(["demo", "--json"])
        .env("KITH_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let has = |kind: &str, state: Option<&str>| {
        events
            .iter()
            .any(|e| e["type"] == kind && state.is_none_or(|s| e["state"] == s))
    };
    assert!(has("send", None));
    assert!(
        has("tick", Some("sent")),
        "the offline message was stored by the relay"
    );
    assert!(has("tick", Some("delivered")));
    assert!(has("tick", Some("read")));
    assert!(has("catch-up", None));
    assert!(events
        .iter()
        .any(|e| e["type"] == "presence" && e["online"] == false));
    assert!(has("typing", None));
    assert!(events
        .iter()
        .any(|e| e["type"] == "member" && e["state"] == "read"));
    assert!(events
        .iter()
        .any(|e| e["type"] == "file" && e["thumbnail"] == true));
    Ok(())
}
