//! Sending and reading events: send, state, single events, `/messages`, members.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, put},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_core::{
    Error, Homeserver,
    accounts::Session,
    filter::RoomEventFilter,
    rooms::{Direction, EventDraft, PageToken},
    sync::{StreamToken, to_value},
};

use super::room_id;
use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/rooms/{room_id}/send/{event_type}/{txn_id}", put(send))
        .route(
            "/rooms/{room_id}/state/{event_type}/{state_key}",
            put(put_state).get(get_state),
        )
        .route(
            "/rooms/{room_id}/state/{event_type}/",
            put(put_state_empty_key).get(get_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{event_type}",
            put(put_state_empty_key).get(get_state_empty_key),
        )
        .route("/rooms/{room_id}/state", get(all_state))
        .route("/rooms/{room_id}/event/{event_id}", get(event))
        .route("/rooms/{room_id}/messages", get(messages))
        .route("/rooms/{room_id}/members", get(members))
        .route("/rooms/{room_id}/joined_members", get(joined_members))
        .route("/rooms/{room_id}/redact/{event_id}/{txn_id}", put(redact))
        .route("/rooms/{room_id}/context/{event_id}", get(context))
        .route("/voip/turnServer", get(turn_server))
}

fn content_object(body: Value) -> Result<Value, Error> {
    if body.is_object() {
        Ok(body)
    } else {
        Err(Error::BadJson("Content must be a JSON object".to_owned()))
    }
}

#[derive(Deserialize)]
struct TsParams {
    ts: Option<String>,
}

/// `?ts=` (timestamp massaging) is honoured for application services only, as in Synapse.
fn timestamp(session: &Session, params: &TsParams) -> Result<Option<u64>, Error> {
    match (&session.appservice, &params.ts) {
        (Some(_), Some(ts)) => ts
            .parse()
            .map(Some)
            .map_err(|_| Error::InvalidParam(format!("ts must be milliseconds, not `{ts}`"))),
        _ => Ok(None),
    }
}

fn check_rate(hs: &Homeserver, session: &Session) -> Result<(), Error> {
    hs.limits.act(&hs.limits.message, session)
}

async fn send(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_type, txn_id)): Path<(String, String, String)>,
    Params(params): Params<TsParams>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let txn = (session.device_id.as_str(), txn_id.as_str());
    // A retry gets its original answer even when the sender is now rate-limited. (Without a
    // limit in the way, the pipeline itself finds a retry, under the room lock.)
    if let Err(limited) = check_rate(&hs, &session) {
        if let Some(pdu) = hs
            .rooms
            .txn_event(&room, &session.user_id, &event_type, txn)
            .await?
        {
            return Ok(Json(json!({ "event_id": pdu.event_id })));
        }
        return Err(limited.into());
    }
    let mut draft = EventDraft::message(event_type, content_object(body)?);
    draft.timestamp = timestamp(&session, &params)?;
    let pdu = hs.rooms.send(&room, &session.user_id, draft, Some(txn)).await?;
    Ok(Json(json!({ "event_id": pdu.event_id })))
}

async fn put_state(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_type, state_key)): Path<(String, String, String)>,
    Params(params): Params<TsParams>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    send_state(&hs, &session, &room, event_type, state_key, &params, body).await
}

async fn put_state_empty_key(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_type)): Path<(String, String)>,
    Params(params): Params<TsParams>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    send_state(&hs, &session, &room, event_type, String::new(), &params, body).await
}

async fn send_state(
    hs: &Homeserver,
    session: &Session,
    room: &str,
    event_type: String,
    state_key: String,
    params: &TsParams,
    body: Value,
) -> ApiResult<Json<Value>> {
    let room = room_id(room)?;
    check_rate(hs, session)?;
    let mut draft = EventDraft::state(event_type, state_key, content_object(body)?);
    draft.timestamp = timestamp(session, params)?;
    let pdu = hs.rooms.send(&room, &session.user_id, draft, None).await?;
    Ok(Json(json!({ "event_id": pdu.event_id })))
}

#[derive(Deserialize)]
struct StateParams {
    format: Option<String>,
}

async fn get_state(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_type, state_key)): Path<(String, String, String)>,
    Params(params): Params<StateParams>,
) -> ApiResult<Json<Value>> {
    state_event(&hs, &session, &room, &event_type, &state_key, params).await
}

