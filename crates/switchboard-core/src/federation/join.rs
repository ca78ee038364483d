//! A local user joining a room that lives on other servers: `make_join` for a template,
//! sign it here, `send_join` with it, and take the room's state from the answer.

use std::sync::Arc;

use ruma::{
    OwnedServerName, RoomId, RoomVersionId, UserId,
    api::federation::membership::{create_join_event, prepare_join_event},
};

use crate::{
    Error, Homeserver, Result,
    pdu::{JOINABLE_ROOM_VERSIONS, Pdu, RoomVersion},
};

impl Homeserver {
    /// Joins a local user to a room: through this server's own pipeline when it knows the room,
    /// otherwise through the first of `servers` (and the room ID's own server) that lets them in.
    pub async fn join_room(
        &self,
        user: &UserId,
        room_id: &RoomId,
        servers: &[OwnedServerName],
    ) -> Result<Arc<Pdu>> {
        if self.rooms.is_resident(room_id).await? {
            let displayname = self.accounts.displayname(user).await?;
            return self.rooms.join(room_id, user, displayname.as_deref()).await;
        }
        let mut servers = servers.to_vec();
        // An invite names a server that is surely in the room: the inviter's.
        if let Ok(Some(invite)) = self
            .rooms
            .state_event(room_id, &ruma::events::StateEventType::RoomMember, user.as_str())
            .await
        {
            servers.insert(0, invite.sender.server_name().to_owned());
        }
        if let Some(server) = room_id.server_name() {
            servers.push(server.to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        servers.retain(|s| seen.insert(s.clone()));
        self.join_remote(user, room_id, &servers).await
    }

    /// Joins `user` to `room_id` through the first of `servers` that lets them in.
    pub async fn join_remote(
        &self,
        user: &UserId,
        room_id: &RoomId,
        servers: &[OwnedServerName],
    ) -> Result<Arc<Pdu>> {
        let mut last_error = Error::NotFound(format!("No server could be asked to join {room_id}"));
        for server in servers.iter().filter(|s| **s != self.server_name) {
            match self.join_through(user, room_id, server).await {
                Ok(pdu) => return Ok(pdu),
                Err(e) => {
                    tracing::info!(%room_id, %server, error = %e, "remote join failed");
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    async fn join_through(
        &self,
        user: &UserId,
        room_id: &RoomId,
        server: &OwnedServerName,
    ) -> Result<Arc<Pdu>> {
        let client = &self.federation.client;
        let mut request = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
        request.ver = JOINABLE_ROOM_VERSIONS
            .iter()
            .filter_map(|v| RoomVersionId::try_from(*v).ok())
            .collect();
        let template = client.send(server, request).await?;
        let version_id = template
            .room_version
            .ok_or_else(|| Error::BadGateway(format!("{server} named no room version")))?;
        let version = RoomVersion::joinable(version_id.as_str()).map_err(|_| {
            Error::UnsupportedRoomVersion(format!("this server cannot join rooms of version {version_id}"))
        })?;
        let profile = self.local_profile(user).await?;
        let mut content = serde_json::json!({});
        if let Some(name) = profile.displayname {
            content["displayname"] = name.into();
        }
        if let Some(url) = profile.avatar_url {
            content["avatar_url"] = url.into();
        }
        let (event_id, event, pdu) = self.sign_template(
            server,
            template.event.get(),
            &version,
            (user, room_id),
            "join",
            content,
        )?;
        let request = create_join_event::v2::Request::new(room_id.to_owned(), event_id, pdu);
        let answer = client.send(server, request).await?.room_state;
        // A restricted join comes back signed by the resident server too.
        let join = match answer.event {
            Some(signed) => serde_json::from_str(signed.get()).map_err(|e| {
                Error::BadGateway(format!("{server}'s signed join is not canonical JSON: {e}"))
            })?,
            None => event,
        };
        self.rooms
            .import_joined_room(
                room_id,
                version,
                join,
                answer.state,
                answer.auth_chain,
                &self.federation.keys,
            )
            .await
    }
}

impl Homeserver {
    /// Another server's public room list (`server` in `/publicRooms`), in the client format.
    pub async fn remote_public_rooms(
        &self,
        server: &ruma::ServerName,
        limit: Option<usize>,
        since: Option<&str>,
        search: Option<&str>,
        network: Option<Option<&str>>,
    ) -> Result<serde_json::Value> {
        use ruma::{api::federation::directory::get_public_rooms_filtered, directory::RoomNetwork};
        let mut request = get_public_rooms_filtered::v1::Request::new();
        request.limit = limit.and_then(|l| ruma::UInt::try_from(l as u64).ok());
        request.since = since.map(str::to_owned);
        request.filter.generic_search_term = search.map(str::to_owned);
        request.room_network = match network {
            None => RoomNetwork::Matrix,
            Some(None) => RoomNetwork::All,
            Some(Some(instance)) => RoomNetwork::ThirdParty(instance.to_owned()),
        };
        let response = self.federation.client.send(server, request).await?;
        let mut body = serde_json::json!({
            "chunk": response.chunk,
            "total_room_count_estimate": response.total_room_count_estimate,
        });
        if let Some(next) = response.next_batch {
            body["next_batch"] = next.into();
        }
        if let Some(prev) = response.prev_batch {
            body["prev_batch"] = prev.into();
        }
        Ok(body)
    }
}
