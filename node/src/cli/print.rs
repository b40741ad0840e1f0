//! What the `kith` command line prints for a person (JSON output is printed as it comes): message
//! lists with authors, local times and unread marks, one readable line per event, the node's
//! health. Everything another person wrote goes through [`crate::text::for_terminal`].

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Local, TimeZone};
use serde_json::Value;

use crate::text::for_terminal;

/// The mark of a received message not read yet.
const UNREAD: &str = "●";

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// A peer id shortened for display (the full id is in `--json`).
fn short_id(id: &str) -> String {
    match id.char_indices().nth(12) {
        Some((at, _)) => format!("{}…", &id[..at]),
        None => id.to_owned(),
    }
}

/// The tick of an outgoing message's state.
pub fn tick(state: &str) -> &'static str {
    match state {
        "sent" => "✓",
        "delivered" => "✓✓",
        "read" => "✓✓ read",
        "failed" => "✗ failed",
        "expired" => "✗ expired",
        _ => "… pending",
    }
}

/// A unix time in ms as local time: the time alone today, with the date otherwise.
pub fn local_time(ms: u64) -> String {
    let Some(at) = i64::try_from(ms)
        .ok()
        .and_then(|ms| Local.timestamp_millis_opt(ms).single())
    else {
        return "?".into();
    };
    format_local(at, Local::now())
}

fn format_local(at: DateTime<Local>, now: DateTime<Local>) -> String {
    if at.date_naive() == now.date_naive() {
        at.format("%H:%M").to_string()
    } else if at.year() == now.year() {
        at.format("%b %d %H:%M").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M").to_string()
    }
}

/// How long ago a unix time in ms was, in words.
pub fn ago(ms: u64) -> String {
    let ago = crate::clock::now_ms().saturating_sub(ms) / 1000;
    match ago {
        0..=59 => format!("{ago} s ago"),
        60..=3599 => format!("{} min ago", ago / 60),
        3600..=86399 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86400),
    }
}

/// The author of a message as shown: `you`, the contact's name, or a short peer id.
fn author(m: &Value) -> String {
    if m["direction"] == "out" {
        return "you".into();
    }
    match m["from_name"].as_str() {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(str_of(m, "from")),
    }
}

/// The name of a message's conversation as shown.
fn conversation_name(m: &Value) -> String {
    let name = match m["conversation_name"].as_str() {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(str_of(m, "conversation")),
    };
    if m["group"].is_string() {
        format!("#{name}")
    } else {
        name
    }
}

/// One message as a line: local time, unread mark, author, text, and the tick of one's own.
fn message_line(m: &Value) -> String {
    let out = m["direction"] == "out";
    let file = &m["attachment"];
    let text = for_terminal(str_of(m, "text"));
    let body = if file.is_object() {
        format!(
            "[file {} ({} bytes, {}){}] {}",
            for_terminal(str_of(file, "name")),
            file["size"],
            str_of(m, "id"),
            file["path"]
                .as_str()
                .map(|p| format!(" at {}", for_terminal(p)))
                .unwrap_or_else(|| " not downloaded".into()),
            text,
        )
    } else {
        text.into_owned()
    };
    let unread = !out && m["state"] != "read";
    let mut line = format!(
        "{:>12} {} {}: {}",
        local_time(m["sent_at_ms"].as_u64().unwrap_or(0)),
        if unread { UNREAD } else { " " },
        author(m),
        body
    );
    if out {
        line.push_str("  ");
        line.push_str(tick(str_of(m, "state")));
    }
    line
}

/// Prints a list of messages: one conversation as it is, or every message grouped by
/// conversation (the most recently active last, nearest the prompt), each under its name with
/// its unread count.
pub fn print_messages(messages: &Value, one_conversation: bool) {
    let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
    if one_conversation {
        for m in list {
            println!("{}", message_line(m));
        }
        return;
    }
    let mut conversations: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for m in list {
        conversations
            .entry(str_of(m, "conversation"))
            .or_default()
            .push(m);
    }
    let mut ordered: Vec<Vec<&Value>> = conversations.into_values().collect();
    ordered.sort_by_key(|ms| {
        ms.iter()
            .filter_map(|m| m["sent_at_ms"].as_u64())
            .max()
            .unwrap_or(0)
    });
    for (i, ms) in ordered.iter().enumerate() {
        let Some(first) = ms.first() else { continue };
        let unread = ms
            .iter()
            .filter(|m| m["direction"] == "in" && m["state"] != "read")
            .count();
        if i > 0 {
            println!();
        }
        match unread {
            0 => println!("── {} ──", conversation_name(first)),
            n => println!("── {} ({n} unread) ──", conversation_name(first)),
        }
        for m in ms {
            println!("{}", message_line(m));
        }
    }
}

