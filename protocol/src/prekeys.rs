//! `/kith/keys/1`: the public keys that start an end-to-end encrypted (Olm) session.
//!
//! A node's Olm account has a Curve25519 identity key, one-time keys and a fallback key. Each is
//! signed by the node's libp2p ed25519 key with its own domain-separation prefix, so that a
//! relay serving them cannot substitute keys of its own: whoever uses a key checks its signature
//! against the peer id it is claimed for.
//!
//! Flow:
//!
//! - the owner sends [`Request::Publish`] with a [`Bundle`] (its signed identity key, up to
//!   [`MAX_ONE_TIME_KEYS`] new one-time keys, its fallback key) to its home relays, which check
//!   every signature against the connection's peer and answer [`Response::Published`] with how
//!   many one-time keys they hold for it;
//! - anyone sends [`Request::Claim`] for a peer, to one of the peer's relays or to the peer
//!   itself, and gets [`Response::Claimed`] (one one-time key, handed out once, or the fallback
//!   key once none is left), [`Response::NotFound`], or [`Response::Rejected`].
//!
//! A second kind of key travels on the same protocol: MLS key packages, which let a group admin
//! add a peer to an end-to-end encrypted group while the peer is offline. The owner sends
//! [`Request::PublishPackages`] (up to [`MAX_PACKAGES_PER_PUBLISH`] one-use packages and its
//! last-resort package); anyone sends [`Request::ClaimPackage`] and gets
//! [`Response::ClaimedPackage`]: one package, handed out once, or the last-resort one (kept)
//! once none is left. A package is the TLS encoding of an MLS `KeyPackage`, opaque here: its
//! credential names the owner's peer id and it is signed with the owner's ed25519 identity key,
//! which the relay checks on publish and the claimer on claim (`kith_net::key_package`).
//! Peers that predate these variants answer them `Rejected` (an unknown variant does not
//! decode), so a claimer falls back to waiting for the owner.
//!
//! This module holds the wire types and the pure signing and checking; no I/O.

use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

use crate::envelope::public_key_of;
use crate::ids::peer_bytes;
use crate::reject::Reject;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/kith/keys/1";

/// Most one-time keys a bundle (and a relay, per owner) holds.
pub const MAX_ONE_TIME_KEYS: usize = 100;

/// Largest frame on this protocol: a full bundle is about 100 × 110 bytes.
pub const MAX_FRAME_BYTES: usize = 32 * 1024;

/// Largest MLS key package accepted (one with kith's credential is about 300 bytes).
pub const MAX_KEY_PACKAGE_BYTES: usize = 1024;

/// Most one-use MLS key packages one publication carries (so it fits [`MAX_FRAME_BYTES`]).
pub const MAX_PACKAGES_PER_PUBLISH: usize = 24;

/// Most one-use MLS key packages a relay holds per owner.
pub const MAX_KEY_PACKAGES: usize = 100;

/// Domain prefix of the identity key's signature.
pub const IDENTITY_DOMAIN: &[u8] = b"kith-olm-identity-v1";

/// Domain prefix of a one-time key's signature.
pub const ONE_TIME_KEY_DOMAIN: &[u8] = b"kith-olm-one-time-key-v1";

/// Domain prefix of a fallback key's signature.
pub const FALLBACK_KEY_DOMAIN: &[u8] = b"kith-olm-fallback-key-v1";

/// A Curve25519 public key.
pub type Curve25519 = [u8; 32];

/// A node's Olm identity key, signed by its libp2p ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedIdentity {
    /// The owner.
    #[serde(with = "peer_bytes")]
    pub peer: PeerId,
    /// Its Olm Curve25519 identity key.
    pub key: Curve25519,
    /// ed25519 signature over [`IDENTITY_DOMAIN`], the peer id's bytes and the key.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// A one-time or fallback key, signed by its owner's libp2p ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKey {
    /// The Curve25519 public key.
    pub key: Curve25519,
    /// ed25519 signature over the kind's domain, the owner's peer id bytes and the key.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// What a node publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The owner's identity key.
    pub identity: SignedIdentity,
    /// New one-time keys (at most [`MAX_ONE_TIME_KEYS`]).
    pub one_time_keys: Vec<SignedKey>,
    /// The current fallback key.
    pub fallback: Option<SignedKey>,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Store these keys for the connection's peer (the bundle's owner).
    Publish {
        /// Echoed in the response.
        req_id: u64,
        /// The keys.
        bundle: Bundle,
    },
    /// Hand out one key of `peer`.
    Claim {
        /// Echoed in the response.
        req_id: u64,
        /// Whose key.
        #[serde(with = "peer_bytes")]
        peer: PeerId,
    },
    /// Store these MLS key packages for the connection's peer (their owner).
    PublishPackages {
        /// Echoed in the response.
        req_id: u64,
        /// New one-use packages (at most [`MAX_PACKAGES_PER_PUBLISH`]).
        packages: Vec<serde_bytes::ByteBuf>,
        /// The owner's last-resort package (replaces the one held).
        last_resort: Option<serde_bytes::ByteBuf>,
    },
    /// Hand out one MLS key package of `peer`.
    ClaimPackage {
        /// Echoed in the response.
        req_id: u64,
        /// Whose package.
        #[serde(with = "peer_bytes")]
        peer: PeerId,
    },
}

