//! The seam where bodies are sealed and opened: [`Node::compose`] is the one path from a
//! destination and a body to an outbox entry, and [`Node::open_room_body`] the one place a room's
//! inbound body is read. One-to-one bodies are sealed here with Olm (`crypto`); a room (a
//! group) seals its bodies with its own keys (MLS) before composing them, and this refuses any
//! room body that carries content in the clear.

use kith_protocol::envelope::Header;
use kith_protocol::{Body, Destination, Envelope, Reject};

use crate::clock::now_ms;
use crate::core::store::{EntryKind, OutboxEntry};
use crate::core::{Node, NodeError};

impl Node {
    /// An outbox entry for `body` to `header.to`, signed. To a peer: sealed now if a session
    /// exists, else kept `unsealed` until an attempt can set one up (a session's new state is
    /// written before this returns, not flushed). To a room: as the room's sealing has it.
    pub(crate) fn compose(
        &self,
        header: Header,
        body: &Body,
        kind: EntryKind,
    ) -> Result<OutboxEntry, NodeError> {
        self.compose_with(header, body, kind, true)
    }

    /// [`Node::compose`], leaving a session's new state to `Olm::write_unwritten`, which the
    /// caller must call once the entry is on its way, whether or not this succeeded.
    pub(crate) fn compose_unwritten(
        &self,
        header: Header,
        body: &Body,
        kind: EntryKind,
    ) -> Result<OutboxEntry, NodeError> {
        self.compose_with(header, body, kind, false)
    }

    fn compose_with(
        &self,
        header: Header,
        body: &Body,
        kind: EntryKind,
        write_session: bool,
    ) -> Result<OutboxEntry, NodeError> {
        body.validate()
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let sealed = match header.to {
            Destination::Peer(to) => if write_session {
                self.olm().seal(&to, body)
            } else {
                self.olm().seal_unwritten(&to, body)
            }
            .map_err(|e| NodeError::Invalid(format!("cannot encrypt: {e}")))?,
            // Sealed by the room already (MLS); its membership operations are signed metadata.
            Destination::Group(_) => match body {
                Body::Mls { .. } | Body::GroupOp(_) => None,
                _ => {
                    return Err(NodeError::Invalid(
                        "a room's content must be sealed by the room before it is composed".into(),
                    ))
                }
            },
        };
        let unsealed = sealed.is_none() && matches!(header.to, Destination::Peer(_));
        let body = sealed.as_ref().unwrap_or(body);
        let envelope = Envelope::seal(self.key(), header, body)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        Ok(OutboxEntry::new(envelope, kind, unsealed, now_ms()))
    }

    /// The body of an inbound envelope addressed to a room, opened.
    pub(crate) fn open_room_body(&self, envelope: &Envelope) -> Result<Body, Reject> {
        envelope.body().map_err(|e| {
            tracing::warn!(from = %envelope.from, id = %envelope.id, error = %e, "refusing a group envelope with a bad body");
            Reject::Malformed
        })
    }
}
