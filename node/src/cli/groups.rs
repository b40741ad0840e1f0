//! `kith group …`: create, add, remove, promote, leave, list, info.

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{print_json, urlencode};
use crate::api::client::Client;

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
    /// List your groups.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show a group's admins, members and version.
    Info {
        /// Group name or id.
        group: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn print_info(g: &Value) {
    println!(
        "{}  {}  (version {})",
        crate::text::for_terminal(g["name"].as_str().unwrap_or_default()),
        g["group_id"].as_str().unwrap_or_default(),
        g["version"]
    );
    let admins: Vec<&str> = g["admins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for m in g["members"].as_array().into_iter().flatten() {
        let m = m.as_str().unwrap_or_default();
        let who = match g["member_names"][m].as_str() {
            Some(name) => format!("{} ({m})", crate::text::for_terminal(name)),
            None => m.to_owned(),
        };
        println!(
            "  {who}{}",
            if admins.contains(&m) { "  (admin)" } else { "" }
        );
    }
}

/// Runs one `kith group` command.
pub async fn run(client: &Client, command: GroupCommand) -> Result<()> {
    let change = |group: &str, kind: &str| format!("/v1/groups/{}/{kind}", urlencode(group));
    match command {
        GroupCommand::Create { name, member, json } => {
            let created: Value = client
                .post("/v1/groups", &json!({ "name": name, "members": member }))
                .await?;
            if json {
                print_json(&created)?;
            } else {
                println!("{}", created["group_id"].as_str().unwrap_or_default());
            }
        }
        GroupCommand::Add { group, who } => {
            let g: Value = client
                .post(&change(&group, "add"), &json!({ "who": who }))
                .await?;
            print_info(&g);
        }
        GroupCommand::Remove { group, who } => {
            let g: Value = client
                .post(&change(&group, "remove"), &json!({ "who": who }))
                .await?;
            print_info(&g);
        }
        GroupCommand::Promote { group, who } => {
            let g: Value = client
                .post(&change(&group, "promote"), &json!({ "who": who }))
                .await?;
            print_info(&g);
        }
        GroupCommand::Leave { group } => {
            let _: Value = client.post(&change(&group, "leave"), &json!({})).await?;
            println!("left {group}");
        }
        GroupCommand::List { json } => {
            let list: Value = client.get("/v1/groups").await?;
            if json {
                print_json(&list)?;
            } else {
                for g in list.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{} members",
                        g["name"].as_str().unwrap_or_default(),
                        g["group_id"].as_str().unwrap_or_default(),
                        g["members"].as_array().map_or(0, Vec::len)
                    );
                }
            }
        }
        GroupCommand::Info { group, json } => {
            let g: Value = client
                .get(&format!("/v1/groups/{}", urlencode(&group)))
                .await?;
            if json {
                print_json(&g)?;
            } else {
                print_info(&g);
            }
        }
    }
    Ok(())
}
