//! The signed envelope that carries every message, receipt and (later) group operation.
//!
//! The body travels as opaque bytes so that a relay can verify, store and forward an envelope
//! without decoding it (bodies will be end-to-end encrypted). The signature covers every other
//! field, encoded deterministically, after a domain-separation tag.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::cbor::{self, DecodeError, EncodeError};
use crate::ids::{peer_bytes, GroupId, MessageId};
use crate::limits::{MAX_BODY_BYTES, MAX_IDS_PER_BATCH, MAX_TEXT_BYTES};

/// The envelope format version this crate writes and accepts.
pub const VERSION: u8 = 1;

/// Prefix of every signed payload, so a kith signature can never be replayed in another context.
const SIGNING_DOMAIN: &[u8] = b"kith/envelope/v1\0";

/// The most an envelope's encoding adds to its body and signature: field names, the id, two
/// peer ids' worth of `from` and `to`, three integers, and CBOR headers (about 300 bytes).
const ENVELOPE_OVERHEAD_BOUND: usize = 512;

/// Where an envelope goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// One peer.
    Peer(#[serde(with = "peer_bytes")] PeerId),
    /// Every member of a group.
    Group(GroupId),
}

/// What a receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ReceiptState {
    /// The messages are stored by the recipient's node.
    Delivered,
    /// The recipient user has seen the messages.
    Read,
}

/// The decoded content of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A chat message.
    Chat {
        /// The text, at most [`MAX_TEXT_BYTES`] bytes.
        text: String,
    },
    /// A receipt for messages this envelope's recipient sent to its sender.
    Receipt {
        /// Delivered or read.
        state: ReceiptState,
        /// The messages it covers, at most [`MAX_IDS_PER_BATCH`].
        ids: Vec<MessageId>,
    },
    /// A signed group membership operation (see [`crate::group`]), addressed to the group.
    GroupOp(crate::group::Op),
    /// A shared file: where its encrypted chunks are and the key to open them
    /// (see [`crate::blob`]).
    File(crate::blob::FileRef),
    /// An end-to-end encrypted one-to-one body (see [`Sealed`]): every one-to-one body that
    /// carries content travels as one.
    Olm(Sealed),
    /// An end-to-end encrypted group body: an MLS `PrivateMessage` (TLS encoded) of the group's
    /// current epoch, whose plaintext is the CBOR of the inner [`Body`]. Every group body that
    /// carries content travels as one.
    Mls {
        /// The MLS message bytes.
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
    /// A signed plaintext control message: the sender of these messages should start a new
    /// session and send them again (the recipient could not decrypt them).
    Resend {
        /// The messages, at most [`MAX_IDS_PER_BATCH`].
        ids: Vec<MessageId>,
        /// The recipient has no usable session (its state was lost): start a new one. Otherwise
        /// the messages' keys alone were gone (they came too far out of order), and the current
        /// session serves.
        #[serde(default)]
        new_session: bool,
    },
    /// The conversation's disappearing-message timer changes (see [`crate::timer`]); `None`
    /// makes it permanent again. One-to-one it travels sealed like any content body.
    Timer {
        /// The new timer in seconds, within [`crate::timer::MIN_SECS`] ..=
        /// [`crate::timer::MAX_SECS`].
        secs: Option<u64>,
        /// In a group: from now on only admins may change the timer (members check it
        /// against the group's admins). Only an admin's change may set or clear it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        admins_only: bool,
    },
}

/// vodozemac's Olm message parts; the plaintext is the CBOR of the inner [`Body`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// 0 for a pre-key message (the first messages of a session), 1 for a normal one.
    pub message_type: u8,
    /// The Olm message bytes.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The sender's signed Olm identity key, on pre-key messages: a recipient that does not
    /// know it yet learns it here, checked against the envelope's sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::prekeys::SignedIdentity>,
    /// The inner body is a receipt (relays learn as much from a deposit's class already): one
    /// whose key is gone is dropped, not asked for again, since receipts are not kept to be
    /// sent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub receipt: bool,
}

/// [`Sealed::message_type`] of a pre-key message.
pub const OLM_PRE_KEY: u8 = 0;
/// [`Sealed::message_type`] of a normal message.
pub const OLM_NORMAL: u8 = 1;

