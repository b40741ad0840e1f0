//! The group directory: groups hosted by this relay, their membership chains, and server-side
//! fan-out of group messages.
//!
//! - [`store`]: each hosted group's current state and its chain of signed operations, in sled.
//! - [`service`]: the task that owns the store, orders operations (`/kith/group/1` `Submit`),
//!   flushes before answering `Applied`, and serves `Get`.
//! - [`gateway`]: the part that lives in the swarm task: it routes `/kith/group/1` requests,
//!   checks `Post`ed messages against the [`Directory`], hands them to the mailbox service for
//!   fan-out, publishes them on the group's gossipsub topic and decides whom to push to.
//!
//! Delivery guarantee (the design): a `Post`ed message is written into the mailbox of **every**
//! other member and flushed before the sender hears `Stored` (its `sent` tick). Only then does
//! the relay publish it on `kith/g/<group id>` (online, subscribed members get it at once) and
//! push it over `/kith/dm/1` to connected members that are not subscribed (or to every connected
//! member if the publish failed, e.g. `NoPeersSubscribedToTopic`). A member's copy is deleted
//! when a push is accepted or when the member fetches and acknowledges its mailbox, so an
//! offline member, or one that missed the gossip, loses nothing; a member that got the gossip
//! drops the mailbox copy as a duplicate at its next fetch. Membership changes are announced the
//! same way to old and new members alike, so a removed member learns of its removal and then
//! gets nothing more: the relay stores nothing for non-members.

pub mod gateway;
pub mod service;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kith_protocol::group::State;
use kith_protocol::GroupId;
use libp2p::gossipsub::{self, AllowAllSubscriptionFilter, MaxCountSubscriptionFilter};
use libp2p::identity::Keypair;

use crate::config::Config;

/// The relay's gossipsub behaviour: a subscription filter that allows many topics per peer.
pub type Gossipsub = gossipsub::Behaviour<
    gossipsub::IdentityTransform,
    MaxCountSubscriptionFilter<AllowAllSubscriptionFilter>,
>;

/// The current state of every hosted group, readable from the swarm task without waiting.
/// Only the [`service`] writes it, after the change is durable.
#[derive(Debug, Clone, Default)]
pub struct Directory(Arc<RwLock<HashMap<GroupId, State>>>);

impl Directory {
    /// A group's current state.
    pub fn get(&self, group: &GroupId) -> Option<State> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(group)
            .cloned()
    }

    /// Every hosted group.
    pub fn groups(&self) -> Vec<GroupId> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// How many groups are hosted.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no group is hosted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn insert(&self, state: State) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(state.group, state);
    }
}

/// The gossipsub configuration for a relay: flood publishing (every connected subscribed member
/// gets the relay's publish directly), a mesh that can hold every member of a full group, kith
/// validates messages itself, and frames large enough for one envelope.
pub fn gossip_config(config: &Config) -> Result<gossipsub::Config, gossipsub::ConfigBuilderError> {
    let mesh_high = config.max_group_members.saturating_mul(2).max(12);
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(config.gossip_heartbeat_interval_ms))
        .heartbeat_initial_delay(Duration::from_millis(
            config.gossip_heartbeat_interval_ms.min(5_000),
        ))
        .mesh_outbound_min(0)
        .mesh_n_low(1)
        .mesh_n(6)
        .mesh_n_high(mesh_high)
        .flood_publish(true)
        .validate_messages()
        .max_transmit_size(kith_protocol::limits::MAX_ENVELOPE_BYTES + 1024)
        .build()
}

/// Builds the relay's gossipsub behaviour.
pub fn gossipsub(key: &Keypair, config: &Config) -> Result<Gossipsub, String> {
    let gossip = gossip_config(config).map_err(|e| e.to_string())?;
    let filter = MaxCountSubscriptionFilter {
        filter: AllowAllSubscriptionFilter {},
        max_subscribed_topics: config.max_gossip_topics_per_peer,
        max_subscriptions_per_request: config.max_gossip_topics_per_peer,
    };
    gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip,
        filter,
    )
    .map_err(str::to_owned)
}
