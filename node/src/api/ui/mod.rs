//! The web UI: a chat window the daemon serves on its loopback API port at `/`.
//!
//! The page is plain HTML, CSS and JavaScript from [`assets`](self) (`node/src/ui/assets/`),
//! compiled into the binary with `include_str!`: no build step, no CDN, nothing fetched from
//! elsewhere. It talks to the same `/v1` API as the command line, authenticated by a session
//! cookie instead of the bearer token ([`gate`]), and follows `/v1/events` with `EventSource`.
//!
//! Routes added here (the API's middleware stack applies [`guard`] to every route; the settings
//! panel uses the API's own `/v1/settings`, in effect at once):
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/`, `/assets/{file}` | the page (public: it holds no data) |
//! | POST | `/ui/session` | `{code}` → a session cookie (the code is spent) |
//! | POST | `/v1/ui/code` | `{code, url}`: a one-time code for `kith ui` |
//! | GET | `/v1/conversations` | contacts and groups with `last`, `unread`, by activity |
//! | POST | `/v1/upload?to=WHO&name=NAME` | raw file body → `{id, state}` |
//! | GET | `/v1/files/{id}` | the attached file (`?download=true` to save it) |
//! | GET | `/v1/files/{id}/thumbnail` | its PNG thumbnail |
//! | GET | `/v1/invite.svg` | this node's invite as a QR code |
//! | GET | `/v1/contacts/{name}/verify.svg` | the safety number with a contact as a QR code |

pub mod files;
pub mod gate;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub(crate) use crate::api::ApiError;
use crate::clock::now_ms;
use crate::core::Node;
pub use gate::Gate;

/// The policy of every response: scripts, styles, images and connections from this origin only,
/// no inline script, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Marks a request [`guard`] let in (the API's bearer check then lets it pass).
#[derive(Debug, Clone, Copy)]
pub struct Admitted;

/// What the UI's handlers share.
#[derive(Clone)]
pub(crate) struct UiState {
    node: Node,
    gate: Arc<Gate>,
    /// Where the page is: `http://127.0.0.1:PORT`.
    base: String,
}

/// The middleware in front of every route of the port: Host check, credentials, same-origin
/// check ([`Gate::check`]), and the security headers of every answer.
pub async fn guard(State(gate): State<Arc<Gate>>, mut request: Request, next: Next) -> Response {
    let decided = gate.check(
        request.method(),
        request.uri().path(),
        request.headers(),
        now_ms(),
    );
    let mut response = match decided {
        Ok(_) => {
            request.extensions_mut().insert(Admitted);
            next.run(request).await
        }
        Err(refusal) => {
            let status = match refusal {
                gate::Refusal::WrongHost => StatusCode::MISDIRECTED_REQUEST,
                gate::Refusal::NoCredentials => StatusCode::UNAUTHORIZED,
                gate::Refusal::CrossSite => StatusCode::FORBIDDEN,
            };
            tracing::warn!(
                path = %request.uri().path(),
                host = ?request.headers().get(header::HOST),
                %refusal,
                "local API request refused"
            );
            ApiError(status, refusal.to_string()).into_response()
        }
    };
    let headers = response.headers_mut();
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// The page's files, by name under `/assets/`, with their media types.
pub const ASSETS: [(&str, &str, &str); 3] = [
    ("app.js", "text/javascript; charset=utf-8", APP_JS),
    ("app.css", "text/css; charset=utf-8", APP_CSS),
    ("icon.svg", "image/svg+xml", ICON_SVG),
];

/// Bytes of the page and everything it loads at start.
pub fn initial_page_bytes() -> usize {
    INDEX_HTML.len() + ASSETS.iter().map(|(_, _, body)| body.len()).sum::<usize>()
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime)], *body).into_response(),
        None => ApiError(StatusCode::NOT_FOUND, format!("no asset {name}")).into_response(),
    }
}

#[derive(Deserialize)]
struct Exchange {
    code: String,
}

async fn session(State(s): State<UiState>, Json(body): Json<Exchange>) -> Response {
    match s.gate.redeem(body.code.trim(), now_ms()) {
        Some(value) => {
            let cookie = s.gate.set_cookie(&value);
            let mut response = Json(json!({ "ok": true })).into_response();
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        None => {
            tracing::warn!("web UI code refused (spent, expired or unknown)");
            ApiError(
                StatusCode::UNAUTHORIZED,
                "this link was used already or has expired: run `kith ui` for a new one".into(),
            )
            .into_response()
        }
    }
}

/// What `POST /v1/ui/code` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct CodeView {
    /// The one-time code.
    pub code: String,
    /// The page's address with the code.
    pub url: String,
}

async fn code(State(s): State<UiState>) -> Json<CodeView> {
    let code = s.gate.issue_code(now_ms());
    let url = format!("{}/#code={code}", s.base);
    Json(CodeView { code, url })
}

async fn conversations(State(s): State<UiState>) -> Result<Response, ApiError> {
    Ok(Json(s.node.conversation_list()?).into_response())
}

async fn invite_svg(State(s): State<UiState>) -> Result<Response, ApiError> {
    let invite = s.node.invite().encode();
    let code = qrcode::QrCode::new(invite.as_bytes()).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the invite does not fit a QR code: {e}"),
        )
    })?;
    Ok(svg_answer(&code))
}

/// What the safety number's QR code holds: `kith-safety:` and its 60 digits, as
/// `kith contact verify` prints it in the terminal.
pub fn safety_payload(number: &str) -> String {
    let digits: String = number.chars().filter(char::is_ascii_digit).collect();
    format!("kith-safety:{digits}")
}

async fn safety_svg(
    State(s): State<UiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let view = s.node.verify_contact(&name, false)?;
    let code = qrcode::QrCode::new(safety_payload(&view.safety_number)).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the safety number does not fit a QR code: {e}"),
        )
    })?;
    Ok(svg_answer(&code))
}

/// `code` drawn as an SVG image of at least 240×240.
fn svg_answer(code: &qrcode::QrCode) -> Response {
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
}

/// The UI's routes, for the API server on `addr` guarded by `gate`.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(
    node: Node,
    gate: Arc<Gate>,
    addr: SocketAddr,
) -> Router<S> {
    let state = UiState {
        node,
        gate,
        base: format!("http://{addr}"),
    };
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route(gate::SESSION_PATH, post(session))
        .route("/v1/ui/code", post(code))
        .route("/v1/conversations", get(conversations))
        .route("/v1/upload", post(files::upload))
        .route("/v1/files/{id}", get(files::file))
        .route("/v1/files/{id}/thumbnail", get(files::thumbnail))
        .route("/v1/invite.svg", get(invite_svg))
        .route("/v1/contacts/{name}/verify.svg", get(safety_svg))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safety_qr_holds_the_digits_the_terminal_shows() {
        let number = (0..12)
            .map(|i| format!("{:05}", i * 8191))
            .collect::<Vec<_>>()
            .join(" ");
        let payload = safety_payload(&number);
        assert_eq!(payload.len(), "kith-safety:".len() + 60);
        assert_eq!(payload, format!("kith-safety:{}", number.replace(' ', "")));
        let code = qrcode::QrCode::new(&payload).expect("fits");
        let svg = svg_answer(&code);
        assert_eq!(svg.headers()[header::CONTENT_TYPE], "image/svg+xml");
    }
}
