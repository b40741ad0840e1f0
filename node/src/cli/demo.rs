//! `kith demo`: a relay and three nodes (alice, bob, carol) on loopback in a temporary directory,
//! playing the features end to end as a readable transcript (or JSON events with `--json`).
//!
//! Every step checks what it shows: the demo waits for each tick, message and state with a
//! deadline and fails with a clear message, and a non-zero exit, when something did not happen.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kith_protocol::MessageState;
use libp2p::Multiaddr;
use serde_json::json;

use crate::{identity, Config, Node, NodeEvent, Running, Settings};

/// How long any step may take before the demo fails.
const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// Prints the transcript: human text, or one JSON event per line.
struct Transcript {
    json: bool,
    started: Instant,
}

impl Transcript {
    fn say(&self, kind: &str, text: &str, fields: serde_json::Value) {
        if self.json {
            let mut event = json!({ "type": kind, "text": text, "at_ms": self.started.elapsed().as_millis() as u64 });
            if let (Some(event), Some(fields)) = (event.as_object_mut(), fields.as_object()) {
                event.extend(fields.clone());
            }
            println!("{event}");
        } else if kind == "section" {
            println!("\n== {text}");
        } else {
            println!("   {text}");
        }
    }
}

fn tick(state: MessageState) -> &'static str {
    match state {
        MessageState::Pending => "… pending",
        MessageState::Failed => "✗ failed",
        MessageState::Sent => "✓ sent",
        MessageState::Delivered => "✓✓ delivered",
        MessageState::Read => "✓✓ read",
        MessageState::Expired => "✗ expired",
    }
}

/// One demo user: a home and, while online, a running node.
struct User {
    name: &'static str,
    config: Config,
    running: Option<Running>,
    addr: Option<Multiaddr>,
}

impl User {
    async fn create(root: &Path, name: &'static str, relay: &Multiaddr) -> Result<Self> {
        let home = root.join(name);
        identity::create(&home)?;
        Settings {
            name: name.into(),
            ..Settings::default()
        }
        .save(&home)?;
        let mut config = Config::loopback(&home);
        config.relays = vec![relay.clone()];
        let mut user = Self {
            name,
            config,
            running: None,
            addr: None,
        };
        user.start().await?;
        Ok(user)
    }

    async fn start(&mut self) -> Result<()> {
        let mut config = self.config.clone();
        if let Some(addr) = &self.addr {
            config.listen = vec![addr.clone()];
        }
        let running = crate::start(config)
            .await
            .with_context(|| format!("starting {}", self.name))?;
        self.addr = running.node.listen_addrs().await.into_iter().next();
        self.running = Some(running);
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    fn node(&self) -> Result<&Node> {
        self.running
            .as_ref()
            .map(|r| &r.node)
            .with_context(|| format!("{} is offline", self.name))
    }
}

/// Waits until `node`'s outgoing message `id` reaches `state`.
async fn wait_state(node: &Node, id: &str, state: MessageState) -> Result<()> {
    let mut events = node.subscribe();
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    loop {
        if node.status(id)?.state >= state {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => bail!("event stream closed: {e}"),
            Err(_) => bail!(
                "message {id} did not reach `{state}` within {}s (it is `{}`)",
                STEP_DEADLINE.as_secs(),
                node.status(id)?.state
            ),
        }
    }
}

/// Waits until one member's state of a group message reaches `state`.
async fn wait_member_state(node: &Node, id: &str, member: &str, state: MessageState) -> Result<()> {
    let mut events = node.subscribe();
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    loop {
        if node
            .status(id)?
            .members
            .get(member)
            .is_some_and(|s| *s >= state)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("member {member} did not reach `{state}` for {id}");
        }
        // One member's receipt changes no overall state, so no event may come: look again
        // after any event or a short while.
        let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
    }
}

/// Waits until `node` holds a message with `text` from `from`.
async fn wait_message(node: &Node, from: &str, text: &str) -> Result<()> {
    let mut events = node.subscribe();
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    loop {
        // The conversation may not exist yet (a group this node has not heard of so far).
        let arrived = node
            .messages(Some(from))
            .is_ok_and(|list| list.iter().any(|m| m.text == text));
        if arrived {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(NodeEvent::Message { .. })) | Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => bail!("event stream closed: {e}"),
            Err(_) => bail!(
                "{text:?} from {from} did not arrive within {}s",
                STEP_DEADLINE.as_secs()
            ),
        }
    }
}

