//! The node's health as `kith status` (no argument) shows it: home relays connected or failing
//! and why, circuit reservations, the outbox, the last mailbox fetch, and which road each
//! contact is on.

use serde::{Deserialize, Serialize};

use crate::core::Node;
use crate::net::RelayHealth;

/// What `GET /v1/health` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthView {
    /// This node's peer id.
    pub peer_id: String,
    /// Its display name.
    pub name: String,
    /// Each home relay.
    pub relays: Vec<RelayHealth>,
    /// Envelopes (messages and receipts) waiting in the outbox.
    pub pending_outbox: usize,
    /// When a mailbox fetch last completed (unix ms), or null.
    pub last_mailbox_fetch_ms: Option<u64>,
    /// Each contact and the road to it now.
    pub contacts: Vec<ContactPath>,
}

/// The road to one contact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContactPath {
    /// The contact's name.
    pub name: String,
    /// Its peer id.
    pub peer_id: String,
    /// `direct` (a connection of its own), `relayed` (a relay circuit) or `mailbox` (not
    /// connected: messages go through its relays' mailboxes).
    #[serde(deserialize_with = "path_name")]
    pub path: Road,
}

/// A road's name. (An alias, so that serde's derive does not take the `'static` for a borrow
/// of the input: [`path_name`] reads it.)
pub type Road = &'static str;

/// The roads a contact can be on.
const PATHS: [&str; 3] = ["direct", "relayed", "mailbox"];

/// A road's name read back from JSON (the command line reads `GET /v1/health`).
fn path_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Road, D::Error> {
    let name = String::deserialize(d)?;
    PATHS
        .into_iter()
        .find(|known| *known == name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown road {name:?}")))
}

impl Node {
    /// The node's health.
    pub async fn health(&self) -> HealthView {
        let net = self.net().health().await;
        let mut contacts: Vec<ContactPath> = self
            .contact_peers()
            .into_iter()
            .filter_map(|peer| {
                let contact = self.contact_of(&peer)?;
                Some(ContactPath {
                    name: contact.name,
                    peer_id: peer.to_string(),
                    path: net.paths.get(&peer).copied().unwrap_or("mailbox"),
                })
            })
            .collect();
        contacts.sort_by(|a, b| a.name.cmp(&b.name));
        HealthView {
            peer_id: self.peer_id().to_string(),
            name: self.settings().name,
            relays: net.relays,
            pending_outbox: self.outbox_len(),
            last_mailbox_fetch_ms: self.last_fetch_ms(),
            contacts,
        }
    }
}
