//! Typing, receipts, read markers and presence.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{post, put},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver};

use super::{room_id, user_id};
use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/rooms/{room_id}/typing/{user_id}", put(typing))
        .route(
            "/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
            post(receipt),
        )
        .route("/rooms/{room_id}/read_markers", post(read_markers))
        .route("/presence/{user_id}/status", put(set_presence).get(get_presence))
}

#[derive(Deserialize)]
struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

async fn typing(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, user)): Path<(String, String)>,
    Body(body): Body<TypingBody>,
) -> ApiResult<Json<Value>> {
    let (room, user) = (room_id(&room)?, user_id(&user)?);
    if user != session.user_id {
        return Err(Error::Forbidden("Cannot set another user's typing state".to_owned()).into());
    }
    hs.rooms.require_joined(&room, &user).await?;
    let timeout = Duration::from_millis(body.timeout.unwrap_or(30_000));
    hs.ephemeral.set_typing(&room, &user, body.typing, timeout).await;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct ReceiptBody {
    thread_id: Option<String>,
}

async fn receipt(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, kind, event_id)): Path<(String, String, String)>,
    Body(body): Body<ReceiptBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.rooms.require_joined(&room, &session.user_id).await?;
    hs.rooms
        .event_for_user(&room, &event_id, &session.user_id)
        .await?;
    if kind == "m.fully_read" {
        let content = json!({ "event_id": event_id });
        hs.account_data
            .set(&session.user_id, Some(&room), "m.fully_read", &content)
            .await?;
    } else {
        hs.ephemeral
            .set_receipt(
                &room,
                &kind,
                &session.user_id,
                &event_id,
                body.thread_id.as_deref(),
            )
            .await?;
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct MarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

async fn read_markers(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room): Path<String>,
    Body(body): Body<MarkersBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.rooms.require_joined(&room, &session.user_id).await?;
    if let Some(event_id) = &body.fully_read {
        hs.rooms.event_for_user(&room, event_id, &session.user_id).await?;
        let content = json!({ "event_id": event_id });
        hs.account_data
            .set(&session.user_id, Some(&room), "m.fully_read", &content)
            .await?;
    }
    for (kind, event_id) in [("m.read", &body.read), ("m.read.private", &body.read_private)] {
        if let Some(event_id) = event_id {
            hs.rooms.event_for_user(&room, event_id, &session.user_id).await?;
            hs.ephemeral
                .set_receipt(&room, kind, &session.user_id, event_id, None)
                .await?;
        }
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct PresenceBody {
    presence: String,
    status_msg: Option<String>,
}

async fn set_presence(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
    Body(body): Body<PresenceBody>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    if user != session.user_id {
        return Err(Error::Forbidden("Cannot set another user's presence".to_owned()).into());
    }
    hs.ephemeral
        .set_presence(&user, &body.presence, body.status_msg, 0)
        .await?;
    Ok(Json(json!({})))
}

async fn get_presence(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    if user.server_name() == hs.server_name {
        hs.local_profile(&user).await?;
    }
    // Presence is for people who share a room (Synapse's rule); other servers' users' presence
    // is what their servers sent.
    if user != session.user_id && !hs.share_a_room(&session.user_id, &user).await? {
        return Err(Error::Forbidden("You do not share a room with this user".to_owned()).into());
    }
    let presence = hs.ephemeral.presence(&user);
    let now = switchboard_core::util::now_ms();
    Ok(Json(match presence {
        Some(p) => p.content(now),
        None => json!({ "presence": "offline" }),
    }))
}
