//! Prometheus metrics (prometheus-client) and the `GET /metrics` endpoint (axum).
//!
//! [`Metrics`] is a cheap clone of shared counters; the swarm task, the mailbox service and the
//! flusher each update their own. The HTTP server only encodes the registry as text.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use kith_protocol::Reject;

/// The label of the rejects family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// The reject reason, in snake case.
    pub reason: String,
}

/// The label of the sheds family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// The priority class: `message`, `group`, `receipt` or `presence`.
    pub class: String,
}

/// The label of the limit-hits family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit: `connections`, `connections_per_peer`, `pending_connections`,
    /// `read_buffer_budget`, `deposit_rate`, `mailbox_quota`...
    pub limit: String,
}

/// The label of the lane-moves family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    /// The lane a connection moved to: `relay` or `newcomers` ([`crate::lanes`]).
    pub to: String,
}

/// Every metric the relay exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Open connections.
    pub connections: Gauge,
    /// Active circuit relay reservations.
    pub reservations: Gauge,
    /// Active relayed circuits.
    pub circuits: Gauge,
    /// Envelopes waiting in all mailboxes.
    pub mailbox_messages: Gauge,
    /// Bytes waiting in all mailboxes.
    pub mailbox_bytes: Gauge,
    /// Users of the mailbox (owners that fetch here), each with its reserve of the budget.
    pub mailbox_users: Gauge,
    /// Deposits answered `Stored` (duplicates included).
    pub deposits: Counter,
    /// Fetches answered.
    pub fetches: Counter,
    /// Acks answered.
    pub acks: Counter,
    /// Envelopes pushed to a connected recipient and accepted.
    pub pushes: Counter,
    /// Entries purged by retention.
    pub purged: Counter,
    /// Rejected requests by reason.
    pub rejects: Family<RejectLabels, Counter>,
    /// Seconds one group-commit flush took.
    pub flush_seconds: Histogram,
    /// Requests refused `Busy` by load shedding, by priority class.
    pub sheds: Family<ShedLabels, Counter>,
    /// Presence heartbeats taken.
    pub presence_heartbeats: Counter,
    /// Presence heartbeats that carried a (new) visibility policy.
    pub presence_policies: Counter,
    /// Presence queries answered.
    pub presence_queries: Counter,
    /// One-time keys published by their owners (`/kith/keys/1`).
    pub keys_published: Counter,
    /// One-time keys handed out.
    pub keys_claimed: Counter,
    /// Claims answered with a fallback key (no one-time key left).
    pub keys_fallback_claims: Counter,
    /// The duration of the latest flush, read by load shedding (not exported).
    pub last_flush: crate::shed::FlushGauge,
    /// Limits hit, by limit.
    pub limit_hits: Family<LimitLabels, Counter>,
    /// Connections moved between lanes, by the lane they moved to ([`crate::lanes`]).
    pub lane_moves: Family<LaneLabels, Counter>,
    /// Bytes held by request frames being read (refreshed when encoded).
    pub read_buffer_bytes: Gauge,
    /// The budget those frames count against, if the relay set one.
    read_budget: Option<kith_net::codec::Budget>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered under the `kith_relay` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kith_relay");
        let connections = Gauge::default();
        let reservations = Gauge::default();
        let circuits = Gauge::default();
        let mailbox_messages = Gauge::default();
        let mailbox_bytes = Gauge::default();
        let mailbox_users = Gauge::default();
        let deposits = Counter::default();
        let fetches = Counter::default();
        let acks = Counter::default();
        let pushes = Counter::default();
        let purged = Counter::default();
        let rejects = Family::<RejectLabels, Counter>::default();
        let flush_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        let sheds = Family::<ShedLabels, Counter>::default();
        let presence_heartbeats = Counter::default();
        let presence_policies = Counter::default();
        let presence_queries = Counter::default();
        let limit_hits = Family::<LimitLabels, Counter>::default();
        let lane_moves = Family::<LaneLabels, Counter>::default();
        registry.register(
            "lane_moves",
            "Connections moved between the relay's lane and the newcomers' lane, by the lane moved to",
            lane_moves.clone(),
        );
        let read_buffer_bytes = Gauge::default();
        registry.register("limit_hits", "Limits hit, by limit", limit_hits.clone());
        registry.register(
            "read_buffer_bytes",
            "Bytes held by request frames being read",
            read_buffer_bytes.clone(),
        );
        let keys_published = Counter::default();
        let keys_claimed = Counter::default();
        let keys_fallback_claims = Counter::default();
        registry.register(
            "keys_published",
            "One-time keys published by their owners",
            keys_published.clone(),
        );
        registry.register(
            "keys_claimed",
            "One-time keys handed out",
            keys_claimed.clone(),
        );
        registry.register(
            "keys_fallback_claims",
            "Key claims answered with a fallback key",
            keys_fallback_claims.clone(),
        );
        registry.register(
            "presence_heartbeats",
            "Presence heartbeats taken",
            presence_heartbeats.clone(),
        );
        registry.register(
            "presence_policies",
            "Presence heartbeats that carried a visibility policy",
            presence_policies.clone(),
        );
        registry.register(
            "presence_queries",
            "Presence queries answered",
            presence_queries.clone(),
        );
        registry.register("connections", "Open connections", connections.clone());
        registry.register(
            "reservations",
            "Active circuit relay reservations",
            reservations.clone(),
        );
        registry.register("circuits", "Active relayed circuits", circuits.clone());
        registry.register(
            "mailbox_messages",
            "Envelopes waiting in all mailboxes",
            mailbox_messages.clone(),
        );
        registry.register(
            "mailbox_bytes",
            "Bytes waiting in all mailboxes",
            mailbox_bytes.clone(),
        );
        registry.register(
            "mailbox_users",
            "Owners that fetch here, each with its reserve of the mailbox budget",
            mailbox_users.clone(),
        );
        registry.register("deposits", "Deposits answered Stored", deposits.clone());
        registry.register("fetches", "Mailbox fetches answered", fetches.clone());
        registry.register("acks", "Mailbox acks answered", acks.clone());
        registry.register(
            "pushes",
            "Envelopes pushed to a connected recipient and accepted",
            pushes.clone(),
        );
        registry.register(
            "purged",
            "Mailbox entries purged by retention",
            purged.clone(),
        );
        registry.register("rejects", "Rejected requests by reason", rejects.clone());
        registry.register(
            "flush_seconds",
            "Duration of one group-commit flush",
            flush_seconds.clone(),
        );
        registry.register(
            "sheds",
            "Requests refused Busy by load shedding, by priority class",
            sheds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            connections,
            reservations,
            circuits,
            mailbox_messages,
            mailbox_bytes,
            mailbox_users,
            deposits,
            fetches,
            acks,
            pushes,
            purged,
            rejects,
            flush_seconds,
            sheds,
            presence_heartbeats,
            presence_policies,
            presence_queries,
            keys_published,
            keys_claimed,
            keys_fallback_claims,
            last_flush: crate::shed::FlushGauge::default(),
            limit_hits,
            lane_moves,
            read_buffer_bytes,
            read_budget: None,
        }
    }

    /// The same metrics, also reporting `budget` (bytes held by frames being read, and frames
    /// refused for it as `limit_hits{limit="read_buffer_budget"}`).
    pub fn with_read_budget(mut self, budget: kith_net::codec::Budget) -> Self {
        self.read_budget = Some(budget);
        self
    }

    /// Counts one hit of `limit`.
    pub fn limit_hit(&self, limit: &str) {
        self.limit_hits
            .get_or_create(&LimitLabels {
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Counts a connection's move to the lane `to`.
    pub fn lane_move(&self, to: &str) {
        self.lane_moves
            .get_or_create(&LaneLabels { to: to.to_owned() })
            .inc();
    }

    /// How many connections moved to the lane `to` so far.
    pub fn lane_moves(&self, to: &str) -> u64 {
        self.lane_moves
            .get_or_create(&LaneLabels { to: to.to_owned() })
            .get()
    }

    /// How many times `limit` was hit so far.
    pub fn limit_hits(&self, limit: &str) -> u64 {
        self.refresh_read_budget();
        self.limit_hits
            .get_or_create(&LimitLabels {
                limit: limit.to_owned(),
            })
            .get()
    }

    /// Bytes held right now by request frames being read (0 without a budget).
    pub fn read_buffer_held(&self) -> usize {
        self.refresh_read_budget();
        self.read_budget.as_ref().map_or(0, |b| b.held_bytes())
    }

    /// Request frames being read right now that hold bytes (0 without a budget).
    pub fn frames_being_read(&self) -> usize {
        self.read_budget.as_ref().map_or(0, |b| b.frames())
    }

    /// Copies the read budget's figures into the exported metrics.
    fn refresh_read_budget(&self) {
        let Some(budget) = &self.read_budget else {
            return;
        };
        self.read_buffer_bytes
            .set(i64::try_from(budget.held_bytes()).unwrap_or(i64::MAX));
        // One family guard at a time: creating a label takes the family's write lock.
        for (limit, refused) in [
            ("read_buffer_budget", budget.refused()),
            (
                "read_buffer_per_connection",
                budget.refused_for_connection_cap(),
            ),
        ] {
            let counter = self.limit_hits.get_or_create(&LimitLabels {
                limit: limit.to_owned(),
            });
            counter.inc_by(refused.saturating_sub(counter.get()));
        }
    }

    /// Counts one request shed in `class` (also counted as a `busy` reject).
    pub fn shed(&self, class: crate::shed::Class) {
        self.sheds
            .get_or_create(&ShedLabels {
                class: class.label().to_owned(),
            })
            .inc();
    }

    /// How many requests of `class` were shed so far.
    pub fn shed_count(&self, class: crate::shed::Class) -> u64 {
        self.sheds
            .get_or_create(&ShedLabels {
                class: class.label().to_owned(),
            })
            .get()
    }

    /// Counts one reject.
    pub fn reject(&self, reason: &Reject) {
        self.rejects
            .get_or_create(&RejectLabels {
                reason: reason_label(reason).to_owned(),
            })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        self.refresh_read_budget();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A stable snake-case label for a reject reason.
pub fn reason_label(reason: &Reject) -> &'static str {
    match reason {
        Reject::BadSignature => "bad_signature",
        Reject::TooLarge { .. } => "too_large",
        Reject::NotYours => "not_yours",
        Reject::QuotaExceeded => "quota_exceeded",
        Reject::Busy { .. } => "busy",
        Reject::Malformed => "malformed",
        Reject::WrongSender => "wrong_sender",
        Reject::WrongRecipient => "wrong_recipient",
        Reject::UnsupportedVersion => "unsupported_version",
        Reject::Expired => "expired",
        Reject::StoreFailed => "store_failed",
        Reject::Refused => "refused",
    }
}

async fn serve_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct ServeError {
    /// The requested address.
    pub addr: SocketAddr,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Binds `addr`; returns the bound address and the server future, which ends when `shutdown`
/// resolves.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = std::io::Result<()>>,
    ),
    ServeError,
> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(metrics);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((local, async move { server.await }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family() {
        let metrics = Metrics::new();
        metrics.reject(&Reject::QuotaExceeded);
        metrics.flush_seconds.observe(0.002);
        metrics.shed(crate::shed::Class::Presence);
        let text = metrics.encode();
        assert!(text.contains("kith_relay_rejects_total{reason=\"quota_exceeded\"} 1"));
        assert!(text.contains("kith_relay_flush_seconds_bucket"));
        assert!(text.contains("kith_relay_mailbox_messages 0"));
        assert!(text.contains("kith_relay_sheds_total{class=\"presence\"} 1"));
    }
}
