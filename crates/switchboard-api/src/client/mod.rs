//! The Client-Server API, served under both `/_matrix/client/v3` and the legacy `/r0` prefix.

mod account;
mod appservice;
mod backup;
mod devices;
mod directory;
pub(crate) use directory::{PublicRoomsBody, directory_json};
mod ephemeral;
mod events;
mod keys;
mod profile;
mod push;
mod rooms;
mod sync;
mod thirdparty;
mod versions;

use std::sync::Arc;

use axum::Router;
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId};
use switchboard_core::{Error, Homeserver};

/// Path parameters: Matrix IDs, parsed with `M_INVALID_PARAM` for malformed ones.
pub(crate) fn room_id(raw: &str) -> Result<OwnedRoomId, Error> {
    OwnedRoomId::try_from(raw).map_err(|e| Error::InvalidParam(format!("invalid room ID {raw}: {e}")))
}

pub(crate) fn user_id(raw: &str) -> Result<OwnedUserId, Error> {
    switchboard_core::util::parse_user_id(raw).map_err(Error::InvalidParam)
}

pub(crate) fn alias(raw: &str) -> Result<OwnedRoomAliasId, Error> {
    OwnedRoomAliasId::try_from(raw).map_err(|e| Error::InvalidParam(format!("invalid room alias {raw}: {e}")))
}

pub(crate) fn router() -> Router<Arc<Homeserver>> {
    let api = Router::new()
        .merge(account::routes())
        .merge(rooms::routes())
        .merge(events::routes())
        .merge(directory::routes())
        .merge(sync::routes())
        .merge(profile::routes())
        .merge(devices::routes())
        .merge(ephemeral::routes())
        .merge(keys::routes())
        .merge(backup::routes())
        .merge(push::routes())
        .merge(thirdparty::routes());
    Router::new()
        .merge(versions::routes())
        .merge(sync::sliding_routes())
        .merge(appservice::routes())
        .merge(events::v1_routes())
        .nest("/_matrix/client/v3", api.clone())
        .nest("/_matrix/client/r0", api)
}
