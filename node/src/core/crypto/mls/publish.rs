//! Publishing this node's MLS key packages to its home relays over `/kith/keys/1`, so that a
//! group admin can add it while it is offline.
//!
//! Beside its Olm keys, the node keeps at each home relay up to [`PACKAGES_TARGET`] one-use key
//! packages and its last-resort package. Each publication first asks how many the relay holds
//! (a `PublishPackages` carrying only the last-resort package, so a relay that lost it gets it
//! again); below [`PACKAGES_LOW`] it makes new ones, writes their private keys to disk, and
//! only then publishes them. The last-resort package is made once and kept in the store
//! (`mls/kith/last-resort`), so every relay serves the same one.

use kith_protocol::prekeys::{Request, Response, MAX_PACKAGES_PER_PUBLISH};
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;

use super::{Config, Member, MlsError};
use crate::core::store::Batch;
use crate::core::Node;

/// One-use key packages a node keeps at each home relay.
pub const PACKAGES_TARGET: u32 = MAX_PACKAGES_PER_PUBLISH as u32;

/// Below this many one-use key packages at a relay, the node tops them up.
pub const PACKAGES_LOW: u32 = 8;

/// Where the last-resort package's bytes are kept.
const LAST_RESORT_KEY: &[u8] = b"mls/kith/last-resort";

impl Node {
    /// This node's last-resort key package, made (and written, flushed) the first time.
    async fn last_resort_package(&self, member: &Member) -> Result<Vec<u8>, String> {
        if let Some(bytes) = self
            .store()
            .get_raw(LAST_RESORT_KEY)
            .map_err(|e| e.to_string())?
        {
            return Ok(bytes);
        }
        self.fresh_package(member, true).await
    }

    /// One new key package of this node (a last-resort one: also kept under
    /// [`LAST_RESORT_KEY`]), its private keys on disk before it is returned.
    async fn fresh_package(&self, member: &Member, last_resort: bool) -> Result<Vec<u8>, String> {
        let mut batch = Batch::new();
        let package = member
            .key_packages(1, last_resort, &mut batch)
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or("no key package made")?;
        if last_resort {
            batch.put_raw(LAST_RESORT_KEY.to_vec(), package.clone());
        }
        self.store()
            .commit(batch)
            .await
            .map_err(|e| e.to_string())?;
        Ok(package)
    }

    /// A fresh one-use key package of this node (a claim made to the node itself), its private
    /// keys on disk before it is returned.
    pub(crate) async fn own_key_package(&self) -> Result<Vec<u8>, String> {
        let member = Member::new(self.store().clone(), self.key(), Config::default())
            .map_err(|e| e.to_string())?;
        self.fresh_package(&member, false).await
    }

    /// Publishes MLS key packages to home relay `relay` at `addr`: the last-resort package,
    /// and new one-use packages when the relay holds fewer than [`PACKAGES_LOW`].
    /// Failures are logged; the next publication tries again.
    pub(crate) async fn publish_key_packages(&self, relay: PeerId, addr: &Multiaddr) {
        if let Err(e) = self.try_publish_key_packages(relay, addr).await {
            tracing::debug!(%relay, error = %e, "cannot publish MLS key packages");
        }
    }

    async fn try_publish_key_packages(
        &self,
        relay: PeerId,
        addr: &Multiaddr,
    ) -> Result<(), String> {
        let member = Member::new(self.store().clone(), self.key(), Config::default())
            .map_err(|e: MlsError| e.to_string())?;
        let last_resort = ByteBuf::from(self.last_resort_package(&member).await?);
        let mut packages = Vec::new();
        // The first round tells how many the relay holds; a second tops them up.
        for round in 0..2 {
            let topped_up = round > 0;
            let request = Request::PublishPackages {
                req_id: self.req_id(),
                packages: std::mem::take(&mut packages),
                last_resort: (!topped_up).then(|| last_resort.clone()),
            };
            let remaining = match self.net().keys(relay, vec![addr.clone()], request).await {
                Ok(Response::PackagesPublished { remaining, .. }) => remaining,
                Ok(other) => return Err(format!("relay answered {other:?}")),
                Err(e) => return Err(e.to_string()),
            };
            tracing::debug!(%relay, remaining, "MLS key packages published");
            if remaining >= PACKAGES_LOW || topped_up {
                return Ok(());
            }
            let count = PACKAGES_TARGET.saturating_sub(remaining) as usize;
            let mut batch = Batch::new();
            packages = member
                .key_packages(count.min(MAX_PACKAGES_PER_PUBLISH), false, &mut batch)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(ByteBuf::from)
                .collect();
            // The packages' private keys are on disk before anyone can claim them.
            self.store()
                .commit(batch)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
