//! Request extractors: the access token, JSON bodies with Matrix errors, the client's address.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, FromRequest, FromRequestParts, Query, Request},
    http::{StatusCode, header, request::Parts},
};
use serde::de::DeserializeOwned;
use switchboard_core::{Error, Homeserver, accounts::Session};

use crate::error::ApiError;

/// The authenticated session of a request: `Authorization: Bearer` or `?access_token=`.
pub struct Auth(pub Session);

impl FromRequestParts<Arc<Homeserver>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hs: &Arc<Homeserver>) -> Result<Self, Self::Rejection> {
        let token = access_token(parts).ok_or(ApiError(Error::MissingToken))?;
        Ok(Auth(authenticate(hs, parts, &token).await?))
    }
}

/// The session of a request that may or may not carry a token (`/register`, `/login`). An
/// `as_token` identifies the service as its sender, whatever `?user_id=` says: mautrix sends the
/// user it is about to register there, and Synapse ignores it on these endpoints.
pub struct MaybeAuth(pub Option<Session>);

impl FromRequestParts<Arc<Homeserver>> for MaybeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hs: &Arc<Homeserver>) -> Result<Self, Self::Rejection> {
        let Some(token) = access_token(parts) else {
            return Ok(MaybeAuth(None));
        };
        match hs.accounts.authenticate(&token).await {
            Err(Error::UnknownToken) => {}
            other => return Ok(MaybeAuth(Some(other?))),
        }
        let service = hs
            .appservices
            .authenticate(&token)
            .ok_or(ApiError(Error::UnknownToken))?;
        Ok(MaybeAuth(Some(Session {
            user_id: service.sender.clone(),
            device_id: String::new(),
            is_admin: false,
            appservice: Some(service),
        })))
    }
}

#[derive(serde::Deserialize)]
struct Assertion {
    user_id: Option<String>,
    device_id: Option<String>,
    #[serde(rename = "org.matrix.msc3202.device_id")]
    device_id_unstable: Option<String>,
}

/// A user's access token, or an application service's `as_token` acting as its sender or — with
/// `?user_id=` — as a registered user in its namespace (Synapse's rules and error messages).
async fn authenticate(hs: &Homeserver, parts: &Parts, token: &str) -> Result<Session, ApiError> {
    match hs.accounts.authenticate(token).await {
        Err(Error::UnknownToken) => {}
        other => return Ok(other?),
    }
    let service = hs
        .appservices
        .authenticate(token)
        .ok_or(ApiError(Error::UnknownToken))?;
    let query: Assertion = Query::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .map_err(|e| ApiError(Error::InvalidParam(e.body_text())))?;
    let user_id = match query.user_id {
        Some(user) => {
            switchboard_core::util::parse_user_id(&user).map_err(|e| ApiError(Error::InvalidParam(e)))?
        }
        None => service.sender.clone(),
    };
    if !service.owns_user(user_id.as_str()) || user_id.server_name() != hs.server_name {
        return Err(Error::Forbidden(format!(
            "Application service cannot masquerade as this user ({user_id}): it is not in the service's namespace"
        ))
        .into());
    }
    if hs.store.user(user_id.as_str()).await?.is_none() {
        return Err(Error::Forbidden(format!(
            "Application service has not registered this user ({user_id})"
        ))
        .into());
    }
    let device_id = match query.device_id.or(query.device_id_unstable) {
        Some(device) => {
            if !hs.store.device_exists(user_id.as_str(), &device).await? {
                return Err(Error::UnknownDevice(format!("{user_id} has no device {device}")).into());
            }
            device
        }
        None => String::new(),
    };
    Ok(Session {
        user_id,
        device_id,
        is_admin: false,
        appservice: Some(service),
    })
}

fn access_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(token) = value.strip_prefix("Bearer ")
    {
        return Some(token.trim().to_owned());
    }
    let query: Query<HashMap<String, String>> = Query::try_from_uri(&parts.uri).ok()?;
    query.0.get("access_token").cloned()
}

/// A JSON request body. Invalid JSON is `M_NOT_JSON`, JSON of the wrong shape `M_BAD_JSON`, a body
/// over the limit `M_TOO_LARGE`. An empty body reads as `{}`, since several endpoints' bodies are
/// optional and clients send nothing.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            ApiError(if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge("Request body too large".to_owned())
            } else {
                Error::BadJson(rejection.body_text())
            })
        })?;
        parse_json(&bytes).map(Body)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError(Error::NotJson(format!("Content not JSON: {e}"))))?;
    // NUL can only arrive escaped; look closer only then.
    if bytes.windows(6).any(|w| w == b"\\u0000") && has_nul(&value) {
        return Err(ApiError(Error::BadJson(
            "NUL characters (\\u0000) are not allowed in request bodies".to_owned(),
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError(Error::BadJson(format!("Invalid request body: {e}"))))
}

/// Whether any string, key or value, holds NUL. PostgreSQL cannot store it in text columns
/// (display names, device names, account data, …), so it is refused for every body on both
/// engines alike rather than failing deep down on one.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Whether the listener a request came in on trusts `X-Forwarded-For` (`x_forwarded: true`).
#[derive(Clone, Copy)]
pub struct TrustForwarded(pub bool);

/// The client's address, for rate limiting: the peer, or `X-Forwarded-For` on a listener whose
/// config trusts the proxy in front of it (`x_forwarded: true`); on any other listener the header
/// is anyone's to forge.
pub struct ClientIp(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let trust_forwarded = parts.extensions.get::<TrustForwarded>().is_some_and(|t| t.0);
        if trust_forwarded {
            let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
            if let Some(first) = forwarded.and_then(|v| v.split(',').next()) {
                return Ok(ClientIp(first.trim().to_owned()));
            }
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        Ok(ClientIp(peer.unwrap_or_else(|| "unknown".to_owned())))
    }
}

/// Query parameters with `M_INVALID_PARAM` instead of axum's plain-text rejection.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Params(q.0))
            .map_err(|e| ApiError(Error::InvalidParam(e.body_text())))
    }
}

/// Every value of a query parameter that may repeat (`?via=a&via=b`), percent-decoded; serde's
/// query parsing keeps only one.
pub fn repeated_param(uri: &axum::http::Uri, name: &str) -> Vec<String> {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| *key == name)
        .filter_map(|(_, value)| {
            let value = value.replace('+', " ");
            percent_decode(&value)
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
