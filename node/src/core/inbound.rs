//! The inbound pipeline's checks that need no state: what a verified envelope is addressed to,
//! whether the connection may carry it, and what kind of body it holds. `Node::check` runs
//! them between the signature check and the features' checks (the gate, the timers); then the
//! envelope is opened, dispatched by kind, flushed once with its batch, and announced.

use kith_protocol::{Body, Destination, Envelope, GroupId, MessageId, Reject, VerifyError};
use libp2p::PeerId;

/// What a checked inbound envelope is.
#[derive(Debug)]
pub(crate) enum Checked {
    /// For a group: the rooms take it.
    Group(GroupId),
    /// An end-to-end encrypted one-to-one body.
    Sealed(kith_protocol::envelope::Sealed),
    /// A one-to-one body in the clear (from an earlier release).
    Plain(Body),
    /// The sender asks for these messages of ours again (on a new session if `true`).
    Resend(Vec<MessageId>, bool),
}

/// Whom a verified envelope is for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Addressed {
    /// A group (its membership is the rooms' to check).
    Room(GroupId),
    /// This node.
    Me,
}

/// The reject for an envelope whose signature check failed.
pub(crate) fn verify_reject(e: &VerifyError) -> Reject {
    match e {
        VerifyError::UnsupportedVersion(_) => Reject::UnsupportedVersion,
        VerifyError::BodyTooLarge { max, .. } => Reject::TooLarge { max: *max as u64 },
        _ => Reject::BadSignature,
    }
}

/// Whom `envelope`, which came over a connection to `via`, is for: a group, or this node
/// (`me`), when it came from its sender itself or from one of this node's home relays
/// (`via_home_relay`), which deliver on others' behalf.
pub(crate) fn address(
    me: PeerId,
    via: PeerId,
    via_home_relay: bool,
    envelope: &Envelope,
) -> Result<Addressed, Reject> {
    let from = envelope.from;
    match envelope.to {
        Destination::Group(group) => Ok(Addressed::Room(group)),
        Destination::Peer(to) if to != me => {
            tracing::warn!(%via, %from, id = %envelope.id, "refusing envelope for someone else");
            Err(Reject::WrongRecipient)
        }
        Destination::Peer(_) if via != from && !via_home_relay => {
            tracing::warn!(%via, %from, id = %envelope.id, "refusing envelope: sender is not the connection's peer");
            Err(Reject::WrongSender)
        }
        Destination::Peer(_) => Ok(Addressed::Me),
    }
}

/// What a one-to-one envelope's body is, refusing what this node never takes that way.
pub(crate) fn classify(via: PeerId, envelope: &Envelope) -> Result<Checked, Reject> {
    let from = envelope.from;
    let body = envelope.body().map_err(|e| {
        tracing::warn!(%via, %from, id = %envelope.id, error = %e, "refusing envelope with a bad body");
        Reject::Malformed
    })?;
    match body {
        Body::Olm(sealed) => Ok(Checked::Sealed(sealed)),
        Body::Resend { ids, new_session } => Ok(Checked::Resend(ids, new_session)),
        // Sent in the clear by an earlier release (signed by its sender, so no relay could
        // have made it; this node never sends content so).
        body @ (Body::Chat { .. } | Body::File(_) | Body::Receipt { .. }) => {
            tracing::debug!(%via, %from, id = %envelope.id, "a one-to-one body in the clear");
            Ok(Checked::Plain(body))
        }
        Body::GroupOp(_) | Body::Mls { .. } => {
            tracing::warn!(%via, %from, "refusing a group body addressed to a peer");
            Err(Reject::Malformed)
        }
        // Content: this node only takes it sealed.
        Body::Timer { .. } => {
            tracing::warn!(%via, %from, "refusing a timer change in the clear");
            Err(Reject::Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use kith_protocol::envelope::Header;
    use libp2p::identity::Keypair;

    use super::*;

    fn envelope(key: &Keypair, to: Destination, body: &Body) -> Envelope {
        let header = Header {
            id: MessageId::random(),
            to,
            sent_at_ms: 1,
            lamport: 1,
            expires_at_ms: None,
        };
        Envelope::seal(key, header, body).expect("seal")
    }

    fn chat() -> Body {
        Body::Chat { text: "hi".into() }
    }

    #[test]
    fn an_envelope_for_someone_else_is_refused() {
        let sender = Keypair::generate_ed25519();
        let from = sender.public().to_peer_id();
        let me = PeerId::random();
        let other = envelope(&sender, Destination::Peer(PeerId::random()), &chat());
        assert_eq!(
            address(me, from, false, &other),
            Err(Reject::WrongRecipient)
        );
        let mine = envelope(&sender, Destination::Peer(me), &chat());
        assert_eq!(address(me, from, false, &mine), Ok(Addressed::Me));
    }

    #[test]
    fn only_the_sender_or_a_home_relay_may_carry_a_message() {
        let sender = Keypair::generate_ed25519();
        let me = PeerId::random();
        let stranger = PeerId::random();
        let e = envelope(&sender, Destination::Peer(me), &chat());
        assert_eq!(address(me, stranger, false, &e), Err(Reject::WrongSender));
        assert_eq!(address(me, stranger, true, &e), Ok(Addressed::Me));
    }

    #[test]
    fn a_group_envelope_goes_to_the_rooms_whoever_carries_it() {
        let sender = Keypair::generate_ed25519();
        let group = GroupId::random();
        let e = envelope(&sender, Destination::Group(group), &chat());
        assert_eq!(
            address(PeerId::random(), PeerId::random(), false, &e),
            Ok(Addressed::Room(group))
        );
    }

    #[test]
    fn content_in_the_clear_that_this_node_never_sends_so_is_refused() {
        let sender = Keypair::generate_ed25519();
        let via = sender.public().to_peer_id();
        let me = Destination::Peer(PeerId::random());
        let timer = envelope(
            &sender,
            me,
            &Body::Timer {
                secs: Some(60),
                admins_only: false,
            },
        );
        assert!(matches!(classify(via, &timer), Err(Reject::Malformed)));
        let plain = envelope(&sender, me, &chat());
        assert!(matches!(
            classify(via, &plain),
            Ok(Checked::Plain(Body::Chat { .. }))
        ));
        let resend = envelope(
            &sender,
            me,
            &Body::Resend {
                ids: vec![MessageId::random()],
                new_session: true,
            },
        );
        assert!(matches!(
            classify(via, &resend),
            Ok(Checked::Resend(ids, true)) if ids.len() == 1
        ));
    }

    #[test]
    fn a_body_that_does_not_decode_is_malformed() {
        let sender = Keypair::generate_ed25519();
        let mut e = envelope(&sender, Destination::Peer(PeerId::random()), &chat());
        e.body = vec![0xff, 0x00, 0x13];
        assert!(matches!(
            classify(sender.public().to_peer_id(), &e),
            Err(Reject::Malformed)
        ));
    }

    #[test]
    fn signature_failures_map_to_their_rejects() {
        assert_eq!(
            verify_reject(&VerifyError::BadSignature),
            Reject::BadSignature
        );
        assert_eq!(
            verify_reject(&VerifyError::UnsupportedVersion(9)),
            Reject::UnsupportedVersion
        );
        assert_eq!(
            verify_reject(&VerifyError::BodyTooLarge { len: 10, max: 5 }),
            Reject::TooLarge { max: 5 }
        );
    }
}
