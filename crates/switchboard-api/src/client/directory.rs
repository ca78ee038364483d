//! Room aliases: `/directory/room/{alias}` and `/rooms/{roomId}/aliases`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, accounts::Session};

use super::rooms::{alias, room_id};
use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/directory/room/{alias}", get(resolve).put(create).delete(delete))
        .route("/rooms/{room_id}/aliases", get(room_aliases))
}

/// Aliases in a service's exclusive namespace are the service's: others get `M_EXCLUSIVE`. A service
/// may only manage aliases in its own namespace, and needs no membership or creator check there.
/// Returns whether the caller is privileged (server admin or owning service).
pub(super) fn require_alias_rights(hs: &Homeserver, session: &Session, alias: &str) -> Result<bool, Error> {
    if let Some(service) = &session.appservice {
        if !service.aliases.matches(alias) {
            return Err(Error::Exclusive(
                "The application service has not reserved this kind of alias".to_owned(),
            ));
        }
        return Ok(true);
    }
    if hs.appservices.registry().exclusive_alias_owner(alias).is_some() {
        return Err(Error::Exclusive(
            "This alias is reserved by an application service".to_owned(),
        ));
    }
    Ok(session.is_admin)
}

async fn resolve(State(hs): State<Arc<Homeserver>>, Path(raw): Path<String>) -> ApiResult<Json<Value>> {
    let room_id = hs.resolve_alias(&alias(&raw)?).await?;
    Ok(Json(json!({ "room_id": room_id, "servers": [hs.server_name] })))
}

#[derive(Deserialize)]
struct CreateBody {
    room_id: OwnedRoomId,
}

async fn create(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<CreateBody>,
) -> ApiResult<Json<Value>> {
    let alias = alias(&raw)?;
    let privileged = require_alias_rights(&hs, &session, alias.as_str())?;
    hs.rooms
        .create_alias(&alias, &body.room_id, &session.user_id, privileged)
        .await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    hs.rooms
        .delete_alias(&alias(&raw)?, &session.user_id, session.is_admin)
        .await?;
    Ok(Json(json!({})))
}

async fn room_aliases(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&raw)?;
    hs.rooms.visible_until(&room, &session.user_id).await?;
    Ok(Json(json!({ "aliases": hs.rooms.aliases(&room).await? })))
}
