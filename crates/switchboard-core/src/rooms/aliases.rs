//! Room aliases: the local directory from `#alias:server` to room ID.

use ruma::{OwnedRoomAliasId, OwnedRoomId, RoomAliasId, RoomId, UserId, events::StateEventType};

use super::Rooms;
use crate::{Error, Result};

impl Rooms {
    /// `#localpart:this-server`, with Synapse's rule for the localpart (no whitespace or `:`).
    pub fn local_alias(&self, localpart: &str) -> Result<OwnedRoomAliasId> {
        if localpart.is_empty() || localpart.chars().any(|c| c.is_whitespace() || c == ':') {
            return Err(Error::InvalidParam(format!(
                "Invalid characters in room alias `{localpart}`"
            )));
        }
        OwnedRoomAliasId::try_from(format!("#{localpart}:{}", self.server_name))
            .map_err(|e| Error::InvalidParam(format!("invalid room alias: {e}")))
    }

    fn require_local_alias(&self, alias: &RoomAliasId) -> Result<()> {
        if alias.server_name() != self.server_name {
            return Err(Error::InvalidParam(format!(
                "Room alias {alias} is not on this server"
            )));
        }
        self.local_alias(alias.alias()).map(|_| ())
    }

    /// Creating an alias needs membership of the room, as Synapse's default
    /// `require_membership_for_aliases`, unless `privileged` (a server admin, or an application
    /// service within its alias namespace; see `Homeserver::alias_rights`).
    pub async fn create_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
        is_admin: bool,
    ) -> Result<()> {
        self.require_local_alias(alias)?;
        self.handle(room_id).await?;
        if !is_admin && self.membership(room_id, creator).await?.as_deref() != Some("join") {
            return Err(Error::Forbidden(
                "You must be in the room to create an alias for it".to_owned(),
            ));
        }
        if !self
            .store
            .create_alias(alias.as_str(), room_id.as_str(), creator.as_str())
            .await?
        {
            return Err(Error::Conflict(format!("Room alias {alias} already exists")));
        }
        // Services interested in this alias are interested in the room's very next event.
        self.audience_changed(room_id);
        Ok(())
    }

    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<OwnedRoomId> {
        let (room_id, _) = self
            .store
            .alias(alias.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("Room alias {alias} not found")))?;
        OwnedRoomId::try_from(room_id).map_err(Error::internal)
    }

    /// Deleting is for the alias's creator, the privileged (server admins, the application service
    /// owning the alias), and room members allowed to change `m.room.canonical_alias` — Synapse's rule.
    pub async fn delete_alias(&self, alias: &RoomAliasId, user: &UserId, is_admin: bool) -> Result<()> {
        self.require_local_alias(alias)?;
        let (room_id, creator) = self
            .store
            .alias(alias.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("Room alias {alias} not found")))?;
        let room_id = OwnedRoomId::try_from(room_id).map_err(Error::internal)?;
        let allowed = is_admin || creator == user.as_str() || {
            self.may_send_state(&room_id, user, &StateEventType::RoomCanonicalAlias)
                .await?
        };
        if !allowed {
            return Err(Error::Forbidden(
                "You don't have permission to delete the alias.".to_owned(),
            ));
        }
        self.store.delete_alias(alias.as_str()).await?;
        self.audience_changed(&room_id);
        Ok(())
    }

    pub async fn aliases(&self, room_id: &RoomId) -> Result<Vec<String>> {
        Ok(self.store.room_aliases(room_id.as_str()).await?)
    }

    /// Whether a joined user's power level allows sending a state event of this type.
    pub async fn may_send_state(
        &self,
        room_id: &RoomId,
        user: &UserId,
        kind: &StateEventType,
    ) -> Result<bool> {
        if self.membership(room_id, user).await?.as_deref() != Some("join") {
            return Ok(false);
        }
        let Some(levels) = self
            .state_event(room_id, &StateEventType::RoomPowerLevels, "")
            .await?
        else {
            return Ok(true);
        };
        let content = levels.content_value();
        let level_of =
            |v: Option<&serde_json::Value>, default: i64| v.and_then(|v| v.as_i64()).unwrap_or(default);
        let user_level = level_of(
            content["users"].get(user.as_str()),
            level_of(content.get("users_default"), 0),
        );
        let needed = level_of(
            content["events"].get(kind.to_string()),
            level_of(content.get("state_default"), 50),
        );
        Ok(user_level >= needed)
    }
}
