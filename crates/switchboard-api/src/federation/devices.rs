//! Devices and keys of this server's users, as other servers ask for them: a user's device list
//! (to start or repair their copy), key queries and one-time-key claims.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Map, Value};
use switchboard_core::Homeserver;

use super::{FedResult, Federated};
use crate::client::user_id;

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/federation/v1/user/devices/{user_id}", get(devices))
        .route("/_matrix/federation/v1/user/keys/query", post(query))
        .route("/_matrix/federation/v1/user/keys/claim", post(claim))
}

async fn devices(
    State(hs): State<Arc<Homeserver>>,
    Path(user): Path<String>,
    _request: Federated,
) -> FedResult<Json<Value>> {
    let user = user_id(&user)?;
    Ok(Json(hs.devices_for_federation(&user).await?))
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: Map<String, Value>,
}

async fn query(State(hs): State<Arc<Homeserver>>, request: Federated) -> FedResult<Json<Value>> {
    let body: QueryBody = request.json()?;
    Ok(Json(hs.query_keys_for_federation(&body.device_keys).await?))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: Map<String, Value>,
}

async fn claim(State(hs): State<Arc<Homeserver>>, request: Federated) -> FedResult<Json<Value>> {
    let body: ClaimBody = request.json()?;
    Ok(Json(hs.claim_keys_for_federation(&body.one_time_keys).await?))
}
