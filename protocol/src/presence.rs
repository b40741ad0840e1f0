//! `/kith/presence/1`: heartbeats, online / last seen, visibility, typing; and the pure
//! [`Tracker`] a relay keeps.
//!
//! Flow, node ↔ relay: a node sends a [`Request::Heartbeat`] to each home relay every few
//! seconds over the connection it keeps anyway, marked [`Activity::User`] when the user did
//! something since the last one (sent, read, typed, opened a chat) and [`Activity::App`]
//! otherwise. Only user activity moves "last seen". Each heartbeat names the digest of the node's
//! visibility [`Policy`]; the relay answers [`Response::Ack`] with `policy_known: false` when it
//! does not hold that policy, and the node sends the next heartbeat with the policy itself. A node
//! that stops cleanly sends [`Request::Goodbye`]. Anyone may send [`Request::Query`]; the relay
//! answers [`Response::Status`] as far as the queried user's policy allows the asker to see.
//!
//! Flow, node ↔ node: [`Request::Query`] about the answering node itself (same policy), and
//! [`Request::Typing`] (never stored, never retried).
//!
//! A user hidden from the asker (policy `contacts` and the asker is not a contact, or `nobody`)
//! is answered exactly like a user the answerer knows nothing about: `online: false,
//! last_seen_ms: None`. The asker cannot tell "hidden" from "unknown", so the answer leaks nothing.
//! Typed rejects are kept for requests that are wrong or cannot be served now (`Busy`).
//!
//! The same policy carries who may reach the user ([`Reach`]) and whom the user blocked, so that
//! the user's relays refuse mailbox deposits from strangers (for `reach = contacts`) and from
//! blocked peers ([`Policy::accepts_from`]). Both fields are absent on the wire when they hold
//! their defaults, so older relays and nodes read the policy as before.

use std::collections::HashMap;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::ids::peer_bytes;
use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/presence/1";

/// Most contacts a [`Policy`] lists; a node with more sends the first this many.
pub const MAX_POLICY_CONTACTS: usize = 2_048;

/// Most blocked peers a [`Policy`] lists; a node with more sends the first this many.
pub const MAX_POLICY_BLOCKED: usize = 512;

/// Largest frame on this protocol (a heartbeat with a full policy fits).
pub const MAX_FRAME_BYTES: usize = 128 * 1024;

/// What caused a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Activity {
    /// The user did something (sent, read, typed, opened a chat): moves "last seen".
    User,
    /// Background work only (sync, retries, receipts): keeps the node online, nothing more.
    App,
}

/// Who may see a user's online state and last seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Anyone who asks.
    #[default]
    Everyone,
    /// Only the user's contacts.
    Contacts,
    /// Nobody.
    Nobody,
}

impl Visibility {
    /// The setting's name in settings files, the CLI and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        }
    }
}

impl std::fmt::Display for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A visibility name that is none of `everyone`, `contacts`, `nobody`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown visibility {0:?} (use everyone, contacts or nobody)")]
pub struct ParseVisibilityError(pub String);

impl std::str::FromStr for Visibility {
    type Err = ParseVisibilityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "everyone" => Ok(Visibility::Everyone),
            "contacts" => Ok(Visibility::Contacts),
            "nobody" => Ok(Visibility::Nobody),
            _ => Err(ParseVisibilityError(s.to_owned())),
        }
    }
}

/// Who may send a user messages: anyone (strangers' messages wait in the user's requests
/// list), or only the user's contacts (strangers are refused, by the user's relays and node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Anyone.
    #[default]
    Everyone,
    /// Only the user's contacts.
    Contacts,
}

impl Reach {
    /// The setting's name in settings files, the CLI and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reach::Everyone => "everyone",
            Reach::Contacts => "contacts",
        }
    }

    /// Whether this is the default, [`Reach::Everyone`] (left out on the wire).
    pub fn is_everyone(&self) -> bool {
        *self == Reach::Everyone
    }
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reach name that is neither `everyone` nor `contacts`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reach {0:?} (use everyone or contacts)")]
pub struct ParseReachError(pub String);

