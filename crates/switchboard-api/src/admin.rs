//! Operator endpoints under `/_switchboard/admin/v1`, for server admins only. The
//! `switchboard appservice ...` commands talk to these.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, accounts::Session, appservice::AppService};

use crate::{error::ApiResult, extract::Auth};

pub(crate) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_switchboard/admin/v1/appservices", get(list))
        .route("/_switchboard/admin/v1/appservices/reload", post(reload))
        .route("/_switchboard/admin/v1/appservices/{id}", get(show))
        .route("/_switchboard/admin/v1/appservices/{id}/ping", post(ping))
        .route("/_switchboard/admin/v1/appservices/{id}/retry", post(retry))
        // Synapse's admin API, so its tools work here too.
        .route("/_synapse/admin/v1/purge_media_cache", post(purge_media_cache))
}

#[derive(serde::Deserialize)]
struct PurgeParams {
    before_ts: i64,
}

/// Drops cached media of other servers not used since `before_ts` (ms); it is fetched again
/// when asked for.
async fn purge_media_cache(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    crate::extract::Params(params): crate::extract::Params<PurgeParams>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let deleted = hs.purge_remote_media(params.before_ts).await?;
    Ok(Json(json!({ "deleted": deleted })))
}

fn require_admin(session: &Session) -> Result<(), Error> {
    if session.is_admin {
        Ok(())
    } else {
        Err(Error::Forbidden("You are not a server admin".to_owned()))
    }
}

fn service(hs: &Homeserver, id: &str) -> Result<Arc<AppService>, Error> {
    hs.appservices
        .registry()
        .by_id(id)
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("No application service `{id}`")))
}

async fn list(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let mut services = Vec::new();
    for service in hs.appservices.registry().services.clone() {
        services.push(hs.appservices.report(&service, hs.stream.current()).await?);
    }
    Ok(Json(json!({ "appservices": services })))
}

async fn show(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    Ok(Json(
        hs.appservices
            .report(&*service(&hs, &id)?, hs.stream.current())
            .await?,
    ))
}

async fn ping(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let took = hs.appservices.ping(&*service(&hs, &id)?, None).await?;
    Ok(Json(json!({ "duration_ms": took.as_millis() as u64 })))
}

async fn retry(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let service = service(&hs, &id)?;
    let sender = hs
        .appservices
        .delivery
        .sender(service.id())
        .ok_or_else(|| Error::NotFound(format!("No sender for `{id}`")))?;
    sender.kick();
    Ok(Json(json!({})))
}

async fn reload(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let count = hs
        .appservices
        .reload()
        .await
        .map_err(|e| Error::BadState(e.to_string()))?;
    Ok(Json(json!({ "appservices": count })))
}

/// Synapse's shared-secret registration: `GET` a nonce, `POST` the account with an HMAC.
pub(crate) fn synapse_routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route(
            "/_synapse/admin/v1/register",
            get(register_nonce).post(register_with_secret),
        )
        .route(
            "/_synapse/admin/v1/users/{user_id}/admin",
            get(get_server_admin).put(set_server_admin),
        )
}

async fn get_server_admin(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let user = switchboard_core::util::parse_user_id(&user).map_err(Error::InvalidParam)?;
    Ok(Json(json!({ "admin": hs.accounts.is_admin(&user).await? })))
}

#[derive(serde::Deserialize)]
struct ServerAdminBody {
    admin: bool,
}

/// Synapse's `PUT /_synapse/admin/v1/users/{userId}/admin`: grants or revokes server admin,
/// in effect for the user's sessions at once.
async fn set_server_admin(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
    crate::extract::Body(body): crate::extract::Body<ServerAdminBody>,
) -> ApiResult<Json<Value>> {
    require_admin(&session)?;
    let user = switchboard_core::util::parse_user_id(&user).map_err(Error::InvalidParam)?;
    if user == session.user_id && !body.admin {
        return Err(Error::BadState("You may not demote yourself".to_owned()).into());
    }
    if !hs.accounts.set_admin(&user, body.admin).await? {
        return Err(Error::NotFound(format!("User {user} not found")).into());
    }
    Ok(Json(json!({})))
}

fn shared_secret(hs: &Homeserver) -> Result<&str, Error> {
    hs.config
        .registration_shared_secret
        .as_deref()
        .ok_or_else(|| Error::BadState("Shared secret registration is not enabled".to_owned()))
}

async fn register_nonce(State(hs): State<Arc<Homeserver>>) -> ApiResult<Json<Value>> {
    shared_secret(&hs)?;
    Ok(Json(json!({ "nonce": hs.nonces.issue() })))
}

#[derive(serde::Deserialize)]
struct SharedSecretBody {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    user_type: Option<String>,
    mac: String,
    displayname: Option<String>,
}

async fn register_with_secret(
    State(hs): State<Arc<Homeserver>>,
    crate::extract::Body(body): crate::extract::Body<SharedSecretBody>,
) -> ApiResult<Json<Value>> {
    let secret = shared_secret(&hs)?;
    hs.nonces.take(&body.nonce)?;
    switchboard_core::shared_secret::verify_mac(
        secret,
        &body.nonce,
        &body.username,
        &body.password,
        body.admin,
        body.user_type.as_deref(),
        &body.mac,
    )?;
    let user_id = hs
        .accounts
        .create_user(&body.username.to_lowercase(), Some(&body.password), body.admin)
        .await?;
    let login = hs
        .accounts
        .login_password(&user_id, &body.password, None, body.displayname.as_deref())
        .await?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": login.access_token,
        "device_id": login.device_id,
        "home_server": hs.server_name,
    })))
}
