//! Third-party lookups, proxied to the application services that serve each protocol.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{OriginalUri, Path, State},
    routing::get,
};
use serde_json::Value;
use switchboard_core::{Error, Homeserver, appservice::thirdparty::Lookup};

use crate::{error::ApiResult, extract::Auth};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/thirdparty/protocols", get(protocols))
        .route("/thirdparty/protocol/{protocol}", get(protocol))
        .route("/thirdparty/location/{protocol}", get(location))
        .route("/thirdparty/user/{protocol}", get(user))
        .route("/thirdparty/location", get(location_reverse))
        .route("/thirdparty/user", get(user_reverse))
}

/// The query string minus the client's own access token, which must not reach the services.
fn forwarded_query(uri: &axum::http::Uri) -> String {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("access_token="))
        .collect::<Vec<_>>()
        .join("&")
}

async fn protocols(State(hs): State<Arc<Homeserver>>, _auth: Auth) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Object(hs.appservices.protocols().await?)))
}

async fn protocol(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    Path(protocol): Path<String>,
) -> ApiResult<Json<Value>> {
    let found = hs.appservices.protocol(&protocol).await?;
    Ok(Json(found.ok_or_else(|| {
        Error::NotFound(format!("Unknown protocol `{protocol}`"))
    })?))
}

async fn location(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    Path(protocol): Path<String>,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Json<Value>> {
    let found = hs
        .appservices
        .third_party_search(Lookup::Location, &protocol, &forwarded_query(&uri))
        .await?;
    Ok(Json(Value::Array(found)))
}

async fn user(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    Path(protocol): Path<String>,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Json<Value>> {
    let found = hs
        .appservices
        .third_party_search(Lookup::User, &protocol, &forwarded_query(&uri))
        .await?;
    Ok(Json(Value::Array(found)))
}

async fn location_reverse(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(
        hs.appservices
            .third_party_reverse(Lookup::Location, &forwarded_query(&uri))
            .await?,
    )))
}

async fn user_reverse(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(
        hs.appservices
            .third_party_reverse(Lookup::User, &forwarded_query(&uri))
            .await?,
    )))
}
