//! `POST /createRoom`: the initial events of a room, in the order Synapse sends them.

use std::sync::Arc;

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::{EventDraft, RoomHandle, RoomInner, Rooms, StateMap, pipeline::detached};
use crate::{Error, Result, pdu::RoomVersion, util::random_string};

/// The request body of `/createRoom`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateRoom {
    pub visibility: Option<String>,
    pub room_alias_name: Option<String>,
    pub name: Option<String>,
    pub topic: Option<String>,
    #[serde(deserialize_with = "crate::util::de_user_ids")]
    pub invite: Vec<OwnedUserId>,
    pub room_version: Option<String>,
    pub creation_content: Option<Map<String, Value>>,
    pub initial_state: Vec<InitialState>,
    pub preset: Option<String>,
    pub is_direct: bool,
    pub power_level_content_override: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct InitialState {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub state_key: String,
    pub content: Value,
}

impl Rooms {
    /// Creates a room with its initial events, stored atomically: a request that fails (a bad
    /// `initial_state`, an override the auth rules refuse, a taken alias) leaves no room behind.
    pub async fn create_room(
        self: &Arc<Self>,
        creator: &UserId,
        displayname: Option<&str>,
        request: CreateRoom,
    ) -> Result<(OwnedRoomId, Option<OwnedRoomAliasId>)> {
        let this = self.clone();
        let (creator, displayname) = (creator.to_owned(), displayname.map(str::to_owned));
        detached(async move {
            this.create_room_inner(&creator, displayname.as_deref(), request)
                .await
        })
        .await
    }

    pub(super) async fn create_room_inner(
        self: &Arc<Self>,
        creator: &UserId,
        displayname: Option<&str>,
        request: CreateRoom,
    ) -> Result<(OwnedRoomId, Option<OwnedRoomAliasId>)> {
        let version = RoomVersion::parse(request.room_version.as_deref().unwrap_or(&self.default_version))?;
        let public = request.visibility.as_deref() == Some("public");
        let preset = request.preset.clone().unwrap_or_else(|| {
            if public {
                "public_chat".to_owned()
            } else {
                "private_chat".to_owned()
            }
        });
        let (join_rule, guest_access) = match preset.as_str() {
            "public_chat" => ("public", None),
            "private_chat" | "trusted_private_chat" => ("invite", Some("can_join")),
            other => return Err(Error::BadJson(format!("unknown preset `{other}`"))),
        };
        let alias = match &request.room_alias_name {
            Some(name) => Some(self.local_alias(name)?),
            None => None,
        };
        for user in &request.invite {
            self.require_local_user(user).await?;
        }
        let room_id = OwnedRoomId::try_from(format!("!{}:{}", random_string(18), self.server_name))
            .map_err(Error::internal)?;

        let mut create = request.creation_content.clone().unwrap_or_default();
        create.insert("room_version".to_owned(), json!(version.id));
        if !version.rules.authorization.use_room_create_sender {
            create.insert("creator".to_owned(), json!(creator));
        }
        // `initial_state` replaces the preset's events of the same type and key, as in Synapse.
        let overridden = |kind: &str| {
            request
                .initial_state
                .iter()
                .any(|s| s.kind == kind && s.state_key.is_empty())
        };
        let mut events = vec![
            EventDraft::state("m.room.create", "", Value::Object(create)),
            EventDraft::state(
                "m.room.member",
                creator.as_str(),
                member_content("join", displayname, false),
            ),
            EventDraft::state(
                "m.room.power_levels",
                "",
                power_levels(creator, &request, &preset),
            ),
        ];
        if let Some(alias) = &alias {
            events.push(EventDraft::state(
                "m.room.canonical_alias",
                "",
                json!({ "alias": alias }),
            ));
        }
        let mut preset_state = vec![
            ("m.room.join_rules", json!({ "join_rule": join_rule })),
            (
                "m.room.history_visibility",
                json!({ "history_visibility": "shared" }),
            ),
        ];
        if let Some(guest_access) = guest_access {
            preset_state.push(("m.room.guest_access", json!({ "guest_access": guest_access })));
        }
        for (kind, content) in preset_state {
            if !overridden(kind) {
                events.push(EventDraft::state(kind, "", content));
            }
        }
        for state in request.initial_state {
            events.push(EventDraft::state(state.kind, state.state_key, state.content));
        }
        if let Some(name) = request.name {
            events.push(EventDraft::state("m.room.name", "", json!({ "name": name })));
        }
        if let Some(topic) = request.topic {
            events.push(EventDraft::state("m.room.topic", "", json!({ "topic": topic })));
        }

        // Reserve the alias first, so a concurrent request cannot take it between check and use.
        if let Some(alias) = &alias
            && !self
                .store
                .create_alias(alias.as_str(), room_id.as_str(), creator.as_str())
                .await?
        {
            return Err(Error::RoomInUse);
        }
        let handle = Arc::new(RoomHandle {
            room_id: room_id.clone(),
            version: version.clone(),
            inner: Mutex::new(RoomInner {
                state: StateMap::new(),
                extremities: Vec::new(),
                snapshot: None,
            }),
        });
        if let Err(e) = self.send_batch(&handle, creator, events, None).await {
            if let Some(alias) = &alias {
                self.store.delete_alias(alias.as_str()).await?;
            }
            return Err(e);
        }
        self.insert_handle(handle)?;
        if public {
            self.store.publish_room(room_id.as_str(), "").await?;
        }
        for invitee in &request.invite {
            self.invite(&room_id, creator, invitee, None, request.is_direct)
                .await?;
        }
        tracing::info!(%room_id, %creator, version = %version.id, "room created");
        Ok((room_id, alias))
    }
}

pub(super) fn member_content(membership: &str, displayname: Option<&str>, is_direct: bool) -> Value {
    let mut content = json!({ "membership": membership });
    if let Some(name) = displayname {
        content["displayname"] = json!(name);
    }
    if is_direct {
        content["is_direct"] = json!(true);
    }
    content
}

/// Synapse's default power levels, with the request's overrides applied on top.
fn power_levels(creator: &UserId, request: &CreateRoom, preset: &str) -> Value {
    let mut users = Map::new();
    users.insert(creator.to_string(), json!(100));
    if preset == "trusted_private_chat" {
        for invitee in &request.invite {
            users.insert(invitee.to_string(), json!(100));
        }
    }
    let mut content = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 50,
    });
    if let (Some(overrides), Some(target)) = (&request.power_level_content_override, content.as_object_mut())
    {
        for (key, value) in overrides {
            target.insert(key.clone(), value.clone());
        }
    }
    content
}
