//! The local HTTP + JSON API on loopback, for the `kith` CLI and other user interfaces: the
//! one route table ([`serve`]), the request and answer types shared with the typed
//! [`client::Client`], and the one error answer ([`error::ApiError`]).
//!
//! Every request needs `Authorization: Bearer <token>` with the token from `<home>/api.token`.
//! Endpoints (all JSON):
//!
//! | method | path | body / query | answer |
//! |---|---|---|---|
//! | GET | `/v1/id` | | `{peer_id, name, invite, listen_addrs, read_receipts, presence}` |
//! | GET | `/v1/contacts` | | `[{name, peer_id, addrs, relays}]` |
//! | POST | `/v1/contacts` | `{name, peer, addrs?}` | the contact |
//! | DELETE | `/v1/contacts/{name}` | | the removed contact |
//! | POST | `/v1/contacts/{name}/rename` | `{name}` (the new name) | the renamed contact |
//! | GET | `/v1/contacts/{name}/verify` | | `{peer_id, safety_number, verified, identity_changed}` |
//! | POST | `/v1/contacts/{name}/verify` | | the same, once marked verified |
//! | POST | `/v1/send` | `{to, text, wait_ms?}` | `{id, state}` |
//! | GET | `/v1/messages` | `?with=NAME_OR_PEER` (`&limit=N&before=ID`: one page, oldest first) | `[{id, direction, from, peer, text, sent_at_ms, state, attachment?}]` |
//! | POST | `/v1/read` | `{with}` | `{read: n}` |
//! | GET | `/v1/status/{id}` | | `{id, state, members}` |
//! | GET | `/v1/presence/{who}` | | `{peer_id, online, last_seen_ms}` (503 when nobody could answer) |
//! | POST | `/v1/typing` | `{to}` | `{sent: bool}` (once, never stored or retried) |
//! | POST | `/v1/open` | `{with}` | `{peer_id}` (the user opened the chat: user activity) |
//! | GET | `/v1/health` | | `{peer_id, name, relays: [{addr, connected, reserved, error, since_ms}], pending_outbox, last_mailbox_fetch_ms, contacts: [{name, peer_id, path}]}` |
//! | GET | `/v1/settings` | | the settings in effect `{name, presence, read_receipts, max_file_bytes, auto_download_max_bytes, relays}` |
//! | POST | `/v1/settings` | `{name?, presence?, read_receipts?}` | the settings in effect, changed at once and saved |
//! | GET | `/v1/events` | | server-sent events, one JSON event per `data:` line (`message`, `receipt`, `failed`, `typing`, `progress {id, direction, done, total}`) |
//!
//! and, each in its own file: groups ([`groups`]), files ([`files`]), temporary chats and
//! export ([`chats`]), strangers and blocks ([`requests`]).
//!
//! The web UI's routes ([`crate::api::ui`]) are served on the same port; a UI session cookie stands
//! in for the token there, and every request must name a loopback host in `Host`.
//!
//! Every error answers `{"error": "..."}` ([`error`]): 400 (bad input or malformed JSON), 401
//! (token), 404 (unknown route, message or contact), 405 (wrong method), 413 (body too large),
//! 415 (body not `application/json`), 422 (a field missing or of the wrong type), 500 (store),
//! 503 (nobody who could answer did).

pub mod chats;
pub mod client;
pub mod error;
pub mod files;
pub mod groups;
pub mod requests;
pub mod ui;
mod verify;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{FromRef, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::Stream;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;

pub(crate) use error::ApiError;

use crate::config::{SettingsChange, SettingsView};
use crate::core::{ContactView, IdInfo, MessageView, Node, NodeError, Sent, StatusView};
use crate::features::presence::PresenceView;
use crate::health::HealthView;
use crate::shutdown::Signal;

/// Longest a send may wait for its first delivery attempt.
const MAX_SEND_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    node: Node,
    token: String,
    shutdown: Signal,
}

impl FromRef<AppState> for Node {
    fn from_ref(state: &AppState) -> Node {
        state.node.clone()
    }
}

/// Whether the `Authorization` header is the expected one, compared in constant time (a
/// timing difference must not tell a local attacker how much of a guess was right).
fn token_matches(given: Option<&[u8]>, expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.is_some_and(|given| bool::from(given.ct_eq(expected)))
}

