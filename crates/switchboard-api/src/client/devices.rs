//! Devices: list, rename, delete (user-interactive auth with the password; none for application
//! services, which may also create devices for their users with `PUT`, as spec v1.17 allows).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, accounts::Session, util::now_ms};

use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/devices", get(list))
        .route("/devices/{device_id}", get(show).put(update).delete(delete))
        .route("/delete_devices", post(delete_many))
}

fn device_json(device_id: String, display_name: Option<String>) -> Value {
    json!({ "device_id": device_id, "display_name": display_name, "last_seen_ip": null, "last_seen_ts": null })
}

async fn list(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    let devices: Vec<Value> = hs
        .store
        .devices(session.user_id.as_str())
        .await?
        .into_iter()
        .map(|(id, name, _)| device_json(id, name))
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

async fn show(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = hs
        .store
        .devices(session.user_id.as_str())
        .await?
        .into_iter()
        .find(|(id, _, _)| *id == device_id);
    let (id, name, _) = device.ok_or_else(|| Error::NotFound("Unknown device".to_owned()))?;
    Ok(Json(device_json(id, name)))
}

#[derive(Deserialize)]
struct UpdateBody {
    display_name: Option<String>,
}

async fn update(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(device_id): Path<String>,
    Body(body): Body<UpdateBody>,
) -> ApiResult<Json<Value>> {
    let exists = hs
        .store
        .device_exists(session.user_id.as_str(), &device_id)
        .await?;
    if !exists && !session.service_manages_devices() {
        return Err(Error::NotFound("Unknown device".to_owned()).into());
    }
    hs.store
        .upsert_device(
            session.user_id.as_str(),
            &device_id,
            body.display_name.as_deref(),
            now_ms() as i64,
        )
        .await?;
    // Other servers show device names too.
    hs.e2ee
        .device_list_changed(&session.user_id, Some(&device_id))
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteBody {
    auth: Option<Value>,
}

async fn authorize(hs: &Homeserver, session: &Session, auth: Option<&Value>) -> Result<(), Error> {
    if session.service_manages_devices() {
        return Ok(());
    }
    hs.require_password(&session.user_id, auth).await
}

async fn delete(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(device_id): Path<String>,
    Body(body): Body<DeleteBody>,
) -> ApiResult<Json<Value>> {
    if !hs
        .store
        .device_exists(session.user_id.as_str(), &device_id)
        .await?
    {
        return Err(Error::NotFound("Unknown device".to_owned()).into());
    }
    authorize(&hs, &session, body.auth.as_ref()).await?;
    hs.accounts.delete_device(&session.user_id, &device_id).await?;
    hs.e2ee
        .device_list_changed(&session.user_id, Some(&device_id))
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteManyBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

async fn delete_many(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<DeleteManyBody>,
) -> ApiResult<Json<Value>> {
    authorize(&hs, &session, body.auth.as_ref()).await?;
    for device in &body.devices {
        hs.accounts.delete_device(&session.user_id, device).await?;
        hs.e2ee
            .device_list_changed(&session.user_id, Some(device))
            .await?;
    }
    Ok(Json(json!({})))
}
