//! `/sync` and sync filters.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use std::collections::BTreeMap;

use ruma::{
    OwnedRoomId, OwnedUserId,
    api::client::sync::sync_events::v5::request::{List, RoomSubscription},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{
    Error, Homeserver,
    accounts::Session,
    filter::Filter,
    sync::{SlidingExtensions, SlidingRequest, SyncRequest, SyncToken},
};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

/// Simplified sliding sync (MSC4186), served at its unstable path only.
pub(super) fn sliding_routes() -> Router<Arc<Homeserver>> {
    Router::new().route(
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        post(sliding_sync),
    )
}

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/sync", get(sync))
        .route("/user/{user_id}/filter", post(create_filter))
        .route("/user/{user_id}/filter/{filter_id}", get(get_filter))
}

/// Long-polls are capped so a proxy or client timeout never cuts an answer off mid-flight.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Deserialize)]
struct SyncParams {
    since: Option<String>,
    timeout: Option<u64>,
    #[serde(default)]
    full_state: bool,
    filter: Option<String>,
}

async fn sync(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(params): Params<SyncParams>,
) -> ApiResult<Json<Value>> {
    let since = params
        .since
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<SyncToken>)
        .transpose()?;
    let filter = load_filter(&hs, &session, params.filter.as_deref()).await?;
    let request = SyncRequest {
        user: session.user_id,
        device: session.device_id,
        since,
        timeout: Duration::from_millis(params.timeout.unwrap_or(0)).min(MAX_TIMEOUT),
        full_state: params.full_state,
        filter,
    };
    Ok(Json(hs.sync.sync(&request).await?))
}

/// `filter=` is inline JSON when it starts with `{`, else the ID of a stored filter.
async fn load_filter(hs: &Homeserver, session: &Session, filter: Option<&str>) -> Result<Filter, Error> {
    let Some(filter) = filter else {
        return Ok(Filter::default());
    };
    let text = if filter.trim_start().starts_with('{') {
        filter.to_owned()
    } else {
        let id: i64 = filter
            .parse()
            .map_err(|_| Error::InvalidParam(format!("invalid filter ID `{filter}`")))?;
        hs.store
            .filter(session.user_id.as_str(), id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("No filter with ID {id}")))?
    };
    serde_json::from_str(&text).map_err(|e| Error::BadJson(format!("invalid filter: {e}")))
}

fn require_self(session: &Session, user: &str) -> Result<OwnedUserId, Error> {
    if session.user_id.as_str() != user {
        return Err(Error::Forbidden("Cannot use filters of other users".to_owned()));
    }
    Ok(session.user_id.clone())
}

async fn create_filter(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
    Body(filter): Body<Filter>,
) -> ApiResult<Json<Value>> {
    let user = require_self(&session, &user)?;
    let text = serde_json::to_string(&filter).map_err(Error::internal)?;
    let id = hs.store.create_filter(user.as_str(), &text).await?;
    Ok(Json(json!({ "filter_id": id.to_string() })))
}

async fn get_filter(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, filter_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = require_self(&session, &user)?;
    let id: i64 = filter_id
        .parse()
        .map_err(|_| Error::NotFound("No such filter".to_owned()))?;
    let text = hs
        .store
        .filter(user.as_str(), id)
        .await?
        .ok_or_else(|| Error::NotFound("No such filter".to_owned()))?;
    Ok(Json(serde_json::from_str(&text).map_err(Error::internal)?))
}

#[derive(Deserialize)]
struct SlidingParams {
    pos: Option<String>,
    timeout: Option<u64>,
}

/// The request body, in ruma's v5 types.
#[derive(Deserialize)]
struct SlidingBody {
    conn_id: Option<String>,
    txn_id: Option<String>,
    #[serde(default)]
    lists: BTreeMap<String, List>,
    #[serde(default)]
    room_subscriptions: BTreeMap<OwnedRoomId, RoomSubscription>,
    #[serde(default)]
    extensions: SlidingExtensions,
}

async fn sliding_sync(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(params): Params<SlidingParams>,
    Body(raw): Body<Value>,
) -> ApiResult<Json<Value>> {
    let spaces = spaces_filters(&raw)?;
    let body: SlidingBody =
        serde_json::from_value(raw).map_err(|e| Error::BadJson(format!("Invalid request body: {e}")))?;
    if body.conn_id.as_ref().is_some_and(|c| c.len() > 16) {
        return Err(Error::InvalidParam("conn_id is longer than 16 characters".to_owned()).into());
    }
    let request = SlidingRequest {
        user: session.user_id,
        device: session.device_id,
        pos: params.pos.filter(|p| !p.is_empty()),
        timeout: Duration::from_millis(params.timeout.unwrap_or(0)).min(MAX_TIMEOUT),
        conn_id: body.conn_id,
        txn_id: body.txn_id,
        lists: body.lists,
        spaces,
        room_subscriptions: body.room_subscriptions,
        extensions: body.extensions,
    };
    Ok(Json(hs.sync.sliding_sync(&request).await?))
}

/// Each list's `filters.spaces`, which ruma's v5 `ListFilters` does not carry.
fn spaces_filters(raw: &Value) -> Result<BTreeMap<String, Vec<OwnedRoomId>>, Error> {
    let mut filters = BTreeMap::new();
    for (name, list) in raw["lists"].as_object().into_iter().flatten() {
        let Some(spaces) = list.get("filters").and_then(|f| f.get("spaces")) else {
            continue;
        };
        let spaces: Vec<OwnedRoomId> = serde_json::from_value(spaces.clone())
            .map_err(|e| Error::BadJson(format!("list {name}: filters.spaces: {e}")))?;
        filters.insert(name.clone(), spaces);
    }
    Ok(filters)
}
