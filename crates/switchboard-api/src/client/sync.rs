//! `/sync` and sync filters.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use ruma::OwnedUserId;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{
    Error, Homeserver,
    accounts::Session,
    filter::Filter,
    sync::{SyncRequest, SyncToken},
};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

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
