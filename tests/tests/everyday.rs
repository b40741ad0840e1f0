//! Process-level tests of everyday use with the real `kith` binary: one name per contact,
//! terminal-safe output, sending from standard input, settings applied to a running daemon,
//! the node's health, API errors as JSON, one-line errors, and `kith events` across restarts.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use kith_tests::process::{binary, kith, kith_json, start_daemon};
use kith_tests::wait_for;
use serde_json::Value;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a kith command that must fail; returns its stderr, which must be one line.
fn kith_fails(home: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kith(home, args)?;
    assert!(!out.status.success(), "kith {args:?} succeeded");
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    Ok(err)
}

fn invite(home: &Path) -> anyhow::Result<String> {
    Ok(stdout(&kith(home, &["id", "--invite"])?).trim().to_owned())
}

/// One raw HTTP/1.1 request to the daemon's API; the status and the body as JSON.
fn http(
    home: &Path,
    request_line: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    let api: Value = serde_json::from_slice(&std::fs::read(home.join("api.json"))?)?;
    let token = std::fs::read_to_string(home.join("api.token"))?;
    let addr = api["api"].as_str().expect("api address");
    let mut stream = std::net::TcpStream::connect(addr)?;
    // The daemon answers only requests that name it in `Host` (DNS rebinding).
    let mut head = format!(
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        token.trim(),
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // A server that refuses a large body may answer before reading it all.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
    Ok((status, json))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_text_settings_health_and_api_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b, c) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    for (home, name) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        assert!(kith(home, &["init", "--name", name])?.status.success());
    }
    let (bob_invite, carol_invite) = (invite(&b)?, invite(&c)?);
    let mut daemon = start_daemon(&a, &[]).await?;

    // One name per peer, one peer per name.
    assert!(kith(&a, &["contact", "add", "bob", &bob_invite])?
        .status
        .success());
    let again = kith_fails(&a, &["contact", "add", "junk", &bob_invite])?;
    assert!(again.contains("already your contact \"bob\""), "{again}");
    assert!(again.contains("kith contact rename bob junk"), "{again}");
    let taken = kith_fails(&a, &["contact", "add", "bob", &carol_invite])?;
    assert!(taken.contains("already used"), "{taken}");
    let garbage = kith_fails(&a, &["contact", "add", "x", "kith:AAAAAAAA"])?;
    assert!(
        garbage.contains("neither a peer id nor an invite"),
        "{garbage}"
    );
    assert!(!garbage.contains("Semantic"), "{garbage}");

    // Bob is offline and has no relay: a plain send says pending at once.
    let started = Instant::now();
    let sent = kith(&a, &["send", "bob", "hi"])?;
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(stderr(&sent).contains("pending"), "{}", stderr(&sent));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1800),
        "send took {:?}",
        started.elapsed()
    );
    let text_id = stdout(&sent).trim().to_owned();
    let download = kith_fails(&a, &["download", &text_id])?;
    assert!(download.contains("text message"), "{download}");
    assert!(kith_fails(&a, &["send", "bob", "  \n "])?.contains("empty"));

    // Text from standard input, and its limit.
    let mut child = Command::new(binary("kith")?)
        .args(["--home", path(&a), "send", "bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"line one\nline two\n")?;
    assert!(child.wait_with_output()?.status.success());
    let mut child = Command::new(binary("kith")?)
        .args(["--home", path(&a), "send", "bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&[b'x'; 16 * 1024 + 1])?;
    let too_long = child.wait_with_output()?;
    assert!(!too_long.status.success());
    assert!(stderr(&too_long).contains("16384"), "{}", stderr(&too_long));

    // Control codes reach the terminal as visible escapes; JSON keeps the exact text.
    let nasty = "\u{1b}[31mRED\u{1b}[0m \u{7}\u{202E}abc\nsecond line";
    kith_json(&a, &["send", "bob", nasty, "--json"])?;
    let shown = stdout(&kith(&a, &["messages", "bob"])?);
    for bad in ['\u{1b}', '\u{7}', '\u{202E}'] {
        assert!(!shown.contains(bad), "{bad:?} printed: {shown:?}");
    }
    assert_eq!(shown.lines().count(), 3, "one line per message: {shown}");
    assert!(shown.contains("you: line one⏎line two"), "{shown}");
    let listed = kith_json(&a, &["messages", "bob", "--json"])?;
    assert_eq!(listed[2]["text"], nasty);
    assert_eq!(listed[2]["from_name"], "alice");
    assert_eq!(listed[2]["conversation_name"], "bob");
    // Every conversation, grouped under its name.
    let all = stdout(&kith(&a, &["messages"])?);
    assert!(all.starts_with("── bob ──\n"), "{all}");

    // Settings apply to the running daemon.
    assert!(kith(&a, &["name", "alicia"])?.status.success());
    assert_eq!(kith_json(&a, &["id", "--json"])?["name"], "alicia");
    let settings = kith_json(&a, &["settings", "--read-receipts", "off", "--json"])?;
    assert_eq!(settings["read_receipts"], false);
    assert_eq!(kith_json(&a, &["id", "--json"])?["read_receipts"], false);
    assert!(kith_fails(&a, &["name", "bad\u{1b}name"])?.contains("printable"));

    // Health: no relays, what waits in the outbox, and the road to each contact.
    let health = kith_json(&a, &["status", "--json"])?;
    assert_eq!(health["relays"], serde_json::json!([]));
    assert!(health["pending_outbox"].as_u64() >= Some(3), "{health}");
    assert_eq!(health["contacts"][0]["name"], "bob");
    assert_eq!(health["contacts"][0]["path"], "mailbox");
    let shown = stdout(&kith(&a, &["status"])?);
    assert!(shown.contains("outbox:"), "{shown}");

    // Every API error is JSON with a fitting status.
    for (request, content_type, body, status) in [
        ("GET /v1/nothing", None, &b""[..], 404),
        ("DELETE /v1/send", None, b"", 405),
        ("POST /v1/send", None, br#"{"to":"bob","text":"x"}"#, 415),
        ("POST /v1/send", Some("application/json"), b"{not json", 400),
        (
            "POST /v1/send",
            Some("application/json"),
            br#"{"to":"bob"}"#,
            422,
        ),
        ("GET /v1/status/00", None, b"", 400),
        ("DELETE /v1/contacts/nobody", None, b"", 404),
    ] {
        let (got, json) = http(&a, request, content_type, body)?;
        assert_eq!(got, status, "{request}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{request}: {json}"
        );
    }
    let big = vec![b' '; 3 * 1024 * 1024];
    let (got, json) = http(&a, "POST /v1/send", Some("application/json"), &big)?;
    assert_eq!(got, 413, "{json}");
    assert!(json["error"].is_string(), "{json}");

    // Rename and remove, and the store keeps one name across a restart.
    assert!(kith(&a, &["contact", "rename", "bob", "robert"])?
        .status
        .success());
    assert!(kith_fails(&a, &["send", "bob", "x"])?.contains("unknown recipient"));
    assert!(daemon.terminate()?.success());
    let mut daemon = start_daemon(&a, &[]).await?;
    let contacts = kith_json(&a, &["contact", "list", "--json"])?;
    assert_eq!(contacts.as_array().map(Vec::len), Some(1), "{contacts}");
    assert_eq!(contacts[0]["name"], "robert");
    assert!(kith(&a, &["contact", "remove", "robert"])?.status.success());
    assert!(kith_fails(&a, &["contact", "remove", "robert"])?.contains("no contact named"));
    assert_eq!(
        kith_json(&a, &["contact", "list", "--json"])?,
        serde_json::json!([])
    );

    // A crashed daemon leaves api.json behind: "no daemon", not "connection refused".
    daemon.kill()?;
    assert!(a.join("api.json").exists());
    let gone = kith_fails(&a, &["messages"])?;
    assert!(gone.contains("no kith daemon is running"), "{gone}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_relays_and_second_daemons_are_refused_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("dora");
    assert!(kith(&home, &["init", "--name", "dora"])?.status.success());

    // An address without /p2p/ is refused before anything is saved.
    let bad = kith_fails(&home, &["daemon", "--relay", "/ip4/127.0.0.1/tcp/4201"])?;
    assert!(bad.contains("/p2p/"), "{bad}");
    let saved = kith_node::Settings::load(&home)?;
    assert!(saved.relays.is_empty(), "{:?}", saved.relays);

    // A relay nobody answers at: a warning, and `kith status` says why.
    let relay_peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let relay = format!("/ip4/127.0.0.1/tcp/9/p2p/{relay_peer}");
    let _daemon = start_daemon(&home, &["--relay", &relay]).await?;
    let health = wait_for("the relay reported failing", || async {
        let health = kith_json(&home, &["status", "--json"]).ok()?;
        health["relays"][0]["error"].is_string().then_some(health)
    })
    .await?;
    assert_eq!(health["relays"][0]["addr"], relay.as_str());
    assert_eq!(health["relays"][0]["connected"], false);
    let shown = stdout(&kith(&home, &["status"])?);
    assert!(shown.contains("FAILING"), "{shown}");
    let log = wait_for("the warning in the log", || async {
        let log = std::fs::read_to_string(home.join("daemon.log")).ok()?;
        log.contains("cannot reach home relay").then_some(log)
    })
    .await?;
    assert!(!log.contains('\u{1b}'), "no colours in a log file: {log}");
    let handed_out = kith(&home, &["id", "--invite"])?;
    assert!(stdout(&handed_out).starts_with("kith:"));
    assert!(
        stderr(&handed_out).contains("cannot reach the relay"),
        "{}",
        stderr(&handed_out)
    );

    // A second daemon on the same home says so once.
    let second = kith_fails(
        &home,
        &[
            "daemon",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ],
    )?;
    assert!(second.contains("already running"), "{second}");

    let demo = kith_fails(&home, &["demo"])?;
    assert!(demo.contains("no --home"), "{demo}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_daemon_across_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    for (home, name) in [(&a, "alice"), (&b, "bob")] {
        assert!(kith(home, &["init", "--name", name])?.status.success());
    }
    let mut alice = start_daemon(&a, &[]).await?;
    let _bob = start_daemon(&b, &[]).await?;
    let alice_addr = kith_json(&a, &["id", "--json"])?["listen_addrs"][0]
        .as_str()
        .expect("an address")
        .to_owned();
    let listen = alice_addr
        .split("/p2p/")
        .next()
        .expect("a transport address")
        .to_owned();
    let added = kith(
        &b,
        &[
            "contact",
            "add",
            "alice",
            &invite(&a)?,
            "--addr",
            &alice_addr,
        ],
    )?;
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(kith(&a, &["contact", "add", "bobby", &invite(&b)?])?
        .status
        .success());

    let mut events = Command::new(binary("kith")?)
        .args(["--home", path(&a), "events", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (lines_tx, lines) = std::sync::mpsc::channel::<(bool, String)>();
    for (is_err, pipe) in [
        (
            false,
            Box::new(events.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        ),
        (true, Box::new(events.stderr.take().expect("stderr"))),
    ] {
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((is_err, line));
            }
        });
    }
    let line_within = |want_err: bool, needle: &str, wait: std::time::Duration| {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok((is_err, line)) = lines.recv_timeout(left) {
                if is_err == want_err && line.contains(needle) {
                    return Some(line);
                }
            }
        }
        None
    };
    let next_line = |want_err: bool, needle: &str| -> anyhow::Result<String> {
        line_within(want_err, needle, kith_tests::DEADLINE)
            .ok_or_else(|| anyhow::anyhow!("no line with {needle:?}"))
    };
    // Bob types until alice's stream shows it: the stream is connected.
    let b = &b;
    let line_within = &line_within;
    let typed = |what: &'static str| async move {
        wait_for(what, || async {
            let _ = kith(b, &["typing", "alice"]);
            let line = line_within(false, "\"typing\"", std::time::Duration::from_secs(1))?;
            serde_json::from_str::<Value>(&line).ok()
        })
        .await
    };
    typed("typing shown").await?;
    assert!(alice.terminate()?.success());
    next_line(true, "waiting for it to come back")?;
    assert!(events.try_wait()?.is_none(), "kith events keeps running");
    let _alice = start_daemon(&a, &["--listen", &listen]).await?;
    next_line(true, "reconnected")?;
    let after = typed("typing shown after the restart").await?;
    assert_eq!(after["type"], "typing");
    assert_eq!(after["from_name"], "bobby", "alice's name for bob: {after}");
    events.kill()?;
    events.wait()?;
    Ok(())
}
