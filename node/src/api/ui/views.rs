//! What the chat window reads: the conversation list (contacts and groups with their last
//! message and unread count, by activity) and conversations a page at a time.
//!
//! Both read the store's conversation indexes from the newest end
//! ([`Store::newest_first`](crate::core::store::Store::newest_first)), so their cost does not grow
//! with a conversation's length: a page of 50 reads 50 records, and an unread count reads back
//! only to the last message the user read (reading marks a whole conversation).

use std::collections::HashSet;

use kith_protocol::{GroupId, MessageId, MessageState, PeerId};
use serde::Serialize;

use crate::core::store::{Direction, StoredMessage, Thread};
use crate::core::{MessageView, Node, NodeError};

/// Messages in a page when the caller does not say.
pub const DEFAULT_PAGE: usize = 50;
/// Most messages in one page.
pub const MAX_PAGE: usize = 500;
/// Unread messages counted at most per conversation (the list shows "999+" beyond).
pub const MAX_UNREAD: usize = 999;

/// A conversation as the list shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationView {
    /// The peer id of a contact, or the group id.
    pub id: String,
    /// `contact` or `group`.
    pub kind: &'static str,
    /// The contact's or group's name (a peer id for a stranger).
    pub name: String,
    /// The newest message, if any.
    pub last: Option<MessageView>,
    /// Incoming messages not yet read (at most [`MAX_UNREAD`] + 1).
    pub unread: usize,
    /// When the newest message was sent (unix ms), 0 without messages: the list's order.
    pub activity_ms: u64,
}

/// A conversation's index, owned.
enum Owned {
    Peer(PeerId),
    Group(GroupId, Vec<PeerId>),
}

impl Owned {
    fn thread(&self) -> Thread<'_> {
        match self {
            Owned::Peer(peer) => Thread::Peer(peer),
            Owned::Group(group, _) => Thread::Group(group),
        }
    }
}

impl Node {
    fn owned_thread(&self, with: &str) -> Result<Owned, NodeError> {
        Ok(match self.group_target(with)? {
            Some(state) => Owned::Group(state.group, state.members.into_iter().collect()),
            None => Owned::Peer(self.resolve(with)?),
        })
    }

    fn view(&self, message: StoredMessage, thread: &Owned) -> MessageView {
        let mut view = MessageView::from(message);
        if let Owned::Group(group, _) = thread {
            view.group = Some(group.to_string());
        }
        view
    }

    /// Finds message `id` of a conversation: its record gives its place in the index.
    fn locate(&self, thread: &Owned, id: &str) -> Result<StoredMessage, NodeError> {
        let parsed: MessageId = id
            .parse()
            .map_err(|e: kith_protocol::ids::ParseIdError| NodeError::Invalid(e.to_string()))?;
        let mut senders = vec![self.peer_id()];
        match thread {
            Owned::Peer(peer) => senders.push(*peer),
            Owned::Group(_, members) => senders.extend(members.iter().copied()),
        }
        for from in senders {
            let Some(m) = self.store().message(&from, &parsed)? else {
                continue;
            };
            let here = match thread {
                Owned::Peer(peer) => {
                    m.peer == *peer && self.store().message_group(&m.id)?.is_none()
                }
                Owned::Group(group, _) => self.store().message_group(&m.id)? == Some(*group),
            };
            if here {
                return Ok(m);
            }
        }
        // A former member's message: walk the conversation (rare).
        for m in self.store().newest_first(thread.thread(), None) {
            let m = m?;
            if m.id == parsed {
                return Ok(m);
            }
        }
        Err(NodeError::UnknownMessage(id.to_owned()))
    }

    /// Up to `limit` messages of a conversation (contact name, peer id, group name or id) sent
    /// before message `before` (all the newest when `None`), oldest first.
    pub fn messages_page(
        &self,
        with: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MessageView>, NodeError> {
        let thread = self.owned_thread(with)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let before = before.map(|id| self.locate(&thread, id)).transpose()?;
        let mut page = self
            .store()
            .newest_first(
                thread.thread(),
                before.as_ref().map(|m| (m.lamport, &m.from, &m.id)),
            )
            .take(limit)
            .collect::<Result<Vec<_>, _>>()?;
        page.reverse();
        let mut views: Vec<MessageView> = page.into_iter().map(|m| self.view(m, &thread)).collect();
        self.with_timer_lines(&mut views);
        Ok(self.with_attachments(views))
    }

    fn summary(
        &self,
        id: String,
        kind: &'static str,
        name: String,
        thread: Owned,
    ) -> Result<ConversationView, NodeError> {
        let mut newest = self.store().newest_first(thread.thread(), None);
        let last = newest.next().transpose()?;
        let mut unread = usize::from(last.as_ref().is_some_and(is_unread));
        if last.as_ref().is_none_or(|m| !is_read_incoming(m)) {
            for m in newest {
                let m = m?;
                if is_read_incoming(&m) || unread > MAX_UNREAD {
                    break;
                }
                unread += usize::from(is_unread(&m));
            }
        }
        let activity_ms = last.as_ref().map_or(0, |m| m.sent_at_ms);
        let last = last
            .map(|m| self.view(m, &thread))
            .map(|v| self.with_attachments(vec![v]))
            .and_then(|mut v| v.pop());
        Ok(ConversationView {
            id,
            kind,
            name,
            last,
            unread,
            activity_ms,
        })
    }

    /// Every contact, every other peer with messages, and every group this node is in, most
    /// recently active first.
    pub fn conversation_list(&self) -> Result<Vec<ConversationView>, NodeError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for contact in self.contacts()? {
            let Ok(peer) = contact.peer_id.parse::<PeerId>() else {
                continue;
            };
            seen.insert(peer);
            out.push(self.summary(contact.peer_id, "contact", contact.name, Owned::Peer(peer))?);
        }
        for peer in self.store().conversations()? {
            // A stranger's messages wait in the requests list.
            if seen.insert(peer) && !self.strangers().is_request(&peer) {
                let id = peer.to_string();
                out.push(self.summary(id.clone(), "contact", id, Owned::Peer(peer))?);
            }
        }
        for view in self.group_list() {
            let Some(state) = self.find_group(&view.group_id) else {
                continue;
            };
            let members = state.members.iter().copied().collect();
            out.push(self.summary(
                state.group.to_string(),
                "group",
                state.name.clone(),
                Owned::Group(state.group, members),
            )?);
        }
        out.sort_by(|a, b| {
            b.activity_ms
                .cmp(&a.activity_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(out)
    }
}

fn is_unread(m: &StoredMessage) -> bool {
    m.direction == Direction::In && m.state < MessageState::Read
}

fn is_read_incoming(m: &StoredMessage) -> bool {
    m.direction == Direction::In && m.state >= MessageState::Read
}