impl std::str::FromStr for Reach {
    type Err = ParseReachError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "everyone" => Ok(Reach::Everyone),
            "contacts" => Ok(Reach::Contacts),
            _ => Err(ParseReachError(s.to_owned())),
        }
    }
}

/// A user's visibility choice and, for [`Visibility::Contacts`] or [`Reach::Contacts`], who the
/// contacts are; who may reach the user and whom the user blocked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Who may see.
    pub visibility: Visibility,
    /// The user's contacts (only meaningful for [`Visibility::Contacts`] and
    /// [`Reach::Contacts`]), at most [`MAX_POLICY_CONTACTS`].
    #[serde(with = "peer_list")]
    pub contacts: Vec<PeerId>,
    /// Who may send the user messages (absent on the wire when `everyone`).
    #[serde(default, skip_serializing_if = "Reach::is_everyone")]
    pub reach: Reach,
    /// Peers the user blocked, at most [`MAX_POLICY_BLOCKED`] (absent on the wire when empty).
    #[serde(default, with = "peer_list", skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<PeerId>,
}

impl Policy {
    /// A policy; the contact list is sorted, deduplicated, truncated to [`MAX_POLICY_CONTACTS`],
    /// and dropped altogether unless `visibility` is `Contacts` (nobody else needs it).
    pub fn new(visibility: Visibility, contacts: impl IntoIterator<Item = PeerId>) -> Self {
        Self::with_reach(visibility, Reach::Everyone, contacts, [])
    }

    /// A policy with who may reach the user and whom it blocked. The contact list is kept when
    /// `visibility` or `reach` is `Contacts`; lists are sorted, deduplicated and truncated to
    /// [`MAX_POLICY_CONTACTS`] and [`MAX_POLICY_BLOCKED`].
    pub fn with_reach(
        visibility: Visibility,
        reach: Reach,
        contacts: impl IntoIterator<Item = PeerId>,
        blocked: impl IntoIterator<Item = PeerId>,
    ) -> Self {
        let mut contacts: Vec<PeerId> =
            if visibility == Visibility::Contacts || reach == Reach::Contacts {
                contacts.into_iter().collect()
            } else {
                Vec::new()
            };
        contacts.sort();
        contacts.dedup();
        contacts.truncate(MAX_POLICY_CONTACTS);
        let mut blocked: Vec<PeerId> = blocked.into_iter().collect();
        blocked.sort();
        blocked.dedup();
        blocked.truncate(MAX_POLICY_BLOCKED);
        Self {
            visibility,
            contacts,
            reach,
            blocked,
        }
    }

    /// Whether the user this policy belongs to (`owner`) takes messages from `sender`: never
    /// from a blocked peer, and only from contacts under [`Reach::Contacts`]. A user always
    /// takes its own.
    pub fn accepts_from(&self, owner: &PeerId, sender: &PeerId) -> bool {
        if owner == sender {
            return true;
        }
        if self.blocked.binary_search(sender).is_ok() {
            return false;
        }
        match self.reach {
            Reach::Everyone => true,
            Reach::Contacts => self.contacts.binary_search(sender).is_ok(),
        }
    }

