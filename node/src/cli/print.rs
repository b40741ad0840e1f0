//! What the `kith` command line prints for a person (JSON output is printed as it comes): message
//! lists with authors, local times and unread marks, one readable line per event, the node's
//! health. Everything another person wrote goes through [`crate::text::for_terminal`].

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Local, TimeZone};
use kith_protocol::MessageState;
use serde_json::Value;

use crate::config::SettingsView;
use crate::core::store::Direction;
use crate::core::{MessageView, NodeEvent};
use crate::health::HealthView;
use crate::text::for_terminal;

/// The mark of a received message not read yet.
const UNREAD: &str = "●";

/// A peer id shortened for display (the full id is in `--json`).
fn short_id(id: &str) -> String {
    match id.char_indices().nth(12) {
        Some((at, _)) => format!("{}…", &id[..at]),
        None => id.to_owned(),
    }
}

/// The tick of an outgoing message's state.
pub fn tick(state: MessageState) -> &'static str {
    match state {
        MessageState::Sent => "✓",
        MessageState::Delivered => "✓✓",
        MessageState::Read => "✓✓ read",
        MessageState::Failed => "✗ failed",
        MessageState::Expired => "✗ expired",
        MessageState::Pending => "… pending",
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
fn author(m: &MessageView) -> String {
    if m.direction == Direction::Out {
        return "you".into();
    }
    match &m.from_name {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(&m.from),
    }
}

/// The name of a message's conversation as shown.
fn conversation_name(m: &MessageView) -> String {
    let name = match &m.conversation_name {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(&m.conversation),
    };
    if m.group.is_some() {
        format!("#{name}")
    } else {
        name
    }
}

/// One message as a line: local time, unread mark, author, text, and the tick of one's own.
fn message_line(m: &MessageView) -> String {
    let out = m.direction == Direction::Out;
    let text = for_terminal(&m.text);
    let body = match &m.attachment {
        Some(file) => format!(
            "[file {} ({} bytes, {}){}] {}",
            for_terminal(&file.name),
            file.size,
            m.id,
            file.path
                .as_deref()
                .map(|p| format!(" at {}", for_terminal(p)))
                .unwrap_or_else(|| " not downloaded".into()),
            text,
        ),
        None => text.into_owned(),
    };
    let unread = !out && m.state != MessageState::Read;
    let mut line = format!(
        "{:>12} {} {}: {}",
        local_time(m.sent_at_ms),
        if unread { UNREAD } else { " " },
        author(m),
        body
    );
    if out {
        line.push_str("  ");
        line.push_str(tick(m.state));
    }
    line
}

/// Prints a list of messages: one conversation as it is, or every message grouped by
/// conversation (the most recently active last, nearest the prompt), each under its name with
/// its unread count.
pub fn print_messages(list: &[MessageView], one_conversation: bool) {
    if one_conversation {
        for m in list {
            println!("{}", message_line(m));
        }
        return;
    }
    let mut conversations: BTreeMap<&str, Vec<&MessageView>> = BTreeMap::new();
    for m in list {
        conversations.entry(&m.conversation).or_default().push(m);
    }
    let mut ordered: Vec<Vec<&MessageView>> = conversations.into_values().collect();
    ordered.sort_by_key(|ms| ms.iter().map(|m| m.sent_at_ms).max().unwrap_or(0));
    for (i, ms) in ordered.iter().enumerate() {
        let Some(first) = ms.first() else { continue };
        let unread = ms
            .iter()
            .filter(|m| m.direction == Direction::In && m.state != MessageState::Read)
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
/// (file progress short of the end). Events without a line of their own, and any this
/// version does not know, show as their JSON.
pub fn event_line(event: &Value) -> Option<String> {
    let now = local_time(crate::clock::now_ms());
    let name_or_id = |name: &Option<String>, id: &str| match name {
        Some(name) => for_terminal(name).into_owned(),
        None => short_id(id),
    };
    let Ok(typed) = serde_json::from_value::<NodeEvent>(event.clone()) else {
        return Some(format!("{now} {}", for_terminal(&event.to_string())));
    };
    let line = match typed {
        NodeEvent::Message {
            from,
            text,
            conversation,
            group,
            from_name,
            conversation_name,
            ..
        } => {
            let place = match group {
                Some(_) => format!("#{}: ", name_or_id(&conversation_name, &conversation)),
                None => String::new(),
            };
            format!(
                "{now} {place}{}: {}",
                name_or_id(&from_name, &from),
                for_terminal(&text)
            )
        }
        NodeEvent::Receipt {
            id,
            peer,
            state,
            group,
            peer_name,
            ..
        } => {
            let place = match group {
                Some(group) => format!(" in #{}", short_id(&group)),
                None => String::new(),
            };
            format!(
                "{now} {} {state} by {}{place} (message {id})",
                tick(state),
                name_or_id(&peer_name, &peer),
            )
        }
        NodeEvent::Typing { from, from_name } => {
            format!("{now} {} is typing…", name_or_id(&from_name, &from))
        }
        NodeEvent::Request { peer_id, name } => format!(
            "{now} a message request from {} (`kith requests` lists it)",
            name_or_id(&name, &peer_id)
        ),
        NodeEvent::GroupInvitation {
            group_id,
            name,
            inviter,
        } => format!(
            "{now} {} (not a contact) added you to the group {} — `kith group accept {group_id}` joins it, `kith group decline {group_id}` leaves it",
            short_id(&inviter),
            for_terminal(&name)
        ),
        NodeEvent::Failed { id, reason } => {
            format!("{now} message {id} failed: {}", for_terminal(&reason))
        }
        NodeEvent::Progress {
            id,
            direction,
            done,
            total,
        } => {
            if done < total {
                return None;
            }
            format!("{now} {direction} of message {id} complete ({total} bytes)")
        }
        _ => format!("{now} {}", for_terminal(&event.to_string())),
    };
    Some(line)
}

/// Prints the node's health (`GET /v1/health`).
pub fn print_health(health: &HealthView) {
    println!(
        "node:     {} ({})",
        for_terminal(&health.name),
        health.peer_id
    );
    if health.relays.is_empty() {
        println!("relays:   none (only direct connections; `kith daemon --relay ADDR` adds one)");
    }
    for relay in &health.relays {
        let since = relay
            .since_ms
            .map(|ms| format!(" since {}", ago(ms)))
            .unwrap_or_default();
        let state = if relay.connected {
            let reserved = match relay.reserved {
                true => "reservation held",
                false => "no reservation yet",
            };
            format!("connected{since}, {reserved}")
        } else {
            match &relay.error {
                Some(error) => format!("FAILING{since}: {}", for_terminal(error)),
                None => format!("not connected{since}"),
            }
        };
        println!("relay:    {} {state}", relay.addr);
    }
    println!("outbox:   {} waiting", health.pending_outbox);
    match health.last_mailbox_fetch_ms {
        Some(ms) => println!("mailbox:  last fetched {}", ago(ms)),
        None => println!("mailbox:  not fetched yet"),
    }
    for contact in &health.contacts {
        println!("contact:  {} {}", for_terminal(&contact.name), contact.path);
    }
}

/// Prints the settings in effect (`GET /v1/settings`, or the file's when no daemon runs).
pub fn print_settings(settings: &SettingsView) {
    println!("name:          {}", for_terminal(&settings.name));
    println!("presence:      {}", settings.presence);
    println!(
        "read receipts: {}",
        if settings.read_receipts { "on" } else { "off" }
    );
    println!("reach:         {}", settings.reach);
    for relay in &settings.relays {
        println!("relay:         {relay}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A message as the API's JSON gives it.
    fn message(json: Value) -> MessageView {
        serde_json::from_value(json).expect("a message view")
    }

    #[test]
    fn a_message_line_neutralises_what_others_wrote() {
        let m = message(json!({
            "id": "x", "direction": "in", "from": "12D3KooWabc", "from_name": "eve\u{1b}[2J",
            "text": "\u{1b}[31mRED\u{1b}[0m \u{7}\u{202E}abc\nfake line", "sent_at_ms": 0,
            "state": "delivered", "peer": "12D3KooWabc", "conversation": "12D3KooWabc",
        }));
        let line = message_line(&m);
        assert!(!line.chars().any(crate::text::is_unsafe_char), "{line:?}");
        assert!(line.contains("eve\\u{1b}[2J: \\u{1b}[31mRED"));
        assert!(line.contains(UNREAD));
    }

    #[test]
    fn own_messages_show_their_tick_and_no_unread_mark() {
        let m = message(json!({
            "id": "x", "direction": "out", "from": "me", "text": "hi", "sent_at_ms": 0,
            "state": "delivered", "peer": "you", "conversation": "you",
        }));
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
        let receipt = json!({
            "type": "receipt", "id": "m", "peer": "12D3KooWabcdefghijk", "state": "read",
            "conversation": "g", "group": "g", "peer_name": null,
        });
        let line = event_line(&receipt).expect("a line");
        assert!(
            line.ends_with("✓✓ read read by 12D3KooWabcd… in #g (message m)"),
            "{line}"
        );
        // An event this version does not know shows as its JSON, made safe.
        let unknown = json!({"type": "later", "text": "\u{7}"});
        let line = event_line(&unknown).expect("a line");
        assert!(
            line.ends_with(r#"{"text":"\u0007","type":"later"}"#),
            "{line}"
        );
    }
}
