//! Node configuration: the per-home settings file and the runtime [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kith_protocol::retry::Backoff;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// File name of the settings inside the home directory.
pub const SETTINGS_FILE: &str = "config.toml";

/// What the user chose, kept in `<home>/config.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The display name shown in invites.
    pub name: String,
    /// Whether to send `Read` receipts when a conversation is read.
    pub read_receipts: bool,
    /// Who may see whether this node is online and when it was last seen: `everyone`,
    /// `contacts` or `nobody`. Enforced by the node and by its home relays.
    pub presence: kith_protocol::presence::Visibility,
    /// Who may send this user messages: `everyone` (strangers' messages wait in the requests
    /// list) or `contacts` (strangers are refused by the node and its home relays).
    pub reach: kith_protocol::presence::Reach,
    /// Largest file `send-file` sends, in bytes; larger ones are refused before any upload.
    pub max_file_bytes: u64,
    /// Received files up to this size, in bytes, download at once; larger ones on
    /// `kith download`.
    pub auto_download_max_bytes: u64,
    /// The home relays the daemon last ran with (`kith daemon --relay`), remembered so that
    /// `kith daemon` alone uses them again and `kith id` lists them in the invite while the
    /// daemon is stopped.
    pub relays: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            name: "anonymous".into(),
            read_receipts: true,
            presence: kith_protocol::presence::Visibility::Everyone,
            reach: kith_protocol::presence::Reach::Everyone,
            max_file_bytes: 2 * 1024 * 1024 * 1024,
            auto_download_max_bytes: 16 * 1024 * 1024,
            relays: Vec::new(),
        }
    }
}

/// Why the settings could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Settings`].
    #[error("{path}: {detail} (fix or delete the file)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
}

