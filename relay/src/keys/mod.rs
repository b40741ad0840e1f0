//! `/kith/keys/1` on the relay: nodes' published Olm keys, handed out to whoever wants to start
//! an end-to-end encrypted session with them. The relay holds public keys only; it never sees a
//! private key, and every key it serves is signed by its owner's ed25519 identity, which the
//! claimer checks: a relay can refuse service, not substitute keys.
//!
//! Flow: the owner sends `Publish { bundle }`; the relay checks that the bundle is the
//! connection's peer's (every signature, at most [`MAX_ONE_TIME_KEYS`] one-time keys), stores
//! it ([`store`]) and answers `Published { remaining }` once it is flushed. Anyone sends
//! `Claim { peer }` and gets one one-time key, removed and flushed before the answer, then the
//! fallback key once none is left; claims are rate-limited per claimer, publications per owner.
//!
//! MLS key packages (for adding a peer to an encrypted group) go the same way:
//! `PublishPackages` is checked package by package ([`kith_net::key_package::verify`]: MLS's
//! signatures, and a credential naming the connection's peer with its ed25519 key as signature
//! key) and stored; `ClaimPackage` hands out one one-use package, removed and flushed before
//! the answer, then the owner's last-resort package, which stays.
//!
//! As for blobs, the swarm task never touches the disk: each request becomes a blocking job
//! whose answer the task collects with [`Server::next`] and sends with [`Server::finish`].
//!
//! [`MAX_ONE_TIME_KEYS`]: kith_protocol::prekeys::MAX_ONE_TIME_KEYS

pub mod store;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kith_net::codec::Message;
use kith_net::key_package;
use kith_protocol::prekeys::{Request, Response, MAX_PACKAGES_PER_PUBLISH};
use kith_protocol::Reject;
use libp2p::{PeerId, Swarm};

use crate::mailbox::rate::RateLimiter;
use crate::metrics::Metrics;
use crate::quiet::Warnings;
use crate::requests::{self, Channel};
use crate::swarm::Behaviour;
use crate::Clock;

/// The keys service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Claims a claimer may make a second, sustained.
    pub claims_per_sec: u32,
    /// Claims a claimer may make at once.
    pub claim_burst: u32,
    /// Publications an owner may make a second, sustained.
    pub publishes_per_sec: u32,
    /// Publications an owner may make at once.
    pub publish_burst: u32,
    /// Jobs in progress before requests are answered `Busy`.
    pub max_pending: usize,
    /// The delay a `Busy` answer asks for.
    pub busy_retry_after_ms: u64,
    /// The clock the rate limits read.
    pub clock: Clock,
    /// How often one peer's refusals make a WARN line (the first, then a summary).
    pub refusal_log_interval_ms: u64,
}

/// Why a publication of MLS key packages is refused.
#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    /// More one-use packages than one publication may carry.
    #[error("{0} key packages, more than {MAX_PACKAGES_PER_PUBLISH}")]
    TooMany(usize),
    /// A package does not check out.
    #[error("key package {index}: {source}")]
    Package {
        /// Its place in the publication (the last-resort one is `packages.len()`).
        index: usize,
        /// Why.
        source: key_package::PackageError,
    },
}

/// Checks a publication of MLS key packages by `owner`: its size, and each package (one-use
/// ones not marked last resort, the last-resort one marked so) against `owner`.
pub fn check_packages(
    owner: &PeerId,
    packages: &[serde_bytes::ByteBuf],
    last_resort: Option<&[u8]>,
) -> Result<(), PackagesError> {
    if packages.len() > MAX_PACKAGES_PER_PUBLISH {
        return Err(PackagesError::TooMany(packages.len()));
    }
    for (index, package) in packages.iter().enumerate() {
        key_package::verify(package, owner, Some(false))
            .map_err(|source| PackagesError::Package { index, source })?;
    }
    if let Some(package) = last_resort {
        key_package::verify(package, owner, Some(true)).map_err(|source| {
            PackagesError::Package {
                index: packages.len(),
                source,
            }
        })?;
    }
    Ok(())
}

/// An answer ready to go back to a peer.
pub struct Done {
    peer: PeerId,
    channel: Channel<Response>,
    response: Response,
}

/// The keys service, owned by the swarm task.
pub struct Server {
    store: store::Store,
    settings: Settings,
    metrics: Metrics,
    claims: RateLimiter,
    publishes: RateLimiter,
    /// MLS key package publications, limited apart from Olm ones.
    package_publishes: RateLimiter,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Which refusals make a WARN line: a claim flood must not fill the disk through the log.
    warnings: Warnings,
}

impl Server {
    /// A server over `store`.
    pub fn new(store: store::Store, settings: Settings, metrics: Metrics) -> Self {
        Self {
            claims: RateLimiter::new(settings.claims_per_sec, settings.claim_burst),
            publishes: RateLimiter::new(settings.publishes_per_sec, settings.publish_burst),
            package_publishes: RateLimiter::new(settings.publishes_per_sec, settings.publish_burst),
            warnings: Warnings::new(settings.refusal_log_interval_ms),
            store,
            settings,
            metrics,
            pending: FuturesUnordered::new(),
        }
    }

