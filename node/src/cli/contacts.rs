//! `kith contact …` (add, list, remove, rename, block, unblock, verify) and `kith requests …`
//! (messages from strangers: list, accept, block).

use anyhow::Result;
use clap::{Args, Subcommand};

use super::args::ContactCommand;
use super::show;
use crate::api::client::Client;
use crate::api::requests::AcceptBody;
use crate::api::AddContact;
use crate::features::strangers::BlockView;
use crate::text::for_terminal;

/// Runs one `kith contact` command.
pub async fn contact(client: &Client, command: ContactCommand) -> Result<()> {
    match command {
        ContactCommand::Add {
            name,
            peer_id_or_invite,
            addr,
        } => {
            let body = AddContact {
                name,
                peer: peer_id_or_invite,
                addrs: addr.iter().map(|a| a.to_string()).collect(),
            };
            let contact = client.add_contact(&body).await?.decode()?;
            println!(
                "added {} ({})",
                for_terminal(&contact.name),
                contact.peer_id
            );
        }
        ContactCommand::Remove { name } => {
            let removed = client.remove_contact(&name).await?.decode()?;
            println!(
                "removed {} ({}); the conversation stays",
                for_terminal(&removed.name),
                removed.peer_id
            );
        }
        ContactCommand::Rename { old, new } => {
            let renamed = client.rename_contact(&old, &new).await?.decode()?;
            println!(
                "renamed {} to {}",
                for_terminal(&old),
                for_terminal(&renamed.name)
            );
        }
        ContactCommand::List { json } => {
            show(client.contacts().await?, json, |contacts| {
                for c in contacts {
                    let blocked = if c.blocked { "\tblocked" } else { "" };
                    let trust = if c.identity_changed {
                        "\tidentity key changed: verify again"
                    } else if c.verified {
                        "\tverified"
                    } else {
                        ""
                    };
                    println!("{}\t{}{trust}{blocked}", for_terminal(&c.name), c.peer_id);
                }
                Ok(())
            })?;
        }
        ContactCommand::Block { who, json } => {
            show(client.block(&who, true).await?, json, print_block)?;
        }
        ContactCommand::Unblock { who, json } => {
            show(client.block(&who, false).await?, json, print_block)?;
        }
        ContactCommand::Verify { name, mark, json } => {
            show(client.verify(&name, mark).await?, json, |view| {
                let number = &view.safety_number;
                println!("Safety number with {name}:\n\n  {number}\n");
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    println!("{}", safety_qr(number)?);
                }
                if view.verified {
                    println!("Verified.");
                } else {
                    println!("Not verified: compare it with {name} (in person, or on a call), then run `kith contact verify {name} --mark`.");
                }
                Ok(())
            })?;
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
        None => show(client.requests().await?, args.json, |requests| {
            if requests.is_empty() {
                println!("no requests");
            }
            for r in requests {
                println!(
                    "{}\t{} message(s)\t{}",
                    r.peer_id,
                    r.messages,
                    for_terminal(&r.preview)
                );
            }
            Ok(())
        }),
        Some(RequestsCommand::Accept { who, name, json }) => {
            let body = AcceptBody { name };
            show(client.accept_request(&who, &body).await?, json, |contact| {
                println!(
                    "accepted {} as {}; `kith messages {}` shows its messages",
                    contact.peer_id,
                    for_terminal(&contact.name),
                    for_terminal(&contact.name)
                );
                Ok(())
            })
        }
        Some(RequestsCommand::Block { who, json }) => {
            show(client.block_request(&who).await?, json, print_block)
        }
    }
}

fn print_block(view: BlockView) -> Result<()> {
    let peer = view.peer_id;
    if view.blocked {
        println!(
            "blocked {peer}; {} message(s) of its request dropped",
            view.dropped
        );
    } else {
        println!("unblocked {peer}");
    }
    Ok(())
}