async fn auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", state.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    // The web UI's guard (outside this layer) admits session cookies and the page's assets.
    let admitted = request
        .extensions()
        .get::<crate::api::ui::Admitted>()
        .is_some();
    if !admitted && !token_matches(given, expected.as_bytes()) {
        tracing::warn!(path = %request.uri().path(), "local API request without a valid token");
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see <home>/api.token)".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// `POST /v1/contacts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddContact {
    /// The name the user gives it.
    pub name: String,
    /// Its peer id or invite.
    pub peer: String,
    /// Direct addresses to reach it.
    #[serde(default)]
    pub addrs: Vec<String>,
}

/// `POST /v1/contacts/{name}/rename`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RenameContact {
    /// The new name.
    pub name: String,
}

/// `POST /v1/send`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SendBody {
    /// Contact name, peer id, or group name or id.
    pub to: String,
    /// The text.
    pub text: String,
    /// How long to wait for the first delivery attempt, in ms (0: answer at once).
    #[serde(default)]
    pub wait_ms: u64,
}

/// `POST /v1/read` and `POST /v1/open`: a conversation.
#[derive(Debug, Serialize, Deserialize)]
pub struct WithBody {
    /// Contact name, peer id, or group name or id.
    pub with: String,
}

/// What `POST /v1/read` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Read {
    /// How many messages were marked read.
    pub read: usize,
}

/// `POST /v1/typing`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TypingBody {
    /// Contact name or peer id.
    pub to: String,
}

/// What `POST /v1/typing` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Typed {
    /// Whether the notice went out (the peer was reachable).
    pub sent: bool,
}

/// What `POST /v1/open` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Opened {
    /// The conversation's peer.
    pub peer_id: String,
}

async fn id(State(node): State<Node>) -> Json<IdInfo> {
    Json(node.id_info().await)
}

async fn contacts(State(node): State<Node>) -> Result<Json<Vec<ContactView>>, ApiError> {
    Ok(Json(node.contacts()?))
}

async fn add_contact(
    State(node): State<Node>,
    Json(body): Json<AddContact>,
) -> Result<Json<ContactView>, ApiError> {
    Ok(Json(
        node.add_contact(&body.name, &body.peer, &body.addrs)
            .await?,
    ))
}

async fn remove_contact(
    State(node): State<Node>,
    Path(name): Path<String>,
) -> Result<Json<ContactView>, ApiError> {
    Ok(Json(node.remove_contact(&name).await?))
}

async fn rename_contact(
    State(node): State<Node>,
    Path(name): Path<String>,
    Json(body): Json<RenameContact>,
) -> Result<Json<ContactView>, ApiError> {
    Ok(Json(node.rename_contact(&name, &body.name).await?))
}

async fn health(State(node): State<Node>) -> Json<HealthView> {
    Json(node.health().await)
}

async fn settings(State(node): State<Node>) -> Json<SettingsView> {
    Json(node.settings_view())
}

async fn change_settings(
    State(node): State<Node>,
    Json(change): Json<SettingsChange>,
) -> Result<Json<SettingsView>, ApiError> {
    Ok(Json(node.update_settings(change)?))
}

async fn send(
    State(node): State<Node>,
    Json(body): Json<SendBody>,
) -> Result<Json<Sent>, ApiError> {
    let wait = (body.wait_ms > 0).then(|| Duration::from_millis(body.wait_ms).min(MAX_SEND_WAIT));
    Ok(Json(node.send(&body.to, &body.text, wait).await?))
}

#[derive(Deserialize)]
struct MessagesQuery {
    with: Option<String>,
    /// Paging: messages sent before this message id.
    before: Option<String>,
    /// Paging: at most this many (the newest of them).
    limit: Option<usize>,
}

async fn messages(
    State(node): State<Node>,
    Query(q): Query<MessagesQuery>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    if q.before.is_some() || q.limit.is_some() {
        let with = q
            .with
            .as_deref()
            .ok_or_else(|| NodeError::Invalid("paging (before, limit) needs `with`".into()))?;
        let limit = q.limit.unwrap_or(crate::api::ui::views::DEFAULT_PAGE);
        return Ok(Json(node.messages_page(
            with,
            q.before.as_deref(),
            limit,
        )?));
    }
    Ok(Json(node.messages(q.with.as_deref())?))
}

async fn read(
    State(node): State<Node>,
    Json(body): Json<WithBody>,
) -> Result<Json<Read>, ApiError> {
    let read = node.read(&body.with).await?;
    Ok(Json(Read { read }))
}

async fn status(
    State(node): State<Node>,
    Path(id): Path<String>,
) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(node.status(&id)?))
}

