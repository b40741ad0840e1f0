//! Property tests over every wire type: round trips, and hostile bytes into every decoder.

use kith_protocol::cbor::{self, DecodeError};
use kith_protocol::envelope::Header;
use kith_protocol::limits::{MAX_BODY_BYTES, MAX_ENVELOPE_BYTES};
use kith_protocol::{dm, frame, mailbox};
use kith_protocol::{
    Body, Destination, Envelope, GroupId, Keypair, MessageId, PeerId, ReceiptState, Reject,
};
use proptest::prelude::*;

fn peer_from_seed(seed: u8) -> (Keypair, PeerId) {
    let key = Keypair::ed25519_from_bytes([seed; 32]).expect("32-byte seed");
    let peer = key.public().to_peer_id();
    (key, peer)
}

fn arb_message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

fn arb_destination() -> impl Strategy<Value = Destination> {
    prop_oneof![
        any::<u8>().prop_map(|s| Destination::Peer(peer_from_seed(s).1)),
        any::<[u8; 16]>().prop_map(|b| Destination::Group(GroupId(b))),
    ]
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        ".{0,200}".prop_map(|text| Body::Chat { text }),
        (
            prop_oneof![Just(ReceiptState::Delivered), Just(ReceiptState::Read)],
            prop::collection::vec(arb_message_id(), 1..20)
        )
            .prop_map(|(state, ids)| Body::Receipt { state, ids }),
    ]
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        any::<u8>(),
        arb_message_id(),
        arb_destination(),
        any::<u64>(),
        any::<u64>(),
        any::<Option<u64>>(),
        arb_body(),
    )
        .prop_map(|(seed, id, to, sent_at_ms, lamport, expires_at_ms, body)| {
            let (key, _) = peer_from_seed(seed);
            let header = Header {
                id,
                to,
                sent_at_ms,
                lamport,
                expires_at_ms,
            };
            Envelope::seal(&key, header, &body).expect("valid body seals")
        })
}

fn arb_reject() -> impl Strategy<Value = Reject> {
    prop_oneof![
        Just(Reject::BadSignature),
        any::<u64>().prop_map(|max| Reject::TooLarge { max }),
        Just(Reject::NotYours),
        Just(Reject::QuotaExceeded),
        any::<u64>().prop_map(|retry_after_ms| Reject::Busy { retry_after_ms }),
        Just(Reject::Malformed),
        Just(Reject::WrongSender),
        Just(Reject::WrongRecipient),
        Just(Reject::UnsupportedVersion),
        Just(Reject::Expired),
        Just(Reject::StoreFailed),
        Just(Reject::Refused),
    ]
}

fn arb_dm_request() -> impl Strategy<Value = dm::Request> {
    (
        any::<u64>(),
        arb_envelope(),
        prop::collection::vec(arb_envelope(), 0..4),
    )
        .prop_map(|(req_id, envelope, more)| dm::Request {
            req_id,
            envelope,
            more,
        })
}

fn arb_dm_response() -> impl Strategy<Value = dm::Response> {
    prop_oneof![
        any::<u64>().prop_map(|req_id| dm::Response::Accepted { req_id }),
        (any::<u64>(), arb_reject())
            .prop_map(|(req_id, reason)| dm::Response::Rejected { req_id, reason }),
        (
            any::<u64>(),
            prop::collection::vec((any::<u32>(), arb_reject()), 0..4)
        )
            .prop_map(|(req_id, refused)| dm::Response::Partly {
                req_id,
                refused: refused
                    .into_iter()
                    .map(|(index, reason)| dm::Refused { index, reason })
                    .collect(),
            }),
    ]
}

fn arb_mailbox_request() -> impl Strategy<Value = mailbox::Request> {
    prop_oneof![
        (any::<u64>(), arb_envelope(), any::<bool>()).prop_map(|(req_id, envelope, receipt)| {
            mailbox::Request::Deposit {
                req_id,
                envelope,
                class: if receipt {
                    mailbox::DepositClass::Receipt
                } else {
                    mailbox::DepositClass::Message
                },
            }
        }),
        (any::<u64>(), any::<Option<u64>>(), any::<u32>()).prop_map(|(req_id, after, limit)| {
            mailbox::Request::Fetch {
                req_id,
                after,
                limit,
            }
        }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..50))
            .prop_map(|(req_id, seqs)| mailbox::Request::Ack { req_id, seqs }),
    ]
}