    /// The refusal of `peer`'s request `req_id` over its rate: counted as `limit`, logged (as
    /// the per-peer limiter allows) as the refusal of `what`.
    fn over_rate(
        &mut self,
        peer: PeerId,
        now: u64,
        req_id: u64,
        limit: &str,
        what: &str,
    ) -> Response {
        self.metrics.limit_hit(limit);
        crate::warn_refused!(self.warnings, now, peer, "refusing {what}: too many");
        Response::Rejected {
            req_id,
            reason: Reject::QuotaExceeded,
        }
    }

    /// Handles one inbound `/kith/keys/1` request from `peer` (the connection's authenticated
    /// peer).
    pub fn on_request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) {
        if let Some((channel, response)) = self.begin(peer, request, channel) {
            self.send(swarm, peer, channel, response);
        }
    }

    /// Starts a job for `request`, or returns an immediate answer with the channel.
    fn begin(
        &mut self,
        peer: PeerId,
        request: Message<Request>,
        channel: Channel<Response>,
    ) -> Option<(Channel<Response>, Response)> {
        let reject = |req_id, reason: Reject| Response::Rejected { req_id, reason };
        let request = match request {
            Message::Valid(request) => request,
            Message::Invalid { reason, detail } => {
                tracing::debug!(%peer, %detail, "refusing an undecodable keys request");
                return Some((channel, reject(0, reason)));
            }
            Message::Raw(_) => return Some((channel, reject(0, Reject::Malformed))),
        };
        let req_id = request.req_id();
        if self.pending.len() >= self.settings.max_pending {
            let reason = Reject::Busy {
                retry_after_ms: self.settings.busy_retry_after_ms,
            };
            return Some((channel, reject(req_id, reason)));
        }
        let now = self.settings.clock.now_ms();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let job = match request {
            Request::Publish { bundle, .. } => {
                if !self.publishes.check(&peer, now) {
                    let refusal =
                        self.over_rate(peer, now, req_id, "key_publish_rate", "a key publication");
                    return Some((channel, refusal));
                }
                tokio::task::spawn_blocking(move || {
                    // Only the owner publishes: every signature is checked against the
                    // connection's peer.
                    if let Err(e) = bundle.verify(&peer) {
                        tracing::warn!(%peer, error = %e, "refusing a key bundle");
                        return reject(req_id, Reject::Malformed);
                    }
                    match store.publish(&peer, &bundle) {
                        Ok(remaining) => {
                            metrics
                                .keys_published
                                .inc_by(bundle.one_time_keys.len() as u64);
                            Response::Published { req_id, remaining }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot store a key bundle");
                            reject(req_id, Reject::StoreFailed)
                        }
                    }
                })
            }
            Request::Claim { peer: owner, .. } => {
                if !self.claims.check(&peer, now) {
                    let refusal =
                        self.over_rate(peer, now, req_id, "key_claim_rate", "a key claim");
                    return Some((channel, refusal));
                }
                tokio::task::spawn_blocking(move || match store.claim(&owner) {
                    Ok(Some(claimed)) => {
                        if claimed.fallback {
                            metrics.keys_fallback_claims.inc();
                        } else {
                            metrics.keys_claimed.inc();
                        }
                        Response::Claimed {
                            req_id,
                            identity: claimed.identity,
                            key: claimed.key,
                            fallback: claimed.fallback,
                        }
                    }
                    Ok(None) => Response::NotFound { req_id },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot hand out a key");
                        reject(req_id, Reject::StoreFailed)
                    }
                })
            }
            Request::PublishPackages {
                packages,
                last_resort,
                ..
            } => {
                if !self.package_publishes.check(&peer, now) {
                    let refusal = self.over_rate(
                        peer,
                        now,
                        req_id,
                        "key_package_publish_rate",
                        "a key package publication",
                    );
                    return Some((channel, refusal));
                }
                tokio::task::spawn_blocking(move || {
                    if let Err(e) =
                        check_packages(&peer, &packages, last_resort.as_ref().map(|p| p.as_slice()))
                    {
                        tracing::warn!(%peer, error = %e, "refusing MLS key packages");
                        return reject(req_id, Reject::Malformed);
                    }
                    let packages: Vec<Vec<u8>> =
                        packages.into_iter().map(|p| p.into_vec()).collect();
                    match store.publish_packages(
                        &peer,
                        &packages,
                        last_resort.as_ref().map(|p| p.as_slice()),
                    ) {
                        Ok(remaining) => Response::PackagesPublished { req_id, remaining },
                        Err(e) => {
                            tracing::error!(error = %e, "cannot store MLS key packages");
                            reject(req_id, Reject::StoreFailed)
                        }
                    }
                })
            }
            Request::ClaimPackage { peer: owner, .. } => {
                if !self.claims.check(&peer, now) {
                    let refusal =
                        self.over_rate(peer, now, req_id, "key_claim_rate", "a key package claim");
                    return Some((channel, refusal));
                }
                tokio::task::spawn_blocking(move || match store.claim_package(&owner) {
                    Ok(Some(claimed)) => Response::ClaimedPackage {
                        req_id,
                        package: serde_bytes::ByteBuf::from(claimed.package),
                        last_resort: claimed.last_resort,
                    },
                    Ok(None) => Response::NotFound { req_id },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot hand out an MLS key package");
                        reject(req_id, Reject::StoreFailed)
                    }
                })
            }
        };
        self.pending.push(
            async move {
                let response = job.await.unwrap_or(Response::Rejected {
                    req_id,
                    reason: Reject::StoreFailed,
                });
                Done {
                    peer,
                    channel,
                    response,
                }
            }
            .boxed(),
        );
        None
    }

    /// The next finished job. Never resolves while idle.
    pub async fn next(&mut self) -> Option<Done> {
        self.pending.next().await
    }

    /// Sends a finished job's answer.
    pub fn finish(&mut self, swarm: &mut Swarm<Behaviour>, done: Done) {
        let Done {
            peer,
            channel,
            response,
        } = done;
        self.send(swarm, peer, channel, response);
    }

    fn send(
        &self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        channel: Channel<Response>,
        response: Response,
    ) {
        if let Response::Rejected { reason, .. } = &response {
            self.metrics.reject(reason);
        }
        if !requests::respond(&mut swarm.behaviour_mut().requests, channel, response) {
            tracing::debug!(%peer, "keys requester went away before its answer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_net::key_package::{BindingError, PackageError, Signer, CIPHERSUITE};
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::BasicCredential;
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use serde_bytes::ByteBuf;

    /// A key package signed by `key`, naming `named` (the key's own peer by default).
    fn package(
        key: &libp2p::identity::Keypair,
        last_resort: bool,
        named: Option<PeerId>,
    ) -> ByteBuf {
        let signer = Signer::new(key).expect("ed25519");
        let mut credential = signer.credential();
        if let Some(peer) = named {
            credential.credential = BasicCredential::new(peer.to_bytes()).into();
        }
        let bundle = kith_net::key_package::builder(last_resort)
            .build(
                CIPHERSUITE,
                &OpenMlsRustCrypto::default(),
                &signer,
                credential,
            )
            .expect("key package");
        ByteBuf::from(
            bundle
                .key_package()
                .tls_serialize_detached()
                .expect("encode"),
        )
    }

    #[test]
    fn a_publication_of_key_packages_is_checked_against_its_owner() {
        let alice = libp2p::identity::Keypair::generate_ed25519();
        let bob = libp2p::identity::Keypair::generate_ed25519();
        let (a, b) = (alice.public().to_peer_id(), bob.public().to_peer_id());
        let mine = vec![package(&alice, false, None), package(&alice, false, None)];
        let resort = package(&alice, true, None);
        let checked = check_packages(&a, &mine, Some(&resort));
        assert!(checked.is_ok(), "{checked:?}");

        // Alice's packages published by Bob: the credential names another peer.
        assert!(matches!(
            check_packages(&b, &mine, None),
            Err(PackagesError::Package {
                index: 0,
                source: PackageError::Binding(BindingError::WrongIdentity { .. })
            })
        ));
        // A package naming Alice but signed with Bob's key.
        let forged = package(&bob, false, Some(a));
        assert!(matches!(
            check_packages(&a, &[forged], None),
            Err(PackagesError::Package {
                source: PackageError::Binding(BindingError::WrongSignatureKey(_)),
                ..
            })
        ));
        // Last-resort marks must match their slots.
        assert!(matches!(
            check_packages(&a, std::slice::from_ref(&resort), None),
            Err(PackagesError::Package {
                source: PackageError::LastResort {
                    expected: false,
                    found: true
                },
                ..
            })
        ));
        assert!(matches!(
            check_packages(&a, &[], Some(&mine[0])),
            Err(PackagesError::Package {
                index: 0,
                source: PackageError::LastResort {
                    expected: true,
                    found: false
                },
            })
        ));
        // A flipped byte breaks a signature; junk does not decode; too many is too many.
        let mut flipped = mine[0].clone().into_vec();
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        assert!(check_packages(&a, &[ByteBuf::from(flipped)], None).is_err());
        assert!(matches!(
            check_packages(&a, &[ByteBuf::from(b"junk".to_vec())], None),
            Err(PackagesError::Package {
                source: PackageError::Malformed(_),
                ..
            })
        ));
        let many = vec![mine[0].clone(); MAX_PACKAGES_PER_PUBLISH + 1];
        assert!(matches!(
            check_packages(&a, &many, None),
            Err(PackagesError::TooMany(_))
        ));
    }
}
