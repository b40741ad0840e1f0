//! What the fuzz targets run: one function per decoder a peer can reach, and valid inputs to
//! start from.
//!
//! Each function takes arbitrary bytes, decodes them the way a node or relay does when a peer
//! sends them, runs the checks that follow decoding (signatures, `body()`, shape and limit
//! checks, chain replay), and asserts what must hold of anything that decoded: it encodes again
//! to an equal value, within its limits. It returns whether the input was accepted. A panic is
//! a bug (a crash the fuzzer reports). The libFuzzer targets in `fuzz/` and the corpus replay
//! test (`net/tests/fuzz_corpus.rs`, run by `cargo test`) call the same functions, so what the
//! fuzzer found stays found.
//!
//! Inputs that carry a selector use their first byte for it (request or response, which
//! protocol), so one corpus covers both directions.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::OnceLock;

use futures::io::Cursor;
use kith_protocol::envelope::Header;
use kith_protocol::group::{self, Change, Crypto, Handshake, Limits, Op};
use kith_protocol::invite::Invite;
use kith_protocol::{
    blob, cbor, dm, mailbox, prekeys, presence, Body, Destination, Envelope, GroupId, Keypair,
    MessageId, PeerId, Reject,
};
use libp2p::request_response::Codec as _;
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::codec::{Budget, Message};

/// A fuzz target: its name (the folder of its corpus) and its function.
pub type Target = (&'static str, fn(&[u8]) -> bool);

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("frame", frame),
    ("dm", dm),
    ("mailbox", mailbox),
    ("group", group),
    ("blob", blob),
    ("presence", presence),
    ("keys", keys),
    ("envelope", envelope),
    ("invite", invite),
    ("group_chain", group_chain),
    ("manifest", manifest),
    ("bundle", bundle),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8]) -> bool> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Decodes `bytes` as a `T` of at most `max` bytes; what decodes must encode again, within
/// `max`, to bytes that decode to an equal value.
fn decoded<T>(bytes: &[u8], max: usize) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = cbor::decode(bytes, max).ok()?;
    let again = match cbor::encode(&value, usize::MAX) {
        Ok(again) => again,
        Err(e) => panic!("{value:?} decoded but does not encode: {e}"),
    };
    match cbor::decode::<T>(&again, max) {
        Ok(back) => assert_eq!(back, value, "round trip changed the value"),
        Err(e) => panic!("{value:?} re-encoded does not decode: {e}"),
    }
    Some(value)
}

/// The checks a node or relay runs on an envelope after decoding it. Returns whether the
/// signature and body are good.
fn check_envelope(envelope: &Envelope) -> bool {
    let encoded = cbor::encode(envelope, usize::MAX).unwrap_or_default();
    assert!(
        encoded.len() <= envelope.size_bound(),
        "size_bound {} below the encoding's {} bytes",
        envelope.size_bound(),
        encoded.len()
    );
    let signed = envelope.verify().is_ok();
    let _ = envelope.is_expired(u64::MAX);
    let body = match envelope.body() {
        Ok(body) => body,
        Err(_) => return false,
    };
    check_body(&body);
    if let Destination::Group(_) = envelope.to {
        let _ = group::open_op(envelope);
    }
    signed
}

/// Checks on a body that decoded and validated.
fn check_body(body: &Body) {
    let bytes = cbor::encode(body, usize::MAX).unwrap_or_default();
    assert_eq!(
        cbor::decode::<Body>(&bytes, usize::MAX).ok().as_ref(),
        Some(body),
        "a body does not round-trip"
    );
    match body {
        Body::GroupOp(op) => assert!(op.validate_shape().is_ok()),
        Body::File(file) => {
            assert!(file.validate().is_ok());
            assert!(file.manifest.len() <= blob::MAX_MANIFEST_BLOBS);
        }
        _ => {}
    }
}