impl Body {
    /// Checks the body's own limits.
    pub fn validate(&self) -> Result<(), BodyError> {
        match self {
            Body::Chat { text } if text.len() > MAX_TEXT_BYTES => Err(BodyError::TextTooLong {
                len: text.len(),
                max: MAX_TEXT_BYTES,
            }),
            Body::Receipt { ids, .. } if ids.is_empty() || ids.len() > MAX_IDS_PER_BATCH => {
                Err(BodyError::BadReceipt { count: ids.len() })
            }
            Body::GroupOp(op) => crate::group::validate_body(op),
            Body::File(file) => file
                .validate()
                .map_err(|e| BodyError::BadFile(e.to_string())),
            Body::Olm(sealed) if sealed.message_type > OLM_NORMAL => {
                Err(BodyError::BadSealed("unknown message type"))
            }
            Body::Olm(sealed) if sealed.ciphertext.is_empty() => {
                Err(BodyError::BadSealed("empty ciphertext"))
            }
            Body::Olm(Sealed {
                message_type: OLM_NORMAL,
                identity: Some(_),
                ..
            }) => Err(BodyError::BadSealed("an identity on a normal message")),
            Body::Mls { ciphertext } if ciphertext.is_empty() => {
                Err(BodyError::BadSealed("empty ciphertext"))
            }
            Body::Resend { ids, .. } if ids.is_empty() || ids.len() > MAX_IDS_PER_BATCH => {
                Err(BodyError::BadReceipt { count: ids.len() })
            }
            Body::Timer {
                secs: Some(secs), ..
            } => crate::timer::check(*secs, crate::timer::MIN_SECS)
                .map_err(|e| BodyError::BadTimer(e.to_string())),
            _ => Ok(()),
        }
    }
}

/// Why a body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The chat text is too long.
    #[error("text of {len} bytes exceeds the limit of {max} bytes")]
    TextTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A receipt must name between 1 and [`MAX_IDS_PER_BATCH`] messages.
    #[error("a receipt must name 1 to {MAX_IDS_PER_BATCH} messages, got {count}")]
    BadReceipt {
        /// How many it named.
        count: usize,
    },
    /// A group operation breaks its own limits.
    #[error("bad group operation: {0}")]
    BadGroupOp(String),
    /// A file reference breaks its own limits.
    #[error("bad file reference: {0}")]
    BadFile(String),
    /// A timer change names a duration outside the limits.
    #[error("bad timer: {0}")]
    BadTimer(String),
    /// An Olm body is malformed.
    #[error("bad sealed body: {0}")]
    BadSealed(&'static str),
    /// The body bytes do not decode.
    #[error("body does not decode: {0}")]
    Decode(#[from] DecodeError),
}

/// The fields of an envelope that the sender chooses; [`Envelope::seal`] adds `from`, the body
/// bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// A fresh random id, unique per sender.
    pub id: MessageId,
    /// The recipient.
    pub to: Destination,
    /// The sender's clock, for display only.
    pub sent_at_ms: u64,
    /// The per-conversation logical clock, for ordering.
    pub lamport: u64,
    /// When the message disappears, if it is temporary.
    pub expires_at_ms: Option<u64>,
}

/// A signed envelope, as it travels and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version.
    pub v: u8,
    /// Unique per sender.
    pub id: MessageId,
    /// The sender; its public key is embedded in the peer id (ed25519).
    #[serde(with = "peer_bytes")]
    pub from: PeerId,
    /// The recipient.
    pub to: Destination,
    /// The sender's clock, for display only.
    pub sent_at_ms: u64,
    /// The per-conversation logical clock.
    pub lamport: u64,
    /// When the message disappears, if it is temporary.
    pub expires_at_ms: Option<u64>,
    /// The encoded [`Body`] (opaque to relays).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// ed25519 signature over the domain tag and every field above.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// The signed part of an envelope, encoded as a CBOR array in this order.
#[derive(Serialize)]
struct Signed<'a>(
    u8,
    &'a MessageId,
    #[serde(with = "serde_bytes")] &'a [u8],
    &'a Destination,
    u64,
    u64,
    Option<u64>,
    #[serde(with = "serde_bytes")] &'a [u8],
);

/// Why an envelope could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The body breaks its own limits.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The body does not fit in an envelope.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The key could not sign (not an ed25519 key, for instance).
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Why an envelope does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The format version is not one this crate accepts.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// The sender's peer id does not embed a public key (only ed25519 ids do).
    #[error("sender {0} does not embed a public key")]
    UnknownKey(PeerId),
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("body of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
}

/// Extracts the public key embedded in an identity-multihash peer id (ed25519 keys are).
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    // 0x00 is the identity multihash: the digest is the protobuf-encoded public key itself.
    if multihash.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    (key.to_peer_id() == *peer).then_some(key)
}

