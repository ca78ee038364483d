//! Registration, login, logout and `whoami`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{
    Error, Homeserver,
    accounts::{LoggedIn, Registration, Session},
    util::parse_user_id,
};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, ClientIp, MaybeAuth, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/register", post(register))
        .route("/register/available", get(available))
        .route("/login", get(login_flows).post(login))
        .route("/logout", post(logout))
        .route("/logout/all", post(logout_all))
        .route("/account/deactivate", post(deactivate))
        .route("/account/whoami", get(whoami))
}

#[derive(Deserialize)]
struct RegisterBody {
    #[serde(rename = "type")]
    kind: Option<String>,
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
    MaybeAuth(session): MaybeAuth,
    Params(params): Params<RegisterParams>,
    Body(body): Body<RegisterBody>,
) -> ApiResult<Json<Value>> {
    if body.kind.as_deref() == Some(AS_LOGIN) {
        return register_for_service(&hs, session, body).await;
    }
    if params.kind.as_deref() == Some("guest") {
        return Err(Error::Forbidden("Guest access is disabled".to_owned()).into());
    }
    if !hs.config.enable_registration {
        return Err(Error::RegistrationDisabled.into());
    }
    if let Some(name) = &body.username {
        require_not_reserved(&hs, name)?;
    }
    // Taken before registering, so concurrent registrations cannot all pass; only completed
    // ones count, as in Synapse, so a failure (a UIA round trip, a taken name) is given back.
    hs.limits.registration.check(&ip)?;
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
        .await
        .inspect_err(|_| hs.limits.registration.refund(&ip))?;
    Ok(Json(logged_in(&hs, done)))
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
    require_not_reserved(&hs, &params.username)?;
    hs.accounts.username_available(&params.username).await?;
    Ok(Json(json!({ "available": true })))
}

const AS_LOGIN: &str = "m.login.application_service";

/// Humans cannot take IDs a service claims exclusively (`M_EXCLUSIVE`, as in Synapse).
fn require_not_reserved(hs: &Homeserver, localpart: &str) -> Result<(), Error> {
    let user_id = format!("@{}:{}", localpart.to_lowercase(), hs.server_name);
    if hs.appservices.registry().exclusive_user_owner(&user_id).is_some() {
        return Err(Error::Exclusive(
            "This user ID is reserved by an application service".to_owned(),
        ));
    }
    Ok(())
}

async fn register_for_service(
    hs: &Homeserver,
    session: Option<Session>,
    body: RegisterBody,
) -> ApiResult<Json<Value>> {
    let service = session.and_then(|s| s.appservice).ok_or_else(|| {
        Error::Forbidden("m.login.application_service needs an application service's as_token".to_owned())
    })?;
    if service.registration.msc4190 && !body.inhibit_login {
        return Err(Error::AppserviceLoginUnsupported(
            "This application service manages its devices itself (io.element.msc4190): register with inhibit_login: true and create devices with PUT /devices/{deviceId}".to_owned(),
        )
        .into());
    }
    let username = body
        .username
        .ok_or_else(|| Error::MissingParam("Missing username".to_owned()))?;
    let user_id =
        parse_user_id(&format!("@{username}:{}", hs.server_name)).map_err(Error::InvalidUsername)?;
    if !service.owns_user(user_id.as_str()) {
        return Err(Error::Exclusive(format!(
            "{user_id} is not in the application service's users namespace"
        ))
        .into());
    }
    if let Some(owner) = hs.appservices.registry().exclusive_user_owner(user_id.as_str())
        && owner.id() != service.id()
    {
        return Err(Error::Exclusive(format!("{user_id} is reserved by another application service")).into());
    }
    let done = hs
        .accounts
        .register_for_service(
            &service,
            &user_id,
            body.device_id,
            body.initial_device_display_name.as_deref(),
            body.inhibit_login,
        )
        .await?;
    Ok(Json(logged_in(hs, done)))
}

fn logged_in(hs: &Homeserver, done: LoggedIn) -> Value {
    let mut response = json!({ "user_id": done.user_id, "home_server": hs.server_name });
    if let (Some(token), Some(device)) = (done.access_token, done.device_id) {
        response["access_token"] = json!(token);
        response["device_id"] = json!(device);
    }
    response
}

async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }, { "type": AS_LOGIN }] }))
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
    MaybeAuth(session): MaybeAuth,
    Body(body): Body<LoginBody>,
) -> ApiResult<Json<Value>> {
    if body.kind == AS_LOGIN {
        let service = session.and_then(|s| s.appservice).ok_or_else(|| {
            Error::Forbidden("m.login.application_service needs an application service's as_token".to_owned())
        })?;
        if service.registration.msc4190 {
            return Err(Error::AppserviceLoginUnsupported(
                "This application service manages its devices itself (io.element.msc4190): create devices with PUT /devices/{deviceId} instead of logging in".to_owned(),
            )
            .into());
        }
        let user = login_user(&body)?;
        let user_id = if user.starts_with('@') {
            parse_user_id(&user).map_err(Error::InvalidParam)?
        } else {
            parse_user_id(&format!("@{user}:{}", hs.server_name)).map_err(Error::InvalidParam)?
        };
        let done = hs
            .accounts
            .login_for_service(
                &service,
                &user_id,
                body.device_id,
                body.initial_device_display_name.as_deref(),
            )
            .await?;
        return Ok(Json(logged_in(&hs, done)));
    }
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

/// The user a login names: `identifier` of type `m.id.user`, or the deprecated top-level `user`.
fn login_user(body: &LoginBody) -> Result<String, Error> {
    match (&body.identifier, &body.user) {
        (
            Some(Identifier {
                kind,
                user: Some(user),
            }),
            _,
        ) if kind == "m.id.user" => Ok(user.clone()),
        (Some(Identifier { kind, .. }), _) if kind != "m.id.user" => {
            Err(Error::BadState(format!("Unknown login identifier type {kind}")))
        }
        (_, Some(user)) => Ok(user.clone()),
        _ => Err(Error::MissingParam("Missing user identifier".to_owned())),
    }
}

/// A device logged out is gone: others (on other servers too) stop encrypting for it.
async fn logout(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    hs.accounts.logout(&session).await?;
    if !session.device_id.is_empty() {
        hs.e2ee
            .device_list_changed(&session.user_id, Some(&session.device_id))
            .await?;
    }
    Ok(Json(json!({})))
}

async fn logout_all(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    for device in hs.accounts.logout_all(&session.user_id).await? {
        hs.e2ee
            .device_list_changed(&session.user_id, Some(&device))
            .await?;
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeactivateBody {
    auth: Option<Value>,
}

/// The password proves it is the owner (a service needs none for a user it owns exclusively).
/// No identity server is bound, so none is unbound.
async fn deactivate(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<DeactivateBody>,
) -> ApiResult<Json<Value>> {
    if !session.service_owns_user() {
        hs.require_password(&session.user_id, body.auth.as_ref()).await?;
    }
    hs.deactivate(&session.user_id).await?;
    Ok(Json(json!({ "id_server_unbind_result": "no-support" })))
}

async fn whoami(Auth(session): Auth) -> Json<Value> {
    let mut answer = json!({ "user_id": session.user_id, "is_guest": false });
    // A service's as_token without `device_id=` acts without a device: the key is left out.
    if !session.device_id.is_empty() {
        answer["device_id"] = json!(session.device_id);
    }
    Json(answer)
}