async fn presence(
    State(node): State<Node>,
    Path(who): Path<String>,
) -> Result<Json<PresenceView>, ApiError> {
    Ok(Json(node.presence(&who).await?))
}

async fn typing(
    State(node): State<Node>,
    Json(body): Json<TypingBody>,
) -> Result<Json<Typed>, ApiError> {
    let sent = node.typing(&body.to).await?;
    Ok(Json(Typed { sent }))
}

async fn open(
    State(node): State<Node>,
    Json(body): Json<WithBody>,
) -> Result<Json<Opened>, ApiError> {
    let peer = node.open_chat(&body.with)?;
    Ok(Json(Opened {
        peer_id: peer.to_string(),
    }))
}

async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut shutdown = s.shutdown.clone();
    // End the stream on shutdown, or the server's graceful stop would wait for the client.
    let stream = BroadcastStream::new(s.node.subscribe())
        .filter_map(|event| async move {
            let event = event.ok()?;
            let data = serde_json::to_string(&event).ok()?;
            Some(Ok(SseEvent::default().data(data)))
        })
        .take_until(async move { shutdown.wait().await });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Every route of the API (the web UI's are added in [`serve`], which knows the bound address).
fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/id", get(id))
        .route("/v1/contacts", get(contacts).post(add_contact))
        .route("/v1/contacts/{name}", delete(remove_contact))
        .route("/v1/contacts/{name}/rename", post(rename_contact))
        .route("/v1/contacts/{who}/block", post(requests::block))
        .route("/v1/contacts/{who}/unblock", post(requests::unblock))
        .route("/v1/send", post(send))
        .route("/v1/messages", get(messages))
        .route("/v1/read", post(read))
        .route("/v1/status/{id}", get(status))
        .route("/v1/presence/{who}", get(presence))
        .route("/v1/typing", post(typing))
        .route("/v1/open", post(open))
        .route("/v1/events", get(events))
        .route("/v1/health", get(health))
        .route("/v1/settings", get(settings).post(change_settings))
        .route("/v1/groups", get(groups::list).post(groups::create))
        .route("/v1/groups/{group}", get(groups::info))
        .route("/v1/groups/{group}/accept", post(groups::accept))
        .route("/v1/groups/{group}/decline", post(groups::decline))
        .route("/v1/groups/{group}/{kind}", post(groups::change))
        .route("/v1/invitations", get(groups::invitations))
        .route("/v1/send-file", post(files::send_file))
        .route("/v1/download", post(files::download))
        .route(
            "/v1/chats/{with}/timer",
            get(chats::timer).post(chats::set_timer),
        )
        .route("/v1/chats/{with}/export", get(chats::export))
        .route("/v1/requests", get(requests::list))
        .route("/v1/requests/{peer}/accept", post(requests::accept))
        .route("/v1/requests/{peer}/block", post(requests::block_request))
}

/// Binds the API on `addr` (which must be a loopback address) and serves it until shutdown.
/// Returns the bound address and the server task.
pub(crate) async fn serve(
    addr: SocketAddr,
    node: Node,
    token: String,
    mut shutdown: Signal,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the local API only listens on loopback, not {addr}"),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let gate = std::sync::Arc::new(crate::api::ui::Gate::new(&token, bound));
    let state = AppState {
        node,
        token,
        shutdown: shutdown.clone(),
    };
    let app = routes()
        .merge(verify::routes().with_state(state.node.clone()))
        .merge(crate::api::ui::routes(
            state.node.clone(),
            gate.clone(),
            bound,
        ))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(gate, crate::api::ui::guard))
        .layer(middleware::from_fn(error::json_errors))
        .with_state(state);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.wait().await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "local API stopped");
        }
    });
    Ok((bound, task))
}

/// Writes what a running daemon tells its CLI (`<home>/api.json`), readable by its owner only.
pub(crate) fn write_info(path: &std::path::Path, info: &crate::ApiInfo) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
    std::fs::write(path, json)?;
    crate::private::set_mode(path, crate::private::FILE_MODE)
}

#[cfg(test)]
mod token_tests {
    use super::token_matches;

    #[test]
    fn only_the_exact_header_matches() {
        let expected = b"Bearer abc123";
        assert!(token_matches(Some(b"Bearer abc123"), expected));
        assert!(!token_matches(Some(b"Bearer abc124"), expected));
        assert!(!token_matches(Some(b"Bearer abc12"), expected));
        assert!(!token_matches(Some(b""), expected));
        assert!(!token_matches(None, expected));
    }
}
