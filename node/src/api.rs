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
//! | GET | `/v1/contacts/{name}/verify` | | `{peer_id, safety_number, verified, identity_changed}` |
//! | POST | `/v1/contacts/{name}/verify` | | the same, once marked verified |
//! | POST | `/v1/send` | `{to, text, wait_ms?}` | `{id, state}` |
//! | GET | `/v1/messages` | `?with=NAME_OR_PEER` | `[{id, direction, from, peer, text, sent_at_ms, state, attachment?}]` |
//! | POST | `/v1/send-file` | `{to, path}` (an absolute path on the daemon's machine) | `{id, state}` |
//! | POST | `/v1/download` | `{id, to?}` (`to`: a directory) | `{name, size, mime, hash, path}` once the file is complete |
//! | POST | `/v1/read` | `{with}` | `{read: n}` |
//! | GET | `/v1/status/{id}` | | `{id, state, members}` |
//! | GET | `/v1/presence/{who}` | | `{peer_id, online, last_seen_ms}` (503 when nobody could answer) |
//! | POST | `/v1/typing` | `{to}` | `{sent: bool}` (once, never stored or retried) |
//! | POST | `/v1/open` | `{with}` | `{peer_id}` (the user opened the chat: user activity) |
//! | GET | `/v1/events` | | server-sent events, one JSON event per `data:` line (`message`, `receipt`, `failed`, `typing`, `progress {id, direction, done, total}`) |
//! | GET | `/v1/groups` | | `[{group_id, name, admins, members, version, relay}]` |
//! | POST | `/v1/groups` | `{name, members?}` | `{group_id, name}` |
//! | GET | `/v1/groups/{group}` | | `{group_id, name, admins, members, version, relay}` |
//! | POST | `/v1/groups/{group}/{add,remove,promote,leave}` | `{who?}` | the group |
//!
//! Errors answer `{"error": "..."}` with 400 (bad input), 401 (token), 404 (unknown) or 500.

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

use crate::engine::{Node, NodeError};
use crate::shutdown::Signal;

/// Longest a send may wait for its first delivery attempt.
const MAX_SEND_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    node: Node,
    token: String,
    shutdown: Signal,
}

pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NodeError::UnknownMessage(_) => StatusCode::NOT_FOUND,
            NodeError::UnknownRecipient(_) | NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

async fn auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", state.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
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
}

async fn messages(
    State(s): State<AppState>,
    Query(q): Query<MessagesQuery>,
) -> Result<impl IntoResponse, ApiError> {
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
    let state = AppState {
        node,
        token,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/v1/id", get(id))
        .route("/v1/contacts", get(contacts).post(add_contact))
        .route("/v1/send", post(send))
        .route("/v1/messages", get(messages))
        .route("/v1/read", post(read))
        .route("/v1/status/{id}", get(status))
        .route("/v1/presence/{who}", get(presence))
        .route("/v1/typing", post(typing))
        .route("/v1/open", post(open))
        .route("/v1/events", get(events))
        .merge(crate::crypto::verify::api_routes().with_state(state.node.clone()))
        .merge(crate::group::api_routes().with_state(state.node.clone()))
        .merge(crate::media::api_routes().with_state(state.node.clone()))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
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