impl Settings {
    /// Reads `<home>/config.toml`; defaults when it does not exist.
    pub fn load(home: &Path) -> Result<Self, SettingsError> {
        let path = home.join(SETTINGS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| SettingsError::Parse {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(SettingsError::Io { path, source }),
        }
    }

    /// Writes `<home>/config.toml`.
    pub fn save(&self, home: &Path) -> Result<(), SettingsError> {
        let path = home.join(SETTINGS_FILE);
        let text = toml::to_string_pretty(self).map_err(|e| SettingsError::Parse {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::write(&path, text)
            .and_then(|()| crate::private::set_mode(&path, crate::private::FILE_MODE))
            .map_err(|source| SettingsError::Io { path, source })
    }
}

/// A change of settings asked of a running node (`kith settings`, `kith name`): the fields
/// given change, the others stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsChange {
    /// A new display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who may see this node's online state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<kith_protocol::presence::Visibility>,
    /// Whether to send read receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_receipts: Option<bool>,
    /// Who may send this user messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<kith_protocol::presence::Reach>,
}

/// The settings in effect, as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettingsView {
    /// The display name.
    pub name: String,
    /// Who may see this node's online state.
    pub presence: kith_protocol::presence::Visibility,
    /// Whether read receipts are sent.
    pub read_receipts: bool,
    /// Who may send this user messages.
    pub reach: kith_protocol::presence::Reach,
    /// Largest file sent, in bytes.
    pub max_file_bytes: u64,
    /// Received files up to this size download at once.
    pub auto_download_max_bytes: u64,
    /// The home relays in effect.
    pub relays: Vec<String>,
}

impl crate::core::Node {
    /// The settings in effect.
    pub fn settings_view(&self) -> SettingsView {
        let s = self.settings();
        SettingsView {
            name: s.name,
            presence: s.presence,
            read_receipts: s.read_receipts,
            reach: s.reach,
            max_file_bytes: s.max_file_bytes,
            auto_download_max_bytes: s.auto_download_max_bytes,
            relays: self.config().relays.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Applies `change` to the running node and saves it in `<home>/config.toml`. A new
    /// presence setting reaches the home relays at once.
    pub fn update_settings(
        &self,
        change: SettingsChange,
    ) -> Result<SettingsView, crate::core::NodeError> {
        let name = change.name.as_deref().map(valid_display_name).transpose()?;
        let before = self.settings();
        self.change_settings(|s| {
            if let Some(name) = name {
                s.name = name.to_owned();
            }
            if let Some(presence) = change.presence {
                s.presence = presence;
            }
            if let Some(read_receipts) = change.read_receipts {
                s.read_receipts = read_receipts;
            }
            if let Some(reach) = change.reach {
                s.reach = reach;
            }
        })
        .map_err(|e| crate::core::NodeError::Invalid(e.to_string()))?;
        if self.settings().presence != before.presence || self.settings().reach != before.reach {
            self.presence_state().wake();
        }
        Ok(self.settings_view())
    }
}

/// Longest display name, in bytes.
pub const MAX_DISPLAY_NAME_BYTES: usize = 64;

/// A display name, trimmed, if acceptable: 1 to [`MAX_DISPLAY_NAME_BYTES`] bytes of printable
/// text (it travels in invites and shows on other people's terminals).
pub fn valid_display_name(name: &str) -> Result<&str, crate::core::NodeError> {
    let name = name.trim();
    if name.is_empty()
        || name.len() > MAX_DISPLAY_NAME_BYTES
        || name.chars().any(crate::text::is_unsafe_char)
    {
        return Err(crate::core::NodeError::Invalid(format!(
            "a name is 1 to {MAX_DISPLAY_NAME_BYTES} bytes of printable text"
        )));
    }
    Ok(name)
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The home directory (identity, store, settings, API files).
    pub home: PathBuf,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Home relays, each ending in `/p2p/<relay id>`.
    pub relays: Vec<Multiaddr>,
    /// Where the local HTTP API listens (loopback only).
    pub api: SocketAddr,
    /// Whether to find peers on the LAN with mDNS.
    pub mdns: bool,
    /// How long one direct delivery attempt may take before falling back to the relays.
    pub delivery_timeout: Duration,
    /// The retry schedule for undelivered envelopes.
    pub backoff: Backoff,
    /// Most delivery attempts in flight at once.
    pub max_in_flight: usize,
    /// Most delivery requests in flight to one peer at once; while they are, further messages
    /// to it gather and leave together, several envelopes per request.
    pub max_in_flight_per_peer: usize,
    /// How often the node polls its home relays' mailboxes even without a reconnect.
    pub mailbox_poll_interval: Duration,
    /// gossipsub heartbeat interval for group topics (mesh upkeep; tests shorten it).
    pub gossip_heartbeat: Duration,
    /// Most members of a group this node creates or accepts (the relay has its own limit).
    pub max_group_members: usize,
    /// A member refreshes its keys in a group (an MLS self-update, for post-compromise
    /// security) before sending once it has sent this many messages since its last commit.
    pub group_rekey_messages: u64,
    /// ... or once its last commit in the group is older than this.
    pub group_rekey_after: Duration,
    /// How long adding a member waits for one of its MLS key packages (a node publishes them
    /// to its home relays when it connects; one just started may not have yet).
    pub package_claim_wait: Duration,
    /// How long receipts for group messages wait to be batched into one envelope per sender.
    pub receipt_batch_window: Duration,
    /// How often the node sends a presence heartbeat to each connected home relay.
    pub heartbeat_interval: Duration,
    /// How long after its last heartbeat the node's relays should show it offline (they may
    /// cap it). Keep it a few heartbeat intervals.
    pub presence_offline_after: Duration,
    /// How long relays keep what they hold for a recipient (their `mailbox_ttl_secs`): a
    /// message that has not left the outbox this long after it was sent becomes `failed`, and
    /// a download that has not finished this long after its message was sent (or first
    /// tried) gives up. Tests shorten it.
    pub mailbox_ttl: Duration,
    /// Shortest disappearing-message timer the user may set, in seconds (messages from
    /// others may carry any timer from [`kith_protocol::timer::MIN_SECS`]).
    pub min_timer_secs: u64,
    /// Clock skew tolerated on the expiry of received messages ([`kith_protocol::timer`]).
    pub expiry_skew_ms: u64,
}

impl Config {
    /// Defaults for a home directory: listen on every interface (TCP and QUIC, random ports),
    /// API on a random loopback port.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            relays: Vec::new(),
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            mdns: false,
            delivery_timeout: Duration::from_secs(5),
            backoff: Backoff::default(),
            max_in_flight: 256,
            max_in_flight_per_peer: 4,
            mailbox_poll_interval: Duration::from_secs(30),
            gossip_heartbeat: Duration::from_secs(1),
            max_group_members: kith_protocol::group::DEFAULT_MAX_MEMBERS,
            receipt_batch_window: Duration::from_millis(50),
            group_rekey_messages: 1_000,
            group_rekey_after: Duration::from_secs(7 * 24 * 3600),
            package_claim_wait: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
            presence_offline_after: Duration::from_secs(30),
            mailbox_ttl: Duration::from_secs(30 * 24 * 3600),
            min_timer_secs: 30,
            expiry_skew_ms: kith_protocol::timer::DEFAULT_SKEW_MS,
        }
    }

    /// Defaults for tests and the demo: loopback TCP only, short timeouts.
    pub fn loopback(home: impl Into<PathBuf>) -> Self {
        Self {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            delivery_timeout: Duration::from_secs(2),
            gossip_heartbeat: Duration::from_millis(200),
            backoff: Backoff {
                base_ms: 200,
                max_ms: 2_000,
            },
            // Tests and the demo use timers of seconds, on one clock.
            min_timer_secs: 1,
            expiry_skew_ms: 1_000,
            ..Self::new(home)
        }
    }
}
