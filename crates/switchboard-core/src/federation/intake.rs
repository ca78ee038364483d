//! PDUs arriving from other servers, with the gaps before them filled: a PDU whose
//! `prev_events` this server lacks makes it ask the sender for what lies between its own
//! forward extremities and that PDU (`/get_missing_events`), and take those first.

use std::collections::{HashMap, HashSet};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, ServerName, UInt,
    api::federation::event::get_missing_events,
    events::{StateEventType, room::server_acl::RoomServerAclEventContent},
};

use crate::{Error, Homeserver, Result, rooms::Received};

/// Missing events asked for at a time (Synapse asks for 10 and answers at most 20; a peer back
/// from an outage may leave a longer gap), and how many times a gap is asked about before the
/// PDU after it is taken anyway.
const MISSING_LIMIT: u32 = 100;
const MISSING_ROUNDS: usize = 20;

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
        // Joins of other servers' users who were not joined before (not profile changes).
        let mut joining = joining_users(&objects);
        for user in joining.iter_mut() {
            if let Some(who) = user
                && (who.server_name() == self.server_name
                    || self.rooms.membership(room_id, who).await?.as_deref() == Some("join"))
            {
                *user = None;
            }
        }
        let verdicts = self
            .rooms
            .receive_pdus(room_id, objects, &self.federation.keys)
            .await?;
        // A user who comes (back) into a room with this server's users may have changed devices
        // while no update reached here: a kept list of theirs is fetched again before use.
        for (user, verdict) in joining.into_iter().zip(&verdicts) {
            if let (Some(user), Ok(Received::Accepted(_))) = (user, verdict) {
                self.store.mark_remote_device_list_stale(user.as_str()).await?;
            }
        }
        Ok(verdicts)
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
            for id in prev_events(object) {
                if !earlier.contains(&id) && self.rooms.event(id.as_str()).await?.is_none() {
                    return Ok(Some(event_id));
                }
            }
            earlier.insert(event_id);
        }
        Ok(None)
    }

    /// Fetches and takes what lies between this server's extremities and `latest`, asking
    /// again from the oldest events fetched until the gap closes (a peer back from an outage
    /// sends its latest events first), at most [`MISSING_ROUNDS`] times. Failures only mean
    /// the gap stays (the PDU itself is still judged on its own auth events).
    async fn fill_gap(&self, origin: &ServerName, room_id: &RoomId, latest: OwnedEventId) {
        let Ok(earliest) = self.rooms.extremities(room_id).await else {
            return;
        };
        let mut fetched: HashMap<OwnedEventId, CanonicalJsonObject> = HashMap::new();
        let mut wanted = vec![latest];
        for _ in 0..MISSING_ROUNDS {
            let mut request =
                get_missing_events::v1::Request::new(room_id.to_owned(), earliest.clone(), wanted);
            request.limit = UInt::from(MISSING_LIMIT);
            let events = match self.federation.client.send(origin, request).await {
                Ok(response) => response.events,
                Err(e) => {
                    tracing::info!(%origin, %room_id, error = %e, "cannot fetch missing events");
                    break;
                }
            };
            let mut new = Vec::new();
            for raw in &events {
                let Ok(object) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else {
                    continue;
                };
                let Ok(id) = self.rooms.pdu_event_id(room_id, &object).await else {
                    continue;
                };
                if let std::collections::hash_map::Entry::Vacant(slot) = fetched.entry(id.clone()) {
                    slot.insert(object);
                    new.push(id);
                }
            }
            // Ask on from the fetched events whose predecessors are still unknown.
            wanted = Vec::new();
            for id in new {
                let mut open = false;
                for prev in prev_events(&fetched[&id]) {
                    if !fetched.contains_key(&prev)
                        && matches!(self.rooms.event(prev.as_str()).await, Ok(None))
                    {
                        open = true;
                    }
                }
                if open {
                    wanted.push(id);
                }
            }
            if wanted.is_empty() {
                break;
            }
        }
        let mut objects: Vec<CanonicalJsonObject> = fetched.into_values().collect();
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

/// The `prev_events` a PDU names (those that are event IDs).
fn prev_events(object: &CanonicalJsonObject) -> Vec<OwnedEventId> {
    match object.get("prev_events") {
        Some(CanonicalJsonValue::Array(ids)) => ids
            .iter()
            .filter_map(|v| match v {
                CanonicalJsonValue::String(id) => OwnedEventId::try_from(id.as_str()).ok(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// For each PDU, the user it makes join, if it is a join.
fn joining_users(objects: &[CanonicalJsonObject]) -> Vec<Option<ruma::OwnedUserId>> {
    objects
        .iter()
        .map(|object| {
            let is_member =
                matches!(object.get("type"), Some(CanonicalJsonValue::String(t)) if t == "m.room.member");
            let joins = matches!(
                object.get("content"),
                Some(CanonicalJsonValue::Object(content))
                    if matches!(content.get("membership"), Some(CanonicalJsonValue::String(m)) if m == "join")
            );
            match object.get("state_key") {
                Some(CanonicalJsonValue::String(user)) if is_member && joins => {
                    ruma::OwnedUserId::try_from(user.as_str()).ok()
                }
                _ => None,
            }
        })
        .collect()
}
