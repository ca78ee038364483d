//! The key API: this server's keys, and other servers' keys with this server as notary.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use ruma::{CanonicalJsonObject, OwnedServerName};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, util::now_ms};

use super::FedResult;
use crate::extract::{Body, Params};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        // Deprecated, still asked by old servers: the key ID is ignored.
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys))
        .route("/_matrix/key/v2/query", post(query_batch))
        .route("/_matrix/key/v2/query/{server_name}", get(query_one))
}

async fn server_keys(State(hs): State<Arc<Homeserver>>) -> Json<CanonicalJsonObject> {
    Json(hs.federation.keys.own_keys())
}

#[derive(Deserialize)]
struct QueryParams {
    minimum_valid_until_ts: Option<u64>,
}

async fn query_one(
    State(hs): State<Arc<Homeserver>>,
    Path(server): Path<String>,
    Params(params): Params<QueryParams>,
) -> FedResult<Json<Value>> {
    let server = server_name(&server)?;
    let answers = answer(&hs, &server, params.minimum_valid_until_ts.unwrap_or(0)).await?;
    Ok(Json(json!({ "server_keys": answers })))
}

#[derive(Deserialize)]
struct QueryCriteria {
    minimum_valid_until_ts: Option<u64>,
}

#[derive(Deserialize)]
struct BatchBody {
    server_keys: BTreeMap<String, BTreeMap<String, QueryCriteria>>,
}

/// At most this many servers per notary query, so one request cannot start unbounded fetches.
const MAX_SERVERS: usize = 100;

async fn query_batch(
    State(hs): State<Arc<Homeserver>>,
    Body(body): Body<BatchBody>,
) -> FedResult<Json<Value>> {
    if body.server_keys.len() > MAX_SERVERS {
        return Err(Error::TooLarge(format!("At most {MAX_SERVERS} servers per query")).into());
    }
    let mut answers = Vec::new();
    for (server, criteria) in &body.server_keys {
        let server = server_name(server)?;
        // The spec's `minimum_valid_until_ts` per key; one fresh response serves them all.
        let minimum = criteria
            .values()
            .filter_map(|c| c.minimum_valid_until_ts)
            .max()
            .unwrap_or(0);
        answers.extend(answer(&hs, &server, minimum).await?);
    }
    Ok(Json(json!({ "server_keys": answers })))
}

async fn answer(
    hs: &Homeserver,
    server: &OwnedServerName,
    minimum: u64,
) -> FedResult<Vec<CanonicalJsonObject>> {
    // Asking for keys valid in the past means "any"; the notary answers what it has.
    let minimum = minimum.min(now_ms());
    match hs.federation.keys.notary_answer(server, minimum).await {
        Ok(answer) => Ok(answer.into_iter().collect()),
        Err(switchboard_core::federation::FederationError::Store(e)) => Err(Error::Store(e).into()),
        Err(e) => {
            tracing::info!(%server, error = %e, "notary: no keys to give");
            Ok(Vec::new())
        }
    }
}

fn server_name(raw: &str) -> Result<OwnedServerName, Error> {
    OwnedServerName::try_from(raw).map_err(|e| Error::InvalidParam(format!("invalid server name {raw}: {e}")))
}