impl Request {
    /// The request's id.
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Publish { req_id, .. }
            | Request::Claim { req_id, .. }
            | Request::PublishPackages { req_id, .. }
            | Request::ClaimPackage { req_id, .. } => *req_id,
        }
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The bundle is stored (durably).
    Published {
        /// The request's id.
        req_id: u64,
        /// One-time keys now held for the owner.
        remaining: u32,
    },
    /// One key of the peer, never handed out before unless it is the fallback key.
    Claimed {
        /// The request's id.
        req_id: u64,
        /// The peer's identity key.
        identity: SignedIdentity,
        /// The key.
        key: SignedKey,
        /// Whether it is the fallback key (no one-time key was left).
        fallback: bool,
    },
    /// The MLS key packages are stored (durably).
    PackagesPublished {
        /// The request's id.
        req_id: u64,
        /// One-use packages now held for the owner.
        remaining: u32,
    },
    /// One MLS key package of the peer, never handed out before unless it is the last-resort
    /// one.
    ClaimedPackage {
        /// The request's id.
        req_id: u64,
        /// The package (TLS encoded).
        package: serde_bytes::ByteBuf,
        /// Whether it is the last-resort package (no one-use package was left).
        last_resort: bool,
    },
    /// No keys of that peer here.
    NotFound {
        /// The request's id.
        req_id: u64,
    },
    /// Refused.
    Rejected {
        /// The request's id.
        req_id: u64,
        /// Why.
        reason: Reject,
    },
}

impl Response {
    /// The echoed request id.
    pub fn req_id(&self) -> u64 {
        match self {
            Response::Published { req_id, .. }
            | Response::Claimed { req_id, .. }
            | Response::PackagesPublished { req_id, .. }
            | Response::ClaimedPackage { req_id, .. }
            | Response::NotFound { req_id }
            | Response::Rejected { req_id, .. } => *req_id,
        }
    }
}

/// Why keys do not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The owner's peer id embeds no ed25519 key.
    #[error("peer {0} does not embed a public key")]
    UnknownKey(PeerId),
    /// The identity belongs to another peer than expected.
    #[error("identity of another peer ({found})")]
    WrongOwner {
        /// The peer named.
        found: PeerId,
    },
    /// A signature does not verify.
    #[error("bad signature on the {0}")]
    BadSignature(&'static str),
    /// The bundle carries more one-time keys than allowed.
    #[error("{count} one-time keys, more than {MAX_ONE_TIME_KEYS}")]
    TooManyKeys {
        /// How many.
        count: usize,
    },
    /// Signing failed (the keypair is not ed25519).
    #[error("signing failed: {0}")]
    Sign(String),
}

fn payload(domain: &[u8], peer: &PeerId, key: &Curve25519) -> Vec<u8> {
    let peer = peer.to_bytes();
    let mut out = Vec::with_capacity(domain.len() + 1 + peer.len() + key.len());
    out.extend_from_slice(domain);
    // The peer id's length first, so that no two (peer, key) pairs share a payload.
    out.push(peer.len() as u8);
    out.extend_from_slice(&peer);
    out.extend_from_slice(key);
    out
}

fn sign(keypair: &Keypair, domain: &[u8], key: &Curve25519) -> Result<Vec<u8>, KeyError> {
    let peer = keypair.public().to_peer_id();
    keypair
        .sign(&payload(domain, &peer, key))
        .map_err(|e| KeyError::Sign(e.to_string()))
}

fn verify(
    peer: &PeerId,
    domain: &[u8],
    key: &Curve25519,
    sig: &[u8],
    what: &'static str,
) -> Result<(), KeyError> {
    let public = public_key_of(peer).ok_or(KeyError::UnknownKey(*peer))?;
    if public.verify(&payload(domain, peer, key), sig) {
        Ok(())
    } else {
        Err(KeyError::BadSignature(what))
    }
}

