//! Files between the browser and the daemon: uploads streamed to disk and sent as file messages,
//! and attachments (received or sent) and their thumbnails served back to the page.
//!
//! An upload (`POST /v1/upload?to=WHO&name=NAME`, the raw file as the body) is written as it
//! arrives to `<home>/uploads/<random>/<name>`, never held in memory, and refused past
//! `max_file_bytes`. It then goes the way of `kith send-file`; the file stays there, since a
//! sender serves its file's chunks from it (see [`crate::features::media`]).
//!
//! Serving: a received file may be anything, and this origin holds the session cookie, so
//! a file is never served as a page: only images and video are shown inline, everything else is
//! an attachment, always with `nosniff` and a `sandbox` Content-Security-Policy.

use std::path::Path;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use kith_protocol::MessageId;
use rand::RngCore;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ApiError, UiState};
use crate::core::NodeError;

/// Directory of uploaded files inside the home.
pub const UPLOADS_DIR: &str = "uploads";
/// Bytes read from disk per piece of a served file.
const SERVE_PIECE_BYTES: usize = 64 * 1024;
/// Media types shown inline; anything else is served as a download.
const INLINE_TYPES: [&str; 6] = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "video/mp4",
    "video/webm",
];

#[derive(Deserialize)]
pub(super) struct UploadQuery {
    to: String,
    name: String,
}

/// `POST /v1/upload?to=WHO&name=NAME`: the body is the file.
pub(super) async fn upload(
    State(s): State<UiState>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    // Resolve the recipient first: an unknown one costs no upload.
    if s.node.group_target(&q.to)?.is_none() {
        s.node.resolve(&q.to)?;
    }
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let dir = s
        .node
        .config()
        .home
        .join(UPLOADS_DIR)
        .join(hex::encode(nonce));
    let path = dir.join(crate::features::media::safe_name(Path::new(&q.name)));
    let written = receive(&dir, &path, body, s.node.settings().max_file_bytes).await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    match s.node.send_file(&q.to, &path).await {
        Ok(sent) => Ok(Json(sent).into_response()),
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            Err(e.into())
        }
    }
}

/// Writes `body` to `path` as it arrives, refusing more than `max` bytes.
async fn receive(dir: &Path, path: &Path, body: Body, max: u64) -> Result<u64, ApiError> {
    let io =
        |e: std::io::Error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("upload: {e}"));
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            tracing::warn!(error = %e, "upload cut short");
            ApiError(StatusCode::BAD_REQUEST, format!("upload cut short: {e}"))
        })?;
        written += piece.len() as u64;
        if written > max {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the file is larger than {max} bytes (max_file_bytes in config.toml); nothing was sent"
                ),
            ));
        }
        file.write_all(&piece).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    if written == 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the file is empty".into(),
        ));
    }
    Ok(written)
}

fn parse_id(id: &str) -> Result<MessageId, ApiError> {
    id.parse()
        .map_err(|e: kith_protocol::ids::ParseIdError| NodeError::Invalid(e.to_string()).into())
}

#[derive(Deserialize)]
pub(super) struct FileQuery {
    #[serde(default)]
    download: bool,
}

/// `GET /v1/files/{id}`: the file attached to message `id`, once it is on this machine.
pub(super) async fn file(
    State(s): State<UiState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let parsed = parse_id(&id)?;
    let view = s
        .node
        .attachment(&parsed)
        .ok_or_else(|| NodeError::UnknownMessage(format!("{id} (no file attached)")))?;
    let Some(path) = view.path else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{} is not downloaded yet", view.name),
        ));
    };
    let source = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{}: {e} (moved or deleted?)", view.name),
        )
    })?;
    let len = source.metadata().await.map(|m| m.len()).ok();
    let stream = futures::stream::unfold(Some(source), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; SERVE_PIECE_BYTES];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let inline = !q.download && INLINE_TYPES.contains(&view.mime.as_str());
    let mime = if inline {
        view.mime.as_str()
    } else {
        "application/octet-stream"
    };
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(mime).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        percent(&view.name)
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; img-src 'self'; media-src 'self'"),
    );
    Ok(response)
}

/// `GET /v1/files/{id}/thumbnail`: the small PNG carried inside the file message.
pub(super) async fn thumbnail(
    State(s): State<UiState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let parsed = parse_id(&id)?;
    let png = s
        .node
        .attachment(&parsed)
        .and_then(|view| view.thumbnail)
        .and_then(|hex_png| hex::decode(hex_png).ok())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{id} has no thumbnail")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// Percent-encodes a file name for `filename*=UTF-8''…`.
fn percent(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
