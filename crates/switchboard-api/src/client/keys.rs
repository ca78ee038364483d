//! End-to-end encryption endpoints: key upload, query and claim, device-list changes, and
//! to-device messages.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post, put},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_core::{Error, Homeserver, sync::SyncToken};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/keys/upload", post(upload))
        .route("/keys/query", post(query))
        .route("/keys/claim", post(claim))
        .route("/keys/changes", get(changes))
        .route("/sendToDevice/{event_type}/{txn_id}", put(send_to_device))
        .route("/keys/device_signing/upload", post(upload_cross_signing))
        .route("/keys/signatures/upload", post(upload_signatures))
}

#[derive(Deserialize)]
struct UploadBody {
    device_keys: Option<Value>,
    one_time_keys: Option<Map<String, Value>>,
    fallback_keys: Option<Map<String, Value>>,
}

async fn upload(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<UploadBody>,
) -> ApiResult<Json<Value>> {
    if session.device_id.is_empty() {
        return Err(Error::BadState(
            "Uploading keys needs a device (use ?device_id= as a service)".to_owned(),
        )
        .into());
    }
    hs.limits.act(&hs.limits.message, &session)?;
    let counts = hs
        .e2ee
        .upload(
            &session.user_id,
            &session.device_id,
            body.device_keys.as_ref(),
            body.one_time_keys.as_ref(),
            body.fallback_keys.as_ref(),
        )
        .await?;
    Ok(Json(json!({ "one_time_key_counts": counts })))
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: Map<String, Value>,
}

async fn query(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<QueryBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(hs.query_keys(&session.user_id, &body.device_keys).await?))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: Map<String, Value>,
}

async fn claim(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    Body(body): Body<ClaimBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(hs.claim_keys(&body.one_time_keys).await?))
}

#[derive(Deserialize)]
struct ChangesParams {
    from: String,
    to: String,
}

async fn changes(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(params): Params<ChangesParams>,
) -> ApiResult<Json<Value>> {
    let from: SyncToken = params.from.parse()?;
    let to: SyncToken = params.to.parse()?;
    let (changed, left) = hs.sync.device_list_delta(&session.user_id, from, to).await?;
    Ok(Json(json!({ "changed": changed, "left": left })))
}

#[derive(Deserialize)]
struct ToDeviceBody {
    messages: Map<String, Value>,
}

async fn send_to_device(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((event_type, txn_id)): Path<(String, String)>,
    Body(body): Body<ToDeviceBody>,
) -> ApiResult<Json<Value>> {
    hs.limits.act(&hs.limits.message, &session)?;
    hs.e2ee
        .send_to_device(
            &session.user_id,
            &session.device_id,
            &txn_id,
            &event_type,
            &body.messages,
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct CrossSigningBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

/// The first upload needs no user-interactive auth (spec v1.11); replacing keys needs the password.
/// Nor do application services for the users they own exclusively.
async fn upload_cross_signing(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<CrossSigningBody>,
) -> ApiResult<Json<Value>> {
    if !session.service_owns_user() && hs.e2ee.has_cross_signing(&session.user_id).await? {
        hs.require_password(&session.user_id, body.auth.as_ref()).await?;
    }
    let keys: Vec<(&str, &Value)> = [
        ("master", body.master_key.as_ref()),
        ("self_signing", body.self_signing_key.as_ref()),
        ("user_signing", body.user_signing_key.as_ref()),
    ]
    .into_iter()
    .filter_map(|(kind, key)| key.map(|k| (kind, k)))
    .collect();
    hs.e2ee.upload_cross_signing(&session.user_id, &keys).await?;
    Ok(Json(json!({})))
}

async fn upload_signatures(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    Ok(Json(hs.e2ee.upload_signatures(&session.user_id, &body).await?))
}
