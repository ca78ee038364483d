//! Membership templates from resident servers (`make_join`, `make_leave`) made into this
//! server's signed events.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, ServerName, UserId,
    signatures::{hash_and_sign_event, reference_hash},
};
use serde_json::Value;

use crate::{Error, Homeserver, Result, pdu::RoomVersion, util::now_ms};

impl Homeserver {
    /// Checks that `template` (from `server`) is `user`'s own `membership` event in `room_id`,
    /// gives it `content` (keeping a restricted room's `join_authorised_via_users_server`) and a
    /// fresh timestamp, hashes and signs it. Returns its ID, the event, and the event as JSON.
    pub(super) fn sign_template(
        &self,
        server: &ServerName,
        template: &str,
        version: &RoomVersion,
        (user, room_id): (&UserId, &RoomId),
        membership: &str,
        mut content: Value,
    ) -> Result<(
        OwnedEventId,
        CanonicalJsonObject,
        Box<serde_json::value::RawValue>,
    )> {
        let mut event: CanonicalJsonObject = serde_json::from_str(template).map_err(|e| {
            Error::BadGateway(format!(
                "{server}'s {membership} template is not canonical JSON: {e}"
            ))
        })?;
        let is = |name: &str, want: &str| matches!(event.get(name), Some(CanonicalJsonValue::String(s)) if s == want);
        if !(is("type", "m.room.member")
            && is("state_key", user.as_str())
            && is("sender", user.as_str())
            && is("room_id", room_id.as_str()))
        {
            return Err(Error::BadGateway(format!(
                "{server}'s {membership} template is not a {membership} of {user}"
            )));
        }
        if let Some(CanonicalJsonValue::Object(template_content)) = event.get("content")
            && let Some(CanonicalJsonValue::String(via)) =
                template_content.get("join_authorised_via_users_server")
        {
            content["join_authorised_via_users_server"] = via.clone().into();
        }
        content["membership"] = membership.into();
        event.insert(
            "content".to_owned(),
            CanonicalJsonValue::try_from(content).map_err(Error::internal)?,
        );
        event.insert(
            "origin_server_ts".to_owned(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(now_ms()).unwrap_or(ruma::Int::MAX)),
        );
        for field in ["hashes", "signatures", "event_id", "unsigned"] {
            event.remove(field);
        }
        hash_and_sign_event(
            self.server_name.as_str(),
            &self.federation.key.key_pair,
            &mut event,
            &version.rules.redaction,
        )
        .map_err(|e| Error::Internal(format!("cannot sign the {membership}: {e}")))?;
        let hash = reference_hash(&event, &version.rules).map_err(Error::internal)?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
        let raw = serde_json::value::to_raw_value(&event).map_err(Error::internal)?;
        Ok((event_id, event, raw))
    }
}
