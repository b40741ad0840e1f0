//! The relay's configuration: every limit is a field with its unit in the name.
//!
//! A [`Config`] starts from [`Config::default`] (values chosen for chat, documented per field),
//! may be loaded from a TOML file with [`Config::from_toml_file`] (missing fields keep their
//! defaults, unknown fields are an error), and is then overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// The most [`Config::max_pushes_per_recipient`] may be: half of the 512 streams a yamux
/// connection carries, the rest for the recipient's own requests and relayed circuits.
pub const MAX_PUSHES_PER_RECIPIENT: usize = 256;

/// Everything a relay needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the identity, the mailbox store and `relay.json` live.
    pub data_dir: PathBuf,
    /// Addresses to listen on; port 0 picks a free port.
    pub listen: Vec<Multiaddr>,
    /// Where to serve Prometheus metrics at `GET /metrics`; `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// How long a connection without open streams stays up. Nodes keep their home-relay
    /// connection, so this is long.
    pub idle_connection_timeout_secs: u64,

    /// Connections: most established connections at once, all peers together.
    pub max_connections: u32,
    /// Connections: most established connections of one peer at once.
    pub max_connections_per_peer: u32,
    /// Connections: most incoming connections still in their handshake at once.
    pub max_pending_incoming_connections: u32,
    /// Connections: sustained new incoming connections per second from one IP address; one
    /// beyond it (and the burst) is closed before its handshake and counted as
    /// `limit_hits{limit="connections_per_ip_rate"}`. Established connections are not
    /// affected.
    pub new_connections_per_ip_per_sec: u32,
    /// Connections: new incoming connections one IP address may open in a burst.
    pub new_connection_burst_per_ip: u32,
    /// Connections: sustained new incoming TCP connections per second the relay accepts from
    /// everyone together; beyond it (and the burst) it stops accepting for as long as the
    /// next one takes to be allowed, and new connections wait in the kernel's listen backlog
    /// (counted as `limit_hits{limit="new_connections_rate"}`). Established connections are
    /// not affected.
    pub new_connections_per_sec: u32,
    /// Connections: new incoming TCP connections the relay accepts in a burst.
    pub new_connection_burst: u32,
    /// Requests: malformed requests (frames that do not decode) one peer may send a second,
    /// sustained; beyond it and `malformed_request_burst_per_peer`, the peer is banned for
    /// `ban_secs` (see `ban_secs`). Well-behaved nodes send none.
    pub malformed_requests_per_peer_per_sec: u32,
    /// Requests: malformed requests one peer may send at once before it is banned.
    pub malformed_request_burst_per_peer: u32,
    /// Requests: how long a peer that sent too many malformed requests is shut out: its
    /// connections are closed and new ones refused after their handshake, counted as
    /// `limit_hits{limit="banned_peer"}`.
    pub ban_secs: u64,
    /// Connections: the CPU priority (`nice`, 0 to 19) of the newcomers' lane, the thread that
    /// runs handshakes and the connections not yet on the relay's lane (younger than
    /// `newcomer_ms`, or yet to send a well-formed request, or whose peer was struck). Higher
    /// is lower priority: the relay's users are served first when strangers keep it busy. 0
    /// runs the lane at the relay's own priority.
    pub newcomer_lane_nice: i32,
    /// Connections: how long a new connection stays on the newcomers' lane at least, however
    /// well it speaks, in milliseconds: attackers' fresh identities seldom live this long, a
    /// relay's users stay connected.
    pub newcomer_ms: u64,
    /// Requests: most request streams open at once on one connection (all of kith's protocols
    /// together); libp2p drops a stream beyond it.
    pub max_streams_per_connection: usize,
    /// Requests: most bytes that request frames being read may hold together, all connections
    /// included. A frame's buffer grows as its bytes arrive; one that would pass this is
    /// answered `Busy` (after `busy_retry_after_ms`).
    pub read_buffer_budget_bytes: usize,
    /// Requests: bytes of request frames each connection may hold outside
    /// `read_buffer_budget_bytes`, its own reserve: however much other connections hold, a
    /// connection's small requests are still read. Costs at most this much per open connection.
    pub read_buffer_reserved_per_connection_bytes: usize,
    /// Requests: most bytes that the request frames of one connection may hold together, its
    /// reserve included; a frame that would pass it is answered `Busy` and counted as
    /// `limit_hits{limit="read_buffer_per_connection"}`.
    pub read_buffer_max_per_connection_bytes: usize,

    /// Circuit relay: most reservations held at once.
    pub max_reservations: usize,
    /// Circuit relay: most reservations per peer.
    pub max_reservations_per_peer: usize,
    /// Circuit relay: how long a reservation lasts before the node must renew it.
    pub reservation_duration_secs: u64,
    /// Circuit relay: most circuits at once.
    pub max_circuits: usize,
    /// Circuit relay: most circuits per peer.
    pub max_circuits_per_peer: usize,
    /// Circuit relay: longest life of one circuit (libp2p has no "unlimited" here).
    pub max_circuit_duration_secs: u64,
    /// Circuit relay: most bytes per circuit, both directions together; 0 is unlimited.
    pub max_circuit_bytes: u64,
    /// Circuit relay: reservation requests per peer per minute (burst of as many); 0 disables
    /// the limiter.
    pub reservations_per_peer_per_minute: u32,
    /// Circuit relay: reservation requests per source IP per minute; 0 disables the limiter.
    pub reservations_per_ip_per_minute: u32,
    /// Circuit relay: circuit requests per source peer per minute; 0 disables the limiter.
    pub circuits_per_peer_per_minute: u32,
    /// Circuit relay: circuit requests per source IP per minute; 0 disables the limiter.
    pub circuits_per_ip_per_minute: u32,

    /// Mailbox: how long an undelivered envelope is kept.
    pub mailbox_ttl_secs: u64,
    /// Mailbox: how often expired envelopes are purged (besides at each entry's own deadline).
    pub purge_interval_secs: u64,
    /// Temporary chats: the clock skew tolerated on an envelope's `expires_at_ms`, in ms. A
    /// deposit is refused, and a held envelope dropped, once its expiry plus this has passed.
    pub expiry_skew_ms: u64,
    /// Mailbox: most envelopes waiting for one recipient.
    pub mailbox_max_messages: u64,
    /// Mailbox: most stored bytes waiting for one recipient.
    pub mailbox_max_bytes: u64,
    /// The store's page cache (sled's `cache_capacity`), in bytes: what the relay keeps of its
    /// database in memory, so memory does not grow with what is stored.
    pub store_cache_bytes: u64,
    /// Mailbox: most bytes all mailboxes together may take on disk (the mailbox's disk budget),
    /// as the store's files take them (`mailbox::store::on_disk`: about twice the records'
    /// bytes plus 3 KiB per entry); a deposit beyond it is refused `QuotaExceeded` with
    /// `mailbox_full_retry_after_ms`.
    pub mailbox_budget_bytes: u64,
    /// Mailbox: the part of `mailbox_budget_bytes` each user of the relay (an owner that
    /// fetches here) has to itself, estimated like the budget, so that deposits for ids
    /// nobody fetches cannot fill the budget for everyone. The relay takes at most
    /// `mailbox_budget_bytes / 2 / this` users, and forgets one `mailbox_ttl_secs` after its
    /// last fetch; an owner it has no room for is counted as
    /// `limit_hits{limit="mailbox_users"}`. 0 makes the whole budget first come, first served.
    pub mailbox_reserved_bytes_per_user: u64,
    /// Mailbox: most delivered message ids remembered per recipient (each until its entry's
    /// `mailbox_ttl_secs` ends), so that a replay of a delivered envelope is answered as
    /// already stored instead of being stored again; 0 remembers none.
    pub mailbox_max_delivered_ids: u64,
    /// Mailbox: most envelopes one sender may have waiting for one recipient (its share of
    /// that mailbox); beyond it a deposit is refused `QuotaExceeded` with
    /// `mailbox_full_retry_after_ms`, and counted as `limit_hits{limit="mailbox_sender_share"}`.
    pub mailbox_max_messages_per_sender: u64,
    /// Mailbox: most stored bytes one sender may have waiting for one recipient.
    pub mailbox_max_bytes_per_sender: u64,
    /// Mailbox: sustained deposits per second per depositing peer.
    pub deposits_per_sec_per_peer: u32,
    /// Mailbox: deposits a peer may make in a burst above the sustained rate.
    pub deposit_burst_per_peer: u32,
    /// Mailbox: how long a deposit refused for a full mailbox asks its sender to wait before
    /// trying that recipient here again (`retry_after_ms` in the answer).
    pub mailbox_full_retry_after_ms: u64,
    /// Logs: at most one WARN line per peer about its refused requests in this many seconds
    /// (the first refusal, then a summary with the count); every refusal is counted in
    /// `kith_relay_rejects_total` anyway.
    pub refusal_log_interval_secs: u64,
    /// Mailbox: requests queued for the store before new ones are answered `Busy`.
    pub max_pending_mailbox_requests: usize,
    /// Mailbox: how long a `Busy` answer asks the requester to wait.
    pub busy_retry_after_ms: u64,
    /// Mailbox: push a deposit over `/kith/dm/1` when its recipient is connected.
    pub push_to_connected: bool,
    /// Mailbox: most pushes awaiting an answer; beyond that envelopes wait for a fetch.
    pub max_pending_pushes: usize,
    /// Mailbox: most pushes awaiting an answer from one recipient (each is a stream on its
    /// connection); the envelopes stored meanwhile are pushed once those are answered.
    pub max_pushes_per_recipient: usize,

    /// Presence: longest silence after a node's heartbeat before it shows offline (a node may
    /// ask for less).
    pub presence_offline_after_ms: u64,
    /// Presence: most peers whose online state and last seen are remembered (in memory).
    pub presence_max_tracked_peers: usize,

    /// Load shedding: refuse low-priority work with `Busy` under load (presence first, then
    /// receipts, then group operations; never messages). See `shed.rs`.
    pub shed_enabled: bool,
    /// Load shedding: requests in flight that count as full load; 0 turns this limit off.
    pub shed_max_in_flight_requests: usize,
    /// Load shedding: store flush duration that counts as full load; 0 turns this limit off.
    pub shed_max_flush_latency_ms: u64,

    /// Groups: most members of a group hosted here (the 201st add is refused).
    pub max_group_members: usize,
    /// Groups: gossipsub heartbeat interval (mesh upkeep); tests shorten it.
    pub gossip_heartbeat_interval_ms: u64,
    /// Groups: most gossipsub topics one peer may subscribe to (libp2p's default filter allows
    /// 100, fewer than a member of many groups needs).
    pub max_gossip_topics_per_peer: usize,
    /// Groups: sustained membership operations (creations included) per second per peer.
    /// Group messages and announced changes also cost their poster one deposit per member.
    pub group_ops_per_sec_per_peer: u32,
    /// Groups: membership operations a peer may submit in a burst.
    pub group_op_burst_per_peer: u32,
    /// Groups: sustained group creations per second, all peers together (identities are free,
    /// and each new one gets `group_op_burst_per_peer`); beyond it a creation is answered
    /// `Busy` and counted as `limit_hits{limit="group_creation_rate"}`.
    pub group_creations_per_sec: u32,
    /// Groups: creations in a burst above the sustained rate, all peers together.
    pub group_creation_burst: u32,
    /// Groups: sustained membership operations per second of all newcomers together
    /// (connections on the newcomers' lane, `newcomer_ms`), on top of their per-peer limits:
    /// a fresh identity's burst would otherwise let identities churned by the dozen spend the
    /// relay's writes and flushes before its users'. Beyond it an operation is answered `Busy`
    /// and counted as `limit_hits{limit="group_newcomer_op_rate"}`.
    pub group_newcomer_ops_per_sec: u32,
    /// Groups: newcomers' operations in a burst above their sustained rate, all together.
    pub group_newcomer_op_burst: u32,
    /// Groups: requests queued for the group service before new ones are answered `Busy`.
    pub max_pending_group_requests: usize,

    /// Files: largest file whose chunks this relay accepts, in bytes (checked by `Begin`).
    pub blob_max_file_bytes: u64,
    /// Files: most bytes of encrypted chunks one uploader may have stored here at once.
    pub blob_quota_bytes_per_peer: u64,
    /// Files: most bytes of encrypted chunks all uploaders together may have stored here (the
    /// blob store's disk budget); beyond it uploads are refused `QuotaExceeded`.
    pub blob_budget_bytes: u64,
    /// Files: how long a stored chunk is kept, in seconds.
    pub blob_ttl_secs: u64,
    /// Files: `/kith/blob/1` requests in progress before new ones are answered `Busy`.
    pub max_pending_blob_requests: usize,

    /// The clock the mailbox reads; tests inject one they can advance.
    #[serde(skip)]
    pub clock: Clock,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: default_listen(),
            metrics_addr: None,
            idle_connection_timeout_secs: 3600,
            max_connections: 20_000,
            max_connections_per_peer: 8,
            max_pending_incoming_connections: 256,
            new_connections_per_ip_per_sec: 50,
            new_connection_burst_per_ip: 500,
            new_connections_per_sec: 500,
            new_connection_burst: 1_000,
            malformed_requests_per_peer_per_sec: 1,
            malformed_request_burst_per_peer: 20,
            ban_secs: 600,
            newcomer_lane_nice: 10,
            newcomer_ms: 1_000,
            max_streams_per_connection: 256,
            read_buffer_budget_bytes: 64 * 1024 * 1024,
            read_buffer_reserved_per_connection_bytes: 16 * 1024,
            read_buffer_max_per_connection_bytes: 4 * 1024 * 1024,
            max_reservations: 10_000,
            max_reservations_per_peer: 4,
            reservation_duration_secs: 3600,
            max_circuits: 1_000,
            max_circuits_per_peer: 16,
            max_circuit_duration_secs: 3600,
            max_circuit_bytes: 0,
            reservations_per_peer_per_minute: 60,
            reservations_per_ip_per_minute: 6_000,
            circuits_per_peer_per_minute: 600,
            circuits_per_ip_per_minute: 60_000,
            mailbox_ttl_secs: 30 * 24 * 3600,
            purge_interval_secs: 60,
            expiry_skew_ms: kith_protocol::timer::DEFAULT_SKEW_MS,
            mailbox_max_messages: 10_000,
            mailbox_max_delivered_ids: 10_000,
            mailbox_max_messages_per_sender: 5_000,
            mailbox_max_bytes_per_sender: 32 * 1024 * 1024,
            mailbox_max_bytes: 64 * 1024 * 1024,
            mailbox_budget_bytes: 16 * 1024 * 1024 * 1024,
            mailbox_reserved_bytes_per_user: 1024 * 1024,
            store_cache_bytes: 64 * 1024 * 1024,
            deposits_per_sec_per_peer: 100,
            deposit_burst_per_peer: 1_000,
            mailbox_full_retry_after_ms: 10_000,
            refusal_log_interval_secs: 60,
            max_pending_mailbox_requests: 4_096,
            busy_retry_after_ms: 1_000,
            push_to_connected: true,
            max_pending_pushes: 4_096,
            max_pushes_per_recipient: 64,
            presence_offline_after_ms: 30_000,
            presence_max_tracked_peers: 100_000,
            shed_enabled: true,
            shed_max_in_flight_requests: 1_024,
            shed_max_flush_latency_ms: 250,
            max_group_members: kith_protocol::group::DEFAULT_MAX_MEMBERS,
            gossip_heartbeat_interval_ms: 1_000,
            max_gossip_topics_per_peer: 10_000,
            group_ops_per_sec_per_peer: 2,
            group_op_burst_per_peer: 60,
            group_creations_per_sec: 5,
            group_creation_burst: 50,
            group_newcomer_ops_per_sec: 10,
            group_newcomer_op_burst: 20,
            max_pending_group_requests: 1_024,
            blob_max_file_bytes: 2 * 1024 * 1024 * 1024,
            blob_quota_bytes_per_peer: 8 * 1024 * 1024 * 1024,
            blob_budget_bytes: 64 * 1024 * 1024 * 1024,
            blob_ttl_secs: 7 * 24 * 3600,
            max_pending_blob_requests: 256,
            clock: Clock::system(),
        }
    }
}

