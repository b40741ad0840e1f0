//! `kith group …`: create, add, remove, promote, leave, rekey, list, info, and the
//! invitations strangers sent (invitations, accept, decline).

use super::show;
use crate::api::client::Client;
use crate::api::groups::CreateBody;
use crate::features::group::{ChangeKind, GroupView};
use crate::text::for_terminal;
use anyhow::Result;
use clap::Subcommand;

/// `kith group …`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group at your first home relay.
    Create {
        /// Its name.
        name: String,
        /// An initial member: contact name or peer id (repeatable).
        #[arg(long = "member")]
        member: Vec<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Add a member (admins only).
    Add {
        /// Group name or id.
        group: String,
        /// Contact name or peer id.
        who: String,
    },
    /// Remove a member (admins only).
    Remove {
        /// Group name or id.
        group: String,
        /// Contact name or peer id.
        who: String,
    },
    /// Make a member an admin (admins only).
    Promote {
        /// Group name or id.
        group: String,
        /// Contact name or peer id.
        who: String,
    },
    /// Leave a group.
    Leave {
        /// Group name or id.
        group: String,
    },
    /// Refresh your keys in a group now (post-compromise security: whoever copied your
    /// state before cannot read what follows). Members also do this on their own after
    /// 1,000 messages or 7 days.
    Rekey {
        /// Group name or id.
        group: String,
    },
    /// List your groups.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show a group's admins, members, version and key epoch.
    Info {
        /// Group name or id.
        group: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// List the groups strangers (peers who are not your contacts) added you to. They wait
    /// here, unjoined, until you accept or decline them; adding the inviter as a contact
    /// accepts theirs.
    Invitations {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Join the group of an invitation: it shows with its messages from now on.
    Accept {
        /// Group name or id.
        group: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Decline an invitation: leave the group and drop what it sent.
    Decline {
        /// Group name or id.
        group: String,
        /// Also block the peer who added you (their messages and adds are refused).
        #[arg(long)]
        block: bool,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn print_info(g: &GroupView) {
    println!(
        "{}  {}  (version {}, epoch {})",
        for_terminal(&g.name),
        g.group_id,
        g.version,
        g.epoch
    );
    for m in &g.members {
        let who = match g.member_names.get(m) {
            Some(name) => format!("{} ({m})", for_terminal(name)),
            None => m.clone(),
        };
        let admin = if g.admins.contains(m) {
            "  (admin)"
        } else {
            ""
        };
        println!("  {who}{admin}");
    }
}

/// Runs one `kith group` command.
pub async fn run(client: &Client, command: GroupCommand) -> Result<()> {
    let (group, kind, who) = match command {
        GroupCommand::Create { name, member, json } => {
            let body = CreateBody {
                name,
                members: member,
            };
            return show(client.create_group(&body).await?, json, |created| {
                println!("{}", created.group_id);
                Ok(())
            });
        }
        GroupCommand::List { json } => {
            show(client.groups().await?, json, |list| {
                for g in list {
                    let left = if g.member {
                        ""
                    } else {
                        "\tnot a member any more (read-only)"
                    };
                    println!(
                        "{}\t{}\t{} members{left}",
                        for_terminal(&g.name),
                        g.group_id,
                        g.members.len()
                    );
                }
                Ok(())
            })?;
            if !json {
                let waiting = client.invitations().await?.decode()?.len();
                if waiting > 0 {
                    println!(
                        "{waiting} group invitation(s) from strangers wait: `kith group invitations`"
                    );
                }
            }
            return Ok(());
        }
        GroupCommand::Info { group, json } => {
            return show(client.group(&group).await?, json, |g| {
                print_info(&g);
                Ok(())
            });
        }
        GroupCommand::Invitations { json } => {
            return show(client.invitations().await?, json, |list| {
                if list.is_empty() {
                    println!("no group invitations");
                }
                for i in list {
                    println!(
                        "{}\t{}\tfrom {}\t{} members, {} messages",
                        for_terminal(&i.name),
                        i.group_id,
                        i.inviter,
                        i.members,
                        i.messages
                    );
                }
                Ok(())
            });
        }
        GroupCommand::Accept { group, json } => {
            return show(client.accept_invitation(&group).await?, json, |g| {
                println!("joined {}", for_terminal(&g.name));
                print_info(&g);
                Ok(())
            });
        }
        GroupCommand::Decline { group, block, json } => {
            return show(client.decline_invitation(&group, block).await?, json, |d| {
                let blocked = if d.blocked {
                    "; its inviter is blocked"
                } else {
                    ""
                };
                println!(
                    "declined {} ({} messages dropped){blocked}",
                    for_terminal(&d.name),
                    d.dropped
                );
                Ok(())
            });
        }
        GroupCommand::Add { group, who } => (group, ChangeKind::Add, Some(who)),
        GroupCommand::Remove { group, who } => (group, ChangeKind::Remove, Some(who)),
        GroupCommand::Promote { group, who } => (group, ChangeKind::Promote, Some(who)),
        GroupCommand::Leave { group } => (group, ChangeKind::Leave, None),
        GroupCommand::Rekey { group } => (group, ChangeKind::Rekey, None),
    };
    let changed = client.change_group(&group, kind, who.as_deref()).await?;
    if kind == ChangeKind::Leave {
        println!("left {group}");
    } else if kind == ChangeKind::Rekey {
        let view = changed.decode()?;
        println!("keys refreshed in {group}: now at epoch {}", view.epoch);
    } else {
        print_info(&changed.decode()?);
    }
    Ok(())
}
