//! The one path every event takes: build → authorise → hash and sign → persist → publish.

use std::sync::Arc;

use ruma::{
    CanonicalJsonValue, OwnedEventId, RoomId, UserId,
    events::{StateEventType, TimelineEventType},
    signatures::{JsonError, hash_and_sign_event, reference_hash},
    state_res,
};
use serde_json::json;
use switchboard_store::NewEvent;

use super::{RoomHandle, RoomInner, Rooms, StateMap};
use crate::{
    Error, Result,
    pdu::{Pdu, RoomVersion},
    util::now_ms,
};

/// The largest PDU the spec allows, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;

/// What a sender wants to say; the pipeline fills in the rest.
#[derive(Clone, Debug)]
pub struct EventDraft {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: serde_json::Value,
    /// For redactions: the event redacted (placed where the room version wants it).
    pub redacts: Option<OwnedEventId>,
    /// `origin_server_ts` override (application services' `ts`); now if unset.
    pub timestamp: Option<u64>,
}

impl EventDraft {
    pub fn message(kind: impl Into<String>, content: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            state_key: None,
            content,
            redacts: None,
            timestamp: None,
        }
    }

    pub fn state(
        kind: impl Into<String>,
        state_key: impl Into<String>,
        content: serde_json::Value,
    ) -> Self {
        Self {
            kind: kind.into(),
            state_key: Some(state_key.into()),
            content,
            redacts: None,
            timestamp: None,
        }
    }
}

impl Rooms {
    /// Sends an event into an existing room. With `txn` (`device_id`, `txn_id`), a repeated
    /// transaction returns the event the first one created — also after a restart.
    pub async fn send(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        draft: EventDraft,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        let handle = self.handle(room_id).await?;
        self.send_to(&handle, sender, draft, txn).await
    }

    pub(super) async fn send_to(
        &self,
        handle: &RoomHandle,
        sender: &UserId,
        draft: EventDraft,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        let mut inner = handle.inner.lock().await;
        if let Some((device, txn_id)) = txn {
            // Checked under the room lock, so two concurrent retries cannot both create an event.
            if let Some(event_id) = self
                .store
                .txn_event(sender.as_str(), device, txn_id)
                .await?
            {
                let pdu = self.event(&event_id).await?.ok_or_else(|| {
                    Error::Internal(format!("transaction points at missing event {event_id}"))
                })?;
                return Ok(Arc::new(pdu));
            }
        }
        let (pdu, auth) = self.build(handle, &inner, sender, draft)?;
        authorize(&handle.version, &inner.state, &pdu, &auth)?;
        self.persist(handle, &mut inner, pdu, txn).await
    }

    /// Builds, hashes and signs an event against the room's current state.
    fn build(
        &self,
        handle: &RoomHandle,
        inner: &RoomInner,
        sender: &UserId,
        draft: EventDraft,
    ) -> Result<(Pdu, Vec<Arc<Pdu>>)> {
        let rules = &handle.version.rules;
        let mut content = draft.content;
        if !content.is_object() {
            return Err(Error::BadJson(
                "event content must be a JSON object".to_owned(),
            ));
        }
        let kind = TimelineEventType::from(draft.kind.as_str());
        let content_raw = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
        let auth_types = state_res::auth_types_for_event(
            &kind,
            sender,
            draft.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::BadJson)?;
        let auth: Vec<Arc<Pdu>> = auth_types
            .into_iter()
            .filter_map(|key| inner.state.get(&key).cloned())
            .collect();
        let (prev_events, depth) = match &inner.head {
            Some((id, depth)) => (vec![id.to_string()], depth + 1),
            None => (Vec::new(), 1),
        };

        let mut object = json!({
            "auth_events": auth.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>(),
            "depth": depth,
            "origin_server_ts": draft.timestamp.unwrap_or_else(now_ms),
            "prev_events": prev_events,
            "room_id": handle.room_id,
            "sender": sender,
            "type": kind,
        });
        if let Some(redacts) = draft.redacts {
            if rules.redaction.content_field_redacts {
                content["redacts"] = json!(redacts);
            } else {
                object["redacts"] = json!(redacts);
            }
        }
        object["content"] = content;
        if let Some(state_key) = &draft.state_key {
            object["state_key"] = json!(state_key);
        }
        let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(object)
            .map_err(|e| Error::BadJson(format!("event is not canonical JSON: {e}")))?
        else {
            return Err(Error::internal("event did not serialise to an object"));
        };
        hash_and_sign_event(
            self.server_name.as_str(),
            &self.key.key_pair,
            &mut object,
            &rules.redaction,
        )
        .map_err(json_error)?;
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        if json.len() > MAX_PDU_BYTES {
            return Err(Error::TooLarge(format!(
                "event is {} bytes; the limit is {MAX_PDU_BYTES}",
                json.len()
            )));
        }
        state_res::check_pdu_format(&object, &rules.event_format).map_err(Error::BadJson)?;
        let hash = reference_hash(&object, rules).map_err(json_error)?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
        Ok((Pdu::from_json(event_id, json)?, auth))
    }

