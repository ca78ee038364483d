//! PDUs arriving from other servers, with the gaps before them filled: a PDU whose
//! `prev_events` this server lacks makes it ask the sender for what lies between its own
//! forward extremities and that PDU (`/get_missing_events`), and take those first.

use std::collections::HashSet;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, ServerName, UInt,
    api::federation::event::get_missing_events,
    events::{StateEventType, room::server_acl::RoomServerAclEventContent},
};

use crate::{Error, Homeserver, Result, rooms::Received};

/// At most this many missing events are fetched before one PDU (Synapse asks for 10).
const MISSING_LIMIT: u32 = 10;

impl Homeserver {
    /// The PDUs of a transaction from `origin` for one room, in order: one verdict each (see
    /// [`crate::rooms::Rooms::receive_pdus`]). A gap before them is filled first.
    pub async fn receive_pdus_from(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        objects: Vec<CanonicalJsonObject>,
    ) -> Result<Vec<Result<Received>>> {
        self.check_server_acl(origin, room_id).await?;
        if let Some(event_id) = self.first_after_gap(room_id, &objects).await? {
            self.fill_gap(origin, room_id, event_id).await;
        }
        self.rooms
            .receive_pdus(room_id, objects, &self.federation.keys)
            .await
    }

    /// The first PDU naming a predecessor that is neither stored nor earlier in the batch.
    async fn first_after_gap(
        &self,
        room_id: &RoomId,
        objects: &[CanonicalJsonObject],
    ) -> Result<Option<OwnedEventId>> {
        let mut earlier: HashSet<OwnedEventId> = HashSet::new();
        for object in objects {
            let Ok(event_id) = self.rooms.pdu_event_id(room_id, object).await else {
                continue;
            };
            let prev_events = match object.get("prev_events") {
                Some(CanonicalJsonValue::Array(ids)) => ids.as_slice(),
                _ => &[],
            };
            for id in prev_events {
                let CanonicalJsonValue::String(id) = id else {
                    continue;
                };
                let Ok(id) = OwnedEventId::try_from(id.as_str()) else {
                    continue;
                };
                if !earlier.contains(&id) && self.rooms.event(id.as_str()).await?.is_none() {
                    return Ok(Some(event_id));
                }
            }
            earlier.insert(event_id);
        }
        Ok(None)
    }

    /// Fetches and takes what lies between this server's extremities and `latest`; failures
    /// only mean the gap stays (the PDU itself is still judged on its own auth events).
    async fn fill_gap(&self, origin: &ServerName, room_id: &RoomId, latest: OwnedEventId) {
        let Ok(earliest) = self.rooms.extremities(room_id).await else {
            return;
        };
        let mut request = get_missing_events::v1::Request::new(room_id.to_owned(), earliest, vec![latest]);
        request.limit = UInt::from(MISSING_LIMIT);
        let events = match self.federation.client.send(origin, request).await {
            Ok(response) => response.events,
            Err(e) => {
                tracing::info!(%origin, %room_id, error = %e, "cannot fetch missing events");
                return;
            }
        };
        let mut objects: Vec<CanonicalJsonObject> = events
            .iter()
            .filter_map(|raw| serde_json::from_str(raw.get()).ok())
            .collect();
        objects.sort_by_key(|o| match o.get("depth") {
            Some(CanonicalJsonValue::Integer(d)) => i64::from(*d),
            _ => 0,
        });
        match self
            .rooms
            .receive_pdus(room_id, objects, &self.federation.keys)
            .await
        {
            Ok(verdicts) => {
                for e in verdicts.into_iter().filter_map(Result::err) {
                    tracing::info!(%origin, %room_id, error = %e, "a missing event was refused");
                }
            }
            Err(e) => tracing::info!(%origin, %room_id, error = %e, "missing events not stored"),
        }
    }

    /// The room's `m.room.server_acl`: a server it denies is answered `403` in everything
    /// concerning the room, and its PDUs are dropped.
    pub async fn check_server_acl(&self, server: &ServerName, room_id: &RoomId) -> Result<()> {
        let acl = match self
            .rooms
            .state_event(room_id, &StateEventType::RoomServerAcl, "")
            .await
        {
            Ok(acl) => acl,
            // Rooms this server does not know have no ACL here.
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(acl) = acl else {
            return Ok(());
        };
        match serde_json::from_str::<RoomServerAclEventContent>(acl.content.get()) {
            Ok(content) if !content.is_allowed(server) => Err(Error::Forbidden(format!(
                "Server {server} is banned from room {room_id}"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `server` may read the room's events: the room's ACL allows it, and it has a
    /// member there or the room's history is world-readable.
    pub async fn server_may_see(&self, server: &ServerName, room_id: &RoomId) -> Result<()> {
        self.check_server_acl(server, room_id).await?;
        if self
            .rooms
            .joined_servers(room_id)
            .await?
            .iter()
            .any(|s| s == server)
        {
            return Ok(());
        }
        let visibility = self
            .rooms
            .state_event(room_id, &StateEventType::RoomHistoryVisibility, "")
            .await?
            .and_then(|e| {
                e.content_value()["history_visibility"]
                    .as_str()
                    .map(str::to_owned)
            });
        if visibility.as_deref() == Some("world_readable") {
            return Ok(());
        }
        Err(Error::Forbidden(format!("{server} is not in {room_id}")))
    }
}
