//! `GET /v1/contacts/{name}/verify` shows the safety number with a contact; `POST` marks it
//! compared.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::ApiError;
use crate::core::crypto::verify::VerifyView;
use crate::core::{Node, NodeError};

async fn show(
    State(node): State<Node>,
    Path(name): Path<String>,
) -> Result<Json<VerifyView>, ApiError> {
    Ok(Json(node.verify_contact(&name, false)?))
}

async fn mark(
    State(node): State<Node>,
    Path(name): Path<String>,
) -> Result<Json<VerifyView>, ApiError> {
    let view = node.verify_contact(&name, true)?;
    node.store().flush().await.map_err(NodeError::from)?;
    Ok(Json(view))
}

/// The safety-number routes.
pub(crate) fn routes() -> Router<Node> {
    Router::new().route("/v1/contacts/{name}/verify", get(show).post(mark))
}
