//! The file routes ([`crate::features::media`]):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/v1/send-file` | `{to, path}` (an absolute path on the daemon's machine) | `{id, state}` |
//! | POST | `/v1/download` | `{id, to?}` (`to`: a directory) | `{name, size, mime, hash, path}` once the file is complete |

use std::path::PathBuf;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::core::AttachmentView;
use crate::core::{Node, Sent};

/// `POST /v1/send-file`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SendFileBody {
    /// Contact name, peer id, or group name or id.
    pub to: String,
    /// The file, an absolute path on the daemon's machine.
    pub path: PathBuf,
}

/// `POST /v1/download`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DownloadBody {
    /// The message id.
    pub id: String,
    /// The directory to put the file in (default: `<home>/files`).
    #[serde(default)]
    pub to: Option<PathBuf>,
}

pub(crate) async fn send_file(
    State(node): State<Node>,
    Json(body): Json<SendFileBody>,
) -> Result<Json<Sent>, ApiError> {
    Ok(Json(node.send_file(&body.to, &body.path).await?))
}

pub(crate) async fn download(
    State(node): State<Node>,
    Json(body): Json<DownloadBody>,
) -> Result<Json<AttachmentView>, ApiError> {
    Ok(Json(node.download(&body.id, body.to.as_deref()).await?))
}