    /// Stores an authorised event and publishes it: stream position, current state, caches.
    async fn persist(
        &self,
        handle: &RoomHandle,
        inner: &mut RoomInner,
        mut pdu: Pdu,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        let state_key_pair = pdu
            .state_key
            .clone()
            .map(|k| (StateEventType::from(pdu.kind.to_string()), k));
        let unsigned = state_key_pair
            .as_ref()
            .and_then(|key| inner.state.get(key))
            .map(|prev| {
                json!({
                    "replaces_state": prev.event_id,
                    "prev_content": prev.content,
                    "prev_sender": prev.sender,
                })
                .to_string()
            });
        let membership = pdu.membership();
        let creates = pdu.kind == TimelineEventType::RoomCreate;
        let slot = self.stream.next_slot().await;
        self.store
            .append_event(&NewEvent {
                stream_pos: slot.pos,
                event_id: pdu.event_id.as_str(),
                room_id: pdu.room_id.as_str(),
                sender: pdu.sender.as_str(),
                kind: &pdu.kind.to_string(),
                state_key: pdu.state_key.as_deref(),
                depth: i64::from(pdu.depth),
                origin_server_ts: i64::from(pdu.origin_server_ts.get()),
                pdu: &pdu.json,
                unsigned: unsigned.as_deref(),
                txn: txn.map(|(device, txn_id)| (pdu.sender.as_str(), device, txn_id)),
                membership: membership.as_deref(),
                creates_room_version: creates.then(|| handle.version.id.as_str()),
            })
            .await?;
        pdu.stream_pos = slot.pos;
        pdu.unsigned = unsigned.and_then(|u| serde_json::value::RawValue::from_string(u).ok());
        pdu.txn = txn.map(|(d, t)| (d.to_owned(), t.to_owned()));
        let pdu = Arc::new(pdu);
        inner.head = Some((pdu.event_id.clone(), u64::from(pdu.depth)));
        if let Some(key) = state_key_pair {
            inner.state.insert(key, pdu.clone());
        }
        // Announce only after the caches hold the event, so a woken reader finds it.
        slot.commit();
        tracing::debug!(event_id = %pdu.event_id, room_id = %pdu.room_id, pos = pdu.stream_pos, "event stored");
        Ok(pdu)
    }
}

/// The room version's authorisation rules against the current state.
pub(super) fn authorize(
    version: &RoomVersion,
    state: &StateMap,
    pdu: &Pdu,
    auth: &[Arc<Pdu>],
) -> Result<()> {
    let rules = &version.rules.authorization;
    state_res::check_state_independent_auth_rules(rules, pdu, |id| {
        auth.iter().find(|e| e.event_id == id).cloned()
    })
    .map_err(Error::Forbidden)?;
    state_res::check_state_dependent_auth_rules(rules, pdu, |kind, state_key| {
        state.get(&(kind.clone(), state_key.to_owned())).cloned()
    })
    .map_err(Error::Forbidden)
}

fn json_error(e: JsonError) -> Error {
    match e {
        JsonError::PduTooLarge => Error::TooLarge(format!("event exceeds {MAX_PDU_BYTES} bytes")),
        other => Error::BadJson(other.to_string()),
    }
}
