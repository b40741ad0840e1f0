//! The engine's side of end-to-end encryption: sealing outgoing one-to-one bodies (now, or on a
//! later attempt once a key of the recipient can be claimed), publishing this node's keys to
//! its home relays, answering claims for its own keys, and the re-send flow for messages that
//! did not decrypt.
//!
//! Flow of a message to a peer with no session yet: [`Node::compose`] keeps it `unsealed` in the
//! outbox (its plaintext never leaves); an attempt calls [`Node::seal_pending`], which claims one
//! key of the peer over `/kith/keys/1` (from the peer itself when connected, else from its
//! relays), starts a session, seals the waiting entries once, flushes, and only then lets them
//! go. Retries send the same sealed bytes.

use kith_protocol::envelope::Header;
use kith_protocol::limits::MAX_IDS_PER_BATCH;
use kith_protocol::prekeys::{self, Request, Response};
use kith_protocol::{Body, Destination, Envelope, MessageId, Reject};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};

use kith_net::codec::Message;

use crate::clock::now_ms;
use crate::core::store::{Batch, EntryKind, OutboxEntry, StoredMessage};
use crate::core::{Inbound, Node, NodeError, NodeEvent, Outcome};
use crate::net::peer_of;

/// One-time keys a node keeps at each home relay.
const ONE_TIME_KEYS_TARGET: u32 = prekeys::MAX_ONE_TIME_KEYS as u32;

/// Below this many one-time keys at a relay, the node tops them up.
const ONE_TIME_KEYS_LOW: u32 = 20;

/// The text of a history entry for a message that could not be decrypted (replaced when the
/// sender sends it again).
pub const UNDECRYPTABLE_TEXT: &str =
    "[could not decrypt this message; the sender was asked to send it again]";

impl Node {
    /// Seals the unsealed ones of `entries` (due for `to`), setting up a session first if need
    /// be; the sealed entries are on disk before they are returned. Entries that cannot be
    /// sealed now are rescheduled.
    pub(crate) async fn seal_pending(
        &self,
        to: PeerId,
        entries: Vec<OutboxEntry>,
        addrs: &[Multiaddr],
        relays: &[Multiaddr],
    ) -> Vec<OutboxEntry> {
        if entries.iter().all(|e| !e.unsealed) {
            return entries;
        }
        let session = self.ensure_session(to, addrs, relays).await;
        let mut ready = Vec::with_capacity(entries.len());
        let mut sealed_now = Vec::new();
        let mut batch = Batch::new();
        for entry in entries {
            if !entry.unsealed {
                ready.push(entry);
                continue;
            }
            if let Err(why) = &session {
                self.finish(&entry, Outcome::Retry(why.clone()));
                continue;
            }
            match self.seal_entry(&entry) {
                Ok(sealed) => {
                    batch.put_outbox(&sealed);
                    sealed_now.push((entry, sealed.clone()));
                    ready.push(sealed);
                }
                Err(e) => {
                    tracing::warn!(%to, id = %entry.envelope.id, error = %e, "cannot seal a message");
                    self.finish(&entry, Outcome::Retry(e.to_string()));
                }
            }
        }
        // In order (see `Olm::open`): a crash part way leaves some entries unsealed, which are
        // sealed again at their next attempt.
        let written = match self.store().apply_in_order(batch) {
            Ok(()) => self.store().flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::error!(%to, error = %e, "cannot store sealed messages");
            // Each entry as the outbox knows it (the sealed copies were not stored).
            for entry in ready.drain(..) {
                let original = sealed_now
                    .iter()
                    .find(|(_, sealed)| sealed.envelope.id == entry.envelope.id)
                    .map_or(&entry, |(original, _)| original);
                self.finish(original, Outcome::Retry(e.to_string()));
            }
            return ready;
        }
        self.sealed_in_place(&sealed_now);
        ready
    }

    /// The entry with its plaintext body sealed for its recipient (the same header, signed
    /// again).
    fn seal_entry(&self, entry: &OutboxEntry) -> Result<OutboxEntry, NodeError> {
        if !matches!(entry.envelope.to, Destination::Peer(_)) {
            return Err(NodeError::Invalid(
                "only one-to-one bodies are sealed here".into(),
            ));
        }
        let body = entry
            .envelope
            .body()
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let header = Header {
            id: entry.envelope.id,
            to: entry.envelope.to,
            sent_at_ms: entry.envelope.sent_at_ms,
            lamport: entry.envelope.lamport,
            expires_at_ms: entry.envelope.expires_at_ms,
        };
        let sealed = self.compose(header, &body, entry.kind)?;
        if sealed.unsealed {
            return Err(NodeError::Unavailable(
                "no session with the recipient".into(),
            ));
        }
        Ok(OutboxEntry {
            attempts: entry.attempts,
            due_ms: entry.due_ms,
            ..sealed
        })
    }