    /// Whether `asker` may see the presence of `owner`, the user this policy belongs to.
    /// A user may always see itself.
    pub fn allows(&self, owner: &PeerId, asker: &PeerId) -> bool {
        if owner == asker {
            return true;
        }
        match self.visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => self.contacts.binary_search(asker).is_ok(),
            Visibility::Nobody => false,
        }
    }

    /// A stable 64-bit digest (FNV-1a over the visibility and the sorted contact ids), so a
    /// heartbeat can name the policy without carrying it.
    pub fn digest(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0100_0000_01b3;
        let mut hash = OFFSET;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        eat(self.visibility.as_str().as_bytes());
        for peer in &self.contacts {
            let bytes = peer.to_bytes();
            eat(&(bytes.len() as u32).to_be_bytes());
            eat(&bytes);
        }
        // Only when not the defaults, so a policy without them keeps the digest it had before
        // they existed.
        if !self.reach.is_everyone() || !self.blocked.is_empty() {
            eat(b"reach");
            eat(self.reach.as_str().as_bytes());
            for peer in &self.blocked {
                let bytes = peer.to_bytes();
                eat(&(bytes.len() as u32).to_be_bytes());
                eat(&bytes);
            }
        }
        hash
    }

    /// Checks the limits a decoder cannot: at most [`MAX_POLICY_CONTACTS`] contacts.
    pub fn validate(&self) -> Result<(), Reject> {
        if self.contacts.len() > MAX_POLICY_CONTACTS {
            return Err(Reject::TooLarge {
                max: MAX_POLICY_CONTACTS as u64,
            });
        }
        if self.blocked.len() > MAX_POLICY_BLOCKED {
            return Err(Reject::TooLarge {
                max: MAX_POLICY_BLOCKED as u64,
            });
        }
        Ok(())
    }

    /// The same policy with its lists sorted (so [`Policy::allows`] and
    /// [`Policy::accepts_from`] can search them).
    pub fn normalized(mut self) -> Self {
        self.contacts.sort();
        self.contacts.dedup();
        self.blocked.sort();
        self.blocked.dedup();
        self
    }
}

/// A presence request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Node → relay: "I am here". Answered [`Response::Ack`].
    Heartbeat {
        /// Echoed in the response.
        req_id: u64,
        /// What caused it.
        activity: Activity,
        /// How long after this heartbeat, without another, the node should show offline. The
        /// relay uses the smaller of this and its own limit.
        offline_after_ms: u64,
        /// [`Policy::digest`] of the node's current policy.
        policy_digest: u64,
        /// The policy itself, when the relay said it does not know it.
        policy: Option<Policy>,
    },
    /// Node → relay: "I am stopping"; show me offline now. Answered [`Response::Ack`].
    Goodbye {
        /// Echoed in the response.
        req_id: u64,
    },
    /// Anyone → relay or node: is `peer` online, and when was it last seen? Answered
    /// [`Response::Status`].
    Query {
        /// Echoed in the response.
        req_id: u64,
        /// Whom the asker wants to know about (a node only answers about itself).
        #[serde(with = "peer_bytes")]
        peer: PeerId,
    },
    /// Node → node: the sender is typing to the recipient. Answered [`Response::Ack`].
    Typing {
        /// Echoed in the response.
        req_id: u64,
    },
}

impl Request {
    /// The request's id.
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Heartbeat { req_id, .. }
            | Request::Goodbye { req_id }
            | Request::Query { req_id, .. }
            | Request::Typing { req_id } => *req_id,
        }
    }
}

/// A presence answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A heartbeat, goodbye or typing notice was taken.
    Ack {
        /// The request's id.
        req_id: u64,
        /// For heartbeats: whether the relay holds the policy named by the digest. When false,
        /// send the next heartbeat with the policy.
        policy_known: bool,
    },
    /// The answer to a query (`online: false, last_seen_ms: None` for a hidden or unknown user).
    Status {
        /// The request's id.
        req_id: u64,
        /// Whether the user's heartbeats arrive within the threshold.
        online: bool,
        /// The user's last user activity, unix milliseconds (the answerer's clock).
        last_seen_ms: Option<u64>,
    },
    /// Refused (`Busy` when shed under load).
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
    },
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Ack { req_id, .. }
            | Response::Status { req_id, .. }
            | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}

/// What one may see of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the user is online.
    pub online: bool,
    /// The user's last user activity, unix milliseconds.
    pub last_seen_ms: Option<u64>,
}

