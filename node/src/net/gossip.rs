//! The node's gossipsub: a small mesh (groups are small and their relay floods), every message
//! validated by kith before it is forwarded, frames that fit one envelope.

use std::time::Duration;

use kith_protocol::limits::MAX_ENVELOPE_BYTES;
use libp2p::gossipsub::{self, AllowAllSubscriptionFilter, MaxCountSubscriptionFilter};
use libp2p::identity::Keypair;

/// The node's gossipsub behaviour: its subscription filter lets a relay hold many topics.
pub type Gossipsub = gossipsub::Behaviour<
    gossipsub::IdentityTransform,
    MaxCountSubscriptionFilter<AllowAllSubscriptionFilter>,
>;

/// Most topics a peer (typically a relay hosting many groups) may hold as seen by a node.
const MAX_TOPICS_PER_PEER: usize = 100_000;

/// Builds the node's gossipsub: a small mesh (groups are small and the relay floods), kith
/// validates every message before it is forwarded, frames fit one envelope.
pub fn behaviour(key: &Keypair, heartbeat: Duration) -> Result<Gossipsub, String> {
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(heartbeat)
        .heartbeat_initial_delay(heartbeat.min(Duration::from_secs(5)))
        .mesh_outbound_min(1)
        .mesh_n_low(1)
        .mesh_n(3)
        .mesh_n_high(6)
        .flood_publish(true)
        .validate_messages()
        .max_transmit_size(MAX_ENVELOPE_BYTES + 1024)
        .build()
        .map_err(|e| e.to_string())?;
    let filter = MaxCountSubscriptionFilter {
        filter: AllowAllSubscriptionFilter {},
        max_subscribed_topics: MAX_TOPICS_PER_PEER,
        max_subscriptions_per_request: MAX_TOPICS_PER_PEER,
    };
    gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        config,
        filter,
    )
    .map_err(str::to_owned)
}