    /// Makes sure a session with `to` exists: claims one of its keys (from `to` itself when
    /// connected, else from `relays`, else from `to` at `addrs`) and starts one. The error
    /// says why not, for the retry.
    pub(crate) async fn ensure_session(
        &self,
        to: PeerId,
        addrs: &[Multiaddr],
        relays: &[Multiaddr],
    ) -> Result<(), String> {
        let _one_at_a_time = self.claiming().lock().await;
        if self.olm().has_session(&to).map_err(|e| e.to_string())? {
            return Ok(());
        }
        let connected = self.net().is_connected(to).await;
        let mut asked: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        if connected {
            asked.push((to, Vec::new()));
        }
        for relay in relays {
            if let Some(peer) = peer_of(relay) {
                asked.push((peer, vec![relay.clone()]));
            }
        }
        if !connected && !addrs.is_empty() {
            asked.push((to, addrs.to_vec()));
        }
        let mut reasons = Vec::new();
        for (peer, addrs) in asked {
            let request = Request::Claim {
                req_id: self.req_id(),
                peer: to,
            };
            match self.net().keys(peer, addrs, request).await {
                Ok(Response::Claimed {
                    identity,
                    key,
                    fallback,
                    ..
                }) => match self.olm().start_session(&to, &identity, &key, fallback) {
                    Ok(()) => {
                        tracing::debug!(%to, from = %peer, fallback, "claimed a key; session started");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(%to, from = %peer, error = %e, "refusing a claimed key");
                        reasons.push(format!("{peer}: {e}"));
                    }
                },
                Ok(Response::NotFound { .. }) => reasons.push(format!("{peer}: no keys")),
                Ok(Response::Rejected { reason, .. }) => reasons.push(format!("{peer}: {reason}")),
                Ok(other) => reasons.push(format!("{peer}: unexpected answer {other:?}")),
                Err(e) => reasons.push(format!("{peer}: {e}")),
            }
        }
        let relays_known = self.contact_of(&to).is_some_and(|c| !c.relays.is_empty());
        Err(if !relays_known {
            // The same words as an undeposited message's reason (the engine's backpressure).
            format!(
                "{to} is not reachable directly and its home relays are unknown \
                 (add it from its invite); will retry{}",
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join("; "))
                }
            )
        } else if reasons.is_empty() {
            "no keys of the recipient to claim: it is not connected and has no relay".into()
        } else {
            format!(
                "cannot claim a key of the recipient: {}",
                reasons.join("; ")
            )
        })
    }

    /// Answers a `/kith/keys/1` request from `peer`: a claim for this node's own keys gets a
    /// fresh one-time key, on disk before the answer.
    pub(crate) async fn serve_keys(
        &self,
        peer: PeerId,
        request: Message<Request>,
        channel: ResponseChannel<Response>,
    ) {
        let response = match request {
            Message::Valid(Request::Claim {
                req_id,
                peer: whose,
            }) if whose == self.peer_id() && !self.olm().may_claim(&peer, now_ms()) => {
                tracing::warn!(%peer, "refusing a claim of our keys: too many");
                Response::Rejected {
                    req_id,
                    reason: Reject::QuotaExceeded,
                }
            }
            Message::Valid(Request::Claim {
                req_id,
                peer: whose,
            }) if whose == self.peer_id() => {
                let claimed = self.olm().claim_own();
                let flushed = match claimed {
                    Ok(claimed) => self
                        .store()
                        .flush()
                        .await
                        .map(|()| claimed)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match flushed {
                    Ok((identity, key)) => Response::Claimed {
                        req_id,
                        identity,
                        key,
                        fallback: false,
                    },
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "cannot hand out a one-time key");
                        Response::Rejected {
                            req_id,
                            reason: Reject::StoreFailed,
                        }
                    }
                }
            }
            Message::Valid(Request::Claim { req_id, .. }) => Response::NotFound { req_id },
            Message::Valid(Request::ClaimPackage {
                req_id,
                peer: whose,
            }) if whose == self.peer_id() && !self.olm().may_claim(&peer, now_ms()) => {
                tracing::warn!(%peer, "refusing a claim of our key packages: too many");
                Response::Rejected {
                    req_id,
                    reason: Reject::QuotaExceeded,
                }
            }
            // A fresh package, its private keys on disk before the answer.
            Message::Valid(Request::ClaimPackage {
                req_id,
                peer: whose,
            }) if whose == self.peer_id() => match self.own_key_package().await {
                Ok(package) => Response::ClaimedPackage {
                    req_id,
                    package: serde_bytes::ByteBuf::from(package),
                    last_resort: false,
                },
                Err(e) => {
                    tracing::error!(%peer, error = %e, "cannot hand out a key package");
                    Response::Rejected {
                        req_id,
                        reason: Reject::StoreFailed,
                    }
                }
            },
            Message::Valid(Request::ClaimPackage { req_id, .. }) => Response::NotFound { req_id },
            Message::Valid(
                Request::Publish { req_id, .. } | Request::PublishPackages { req_id, .. },
            ) => {
                tracing::warn!(%peer, "refusing a key publication: nodes keep no one's keys");
                Response::Rejected {
                    req_id,
                    reason: Reject::Malformed,
                }
            }
            Message::Invalid { reason, detail } => {
                self.malformed_from(peer, prekeys::PROTOCOL, &reason, &detail)
                    .await;
                Response::Rejected { req_id: 0, reason }
            }
            Message::Raw(_) => Response::Rejected {
                req_id: 0,
                reason: Reject::Malformed,
            },
        };
        self.net().respond_keys(channel, response).await;
    }

    /// Publishes this node's keys to a home relay: the identity and fallback keys, and new
    /// one-time keys when the relay holds fewer than [`ONE_TIME_KEYS_LOW`].
    pub(crate) async fn publish_keys(&self, relay: PeerId) {
        let Some(addr) = self.home_relays().get(&relay).cloned() else {
            return;
        };
        let _turn = self.olm().publishing().await;
        self.publish_key_packages(relay, &addr).await;
        let mut count = 0u32;
        // The first round tells how many the relay holds; a second tops them up.
        for _ in 0..2 {
            let bundle = match self.olm().bundle(count as usize) {
                Ok(bundle) => bundle,
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a key bundle");
                    return;
                }
            };
            if count > 0 {
                // The keys' private halves are on disk before anyone can claim them.
                if let Err(e) = self.store().flush().await {
                    tracing::error!(error = %e, "cannot store new one-time keys");
                    return;
                }
            }
            let request = Request::Publish {
                req_id: self.req_id(),
                bundle,
            };
            match self.net().keys(relay, vec![addr.clone()], request).await {
                Ok(Response::Published { remaining, .. }) => {
                    tracing::debug!(%relay, remaining, published = count, "keys published");
                    if remaining > 0 {
                        self.olm().note_published();
                    }
                    if remaining >= ONE_TIME_KEYS_LOW || count > 0 {
                        return;
                    }
                    count = ONE_TIME_KEYS_TARGET.saturating_sub(remaining);
                }
                Ok(other) => {
                    tracing::warn!(%relay, ?other, "relay refused our keys");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%relay, error = %e, "cannot publish keys");
                    return;
                }
            }
        }
    }

    /// On a new node's first start, waits (at most `within`) until a home relay holds its keys:
    /// until then nobody could write to it while it is offline.
    pub async fn first_publication(&self, within: std::time::Duration) {
        if self.home_relays().is_empty() {
            return;
        }
        if tokio::time::timeout(within, self.olm().published())
            .await
            .is_err()
        {
            tracing::warn!("no home relay took this node's keys yet; it will keep trying");
        }
    }

    /// Writes a history entry for a message that did not decrypt and asks its sender to send
    /// it again (not flushed).
    pub(crate) fn stage_undecryptable(
        &self,
        envelope: Envelope,
        why: &str,
        new_session: bool,
    ) -> Result<(), Reject> {
        let from = envelope.from;
        {
            // At most a line a minute per sender (then a count): a stranger can send many.
            let mut warnings = self
                .inner
                .malformed_warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            kith_relay::warn_refused!(warnings, now_ms(), from, id = %envelope.id, reason = why, "could not decrypt a message; asking the sender to send it again");
        }
        let fail = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot store an undecryptable message");
            Reject::StoreFailed
        };
        let mut batch = Batch::new();
        self.olm()
            .mark_undecryptable(&mut batch, &from, &envelope.id);
        let known = self
            .store()
            .message(&from, &envelope.id)
            .map_err(|e| fail(&e))?;
        if known.is_none() {
            batch.put_message(&StoredMessage::received(
                &envelope,
                UNDECRYPTABLE_TEXT.into(),
            ));
            // A stranger's counts against its request like any message it sends.
            let bytes = envelope.body.len();
            self.inner.plugins.gate.note(self, &from, bytes, &mut batch);
        }
        let header = Header {
            id: MessageId::random(),
            to: Destination::Peer(from),
            sent_at_ms: now_ms(),
            lamport: 0,
            expires_at_ms: None,
        };
        let body = Body::Resend {
            ids: vec![envelope.id],
            new_session,
        };
        // A control message: signed, in the clear (it carries only ids of the sender's own).
        let request = Envelope::seal(self.key(), header, &body).map_err(|e| fail(&e))?;
        let entry = OutboxEntry::new(request, EntryKind::Control, false, now_ms());
        batch.put_outbox(&entry);
        self.store().apply(batch).map_err(|e| fail(&e))?;
        self.enqueue(entry);
        self.emit(NodeEvent::Undecryptable {
            id: envelope.id.to_string(),
            from: from.to_string(),
        });
        Ok(())
    }

    /// A peer could not decrypt messages we sent it: send them again from our history, with
    /// their ids and clocks, on a new session if it lost its state (not flushed).
    pub(crate) fn stage_resend(
        &self,
        from: PeerId,
        ids: Vec<MessageId>,
        new_session: bool,
    ) -> Result<(), Reject> {
        let fail = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot queue a re-send");
            Reject::StoreFailed
        };
        let mut entries = Vec::new();
        for id in ids.into_iter().take(MAX_IDS_PER_BATCH) {
            let Some(msg) = self.store().outgoing(&id).map_err(|e| fail(&e))? else {
                continue;
            };
            if msg.peer != from {
                tracing::warn!(%from, %id, "ignoring a re-send request for another peer's message");
                continue;
            }
            // A file or a timer change: the feature that made it knows its body.
            let mut body = None;
            for feature in self.plugins().all() {
                body = feature.original_body(self, &id).map_err(|e| fail(&e))?;
                if body.is_some() {
                    break;
                }
            }
            let body = body.unwrap_or(Body::Chat { text: msg.text });
            let header = Header {
                id,
                to: Destination::Peer(from),
                sent_at_ms: msg.sent_at_ms,
                lamport: msg.lamport,
                expires_at_ms: msg.expires_at_ms,
            };
            // Unsealed: the next attempt seals it on the new session.
            let envelope = Envelope::seal(self.key(), header, &body).map_err(|e| fail(&e))?;
            entries.push(OutboxEntry::new(
                envelope,
                EntryKind::Message,
                true,
                now_ms(),
            ));
        }
        if entries.is_empty() {
            return Ok(());
        }
        tracing::info!(peer = %from, count = entries.len(), new_session, "the peer could not decrypt our messages; sending them again");
        if new_session {
            self.olm().forget_sessions(&from).map_err(|e| fail(&e))?;
        }
        let mut batch = Batch::new();
        for entry in &entries {
            batch.put_outbox(entry);
        }
        self.store().apply(batch).map_err(|e| fail(&e))?;
        for entry in entries {
            self.enqueue(entry);
        }
        Ok(())
    }
}

/// An entry stored by an earlier release: a one-to-one body in the clear is sealed before it
/// goes, and its kind is read from its body once, here.
pub(crate) fn upgrade_entry(mut entry: OutboxEntry) -> OutboxEntry {
    if let (Destination::Peer(_), Ok(body)) = (entry.envelope.to, entry.envelope.body()) {
        match body {
            Body::Chat { .. } | Body::File(_) | Body::Timer { .. } => entry.unsealed = true,
            Body::Receipt { .. } => {
                entry.unsealed = true;
                entry.kind = EntryKind::Receipt;
            }
            Body::Resend { .. } => entry.kind = EntryKind::Control,
            Body::Olm(_) | Body::Mls { .. } | Body::GroupOp(_) => {}
        }
    }
    entry
}

impl From<Reject> for Inbound {
    fn from(reason: Reject) -> Self {
        Inbound::Refused(reason)
    }
}