impl Status {
    /// What a hidden or unknown user looks like.
    pub const HIDDEN: Status = Status {
        online: false,
        last_seen_ms: None,
    };
}

/// What the tracker knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// When its last heartbeat arrived.
    last_heartbeat_ms: u64,
    /// It said goodbye or its connection dropped after that heartbeat.
    gone: bool,
    /// Its last user activity.
    last_seen_ms: Option<u64>,
    /// How long after a heartbeat it stays online.
    offline_after_ms: u64,
    /// Its policy, once it sent it.
    policy: Option<(u64, Policy)>,
}

/// Online / last-seen state of many peers, as a relay keeps it: a pure state machine with
/// explicit `now_ms`, no timers (a peer goes offline lazily, when a query finds its last
/// heartbeat older than its threshold).
#[derive(Debug, Clone)]
pub struct Tracker {
    max_offline_after_ms: u64,
    max_peers: usize,
    peers: HashMap<PeerId, Record>,
}

impl Tracker {
    /// A tracker that shows a peer offline at most `max_offline_after_ms` after its last
    /// heartbeat, and remembers at most `max_peers` peers (the one silent for longest is forgotten
    /// first; that scan happens only when the table is full).
    pub fn new(max_offline_after_ms: u64, max_peers: usize) -> Self {
        Self {
            max_offline_after_ms,
            max_peers: max_peers.max(1),
            peers: HashMap::new(),
        }
    }

    /// How many peers it remembers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether it remembers no peer.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Records a heartbeat of `peer`. `policy` (if any) replaces the stored one. Returns whether
    /// the tracker now holds the policy with digest `policy_digest`.
    pub fn heartbeat(
        &mut self,
        peer: PeerId,
        activity: Activity,
        offline_after_ms: u64,
        policy_digest: u64,
        policy: Option<Policy>,
        now_ms: u64,
    ) -> bool {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.evict_one();
        }
        let record = self.peers.entry(peer).or_insert(Record {
            last_heartbeat_ms: now_ms,
            gone: false,
            last_seen_ms: None,
            offline_after_ms,
            policy: None,
        });
        record.last_heartbeat_ms = record.last_heartbeat_ms.max(now_ms);
        record.gone = false;
        record.offline_after_ms = offline_after_ms.min(self.max_offline_after_ms);
        if activity == Activity::User {
            record.last_seen_ms = Some(record.last_seen_ms.unwrap_or(0).max(now_ms));
        }
        if let Some(policy) = policy {
            let policy = policy.normalized();
            record.policy = Some((policy.digest(), policy));
        }
        matches!(&record.policy, Some((digest, _)) if *digest == policy_digest)
    }

    /// `peer` stopped cleanly, or its connection dropped: it is offline from now on.
    pub fn gone(&mut self, peer: &PeerId) {
        if let Some(record) = self.peers.get_mut(peer) {
            record.gone = true;
        }
    }

    /// The full truth about `peer`, ignoring its policy.
    pub fn status(&self, peer: &PeerId, now_ms: u64) -> Status {
        match self.peers.get(peer) {
            None => Status::HIDDEN,
            Some(r) => Status {
                online: !r.gone && now_ms.saturating_sub(r.last_heartbeat_ms) < r.offline_after_ms,
                last_seen_ms: r.last_seen_ms,
            },
        }
    }

    /// What `asker` may see of `peer`: its status if `peer`'s policy allows it, else (and when
    /// the tracker does not hold `peer`'s policy) [`Status::HIDDEN`].
    pub fn query(&self, asker: &PeerId, peer: &PeerId, now_ms: u64) -> Status {
        let allowed = asker == peer
            || matches!(
                self.peers.get(peer),
                Some(Record { policy: Some((_, policy)), .. }) if policy.allows(peer, asker)
            );
        if allowed {
            self.status(peer, now_ms)
        } else {
            Status::HIDDEN
        }
    }

    /// Whether `owner`'s policy lets `sender` deposit into `owner`'s mailbox. Without a known
    /// policy (the owner never sent one, or was forgotten) everything is taken, as before
    /// policies existed.
    pub fn accepts_deposit(&self, owner: &PeerId, sender: &PeerId) -> bool {
        match self.peers.get(owner) {
            Some(Record {
                policy: Some((_, policy)),
                ..
            }) => policy.accepts_from(owner, sender),
            _ => true,
        }
    }

    fn evict_one(&mut self) {
        let oldest = self
            .peers
            .iter()
            .min_by_key(|(_, r)| (!r.gone, r.last_heartbeat_ms))
            .map(|(peer, _)| *peer);
        if let Some(peer) = oldest {
            self.peers.remove(&peer);
        }
    }
}

