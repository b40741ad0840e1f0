//! The `kith` command line: parses flags, sets up logging and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kith_node::client::Client;
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
        /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4101.
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
    Group(kith_node::group::cli::GroupCommand),
    /// Send a message; prints its id.
    Send {
        /// Contact name, peer id, or group name or id.
        to: String,
        /// The text.
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
    /// Show a message's state.
    Status {
        /// The message id.
        id: String,
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
    /// Show or change your settings (in <home>/config.toml; restart the daemon to apply).
    Settings {
        /// Who may see your online state and last seen: everyone, contacts or nobody.
        #[arg(long)]
        presence: Option<kith_protocol::presence::Visibility>,
        /// Send read receipts: on or off.
        #[arg(long, value_parser = parse_on_off)]
        read_receipts: Option<bool>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Start a relay and three nodes on loopback and play the features end to end.
    Demo {
        /// Print the transcript as JSON events, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Stream events (messages, receipts, typing) as JSON lines.
    Events {
        /// Print JSON lines (the default output is JSON lines too).
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

fn tick(state: &str) -> &'static str {
    match state {
        "sent" => "✓",
        "delivered" => "✓✓",
        "read" => "✓✓ read",
        _ => "…",
    }
}

async fn daemon_client(home: &std::path::Path) -> Result<Client> {
    Ok(Client::for_home(home)?)
}

async fn run(cli: Cli) -> Result<()> {
    let home = cli.home.unwrap_or_else(default_home);
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
                contact["name"].as_str().unwrap_or_default(),
                contact["peer_id"].as_str().unwrap_or_default()
            );
        }
        Command::Contact(ContactCommand::List { json }) => {
            let client = daemon_client(&home).await?;
            let contacts: Value = client.get("/v1/contacts").await?;
            if json {
                print_json(&contacts)?;
            } else {
                for c in contacts.as_array().into_iter().flatten() {
                    let trust = if c["identity_changed"].as_bool() == Some(true) {
                        "\tidentity key changed: verify again"
                    } else if c["verified"].as_bool() == Some(true) {
                        "\tverified"
                    } else {
                        ""
                    };
                    println!(
                        "{}\t{}{trust}",
                        c["name"].as_str().unwrap_or_default(),
                        c["peer_id"].as_str().unwrap_or_default()
                    );
                }
            }
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
            }
            if let Some(note) = sent["note"].as_str() {
                eprintln!("note: {note}");
            }
        }
        Command::SendFile { to, path, json } => {
            let client = daemon_client(&home).await?;
            kith_node::media::cli::send_file(&client, &to, path, json).await?;
        }
        Command::Download { id, to, json } => {
            let client = daemon_client(&home).await?;
            kith_node::media::cli::download(&client, &id, to, json).await?;
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
                for m in messages.as_array().into_iter().flatten() {
                    let out = m["direction"] == "out";
                    let file = &m["attachment"];
                    let text = if file.is_object() {
                        format!(
                            "[file {} ({} bytes, {}){}] {}",
                            file["name"].as_str().unwrap_or_default(),
                            file["size"],
                            m["id"].as_str().unwrap_or_default(),
                            file["path"]
                                .as_str()
                                .map(|p| format!(" at {p}"))
                                .unwrap_or_else(|| " not downloaded".into()),
                            m["text"].as_str().unwrap_or_default(),
                        )
                    } else {
                        m["text"].as_str().unwrap_or_default().to_owned()
                    };
                    println!(
                        "{} {}  {}",
                        if out { "→" } else { "←" },
                        text,
                        if out {
                            tick(m["state"].as_str().unwrap_or_default())
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Read { with } => {
            let client = daemon_client(&home).await?;
            let read: Value = client.post("/v1/read", &json!({ "with": with })).await?;
            println!("marked {} message(s) read", read["read"]);
        }
        Command::Status { id, json } => {
            let client = daemon_client(&home).await?;
            let status: Value = client
                .get(&format!("/v1/status/{}", urlencode(&id)))
                .await?;
            if json {
                print_json(&status)?;
            } else {
                println!("{}", status["state"].as_str().unwrap_or_default());
                if let Some(members) = status["members"].as_object() {
                    for (peer, state) in members {
                        println!("  {peer}  {}", state.as_str().unwrap_or_default());
                    }
                }
                if let Some(reason) = status["reason"].as_str() {
                    println!("pending because: {reason}");
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
                    Some(ms) => println!("offline, last seen {}", format_time_ms(ms)),
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
            json,
        } => {
            let mut settings = Settings::load(&home)?;
            let before = settings.clone();
            if let Some(presence) = presence {
                settings.presence = presence;
            }
            if let Some(read_receipts) = read_receipts {
                settings.read_receipts = read_receipts;
            }
            if settings != before {
                settings.save(&home)?;
                if Client::for_home(&home).is_ok() {
                    eprintln!("saved; restart the daemon to apply");
                }
            }
            if json {
                print_json(&json!({
                    "name": settings.name,
                    "presence": settings.presence,
                    "read_receipts": settings.read_receipts,
                }))?;
            } else {
                println!("name:          {}", settings.name);
                println!("presence:      {}", settings.presence);
                println!(
                    "read receipts: {}",
                    if settings.read_receipts { "on" } else { "off" }
                );
            }
        }
        Command::Demo { json } => {
            kith_node::demo::run(json)
                .await
                .context("the demo failed")?;
        }
        Command::Group(command) => {
            let client = daemon_client(&home).await?;
            kith_node::group::cli::run(&client, command).await?;
        }
        Command::Events { json: _ } => {
            let client = daemon_client(&home).await?;
            client.events(|event| println!("{event}")).await?;
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

fn format_time_ms(ms: u64) -> String {
    let ago = kith_node::engine::now_ms().saturating_sub(ms) / 1000;
    match ago {
        0..=59 => format!("{ago} s ago"),
        60..=3599 => format!("{} min ago", ago / 60),
        3600..=86399 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86400),
    }
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
    let cli = Cli::parse();
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
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kith: {e:#}");
            ExitCode::FAILURE
        }
    }
}
