//! Membership changes: join, leave, invite, kick, ban, unban, forget. The room version's auth rules
//! decide what is allowed; these functions only shape the member events.

use std::sync::Arc;

use ruma::{RoomId, UserId};
use serde_json::json;

use super::{EventDraft, Rooms, create::member_content};
use crate::{Error, Result, pdu::Pdu};

impl Rooms {
    pub async fn join(
        self: &Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        displayname: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        let current = self.membership(room_id, user).await?;
        if current.as_deref() == Some("join") {
            // Joining again is a no-op in Synapse; answer with the existing event.
            if let Some(event) = self
                .state_event(room_id, &ruma::events::StateEventType::RoomMember, user.as_str())
                .await?
            {
                return Ok(event);
            }
        }
        let draft = EventDraft::state(
            "m.room.member",
            user.as_str(),
            member_content("join", displayname, false),
        );
        self.send(room_id, user, draft, None).await.map_err(|e| match e {
            Error::Forbidden(reason) => {
                Error::Forbidden(format!("You are not allowed to join {room_id}: {reason}"))
            }
            other => other,
        })
    }

    pub async fn leave(
        self: &Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        match self.membership(room_id, user).await?.as_deref() {
            Some("join" | "invite" | "knock") => {}
            _ => {
                return Err(Error::Forbidden(format!("User {user} is not in room {room_id}")));
            }
        }
        self.set_membership(room_id, user, user, "leave", reason).await
    }

    pub async fn invite(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
        is_direct: bool,
    ) -> Result<Arc<Pdu>> {
        if target.server_name() != self.server_name {
            return Err(Error::Forbidden(format!(
                "cannot invite {target}: federation is not supported"
            )));
        }
        let displayname = self.require_local_user(target).await?;
        match self.membership(room_id, target).await?.as_deref() {
            Some("join") => {
                return Err(Error::Forbidden(format!("{target} is already in the room")));
            }
            Some("ban") => {
                return Err(Error::Forbidden(format!("{target} is banned from the room")));
            }
            _ => {}
        }
        let mut content = member_content("invite", displayname.as_deref(), is_direct);
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        let draft = EventDraft::state("m.room.member", target.as_str(), content);
        self.send(room_id, sender, draft, None).await
    }

    pub async fn kick(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        match self.membership(room_id, target).await?.as_deref() {
            Some("join" | "invite" | "knock") => {}
            _ => return Err(Error::Forbidden(format!("{target} is not in the room"))),
        }
        self.set_membership(room_id, sender, target, "leave", reason)
            .await
    }

    pub async fn ban(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        self.set_membership(room_id, sender, target, "ban", reason).await
    }

    pub async fn unban(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        if self.membership(room_id, target).await?.as_deref() != Some("ban") {
            return Err(Error::Forbidden(format!("{target} is not banned")));
        }
        self.set_membership(room_id, sender, target, "leave", reason)
            .await
    }

    /// Forgetting needs the user to be out of the room; forgotten rooms leave `/sync`.
    pub async fn forget(self: &Arc<Self>, room_id: &RoomId, user: &UserId) -> Result<()> {
        match self.membership(room_id, user).await?.as_deref() {
            Some("join" | "invite" | "knock") => Err(Error::BadState(
                "The user must leave the room before forgetting it".to_owned(),
            )),
            None => Err(Error::NotFound(format!(
                "User {user} was never in room {room_id}"
            ))),
            Some(_) => Ok(self.store.forget_room(user.as_str(), room_id.as_str()).await?),
        }
    }

    async fn set_membership(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        let mut content = member_content(membership, None, false);
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        let draft = EventDraft::state("m.room.member", target.as_str(), content);
        self.send(room_id, sender, draft, None).await
    }
}
