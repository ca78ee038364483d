//! Queries other servers make: profiles and room aliases of this server's users and rooms.

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, rooms::Listing};

use super::{FedResult, Federated};
use crate::{
    client::{alias, user_id},
    extract::Params,
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/federation/v1/query/profile", get(profile))
        .route("/_matrix/federation/v1/query/directory", get(directory))
        .route(
            "/_matrix/federation/v1/publicRooms",
            get(public_rooms_get).post(public_rooms_post),
        )
}

#[derive(Deserialize)]
struct ProfileParams {
    user_id: String,
    field: Option<String>,
}

async fn profile(
    State(hs): State<Arc<Homeserver>>,
    Params(params): Params<ProfileParams>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let user = user_id(&params.user_id)?;
    tracing::debug!(origin = %request.origin, %user, "profile query");
    let profile = hs.local_profile(&user).await?;
    let mut body = json!({});
    let wanted = |name: &str| params.field.as_deref().is_none_or(|f| f == name);
    if let Some(name) = profile.displayname.filter(|_| wanted("displayname")) {
        body["displayname"] = json!(name);
    }
    if let Some(url) = profile.avatar_url.filter(|_| wanted("avatar_url")) {
        body["avatar_url"] = json!(url);
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
struct DirectoryParams {
    room_alias: String,
}

async fn directory(
    State(hs): State<Arc<Homeserver>>,
    Params(params): Params<DirectoryParams>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let alias = alias(&params.room_alias)?;
    tracing::debug!(origin = %request.origin, %alias, "directory query");
    if alias.server_name() != hs.server_name {
        return Err(Error::NotFound(format!("{alias} is not an alias of this server")).into());
    }
    // Services are asked about unknown aliases here too, so a remote user joining a bridged
    // alias makes the bridge create the room.
    let room_id = hs.resolve_alias(&alias).await?;
    Ok(Json(json!({ "room_id": room_id, "servers": [hs.server_name] })))
}

#[derive(Deserialize, Default)]
struct DirectoryQuery {
    limit: Option<usize>,
    since: Option<String>,
    #[serde(default)]
    include_all_networks: Option<String>,
    third_party_instance_id: Option<String>,
}

/// Other servers see the public room list only with `allow_public_rooms_over_federation`.
fn listing_allowed(hs: &Homeserver, origin: &ruma::ServerName) -> Result<(), Error> {
    if hs.config.allow_public_rooms_over_federation {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "{origin} may not view the public rooms of {} (allow_public_rooms_over_federation is off)",
            hs.server_name
        )))
    }
}

async fn public_rooms_get(
    State(hs): State<Arc<Homeserver>>,
    Params(query): Params<DirectoryQuery>,
    request: Federated,
) -> FedResult<Json<Value>> {
    listing_allowed(&hs, &request.origin)?;
    let all = query.include_all_networks.as_deref() == Some("true");
    let listing = match (&query.third_party_instance_id, all) {
        (Some(instance), _) => Listing::Instance(instance),
        (None, true) => Listing::All,
        (None, false) => Listing::Main,
    };
    let page = hs
        .rooms
        .public_rooms(listing, None, query.limit, query.since.as_deref())
        .await?;
    Ok(Json(crate::client::directory_json(page)))
}

async fn public_rooms_post(State(hs): State<Arc<Homeserver>>, request: Federated) -> FedResult<Json<Value>> {
    listing_allowed(&hs, &request.origin)?;
    let body: crate::client::PublicRoomsBody = request.json()?;
    let page = hs
        .rooms
        .public_rooms(body.listing(), body.search(), body.limit, body.since.as_deref())
        .await?;
    Ok(Json(crate::client::directory_json(page)))
}
