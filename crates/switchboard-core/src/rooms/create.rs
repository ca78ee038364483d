//! `POST /createRoom`: the initial events of a room, in the order Synapse sends them.

use std::sync::Arc;

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::{EventDraft, RoomHandle, RoomInner, Rooms, StateMap};
use crate::{Error, Result, pdu::RoomVersion, util::random_string};

/// The request body of `/createRoom`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateRoom {
    pub visibility: Option<String>,
    pub room_alias_name: Option<String>,
    pub name: Option<String>,
    pub topic: Option<String>,
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
    pub async fn create_room(
        &self,
        creator: &UserId,
        displayname: Option<&str>,
        request: CreateRoom,
    ) -> Result<(OwnedRoomId, Option<OwnedRoomAliasId>)> {
        let version = RoomVersion::parse(
            request
                .room_version
                .as_deref()
                .unwrap_or(&self.default_version),
        )?;
        let public = request.visibility.as_deref() == Some("public");
        let preset = request.preset.clone().unwrap_or_else(|| {
            if public {
                "public_chat".to_owned()
            } else {
                "private_chat".to_owned()
            }
        });
        let (join_rule, guest_access) = match preset.as_str() {
            "public_chat" => ("public", "forbidden"),
            "private_chat" | "trusted_private_chat" => ("invite", "can_join"),
            other => return Err(Error::BadJson(format!("unknown preset `{other}`"))),
        };

        let alias = match &request.room_alias_name {
            Some(name) => {
                let alias = OwnedRoomAliasId::try_from(format!("#{name}:{}", self.server_name))
                    .map_err(|e| Error::InvalidParam(format!("invalid room_alias_name: {e}")))?;
                if self.store.alias(alias.as_str()).await?.is_some() {
                    return Err(Error::RoomInUse);
                }
                Some(alias)
            }
            None => None,
        };
        for user in &request.invite {
            if user.server_name() != self.server_name {
                return Err(Error::Forbidden(format!(
                    "cannot invite {user}: federation is not supported"
                )));
            }
        }

        let room_id = OwnedRoomId::try_from(format!("!{}:{}", random_string(18), self.server_name))
            .map_err(Error::internal)?;
        let handle = Arc::new(RoomHandle {
            room_id: room_id.clone(),
            version: version.clone(),
            inner: Mutex::new(RoomInner {
                state: StateMap::new(),
                head: None,
            }),
        });

        let mut create = request.creation_content.clone().unwrap_or_default();
        create.insert("room_version".to_owned(), json!(version.id));
        if !version.rules.authorization.use_room_create_sender {
            create.insert("creator".to_owned(), json!(creator));
        }
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
        events.push(EventDraft::state(
            "m.room.join_rules",
            "",
            json!({ "join_rule": join_rule }),
        ));
        events.push(EventDraft::state(
            "m.room.history_visibility",
            "",
            json!({ "history_visibility": "shared" }),
        ));
        events.push(EventDraft::state(
            "m.room.guest_access",
            "",
            json!({ "guest_access": guest_access }),
        ));
        for state in request.initial_state {
            events.push(EventDraft::state(
                state.kind,
                state.state_key,
                state.content,
            ));
        }
        if let Some(name) = request.name {
            events.push(EventDraft::state(
                "m.room.name",
                "",
                json!({ "name": name }),
            ));
        }
        if let Some(topic) = request.topic {
            events.push(EventDraft::state(
                "m.room.topic",
                "",
                json!({ "topic": topic }),
            ));
        }

        for (index, draft) in events.into_iter().enumerate() {
            self.send_to(&handle, creator, draft, None).await?;
            if index == 0 {
                // The room exists once its create event is stored; make it findable for the rest.
                self.insert_handle(handle.clone())?;
            }
        }
        if let Some(alias) = &alias
            && !self
                .store
                .create_alias(alias.as_str(), room_id.as_str(), creator.as_str())
                .await?
        {
            return Err(Error::RoomInUse);
        }
        for invitee in &request.invite {
            self.invite(&room_id, creator, invitee, None, request.is_direct)
                .await?;
        }
        tracing::info!(%room_id, %creator, version = %version.id, "room created");
        Ok((room_id, alias))
    }
}

pub(super) fn member_content(
    membership: &str,
    displayname: Option<&str>,
    is_direct: bool,
) -> Value {
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
        "invite": 0,
    });
    if let (Some(overrides), Some(target)) = (
        &request.power_level_content_override,
        content.as_object_mut(),
    ) {
        for (key, value) in overrides {
            target.insert(key.clone(), value.clone());
        }
    }
    content
}
