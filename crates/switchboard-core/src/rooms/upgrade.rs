//! `POST /rooms/{roomId}/upgrade`: a new room of another version takes over from the old one —
//! its state copied, its local aliases moved, a tombstone pointing at it, and the old room made
//! read-only for ordinary members (Synapse's procedure).

use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId, UserId, events::StateEventType};
use serde_json::{Map, Value, json};

use super::{CreateRoom, EventDraft, Rooms, create::InitialState, pipeline::detached};
use crate::{Error, Result};

/// State carried into the replacement room (create, members and power levels are made anew).
const COPIED_STATE: &[&str] = &[
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];

impl Rooms {
    pub async fn upgrade(
        self: &Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        displayname: Option<&str>,
        new_version: &str,
    ) -> Result<OwnedRoomId> {
        let this = self.clone();
        let (room_id, user) = (room_id.to_owned(), user.to_owned());
        let (displayname, new_version) = (displayname.map(str::to_owned), new_version.to_owned());
        detached(async move {
            this.upgrade_now(&room_id, &user, displayname.as_deref(), &new_version)
                .await
        })
        .await
    }

    async fn upgrade_now(
        self: &Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        displayname: Option<&str>,
        new_version: &str,
    ) -> Result<OwnedRoomId> {
        crate::pdu::RoomVersion::parse(new_version)?;
        self.require_joined(room_id, user).await?;
        if !self
            .may_send_state(room_id, user, &StateEventType::RoomTombstone)
            .await?
        {
            return Err(Error::Forbidden(
                "You don't have permission to upgrade the room".to_owned(),
            ));
        }
        let state = self.current_state(room_id).await?;
        let content_of = |kind: &str| {
            state
                .iter()
                .find(|e| e.event_type == kind && e.state_key.as_deref() == Some(""))
                .map(|e| e.content_value())
        };
        let old_create = content_of("m.room.create").unwrap_or_default();
        let mut creation = Map::new();
        for key in ["type", "m.federate"] {
            if let Some(value) = old_create.get(key) {
                creation.insert(key.to_owned(), value.clone());
            }
        }
        let last_event = self
            .store
            .room_head(room_id.as_str())
            .await?
            .map(|(id, _)| id)
            .unwrap_or_default();
        creation.insert(
            "predecessor".to_owned(),
            json!({ "room_id": room_id, "event_id": last_event }),
        );
        let initial_state = COPIED_STATE
            .iter()
            .filter_map(|kind| {
                content_of(kind).map(|content| InitialState {
                    kind: (*kind).to_owned(),
                    state_key: String::new(),
                    content,
                })
            })
            .collect();
        let power_levels = content_of("m.room.power_levels").and_then(|v| v.as_object().cloned());
        let request = CreateRoom {
            room_version: Some(new_version.to_owned()),
            creation_content: Some(creation),
            initial_state,
            power_level_content_override: power_levels.clone(),
            preset: Some("private_chat".to_owned()),
            ..Default::default()
        };
        let (new_room, _) = self.create_room_inner(user, displayname, request).await?;

        // Point the old room at the new one, and quiet it for everyone without power.
        let tombstone = json!({ "body": "This room has been replaced", "replacement_room": new_room });
        self.send(
            room_id,
            user,
            EventDraft::state("m.room.tombstone", "", tombstone),
            None,
        )
        .await?;
        if let Some(mut levels) = power_levels.map(Value::Object) {
            let users_default = levels.get("users_default").and_then(Value::as_i64).unwrap_or(0);
            let restricted = 50.max(users_default + 1);
            for key in ["events_default", "invite"] {
                let current = levels.get(key).and_then(Value::as_i64).unwrap_or(0);
                levels[key] = json!(current.max(restricted));
            }
            if let Err(e) = self
                .send(
                    room_id,
                    user,
                    EventDraft::state("m.room.power_levels", "", levels),
                    None,
                )
                .await
            {
                tracing::warn!(%room_id, error = %e, "could not restrict the upgraded room");
            }
        }
        // Local aliases follow the room.
        for alias in self.store.room_aliases(room_id.as_str()).await? {
            let (_, creator) = self.store.alias(&alias).await?.unwrap_or_default();
            self.store.delete_alias(&alias).await?;
            self.store
                .create_alias(&alias, new_room.as_str(), &creator)
                .await?;
        }
        if let Some(canonical) = content_of("m.room.canonical_alias") {
            let draft = EventDraft::state("m.room.canonical_alias", "", canonical);
            if let Err(e) = self.send(&new_room, user, draft, None).await {
                tracing::warn!(%new_room, error = %e, "could not carry the canonical alias over");
            }
        }
        self.audience_changed(room_id);
        self.audience_changed(&new_room);
        tracing::info!(old = %room_id, new = %new_room, version = new_version, "room upgraded");
        Ok(new_room)
    }
}
