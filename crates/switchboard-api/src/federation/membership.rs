//! Joining this server's rooms from other servers: `make_join` and `send_join` (v2).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::Uri,
    routing::{get, put},
};
use ruma::CanonicalJsonObject;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver};

use super::{FedResult, Federated};
use crate::client::{room_id, user_id};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route(
            "/_matrix/federation/v1/make_leave/{room_id}/{user_id}",
            get(make_leave),
        )
        .route(
            "/_matrix/federation/v2/send_leave/{room_id}/{event_id}",
            put(send_leave),
        )
        .route("/_matrix/federation/v2/invite/{room_id}/{event_id}", put(invite))
        .route(
            "/_matrix/federation/v1/make_join/{room_id}/{user_id}",
            get(make_join),
        )
        .route(
            "/_matrix/federation/v2/send_join/{room_id}/{event_id}",
            put(send_join),
        )
}

async fn make_join(
    State(hs): State<Arc<Homeserver>>,
    Path((room, user)): Path<(String, String)>,
    uri: Uri,
    request: Federated,
) -> FedResult<Json<Value>> {
    let (room, user) = (room_id(&room)?, user_id(&user)?);
    hs.check_server_acl(&request.origin, &room).await?;
    if user.server_name() != request.origin {
        return Err(Error::Forbidden(format!("{} cannot join on behalf of {user}", request.origin)).into());
    }
    // Without any `ver`, only room version 1 is supported (the spec's default).
    let supported = crate::extract::repeated_param(&uri, "ver");
    let supported = if supported.is_empty() {
        vec!["1".to_owned()]
    } else {
        supported
    };
    let (room_version, event) = hs.rooms.make_join(&room, &user, &supported).await?;
    Ok(Json(json!({ "room_version": room_version, "event": event })))
}

async fn send_join(
    State(hs): State<Arc<Homeserver>>,
    Path((room, event_id)): Path<(String, String)>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.check_server_acl(&request.origin, &room).await?;
    let object: CanonicalJsonObject = request.json()?;
    let (state, auth_chain, event) = hs
        .rooms
        .send_join(&request.origin, &room, &event_id, object, &hs.federation.keys)
        .await?;
    let servers = hs.rooms.joined_servers(&room).await?;
    Ok(Json(json!({
        "origin": hs.server_name,
        "state": state.iter().map(|e| e.federation_json()).collect::<Vec<_>>(),
        "auth_chain": auth_chain.iter().map(|e| e.federation_json()).collect::<Vec<_>>(),
        "event": event.federation_json(),
        "members_omitted": false,
        "servers_in_room": servers,
    })))
}

async fn make_leave(
    State(hs): State<Arc<Homeserver>>,
    Path((room, user)): Path<(String, String)>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let (room, user) = (room_id(&room)?, user_id(&user)?);
    hs.check_server_acl(&request.origin, &room).await?;
    if user.server_name() != request.origin {
        return Err(Error::Forbidden(format!("{} cannot leave on behalf of {user}", request.origin)).into());
    }
    let (room_version, event) = hs.rooms.make_leave(&room, &user).await?;
    Ok(Json(json!({ "room_version": room_version, "event": event })))
}

async fn send_leave(
    State(hs): State<Arc<Homeserver>>,
    Path((room, event_id)): Path<(String, String)>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.check_server_acl(&request.origin, &room).await?;
    let object: CanonicalJsonObject = request.json()?;
    hs.rooms
        .send_leave(&request.origin, &room, &event_id, object, &hs.federation.keys)
        .await?;
    Ok(Json(json!({})))
}

#[derive(serde::Deserialize)]
struct InviteBody {
    room_version: String,
    event: CanonicalJsonObject,
    #[serde(default)]
    invite_room_state: Vec<Value>,
}

async fn invite(
    State(hs): State<Arc<Homeserver>>,
    Path((room, event_id)): Path<(String, String)>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.check_server_acl(&request.origin, &room).await?;
    let body: InviteBody = request.json()?;
    let event = hs
        .receive_invite(
            &request.origin,
            &room,
            &event_id,
            &body.room_version,
            body.event,
            body.invite_room_state,
        )
        .await?;
    Ok(Json(json!({ "event": event })))
}