/// Serde for a list of peer ids as byte strings.
mod peer_list {
    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(peers: &[PeerId], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            peers
                .iter()
                .map(|p| serde_bytes::ByteBuf::from(p.to_bytes())),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<PeerId>, D::Error> {
        let raw: Vec<serde_bytes::ByteBuf> = Deserialize::deserialize(deserializer)?;
        if raw.len() > super::MAX_POLICY_CONTACTS {
            return Err(serde::de::Error::custom(format!(
                "{} contacts, at most {}",
                raw.len(),
                super::MAX_POLICY_CONTACTS
            )));
        }
        raw.iter()
            .map(|b| PeerId::from_bytes(b).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor;

    fn peer() -> PeerId {
        libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    const THRESHOLD: u64 = 30_000;

    fn beat(t: &mut Tracker, p: PeerId, activity: Activity, policy: &Policy, now: u64) -> bool {
        t.heartbeat(
            p,
            activity,
            THRESHOLD,
            policy.digest(),
            Some(policy.clone()),
            now,
        )
    }

    #[test]
    fn online_while_heartbeats_arrive_then_offline_after_the_threshold() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, bob) = (peer(), peer());
        let everyone = Policy::new(Visibility::Everyone, []);
        assert_eq!(t.query(&bob, &alice, 0), Status::HIDDEN);
        beat(&mut t, alice, Activity::User, &everyone, 1_000);
        assert_eq!(
            t.query(&bob, &alice, 1_000 + THRESHOLD - 1),
            Status {
                online: true,
                last_seen_ms: Some(1_000)
            }
        );
        assert_eq!(
            t.query(&bob, &alice, 1_000 + THRESHOLD),
            Status {
                online: false,
                last_seen_ms: Some(1_000)
            }
        );
    }

    #[test]
    fn only_user_activity_moves_last_seen() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, bob) = (peer(), peer());
        let everyone = Policy::new(Visibility::Everyone, []);
        beat(&mut t, alice, Activity::User, &everyone, 5_000);
        for now in [15_000, 25_000, 35_000] {
            beat(&mut t, alice, Activity::App, &everyone, now);
        }
        let s = t.query(&bob, &alice, 40_000);
        assert!(s.online);
        assert_eq!(s.last_seen_ms, Some(5_000));
        // App activity alone never sets a last seen.
        let carol = peer();
        beat(&mut t, carol, Activity::App, &everyone, 1);
        assert_eq!(t.query(&bob, &carol, 2).last_seen_ms, None);
    }

