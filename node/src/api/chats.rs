//! The temporary-chat and export routes ([`crate::features::timers`]):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/chats/{with}/timer` | | `{with, conversation, timer_secs, admins_only, min_secs}` |
//! | POST | `/v1/chats/{with}/timer` | `{duration, admins_only?}` | the same, with `id` |
//! | GET | `/v1/chats/{with}/export` | | `{format, conversation, name, exported_at_ms, messages}` |

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::core::{Node, NodeError};
use crate::features::timers::{Export, TimerView};

/// `POST /v1/chats/{with}/timer`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TimerBody {
    /// `3s`, `5m`, `1h`, `7d`, `2w` or `off`.
    pub duration: String,
    /// In a group: whether only admins may change the timer from now on (unchanged if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admins_only: Option<bool>,
}

pub(crate) async fn timer(
    State(node): State<Node>,
    Path(with): Path<String>,
) -> Result<Json<TimerView>, ApiError> {
    Ok(Json(node.timer(&with)?))
}

pub(crate) async fn set_timer(
    State(node): State<Node>,
    Path(with): Path<String>,
    Json(body): Json<TimerBody>,
) -> Result<Json<TimerView>, ApiError> {
    let secs = kith_protocol::timer::parse(&body.duration, node.config().min_timer_secs)
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    Ok(Json(node.set_timer(&with, secs, body.admins_only).await?))
}

pub(crate) async fn export(
    State(node): State<Node>,
    Path(with): Path<String>,
) -> Result<Json<Export>, ApiError> {
    Ok(Json(node.export(&with)?))
}
