//! `kith send`, `messages`, `read`, `status`, `presence`, `typing` and `events`: conversations
//! and the state of each message.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use kith_protocol::MessageState;
use serde_json::Value;

use super::print::{ago, tick};
use super::{daemon_client, print_json, show};
use crate::api::client::Client;
use crate::api::SendBody;
use crate::text::for_terminal;

/// `kith send TO TEXT [--json]`: prints the id, and the state on stderr.
pub async fn send(home: &Path, to: String, text: String, json: bool) -> Result<()> {
    let text = if text == "-" {
        read_stdin_text()?
    } else {
        text
    };
    let client = daemon_client(home)?;
    let body = SendBody {
        to,
        text,
        wait_ms: 2000,
    };
    let answer = client.send(&body).await?;
    if json {
        print_json(answer.json())?;
    }
    let sent = answer.decode()?;
    if !json {
        println!("{}", sent.id);
        match sent.state {
            MessageState::Pending => eprintln!(
                "pending: not reachable yet; kith keeps trying (`kith status {}`)",
                sent.id
            ),
            state => eprintln!("{state} {}", tick(state)),
        }
    }
    if let Some(note) = &sent.note {
        eprintln!("note: {note}");
    }
    Ok(())
}

/// `kith messages [WITH] [--json]`.
pub async fn messages(client: &Client, with: Option<String>, json: bool) -> Result<()> {
    show(client.messages(with.as_deref()).await?, json, |messages| {
        super::print::print_messages(&messages, with.is_some());
        Ok(())
    })
}

/// `kith read WITH`.
pub async fn read(client: &Client, with: String) -> Result<()> {
    let read = client.read(&with).await?.decode()?;
    println!("marked {} message(s) read", read.read);
    Ok(())
}

/// `kith status [ID] [--json]`: a message's state, or without an id the node's health.
pub async fn status(client: &Client, id: Option<String>, json: bool) -> Result<()> {
    let Some(id) = id else {
        return show(client.health().await?, json, |health| {
            super::print::print_health(&health);
            Ok(())
        });
    };
    show(client.status(&id).await?, json, |status| {
        println!("{}", status.state);
        // By peer id, as the JSON document lists them.
        let members: BTreeMap<_, _> = status.members.iter().collect();
        for (peer, state) in members {
            let who = match status.member_names.get(peer) {
                Some(name) => format!("{} ({peer})", for_terminal(name)),
                None => peer.clone(),
            };
            println!("  {who}  {state}");
        }
        if let Some(reason) = &status.reason {
            let why = match status.state {
                MessageState::Failed => "failed because",
                _ => "pending because",
            };
            println!("{why}: {reason}");
        }
        Ok(())
    })
}

/// `kith presence WHO [--json]`.
pub async fn presence(client: &Client, who: String, json: bool) -> Result<()> {
    show(client.presence(&who).await?, json, |seen| {
        match (seen.online, seen.last_seen_ms) {
            (true, _) => println!("online"),
            (false, Some(ms)) => println!("offline, last seen {}", ago(ms)),
            (false, None) => println!("offline (last seen unknown or hidden)"),
        }
        Ok(())
    })
}

/// `kith typing TO`.
pub async fn typing(client: &Client, to: String) -> Result<()> {
    if !client.typing(&to).await?.decode()?.sent {
        eprintln!("{to} is not reachable right now; nothing was sent");
    }
    Ok(())
}

/// `kith events [--json]`.
pub async fn events(home: &Path, json: bool) -> Result<()> {
    follow_events(home, json).await
}

/// The text of `kith send TO -`: standard input, one final line break dropped.
fn read_stdin_text() -> Result<String> {
    use std::io::Read as _;
    let max = kith_protocol::limits::MAX_TEXT_BYTES;
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(max as u64 + 2)
        .read_to_end(&mut bytes)
        .context("reading the text from standard input")?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.len() > max {
        anyhow::bail!(
            "the text on standard input is over {max} bytes, the most a message holds; send it as a file with `kith send-file`"
        );
    }
    String::from_utf8(bytes).context("the text on standard input is not UTF-8")
}

/// How often `kith events` looks for a daemon that went away.
const EVENTS_RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `kith events`: prints events until the process is stopped; when the daemon goes away, says
/// so on stderr and waits for it to come back.
async fn follow_events(home: &Path, json: bool) -> Result<()> {
    use std::io::IsTerminal as _;
    let readable = !json && std::io::stdout().is_terminal();
    let print = |event: Value| {
        if readable {
            if let Some(line) = super::print::event_line(&event) {
                println!("{line}");
            }
        } else {
            println!("{event}");
        }
    };
    // The first connection must work: a mistyped --home should not wait forever.
    let mut client = daemon_client(home)?;
    loop {
        match client.events(&print).await {
            Ok(()) => {
                eprintln!("kith: the daemon stopped; waiting for it to come back (Ctrl-C to quit)")
            }
            Err(e) => eprintln!(
                "kith: lost the daemon ({e}); waiting for it to come back (Ctrl-C to quit)"
            ),
        }
        client = loop {
            tokio::time::sleep(EVENTS_RECONNECT_INTERVAL).await;
            if let Ok(client) = Client::for_home(home) {
                if client.id().await.is_ok() {
                    break client;
                }
            }
        };
        eprintln!("kith: reconnected to the daemon (events in between were not shown)");
    }
}