    #[test]
    fn goodbye_and_disconnect_show_offline_at_once_and_a_heartbeat_undoes_it() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, bob) = (peer(), peer());
        let everyone = Policy::new(Visibility::Everyone, []);
        beat(&mut t, alice, Activity::User, &everyone, 100);
        t.gone(&alice);
        assert_eq!(
            t.query(&bob, &alice, 101),
            Status {
                online: false,
                last_seen_ms: Some(100)
            }
        );
        beat(&mut t, alice, Activity::App, &everyone, 200);
        assert!(t.query(&bob, &alice, 201).online);
    }

    #[test]
    fn the_node_threshold_applies_up_to_the_relay_limit() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, bob) = (peer(), peer());
        let everyone = Policy::new(Visibility::Everyone, []);
        t.heartbeat(
            alice,
            Activity::App,
            500,
            everyone.digest(),
            Some(everyone.clone()),
            0,
        );
        assert!(t.query(&bob, &alice, 499).online);
        assert!(!t.query(&bob, &alice, 500).online);
        t.heartbeat(
            alice,
            Activity::App,
            u64::MAX,
            everyone.digest(),
            None,
            1_000,
        );
        assert!(t.query(&bob, &alice, 1_000 + THRESHOLD - 1).online);
        assert!(!t.query(&bob, &alice, 1_000 + THRESHOLD).online);
    }

    #[test]
    fn policies_hide_from_those_not_allowed() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, friend, stranger) = (peer(), peer(), peer());
        let contacts = Policy::new(Visibility::Contacts, [friend]);
        beat(&mut t, alice, Activity::User, &contacts, 10);
        assert!(t.query(&friend, &alice, 11).online);
        assert_eq!(t.query(&stranger, &alice, 11), Status::HIDDEN);
        assert!(
            t.query(&alice, &alice, 11).online,
            "a user always sees itself"
        );

        let nobody = Policy::new(Visibility::Nobody, [friend]);
        assert!(
            nobody.contacts.is_empty(),
            "only `contacts` carries the list"
        );
        beat(&mut t, alice, Activity::User, &nobody, 20);
        assert_eq!(t.query(&friend, &alice, 21), Status::HIDDEN);
        assert_eq!(t.status(&alice, 21).last_seen_ms, Some(20));
    }

    #[test]
    fn an_unknown_policy_hides_and_the_digest_says_when_to_send_it() {
        let mut t = Tracker::new(THRESHOLD, 10);
        let (alice, bob) = (peer(), peer());
        let everyone = Policy::new(Visibility::Everyone, []);
        assert!(!t.heartbeat(alice, Activity::User, THRESHOLD, everyone.digest(), None, 1));
        assert_eq!(t.query(&bob, &alice, 2), Status::HIDDEN);
        assert!(beat(&mut t, alice, Activity::App, &everyone, 3));
        assert!(t.heartbeat(alice, Activity::App, THRESHOLD, everyone.digest(), None, 4));
        let changed = Policy::new(Visibility::Contacts, [bob]);
        assert!(!t.heartbeat(alice, Activity::App, THRESHOLD, changed.digest(), None, 5));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Tracker::new(THRESHOLD, 3);
        let everyone = Policy::new(Visibility::Everyone, []);
        let peers: Vec<_> = (0..5).map(|_| peer()).collect();
        for (i, p) in peers.iter().enumerate() {
            beat(&mut t, *p, Activity::App, &everyone, i as u64);
        }
        assert_eq!(t.len(), 3);
        // The two silent for longest were forgotten.
        assert_eq!(t.status(&peers[0], 5), Status::HIDDEN);
        assert!(t.status(&peers[4], 5).online);
    }

    #[test]
    fn digests_differ_by_content_not_by_order() {
        let (a, b) = (peer(), peer());
        let one = Policy::new(Visibility::Contacts, [a, b]);
        let two = Policy::new(Visibility::Contacts, [b, a, a]);
        assert_eq!(one.digest(), two.digest());
        assert_ne!(
            one.digest(),
            Policy::new(Visibility::Contacts, [a]).digest()
        );
        assert_ne!(
            Policy::new(Visibility::Everyone, []).digest(),
            Policy::new(Visibility::Nobody, []).digest()
        );
    }

    #[test]
    fn requests_round_trip_and_oversize_policies_are_refused() {
        let policy = Policy::new(Visibility::Contacts, [peer(), peer()]);
        let request = Request::Heartbeat {
            req_id: 7,
            activity: Activity::User,
            offline_after_ms: 30_000,
            policy_digest: policy.digest(),
            policy: Some(policy),
        };
        let bytes = cbor::encode(&request, MAX_FRAME_BYTES).expect("encodes");
        let back: Request = cbor::decode(&bytes, MAX_FRAME_BYTES).expect("decodes");
        assert_eq!(back, request);

        let huge = Policy {
            visibility: Visibility::Contacts,
            contacts: (0..MAX_POLICY_CONTACTS + 1).map(|_| peer()).collect(),
            ..Policy::default()
        };
        assert!(huge.validate().is_err());
        let bytes = cbor::encode(&huge, 1 << 20).expect("encodes");
        assert!(cbor::decode::<Policy>(&bytes, 1 << 20).is_err());
        assert!(
            bytes.len() < 1 << 20,
            "a full policy fits comfortably in a frame"
        );
        let full = Policy::new(
            Visibility::Contacts,
            (0..MAX_POLICY_CONTACTS).map(|_| peer()),
        );
        assert!(cbor::encode(&full, MAX_FRAME_BYTES - 256).is_ok());
    }

    #[test]
    fn visibility_parses_and_prints() {
        for v in [
            Visibility::Everyone,
            Visibility::Contacts,
            Visibility::Nobody,
        ] {
            assert_eq!(v.to_string().parse::<Visibility>(), Ok(v));
        }
        assert!("friends".parse::<Visibility>().is_err());
    }

    #[test]
    fn reach_and_blocked_decide_who_may_deposit() {
        let (owner, friend, stranger, pest) = (peer(), peer(), peer(), peer());
        let everyone = Policy::with_reach(Visibility::Everyone, Reach::Everyone, [friend], [pest]);
        assert!(everyone.accepts_from(&owner, &stranger));
        assert!(everyone.accepts_from(&owner, &friend));
        assert!(!everyone.accepts_from(&owner, &pest));
        let contacts = Policy::with_reach(
            Visibility::Everyone,
            Reach::Contacts,
            [friend, pest],
            [pest],
        );
        assert!(contacts.accepts_from(&owner, &friend));
        assert!(!contacts.accepts_from(&owner, &stranger));
        // Blocked wins over being a contact; the owner always reaches itself.
        assert!(!contacts.accepts_from(&owner, &pest));
        assert!(contacts.accepts_from(&owner, &owner));

        let mut t = Tracker::new(THRESHOLD, 10);
        // No policy known: everything is taken.
        assert!(t.accepts_deposit(&owner, &stranger));
        beat(&mut t, owner, Activity::App, &contacts, 0);
        assert!(!t.accepts_deposit(&owner, &stranger));
        assert!(t.accepts_deposit(&owner, &friend));
        assert!(!t.accepts_deposit(&owner, &pest));
    }

    #[test]
    fn a_policy_without_reach_or_blocks_keeps_its_digest_and_encoding() {
        let friend = peer();
        let old = Policy::new(Visibility::Contacts, [friend]);
        let same = Policy::with_reach(Visibility::Contacts, Reach::Everyone, [friend], []);
        assert_eq!(old.digest(), same.digest());
        assert_eq!(
            cbor::encode(&old, 1 << 16).expect("encodes"),
            cbor::encode(&same, 1 << 16).expect("encodes")
        );
        let reach = Policy::with_reach(Visibility::Contacts, Reach::Contacts, [friend], []);
        let blocked = Policy::with_reach(Visibility::Contacts, Reach::Everyone, [friend], [peer()]);
        assert_ne!(old.digest(), reach.digest());
        assert_ne!(old.digest(), blocked.digest());
        let bytes = cbor::encode(&blocked, 1 << 16).expect("encodes");
        assert_eq!(
            cbor::decode::<Policy>(&bytes, 1 << 16).expect("decodes"),
            blocked
        );
    }
}
