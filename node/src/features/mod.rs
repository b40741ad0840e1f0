//! What the node does beyond one-to-one messages: groups, files, presence, strangers' requests
//! and temporary chats. Each feature keeps its own state; the core calls into them.

pub mod group;
pub mod media;
pub mod presence;
pub mod strangers;
pub mod timers;
