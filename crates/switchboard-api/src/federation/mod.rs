//! The Server-Server API (`/_matrix/federation/*`) and the key API beside it (`/_matrix/key/*`),
//! served on listeners with the `federation` resource. Every federation endpoint but `version`
//! takes its caller from a verified `X-Matrix` signature ([`Federated`]).

mod devices;
mod events;
mod keys;
mod media;
mod membership;
mod query;
mod transactions;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, OriginalUri, Request, State},
    http::header,
    routing::get,
};
use ruma::OwnedServerName;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver};

use crate::error::{ApiError, ApiResult};

/// Largest body of a federation request (a transaction of 50 PDUs and 100 EDUs fits many times).
const BODY_LIMIT: usize = 16 * 1024 * 1024;

pub(crate) fn router() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/federation/v1/version", get(version))
        .merge(keys::routes())
        .merge(query::routes())
        .merge(membership::routes())
        .merge(transactions::routes())
        .merge(events::routes())
        .merge(devices::routes())
        .merge(media::routes())
}

/// `/.well-known/matrix/server`, when `serve_server_wellknown` is set.
pub(crate) fn well_known(hs: &Homeserver) -> Option<Router<Arc<Homeserver>>> {
    hs.config
        .serve_server_wellknown
        .then(|| Router::new().route("/.well-known/matrix/server", get(server_well_known)))
}

async fn server_well_known(State(hs): State<Arc<Homeserver>>) -> Json<Value> {
    // Delegate to public_baseurl's host and port (443 when it names none), as Synapse does.
    let delegated = hs
        .config
        .public_baseurl
        .as_deref()
        .and_then(url_host_port)
        .unwrap_or_else(|| format!("{}:443", hs.server_name));
    Json(json!({ "m.server": delegated }))
}

fn url_host_port(base: &str) -> Option<String> {
    let rest = base.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.rsplit_once(':') {
        Some((_, port)) => !port.contains(']') && port.parse::<u16>().is_ok(),
        None => false,
    };
    Some(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    })
}

async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "Switchboard", "version": env!("CARGO_PKG_VERSION") } }))
}

/// A request another server signed: its origin, verified, and the body it signed.
pub struct Federated {
    pub origin: OwnedServerName,
    pub body: Bytes,
}

impl Federated {
    /// The body as JSON, with the client API's errors for bodies that are not.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        crate::extract::parse_json(&self.body)
    }
}

impl FromRequest<Arc<Homeserver>> for Federated {
    type Rejection = ApiError;

    async fn from_request(request: Request, hs: &Arc<Homeserver>) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        // The signature covers the path as sent, not as a nested router sees it.
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or_else(|| parts.uri.clone(), |original| original.0.clone());
        let body = axum::body::to_bytes(body, BODY_LIMIT)
            .await
            .map_err(|_| ApiError(Error::TooLarge("Request body too large".to_owned())))?;
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let origin = hs
            .federation
            .authenticate(authorization, &parts.method, &uri, &body)
            .await
            .inspect_err(|e| tracing::info!(path = %uri.path(), error = %e, "federation request refused"))?;
        Ok(Self { origin, body })
    }
}

pub(crate) type FedResult<T> = ApiResult<T>;

#[cfg(test)]
mod tests {
    #[test]
    fn well_known_delegates_to_the_public_baseurl() {
        assert_eq!(
            super::url_host_port("https://matrix.example.org/").as_deref(),
            Some("matrix.example.org:443")
        );
        assert_eq!(
            super::url_host_port("https://m.example.org:8448").as_deref(),
            Some("m.example.org:8448")
        );
        assert_eq!(
            super::url_host_port("https://[::1]/").as_deref(),
            Some("[::1]:443")
        );
        assert_eq!(super::url_host_port("nonsense"), None);
    }
}