async fn get_state_empty_key(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_type)): Path<(String, String)>,
    Params(params): Params<StateParams>,
) -> ApiResult<Json<Value>> {
    state_event(&hs, &session, &room, &event_type, "", params).await
}

async fn state_event(
    hs: &Homeserver,
    session: &Session,
    room: &str,
    event_type: &str,
    state_key: &str,
    params: StateParams,
) -> ApiResult<Json<Value>> {
    let room = room_id(room)?;
    let state = hs.rooms.state_for_user(&room, &session.user_id).await?;
    let event = state
        .iter()
        .find(|e| e.event_type == event_type && e.state_key.as_deref() == Some(state_key))
        .ok_or_else(|| Error::NotFound("Event not found.".to_owned()))?;
    if params.format.as_deref() == Some("event") {
        return Ok(Json(to_value(
            event,
            Some((&session.user_id, &session.device_id)),
        )));
    }
    Ok(Json(event.content_value()))
}

async fn all_state(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let viewer = Some((&*session.user_id, session.device_id.as_str()));
    let state = hs.rooms.state_for_user(&room, &session.user_id).await?;
    Ok(Json(Value::Array(
        state.iter().map(|e| to_value(e, viewer)).collect(),
    )))
}

async fn event(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let pdu = hs
        .rooms
        .event_for_user(&room, &event_id, &session.user_id)
        .await?;
    Ok(Json(to_value(&pdu, Some((&session.user_id, &session.device_id)))))
}

#[derive(Deserialize)]
struct MessagesParams {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<u64>,
    filter: Option<String>,
}

async fn messages(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room): Path<String>,
    Params(params): Params<MessagesParams>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let dir = match params.dir.as_deref() {
        Some("b") => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(other) => {
            return Err(Error::InvalidParam(format!("dir must be `b` or `f`, not `{other}`")).into());
        }
        None => return Err(Error::MissingParam("Missing dir parameter".to_owned()).into()),
    };
    let from = params
        .from
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<PageToken>)
        .transpose()?;
    let to = params
        .to
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<PageToken>)
        .transpose()?;
    let filter: RoomEventFilter = match params.filter.as_deref() {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| Error::InvalidParam(format!("invalid filter: {e}")))?
        }
        None => RoomEventFilter::default(),
    };
    let page = hs
        .messages(
            &room,
            &session.user_id,
            from,
            to,
            dir,
            params.limit.unwrap_or(10),
            &filter,
        )
        .await?;
    let viewer = Some((&*session.user_id, session.device_id.as_str()));
    let mut response = json!({
        "start": page.start.to_string(),
        "chunk": page.chunk.iter().map(|e| to_value(e, viewer)).collect::<Vec<_>>(),
    });
    if let Some(end) = page.end {
        response["end"] = json!(end.to_string());
    }
    if !page.state.is_empty() {
        response["state"] = json!(page.state.iter().map(|e| to_value(e, viewer)).collect::<Vec<_>>());
    }
    Ok(Json(response))
}

#[derive(Deserialize)]
struct MembersParams {
    membership: Option<String>,
    not_membership: Option<String>,
}

async fn members(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room): Path<String>,
    Params(params): Params<MembersParams>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let viewer = Some((&*session.user_id, session.device_id.as_str()));
    let chunk: Vec<Value> = hs
        .rooms
        .state_for_user(&room, &session.user_id)
        .await?
        .iter()
        .filter(|e| e.kind == ruma::events::TimelineEventType::RoomMember)
        .filter(|e| {
            let membership = e.membership();
            params
                .membership
                .as_ref()
                .is_none_or(|m| membership.as_ref() == Some(m))
                && params
                    .not_membership
                    .as_ref()
                    .is_none_or(|m| membership.as_ref() != Some(m))
        })
        .map(|e| to_value(e, viewer))
        .collect();
    Ok(Json(json!({ "chunk": chunk })))
}

async fn joined_members(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.rooms.require_joined(&room, &session.user_id).await?;
    let mut joined = Map::new();
    for member in hs.rooms.members_with(&room, "join").await? {
        let content = member.content_value();
        if let Some(user) = &member.state_key {
            joined.insert(
                user.clone(),
                json!({ "display_name": content.get("displayname"), "avatar_url": content.get("avatar_url") }),
            );
        }
    }
    Ok(Json(json!({ "joined": joined })))
}

#[derive(Deserialize)]
struct RedactBody {
    reason: Option<String>,
}

