//! Invites and leaves across servers: inviting another server's user (their server signs the
//! invite), taking an invite for a local user into a room this server is not in, and leaving
//! such a room (refusing the invite) through `make_leave`/`send_leave`.

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, OwnedServerName, RoomId, ServerName, UserId,
    api::federation::membership::{RawStrippedState, create_invite, create_leave_event, prepare_leave_event},
    events::StateEventType,
    signatures::{reference_hash, sign_event},
};
use serde_json::{Value, json};

use crate::{
    Error, Homeserver, Result,
    pdu::{Pdu, RoomVersion},
    rooms::EventDraft,
};

impl Homeserver {
    /// Invites `target`, on this server or another: a remote invitee's server must sign the
    /// invite before it counts.
    pub async fn invite(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
        is_direct: bool,
    ) -> Result<Arc<Pdu>> {
        if target.server_name() == self.server_name {
            return self
                .rooms
                .invite(room_id, sender, target, reason, is_direct)
                .await;
        }
        match self.rooms.membership(room_id, target).await?.as_deref() {
            Some("join") => return Err(Error::Forbidden(format!("{target} is already in the room"))),
            Some("ban") => return Err(Error::Forbidden(format!("{target} is banned from the room"))),
            _ => {}
        }
        let mut content = json!({ "membership": "invite" });
        if is_direct {
            content["is_direct"] = json!(true);
        }
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        let pdu = self
            .rooms
            .prepare(
                room_id,
                sender,
                EventDraft::state("m.room.member", target.as_str(), content),
            )
            .await?;
        let handle = self.rooms.handle(room_id).await?;
        let invite_room_state = self
            .rooms
            .current_state(room_id)
            .await?
            .iter()
            .filter(|e| STRIPPED.contains(&e.event_type.as_str()))
            .filter_map(|e| serde_json::value::to_raw_value(&e.federation_json()).ok())
            .map(RawStrippedState::Pdu)
            .collect();
        let event = serde_json::value::RawValue::from_string(pdu.json.clone()).map_err(Error::internal)?;
        let request = create_invite::v2::Request::new(
            room_id.to_owned(),
            pdu.event_id.clone(),
            handle.version.id.clone(),
            event,
            invite_room_state,
        );
        let signed = self.federation.client.send(target.server_name(), request).await?;
        let object: CanonicalJsonObject = serde_json::from_str(signed.event.get())
            .map_err(|e| Error::BadGateway(format!("the signed invite is not canonical JSON: {e}")))?;
        let returned = reference_hash(&object, &handle.version.rules).map_err(Error::internal)?;
        if format!("${returned}") != pdu.event_id.as_str() {
            return Err(Error::BadGateway(format!(
                "{} changed the invite it signed",
                target.server_name()
            )));
        }
        self.rooms
            .append_countersigned(room_id, object, &self.federation.keys)
            .await
    }

    /// `PUT /invite` (v2) from another server: checks the invite of a local user, signs it, and
    /// — when this server is not in the room — stores it with the state the inviter sent, so
    /// the user sees it. Returns the event with this server's signature.
    pub async fn receive_invite(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &str,
        room_version: &str,
        event: CanonicalJsonObject,
        invite_room_state: Vec<Value>,
    ) -> Result<CanonicalJsonObject> {
        let version = RoomVersion::joinable(room_version)
            .map_err(|_| Error::IncompatibleRoomVersion(room_version.to_owned()))?;
        let (computed, mut object) = self
            .rooms
            .verify_pdu(&version, event, &self.federation.keys)
            .await?;
        if computed.as_str() != event_id {
            return Err(Error::BadJson(format!(
                "the event's ID is {computed}, not {event_id}"
            )));
        }
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        let pdu = Pdu::from_json(computed.clone(), json).map_err(|e| Error::BadJson(e.to_string()))?;
        let invitee = pdu
            .state_key
            .as_deref()
            .and_then(|k| UserId::parse(k).ok())
            .filter(|_| pdu.membership().as_deref() == Some("invite") && pdu.event_type == "m.room.member")
            .ok_or_else(|| Error::BadJson("not an invite".to_owned()))?;
        if pdu.room_id != room_id || pdu.sender.server_name() != origin {
            return Err(Error::Forbidden(format!("{origin} cannot send this invite")));
        }
        if invitee.server_name() != self.server_name || self.store.user(invitee.as_str()).await?.is_none() {
            return Err(Error::NotFound(format!("Unknown user {invitee}")));
        }
        sign_event(
            self.server_name.as_str(),
            &self.federation.key.key_pair,
            &mut object,
            &version.rules.redaction,
        )
        .map_err(|e| Error::Internal(format!("cannot sign the invite: {e}")))?;
        // A room this server is in gets the invite through /send like any event.
        if !self.rooms.is_resident(room_id).await? {
            let stripped: Vec<Value> = invite_room_state.iter().map(stripped).collect();
            let unsigned = json!({ "invite_room_state": stripped }).to_string();
            self.rooms
                .store_outside_event(&version, object.clone(), computed, Some(unsigned))
                .await?;
        }
        Ok(object)
    }

    /// Leaves a room (or refuses an invite): through this server's pipeline when it is in the
    /// room, otherwise through the inviting server with `make_leave` and `send_leave`.
    pub async fn leave_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
    ) -> Result<Arc<Pdu>> {
        if self.rooms.is_resident(room_id).await? {
            return self.rooms.leave(room_id, user, reason).await;
        }
        let invite = self
            .rooms
            .state_event(room_id, &StateEventType::RoomMember, user.as_str())
            .await?
            .filter(|e| e.membership().as_deref() == Some("invite"))
            .ok_or_else(|| Error::Forbidden(format!("User {user} is not in room {room_id}")))?;
        let server: OwnedServerName = invite.sender.server_name().to_owned();
        let template = self
            .federation
            .client
            .send(
                &server,
                prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned()),
            )
            .await?;
        let version_id = template
            .room_version
            .ok_or_else(|| Error::BadGateway(format!("{server} named no room version")))?;
        let version = RoomVersion::joinable(version_id.as_str())?;
        let mut content = json!({});
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        let (event_id, event, raw) = self.sign_template(
            &server,
            template.event.get(),
            &version,
            (user, room_id),
            "leave",
            content,
        )?;
        self.federation
            .client
            .send(
                &server,
                create_leave_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw),
            )
            .await?;
        self.rooms
            .store_outside_event(&version, event, event_id, None)
            .await
    }
}

/// The stripped-state kinds an invite carries (the spec's recommended set).
pub const STRIPPED: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// One entry of `invite_room_state` (a full PDU since Matrix 1.16, or already stripped) as
/// clients see it.
fn stripped(event: &Value) -> Value {
    json!({
        "type": event["type"],
        "state_key": event["state_key"],
        "content": event["content"],
        "sender": event["sender"],
    })
}