/// One event of the stream as a line for a person, or `None` for events not worth a line
/// (file progress short of the end).
pub fn event_line(event: &Value) -> Option<String> {
    let now = local_time(crate::clock::now_ms());
    let name_or_id = |name: &str, id: &str| match event[name].as_str() {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(str_of(event, id)),
    };
    let line = match str_of(event, "type") {
        "message" => {
            let place = match event["group"].is_string() {
                true => format!("#{}: ", name_or_id("conversation_name", "conversation")),
                false => String::new(),
            };
            format!(
                "{now} {place}{}: {}",
                name_or_id("from_name", "from"),
                for_terminal(str_of(event, "text"))
            )
        }
        "receipt" => {
            let place = match event["group"].as_str() {
                Some(group) => format!(" in #{}", short_id(group)),
                None => String::new(),
            };
            format!(
                "{now} {} {} by {}{place} (message {})",
                tick(str_of(event, "state")),
                str_of(event, "state"),
                name_or_id("peer_name", "peer"),
                str_of(event, "id")
            )
        }
        "typing" => format!("{now} {} is typing…", name_or_id("from_name", "from")),
        "request" => format!(
            "{now} a message request from {} (`kith requests` lists it)",
            name_or_id("name", "peer_id")
        ),
        "failed" => format!(
            "{now} message {} failed: {}",
            str_of(event, "id"),
            for_terminal(str_of(event, "reason"))
        ),
        "progress" => {
            let (done, total) = (event["done"].as_u64()?, event["total"].as_u64()?);
            if done < total {
                return None;
            }
            format!(
                "{now} {} of message {} complete ({total} bytes)",
                str_of(event, "direction"),
                str_of(event, "id")
            )
        }
        _ => format!("{now} {}", for_terminal(&event.to_string())),
    };
    Some(line)
}

/// Prints the node's health (`GET /v1/health`).
pub fn print_health(health: &Value) {
    println!(
        "node:     {} ({})",
        for_terminal(str_of(health, "name")),
        str_of(health, "peer_id")
    );
    let relays = health["relays"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if relays.is_empty() {
        println!("relays:   none (only direct connections; `kith daemon --relay ADDR` adds one)");
    }
    for relay in relays {
        let since = relay["since_ms"]
            .as_u64()
            .map(|ms| format!(" since {}", ago(ms)))
            .unwrap_or_default();
        let state = if relay["connected"] == true {
            let reserved = match relay["reserved"] == true {
                true => "reservation held",
                false => "no reservation yet",
            };
            format!("connected{since}, {reserved}")
        } else {
            match relay["error"].as_str() {
                Some(error) => format!("FAILING{since}: {}", for_terminal(error)),
                None => format!("not connected{since}"),
            }
        };
        println!("relay:    {} {state}", str_of(relay, "addr"));
    }
    println!("outbox:   {} waiting", health["pending_outbox"]);
    match health["last_mailbox_fetch_ms"].as_u64() {
        Some(ms) => println!("mailbox:  last fetched {}", ago(ms)),
        None => println!("mailbox:  not fetched yet"),
    }
    for contact in health["contacts"].as_array().into_iter().flatten() {
        println!(
            "contact:  {} {}",
            for_terminal(str_of(contact, "name")),
            str_of(contact, "path")
        );
    }
}

/// Prints the settings in effect (`GET /v1/settings`, or the file's when no daemon runs).
pub fn print_settings(settings: &Value) {
    println!("name:          {}", for_terminal(str_of(settings, "name")));
    println!("presence:      {}", str_of(settings, "presence"));
    println!(
        "read receipts: {}",
        if settings["read_receipts"] == true {
            "on"
        } else {
            "off"
        }
    );
    if let Some(reach) = settings["reach"].as_str() {
        println!("reach:         {reach}");
    }
    for relay in settings["relays"].as_array().into_iter().flatten() {
        println!("relay:         {}", relay.as_str().unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_line_neutralises_what_others_wrote() {
        let m = json!({
            "id": "x", "direction": "in", "from": "12D3KooWabc", "from_name": "eve\u{1b}[2J",
            "text": "\u{1b}[31mRED\u{1b}[0m \u{7}\u{202E}abc\nfake line", "sent_at_ms": 0,
            "state": "delivered",
        });
        let line = message_line(&m);
        assert!(!line.chars().any(crate::text::is_unsafe_char), "{line:?}");
        assert!(line.contains("eve\\u{1b}[2J: \\u{1b}[31mRED"));
        assert!(line.contains(UNREAD));
    }

    #[test]
    fn own_messages_show_their_tick_and_no_unread_mark() {
        let m = json!({
            "id": "x", "direction": "out", "from": "me", "text": "hi", "sent_at_ms": 0,
            "state": "delivered",
        });
        let line = message_line(&m);
        assert!(line.ends_with("you: hi  ✓✓"), "{line}");
        assert!(!line.contains(UNREAD));
    }

    #[test]
    fn times_show_the_date_unless_today() {
        let now = Local
            .with_ymd_and_hms(2026, 5, 10, 15, 0, 0)
            .single()
            .expect("a time");
        let same_day = Local
            .with_ymd_and_hms(2026, 5, 10, 9, 5, 0)
            .single()
            .expect("a time");
        let earlier = Local
            .with_ymd_and_hms(2026, 2, 1, 9, 5, 0)
            .single()
            .expect("a time");
        let last_year = Local
            .with_ymd_and_hms(2025, 2, 1, 9, 5, 0)
            .single()
            .expect("a time");
        assert_eq!(format_local(same_day, now), "09:05");
        assert_eq!(format_local(earlier, now), "Feb 01 09:05");
        assert_eq!(format_local(last_year, now), "2025-02-01 09:05");
    }

    #[test]
    fn event_lines_say_where_and_who() {
        let e = json!({
            "type": "message", "id": "m", "from": "p", "text": "hi\u{7}", "sent_at_ms": 0,
            "conversation": "g", "group": "g", "from_name": "ann",
            "conversation_name": "friends",
        });
        let line = event_line(&e).expect("a line");
        assert!(line.ends_with("#friends: ann: hi\\u{7}"), "{line}");
        let progress =
            json!({"type": "progress", "id": "m", "direction": "upload", "done": 1, "total": 2});
        assert_eq!(event_line(&progress), None);
    }
}
