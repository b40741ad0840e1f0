//! `kith chat timer` and `kith export`: a conversation's disappearing-message timer and a
//! permanent chat's history.

use anyhow::Result;
use serde_json::{json, Value};

use super::urlencode;
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
    let path = format!("/v1/chats/{}/timer", urlencode(with));
    let view: Value = match duration {
        Some(duration) => {
            let mut body = json!({ "duration": duration });
            if let Some(admins_only) = admins_only {
                body["admins_only"] = json!(admins_only);
            }
            client.post(&path, &body).await?
        }
        None => client.get(&path).await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let secs = view["timer_secs"].as_u64();
    let rule = if view["admins_only"].as_bool() == Some(true) {
        " (admins only may change it)"
    } else {
        ""
    };
    println!(
        "disappearing messages with {with}: {}{rule}",
        kith_protocol::timer::Display(secs)
    );
    Ok(())
}

/// `kith export WITH [--json]`: the export format (JSON lines: a header line, then one
/// line per message) on standard output, or one JSON document with `--json`.
pub async fn export(client: &Client, with: &str, json: bool) -> Result<()> {
    let export: Value = client
        .get(&format!("/v1/chats/{}/export", urlencode(with)))
        .await?;
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