/// The stream protocols the codec target picks from.
const PROTOCOLS: [&str; 6] = [
    dm::PROTOCOL,
    mailbox::PROTOCOL,
    group::PROTOCOL,
    blob::PROTOCOL,
    presence::PROTOCOL,
    prekeys::PROTOCOL,
];

/// `/kith/*` streams through the request-response codec, as a relay or node reads them:
/// the first byte picks the protocol (`% 6`), the direction (`/ 6 % 2`) and whether frames are
/// read against a small memory budget (`>= 128`); the rest is what arrives on the stream.
pub fn frame(data: &[u8]) -> bool {
    let Some((&selector, stream)) = data.split_first() else {
        return false;
    };
    let protocol = StreamProtocol::new(PROTOCOLS[usize::from(selector) % PROTOCOLS.len()]);
    let request = (selector / 6) % 2 == 0;
    let budget = (selector >= 128).then(|| Budget::new(64 * 1024, 100));
    macro_rules! read {
        ($codec:expr) => {{
            let mut codec = $codec;
            if let Some(budget) = &budget {
                codec = codec.with_budget(budget.clone());
            }
            let accepted = if request {
                let read =
                    futures::executor::block_on(codec.read_request(&protocol, &mut Cursor::new(stream)));
                match read {
                    Ok(Message::Valid(value)) => {
                        let mut out = Cursor::new(Vec::new());
                        let written = futures::executor::block_on(codec.write_request(
                            &protocol,
                            &mut out,
                            Message::Valid(value.clone()),
                        ));
                        // A value that decoded may re-encode a little longer (fields the peer
                        // left to their defaults); only one that fits can be read back.
                        if written.is_ok() {
                        let back = futures::executor::block_on(
                            codec.read_request(&protocol, &mut Cursor::new(out.into_inner())),
                        );
                        assert!(
                            matches!(back, Ok(Message::Valid(ref b)) if *b == value),
                            "a request does not round-trip through the codec"
                        );
                        }
                        true
                    }
                    Ok(Message::Invalid { reason, .. }) => {
                        assert!(matches!(
                            reason,
                            Reject::Malformed | Reject::TooLarge { .. } | Reject::Busy { .. }
                        ));
                        false
                    }
                    Ok(Message::Raw(_)) => panic!("reading produced a raw message"),
                    Err(_) => false,
                }
            } else {
                futures::executor::block_on(
                    codec.read_response(&protocol, &mut Cursor::new(stream)),
                )
                .is_ok()
            };
            if let Some(budget) = &budget {
                assert_eq!(budget.held_bytes(), 0, "a finished read still holds bytes");
            }
            accepted
        }};
    }
    match usize::from(selector) % PROTOCOLS.len() {
        0 => read!(crate::DmCodec::new(dm::MAX_FRAME_BYTES)),
        1 => read!(crate::MailboxCodec::with_limits(
            mailbox::MAX_REQUEST_BYTES,
            mailbox::MAX_FRAME_BYTES
        )),
        2 => read!(crate::GroupCodec::with_limits(
            group::MAX_REQUEST_BYTES,
            group::MAX_FRAME_BYTES
        )),
        3 => read!(crate::BlobCodec::new(blob::MAX_FRAME_BYTES)),
        4 => read!(crate::PresenceCodec::new(presence::MAX_FRAME_BYTES)),
        _ => read!(crate::KeysCodec::new(prekeys::MAX_FRAME_BYTES)),
    }
}

/// Splits off the first byte: `true` when its low bit is clear (a request).
fn direction(data: &[u8]) -> Option<(bool, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    Some((selector & 1 == 0, rest))
}

/// `/kith/dm/1`: a request (first byte even) with every envelope checked as a node checks it,
/// or a response.
pub fn dm(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        let Some(request) = decoded::<dm::Request>(bytes, dm::MAX_FRAME_BYTES) else {
            return false;
        };
        if !request.is_within_limits() {
            return false;
        }
        let count = request.len();
        let envelopes = request.into_envelopes();
        assert_eq!(envelopes.len(), count);
        envelopes.iter().filter(|e| !check_envelope(e)).count() == 0
    } else {
        let Some(response) = decoded::<dm::Response>(bytes, dm::MAX_FRAME_BYTES) else {
            return false;
        };
        let _ = response.req_id();
        for index in 0..=dm::MAX_BATCH {
            let _ = response.outcome(index);
        }
        true
    }
}