/// A sender's public key, decoded once from its peer id ([`public_key_of`]) and reusable for
/// every envelope that sender signs: decoding an ed25519 key decompresses a curve point, a
/// sizeable part of a verification. It stays tied to its peer id, so a key can only ever check
/// envelopes whose `from` is that peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderKey {
    peer: PeerId,
    key: PublicKey,
}

impl SenderKey {
    /// The key embedded in `peer`, if it embeds one (ed25519 peer ids do).
    pub fn of(peer: &PeerId) -> Option<Self> {
        Some(Self {
            peer: *peer,
            key: public_key_of(peer)?,
        })
    }

    /// The peer this key belongs to.
    pub fn peer(&self) -> &PeerId {
        &self.peer
    }
}

impl Envelope {
    /// An upper bound of its encoded size: the body and signature plus the most the header
    /// fields and CBOR framing can take. Cheap: nothing is encoded.
    pub fn size_bound(&self) -> usize {
        self.body.len() + self.sig.len() + ENVELOPE_OVERHEAD_BOUND
    }

    /// Encodes `body`, fills in `from` from `keypair`, and signs.
    pub fn seal(keypair: &Keypair, header: Header, body: &Body) -> Result<Self, SealError> {
        body.validate()?;
        let body = cbor::encode(body, MAX_BODY_BYTES)?;
        let mut envelope = Envelope {
            v: VERSION,
            id: header.id,
            from: keypair.public().to_peer_id(),
            to: header.to,
            sent_at_ms: header.sent_at_ms,
            lamport: header.lamport,
            expires_at_ms: header.expires_at_ms,
            body,
            sig: Vec::new(),
        };
        envelope.sig = keypair
            .sign(&envelope.signing_payload())
            .map_err(|e| SealError::Sign(e.to_string()))?;
        Ok(envelope)
    }

    /// The bytes the signature covers.
    fn signing_payload(&self) -> Vec<u8> {
        let from = self.from.to_bytes();
        let signed = Signed(
            self.v,
            &self.id,
            &from,
            &self.to,
            self.sent_at_ms,
            self.lamport,
            self.expires_at_ms,
            &self.body,
        );
        let mut payload = SIGNING_DOMAIN.to_vec();
        // Writing into a Vec has no I/O failure and these plain types always serialize; were it
        // ever to fail, the payload would be truncated and the signature would not verify, which
        // is the safe outcome.
        let _ = ciborium::into_writer(&signed, &mut payload);
        payload
    }

    /// Checks the version, the body size and the signature against `from`'s key.
    pub fn verify(&self) -> Result<(), VerifyError> {
        self.check_limits()?;
        let sender = SenderKey::of(&self.from).ok_or(VerifyError::UnknownKey(self.from))?;
        self.verify_with(&sender)
    }

    /// [`Envelope::verify`] with the sender's key already decoded. A key of another peer than
    /// `from` is refused as [`VerifyError::UnknownKey`].
    pub fn verify_with(&self, sender: &SenderKey) -> Result<(), VerifyError> {
        self.check_limits()?;
        if sender.peer != self.from {
            return Err(VerifyError::UnknownKey(self.from));
        }
        if sender.key.verify(&self.signing_payload(), &self.sig) {
            Ok(())
        } else {
            Err(VerifyError::BadSignature)
        }
    }

    /// The version and body size checks of [`Envelope::verify`].
    fn check_limits(&self) -> Result<(), VerifyError> {
        if self.v != VERSION {
            return Err(VerifyError::UnsupportedVersion(self.v));
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Err(VerifyError::BodyTooLarge {
                len: self.body.len(),
                max: MAX_BODY_BYTES,
            });
        }
        Ok(())
    }

    /// Decodes and validates the body.
    pub fn body(&self) -> Result<Body, BodyError> {
        let body: Body = cbor::decode(&self.body, MAX_BODY_BYTES)?;
        body.validate()?;
        Ok(body)
    }

