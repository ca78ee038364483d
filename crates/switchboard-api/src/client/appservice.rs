//! Endpoints only application services call: `POST /_matrix/client/v1/appservice/{id}/ping`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::post,
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver};

use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new().route("/_matrix/client/v1/appservice/{appservice_id}/ping", post(ping))
}

#[derive(Deserialize)]
struct PingBody {
    transaction_id: Option<String>,
}

async fn ping(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(id): Path<String>,
    Body(body): Body<PingBody>,
) -> ApiResult<Json<Value>> {
    let service = session.appservice.filter(|s| s.id() == id).ok_or_else(|| {
        Error::Forbidden(format!(
            "The access token is not application service `{id}`'s as_token"
        ))
    })?;
    let took = hs
        .appservices
        .ping(&service, body.transaction_id.as_deref())
        .await?;
    Ok(Json(json!({ "duration_ms": took.as_millis() as u64 })))
}