async fn redact(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id, txn_id)): Path<(String, String, String)>,
    Body(body): Body<RedactBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    // Moderators removing others' events count under `rc_admin_redaction` when it is set, so
    // they can clean up abuse faster than they could send.
    let moderating = match &hs.limits.admin_redaction {
        Some(limiter) => hs
            .rooms
            .event(&event_id)
            .await?
            .filter(|target| target.room_id == room && target.sender != session.user_id)
            .map(|_| limiter),
        None => None,
    };
    hs.limits
        .act(moderating.unwrap_or(&hs.limits.message), &session)?;
    let txn = (session.device_id.as_str(), txn_id.as_str());
    let pdu = hs
        .rooms
        .redact(
            &room,
            &session.user_id,
            &event_id,
            body.reason.as_deref(),
            Some(txn),
        )
        .await?;
    Ok(Json(json!({ "event_id": pdu.event_id })))
}

#[derive(Deserialize)]
struct ContextParams {
    limit: Option<u64>,
    filter: Option<String>,
}

async fn context(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id)): Path<(String, String)>,
    Params(params): Params<ContextParams>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    let filter: RoomEventFilter = match params.filter.as_deref() {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| Error::InvalidParam(format!("invalid filter: {e}")))?
        }
        None => RoomEventFilter::default(),
    };
    let context = hs
        .rooms
        .context(
            &room,
            &session.user_id,
            &event_id,
            params.limit.unwrap_or(10),
            &filter,
        )
        .await?;
    let viewer = Some((&*session.user_id, session.device_id.as_str()));
    let list = |events: &[switchboard_core::pdu::Pdu]| {
        events.iter().map(|e| to_value(e, viewer)).collect::<Vec<_>>()
    };
    Ok(Json(json!({
        "start": context.start.to_string(),
        "end": context.end.to_string(),
        "event": to_value(&context.event, viewer),
        "events_before": list(&context.events_before),
        "events_after": list(&context.events_after),
        "state": context.state.iter().map(|e| to_value(e, viewer)).collect::<Vec<_>>(),
    })))
}

/// No TURN server is configured: the spec's answer is an empty object.
async fn turn_server(_auth: Auth) -> Json<Value> {
    Json(json!({}))
}

/// `/relations` lives under `/_matrix/client/v1` only.
pub(super) fn v1_routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}",
            get(relations_all),
        )
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}",
            get(relations_typed),
        )
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
            get(relations_typed_kind),
        )
}

#[derive(Deserialize)]
struct RelationParams {
    from: Option<String>,
    dir: Option<String>,
    limit: Option<u64>,
}

async fn relations(
    hs: &Homeserver,
    session: &Session,
    (room, event_id): (&str, &str),
    rel_type: Option<&str>,
    kind: Option<&str>,
    params: RelationParams,
) -> ApiResult<Json<Value>> {
    let room = room_id(room)?;
    let dir = match params.dir.as_deref() {
        None | Some("b") => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(other) => {
            return Err(Error::InvalidParam(format!("dir must be `b` or `f`, not `{other}`")).into());
        }
    };
    let from = params
        .from
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<StreamToken>)
        .transpose()?;
    let (events, next) = hs
        .rooms
        .relations(
            &room,
            &session.user_id,
            event_id,
            rel_type,
            kind,
            from,
            dir,
            params.limit.unwrap_or(50),
        )
        .await?;
    let viewer = Some((&*session.user_id, session.device_id.as_str()));
    let mut body = json!({ "chunk": events.iter().map(|e| to_value(e, viewer)).collect::<Vec<_>>() });
    if let Some(next) = next {
        body["next_batch"] = json!(next.to_string());
    }
    Ok(Json(body))
}

async fn relations_all(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id)): Path<(String, String)>,
    Params(params): Params<RelationParams>,
) -> ApiResult<Json<Value>> {
    relations(&hs, &session, (&room, &event_id), None, None, params).await
}

async fn relations_typed(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id, rel_type)): Path<(String, String, String)>,
    Params(params): Params<RelationParams>,
) -> ApiResult<Json<Value>> {
    relations(&hs, &session, (&room, &event_id), Some(&rel_type), None, params).await
}

async fn relations_typed_kind(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room, event_id, rel_type, kind)): Path<(String, String, String, String)>,
    Params(params): Params<RelationParams>,
) -> ApiResult<Json<Value>> {
    relations(
        &hs,
        &session,
        (&room, &event_id),
        Some(&rel_type),
        Some(&kind),
        params,
    )
    .await
}
