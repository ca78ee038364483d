//! The public room directory (`/publicRooms`, `/directory/list/room`), including the per-network
//! lists application services publish rooms in.

use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId, events::StateEventType};
use serde_json::{Value, json};

use super::Rooms;
use crate::{Error, Result};

/// What to list: the main directory, one service's network, or everything.
pub enum Listing<'a> {
    Main,
    Instance(&'a str),
    All,
}

pub struct PublicRooms {
    pub chunk: Vec<Value>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total: usize,
}

impl Rooms {
    pub async fn set_published(&self, room_id: &RoomId, instance: Option<&str>) -> Result<()> {
        self.handle(room_id).await?;
        match instance {
            Some(instance) => self.store.publish_room(room_id.as_str(), instance).await?,
            None => self.store.unpublish_room(room_id.as_str()).await?,
        }
        Ok(())
    }

    pub async fn is_published(&self, room_id: &RoomId) -> Result<bool> {
        self.handle(room_id).await?;
        Ok(self.store.room_publication(room_id.as_str()).await?.is_some())
    }

    /// One page of the directory, biggest rooms first, optionally filtered by a search term.
    pub async fn public_rooms(
        self: &Arc<Self>,
        listing: Listing<'_>,
        search: Option<&str>,
        limit: Option<usize>,
        since: Option<&str>,
    ) -> Result<PublicRooms> {
        let offset = match since {
            Some(token) => token
                .strip_prefix('o')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::InvalidParam(format!("invalid directory token `{token}`")))?,
            None => 0,
        };
        let needle = search.map(str::to_lowercase).filter(|s| !s.is_empty());
        let mut entries = Vec::new();
        for (room, instance) in self.store.published_rooms().await? {
            let listed = match listing {
                Listing::Main => instance.is_empty(),
                Listing::Instance(wanted) => instance == wanted,
                Listing::All => true,
            };
            if !listed {
                continue;
            }
            let Ok(room_id) = OwnedRoomId::try_from(room) else {
                continue;
            };
            let entry = self.directory_entry(&room_id).await?;
            if let Some(needle) = &needle {
                let text = ["name", "topic", "canonical_alias"]
                    .iter()
                    .filter_map(|k| entry[*k].as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_lowercase();
                if !text.contains(needle.as_str()) {
                    continue;
                }
            }
            entries.push(entry);
        }
        entries.sort_by(|a, b| {
            b["num_joined_members"]
                .as_u64()
                .cmp(&a["num_joined_members"].as_u64())
                .then_with(|| a["room_id"].as_str().cmp(&b["room_id"].as_str()))
        });
        let total = entries.len();
        let limit = limit.unwrap_or(total.max(1)).clamp(1, 500);
        let chunk: Vec<Value> = entries.into_iter().skip(offset).take(limit).collect();
        let next_batch = (offset + chunk.len() < total).then(|| format!("o{}", offset + chunk.len()));
        let prev_batch = (offset > 0).then(|| format!("o{}", offset.saturating_sub(limit)));
        Ok(PublicRooms {
            chunk,
            next_batch,
            prev_batch,
            total,
        })
    }

    async fn directory_entry(&self, room_id: &RoomId) -> Result<Value> {
        let state = |kind: StateEventType| async move { self.state_event(room_id, &kind, "").await };
        let field = |event: Option<Arc<crate::pdu::Pdu>>, key: &str| {
            event
                .and_then(|e| e.content_value().get(key).cloned())
                .unwrap_or(Value::Null)
        };
        let join_rule = field(state(StateEventType::RoomJoinRules).await?, "join_rule");
        let history = field(
            state(StateEventType::RoomHistoryVisibility).await?,
            "history_visibility",
        );
        let guest = field(state(StateEventType::RoomGuestAccess).await?, "guest_access");
        let room_type = field(state(StateEventType::RoomCreate).await?, "type");
        let mut entry = json!({
            "room_id": room_id,
            "num_joined_members": self.members_with(room_id, "join").await?.len(),
            "world_readable": history == "world_readable",
            "guest_can_join": guest == "can_join",
            "join_rule": join_rule,
        });
        for (kind, key, out) in [
            (StateEventType::RoomName, "name", "name"),
            (StateEventType::RoomTopic, "topic", "topic"),
            (StateEventType::RoomCanonicalAlias, "alias", "canonical_alias"),
            (StateEventType::RoomAvatar, "url", "avatar_url"),
        ] {
            let value = field(state(kind).await?, key);
            if !value.is_null() {
                entry[out] = value;
            }
        }
        if !room_type.is_null() {
            entry["room_type"] = room_type;
        }
        Ok(entry)
    }
}