impl SignedIdentity {
    /// Signs `key` as the identity key of `keypair`'s peer.
    pub fn sign(keypair: &Keypair, key: Curve25519) -> Result<Self, KeyError> {
        Ok(Self {
            peer: keypair.public().to_peer_id(),
            key,
            sig: sign(keypair, IDENTITY_DOMAIN, &key)?,
        })
    }

    /// Checks that this is `expected`'s identity, signed by it.
    pub fn verify(&self, expected: &PeerId) -> Result<(), KeyError> {
        if self.peer != *expected {
            return Err(KeyError::WrongOwner { found: self.peer });
        }
        verify(
            &self.peer,
            IDENTITY_DOMAIN,
            &self.key,
            &self.sig,
            "identity key",
        )
    }
}

impl SignedKey {
    /// Signs a one-time key (or, with `fallback`, the fallback key) of `keypair`'s peer.
    pub fn sign(keypair: &Keypair, key: Curve25519, fallback: bool) -> Result<Self, KeyError> {
        let domain = if fallback {
            FALLBACK_KEY_DOMAIN
        } else {
            ONE_TIME_KEY_DOMAIN
        };
        Ok(Self {
            key,
            sig: sign(keypair, domain, &key)?,
        })
    }

    /// Checks that `owner` signed this as a one-time key (or, with `fallback`, a fallback key).
    pub fn verify(&self, owner: &PeerId, fallback: bool) -> Result<(), KeyError> {
        let (domain, what) = if fallback {
            (FALLBACK_KEY_DOMAIN, "fallback key")
        } else {
            (ONE_TIME_KEY_DOMAIN, "one-time key")
        };
        verify(owner, domain, &self.key, &self.sig, what)
    }
}

impl Bundle {
    /// Checks the bundle's size and every signature against `owner`.
    pub fn verify(&self, owner: &PeerId) -> Result<(), KeyError> {
        if self.one_time_keys.len() > MAX_ONE_TIME_KEYS {
            return Err(KeyError::TooManyKeys {
                count: self.one_time_keys.len(),
            });
        }
        self.identity.verify(owner)?;
        for key in &self.one_time_keys {
            key.verify(owner, false)?;
        }
        if let Some(fallback) = &self.fallback {
            fallback.verify(owner, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_keys_verify_only_for_their_owner_and_kind() {
        let alice = Keypair::generate_ed25519();
        let bob = Keypair::generate_ed25519().public().to_peer_id();
        let me = alice.public().to_peer_id();
        let identity = SignedIdentity::sign(&alice, [1; 32]).expect("sign");
        assert_eq!(identity.verify(&me), Ok(()));
        assert!(matches!(
            identity.verify(&bob),
            Err(KeyError::WrongOwner { .. })
        ));
        let mut forged = identity.clone();
        forged.key[0] ^= 1;
        assert_eq!(
            forged.verify(&me),
            Err(KeyError::BadSignature("identity key"))
        );

        let otk = SignedKey::sign(&alice, [2; 32], false).expect("sign");
        assert_eq!(otk.verify(&me, false), Ok(()));
        // A one-time key's signature is no fallback key's, and the reverse.
        assert!(otk.verify(&me, true).is_err());
        assert!(otk.verify(&bob, false).is_err());
        // An identity signature does not make a one-time key of the same bytes.
        let reused = SignedKey {
            key: [1; 32],
            sig: identity.sig.clone(),
        };
        assert!(reused.verify(&me, false).is_err());
    }

    #[test]
    fn a_bundle_is_bounded_and_fully_checked() {
        let alice = Keypair::generate_ed25519();
        let me = alice.public().to_peer_id();
        let mut bundle = Bundle {
            identity: SignedIdentity::sign(&alice, [1; 32]).expect("sign"),
            one_time_keys: (0..3u8)
                .map(|i| SignedKey::sign(&alice, [i + 10; 32], false).expect("sign"))
                .collect(),
            fallback: Some(SignedKey::sign(&alice, [9; 32], true).expect("sign")),
        };
        assert_eq!(bundle.verify(&me), Ok(()));
        bundle.one_time_keys[1].key[3] ^= 1;
        assert!(bundle.verify(&me).is_err());
        bundle.one_time_keys = vec![bundle.one_time_keys[0].clone(); MAX_ONE_TIME_KEYS + 1];
        assert!(matches!(
            bundle.verify(&me),
            Err(KeyError::TooManyKeys { .. })
        ));
    }
}
