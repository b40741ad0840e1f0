//! The command line's grammar: every command, argument and flag of `kith`, as clap parses them.
//! What each command does is in the file of its group ([`super::node`], [`super::contacts`],
//! [`super::messages`], [`super::groups`], [`super::files`], [`super::chats`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;

/// kith: peer-to-peer chat. Run `kith init`, then `kith daemon`, then talk to it with the other
/// commands from another terminal.
#[derive(Parser)]
#[command(name = "kith", version, about, long_about = None)]
pub struct Cli {
    /// The node's home directory (identity, messages, settings).
    #[arg(long, env = "KITH_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Whether --home was given on the command line (not through KITH_HOME).
    #[arg(skip)]
    pub home_flag: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Group chats: create, add, remove, promote, leave, rekey, list, info, and invitations from
    /// strangers (invitations, accept, decline).
    #[command(subcommand)]
    Group(super::groups::GroupCommand),
    /// Messages from strangers (peers not in your contacts): list, accept or block.
    Requests(super::contacts::RequestsArgs),
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
pub enum ChatCommand {
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
pub enum ContactCommand {
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

/// `on` or `off` (also `true`/`false`, `yes`/`no`).
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}
