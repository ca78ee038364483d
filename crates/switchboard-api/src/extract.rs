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
        Ok(Auth(hs.accounts.authenticate(&token).await?))
    }
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
    serde_json::from_value(value).map_err(|e| ApiError(Error::BadJson(format!("Invalid request body: {e}"))))
}

/// The client's address, for rate limiting: the peer, or `X-Forwarded-For` behind a proxy that
/// the listener config trusts (`x_forwarded: true`).
pub struct ClientIp(pub String);

impl FromRequestParts<Arc<Homeserver>> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hs: &Arc<Homeserver>) -> Result<Self, Self::Rejection> {
        let trust_forwarded = hs.config.listeners.iter().any(|l| l.x_forwarded);
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
