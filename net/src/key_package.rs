//! MLS key packages and credentials bound to peer ids, checked the same way by relays (on
//! publish) and nodes (on claim, and for every leaf of a group).
//!
//! A kith member's MLS credential is a `BasicCredential` whose identity is its libp2p peer id's
//! bytes, and its MLS signature key is the peer's own ed25519 identity key (the one its peer id
//! embeds). A leaf or key package is therefore bound to a peer when both hold: the identity is
//! that peer's id, and the signature key is that peer's public key. A key package whose
//! signatures verify under that key was made by the peer: nobody else can sign for it.

use kith_protocol::envelope::public_key_of;
use kith_protocol::PeerId;
use libp2p::identity::{ed25519, Keypair};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, Credential, CredentialType, CredentialWithKey,
    ExtensionType, KeyPackage, KeyPackageBuilder, KeyPackageIn, ProtocolVersion,
    SignaturePublicKey,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::signatures::{Signer as MlsSigner, SignerError};
use openmls_traits::types::SignatureScheme;

/// kith's one ciphersuite: X25519 key exchange, AES-128-GCM, SHA-256, Ed25519 signatures (the
/// signature scheme of libp2p identities).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// What kith's leaves support beyond MLS's defaults: the `last_resort` key package extension
/// (an extension in a key package must be in its leaf's capabilities).
pub fn capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .build()
}

/// A builder of kith key packages: kith's capabilities, marked last resort when asked.
pub fn builder(last_resort: bool) -> KeyPackageBuilder {
    let builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
    if last_resort {
        builder.mark_as_last_resort()
    } else {
        builder
    }
}

/// The identity key is not an ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the identity key is not an ed25519 key")]
pub struct NotEd25519;

/// Signs MLS structures with a node's libp2p ed25519 identity key (pure Ed25519, MLS's
/// `ed25519` signature scheme), and gives the node's credential.
pub struct Signer {
    key: ed25519::Keypair,
    peer: PeerId,
}

impl Signer {
    /// The signer of identity `key`.
    pub fn new(key: &Keypair) -> Result<Self, NotEd25519> {
        let peer = key.public().to_peer_id();
        let key = key.clone().try_into_ed25519().map_err(|_| NotEd25519)?;
        Ok(Self { key, peer })
    }

    /// The node's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The node's MLS credential: its peer id's bytes as a basic credential, with its ed25519
    /// public key as the signature key.
    pub fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.peer.to_bytes()).into(),
            signature_key: SignaturePublicKey::from(self.key.public().to_bytes().to_vec()),
        }
    }
}

impl MlsSigner for Signer {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload))
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Why a credential is not the expected peer's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The credential is not a basic credential.
    #[error("a {0:?} credential, not a basic one")]
    NotBasic(CredentialType),
    /// The credential names another peer (or no peer at all).
    #[error("the credential names {found}, not {expected}")]
    WrongIdentity {
        /// The peer expected.
        expected: PeerId,
        /// What the credential names (its bytes as a peer id, or hex when they are none).
        found: String,
    },
    /// The credential's identity is no peer id.
    #[error("the credential names no peer")]
    NoPeerId,
    /// The expected peer's id embeds no ed25519 key to compare with.
    #[error("peer {0} does not embed an ed25519 key")]
    NoPublicKey(PeerId),
    /// The signature key is not the peer's identity key.
    #[error("the signature key is not the identity key of {0}")]
    WrongSignatureKey(PeerId),
}

/// Checks that `credential` with `signature_key` (a leaf's, a key package's) is `expected`'s:
/// the basic credential's identity is its peer id and the signature key its ed25519 key.
pub fn check_binding(
    credential: &Credential,
    signature_key: &[u8],
    expected: &PeerId,
) -> Result<(), BindingError> {
    let kind = credential.credential_type();
    let basic =
        BasicCredential::try_from(credential.clone()).map_err(|_| BindingError::NotBasic(kind))?;
    if basic.identity() != expected.to_bytes().as_slice() {
        let found = PeerId::from_bytes(basic.identity())
            .map(|p| p.to_string())
            .unwrap_or_else(|_| hex_of(basic.identity()));
        return Err(BindingError::WrongIdentity {
            expected: *expected,
            found,
        });
    }
    let public = public_key_of(expected)
        .and_then(|key| key.try_into_ed25519().ok())
        .ok_or(BindingError::NoPublicKey(*expected))?;
    if public.to_bytes().as_slice() != signature_key {
        return Err(BindingError::WrongSignatureKey(*expected));
    }
    Ok(())
}

/// The peer a credential names, when its identity is a peer id (not checked against any key).
pub fn named_peer(credential: &Credential) -> Option<PeerId> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    PeerId::from_bytes(basic.identity()).ok()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a key package is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    /// Larger than [`kith_protocol::prekeys::MAX_KEY_PACKAGE_BYTES`].
    #[error("a key package of {0} bytes")]
    TooLarge(usize),
    /// The bytes are no key package.
    #[error("malformed key package: {0}")]
    Malformed(String),
    /// A signature, the lifetime or another of MLS's checks failed.
    #[error("invalid key package: {0}")]
    Invalid(String),
    /// Another ciphersuite than [`CIPHERSUITE`].
    #[error("key package for ciphersuite {0:?}")]
    Ciphersuite(Ciphersuite),
    /// The credential is not the owner's.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// A one-time package marked last resort, or a last-resort package that is not marked so.
    #[error("key package's last-resort mark is {found}, expected {expected}")]
    LastResort {
        /// What the slot needs.
        expected: bool,
        /// What the package says.
        found: bool,
    },
}

/// The peer a key package's credential names (nothing checked but that it decodes and names a
/// peer id): whom to check it against when the owner is not known beforehand.
pub fn owner_of(bytes: &[u8]) -> Result<PeerId, PackageError> {
    if bytes.len() > kith_protocol::prekeys::MAX_KEY_PACKAGE_BYTES {
        return Err(PackageError::TooLarge(bytes.len()));
    }
    let incoming = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| PackageError::Malformed(e.to_string()))?;
    named_peer(&incoming.unverified_credential().credential)
        .ok_or(PackageError::Binding(BindingError::NoPeerId))
}

/// Decodes and checks a key package of `owner` (the TLS encoding of an MLS `KeyPackage`): its
/// size, MLS's own checks (both signatures, lifetime, distinct keys, version), kith's
/// ciphersuite, the binding of its credential to `owner`, and whether it is a `last_resort`
/// one (`None`: either kind).
pub fn verify(
    bytes: &[u8],
    owner: &PeerId,
    last_resort: Option<bool>,
) -> Result<KeyPackage, PackageError> {
    if bytes.len() > kith_protocol::prekeys::MAX_KEY_PACKAGE_BYTES {
        return Err(PackageError::TooLarge(bytes.len()));
    }
    let incoming = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| PackageError::Malformed(e.to_string()))?;
    // Check the binding before the signatures: a package of another peer is refused as such.
    let claimed = incoming.unverified_credential();
    check_binding(&claimed.credential, claimed.signature_key.as_slice(), owner)?;
    let package = incoming
        .validate(&RustCrypto::default(), ProtocolVersion::Mls10)
        .map_err(|e| PackageError::Invalid(e.to_string()))?;
    if package.ciphersuite() != CIPHERSUITE {
        return Err(PackageError::Ciphersuite(package.ciphersuite()));
    }
    if let Some(expected) = last_resort {
        if package.last_resort() != expected {
            return Err(PackageError::LastResort {
                expected,
                found: package.last_resort(),
            });
        }
    }
    Ok(package)
}