    /// Whether the envelope has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(to: PeerId) -> Header {
        Header {
            id: MessageId([7; 16]),
            to: Destination::Peer(to),
            sent_at_ms: 1_700_000_000_000,
            lamport: 3,
            expires_at_ms: None,
        }
    }

    fn sealed() -> (Keypair, Envelope) {
        let alice = Keypair::generate_ed25519();
        let bob = Keypair::generate_ed25519().public().to_peer_id();
        let env = Envelope::seal(
            &alice,
            header(bob),
            &Body::Chat {
                text: "hello".into(),
            },
        )
        .expect("seal");
        (alice, env)
    }

    #[test]
    fn sealed_envelope_verifies_and_decodes() {
        let (alice, env) = sealed();
        assert_eq!(env.from, alice.public().to_peer_id());
        assert_eq!(env.verify(), Ok(()));
        assert_eq!(
            env.body().expect("body"),
            Body::Chat {
                text: "hello".into()
            }
        );
    }

    #[test]
    fn a_decoded_sender_key_checks_only_its_own_envelopes() {
        let (alice, env) = sealed();
        let key = SenderKey::of(&alice.public().to_peer_id()).expect("ed25519 id");
        assert_eq!(key.peer(), &env.from);
        assert_eq!(env.verify_with(&key), Ok(()));
        // The same key again, on a forged envelope of the same sender: refused.
        let mut forged = env.clone();
        forged.body = cbor::encode(
            &Body::Chat {
                text: "forged".into(),
            },
            MAX_BODY_BYTES,
        )
        .expect("encode");
        assert_eq!(forged.verify_with(&key), Err(VerifyError::BadSignature));
        // Another sender's key never checks alice's envelope, even a genuine one.
        let mallory = Keypair::generate_ed25519().public().to_peer_id();
        let other = SenderKey::of(&mallory).expect("ed25519 id");
        assert_eq!(
            env.verify_with(&other),
            Err(VerifyError::UnknownKey(env.from))
        );
        // The limits are checked as by `verify`.
        let mut future = env;
        future.v = VERSION + 1;
        assert_eq!(
            future.verify_with(&key),
            Err(VerifyError::UnsupportedVersion(VERSION + 1))
        );
    }

    fn assert_tamper_fails(tamper: impl FnOnce(&mut Envelope)) {
        let (_, mut env) = sealed();
        tamper(&mut env);
        assert!(env.verify().is_err(), "tampered envelope verified: {env:?}");
    }

    #[test]
    fn changing_the_version_fails() {
        assert_tamper_fails(|e| e.v = 2);
    }

    #[test]
    fn changing_the_id_fails() {
        assert_tamper_fails(|e| e.id.0[0] ^= 1);
    }

    #[test]
    fn changing_the_sender_fails() {
        assert_tamper_fails(|e| e.from = Keypair::generate_ed25519().public().to_peer_id());
    }

    #[test]
    fn changing_the_recipient_fails() {
        assert_tamper_fails(|e| {
            e.to = Destination::Peer(Keypair::generate_ed25519().public().to_peer_id())
        });
        assert_tamper_fails(|e| e.to = Destination::Group(GroupId([1; 16])));
    }

    #[test]
    fn changing_the_time_fails() {
        assert_tamper_fails(|e| e.sent_at_ms += 1);
    }

    #[test]
    fn changing_the_lamport_clock_fails() {
        assert_tamper_fails(|e| e.lamport += 1);
    }

    #[test]
    fn changing_the_expiry_fails() {
        assert_tamper_fails(|e| e.expires_at_ms = Some(1));
    }

    #[test]
    fn changing_the_body_fails() {
        assert_tamper_fails(|e| {
            e.body = cbor::encode(
                &Body::Chat {
                    text: "hullo".into(),
                },
                MAX_BODY_BYTES,
            )
            .expect("encode")
        });
    }

    #[test]
    fn changing_the_signature_fails() {
        assert_tamper_fails(|e| e.sig[0] ^= 1);
        assert_tamper_fails(|e| e.sig.clear());
    }

    #[test]
    fn public_key_is_recovered_from_an_ed25519_peer_id() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        assert_eq!(public_key_of(&peer), Some(key.public()));
    }

    #[test]
    fn oversize_text_is_refused_at_seal() {
        let alice = Keypair::generate_ed25519();
        let body = Body::Chat {
            text: "x".repeat(MAX_TEXT_BYTES + 1),
        };
        assert!(matches!(
            Envelope::seal(&alice, header(alice.public().to_peer_id()), &body),
            Err(SealError::Body(BodyError::TextTooLong { .. }))
        ));
    }

    #[test]
    fn empty_receipt_is_refused() {
        let body = Body::Receipt {
            state: ReceiptState::Delivered,
            ids: vec![],
        };
        assert!(body.validate().is_err());
    }

    #[test]
    fn expiry() {
        let (_, mut env) = sealed();
        assert!(!env.is_expired(u64::MAX));
        env.expires_at_ms = Some(10);
        assert!(env.is_expired(10));
        assert!(!env.is_expired(9));
    }
}