/// Draws a small gradient picture as a PNG, standing in for a photo.
fn make_photo(path: &Path) -> Result<()> {
    // A gradient with grain, so that it weighs what a photo weighs (about 1 MiB as PNG).
    let mut grain: u32 = 0x2545_f491;
    let image = image::RgbImage::from_fn(800, 500, |x, y| {
        grain ^= grain << 13;
        grain ^= grain >> 17;
        grain ^= grain << 5;
        let noise = (grain % 64) as u8;
        image::Rgb([
            ((x * 190 / 800) as u8).saturating_add(noise),
            ((y * 120 / 500) as u8).saturating_add(noise / 2),
            90u8.saturating_add(noise),
        ])
    });
    image.save(path).context("writing the demo photo")?;
    Ok(())
}

/// Follows a download's progress (a bar on a terminal, events with `--json`) until the file is
/// on disk; returns its path.
async fn watch_download(
    t: &Transcript,
    node: &Node,
    events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    id: &str,
) -> Result<std::path::PathBuf> {
    use std::io::IsTerminal;
    let bar = (!t.json && std::io::stdout().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "   bob downloads [{bar:30}] {bytes}/{total_bytes}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let parsed: kith_protocol::MessageId = id.parse()?;
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    let mut last = (0, 0);
    loop {
        if let Some(path) = node.attachment(&parsed).and_then(|a| a.path) {
            if let Some(bar) = &bar {
                bar.finish();
                // The bar draws on stderr and leaves the cursor on its line.
                eprintln!();
            }
            if last.1 > 0 && bar.is_none() {
                t.say(
                    "progress",
                    &format!("bob downloaded {} of {} bytes", last.1, last.1),
                    json!({ "id": id, "done": last.1, "total": last.1 }),
                );
            }
            return Ok(path.into());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the photo did not download within {}s",
                STEP_DEADLINE.as_secs()
            );
        }
        match tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
            Ok(Ok(NodeEvent::Progress {
                id: got,
                done,
                total,
                ..
            })) if got == id => {
                last = (done, total);
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                } else if t.json {
                    t.say(
                        "progress",
                        "download",
                        json!({ "id": id, "done": done, "total": total }),
                    );
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                bail!("event stream closed")
            }
            _ => {}
        }
    }
}

/// Sends `text` and narrates its ticks up to `until`.
async fn send_and_watch(
    t: &Transcript,
    from: &User,
    to: &str,
    text: &str,
    until: MessageState,
) -> Result<String> {
    let node = from.node()?;
    let sent = node.send(to, text, None).await?;
    t.say(
        "send",
        &format!("{} → {to}: {text:?}  {}", from.name, tick(sent.state)),
        json!({ "from": from.name, "to": to, "id": sent.id, "state": sent.state }),
    );
    for state in [
        MessageState::Sent,
        MessageState::Delivered,
        MessageState::Read,
    ] {
        if state > until {
            break;
        }
        if state == MessageState::Sent && until > MessageState::Sent {
            // A direct delivery skips `sent`; only narrate it when it is the goal.
            continue;
        }
        wait_state(node, &sent.id, state).await?;
        t.say(
            "tick",
            &format!("{} sees {}", from.name, tick(node.status(&sent.id)?.state)),
            json!({ "id": sent.id, "state": node.status(&sent.id)?.state }),
        );
    }
    Ok(sent.id)
}

