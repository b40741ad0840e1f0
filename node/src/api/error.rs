//! The one error answer of the local API: `{"error": "..."}` with its HTTP status, for every
//! route (the web UI's too), and the one mapping of [`NodeError`] to statuses:
//!
//! | error | status |
//! |---|---|
//! | `Store` | 500 |
//! | `UnknownMessage`, `UnknownContact` | 404 |
//! | `UnknownRecipient`, `Invalid` | 400 |
//! | `Unavailable` (nobody who could answer did) | 503 |
//!
//! [`json_errors`] rewrites axum's own error answers (unknown route, wrong method, body that is
//! not JSON, too large, a field missing) into the same shape.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::core::NodeError;

/// An error answer of the local API: `{"error": "..."}` with its status.
#[derive(Debug)]
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
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_error_has_its_status() {
        let cases = [
            (NodeError::UnknownMessage("m".into()), 404),
            (NodeError::UnknownContact("c".into()), 404),
            (NodeError::UnknownRecipient("r".into()), 400),
            (NodeError::Invalid("bad".into()), 400),
            (NodeError::Unavailable("gone".into()), 503),
        ];
        for (error, status) in cases {
            let text = error.to_string();
            let ApiError(got, message) = error.into();
            assert_eq!(got.as_u16(), status, "{text}");
            assert_eq!(message, text);
        }
    }
}
