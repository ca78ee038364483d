//! Pushers and notifications: `/pushers`, `/pushers/set`, `/notifications`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Homeserver, push::pushers::SetPusher};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/pushers", get(list))
        .route("/pushers/set", post(set))
        .route("/notifications", get(notifications))
}

async fn list(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(hs.push.pushers.list(&session.user_id).await?))
}

async fn set(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<SetPusher>,
) -> ApiResult<Json<Value>> {
    hs.limits.act(&hs.limits.message, &session)?;
    hs.push
        .pushers
        .set(&session.user_id, &session.device_id, body)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct NotificationsQuery {
    from: Option<String>,
    limit: Option<u64>,
    only: Option<String>,
}

async fn notifications(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(query): Params<NotificationsQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        hs.push
            .notifications(
                &session.user_id,
                query.from.as_deref(),
                query.limit,
                query.only.as_deref(),
            )
            .await?,
    ))
}
