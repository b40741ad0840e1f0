//! `kith contact …` (add, list, remove, rename, block, unblock, verify) and `kith requests …`
//! (messages from strangers: list, accept, block).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::args::ContactCommand;
use super::{print_json, urlencode};
use crate::api::client::Client;
use crate::text::for_terminal;

/// Runs one `kith contact` command.
pub async fn contact(client: &Client, command: ContactCommand) -> Result<()> {
    match command {
        ContactCommand::Add {
            name,
            peer_id_or_invite,
            addr,
        } => {
            let addrs: Vec<String> = addr.iter().map(|a| a.to_string()).collect();
            let contact: Value = client
                .post(
                    "/v1/contacts",
                    &json!({ "name": name, "peer": peer_id_or_invite, "addrs": addrs }),
                )
                .await?;
            println!(
                "added {} ({})",
                for_terminal(contact["name"].as_str().unwrap_or_default()),
                contact["peer_id"].as_str().unwrap_or_default()
            );
        }
        ContactCommand::Remove { name } => {
            let removed: Value = client
                .delete(&format!("/v1/contacts/{}", urlencode(&name)))
                .await?;
            println!(
                "removed {} ({}); the conversation stays",
                for_terminal(removed["name"].as_str().unwrap_or_default()),
                removed["peer_id"].as_str().unwrap_or_default()
            );
        }
        ContactCommand::Rename { old, new } => {
            let renamed: Value = client
                .post(
                    &format!("/v1/contacts/{}/rename", urlencode(&old)),
                    &json!({ "name": new }),
                )
                .await?;
            println!(
                "renamed {} to {}",
                for_terminal(&old),
                for_terminal(renamed["name"].as_str().unwrap_or_default())
            );
        }
        ContactCommand::List { json } => {
            let contacts: Value = client.get("/v1/contacts").await?;
            if json {
                print_json(&contacts)?;
            } else {
                for c in contacts.as_array().into_iter().flatten() {
                    let blocked = if c["blocked"].as_bool() == Some(true) {
                        "\tblocked"
                    } else {
                        ""
                    };
                    let trust = if c["identity_changed"].as_bool() == Some(true) {
                        "\tidentity key changed: verify again"
                    } else if c["verified"].as_bool() == Some(true) {
                        "\tverified"
                    } else {
                        ""
                    };
                    println!(
                        "{}\t{}{trust}{blocked}",
                        for_terminal(c["name"].as_str().unwrap_or_default()),
                        c["peer_id"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        ContactCommand::Block { who, json } => {
            block(client, &who, true, json).await?;
        }
        ContactCommand::Unblock { who, json } => {
            block(client, &who, false, json).await?;
        }
        ContactCommand::Verify { name, mark, json } => {
            let path = format!("/v1/contacts/{name}/verify");
            let view: Value = if mark {
                client.post(&path, &json!({})).await?
            } else {
                client.get(&path).await?
            };
            if json {
                print_json(&view)?;
            } else {
                let number = view["safety_number"].as_str().unwrap_or_default();
                println!("Safety number with {name}:\n\n  {number}\n");
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    println!("{}", safety_qr(number)?);
                }
                if view["verified"].as_bool() == Some(true) {
                    println!("Verified.");
                } else {
                    println!("Not verified: compare it with {name} (in person, or on a call), then run `kith contact verify {name} --mark`.");
                }
            }
        }
    }
    Ok(())
}

/// The safety number as a QR code drawn with Unicode half blocks, for the other side to scan.
fn safety_qr(number: &str) -> Result<String> {
    let digits: String = number.chars().filter(char::is_ascii_digit).collect();
    let code = qrcode::QrCode::new(format!("kith-safety:{digits}"))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .quiet_zone(true)
        .build())
}

/// `kith requests [--json]`, `kith requests accept|block WHO`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RequestsArgs {
    /// Accept or block one; without, list them.
    #[command(subcommand)]
    pub command: Option<RequestsCommand>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// What to do with a request.
#[derive(Debug, Subcommand)]
pub enum RequestsCommand {
    /// Make the stranger a contact: its messages show in its conversation.
    Accept {
        /// Its peer id (or the end of it, when only one request matches).
        who: String,
        /// The contact name to give it (default: the last 8 characters of its peer id).
        #[arg(long)]
        name: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Drop its messages and block it, on this node and at your relays.
    Block {
        /// Its peer id (or the end of it, when only one request matches).
        who: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `kith requests …` against the daemon.
pub async fn requests(client: &Client, args: RequestsArgs) -> Result<()> {
    match args.command {
        None => {
            let list: Value = client.get("/v1/requests").await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let requests = list.as_array().cloned().unwrap_or_default();
            if requests.is_empty() {
                println!("no requests");
            }
            for r in requests {
                println!(
                    "{}\t{} message(s)\t{}",
                    r["peer_id"].as_str().unwrap_or_default(),
                    r["messages"],
                    for_terminal(r["preview"].as_str().unwrap_or_default())
                );
            }
        }
        Some(RequestsCommand::Accept { who, name, json }) => {
            let contact: Value = client
                .post(
                    &format!("/v1/requests/{}/accept", urlencode(&who)),
                    &json!({ "name": name }),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&contact)?);
            } else {
                println!(
                    "accepted {} as {}; `kith messages {}` shows its messages",
                    contact["peer_id"].as_str().unwrap_or_default(),
                    for_terminal(contact["name"].as_str().unwrap_or_default()),
                    for_terminal(contact["name"].as_str().unwrap_or_default())
                );
            }
        }
        Some(RequestsCommand::Block { who, json }) => {
            let view: Value = client
                .post(
                    &format!("/v1/requests/{}/block", urlencode(&who)),
                    &json!({}),
                )
                .await?;
            print_block(&view, json)?;
        }
    }
    Ok(())
}

/// `kith contact block|unblock WHO`.
pub async fn block(client: &Client, who: &str, blocked: bool, json: bool) -> Result<()> {
    let action = if blocked { "block" } else { "unblock" };
    let view: Value = client
        .post(
            &format!("/v1/contacts/{}/{action}", urlencode(who)),
            &json!({}),
        )
        .await?;
    print_block(&view, json)
}

fn print_block(view: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
        return Ok(());
    }
    let peer = view["peer_id"].as_str().unwrap_or_default();
    if view["blocked"] == true {
        let dropped = view["dropped"].as_u64().unwrap_or(0);
        println!("blocked {peer}; {dropped} message(s) of its request dropped");
    } else {
        println!("unblocked {peer}");
    }
    Ok(())
}
