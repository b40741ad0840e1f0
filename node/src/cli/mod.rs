//! The `kith` command line: its grammar ([`args`]), one file per command group that runs the
//! commands against the daemon's API through the typed [`crate::api::client::Client`], and what
//! they print for a person ([`print`]; `--json` prints the API's answer as it came).

pub mod args;
pub mod chats;
pub mod contacts;
pub mod demo;
pub mod files;
pub mod groups;
pub mod messages;
pub mod node;
pub mod print;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use args::{Cli, Command};

use crate::api::client::{Answer, Client};

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    match cli.command {
        Command::Init { name } => node::init(&home, name),
        Command::Id { json, invite } => node::id(&home, json, invite).await,
        Command::Daemon {
            listen,
            relay,
            api,
            mdns,
        } => node::daemon(&home, listen, relay, api, mdns).await,
        Command::Settings {
            presence,
            read_receipts,
            reach,
            name,
            json,
        } => node::settings(&home, presence, read_receipts, reach, name, json).await,
        Command::Name { name } => node::name(&home, name).await,
        Command::Demo { json } => {
            if cli.home_flag {
                anyhow::bail!("kith demo runs in a temporary directory of its own and takes no --home; run it without");
            }
            demo::run(json).await.context("the demo failed")
        }
        Command::Ui { open } => node::ui(&daemon_client(&home)?, open).await,
        Command::Contact(command) => contacts::contact(&daemon_client(&home)?, command).await,
        Command::Requests(args) => contacts::requests(&daemon_client(&home)?, args).await,
        Command::Send { to, text, json } => messages::send(&home, to, text, json).await,
        Command::Messages { with, json } => {
            messages::messages(&daemon_client(&home)?, with, json).await
        }
        Command::Read { with } => messages::read(&daemon_client(&home)?, with).await,
        Command::Status { id, json } => messages::status(&daemon_client(&home)?, id, json).await,
        Command::Presence { who, json } => {
            messages::presence(&daemon_client(&home)?, who, json).await
        }
        Command::Typing { to } => messages::typing(&daemon_client(&home)?, to).await,
        Command::Events { json } => messages::events(&home, json).await,
        Command::Group(command) => groups::run(&daemon_client(&home)?, command).await,
        Command::SendFile { to, path, json } => {
            files::send_file(&daemon_client(&home)?, &to, path, json).await
        }
        Command::Download { id, to, json } => {
            files::download(&daemon_client(&home)?, &id, to, json).await
        }
        Command::Chat(args::ChatCommand::Timer {
            with,
            duration,
            admins_only,
            everyone,
            json,
        }) => {
            let rule = (admins_only || everyone).then_some(admins_only);
            chats::timer(
                &daemon_client(&home)?,
                &with,
                duration.as_deref(),
                rule,
                json,
            )
            .await
        }
        Command::Export { with, json } => chats::export(&daemon_client(&home)?, &with, json).await,
    }
}

fn default_home() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kith")
}

/// The client of `home`'s running daemon.
fn daemon_client(home: &Path) -> Result<Client> {
    Ok(Client::for_home(home)?)
}

/// Prints a JSON document as `--json` does: pretty, one document.
fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints an answer for `--json` as the daemon sent it, or hands its typed view to `human`.
fn show<T: DeserializeOwned>(
    answer: Answer<T>,
    json: bool,
    human: impl FnOnce(T) -> Result<()>,
) -> Result<()> {
    if json {
        return print_json(answer.json());
    }
    human(answer.decode()?)
}

/// An error as one line: its chain of causes, each said once.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
