//! Sealed messages that came too far ahead of their chain (see [`crate::core::crypto::order`]): kept
//! as they came, and opened once the messages before them have been, or once waiting for those
//! took longer than [`order::PATIENCE`].
//!
//! - The inbound path holds such a message instead of opening it ([`Node::hold_sealed`]); it is
//!   stored, so its sender may show it delivered.
//! - After each inbound batch, [`Node::open_held`] opens what the batch let into the window.
//! - [`Node::held_loop`] gives up on messages that never came, and opens what a restart left
//!   held.

use kith_protocol::envelope::Sealed;
use kith_protocol::{cbor, limits, Body, Envelope, Reject};
use libp2p::PeerId;

use super::{store_failed, Fresh, Node};
use crate::clock::now_ms;
use crate::core::crypto::order;
use crate::shutdown::Signal;

/// How long a sender is asked to wait when this node already holds as many of its messages as
/// it keeps.
const HELD_FULL_RETRY_AFTER_MS: u64 = 2_000;

/// How often the node looks for chains that waited too long.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3);

/// Rounds of [`Node::open_held`] per call: each opens what the previous let into the window,
/// at most [`order::WINDOW`] per chain.
const MAX_ROUNDS: usize = order::MAX_HELD_PER_PEER / order::WINDOW as usize + 2;

impl Node {
    /// Keeps a sealed envelope until the messages before it are opened (written, not flushed).
    /// A copy that came through a relay is answered with a delivered receipt: it is stored.
    pub(super) fn hold_sealed(
        &self,
        envelope: Envelope,
        sealed: &Sealed,
        relayed: bool,
    ) -> Result<Option<Fresh>, Reject> {
        let from = envelope.from;
        let bytes =
            cbor::encode(&envelope, limits::MAX_ENVELOPE_BYTES).map_err(|e| store_failed(&e))?;
        let held = self
            .inner
            .olm
            .hold(&from, &envelope.id, sealed, bytes, now_ms())
            .map_err(|e| store_failed(&e))?;
        if !held {
            tracing::debug!(%from, id = %envelope.id, "holding as many of this peer's messages as kept; asking it to wait");
            return Err(Reject::Busy {
                retry_after_ms: HELD_FULL_RETRY_AFTER_MS,
            });
        }
        tracing::debug!(%from, id = %envelope.id, "holding a message until the ones before it come");
        Ok(relayed.then_some(Fresh {
            envelope,
            text: None,
            file_size: None,
        }))
    }

    /// Opens the held messages of `from` that are now in their chain's window, round after
    /// round, and announces them.
    pub(super) async fn open_held(&self, from: PeerId) {
        for _ in 0..MAX_ROUNDS {
            let ready = match self.inner.olm.ready(&from) {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!(%from, error = %e, "cannot read held messages");
                    return;
                }
            };
            if ready.is_empty() {
                return;
            }
            let mut claims = Vec::new();
            let mut fresh = Vec::new();
            for (key, bytes) in ready {
                let opened = {
                    let _turn = self.inner.olm_turn.lock().await;
                    self.open_one_held(&bytes, &mut claims)
                };
                match opened {
                    Ok(Some(f)) => fresh.push(f),
                    Ok(None) => {}
                    // Kept: the next round or sweep tries again.
                    Err(Reject::Busy { .. } | Reject::StoreFailed) => return,
                    Err(reason) => {
                        tracing::warn!(%from, ?reason, "dropping a held message that does not open");
                    }
                }
                if let Err(e) = self.inner.olm.forget_held(&key) {
                    tracing::error!(%from, error = %e, "cannot remove a held message");
                    return;
                }
            }
            if let Err(e) = self.inner.store.flush().await {
                tracing::error!(%from, error = %e, "cannot store opened held messages");
                return;
            }
            drop(claims);
            for f in fresh {
                // Announced as from its sender: whoever brought it was answered when it came.
                if let Err(reason) = self.announce(from, f).await {
                    tracing::warn!(%from, ?reason, "cannot announce an opened held message");
                }
            }
        }
    }

    /// Opens one held envelope (not flushed); `Some` when it is a new message to announce.
    fn open_one_held<'a>(
        &'a self,
        bytes: &[u8],
        claims: &mut Vec<crate::core::claims::Claim<'a>>,
    ) -> Result<Option<Fresh>, Reject> {
        let envelope: Envelope =
            cbor::decode(bytes, limits::MAX_ENVELOPE_BYTES).map_err(|_| Reject::Malformed)?;
        if envelope.is_expired(now_ms()) {
            return Err(Reject::Expired);
        }
        let Ok(Body::Olm(sealed)) = envelope.body() else {
            return Err(Reject::Malformed);
        };
        if !self.claim_inbound(&envelope, claims)? {
            return Ok(None);
        }
        let from = envelope.from;
        let fresh = self.stage_sealed(from, envelope, sealed, false)?;
        if fresh.as_ref().is_some_and(|f| f.text.is_some()) {
            if let Some(claim) = claims.last_mut() {
                claim.stored();
            }
        }
        Ok(fresh)
    }

    /// Opens what a restart left held, then, every few seconds, gives up waiting on chains
    /// whose oldest held message waited [`order::PATIENCE`].
    pub(super) async fn held_loop(self, mut shutdown: Signal) {
        let mut first = true;
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            // At the first tick nothing is given up (patience 0 would be): a restart only opens
            // what was ready.
            let patience = if first {
                std::time::Duration::MAX
            } else {
                order::PATIENCE
            };
            first = false;
            let peers = match self.inner.olm.give_up_waiting(now_ms(), patience) {
                Ok(peers) => peers,
                Err(e) => {
                    tracing::error!(error = %e, "cannot look through held messages");
                    continue;
                }
            };
            for peer in peers {
                self.open_held(peer).await;
            }
        }
    }
}
