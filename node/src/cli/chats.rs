//! `kith chat timer` and `kith export`: a conversation's disappearing-message timer and a
//! permanent chat's history.

use anyhow::Result;
use serde_json::Value;

use super::show;
use crate::api::chats::TimerBody;
use crate::api::client::Client;

/// `kith chat timer WITH DURATION|off [--admins-only|--everyone] [--json]`; without a
/// duration, shows the timer.
pub async fn timer(
    client: &Client,
    with: &str,
    duration: Option<&str>,
    admins_only: Option<bool>,
    json: bool,
) -> Result<()> {
    let set = duration.map(|duration| TimerBody {
        duration: duration.to_owned(),
        admins_only,
    });
    show(client.timer(with, set.as_ref()).await?, json, |view| {
        let rule = if view.admins_only {
            " (admins only may change it)"
        } else {
            ""
        };
        println!(
            "disappearing messages with {with}: {}{rule}",
            kith_protocol::timer::Display(view.timer_secs)
        );
        Ok(())
    })
}

/// `kith export WITH [--json]`: the export format (JSON lines: a header line, then one
/// line per message) on standard output, or one JSON document with `--json`.
pub async fn export(client: &Client, with: &str, json: bool) -> Result<()> {
    // The export is a document format of its own: its JSON is the output either way.
    let export = client.export(with).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&export)?);
        return Ok(());
    }
    let mut header = export.clone();
    let messages = header
        .as_object_mut()
        .and_then(|o| o.remove("messages"))
        .unwrap_or(Value::Array(Vec::new()));
    println!("{}", serde_json::to_string(&header)?);
    for message in messages.as_array().into_iter().flatten() {
        println!("{}", serde_json::to_string(message)?);
    }
    Ok(())
}