/// The platform data directory plus `kith-relay` (the current directory if there is none).
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kith-relay")
}

/// `/ip4/0.0.0.0/tcp/4001` and `/ip4/0.0.0.0/udp/4001/quic-v1`.
pub fn default_listen() -> Vec<Multiaddr> {
    ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// Why a configuration file could not be loaded, or a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a relay config.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config value for {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl Config {
    /// Loads a TOML file; fields it does not mention keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// A configuration for tests and in-process use: `data_dir`, one TCP listener on
    /// `127.0.0.1` with a free port, defaults otherwise.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: "/ip4/127.0.0.1/tcp/0".parse().into_iter().collect(),
            ..Self::default()
        }
    }

    /// Checks values that would make the relay misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if self.listen.is_empty() {
            return invalid("listen", "at least one address is needed");
        }
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return invalid("max_connections", "connection limits must be above 0");
        }
        if self.mailbox_max_messages_per_sender == 0 || self.mailbox_max_bytes_per_sender == 0 {
            return invalid(
                "mailbox_max_messages_per_sender",
                "a sender's share of a mailbox must be above 0",
            );
        }
        if self.mailbox_reserved_bytes_per_user > self.mailbox_budget_bytes / 2 {
            return invalid(
                "mailbox_reserved_bytes_per_user",
                "must be at most half of mailbox_budget_bytes (users' reserves take at most half)",
            );
        }
        if !(0..=19).contains(&self.newcomer_lane_nice) {
            return invalid("newcomer_lane_nice", "must be 0 to 19");
        }
        if !(1..=MAX_PUSHES_PER_RECIPIENT).contains(&self.max_pushes_per_recipient) {
            return invalid(
                "max_pushes_per_recipient",
                "must be 1 to 256 (a connection carries at most 512 streams)",
            );
        }
        if self.max_streams_per_connection == 0 {
            return invalid("max_streams_per_connection", "must be above 0");
        }
        if self.read_buffer_budget_bytes < kith_protocol::mailbox::MAX_REQUEST_BYTES {
            return invalid(
                "read_buffer_budget_bytes",
                "must hold at least one mailbox request (67584 bytes)",
            );
        }
        if self.read_buffer_max_per_connection_bytes < kith_protocol::blob::MAX_FRAME_BYTES {
            return invalid(
                "read_buffer_max_per_connection_bytes",
                "must hold at least one blob request (the largest request frame)",
            );
        }
        if self.mailbox_ttl_secs == 0 {
            return invalid("mailbox_ttl_secs", "must be above 0");
        }
        if self.blob_ttl_secs == 0 {
            return invalid("blob_ttl_secs", "must be above 0");
        }
        if self.max_pending_blob_requests == 0 {
            return invalid("max_pending_blob_requests", "must be above 0");
        }
        if self.purge_interval_secs == 0 {
            return invalid("purge_interval_secs", "must be above 0");
        }
        if self.max_circuit_duration_secs == 0 {
            return invalid("max_circuit_duration_secs", "must be above 0");
        }
        let rates = [
            (
                "deposits_per_sec_per_peer",
                self.deposits_per_sec_per_peer,
                self.deposit_burst_per_peer,
            ),
            (
                "malformed_requests_per_peer_per_sec",
                self.malformed_requests_per_peer_per_sec,
                self.malformed_request_burst_per_peer,
            ),
            (
                "new_connections_per_ip_per_sec",
                self.new_connections_per_ip_per_sec,
                self.new_connection_burst_per_ip,
            ),
            (
                "new_connections_per_sec",
                self.new_connections_per_sec,
                self.new_connection_burst,
            ),
        ];
        if let Some((field, ..)) = rates
            .iter()
            .find(|(_, rate, burst)| *rate == 0 || *burst == 0)
        {
            return invalid(field, "rate and burst must be above 0");
        }
        if self.presence_offline_after_ms == 0 {
            return invalid("presence_offline_after_ms", "must be above 0");
        }
        if self.max_pending_mailbox_requests == 0 {
            return invalid("max_pending_mailbox_requests", "must be above 0");
        }
        if self.max_group_members == 0 {
            return invalid("max_group_members", "must be above 0");
        }
        if self.group_creations_per_sec == 0 || self.group_creation_burst == 0 {
            return invalid(
                "group_creations_per_sec",
                "group creation limits must be above 0",
            );
        }
        if self.group_newcomer_ops_per_sec == 0 || self.group_newcomer_op_burst == 0 {
            return invalid(
                "group_newcomer_ops_per_sec",
                "newcomers' group operation limits must be above 0",
            );
        }
        if self.group_ops_per_sec_per_peer == 0 || self.group_op_burst_per_peer == 0 {
            return invalid(
                "group_ops_per_sec_per_peer",
                "rate and burst must be above 0",
            );
        }
        if self.max_pending_group_requests == 0 {
            return invalid("max_pending_group_requests", "must be above 0");
        }
        if crate::group::gossip_config(self).is_err() {
            return invalid(
                "gossip_heartbeat_interval_ms",
                "gossipsub refuses these settings (the interval must be above 0)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_only_what_it_names() {
        let config: Config =
            toml::from_str("mailbox_max_messages = 3\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n")
                .expect("parses");
        assert_eq!(config.mailbox_max_messages, 3);
        assert_eq!(config.listen.len(), 1);
        assert_eq!(config.max_circuits, Config::default().max_circuits);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_zero_rate_or_burst_is_refused_by_name() {
        type Zero = fn(&mut Config);
        let zeroed: [(&str, Zero); 8] = [
            ("deposits_per_sec_per_peer", |c| {
                c.deposits_per_sec_per_peer = 0
            }),
            ("deposits_per_sec_per_peer", |c| {
                c.deposit_burst_per_peer = 0
            }),
            ("malformed_requests_per_peer_per_sec", |c| {
                c.malformed_requests_per_peer_per_sec = 0
            }),
            ("malformed_requests_per_peer_per_sec", |c| {
                c.malformed_request_burst_per_peer = 0
            }),
            ("new_connections_per_ip_per_sec", |c| {
                c.new_connections_per_ip_per_sec = 0
            }),
            ("new_connections_per_ip_per_sec", |c| {
                c.new_connection_burst_per_ip = 0
            }),
            ("new_connections_per_sec", |c| c.new_connections_per_sec = 0),
            ("new_connections_per_sec", |c| c.new_connection_burst = 0),
        ];
        for (field, zero) in zeroed {
            let mut config = Config::default();
            zero(&mut config);
            match config.validate() {
                Err(ConfigError::Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn pushes_per_recipient_stay_below_a_connections_streams() {
        for (value, ok) in [(0, false), (1, true), (256, true), (257, false)] {
            let config = Config {
                max_pushes_per_recipient: value,
                ..Config::default()
            };
            match config.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(ConfigError::Invalid { field, .. }) => {
                    assert!(!ok, "{value} refused");
                    assert_eq!(field, "max_pushes_per_recipient");
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("max_circuitz = 1\n").is_err());
    }

    #[test]
    fn defaults_listen_on_tcp_and_quic() {
        let config = Config::default();
        assert_eq!(config.listen.len(), 2);
        assert!(config.validate().is_ok());
    }
}