/// `/kith/mailbox/1`: a request (first byte even) as a relay reads it, or a response as a
/// node reads it (every fetched envelope checked).
pub fn mailbox(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        match decoded::<mailbox::Request>(bytes, mailbox::MAX_REQUEST_BYTES) {
            Some(mailbox::Request::Deposit { envelope, .. }) => check_envelope(&envelope),
            Some(mailbox::Request::Ack { seqs, .. }) => {
                assert!(seqs.len() <= kith_protocol::limits::MAX_IDS_PER_BATCH);
                true
            }
            Some(mailbox::Request::Fetch { .. }) => true,
            None => false,
        }
    } else {
        match decoded::<mailbox::Response>(bytes, mailbox::MAX_FRAME_BYTES) {
            Some(mailbox::Response::Batch { items, .. }) => {
                items
                    .iter()
                    .filter(|item| !check_envelope(&item.envelope))
                    .count()
                    == 0
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// `/kith/group/1`: a request (first byte even) as the group's relay reads it, or a response.
pub fn group(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        match decoded::<group::Request>(bytes, group::MAX_REQUEST_BYTES) {
            Some(group::Request::Submit { op, handshake, .. }) => {
                check_envelope(&op);
                match (group::open_op(&op), handshake) {
                    (Ok(op), Some(handshake)) => handshake.check(&op).is_ok(),
                    (opened, _) => opened.is_ok(),
                }
            }
            Some(group::Request::Post { envelope, .. }) => check_envelope(&envelope),
            Some(group::Request::Get { .. }) => true,
            None => false,
        }
    } else {
        match decoded::<group::Response>(bytes, group::MAX_FRAME_BYTES) {
            Some(group::Response::Ops { ops, .. }) => {
                ops.iter().for_each(|op| {
                    check_envelope(op);
                });
                group::replay(None, &ops, &Limits::default()).is_ok()
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// `/kith/blob/1`: a request (first byte even) or a response; a blob's bytes are checked
/// against its hash as the receiver does.
pub fn blob(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        match decoded::<blob::Request>(bytes, blob::MAX_FRAME_BYTES) {
            Some(blob::Request::Put { hash, bytes, .. }) => {
                bytes.len() <= blob::MAX_BLOB_BYTES && blob::verify(&hash, &bytes).is_ok()
            }
            Some(_) => true,
            None => false,
        }
    } else {
        decoded::<blob::Response>(bytes, blob::MAX_FRAME_BYTES).is_some()
    }
}

/// `/kith/presence/1`: a request (first byte even), its policy validated and asked as a relay
/// asks it, or a response.
pub fn presence(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        match decoded::<presence::Request>(bytes, presence::MAX_FRAME_BYTES) {
            Some(presence::Request::Heartbeat {
                policy: Some(policy),
                ..
            }) => {
                if policy.validate().is_err() {
                    return false;
                }
                let owner = fixed_peer(0);
                let digest = policy.digest();
                let normalized = policy.normalized();
                assert_eq!(normalized.clone().normalized(), normalized);
                assert!(normalized.allows(&owner, &owner));
                for contact in &normalized.contacts {
                    let _ = normalized.allows(&owner, contact);
                }
                let _ = digest;
                true
            }
            Some(_) => true,
            None => false,
        }
    } else {
        decoded::<presence::Response>(bytes, presence::MAX_FRAME_BYTES).is_some()
    }
}

/// `/kith/keys/1`: a request (first byte even), a published bundle checked against its owner,
/// or a response, a claimed key checked against the peer asked for.
pub fn keys(data: &[u8]) -> bool {
    let Some((request, bytes)) = direction(data) else {
        return false;
    };
    if request {
        match decoded::<prekeys::Request>(bytes, prekeys::MAX_FRAME_BYTES) {
            Some(prekeys::Request::Publish { bundle, .. }) => {
                bundle.verify(&bundle.identity.peer).is_ok()
            }
            Some(prekeys::Request::PublishPackages {
                packages,
                last_resort,
                ..
            }) => packages
                .iter()
                .map(|p| (p, false))
                .chain(last_resort.iter().map(|p| (p, true)))
                .all(|(package, last_resort)| {
                    crate::key_package::owner_of(package)
                        .and_then(|owner| {
                            crate::key_package::verify(package, &owner, Some(last_resort))
                        })
                        .is_ok()
                }),
            Some(prekeys::Request::Claim { .. } | prekeys::Request::ClaimPackage { .. }) => true,
            None => false,
        }
    } else {
        match decoded::<prekeys::Response>(bytes, prekeys::MAX_FRAME_BYTES) {
            Some(prekeys::Response::Claimed {
                identity,
                key,
                fallback,
                ..
            }) => {
                let peer = identity.peer;
                identity.verify(&peer).is_ok() && key.verify(&peer, fallback).is_ok()
            }
            Some(prekeys::Response::ClaimedPackage {
                package,
                last_resort,
                ..
            }) => crate::key_package::owner_of(&package)
                .and_then(|owner| crate::key_package::verify(&package, &owner, Some(last_resort)))
                .is_ok(),
            Some(_) => true,
            None => false,
        }
    }
}

/// One envelope as gossip or a stored record brings it: decoded, signature checked, body
/// decoded and validated.
pub fn envelope(data: &[u8]) -> bool {
    match decoded::<Envelope>(data, kith_protocol::limits::MAX_ENVELOPE_BYTES) {
        Some(envelope) => check_envelope(&envelope),
        None => false,
    }
}

/// An invite: the first byte even, the rest is the text a user pastes; odd, the rest is the
/// CBOR inside, wrapped as an invite is (so the fuzzer reaches past base58).
pub fn invite(data: &[u8]) -> bool {
    let Some((&selector, rest)) = data.split_first() else {
        return false;
    };
    let text = if selector & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        format!(
            "{}{}",
            kith_protocol::invite::PREFIX,
            bs58::encode(rest).into_string()
        )
    };
    match Invite::decode(&text) {
        Ok(invite) => {
            assert!(invite.relays.len() <= kith_protocol::invite::MAX_INVITE_RELAYS);
            let again = Invite::decode(&invite.encode());
            assert_eq!(
                again.as_ref().ok(),
                Some(&invite),
                "an invite does not round-trip"
            );
            if let Some(identity) = &invite.identity {
                let _ = identity.verify(&invite.peer_id);
            }
            true
        }
        Err(_) => false,
    }
}

/// The fixed keys the chain target signs with.
const SIGNERS: usize = 4;

fn signers() -> &'static [(Keypair, PeerId)] {
    static SIGNERS_CELL: OnceLock<Vec<(Keypair, PeerId)>> = OnceLock::new();
    SIGNERS_CELL.get_or_init(|| {
        (0..SIGNERS)
            .filter_map(|i| {
                let key = Keypair::ed25519_from_bytes([i as u8 + 1; 32]).ok()?;
                let peer = key.public().to_peer_id();
                Some((key, peer))
            })
            .collect()
    })
}

/// The peer id of fixed key `i` (so seeds can name the chain target's signers).
pub fn fixed_peer(i: usize) -> PeerId {
    signers()
        .get(i % SIGNERS)
        .map_or_else(PeerId::random, |(_, peer)| *peer)
}

/// A step of the chain target's structured input: which fixed key signs which operation.
pub type ChainStep = (u8, Op);

/// Group operation chain replay, as a member checks a chain a relay sent. First byte even: the
/// rest is a CBOR list of signed envelopes, replayed from scratch. Odd: a CBOR list of
/// `(signer, op)` that is signed here with fixed keys first, so the fuzzer reaches the
/// membership rules behind the signatures. What replays must respect the member limit.
pub fn group_chain(data: &[u8]) -> bool {
    let Some((&selector, rest)) = data.split_first() else {
        return false;
    };
    let limits = Limits { max_members: 8 };
    let ops: Vec<Envelope> = if selector & 1 == 0 {
        match decoded::<Vec<Envelope>>(rest, group::MAX_FRAME_BYTES) {
            Some(ops) => ops,
            None => return false,
        }
    } else {
        let Some(steps) = decoded::<Vec<ChainStep>>(rest, group::MAX_REQUEST_BYTES) else {
            return false;
        };
        if steps.len() > 64 {
            return false;
        }
        steps
            .into_iter()
            .enumerate()
            .filter_map(|(i, (signer, op))| sign_op(signer, op, i as u64))
            .collect()
    };
    let Ok(state) = group::replay(None, &ops, &limits) else {
        return false;
    };
    if let Some(state) = state {
        assert!(state.members.len() <= limits.max_members, "{state:?}");
        assert!(state.admins.is_subset(&state.members), "{state:?}");
        assert_eq!(state.version, ops.len() as u64);
        // Replaying in two parts reaches the same state.
        let half = ops.len() / 2;
        let first = group::replay(None, &ops[..half], &limits).ok().flatten();
        let whole = group::replay(first, &ops[half..], &limits);
        assert_eq!(whole, Ok(Some(state)));
    }
    true
}

/// Signs `op` with fixed key `signer` as a group operation envelope.
pub fn sign_op(signer: u8, op: Op, lamport: u64) -> Option<Envelope> {
    let (key, _) = signers().get(usize::from(signer) % SIGNERS)?;
    let header = Header {
        id: MessageId([lamport as u8; 16]),
        to: Destination::Group(op.group),
        sent_at_ms: 0,
        lamport,
        expires_at_ms: None,
    };
    Envelope::seal(key, header, &Body::GroupOp(op)).ok()
}

/// A file manifest blob, as a downloader parses it: the first 8 bytes are the file's size
/// (little-endian), the next 2 the manifest part, the rest the blob, also read as the CBOR of
/// a `FileRef` (the signed reference that names the manifest).
pub fn manifest(data: &[u8]) -> bool {
    let (Some(size), Some(part), Some(bytes)) = (data.get(..8), data.get(8..10), data.get(10..))
    else {
        return false;
    };
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(size);
    let size = u64::from_le_bytes(size_bytes);
    let part = usize::from(u16::from_le_bytes([part[0], part[1]]));
    // The file reference that names the manifest, from the same bytes.
    if let Some(file) = decoded::<blob::FileRef>(bytes, kith_protocol::limits::MAX_BODY_BYTES) {
        if file.validate().is_ok() {
            assert_eq!(file.manifest.len(), blob::manifest_blob_count(file.size));
        }
    }
    match blob::parse_manifest(size, part, bytes) {
        Ok(hashes) => {
            let total = blob::chunk_count(size);
            assert!(hashes.len() <= blob::MANIFEST_HASHES_PER_BLOB);
            assert!(hashes.len() as u64 <= total);
            assert_eq!(hashes.len() * blob::HASH_BYTES, bytes.len());
            true
        }
        Err(_) => false,
    }
}

/// A key bundle, as a relay checks a publication against the connection's peer.
pub fn bundle(data: &[u8]) -> bool {
    match decoded::<prekeys::Bundle>(data, prekeys::MAX_FRAME_BYTES) {
        Some(bundle) => {
            let owner = bundle.identity.peer;
            let ok = bundle.verify(&owner).is_ok();
            if ok {
                assert!(bundle.one_time_keys.len() <= prekeys::MAX_ONE_TIME_KEYS);
                // Someone else's connection may not publish it.
                assert!(bundle.verify(&fixed_peer(3)).is_err() || owner == fixed_peer(3));
            }
            ok
        }
        None => false,
    }
}

/// Valid inputs for every target, to start fuzzing from (each is accepted by its target).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let signers = signers();
    let (Some((alice, alice_id)), Some((bob, bob_id))) = (signers.first(), signers.get(1)) else {
        return out;
    };
    let header = |to: Destination, lamport: u64| Header {
        id: MessageId([lamport as u8; 16]),
        to,
        sent_at_ms: 1_700_000_000_000,
        lamport,
        expires_at_ms: Some(1_800_000_000_000),
    };
    let chat = Envelope::seal(
        alice,
        header(Destination::Peer(*bob_id), 1),
        &Body::Chat {
            text: "hello".into(),
        },
    );
    let receipt = Envelope::seal(
        bob,
        header(Destination::Peer(*alice_id), 2),
        &Body::Receipt {
            state: kith_protocol::ReceiptState::Delivered,
            ids: vec![MessageId([1; 16])],
        },
    );
    let file = blob::FileRef {
        name: "photo.png".into(),
        size: 300_000,
        mime: "image/png".into(),
        file_hash: blob::Hash::of(b"file"),
        key: blob::Key([3; 32]),
        cipher: blob::Cipher::CURRENT,
        manifest: vec![blob::Hash::of(b"manifest")],
        thumbnail: Some(vec![0x89, b'P', b'N', b'G']),
    };
    let file_message = Envelope::seal(
        alice,
        header(Destination::Peer(*bob_id), 3),
        &Body::File(file.clone()),
    );
    let olm = Envelope::seal(
        alice,
        header(Destination::Peer(*bob_id), 4),
        &Body::Olm(kith_protocol::envelope::Sealed {
            message_type: kith_protocol::envelope::OLM_NORMAL,
            ciphertext: vec![1, 2, 3, 4],
            identity: None,
            receipt: false,
        }),
    );
    let group_id = GroupId([9; 16]);
    // Stand-in commit and Welcome bytes: the chain checks their digests and epochs, not MLS.
    let handshake = |welcome: bool| Handshake {
        commit: ByteBuf::from(vec![7; 64]),
        welcome: welcome.then(|| ByteBuf::from(vec![8; 64])),
    };
    let create = Op {
        group: group_id,
        version: 0,
        change: Change::Create {
            name: "friends".into(),
            relay:
                "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                    .into(),
            members: BTreeSet::from([*bob_id]),
        },
        mls: Some(Crypto::of(0, &handshake(true))),
    };
    let add = Op {
        group: group_id,
        version: 1,
        change: Change::Add {
            member: fixed_peer(2),
        },
        mls: Some(Crypto::of(1, &handshake(true))),
    };
    let promote = Op {
        group: group_id,
        version: 2,
        change: Change::Promote { member: *bob_id },
        mls: None,
    };
    let remove = Op {
        group: group_id,
        version: 3,
        change: Change::Remove {
            member: fixed_peer(2),
        },
        mls: Some(Crypto::of(2, &handshake(false))),
    };
    let leave = Op {
        group: group_id,
        version: 4,
        change: Change::Leave,
        mls: None,
    };
    let steps: Vec<ChainStep> = vec![
        (0, create.clone()),
        (0, add.clone()),
        (0, promote.clone()),
        (1, remove.clone()),
        (0, leave.clone()),
    ];
    let chain: Vec<Envelope> = steps
        .iter()
        .enumerate()
        .filter_map(|(i, (s, op))| sign_op(*s, op.clone(), i as u64))
        .collect();
    let group_post = Envelope::seal(
        alice,
        header(Destination::Group(group_id), 5),
        &Body::Chat {
            text: "hi all".into(),
        },
    );
    let (Ok(chat), Ok(receipt), Ok(file_message), Ok(olm), Ok(group_post)) =
        (chat, receipt, file_message, olm, group_post)
    else {
        return out;
    };
    let identity = prekeys::SignedIdentity::sign(alice, [5; 32]);
    let one_time = prekeys::SignedKey::sign(alice, [6; 32], false);
    let fallback = prekeys::SignedKey::sign(alice, [7; 32], true);
    let (Ok(identity), Ok(one_time), Ok(fallback)) = (identity, one_time, fallback) else {
        return out;
    };
    let bundle = prekeys::Bundle {
        identity: identity.clone(),
        one_time_keys: vec![one_time.clone()],
        fallback: Some(fallback),
    };

    let mut push = |target: &'static str, selector: Option<u8>, bytes: Option<Vec<u8>>| {
        if let Some(bytes) = bytes {
            let mut input = selector.map(|s| vec![s]).unwrap_or_default();
            input.extend(bytes);
            out.push((target, input));
        }
    };
    let enc = |value: &dyn erased::Encode| value.encode();

    // Frames: one request per protocol, framed as on the wire.
    let framed = |value: &dyn erased::Encode| {
        value
            .encode()
            .and_then(|b| kith_protocol::frame::encode(&b, usize::MAX).ok())
    };
    let dm_request = dm::Request {
        req_id: 1,
        envelope: chat.clone(),
        more: vec![receipt.clone()],
    };
    let mailbox_deposit = mailbox::Request::Deposit {
        req_id: 2,
        envelope: chat.clone(),
        class: mailbox::DepositClass::Message,
    };
    let group_post_request = group::Request::Post {
        req_id: 3,
        envelope: group_post.clone(),
    };
    let blob_put = blob::Request::Put {
        req_id: 4,
        hash: blob::Hash::of(b"chunk"),
        bytes: b"chunk".to_vec(),
        expires_at_ms: Some(1_764_000_000_000),
    };
    let heartbeat = presence::Request::Heartbeat {
        req_id: 5,
        activity: presence::Activity::User,
        offline_after_ms: 30_000,
        policy_digest: 7,
        policy: Some(presence::Policy::new(
            presence::Visibility::Contacts,
            [*bob_id, fixed_peer(2)],
        )),
    };
    let publish = prekeys::Request::Publish {
        req_id: 6,
        bundle: bundle.clone(),
    };
    push("frame", Some(0), framed(&dm_request));
    push("frame", Some(1), framed(&mailbox_deposit));
    push("frame", Some(2), framed(&group_post_request));
    push("frame", Some(3), framed(&blob_put));
    push("frame", Some(4), framed(&heartbeat));
    push("frame", Some(5), framed(&publish));
    push(
        "frame",
        Some(7),
        framed(&mailbox::Response::Batch {
            req_id: 2,
            items: vec![mailbox::Item {
                seq: 1,
                envelope: chat.clone(),
            }],
            more: false,
        }),
    );
    push("frame", Some(133), framed(&mailbox_deposit));

    push("dm", Some(0), enc(&dm_request));
    push(
        "dm",
        Some(0),
        enc(&dm::Request::new(9, file_message.clone())),
    );
    push("dm", Some(0), enc(&dm::Request::new(10, olm.clone())));
    push(
        "dm",
        Some(1),
        enc(&dm::Response::Partly {
            req_id: 1,
            refused: vec![dm::Refused {
                index: 1,
                reason: Reject::Busy { retry_after_ms: 5 },
            }],
        }),
    );

    push("mailbox", Some(0), enc(&mailbox_deposit));
    push(
        "mailbox",
        Some(0),
        enc(&mailbox::Request::Ack {
            req_id: 3,
            seqs: vec![1, 2, 3],
        }),
    );
    push(
        "mailbox",
        Some(0),
        enc(&mailbox::Request::Fetch {
            req_id: 4,
            after: Some(1),
            limit: 100,
        }),
    );
    push(
        "mailbox",
        Some(1),
        enc(&mailbox::Response::Batch {
            req_id: 4,
            items: vec![mailbox::Item {
                seq: 2,
                envelope: receipt.clone(),
            }],
            more: true,
        }),
    );
    push(
        "mailbox",
        Some(1),
        enc(&mailbox::Response::Rejected {
            req_id: 5,
            reason: Reject::QuotaExceeded,
            retry_after_ms: Some(1000),
        }),
    );

    if let Some(first) = chain.first() {
        push(
            "group",
            Some(0),
            enc(&group::Request::Submit {
                req_id: 1,
                op: first.clone(),
                handshake: Some(handshake(true)),
            }),
        );
    }
    push("group", Some(0), enc(&group_post_request));
    push(
        "group",
        Some(0),
        enc(&group::Request::Get {
            req_id: 2,
            group: group_id,
            after_version: 0,
            limit: 10,
        }),
    );
    push(
        "group",
        Some(1),
        enc(&group::Response::Ops {
            req_id: 2,
            ops: chain.clone(),
            more: false,
            handshakes: vec![
                Some(handshake(true)),
                Some(handshake(true)),
                None,
                Some(handshake(false)),
                None,
            ],
        }),
    );
    push(
        "group",
        Some(1),
        enc(&group::Response::Stored {
            req_id: 3,
            recipients: 1,
            missed: BTreeSet::from([fixed_peer(2)]),
        }),
    );

    push("blob", Some(0), enc(&blob_put));
    push(
        "blob",
        Some(0),
        enc(&blob::Request::Begin {
            req_id: 1,
            size: 1 << 20,
        }),
    );
    push(
        "blob",
        Some(1),
        enc(&blob::Response::Blob {
            req_id: 4,
            bytes: vec![1; 64],
        }),
    );

    push("presence", Some(0), enc(&heartbeat));
    push(
        "presence",
        Some(0),
        enc(&presence::Request::Query {
            req_id: 2,
            peer: *bob_id,
        }),
    );
    push(
        "presence",
        Some(1),
        enc(&presence::Response::Status {
            req_id: 2,
            online: true,
            last_seen_ms: Some(5),
        }),
    );

    push("keys", Some(0), enc(&publish));
    push(
        "keys",
        Some(0),
        enc(&prekeys::Request::Claim {
            req_id: 7,
            peer: *alice_id,
        }),
    );
    push(
        "keys",
        Some(1),
        enc(&prekeys::Response::Claimed {
            req_id: 7,
            identity: identity.clone(),
            key: one_time,
            fallback: false,
        }),
    );

    for envelope in [&chat, &receipt, &file_message, &olm, &group_post] {
        push("envelope", None, enc(envelope));
    }
    if let Some(op) = chain.first() {
        push("envelope", None, enc(op));
    }

    let invite = Invite {
        peer_id: *alice_id,
        name: "alice".into(),
        relays: vec![
            "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .into(),
        ],
        identity: Some(identity),
    };
    push("invite", Some(0), Some(invite.encode().into_bytes()));
    push("invite", Some(1), enc(&invite));

    push("group_chain", Some(0), enc(&chain));
    push("group_chain", Some(1), enc(&steps));

    let hashes: Vec<u8> = (0..2u8)
        .flat_map(|i| blob::Hash::of(&[i]).0)
        .collect::<Vec<u8>>();
    let mut manifest_input = (2 * blob::CHUNK_BYTES as u64 - 5).to_le_bytes().to_vec();
    manifest_input.extend_from_slice(&0u16.to_le_bytes());
    manifest_input.extend_from_slice(&hashes);
    push("manifest", None, Some(manifest_input));

    push("bundle", None, enc(&bundle));
    out
}

/// Encoding behind a trait object, so the seed list can name values of any wire type.
mod erased {
    use super::*;

    pub trait Encode {
        fn encode(&self) -> Option<Vec<u8>>;
    }

    impl<T: Serialize> Encode for T {
        fn encode(&self) -> Option<Vec<u8>> {
            cbor::encode(self, usize::MAX).ok()
        }
    }
}