fn arb_mailbox_response() -> impl Strategy<Value = mailbox::Response> {
    prop_oneof![
        any::<u64>().prop_map(|req_id| mailbox::Response::Stored { req_id }),
        (
            any::<u64>(),
            prop::collection::vec(
                (any::<u64>(), arb_envelope())
                    .prop_map(|(seq, envelope)| mailbox::Item { seq, envelope }),
                0..4
            ),
            any::<bool>()
        )
            .prop_map(|(req_id, items, more)| mailbox::Response::Batch {
                req_id,
                items,
                more
            }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(req_id, removed)| mailbox::Response::Acked { req_id, removed }),
        (any::<u64>(), arb_reject(), any::<Option<u64>>()).prop_map(
            |(req_id, reason, retry_after_ms)| mailbox::Response::Rejected {
                req_id,
                reason,
                retry_after_ms
            }
        ),
    ]
}

/// Encodes, frames, unframes and decodes: the value must come back unchanged.
fn round_trip<T>(value: &T, max: usize) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = cbor::encode(value, max).expect("encode");
    let framed = frame::encode(&bytes, max).expect("frame");
    match frame::decode(&framed, max).expect("unframe") {
        frame::Decoded::Frame { payload, consumed } => {
            assert_eq!(consumed, framed.len());
            cbor::decode(payload, max).expect("decode")
        }
        frame::Decoded::NeedMore(n) => panic!("whole frame reported as needing {n} more bytes"),
    }
}