/// Runs the demo. Returns an error (and the caller exits non-zero) when any step fails.
pub async fn run(json_output: bool) -> Result<()> {
    let t = Transcript {
        json: json_output,
        started: Instant::now(),
    };
    let dir = tempfile::Builder::new().prefix("kith-demo-").tempdir()?;
    t.say(
        "section",
        "Starting a relay and three nodes on loopback",
        json!({ "dir": dir.path() }),
    );
    let relay = kith_relay::start(kith_relay::Config::ephemeral(dir.path().join("relay")))
        .await
        .context("starting the relay")?;
    let relay_addr = relay.listen_addrs[0].clone();
    t.say(
        "relay",
        &format!("relay {relay_addr}"),
        json!({ "addr": relay_addr.to_string() }),
    );
    let mut alice = User::create(dir.path(), "alice", &relay_addr).await?;
    let mut bob = User::create(dir.path(), "bob", &relay_addr).await?;
    let carol = User::create(dir.path(), "carol", &relay_addr).await?;
    for user in [&alice, &bob, &carol] {
        t.say(
            "node",
            &format!("{} is {}", user.name, user.node()?.peer_id()),
            json!({ "name": user.name, "peer_id": user.node()?.peer_id().to_string() }),
        );
    }
    // Everyone adds everyone from their invites (which carry the relay).
    let users = [&alice, &bob, &carol];
    for a in users {
        for b in users {
            if a.name != b.name {
                let invite = b.node()?.invite().encode();
                let addrs: Vec<String> = b.addr.iter().map(|a| a.to_string()).collect();
                a.node()?.add_contact(b.name, &invite, &addrs).await?;
            }
        }
    }

    t.say("section", "A one-to-one conversation", json!({}));
    let id = send_and_watch(
        &t,
        &alice,
        "bob",
        "Hi Bob! Coffee later?",
        MessageState::Delivered,
    )
    .await?;
    wait_message(bob.node()?, "alice", "Hi Bob! Coffee later?").await?;
    t.say("read", "bob opens the chat", json!({ "who": "bob" }));
    bob.node()?.read("alice").await?;
    wait_state(alice.node()?, &id, MessageState::Read).await?;
    t.say(
        "tick",
        &format!("alice sees {}", tick(MessageState::Read)),
        json!({ "id": id, "state": "read" }),
    );
    send_and_watch(&t, &bob, "alice", "Sure, 4pm?", MessageState::Delivered).await?;

    t.say(
        "section",
        "Presence and typing; Bob goes offline and the relay holds his messages",
        json!({}),
    );
    let seen = alice.node()?.presence("bob").await?;
    if !seen.online {
        bail!("alice should see bob online, she sees {seen:?}");
    }
    t.say(
        "presence",
        "alice sees bob online",
        json!({ "who": "bob", "online": true }),
    );
    let mut alice_events = alice.node()?.subscribe();
    bob.node()?.typing("alice").await?;
    let bob_id = bob.node()?.peer_id().to_string();
    tokio::time::timeout(STEP_DEADLINE, async {
        loop {
            match alice_events.recv().await {
                Ok(NodeEvent::Typing { from, .. }) if from == bob_id => return Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    bail!("event stream closed")
                }
                _ => {}
            }
        }
    })
    .await
    .context("bob's typing notice did not arrive")??;
    t.say(
        "typing",
        "alice sees: bob is typing…",
        json!({ "who": "bob" }),
    );
    bob.stop().await;
    t.say("offline", "bob stops his node", json!({ "who": "bob" }));
    let stopped = Instant::now();
    let seen = loop {
        let seen = alice.node()?.presence("bob").await?;
        if !seen.online {
            break seen;
        }
        if stopped.elapsed() > STEP_DEADLINE {
            bail!(
                "bob still shows online {}s after he stopped",
                STEP_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ago = seen
        .last_seen_ms
        .map(|at| {
            format!(
                "last seen {:.1} s ago",
                crate::clock::now_ms().saturating_sub(at) as f64 / 1000.0
            )
        })
        .unwrap_or_else(|| "last seen hidden".into());
    t.say(
        "presence",
        &format!(
            "alice sees bob offline after {:.1} s, {ago}",
            stopped.elapsed().as_secs_f64()
        ),
        json!({ "who": "bob", "online": false, "last_seen_ms": seen.last_seen_ms }),
    );
    let id = send_and_watch(&t, &alice, "bob", "4pm works. See you!", MessageState::Sent).await?;
    t.say(
        "online",
        "bob starts his node again",
        json!({ "who": "bob" }),
    );
    bob.start().await?;
    wait_message(bob.node()?, "alice", "4pm works. See you!").await?;
    t.say(
        "catch-up",
        "bob fetched his mailbox from the relay",
        json!({ "who": "bob" }),
    );
    wait_state(alice.node()?, &id, MessageState::Delivered).await?;
    t.say(
        "tick",
        &format!("alice sees {}", tick(MessageState::Delivered)),
        json!({ "id": id, "state": "delivered" }),
    );
    bob.node()?.read("alice").await?;
    wait_state(alice.node()?, &id, MessageState::Read).await?;
    t.say(
        "tick",
        &format!("alice sees {}", tick(MessageState::Read)),
        json!({ "id": id, "state": "read" }),
    );

    t.say(
        "section",
        "A group of three with per-member ticks",
        json!({}),
    );
    let group = alice
        .node()?
        .create_group("trio", &["bob".to_owned(), "carol".to_owned()])
        .await?;
    t.say(
        "group",
        &format!(
            "alice creates {:?} with bob and carol ({} members)",
            group.name,
            group.members.len()
        ),
        json!({ "group_id": group.group_id, "members": group.members }),
    );
    let sent = alice
        .node()?
        .send(&group.group_id, "Dinner on Friday?", None)
        .await?;
    t.say(
        "send",
        &format!("alice → trio: \"Dinner on Friday?\"  {}", tick(sent.state)),
        json!({ "from": "alice", "to": "trio", "id": sent.id, "state": sent.state }),
    );
    for user in [&bob, &carol] {
        wait_message(user.node()?, &group.group_id, "Dinner on Friday?").await?;
    }
    wait_state(alice.node()?, &sent.id, MessageState::Delivered).await?;
    let names = [(&bob, "bob"), (&carol, "carol")];
    let show_members = |node: &Node| -> Result<()> {
        let status = node.status(&sent.id)?;
        for (user, name) in names {
            let state = status
                .members
                .get(&user.node()?.peer_id().to_string())
                .copied()
                .unwrap_or_default();
            t.say(
                "member",
                &format!("  {name}: {}", tick(state)),
                json!({ "id": sent.id, "member": name, "state": state }),
            );
        }
        t.say(
            "tick",
            &format!("message: {}", tick(status.state)),
            json!({ "id": sent.id, "state": status.state }),
        );
        Ok(())
    };
    show_members(alice.node()?)?;
    t.say("read", "bob opens the group", json!({ "who": "bob" }));
    bob.node()?.read(&group.group_id).await?;
    wait_member_state(
        alice.node()?,
        &sent.id,
        &bob.node()?.peer_id().to_string(),
        MessageState::Read,
    )
    .await?;
    show_members(alice.node()?)?;
    t.say("read", "carol opens the group", json!({ "who": "carol" }));
    carol.node()?.read(&group.group_id).await?;
    wait_state(alice.node()?, &sent.id, MessageState::Read).await?;
    show_members(alice.node()?)?;

    t.say("section", "Alice shares a photo with Bob", json!({}));
    let photo = dir.path().join("sunset.png");
    make_photo(&photo)?;
    let original = std::fs::read(&photo)?;
    let mut bob_events = bob.node()?.subscribe();
    let sent = alice.node()?.send_file("bob", &photo).await?;
    t.say(
        "send",
        &format!(
            "alice → bob: sunset.png ({})  {}",
            indicatif::HumanBytes(original.len() as u64),
            tick(sent.state)
        ),
        json!({ "from": "alice", "to": "bob", "id": sent.id, "file": "sunset.png", "size": original.len() }),
    );
    let path = watch_download(&t, bob.node()?, &mut bob_events, &sent.id).await?;
    let received = std::fs::read(&path)?;
    if received != original {
        bail!("bob's copy of the photo differs from alice's");
    }
    let view = bob
        .node()?
        .attachment(&sent.id.parse()?)
        .context("bob has no attachment record")?;
    t.say(
        "file",
        &format!(
            "bob has {} ({}, {} bytes, BLAKE3 {}…), identical to alice's{}",
            view.name,
            view.mime,
            view.size,
            &view.hash[..16],
            if view.thumbnail.is_some() { "; the message carried a thumbnail" } else { "" }
        ),
        json!({ "id": sent.id, "path": path, "hash": view.hash, "thumbnail": view.thumbnail.is_some() }),
    );
    wait_state(alice.node()?, &sent.id, MessageState::Delivered).await?;
    t.say(
        "tick",
        &format!("alice sees {}", tick(MessageState::Delivered)),
        json!({ "id": sent.id, "state": "delivered" }),
    );

    t.say("section", "Done: every step above was checked", json!({}));
    for user in [&mut alice, &mut bob] {
        user.stop().await;
    }
    let mut carol = carol;
    carol.stop().await;
    relay.shutdown().await.context("stopping the relay")?;
    Ok(())
}
