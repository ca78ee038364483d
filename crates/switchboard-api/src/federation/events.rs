//! Reading a room's events and state as another server: `/event`, `/backfill`,
//! `/get_missing_events`, `/state`, `/state_ids`, `/event_auth`. Only servers with a member in
//! the room (or any, for world-readable history) are answered.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::Uri,
    routing::{get, post},
};
use ruma::OwnedEventId;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, pdu::Pdu, util::now_ms};

use super::{FedResult, Federated};
use crate::{client::room_id, extract::Params};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/federation/v1/event/{event_id}", get(event))
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route(
            "/_matrix/federation/v1/get_missing_events/{room_id}",
            post(missing_events),
        )
        .route("/_matrix/federation/v1/state/{room_id}", get(state))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route(
            "/_matrix/federation/v1/event_auth/{room_id}/{event_id}",
            get(event_auth),
        )
}

fn pdus(events: &[Arc<Pdu>]) -> Vec<Value> {
    events.iter().map(|e| e.federation_json()).collect()
}

fn ids(events: &[Arc<Pdu>]) -> Vec<String> {
    events.iter().map(|e| e.event_id.to_string()).collect()
}

async fn event(
    State(hs): State<Arc<Homeserver>>,
    Path(event_id): Path<String>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let event = hs
        .rooms
        .event(&event_id)
        .await?
        .ok_or_else(|| Error::NotFound("Unknown event".to_owned()))?;
    hs.server_may_see(&request.origin, &event.room_id).await?;
    Ok(Json(json!({
        "origin": hs.server_name,
        "origin_server_ts": now_ms(),
        "pdus": [event.federation_json()],
    })))
}

#[derive(Deserialize)]
struct BackfillParams {
    limit: Option<usize>,
}

async fn backfill(
    State(hs): State<Arc<Homeserver>>,
    Path(room): Path<String>,
    uri: Uri,
    Params(params): Params<BackfillParams>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.server_may_see(&request.origin, &room).await?;
    let from: Vec<OwnedEventId> = crate::extract::repeated_param(&uri, "v")
        .into_iter()
        .filter_map(|id| OwnedEventId::try_from(id).ok())
        .collect();
    if from.is_empty() {
        return Err(Error::MissingParam("Name at least one event with `v`".to_owned()).into());
    }
    let events = hs
        .rooms
        .backfill(&room, &from, params.limit.unwrap_or(10))
        .await?;
    Ok(Json(json!({
        "origin": hs.server_name,
        "origin_server_ts": now_ms(),
        "pdus": pdus(&events),
    })))
}

#[derive(Deserialize)]
struct MissingBody {
    #[serde(default)]
    earliest_events: Vec<OwnedEventId>,
    latest_events: Vec<OwnedEventId>,
    limit: Option<usize>,
    min_depth: Option<u64>,
}

async fn missing_events(
    State(hs): State<Arc<Homeserver>>,
    Path(room): Path<String>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.server_may_see(&request.origin, &room).await?;
    let body: MissingBody = request.json()?;
    let events = hs
        .rooms
        .missing_events(
            &room,
            &body.earliest_events,
            &body.latest_events,
            body.limit.unwrap_or(10),
            body.min_depth.unwrap_or(0),
        )
        .await?;
    Ok(Json(json!({ "events": pdus(&events) })))
}

#[derive(Deserialize)]
struct AtEvent {
    event_id: String,
}

/// The state before an event and the auth chain of that state, for a server allowed to see them.
async fn state_at(
    hs: &Homeserver,
    room: &str,
    event_id: &str,
    origin: &ruma::ServerName,
) -> FedResult<(Vec<Arc<Pdu>>, Vec<Arc<Pdu>>)> {
    let room = room_id(room)?;
    hs.server_may_see(origin, &room).await?;
    let state = hs.rooms.state_before(&room, event_id).await?;
    let chain = hs.rooms.auth_chain(state.iter()).await?;
    Ok((state, chain))
}

async fn state(
    State(hs): State<Arc<Homeserver>>,
    Path(room): Path<String>,
    Params(at): Params<AtEvent>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let (state, chain) = state_at(&hs, &room, &at.event_id, &request.origin).await?;
    Ok(Json(json!({ "pdus": pdus(&state), "auth_chain": pdus(&chain) })))
}

async fn state_ids(
    State(hs): State<Arc<Homeserver>>,
    Path(room): Path<String>,
    Params(at): Params<AtEvent>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let (state, chain) = state_at(&hs, &room, &at.event_id, &request.origin).await?;
    Ok(Json(
        json!({ "pdu_ids": ids(&state), "auth_chain_ids": ids(&chain) }),
    ))
}

async fn event_auth(
    State(hs): State<Arc<Homeserver>>,
    Path((room, event_id)): Path<(String, String)>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let room = room_id(&room)?;
    hs.server_may_see(&request.origin, &room).await?;
    let event = hs
        .rooms
        .event(&event_id)
        .await?
        .filter(|e| e.room_id == room)
        .ok_or_else(|| Error::NotFound("Unknown event".to_owned()))?;
    let chain = hs.rooms.auth_chain(std::iter::once(&Arc::new(event))).await?;
    Ok(Json(json!({ "auth_chain": pdus(&chain) })))
}
