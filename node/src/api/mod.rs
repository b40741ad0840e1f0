//! The local HTTP + JSON API on loopback, for the `kith` CLI and other user interfaces.
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
//! | POST | `/v1/send-file` | `{to, path}` (an absolute path on the daemon's machine) | `{id, state}` |
//! | POST | `/v1/download` | `{id, to?}` (`to`: a directory) | `{name, size, mime, hash, path}` once the file is complete |
//! | POST | `/v1/read` | `{with}` | `{read: n}` |
//! | GET | `/v1/status/{id}` | | `{id, state, members}` |
//! | GET | `/v1/presence/{who}` | | `{peer_id, online, last_seen_ms}` (503 when nobody could answer) |
//! | POST | `/v1/typing` | `{to}` | `{sent: bool}` (once, never stored or retried) |
//! | POST | `/v1/open` | `{with}` | `{peer_id}` (the user opened the chat: user activity) |
//! | GET | `/v1/health` | | `{peer_id, name, relays: [{addr, connected, reserved, error, since_ms}], pending_outbox, last_mailbox_fetch_ms, contacts: [{name, peer_id, path}]}` |
//! | GET | `/v1/settings` | | the settings in effect `{name, presence, read_receipts, max_file_bytes, auto_download_max_bytes, relays}` |
//! | POST | `/v1/settings` | `{name?, presence?, read_receipts?}` | the settings in effect, changed at once and saved |
//! | GET | `/v1/events` | | server-sent events, one JSON event per `data:` line (`message`, `receipt`, `failed`, `typing`, `progress {id, direction, done, total}`) |
//! | GET | `/v1/groups` | | `[{group_id, name, admins, members, version, relay}]` |
//! | POST | `/v1/groups` | `{name, members?}` | `{group_id, name}` |
//! | GET | `/v1/groups/{group}` | | `{group_id, name, admins, members, version, relay}` |
//! | POST | `/v1/groups/{group}/{add,remove,promote,leave}` | `{who?}` | the group |
//!
//! The web UI's routes ([`crate::api::ui`]) are served on the same port; a UI session cookie stands
//! in for the token there, and every request must name a loopback host in `Host`.
//!
//! Every error answers `{"error": "..."}`: 400 (bad input or malformed JSON), 401 (token), 404
//! (unknown route, message or contact), 405 (wrong method), 413 (body too large), 415 (body not
//! `application/json`), 422 (a field missing or of the wrong type), 500 (store), 503 (nobody who
//! could answer did).

pub mod client;
pub mod ui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;

use crate::core::{Node, NodeError};
use crate::shutdown::Signal;

/// Longest a send may wait for its first delivery attempt.
const MAX_SEND_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    node: Node,
    token: String,
    shutdown: Signal,
}

/// An error answer of the local API: `{"error": "..."}` with its status. Every route (the
/// group and media ones too) answers errors through this one mapping.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NodeError::UnknownMessage(_) | NodeError::UnknownContact(_) => StatusCode::NOT_FOUND,
            NodeError::UnknownRecipient(_) | NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

/// Most of an error body kept when one is rewritten as JSON.
const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// Rewrites error answers that are not JSON (axum's own: an unknown route, a wrong method, a
/// body that is not JSON, too large, or missing a field) as `{"error": "..."}` with the same
/// status, so that a client reads every error the same way.
async fn json_errors(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match status {
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!("no API route {method} {path} (README lists the API)")
        }
        StatusCode::METHOD_NOT_ALLOWED if text.is_empty() => {
            format!("{path} does not take {method}")
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let mut rewritten = ApiError(status, message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        rewritten.headers_mut().insert(header::ALLOW, allow.clone());
    }
    rewritten
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

async fn id(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.id_info().await)
}

async fn contacts(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.contacts()?))
}

#[derive(Deserialize)]
struct AddContact {
    name: String,
    peer: String,
    #[serde(default)]
    addrs: Vec<String>,
}

async fn add_contact(
    State(s): State<AppState>,
    Json(body): Json<AddContact>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        s.node
            .add_contact(&body.name, &body.peer, &body.addrs)
            .await?,
    ))
}

async fn remove_contact(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.remove_contact(&name).await?))
}

#[derive(Deserialize)]
struct RenameContact {
    name: String,
}

async fn rename_contact(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<RenameContact>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.rename_contact(&name, &body.name).await?))
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.health().await)
}

async fn settings(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.settings_view())
}

async fn change_settings(
    State(s): State<AppState>,
    Json(change): Json<crate::config::SettingsChange>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.update_settings(change)?))
}

#[derive(Deserialize)]
struct SendBody {
    to: String,
    text: String,
    #[serde(default)]
    wait_ms: u64,
}

async fn send(
    State(s): State<AppState>,
    Json(body): Json<SendBody>,
) -> Result<impl IntoResponse, ApiError> {
    let wait = (body.wait_ms > 0).then(|| Duration::from_millis(body.wait_ms).min(MAX_SEND_WAIT));
    Ok(Json(s.node.send(&body.to, &body.text, wait).await?))
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
    State(s): State<AppState>,
    Query(q): Query<MessagesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if q.before.is_some() || q.limit.is_some() {
        let with = q
            .with
            .as_deref()
            .ok_or_else(|| NodeError::Invalid("paging (before, limit) needs `with`".into()))?;
        let limit = q.limit.unwrap_or(crate::api::ui::views::DEFAULT_PAGE);
        return Ok(Json(s.node.messages_page(
            with,
            q.before.as_deref(),
            limit,
        )?));
    }
    Ok(Json(s.node.messages(q.with.as_deref())?))
}

#[derive(Deserialize)]
struct ReadBody {
    with: String,
}

async fn read(
    State(s): State<AppState>,
    Json(body): Json<ReadBody>,
) -> Result<impl IntoResponse, ApiError> {
    let n = s.node.read(&body.with).await?;
    Ok(Json(json!({ "read": n })))
}

async fn status(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.status(&id)?))
}

async fn presence(
    State(s): State<AppState>,
    Path(who): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.node.presence(&who).await?))
}

#[derive(Deserialize)]
struct TypingBody {
    to: String,
}

async fn typing(
    State(s): State<AppState>,
    Json(body): Json<TypingBody>,
) -> Result<impl IntoResponse, ApiError> {
    let sent = s.node.typing(&body.to).await?;
    Ok(Json(json!({ "sent": sent })))
}

#[derive(Deserialize)]
struct OpenBody {
    with: String,
}

async fn open(
    State(s): State<AppState>,
    Json(body): Json<OpenBody>,
) -> Result<impl IntoResponse, ApiError> {
    let peer = s.node.open_chat(&body.with)?;
    Ok(Json(json!({ "peer_id": peer.to_string() })))
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
    let app = Router::new()
        .route("/v1/id", get(id))
        .route("/v1/contacts", get(contacts).post(add_contact))
        .route("/v1/contacts/{name}", axum::routing::delete(remove_contact))
        .route("/v1/contacts/{name}/rename", post(rename_contact))
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
        .merge(crate::core::crypto::verify::api_routes().with_state(state.node.clone()))
        .merge(crate::features::group::api_routes().with_state(state.node.clone()))
        .merge(crate::features::media::api_routes().with_state(state.node.clone()))
        .merge(crate::features::timers::api_routes().with_state(state.node.clone()))
        .merge(crate::features::strangers::api_routes().with_state(state.node.clone()))
        .merge(crate::api::ui::routes(
            state.node.clone(),
            gate.clone(),
            bound,
        ))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(gate, crate::api::ui::guard))
        .layer(middleware::from_fn(json_errors))
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
