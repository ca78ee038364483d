//! Which events a service receives — Synapse's rules (`is_interested_in_event`):
//! the sender or a member event's target is the service's sender or in its users namespace; the
//! room ID matches its rooms namespace; a local alias of the room matches its aliases namespace;
//! or a local joined member of the room is in its users namespace. Room-level answers are cached
//! per room and recomputed when the room's members or aliases change, so the hot path reads no
//! database.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, RoomId, events::TimelineEventType};

use super::AppService;
use crate::{Result, pdu::Pdu, rooms::Rooms};

/// The per-room facts interest depends on: local joined members and local aliases.
#[derive(Debug, Default)]
pub struct RoomAudience {
    pub local_joined: Vec<String>,
    pub aliases: Vec<String>,
}

/// One service's cached room-level interest.
#[derive(Default)]
pub struct InterestCache {
    rooms: Mutex<HashMap<OwnedRoomId, (Arc<RoomAudience>, bool)>>,
}

impl InterestCache {
    /// Forgets every answer (the service's namespaces changed).
    pub fn clear(&self) {
        if let Ok(mut rooms) = self.rooms.lock() {
            rooms.clear();
        }
    }

    pub async fn is_interested(&self, service: &AppService, rooms: &Rooms, event: &Pdu) -> Result<bool> {
        if service.owns_user(event.sender.as_str()) {
            return Ok(true);
        }
        if event.kind == TimelineEventType::RoomMember
            && event
                .state_key
                .as_deref()
                .is_some_and(|target| service.owns_user(target))
        {
            return Ok(true);
        }
        self.is_interested_in_room(service, rooms, &event.room_id).await
    }

    /// The room-level rules: room ID, local aliases, local joined members.
    pub async fn is_interested_in_room(
        &self,
        service: &AppService,
        rooms: &Rooms,
        room_id: &RoomId,
    ) -> Result<bool> {
        if service.rooms.matches(room_id.as_str()) {
            return Ok(true);
        }
        let audience = rooms.audience(room_id).await?;
        if let Ok(cache) = self.rooms.lock()
            && let Some((cached, answer)) = cache.get(room_id)
            && Arc::ptr_eq(cached, &audience)
        {
            return Ok(*answer);
        }
        let answer = audience.aliases.iter().any(|a| service.aliases.matches(a))
            || audience.local_joined.iter().any(|u| service.owns_user(u));
        if let Ok(mut cache) = self.rooms.lock() {
            cache.insert(room_id.to_owned(), (audience, answer));
        }
        Ok(answer)
    }
}
