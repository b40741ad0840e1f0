//! Names where peer ids would otherwise show: the events of the local API's stream carry the
//! conversation they belong to (a peer or a group) with the contact's or the group's name, so a
//! user interface never has to guess whether a message came from a group.

use kith_protocol::{Envelope, GroupId, MessageId, MessageState, PeerId};

use std::collections::HashMap;

use crate::core::{MessageView, Node, NodeEvent};

impl Node {
    /// The contact name of `peer`; this node's own name for itself.
    pub(crate) fn name_of(&self, peer: &PeerId) -> Option<String> {
        if *peer == self.peer_id() {
            return Some(self.settings().name.clone());
        }
        self.contact_of(peer).map(|c| c.name)
    }

    /// The name of a group this node knows.
    pub(crate) fn group_name(&self, group: &GroupId) -> Option<String> {
        self.plugins().rooms.name_of(self, group)
    }

    /// The `message` event for a stored chat envelope (one-to-one when `group` is `None`).
    pub(crate) fn message_event(
        &self,
        envelope: &Envelope,
        group: Option<GroupId>,
        text: String,
    ) -> NodeEvent {
        let from = envelope.from.to_string();
        let (conversation, conversation_name) = match group {
            Some(group) => (group.to_string(), self.group_name(&group)),
            None => (from.clone(), self.name_of(&envelope.from)),
        };
        NodeEvent::Message {
            id: envelope.id.to_string(),
            from,
            text,
            sent_at_ms: envelope.sent_at_ms,
            conversation,
            group: group.map(|g| g.to_string()),
            from_name: self.name_of(&envelope.from),
            conversation_name,
        }
    }

    /// The `receipt` event for one recipient of message `id` (`peer`: the member of `group`, or
    /// the other party of a one-to-one message) whose state became `state`.
    pub(crate) fn receipt_event(
        &self,
        id: &MessageId,
        peer: PeerId,
        group: Option<GroupId>,
        state: MessageState,
    ) -> NodeEvent {
        let peer_text = peer.to_string();
        NodeEvent::Receipt {
            id: id.to_string(),
            conversation: group.map_or_else(|| peer_text.clone(), |g| g.to_string()),
            peer: peer_text,
            state,
            group: group.map(|g| g.to_string()),
            peer_name: self.name_of(&peer),
        }
    }

    /// Fills in the author's and the conversation's names of `views`.
    pub(crate) fn name_messages(&self, views: &mut [MessageView]) {
        let mut names: HashMap<String, Option<String>> = HashMap::new();
        let mut name = |key: &str, find: &dyn Fn() -> Option<String>| {
            names.entry(key.to_owned()).or_insert_with(find).clone()
        };
        for view in views {
            let from = view.from.clone();
            view.from_name = name(&from, &|| self.name_of(&from.parse().ok()?));
            let conversation = view.conversation.clone();
            view.conversation_name = match &view.group {
                Some(group) => name(group, &|| self.group_name(&group.parse().ok()?)),
                None => name(&conversation, &|| self.name_of(&conversation.parse().ok()?)),
            };
        }
    }

    /// A peer as an error message shows it: its contact name and id, or the id alone.
    pub(crate) fn peer_label(&self, peer: &PeerId) -> String {
        match self.name_of(peer) {
            Some(name) => format!("{} ({peer})", crate::text::for_terminal(&name)),
            None => peer.to_string(),
        }
    }
}
