//! Room aliases: `/directory/room/{alias}` and `/rooms/{roomId}/aliases`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, put},
};
use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{AliasAction, Error, Homeserver, rooms::Listing};

use super::{alias, room_id};
use crate::{
    error::ApiResult,
    extract::{Auth, Body},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/directory/room/{alias}", get(resolve).put(create).delete(delete))
        .route("/rooms/{room_id}/aliases", get(room_aliases))
        .route(
            "/directory/list/room/{room_id}",
            get(get_visibility).put(set_visibility),
        )
        .route(
            "/directory/list/appservice/{network_id}/{room_id}",
            put(set_service_visibility),
        )
        .route("/publicRooms", get(public_rooms_get).post(public_rooms_post))
}

async fn resolve(State(hs): State<Arc<Homeserver>>, Path(raw): Path<String>) -> ApiResult<Json<Value>> {
    let (room_id, servers) = hs.lookup_alias(&alias(&raw)?).await?;
    Ok(Json(json!({ "room_id": room_id, "servers": servers })))
}

#[derive(Deserialize)]
struct CreateBody {
    room_id: OwnedRoomId,
}

async fn create(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<CreateBody>,
) -> ApiResult<Json<Value>> {
    let alias = alias(&raw)?;
    let privileged = hs.alias_rights(&session, alias.as_str(), AliasAction::Create)?;
    hs.rooms
        .create_alias(&alias, &body.room_id, &session.user_id, privileged)
        .await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let alias = alias(&raw)?;
    let privileged = hs.alias_rights(&session, alias.as_str(), AliasAction::Delete)?;
    hs.rooms
        .delete_alias(&alias, &session.user_id, privileged)
        .await?;
    Ok(Json(json!({})))
}

async fn room_aliases(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&raw)?;
    hs.rooms.visible_until(&room, &session.user_id).await?;
    Ok(Json(json!({ "aliases": hs.rooms.aliases(&room).await? })))
}

async fn get_visibility(
    State(hs): State<Arc<Homeserver>>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let published = hs.rooms.is_published(&room_id(&raw)?).await?;
    Ok(Json(
        json!({ "visibility": if published { "public" } else { "private" } }),
    ))
}

#[derive(Deserialize)]
struct VisibilityBody {
    visibility: String,
}

fn wants_public(body: &VisibilityBody) -> Result<bool, Error> {
    match body.visibility.as_str() {
        "public" => Ok(true),
        "private" => Ok(false),
        other => Err(Error::InvalidParam(format!(
            "visibility must be public or private, not `{other}`"
        ))),
    }
}

/// Publishing needs the power to change the room's canonical alias (or server admin).
async fn set_visibility(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(raw): Path<String>,
    Body(body): Body<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&raw)?;
    let allowed = session.is_admin
        || hs
            .rooms
            .may_send_state(
                &room,
                &session.user_id,
                &ruma::events::StateEventType::RoomCanonicalAlias,
            )
            .await?;
    if !allowed {
        return Err(
            Error::Forbidden("You may not change this room's directory visibility".to_owned()).into(),
        );
    }
    let instance = wants_public(&body)?.then_some("");
    hs.rooms.set_published(&room, instance).await?;
    Ok(Json(json!({})))
}

/// An application service publishes a room in its network's list (`<as_id>|<network_id>`).
async fn set_service_visibility(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((network, raw)): Path<(String, String)>,
    Body(body): Body<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let service = session
        .appservice
        .ok_or_else(|| Error::Forbidden("Only application services have network directories".to_owned()))?;
    let room = room_id(&raw)?;
    let instance = format!("{}|{network}", service.id());
    // A service manages its own network's list only: it cannot take a room out of the main
    // directory or out of another service's list.
    if hs
        .store
        .room_publication(room.as_str())
        .await?
        .is_some_and(|current| current != instance)
    {
        return Err(Error::Forbidden("The room is published elsewhere in the directory".to_owned()).into());
    }
    hs.rooms
        .set_published(&room, wants_public(&body)?.then_some(instance.as_str()))
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
struct PublicRoomsQuery {
    limit: Option<usize>,
    since: Option<String>,
    /// Another server's list, asked over federation.
    server: Option<String>,
}

#[derive(Deserialize, Default)]
struct ServerQuery {
    server: Option<String>,
}

/// The `server` of a `/publicRooms` request, when it names another server.
fn remote(
    hs: &Homeserver,
    server: Option<&str>,
) -> Result<Option<ruma::OwnedServerName>, switchboard_core::Error> {
    let Some(server) = server else {
        return Ok(None);
    };
    let server = ruma::OwnedServerName::try_from(server)
        .map_err(|e| switchboard_core::Error::InvalidParam(format!("invalid server name {server}: {e}")))?;
    Ok((server != hs.server_name).then_some(server))
}

/// The body of `POST /publicRooms`, on the client and the federation API alike.
#[derive(Deserialize, Default)]
pub(crate) struct PublicRoomsBody {
    pub(crate) limit: Option<usize>,
    pub(crate) since: Option<String>,
    filter: Option<SearchFilter>,
    #[serde(default)]
    include_all_networks: bool,
    third_party_instance_id: Option<String>,
}

impl PublicRoomsBody {
    pub(crate) fn listing(&self) -> Listing<'_> {
        match (&self.third_party_instance_id, self.include_all_networks) {
            (Some(instance), _) => Listing::Instance(instance),
            (None, true) => Listing::All,
            (None, false) => Listing::Main,
        }
    }

    pub(crate) fn search(&self) -> Option<&str> {
        self.filter
            .as_ref()
            .and_then(|f| f.generic_search_term.as_deref())
    }
}

#[derive(Deserialize, Default)]
struct SearchFilter {
    generic_search_term: Option<String>,
}

pub(crate) fn directory_json(page: switchboard_core::rooms::PublicRooms) -> Value {
    let mut body = json!({ "chunk": page.chunk, "total_room_count_estimate": page.total });
    if let Some(next) = page.next_batch {
        body["next_batch"] = json!(next);
    }
    if let Some(prev) = page.prev_batch {
        body["prev_batch"] = json!(prev);
    }
    body
}

async fn public_rooms_get(
    State(hs): State<Arc<Homeserver>>,
    crate::extract::Params(query): crate::extract::Params<PublicRoomsQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(server) = remote(&hs, query.server.as_deref())? {
        let list = hs
            .remote_public_rooms(&server, query.limit, query.since.as_deref(), None, None)
            .await?;
        return Ok(Json(list));
    }
    let page = hs
        .rooms
        .public_rooms(Listing::Main, None, query.limit, query.since.as_deref())
        .await?;
    Ok(Json(directory_json(page)))
}

async fn public_rooms_post(
    State(hs): State<Arc<Homeserver>>,
    _auth: Auth,
    crate::extract::Params(query): crate::extract::Params<ServerQuery>,
    Body(body): Body<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    if let Some(server) = remote(&hs, query.server.as_deref())? {
        let network = match body.listing() {
            Listing::Instance(instance) => Some(Some(instance)),
            Listing::All => Some(None),
            Listing::Main => None,
        };
        let list = hs
            .remote_public_rooms(&server, body.limit, body.since.as_deref(), body.search(), network)
            .await?;
        return Ok(Json(list));
    }
    let page = hs
        .rooms
        .public_rooms(body.listing(), body.search(), body.limit, body.since.as_deref())
        .await?;
    Ok(Json(directory_json(page)))
}