/// Feeds bytes to every decoder; none may panic, whatever they contain.
fn decode_everything(bytes: &[u8]) {
    let _ = cbor::decode::<Envelope>(bytes, MAX_ENVELOPE_BYTES);
    let _ = cbor::decode::<Body>(bytes, MAX_BODY_BYTES);
    let _ = cbor::decode::<dm::Request>(bytes, dm::MAX_FRAME_BYTES);
    let _ = cbor::decode::<dm::Response>(bytes, dm::MAX_FRAME_BYTES);
    let _ = cbor::decode::<mailbox::Request>(bytes, mailbox::MAX_FRAME_BYTES);
    let _ = cbor::decode::<mailbox::Response>(bytes, mailbox::MAX_FRAME_BYTES);
    let _ = frame::decode(bytes, dm::MAX_FRAME_BYTES);
    if let Ok(env) = cbor::decode::<Envelope>(bytes, MAX_ENVELOPE_BYTES) {
        let _ = env.verify();
        let _ = env.body();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn envelopes_round_trip_and_still_verify(env in arb_envelope()) {
        let back = round_trip(&env, MAX_ENVELOPE_BYTES);
        prop_assert_eq!(&back, &env);
        prop_assert!(back.verify().is_ok());
    }

    #[test]
    fn size_bound_is_an_upper_bound(env in arb_envelope()) {
        let encoded = cbor::encode(&env, MAX_ENVELOPE_BYTES).expect("encode");
        prop_assert!(encoded.len() <= env.size_bound(), "{} > {}", encoded.len(), env.size_bound());
    }

    #[test]
    fn bodies_round_trip(body in arb_body()) {
        prop_assert_eq!(round_trip(&body, MAX_BODY_BYTES), body);
    }

    #[test]
    fn dm_messages_round_trip(req in arb_dm_request(), resp in arb_dm_response()) {
        prop_assert_eq!(round_trip(&req, dm::MAX_FRAME_BYTES), req);
        prop_assert_eq!(round_trip(&resp, dm::MAX_FRAME_BYTES), resp);
    }

    #[test]
    fn mailbox_messages_round_trip(req in arb_mailbox_request(), resp in arb_mailbox_response()) {
        prop_assert_eq!(round_trip(&req, mailbox::MAX_FRAME_BYTES), req);
        prop_assert_eq!(round_trip(&resp, mailbox::MAX_FRAME_BYTES), resp);
    }

    #[test]
    fn ids_round_trip_through_text(bytes in any::<[u8; 16]>()) {
        let id = MessageId(bytes);
        prop_assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
        let gid = GroupId(bytes);
        prop_assert_eq!(gid.to_string().parse::<GroupId>(), Ok(gid));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn truncated_encodings_are_refused(req in arb_mailbox_request(), cut in any::<prop::sample::Index>()) {
        let bytes = cbor::encode(&req, mailbox::MAX_FRAME_BYTES).expect("encode");
        let cut = cut.index(bytes.len());
        decode_everything(&bytes[..cut]);
        prop_assert!(cbor::decode::<mailbox::Request>(&bytes[..cut], mailbox::MAX_FRAME_BYTES).is_err());
    }

    #[test]
    fn bit_flips_never_panic_and_never_forge(env in arb_envelope(), bit in any::<prop::sample::Index>()) {
        let mut bytes = cbor::encode(&env, MAX_ENVELOPE_BYTES).expect("encode");
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        decode_everything(&bytes);
        // A flipped bit either breaks decoding, breaks the signature, or lands in a spot that
        // decodes to the very same envelope (CBOR has a few such bits, in non-minimal headers).
        if let Ok(back) = cbor::decode::<Envelope>(&bytes, MAX_ENVELOPE_BYTES) {
            prop_assert!(back.verify().is_err() || back == env);
        }
    }
}

/// A CBOR header claiming `len` items of `major` type, with nothing behind it.
fn bomb(major: u8, len: u64) -> Vec<u8> {
    let mut out = vec![(major << 5) | 27];
    out.extend_from_slice(&len.to_be_bytes());
    out
}

#[test]
fn length_bombs_are_refused_cheaply() {
    for major in [2u8, 3, 4, 5] {
        let lone = bomb(major, u64::MAX / 2);
        decode_everything(&lone);
        assert!(matches!(
            cbor::decode::<Envelope>(&lone, MAX_ENVELOPE_BYTES),
            Err(DecodeError::Malformed(_))
        ));

        // The same header as the body and as the signature of an otherwise valid envelope.
        let (key, peer) = peer_from_seed(1);
        let env = Envelope::seal(
            &key,
            Header {
                id: MessageId([1; 16]),
                to: Destination::Peer(peer),
                sent_at_ms: 0,
                lamport: 0,
                expires_at_ms: None,
            },
            &Body::Chat { text: "x".into() },
        )
        .expect("seal");
        let mut bytes = cbor::encode(&env, MAX_ENVELOPE_BYTES).expect("encode");
        bytes.extend_from_slice(&bomb(major, 1 << 40));
        decode_everything(&bytes);

        let mut req = cbor::encode(
            &mailbox::Request::Ack {
                req_id: 1,
                seqs: vec![],
            },
            1024,
        )
        .expect("encode");
        // Replace the empty array (0x80) with a header claiming 2^40 entries.
        let pos = req.iter().rposition(|b| *b == 0x80).expect("empty array");
        req.splice(pos..=pos, bomb(4, 1 << 40));
        assert!(cbor::decode::<mailbox::Request>(&req, mailbox::MAX_FRAME_BYTES).is_err());
    }
}

#[test]
fn oversize_input_is_refused_before_parsing() {
    let big = vec![0u8; dm::MAX_FRAME_BYTES + 1];
    assert!(matches!(
        cbor::decode::<dm::Request>(&big, dm::MAX_FRAME_BYTES),
        Err(DecodeError::TooLarge { .. })
    ));
    let header = ((dm::MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
    assert!(frame::decode(&header, dm::MAX_FRAME_BYTES).is_err());
}

#[test]
fn a_full_batch_fits_in_one_frame() {
    let (key, _) = peer_from_seed(1);
    let (_, to) = peer_from_seed(2);
    let big = |i: u8| {
        let header = Header {
            id: MessageId([i; 16]),
            to: Destination::Peer(to),
            sent_at_ms: u64::MAX,
            lamport: u64::MAX,
            expires_at_ms: Some(u64::MAX),
        };
        let text = "é".repeat(kith_protocol::limits::MAX_TEXT_BYTES / 2);
        Envelope::seal(&key, header, &Body::Chat { text }).expect("seal")
    };
    // Pack as a sender does: the first envelope always, the next while they fit.
    let (mut envelopes, mut more_bytes) = (Vec::new(), 0);
    for i in 0..=u8::MAX {
        let next = big(i);
        if !dm::Request::fits(envelopes.len(), more_bytes, next.size_bound()) {
            break;
        }
        if !envelopes.is_empty() {
            more_bytes += next.size_bound();
        }
        envelopes.push(next);
    }
    assert!(envelopes.len() > 1 && envelopes.len() < dm::MAX_BATCH);
    let request = dm::Request::batch(3, envelopes).expect("within limits");
    assert_eq!(round_trip(&request, dm::MAX_FRAME_BYTES), request);
}

#[test]
fn batch_answers_name_each_envelope() {
    let outcomes = [Ok(()), Err(Reject::BadSignature), Ok(())];
    let response = dm::Response::for_outcomes(5, &outcomes);
    assert_eq!(
        response,
        dm::Response::Partly {
            req_id: 5,
            refused: vec![dm::Refused {
                index: 1,
                reason: Reject::BadSignature
            }]
        }
    );
    for (i, expected) in outcomes.iter().enumerate() {
        assert_eq!(&response.outcome(i), expected);
    }
    assert_eq!(
        dm::Response::for_outcomes(5, &[Ok(()), Ok(())]),
        dm::Response::Accepted { req_id: 5 }
    );
    assert_eq!(
        dm::Response::for_outcomes(5, &[Err(Reject::Expired)]),
        dm::Response::Rejected {
            req_id: 5,
            reason: Reject::Expired
        }
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = cbor::encode(&dm::Response::Accepted { req_id: 9 }, 64).expect("encode");
    bytes.push(0);
    assert_eq!(
        cbor::decode::<dm::Response>(&bytes, 64),
        Err(DecodeError::TrailingBytes(1))
    );
}
