//! Redactions: the `m.room.redaction` event goes through the pipeline like any other; then the
//! redacted event's stored copy is replaced by its redacted form (the room version's algorithm),
//! with `unsigned.redacted_because`, so nobody is served the removed content again.

use std::sync::Arc;

use ruma::{CanonicalJsonValue, RoomId, UserId, canonical_json::redact, events::StateEventType};
use serde_json::json;

use super::{EventDraft, Rooms, pipeline::detached};
use crate::{Error, Result, pdu::Pdu};

impl Rooms {
    pub async fn redact(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        event_id: &str,
        reason: Option<&str>,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        // One unit that a client hanging up cannot cut in half: redaction stored, content gone.
        let this = self.clone();
        let (room_id, sender, event_id) = (room_id.to_owned(), sender.to_owned(), event_id.to_owned());
        let (reason, txn) = (
            reason.map(str::to_owned),
            txn.map(|(d, t)| (d.to_owned(), t.to_owned())),
        );
        detached(async move {
            let txn = txn.as_ref().map(|(d, t)| (d.as_str(), t.as_str()));
            this.redact_now(&room_id, &sender, &event_id, reason.as_deref(), txn)
                .await
        })
        .await
    }

    async fn redact_now(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        event_id: &str,
        reason: Option<&str>,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        let target = self.event_for_user(room_id, event_id, sender).await?;
        // The auth rules allow any same-server redaction; who may redact what is checked here,
        // as Synapse does: one's own events, or anyone's with the `redact` power level.
        if target.sender != sender && !self.has_power(room_id, sender, "redact", 50).await? {
            return Err(Error::Forbidden(
                "You don't have permission to redact events".to_owned(),
            ));
        }
        let mut content = json!({});
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        let mut draft = EventDraft::message("m.room.redaction", content);
        draft.redacts = Some(target.event_id.clone());
        let redaction = self.send(room_id, sender, draft, txn).await?;
        self.apply_redaction(&target, &redaction).await?;
        Ok(redaction)
    }

    async fn apply_redaction(&self, target: &Pdu, redaction: &Pdu) -> Result<()> {
        let handle = self.handle(&target.room_id).await?;
        let value: serde_json::Value = serde_json::from_str(&target.json).map_err(Error::internal)?;
        let CanonicalJsonValue::Object(object) =
            CanonicalJsonValue::try_from(value).map_err(Error::internal)?
        else {
            return Err(Error::internal("stored event is not an object"));
        };
        let redacted = redact(object, &handle.version.rules.redaction, None).map_err(Error::internal)?;
        let json = serde_json::to_string(&redacted).map_err(Error::internal)?;
        let because = serde_json::to_value(redaction.to_client(None)).map_err(Error::internal)?;
        let unsigned = json!({ "redacted_because": because }).to_string();
        self.store
            .redact_event(target.event_id.as_str(), &json, &unsigned)
            .await?;

        // Cached copies (current state, the recent-event window) must not keep the old content.
        let mut updated = Pdu::from_json(target.event_id.clone(), json)?;
        updated.stream_pos = target.stream_pos;
        updated.unsigned = serde_json::value::RawValue::from_string(unsigned).ok();
        updated.txn = target.txn.clone();
        let updated = Arc::new(updated);
        if let Some(state_key) = &target.state_key {
            let key = (StateEventType::from(target.kind.to_string()), state_key.clone());
            let mut inner = handle.inner.lock().await;
            if inner
                .state
                .get(&key)
                .is_some_and(|current| current.event_id == target.event_id)
            {
                inner.state.insert(key, updated.clone());
            }
        }
        self.stream.replace_recent(updated);
        Ok(())
    }

    /// Whether the user's power level reaches the named action's level (`redact`, `kick`, …).
    pub async fn has_power(
        &self,
        room_id: &RoomId,
        user: &UserId,
        action: &str,
        default: i64,
    ) -> Result<bool> {
        let Some(levels) = self
            .state_event(room_id, &StateEventType::RoomPowerLevels, "")
            .await?
        else {
            return Ok(true);
        };
        let content = levels.content_value();
        let users_default = content.get("users_default").and_then(|v| v.as_i64()).unwrap_or(0);
        let level = content["users"]
            .get(user.as_str())
            .and_then(|v| v.as_i64())
            .unwrap_or(users_default);
        let needed = content.get(action).and_then(|v| v.as_i64()).unwrap_or(default);
        Ok(level >= needed)
    }
}
