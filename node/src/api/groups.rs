//! The group routes ([`crate::features::group`]):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/groups` | | `[{group_id, name, admins, members, version, relay}]` |
//! | POST | `/v1/groups` | `{name, members?}` | `{group_id, name}` |
//! | GET | `/v1/groups/{group}` | | `{group_id, name, admins, members, version, relay}` |
//! | POST | `/v1/groups/{group}/{add,remove,promote,leave,rekey}` | `{who?}` | the group |
//! | GET | `/v1/invitations` | | `[{group_id, name, inviter, members, messages, invited_at_ms}]` |
//! | POST | `/v1/groups/{group}/accept` | | the group |
//! | POST | `/v1/groups/{group}/decline` | `{block?}` | `{group_id, name, dropped, blocked}` |

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::core::Node;
use crate::features::group::{ChangeKind, DeclineView, GroupView, InvitationView};

/// `POST /v1/groups`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateBody {
    /// The group's name.
    pub name: String,
    /// Initial members: contact names or peer ids.
    #[serde(default)]
    pub members: Vec<String>,
}

/// What `POST /v1/groups` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    /// The new group's id.
    pub group_id: String,
    /// Its name.
    pub name: String,
}

/// `POST /v1/groups/{group}/{kind}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChangeBody {
    /// The member to add, remove or promote (none for `leave`).
    #[serde(default)]
    pub who: Option<String>,
}

pub(crate) async fn list(State(node): State<Node>) -> Json<Vec<GroupView>> {
    Json(node.group_list())
}

pub(crate) async fn create(
    State(node): State<Node>,
    Json(body): Json<CreateBody>,
) -> Result<Json<Created>, ApiError> {
    let view = node.create_group(&body.name, &body.members).await?;
    Ok(Json(Created {
        group_id: view.group_id,
        name: view.name,
    }))
}

pub(crate) async fn info(
    State(node): State<Node>,
    Path(group): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(node.group_info(&group).await?))
}

pub(crate) async fn change(
    State(node): State<Node>,
    Path((group, kind)): Path<(String, ChangeKind)>,
    Json(body): Json<ChangeBody>,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(
        node.change_group(&group, kind, body.who.as_deref()).await?,
    ))
}

/// `POST /v1/groups/{group}/decline`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeclineBody {
    /// Also block the peer who added this node.
    #[serde(default)]
    pub block: bool,
}

pub(crate) async fn invitations(
    State(node): State<Node>,
) -> Result<Json<Vec<InvitationView>>, ApiError> {
    Ok(Json(node.group_invitations()?))
}

pub(crate) async fn accept(
    State(node): State<Node>,
    Path(group): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(node.accept_invitation(&group).await?))
}

pub(crate) async fn decline(
    State(node): State<Node>,
    Path(group): Path<String>,
    body: Option<Json<DeclineBody>>,
) -> Result<Json<DeclineView>, ApiError> {
    let block = body.is_some_and(|Json(b)| b.block);
    Ok(Json(node.decline_invitation(&group, block).await?))
}
