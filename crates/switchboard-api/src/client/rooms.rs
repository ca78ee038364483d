//! Room creation and membership.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::Uri,
    routing::{get, post},
};
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{AliasAction, Error, Homeserver, accounts::Session, rooms::CreateRoom};

use super::{alias, room_id};
use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/createRoom", post(create_room))
        .route("/join/{room}", post(join_by_id_or_alias))
        .route("/rooms/{room_id}/join", post(join))
        .route("/rooms/{room_id}/leave", post(leave))
        .route("/rooms/{room_id}/invite", post(invite))
        .route("/rooms/{room_id}/kick", post(kick))
        .route("/rooms/{room_id}/ban", post(ban))
        .route("/rooms/{room_id}/unban", post(unban))
        .route("/rooms/{room_id}/forget", post(forget))
        .route("/joined_rooms", get(joined_rooms))
        .route("/rooms/{room_id}/upgrade", post(upgrade))
}

async fn create_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<CreateRoom>,
) -> ApiResult<Json<Value>> {
    if let Some(name) = &body.room_alias_name {
        let alias = hs.rooms.local_alias(name)?;
        hs.alias_rights(&session, alias.as_str(), AliasAction::Create)?;
    }
    hs.limits.act(&hs.limits.message, &session)?;
    // A room being made has nothing to protect yet: its invites count per invitee and inviter.
    for invitee in &body.invite {
        hs.limits.invite(&session, None, invitee.as_str())?;
    }
    // As for /invite: an application service may create the users it is asked about.
    for invitee in &body.invite {
        hs.ensure_user(invitee).await?;
    }
    let displayname = hs.accounts.displayname(&session.user_id).await?;
    // Users of other servers are invited once the room exists: their servers sign the invites.
    let (local, remote): (Vec<_>, Vec<_>) = body
        .invite
        .iter()
        .cloned()
        .partition(|u| u.server_name() == hs.server_name);
    let is_direct = body.is_direct;
    let body = CreateRoom {
        invite: local,
        ..body
    };
    let (room_id, alias) = hs
        .rooms
        .create_room(&session.user_id, displayname.as_deref(), body)
        .await?;
    for invitee in &remote {
        hs.invite(&room_id, &session.user_id, invitee, None, is_direct)
            .await?;
    }
    let mut response = json!({ "room_id": room_id });
    if let Some(alias) = alias {
        response["room_alias"] = json!(alias);
    }
    Ok(Json(response))
}

#[derive(Deserialize, Default)]
struct ReasonBody {
    reason: Option<String>,
}

async fn join_by_id_or_alias(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(target): Path<String>,
    uri: Uri,
    Body(_body): Body<ReasonBody>,
) -> ApiResult<Json<Value>> {
    // `via` (and the older `server_name`) name servers to ask when this one is not in the room.
    let mut servers = server_names(&uri, "via");
    servers.extend(server_names(&uri, "server_name"));
    let room_id = if target.starts_with('#') {
        let (room_id, alias_servers) = hs.lookup_alias(&alias(&target)?).await?;
        servers.extend(alias_servers);
        room_id
    } else {
        room_id(&target)?
    };
    do_join(&hs, &session, &room_id, &servers).await
}

async fn join(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(_body): Body<ReasonBody>,
) -> ApiResult<Json<Value>> {
    do_join(&hs, &session, &room_id(&raw)?, &[]).await
}

fn server_names(uri: &Uri, name: &str) -> Vec<OwnedServerName> {
    crate::extract::repeated_param(uri, name)
        .into_iter()
        .filter_map(|s| OwnedServerName::try_from(s).ok())
        .collect()
}

async fn do_join(
    hs: &Homeserver,
    session: &Session,
    room_id: &OwnedRoomId,
    servers: &[OwnedServerName],
) -> ApiResult<Json<Value>> {
    let user = &session.user_id;
    // Joining again changes nothing and costs nothing.
    if hs.rooms.membership(room_id, user).await.ok().flatten().as_deref() != Some("join") {
        // Synapse's split: a join through another server costs that server work too.
        let limiter = if hs.rooms.is_resident(room_id).await? {
            &hs.limits.joins
        } else {
            &hs.limits.joins_remote
        };
        hs.limits.act(limiter, session)?;
    }
    hs.join_room(user, room_id, servers).await.map_err(|e| match e {
        Error::Forbidden(reason) => {
            Error::Forbidden(format!("You are not allowed to join {room_id}: {reason}"))
        }
        other => other,
    })?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn leave(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<ReasonBody>,
) -> ApiResult<Json<Value>> {
    hs.leave_room(&room_id(&raw)?, &session.user_id, body.reason.as_deref())
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct TargetBody {
    #[serde(deserialize_with = "switchboard_core::util::de_user_id")]
    user_id: OwnedUserId,
    reason: Option<String>,
    #[serde(default)]
    is_direct: bool,
}

async fn invite(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<TargetBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&raw)?;
    hs.limits
        .invite(&session, Some(room.as_str()), body.user_id.as_str())?;
    // An unknown user in a service's namespace: the service is asked and may create it
    // (Synapse does the same), so people can invite bridged users that exist only remotely.
    hs.ensure_user(&body.user_id).await?;
    hs.invite(
        &room,
        &session.user_id,
        &body.user_id,
        body.reason.as_deref(),
        body.is_direct,
    )
    .await?;
    Ok(Json(json!({})))
}

async fn kick(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<TargetBody>,
) -> ApiResult<Json<Value>> {
    hs.rooms
        .kick(
            &room_id(&raw)?,
            &session.user_id,
            &body.user_id,
            body.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn ban(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<TargetBody>,
) -> ApiResult<Json<Value>> {
    hs.rooms
        .ban(
            &room_id(&raw)?,
            &session.user_id,
            &body.user_id,
            body.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn unban(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<TargetBody>,
) -> ApiResult<Json<Value>> {
    hs.rooms
        .unban(
            &room_id(&raw)?,
            &session.user_id,
            &body.user_id,
            body.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn forget(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    hs.rooms.forget(&room_id(&raw)?, &session.user_id).await?;
    Ok(Json(json!({})))
}

async fn joined_rooms(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "joined_rooms": hs.rooms.joined_rooms(&session.user_id).await? }),
    ))
}

#[derive(Deserialize)]
struct UpgradeBody {
    new_version: String,
}

async fn upgrade(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<UpgradeBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&raw)?;
    // The room's local aliases move to the new room: each is created anew there.
    for alias in hs.rooms.aliases(&room).await? {
        hs.alias_rights(&session, &alias, AliasAction::Create)?;
    }
    let displayname = hs.accounts.displayname(&session.user_id).await?;
    let new_room = hs
        .rooms
        .upgrade(&room, &session.user_id, displayname.as_deref(), &body.new_version)
        .await?;
    Ok(Json(json!({ "replacement_room": new_room })))
}
