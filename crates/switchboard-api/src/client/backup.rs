//! Server-side key backup: `/room_keys/version` and `/room_keys/keys`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{
    Error, Homeserver,
    backup::{KeyBackupData, RoomKeyBackup, Scope, VersionBody},
};

use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/room_keys/version", post(create_version).get(latest_version))
        .route(
            "/room_keys/version/{version}",
            get(get_version).put(update_version).delete(delete_version),
        )
        .route("/room_keys/keys", get(get_all).put(put_all).delete(delete_all))
        .route(
            "/room_keys/keys/{room_id}",
            get(get_room).put(put_room).delete(delete_room),
        )
        .route(
            "/room_keys/keys/{room_id}/{session_id}",
            get(get_session).put(put_session).delete(delete_session),
        )
}

async fn create_version(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Body(body): Body<VersionBody>,
) -> ApiResult<Json<Value>> {
    let version = hs.backup.create_version(session.user_id.as_str(), &body).await?;
    Ok(Json(json!({ "version": version })))
}

async fn latest_version(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(hs.backup.version(session.user_id.as_str(), None).await?))
}

async fn get_version(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        hs.backup
            .version(session.user_id.as_str(), Some(&version))
            .await?,
    ))
}

async fn update_version(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(version): Path<String>,
    Body(body): Body<VersionBody>,
) -> ApiResult<Json<Value>> {
    hs.backup
        .update_version(session.user_id.as_str(), &version, &body)
        .await?;
    Ok(Json(json!({})))
}

async fn delete_version(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    hs.backup
        .delete_version(session.user_id.as_str(), &version)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct VersionParam {
    version: Option<String>,
}

impl VersionParam {
    fn required(self) -> Result<String, Error> {
        self.version
            .ok_or_else(|| Error::MissingParam("Missing the version query parameter".to_owned()))
    }
}

#[derive(Deserialize)]
struct AllBody {
    rooms: BTreeMap<String, RoomKeyBackup>,
}

async fn put_all(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(param): Params<VersionParam>,
    Body(body): Body<AllBody>,
) -> ApiResult<Json<Value>> {
    let version = param.required()?;
    Ok(Json(
        hs.backup
            .put_keys(session.user_id.as_str(), &version, body.rooms)
            .await?,
    ))
}

async fn put_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room_id): Path<String>,
    Params(param): Params<VersionParam>,
    Body(body): Body<RoomKeyBackup>,
) -> ApiResult<Json<Value>> {
    let version = param.required()?;
    let room_id = super::room_id(&room_id)?;
    let rooms = BTreeMap::from([(room_id.to_string(), body)]);
    Ok(Json(
        hs.backup
            .put_keys(session.user_id.as_str(), &version, rooms)
            .await?,
    ))
}

async fn put_session(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Params(param): Params<VersionParam>,
    Body(body): Body<KeyBackupData>,
) -> ApiResult<Json<Value>> {
    let version = param.required()?;
    let room_id = super::room_id(&room_id)?;
    let room = RoomKeyBackup::single(session_id, body);
    let rooms = BTreeMap::from([(room_id.to_string(), room)]);
    Ok(Json(
        hs.backup
            .put_keys(session.user_id.as_str(), &version, rooms)
            .await?,
    ))
}

/// `GET` and `DELETE` of the three scopes differ only in the scope.
async fn read_or_delete(
    hs: &Homeserver,
    user: &str,
    param: VersionParam,
    scope: Scope<'_>,
    delete: bool,
) -> ApiResult<Json<Value>> {
    let version = param.required()?;
    let answer = if delete {
        hs.backup.delete_keys(user, &version, scope).await?
    } else {
        hs.backup.keys(user, &version, scope).await?
    };
    Ok(Json(answer))
}

async fn get_all(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    read_or_delete(&hs, session.user_id.as_str(), param, Scope::All, false).await
}

async fn delete_all(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    read_or_delete(&hs, session.user_id.as_str(), param, Scope::All, true).await
}

async fn get_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room_id): Path<String>,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    read_or_delete(&hs, session.user_id.as_str(), param, Scope::Room(&room_id), false).await
}

async fn delete_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(room_id): Path<String>,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    read_or_delete(&hs, session.user_id.as_str(), param, Scope::Room(&room_id), true).await
}

async fn get_session(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    let scope = Scope::Session(&room_id, &session_id);
    read_or_delete(&hs, session.user_id.as_str(), param, scope, false).await
}

async fn delete_session(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Params(param): Params<VersionParam>,
) -> ApiResult<Json<Value>> {
    let scope = Scope::Session(&room_id, &session_id);
    read_or_delete(&hs, session.user_id.as_str(), param, scope, true).await
}
