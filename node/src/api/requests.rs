//! The routes of strangers and blocks ([`crate::features::strangers`]):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/requests` | | `[{peer_id, name, messages, first_ms, last_ms, preview}]` |
//! | POST | `/v1/requests/{peer}/accept` | `{name?}` (optional) | the new contact |
//! | POST | `/v1/requests/{peer}/block` | | `{peer_id, blocked, dropped}` |
//! | POST | `/v1/contacts/{who}/block`, `.../unblock` | | `{peer_id, blocked, dropped}` |

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::core::{ContactView, Node};
use crate::features::strangers::{BlockView, RequestView};

/// `POST /v1/requests/{peer}/accept` (the body is optional).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AcceptBody {
    /// The contact name to give the stranger (default: the end of its peer id).
    #[serde(default)]
    pub name: Option<String>,
}

pub(crate) async fn list(State(node): State<Node>) -> Result<Json<Vec<RequestView>>, ApiError> {
    Ok(Json(node.requests()?))
}

pub(crate) async fn accept(
    State(node): State<Node>,
    Path(peer): Path<String>,
    body: Option<Json<AcceptBody>>,
) -> Result<Json<ContactView>, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    Ok(Json(
        node.accept_request(&peer, body.name.as_deref()).await?,
    ))
}

pub(crate) async fn block_request(
    State(node): State<Node>,
    Path(peer): Path<String>,
) -> Result<Json<BlockView>, ApiError> {
    Ok(Json(node.block_request(&peer).await?))
}

pub(crate) async fn block(
    State(node): State<Node>,
    Path(who): Path<String>,
) -> Result<Json<BlockView>, ApiError> {
    Ok(Json(node.block(&who).await?))
}

pub(crate) async fn unblock(
    State(node): State<Node>,
    Path(who): Path<String>,
) -> Result<Json<BlockView>, ApiError> {
    Ok(Json(node.unblock(&who).await?))
}
