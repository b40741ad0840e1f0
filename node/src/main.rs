//! The `kith` command line: parses flags, sets up logging and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kith_node::api::client::Client;
use kith_node::text::for_terminal;
use kith_node::{identity, Config, Settings};
use libp2p::Multiaddr;
use serde_json::{json, Value};

/// jemalloc instead of the system allocator: no per-allocation header and tight size classes,
/// which is what a relay holding thousands of idle connections spends its memory on, and less
/// time in malloc on the message path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// kith: peer-to-peer chat. Run `kith init`, then `kith daemon`, then talk to it with the other
/// commands from another terminal.
#[derive(Parser)]
#[command(name = "kith", version, about, long_about = None)]
struct Cli {
    /// The node's home directory (identity, messages, settings).
    #[arg(long, env = "KITH_HOME", global = true)]
    home: Option<PathBuf>,
    /// Whether --home was given on the command line (not through KITH_HOME).
    #[arg(skip)]
    home_flag: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an identity and settings in --home.
    Init {
        /// Your display name, shown in your invite.
        #[arg(long, default_value = "anonymous")]
        name: String,
    },
    /// Show your peer id, name, invite and (if the daemon runs) listen addresses.
    Id {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Print only the invite (to paste into `kith contact add`).
        #[arg(long, conflicts_with = "json")]
        invite: bool,
    },
    /// Run the node in the foreground.
    Daemon {
        /// Address to listen on (repeatable), e.g. /ip4/127.0.0.1/tcp/4101. Without it the
        /// daemon listens on every interface (0.0.0.0 and ::, TCP and QUIC, random ports).
        #[arg(long = "listen")]
        listen: Vec<Multiaddr>,
        /// Home relay (repeatable), a multiaddr ending in /p2p/<relay peer id>. Remembered in
        /// config.toml: without --relay the daemon uses the relays it last ran with.
        #[arg(long = "relay")]
        relay: Vec<Multiaddr>,
        /// Where the local API listens (loopback only).
        #[arg(long, default_value = "127.0.0.1:0")]
        api: std::net::SocketAddr,
        /// Find peers on the local network with mDNS.
        #[arg(long)]
        mdns: bool,
    },
    /// Manage contacts.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Group chats: create, add, remove, promote, leave, list, info.
    #[command(subcommand)]
    Group(kith_node::features::group::cli::GroupCommand),
    /// Messages from strangers (peers not in your contacts): list, accept or block.
    Requests(kith_node::features::strangers::cli::RequestsArgs),
    /// Send a message; prints its id (its state goes to stderr).
    Send {
        /// Contact name, peer id, or group name or id.
        to: String,
        /// The text, at most 16 KiB (16384 bytes of UTF-8); `-` reads it from standard input.
        text: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Send a file (image, video, anything up to max_file_bytes); prints the message id.
    SendFile {
        /// Contact name, peer id, or group name or id.
        to: String,
        /// The file.
        path: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Download the file attached to a message (resumes an interrupted download); prints its path.
    Download {
        /// The message id.
        id: String,
        /// Where to put the file (default: <home>/files).
        #[arg(long)]
        to: Option<PathBuf>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show a conversation, or every message.
    Messages {
        /// Contact name or peer id.
        with: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Mark a conversation read (sends read receipts unless turned off).
    Read {
        /// Contact name or peer id.
        with: String,
    },
    /// Show a message's state, or without an id the node's health: relays, reservations,
    /// outbox, last mailbox fetch, and the road to each contact.
    Status {
        /// The message id.
        id: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show whether a contact is online and when it was last seen.
    Presence {
        /// Contact name or peer id.
        who: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Tell a contact you are typing (sent once, never stored).
    Typing {
        /// Contact name or peer id.
        to: String,
    },
    /// Show or change your settings (saved in <home>/config.toml; a running daemon applies
    /// them at once).
    Settings {
        /// Who may see your online state and last seen: everyone, contacts or nobody.
        #[arg(long)]
        presence: Option<kith_protocol::presence::Visibility>,
        /// Send read receipts: on or off.
        #[arg(long, value_parser = parse_on_off)]
        read_receipts: Option<bool>,
        /// Who may send you messages: everyone (strangers land in `kith requests`) or
        /// contacts (strangers are refused).
        #[arg(long)]
        reach: Option<kith_protocol::presence::Reach>,
        /// Your display name (shown in your invite).
        #[arg(long)]
        name: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Change your display name (shown in your invite).
    Name {
        /// The new name.
        name: String,
    },
    /// Start a relay and three nodes on loopback and play the features end to end.
    Demo {
        /// Print the transcript as JSON events, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Temporary chats: a conversation's disappearing-message timer.
    #[command(subcommand)]
    Chat(ChatCommand),
    /// Write a permanent chat's history (JSON lines: a header, then one line per message;
    /// one JSON document with --json).
    Export {
        /// Contact name, peer id, or group name or id.
        with: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Open the chat window: prints the web UI's address with a one-time code.
    Ui {
        /// Also open it in the browser (xdg-open).
        #[arg(long)]
        open: bool,
    },
    /// Stream events (messages, receipts, typing, failures) until stopped, reconnecting when
    /// the daemon restarts. On a terminal one readable line each; otherwise, or with --json,
    /// one JSON event per line.
    Events {
        /// Print JSON lines, the exact events of `GET /v1/events`.
        #[arg(long)]
        json: bool,
    },
}

/// `kith chat …`
#[derive(Debug, Subcommand)]
enum ChatCommand {
    /// Show or set the disappearing-message timer of a conversation (3s, 5m, 1h, 7d, 2w, off).
    Timer {
        /// Contact name, peer id, or group name or id.
        with: String,
        /// The new timer, or `off`; without it, the current one is shown.
        duration: Option<String>,
        /// In a group (admins only): from now on only admins may change the timer.
        #[arg(long, conflicts_with = "everyone")]
        admins_only: bool,
        /// In a group (admins only): every member may change the timer again.
        #[arg(long)]
        everyone: bool,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ContactCommand {
    /// Add a contact by peer id or invite.
    Add {
        /// The name you will use for it.
        name: String,
        /// Its peer id or invite (`kith id` prints both).
        peer_id_or_invite: String,
        /// A direct address to reach it (repeatable).
        #[arg(long = "addr")]
        addr: Vec<Multiaddr>,
    },
    /// List contacts.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Remove a contact (its conversation stays).
    Remove {
        /// The contact's name.
        name: String,
    },
    /// Give a contact another name.
    Rename {
        /// Its name now.
        old: String,
        /// The new name.
        new: String,
    },
    /// Block a contact or any peer: nothing of it gets through, here or at your relays.
    Block {
        /// The contact's name or a peer id.
        who: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Unblock a contact or peer.
    Unblock {
        /// The contact's name or a peer id.
        who: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show the safety number to compare with a contact (and a QR code on a terminal).
    Verify {
        /// The contact's name or peer id.
        name: String,
        /// Record that you compared it and it matched.
        #[arg(long)]
        mark: bool,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
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

fn default_home() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kith")
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn daemon_client(home: &std::path::Path) -> Result<Client> {
    Ok(Client::for_home(home)?)
}

async fn run(cli: Cli) -> Result<()> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    match cli.command {
        Command::Init { name } => {
            let key = identity::create(&home)?;
            let settings = Settings {
                name,
                ..Settings::default()
            };
            settings.save(&home)?;
            println!(
                "created identity {} in {}",
                key.public().to_peer_id(),
                home.display()
            );
            println!("next: kith --home {} daemon", home.display());
        }
        Command::Id { json, invite } => {
            let key = identity::load(&home)?;
            let settings = Settings::load(&home)?;
            let peer_id = key.public().to_peer_id();
            let info: Value = match Client::for_home(&home) {
                Ok(client) => match client.get::<Value>("/v1/id").await {
                    Ok(info) => info,
                    Err(_) => offline_id(peer_id, &settings),
                },
                Err(_) => offline_id(peer_id, &settings),
            };
            if !json {
                warn_failing_relays(&home).await;
            }
            if json {
                print_json(&info)?;
            } else if invite {
                println!("{}", info["invite"].as_str().unwrap_or_default());
            } else {
                println!("peer id: {}", info["peer_id"].as_str().unwrap_or_default());
                println!("name:    {}", info["name"].as_str().unwrap_or_default());
                println!("invite:  {}", info["invite"].as_str().unwrap_or_default());
                for addr in info["listen_addrs"].as_array().into_iter().flatten() {
                    println!("listen:  {}", addr.as_str().unwrap_or_default());
                }
            }
        }
        Command::Daemon {
            listen,
            relay,
            api,
            mdns,
        } => {
            let mut config = Config::new(&home);
            if !listen.is_empty() {
                config.listen = listen;
            }
            let mut settings = Settings::load(&home)?;
            // Checked before anything is saved: a bad address must not stick in config.toml.
            for addr in &relay {
                if kith_node::net::peer_of(addr).is_none() {
                    anyhow::bail!(
                        "the relay address {addr} must end in /p2p/<relay peer id> (`kith-relay id` prints the full address); nothing was saved"
                    );
                }
            }
            let remembered: Vec<String> = relay.iter().map(|a| a.to_string()).collect();
            if relay.is_empty() {
                for saved in &settings.relays {
                    config.relays.push(saved.parse().with_context(|| {
                        format!("the relay {saved:?} remembered in config.toml is not a multiaddr; fix or remove it")
                    })?);
                }
            } else if settings.relays != remembered {
                settings.relays = remembered;
                settings.save(&home)?;
                config.relays = relay;
            } else {
                config.relays = relay;
            }
            config.api = api;
            config.mdns = mdns;
            let running = kith_node::start(config)
                .await
                .context("starting the daemon")?;
            eprintln!(
                "kith daemon running as {} (API on {}); Ctrl-C to stop",
                running.node.peer_id(),
                running.api_addr
            );
            shutdown_signal().await;
            running.shutdown().await;
        }
        Command::Contact(ContactCommand::Add {
            name,
            peer_id_or_invite,
            addr,
        }) => {
            let client = daemon_client(&home).await?;
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
        Command::Contact(ContactCommand::Remove { name }) => {
            let client = daemon_client(&home).await?;
            let removed: Value = client
                .delete(&format!("/v1/contacts/{}", urlencode(&name)))
                .await?;
            println!(
                "removed {} ({}); the conversation stays",
                for_terminal(removed["name"].as_str().unwrap_or_default()),
                removed["peer_id"].as_str().unwrap_or_default()
            );
        }
        Command::Contact(ContactCommand::Rename { old, new }) => {
            let client = daemon_client(&home).await?;
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
        Command::Contact(ContactCommand::List { json }) => {
            let client = daemon_client(&home).await?;
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
        Command::Contact(ContactCommand::Block { who, json }) => {
            let client = daemon_client(&home).await?;
            kith_node::features::strangers::cli::block(&client, &who, true, json).await?;
        }
        Command::Contact(ContactCommand::Unblock { who, json }) => {
            let client = daemon_client(&home).await?;
            kith_node::features::strangers::cli::block(&client, &who, false, json).await?;
        }
        Command::Requests(args) => {
            let client = daemon_client(&home).await?;
            kith_node::features::strangers::cli::run(&client, args).await?;
        }
        Command::Contact(ContactCommand::Verify { name, mark, json }) => {
            let client = daemon_client(&home).await?;
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
        Command::Send { to, text, json } => {
            let text = if text == "-" {
                read_stdin_text()?
            } else {
                text
            };
            let client = daemon_client(&home).await?;
            let sent: Value = client
                .post(
                    "/v1/send",
                    &json!({ "to": to, "text": text, "wait_ms": 2000 }),
                )
                .await?;
            if json {
                print_json(&sent)?;
            } else {
                println!("{}", sent["id"].as_str().unwrap_or_default());
                let state = sent["state"].as_str().unwrap_or_default();
                match state {
                    "pending" => eprintln!(
                        "pending: not reachable yet; kith keeps trying (`kith status {}`)",
                        sent["id"].as_str().unwrap_or_default()
                    ),
                    state => eprintln!("{state} {}", kith_node::cli::tick(state)),
                }
            }
            if let Some(note) = sent["note"].as_str() {
                eprintln!("note: {note}");
            }
        }
        Command::SendFile { to, path, json } => {
            let client = daemon_client(&home).await?;
            kith_node::features::media::cli::send_file(&client, &to, path, json).await?;
        }
        Command::Download { id, to, json } => {
            let client = daemon_client(&home).await?;
            kith_node::features::media::cli::download(&client, &id, to, json).await?;
        }
        Command::Messages { with, json } => {
            let client = daemon_client(&home).await?;
            let path = match &with {
                Some(w) => format!("/v1/messages?with={}", urlencode(w)),
                None => "/v1/messages".to_owned(),
            };
            let messages: Value = client.get(&path).await?;
            if json {
                print_json(&messages)?;
            } else {
                kith_node::cli::print_messages(&messages, with.is_some());
            }
        }
        Command::Read { with } => {
            let client = daemon_client(&home).await?;
            let read: Value = client.post("/v1/read", &json!({ "with": with })).await?;
            println!("marked {} message(s) read", read["read"]);
        }
        Command::Status { id: None, json } => {
            let client = daemon_client(&home).await?;
            let health: Value = client.get("/v1/health").await?;
            if json {
                print_json(&health)?;
            } else {
                kith_node::cli::print_health(&health);
            }
        }
        Command::Status { id: Some(id), json } => {
            let client = daemon_client(&home).await?;
            let status: Value = client
                .get(&format!("/v1/status/{}", urlencode(&id)))
                .await?;
            if json {
                print_json(&status)?;
            } else {
                println!("{}", status["state"].as_str().unwrap_or_default());
                if let Some(members) = status["members"].as_object() {
                    let names = &status["member_names"];
                    for (peer, state) in members {
                        let who = names[peer]
                            .as_str()
                            .map(|n| format!("{} ({peer})", for_terminal(n)))
                            .unwrap_or_else(|| peer.clone());
                        println!("  {who}  {}", state.as_str().unwrap_or_default());
                    }
                }
                if let Some(reason) = status["reason"].as_str() {
                    let why = match status["state"].as_str() {
                        Some("failed") => "failed because",
                        _ => "pending because",
                    };
                    println!("{why}: {reason}");
                }
            }
        }
        Command::Presence { who, json } => {
            let client = daemon_client(&home).await?;
            let seen: Value = client
                .get(&format!("/v1/presence/{}", urlencode(&who)))
                .await?;
            if json {
                print_json(&seen)?;
            } else if seen["online"] == true {
                println!("online");
            } else {
                match seen["last_seen_ms"].as_u64() {
                    Some(ms) => println!("offline, last seen {}", kith_node::cli::ago(ms)),
                    None => println!("offline (last seen unknown or hidden)"),
                }
            }
        }
        Command::Typing { to } => {
            let client = daemon_client(&home).await?;
            let sent: Value = client.post("/v1/typing", &json!({ "to": to })).await?;
            if sent["sent"] != true {
                eprintln!("{to} is not reachable right now; nothing was sent");
            }
        }
        Command::Settings {
            presence,
            read_receipts,
            reach,
            name,
            json,
        } => {
            let change = json!({
                "presence": presence,
                "read_receipts": read_receipts,
                "reach": reach,
                "name": name,
            });
            let settings = change_settings(&home, change).await?;
            if json {
                print_json(&settings)?;
            } else {
                kith_node::cli::print_settings(&settings);
            }
        }
        Command::Name { name } => {
            let settings = change_settings(&home, json!({ "name": name })).await?;
            println!(
                "your name is now {}",
                for_terminal(settings["name"].as_str().unwrap_or_default())
            );
        }
        Command::Demo { json } => {
            if cli.home_flag {
                anyhow::bail!("kith demo runs in a temporary directory of its own and takes no --home; run it without");
            }
            kith_node::demo::run(json)
                .await
                .context("the demo failed")?;
        }
        Command::Group(command) => {
            let client = daemon_client(&home).await?;
            kith_node::features::group::cli::run(&client, command).await?;
        }
        Command::Chat(ChatCommand::Timer {
            with,
            duration,
            admins_only,
            everyone,
            json,
        }) => {
            let client = daemon_client(&home).await?;
            let rule = (admins_only || everyone).then_some(admins_only);
            kith_node::features::timers::cli::timer(
                &client,
                &with,
                duration.as_deref(),
                rule,
                json,
            )
            .await?;
        }
        Command::Export { with, json } => {
            let client = daemon_client(&home).await?;
            kith_node::features::timers::cli::export(&client, &with, json).await?;
        }
        Command::Ui { open } => {
            let client = daemon_client(&home).await?;
            kith_node::api::ui::open(&client, open).await?;
        }
        Command::Events { json } => {
            follow_events(&home, json).await?;
        }
    }
    Ok(())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
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

/// Applies a settings change (`null` fields stay) and returns the settings in effect: through a
/// running daemon, which applies them at once, or in config.toml when none runs.
async fn change_settings(home: &std::path::Path, change: Value) -> Result<Value> {
    let change: serde_json::Map<String, Value> = change
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Ok(client) = Client::for_home(home) {
        match client
            .post("/v1/settings", &Value::Object(change.clone()))
            .await
        {
            Ok(settings) => return Ok(settings),
            Err(kith_node::api::client::ClientError::NotRunning(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut settings = Settings::load(home)?;
    if let Some(name) = change.get("name").and_then(Value::as_str) {
        settings.name = kith_node::config::valid_display_name(name)?.to_owned();
    }
    if let Some(presence) = change.get("presence") {
        settings.presence = serde_json::from_value(presence.clone())?;
    }
    if let Some(on) = change.get("read_receipts").and_then(Value::as_bool) {
        settings.read_receipts = on;
    }
    if let Some(reach) = change.get("reach") {
        settings.reach = serde_json::from_value(reach.clone())?;
    }
    if !change.is_empty() {
        settings.save(home)?;
    }
    Ok(json!({
        "name": settings.name,
        "presence": settings.presence,
        "read_receipts": settings.read_receipts,
        "reach": settings.reach,
        "max_file_bytes": settings.max_file_bytes,
        "auto_download_max_bytes": settings.auto_download_max_bytes,
        "relays": settings.relays,
    }))
}

/// How often `kith events` looks for a daemon that went away.
const EVENTS_RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `kith events`: prints events until the process is stopped; when the daemon goes away, says
/// so on stderr and waits for it to come back.
async fn follow_events(home: &std::path::Path, json: bool) -> Result<()> {
    use std::io::IsTerminal as _;
    let readable = !json && std::io::stdout().is_terminal();
    let print = |event: Value| {
        if readable {
            if let Some(line) = kith_node::cli::event_line(&event) {
                println!("{line}");
            }
        } else {
            println!("{event}");
        }
    };
    // The first connection must work: a mistyped --home should not wait forever.
    let mut client = daemon_client(home).await?;
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
                if client.get::<Value>("/v1/id").await.is_ok() {
                    break client;
                }
            }
        };
        eprintln!("kith: reconnected to the daemon (events in between were not shown)");
    }
}

/// Says on stderr which home relays in the invite a running daemon cannot reach: friends
/// would be handed a road that does not work.
async fn warn_failing_relays(home: &std::path::Path) {
    let Ok(client) = Client::for_home(home) else {
        return;
    };
    let Ok(health) = client.get::<Value>("/v1/health").await else {
        return;
    };
    for relay in health["relays"].as_array().into_iter().flatten() {
        if let Some(error) = relay["error"].as_str() {
            eprintln!(
                "warning: the daemon cannot reach the relay {} in this invite ({}); see `kith status`",
                relay["addr"].as_str().unwrap_or_default(),
                for_terminal(error)
            );
        }
    }
}

/// An error as one line: its chain of causes, each said once.
fn one_line(e: &anyhow::Error) -> String {
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

fn offline_id(peer_id: libp2p::PeerId, settings: &Settings) -> Value {
    let invite = kith_protocol::invite::Invite {
        peer_id,
        name: settings.name.clone(),
        relays: settings.relays.clone(),
        // The identity key is in the daemon's store; `kith id` with the daemon running has it.
        identity: None,
    };
    json!({
        "peer_id": peer_id.to_string(),
        "name": settings.name,
        "invite": invite.encode(),
        "listen_addrs": [],
        "read_receipts": settings.read_receipts,
        "presence": settings.presence,
    })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.home_flag = matches.value_source("home") == Some(clap::parser::ValueSource::CommandLine);
    // The daemon reports its progress; other commands (and the demo's transcript) stay quiet
    // unless KITH_LOG asks for more.
    let default_filter = match cli.command {
        Command::Daemon { .. } => "warn,kith_node=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KITH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kith: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
