//! Registration, login, logout and `whoami`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, accounts::Registration};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, ClientIp, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/register", post(register))
        .route("/register/available", get(available))
        .route("/login", get(login_flows).post(login))
        .route("/logout", post(logout))
        .route("/logout/all", post(logout_all))
        .route("/account/whoami", get(whoami))
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    auth: Option<Value>,
}

#[derive(Deserialize)]
struct RegisterParams {
    kind: Option<String>,
}

async fn register(
    State(hs): State<Arc<Homeserver>>,
    ClientIp(ip): ClientIp,
    Params(params): Params<RegisterParams>,
    Body(body): Body<RegisterBody>,
) -> ApiResult<Json<Value>> {
    if params.kind.as_deref() == Some("guest") {
        return Err(Error::Forbidden("Guest access is disabled".to_owned()).into());
    }
    if !hs.config.enable_registration {
        return Err(Error::RegistrationDisabled.into());
    }
    hs.limits.registration.peek(&ip)?;
    let done = hs
        .accounts
        .register(Registration {
            username: body.username,
            password: body.password,
            device_id: body.device_id,
            initial_device_display_name: body.initial_device_display_name,
            inhibit_login: body.inhibit_login,
            auth: body.auth,
        })
        .await?;
    // Only completed registrations count, as in Synapse: UIA round trips are free.
    let _ = hs.limits.registration.check(&ip);
    let mut response = json!({ "user_id": done.user_id, "home_server": hs.server_name });
    if let (Some(token), Some(device)) = (done.access_token, done.device_id) {
        response["access_token"] = json!(token);
        response["device_id"] = json!(device);
    }
    Ok(Json(response))
}

#[derive(Deserialize)]
struct AvailableParams {
    username: String,
}

async fn available(
    State(hs): State<Arc<Homeserver>>,
    ClientIp(ip): ClientIp,
    Params(params): Params<AvailableParams>,
) -> ApiResult<Json<Value>> {
    hs.limits.registration.peek(&ip)?;
    hs.accounts.username_available(&params.username).await?;
    Ok(Json(json!({ "available": true })))
}

async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    /// Deprecated top-level form still sent by old clients.
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

#[derive(Deserialize)]
struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

async fn login(
    State(hs): State<Arc<Homeserver>>,
    ClientIp(ip): ClientIp,
    Body(body): Body<LoginBody>,
) -> ApiResult<Json<Value>> {
    hs.limits.login_address.check(&ip)?;
    if body.kind != "m.login.password" {
        return Err(Error::BadState(format!("Unknown login type {}", body.kind)).into());
    }
    let user = match (&body.identifier, &body.user) {
        (
            Some(Identifier {
                kind,
                user: Some(user),
            }),
            _,
        ) if kind == "m.id.user" => user.clone(),
        (Some(Identifier { kind, .. }), _) if kind != "m.id.user" => {
            return Err(Error::BadState(format!("Unknown login identifier type {kind}")).into());
        }
        (_, Some(user)) => user.clone(),
        _ => return Err(Error::MissingParam("Missing user identifier".to_owned()).into()),
    };
    let password = body
        .password
        .ok_or_else(|| Error::MissingParam("Missing password".to_owned()))?;
    let user_id = hs.accounts.parse_user(&user)?;
    hs.limits.login_account.check(user_id.as_str())?;
    // Too many wrong passwords: refuse without checking, as Synapse does.
    hs.limits.login_failed.peek(user_id.as_str())?;
    let result = hs
        .accounts
        .login_password(
            &user_id,
            &password,
            body.device_id,
            body.initial_device_display_name.as_deref(),
        )
        .await;
    let done = match result {
        Err(Error::Forbidden(reason)) => {
            let _ = hs.limits.login_failed.check(user_id.as_str());
            return Err(Error::Forbidden(reason).into());
        }
        other => other?,
    };
    Ok(Json(json!({
        "user_id": done.user_id,
        "access_token": done.access_token,
        "device_id": done.device_id,
        "home_server": hs.server_name,
    })))
}

async fn logout(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    hs.accounts.logout(&session).await?;
    Ok(Json(json!({})))
}

async fn logout_all(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    hs.accounts.logout_all(&session.user_id).await?;
    Ok(Json(json!({})))
}

async fn whoami(Auth(session): Auth) -> Json<Value> {
    Json(json!({ "user_id": session.user_id, "device_id": session.device_id, "is_guest": false }))
}
