//! Discovery: `/versions` and `/.well-known/matrix/client`.

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver};

use crate::error::ApiResult;

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/client/versions", get(versions))
        .route("/.well-known/matrix/client", get(well_known))
}

/// Spec versions whose everyday client surface is served; see the README's feature table for
/// what is still missing.
const VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7",
];

async fn versions() -> Json<Value> {
    // fi.mau.msc2659.stable: the application-service ping works (mautrix bridges check it).
    // org.matrix.simplified_msc3575: sliding sync, without which Element X will not log in.
    Json(json!({
        "versions": VERSIONS,
        "unstable_features": { "fi.mau.msc2659.stable": true, "org.matrix.simplified_msc3575": true },
    }))
}

async fn well_known(State(hs): State<Arc<Homeserver>>) -> ApiResult<Json<Value>> {
    let base_url = hs
        .config
        .public_baseurl
        .as_ref()
        .ok_or_else(|| Error::NotFound("No .well-known configured: set public_baseurl".to_owned()))?;
    Ok(Json(json!({ "m.homeserver": { "base_url": base_url } })))
}
