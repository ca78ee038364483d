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
use switchboard_core::Homeserver;

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

async fn resolve(State(hs): State<Arc<Homeserver>>, Path(raw): Path<String>) -> ApiResult<Json<Value>> {
    let room_id = hs.rooms.resolve_alias(&alias(&raw)?).await?;
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
    hs.rooms
        .create_alias(&alias(&raw)?, &body.room_id, &session.user_id, session.is_admin)
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
