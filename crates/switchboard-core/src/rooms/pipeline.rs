//! The one path every event takes: build → authorise → hash and sign → persist → publish.

use std::sync::Arc;

use ruma::{
    CanonicalJsonValue, OwnedEventId, RoomId, UserId,
    events::{StateEventType, TimelineEventType},
    signatures::{JsonError, hash_and_sign_event, reference_hash},
    state_res,
};
use serde_json::json;
use switchboard_store::{NewEvent, StateRow};

use super::{RoomHandle, RoomInner, Rooms, StateMap, state::StateIds, txns::Lookup};
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

    pub fn state(kind: impl Into<String>, state_key: impl Into<String>, content: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            state_key: Some(state_key.into()),
            content,
            redacts: None,
            timestamp: None,
        }
    }
}

/// Current state with not-yet-stored events of the same batch laid over it.
pub(super) struct StateView<'a> {
    base: &'a StateMap,
    overlay: StateMap,
}

impl<'a> StateView<'a> {
    pub(super) fn over(base: &'a StateMap) -> Self {
        Self {
            base,
            overlay: StateMap::new(),
        }
    }

    /// `base` with `overlay` laid over it; [`StateView::into_overlay`] takes it back.
    pub(super) fn layered(base: &'a StateMap, overlay: StateMap) -> Self {
        Self { base, overlay }
    }

    pub(super) fn into_overlay(self) -> StateMap {
        self.overlay
    }

    pub(super) fn get(&self, key: &(StateEventType, String)) -> Option<&Arc<Pdu>> {
        self.overlay.get(key).or_else(|| self.base.get(key))
    }
}

/// A built and authorised event waiting to be stored.
pub(super) struct Accepted {
    pub(super) pdu: Pdu,
    pub(super) state_key: Option<(StateEventType, String)>,
    pub(super) unsigned: Option<String>,
    /// Set for an event from another server that forks the room's history: the state after
    /// it, and the room's state once it is resolved with the other forward extremities.
    pub(super) resolution: Option<Resolution>,
    /// An event from another server that stored events already follow (it arrived after
    /// them): it closes a gap and is no forward extremity.
    pub(super) late: bool,
    /// Another server's member event taken through `send_join`/`send_leave`: sent on to the
    /// room's other servers.
    pub(super) relay: bool,
}

pub(super) struct Resolution {
    pub(super) after_event: Arc<super::state::StateIds>,
    pub(super) current: StateMap,
}

impl Accepted {
    /// `pdu` with the `unsigned` data of a state event replacing another in `state`, and for an
    /// invite or a knock the room's stripped state before it (Synapse's `invite_room_state` /
    /// `knock_room_state`: services and clients see what the room is without joining it).
    pub(super) fn new(pdu: Pdu, state: &StateView<'_>) -> Self {
        let state_key = pdu
            .state_key
            .clone()
            .map(|k| (StateEventType::from(pdu.kind.to_string()), k));
        let mut unsigned = serde_json::Map::new();
        if let Some(prev) = state_key.as_ref().and_then(|key| state.get(key)) {
            unsigned.insert("replaces_state".to_owned(), json!(prev.event_id));
            unsigned.insert("prev_content".to_owned(), json!(prev.content));
            unsigned.insert("prev_sender".to_owned(), json!(prev.sender));
        }
        let preview = match pdu.membership().as_deref() {
            Some("invite") => Some("invite_room_state"),
            Some("knock") => Some("knock_room_state"),
            _ => None,
        };
        if let Some(field) = preview {
            unsigned.insert(field.to_owned(), stripped_state(state, Some(&pdu.sender)).into());
        }
        let unsigned = (!unsigned.is_empty()).then(|| serde_json::Value::Object(unsigned).to_string());
        Self {
            pdu,
            state_key,
            unsigned,
            resolution: None,
            late: false,
            relay: false,
        }
    }
}

/// The stripped state an invitee or knocker is shown: the spec's recommended kinds, and with
/// `member` that user's member event (the one who sends an invite or knocks, as Synapse sends).
pub(super) fn stripped_state(state: &StateView<'_>, member: Option<&UserId>) -> Vec<serde_json::Value> {
    crate::federation::STRIPPED
        .iter()
        .map(|kind| (StateEventType::from(*kind), String::new()))
        .chain(member.map(|user| (StateEventType::RoomMember, user.to_string())))
        .filter_map(|key| state.get(&key))
        .map(|e| e.to_stripped())
        .collect()
}

impl Rooms {
    /// Sends an event into an existing room. With `txn` (`device_id`, `txn_id`), a repeated
    /// transaction returns the event the first one created — also after a restart.
    ///
    /// Runs in its own task: a client hanging up cannot cancel an event half-way through being
    /// stored and announced.
    pub async fn send(
        self: &Arc<Self>,
        room_id: &RoomId,
        sender: &UserId,
        draft: EventDraft,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<Pdu>> {
        let this = self.clone();
        let (room_id, sender) = (room_id.to_owned(), sender.to_owned());
        let txn = txn.map(|(d, t)| (d.to_owned(), t.to_owned()));
        detached(async move {
            let handle = this.handle(&room_id).await?;
            let txn = txn.as_ref().map(|(d, t)| (d.as_str(), t.as_str()));
            let mut stored = this.send_batch(&handle, &sender, vec![draft], txn).await?;
            stored.pop().ok_or_else(|| Error::internal("empty batch"))
        })
        .await
    }

    /// Builds, signs and authorises an event against the room's current state without storing
    /// it: for events another server must sign before they count (invites of its users), or
    /// that go to another server instead (leaves of a room this server is not in).
    pub async fn prepare(&self, room_id: &RoomId, sender: &UserId, draft: EventDraft) -> Result<Pdu> {
        let handle = self.handle(room_id).await?;
        let inner = handle.inner.lock().await;
        let view = StateView::over(&inner.state);
        let (pdu, auth) = self.build(&handle, &view, &inner.extremities, sender, draft)?;
        authorize(&handle.version, &view, &pdu, &auth)?;
        Ok(pdu)
    }

    /// The event an earlier identical client transaction created, if any.
    pub async fn txn_event(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event_type: &str,
        (device, txn_id): (&str, &str),
    ) -> Result<Option<Arc<Pdu>>> {
        let (user, room) = (sender.as_str(), room_id.as_str());
        let mut lookup = self.txns.lookup(user, device, room, event_type, txn_id);
        if lookup == Lookup::UnknownDevice {
            let has_history = self.store.device_has_txns(user, device).await?;
            self.txns.learn_device(user, device, has_history);
            lookup = if has_history {
                Lookup::AskDatabase
            } else {
                Lookup::New
            };
        }
        let found = match lookup {
            Lookup::Seen(event_id) => Some(event_id),
            Lookup::New => None,
            Lookup::AskDatabase | Lookup::UnknownDevice => {
                self.store
                    .txn_event(user, device, room, event_type, txn_id)
                    .await?
            }
        };
        match found {
            Some(event_id) => {
                let pdu = self.event(&event_id).await?.ok_or_else(|| {
                    Error::Internal(format!("transaction points at missing event {event_id}"))
                })?;
                Ok(Some(Arc::new(pdu)))
            }
            None => Ok(None),
        }
    }

    /// Builds and authorises every draft in order, each against the state the previous ones
    /// leave, then stores them in one database transaction: all of them or none.
    pub(super) async fn send_batch(
        &self,
        handle: &RoomHandle,
        sender: &UserId,
        drafts: Vec<EventDraft>,
        txn: Option<(&str, &str)>,
    ) -> Result<Vec<Arc<Pdu>>> {
        let mut inner = handle.inner.lock().await;
        if let (Some(txn), [draft]) = (txn, drafts.as_slice()) {
            // Checked under the room lock, so two concurrent retries cannot both create an event.
            if let Some(pdu) = self.txn_event(&handle.room_id, sender, &draft.kind, txn).await? {
                return Ok(vec![pdu]);
            }
        }
        let mut view = StateView::over(&inner.state);
        let mut extremities = inner.extremities.clone();
        let mut accepted = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let (pdu, auth) = self.build(handle, &view, &extremities, sender, draft)?;
            authorize(&handle.version, &view, &pdu, &auth)?;
            advance(&mut extremities, &pdu);
            let event = Accepted::new(pdu, &view);
            if let Some(key) = &event.state_key {
                view.overlay.insert(key.clone(), Arc::new(event.pdu.clone()));
            }
            accepted.push(event);
        }
        drop(view);
        self.persist(handle, &mut inner, accepted, txn).await
    }

    /// Builds, hashes and signs an event against the given state and forward extremities.
    fn build(
        &self,
        handle: &RoomHandle,
        state: &StateView<'_>,
        extremities: &[(OwnedEventId, u64)],
        sender: &UserId,
        draft: EventDraft,
    ) -> Result<(Pdu, Vec<Arc<Pdu>>)> {
        let rules = &handle.version.rules;
        let mut content = draft.content;
        if !content.is_object() {
            return Err(Error::BadJson("event content must be a JSON object".to_owned()));
        }
        if draft.state_key.is_some() {
            super::content::check(&draft.kind, &content, &rules.authorization)?;
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
            .filter_map(|key| state.get(&key).cloned())
            .collect();
        let prev_events = prev_events_of(extremities);
        let depth = extremities
            .iter()
            .map(|(_, depth)| depth + 1)
            .max()
            .unwrap_or(1)
            .min(MAX_DEPTH);

        let mut object = json!({
            "auth_events": auth.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>(),
            "depth": depth,
            "origin_server_ts": draft.timestamp.unwrap_or_else(now_ms),
            "prev_events": prev_events,
            "room_id": handle.room_id,
            "sender": sender,
            // As sent: `kind` may carry ruma's stable name for an unstable type.
            "type": draft.kind,
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

    /// Stores authorised events and publishes them: stream positions, current state, caches.
    pub(super) async fn persist(
        &self,
        handle: &RoomHandle,
        inner: &mut RoomInner,
        accepted: Vec<Accepted>,
        txn: Option<(&str, &str)>,
    ) -> Result<Vec<Arc<Pdu>>> {
        self.ensure_snapshot_ids().await?;
        let plans = self.plan_snapshots(handle, inner, &accepted);
        let rows: Vec<NewEvent> = accepted
            .iter()
            .zip(&plans)
            .map(|(a, plan)| NewEvent {
                stream_pos: 0,
                event_id: a.pdu.event_id.to_string(),
                room_id: a.pdu.room_id.to_string(),
                sender: a.pdu.sender.to_string(),
                kind: a.pdu.event_type.clone(),
                state_key: a.pdu.state_key.clone(),
                depth: i64::from(a.pdu.depth),
                origin_server_ts: i64::from(a.pdu.origin_server_ts.get()),
                pdu: a.pdu.json.clone(),
                unsigned: a.unsigned.clone(),
                txn: txn
                    .map(|(device, txn_id)| (a.pdu.sender.to_string(), device.to_owned(), txn_id.to_owned())),
                membership: a.pdu.membership(),
                creates_room_version: (a.pdu.kind == TimelineEventType::RoomCreate)
                    .then(|| handle.version.id.to_string()),
                relates_to: relation(&a.pdu),
                prev_events: a.pdu.prev_events.iter().map(ToString::to_string).collect(),
                state_after: Some(plan.state_after),
                snapshots: plan.snapshots.clone(),
                current_state: plan.current_state.clone(),
                relay: a.relay,
            })
            .collect();
        let membership_changed = rows.iter().any(|r| {
            r.membership.is_some()
                || r.current_state
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|s| s.membership.is_some()))
        });
        let written = self.stream.write(rows).await?;
        if membership_changed {
            self.audience_changed(&handle.room_id);
        }
        if let Some(plan) = plans.last() {
            inner.snapshot = Some(plan.current);
        }

        let mut stored = Vec::with_capacity(accepted.len());
        for (
            i,
            Accepted {
                mut pdu,
                state_key,
                unsigned,
                resolution,
                late,
                ..
            },
        ) in accepted.into_iter().enumerate()
        {
            pdu.stream_pos = written.positions[i];
            pdu.unsigned = unsigned.and_then(|u| serde_json::value::RawValue::from_string(u).ok());
            pdu.txn = txn.map(|(d, t)| (d.to_owned(), t.to_owned()));
            if let Some((device, txn_id)) = txn {
                self.txns.record(
                    pdu.sender.as_str(),
                    device,
                    pdu.room_id.as_str(),
                    &pdu.event_type,
                    txn_id,
                    pdu.event_id.as_str(),
                );
            }
            let pdu = Arc::new(pdu);
            if late {
                // It closes a gap: what it names is no extremity, and neither is it.
                inner.extremities.retain(|(id, _)| !pdu.prev_events.contains(id));
            } else {
                advance(&mut inner.extremities, &pdu);
            }
            match resolution {
                Some(resolution) => {
                    inner.state = resolution.current;
                    if let Some(key) = state_key
                        && inner.state.get(&key).is_some_and(|e| e.event_id == pdu.event_id)
                    {
                        inner.state.insert(key, pdu.clone());
                    }
                }
                None => {
                    if let Some(key) = state_key {
                        inner.state.insert(key, pdu.clone());
                    }
                }
            }
            tracing::debug!(event_id = %pdu.event_id, room_id = %pdu.room_id, pos = pdu.stream_pos, "event stored");
            stored.push(pdu);
        }
        self.stream.remember(&stored);
        // Announced only once the caches hold the events, so a woken reader finds them; the sender
        // is answered only after the announcement, so its next read includes them.
        written.published();
        if let Some(last) = stored.last() {
            self.stream.announced(last.stream_pos).await;
        }
        Ok(stored)
    }

    /// The state snapshots a group of events needs: the state after each, as a delta on the
    /// room's current snapshot while history is linear, a full snapshot now and then (and when
    /// the room has none yet), and full snapshots plus current-state rows after a resolution.
    fn plan_snapshots(
        &self,
        handle: &RoomHandle,
        inner: &RoomInner,
        accepted: &[Accepted],
    ) -> Vec<SnapshotPlan> {
        let room = &handle.room_id;
        let mut current = inner.snapshot;
        // The full current state as IDs, built only when a full snapshot is due.
        let mut full: Option<StateIds> = None;
        let mut pending: Vec<((StateEventType, String), OwnedEventId)> = Vec::new();
        let mut plans = Vec::with_capacity(accepted.len());
        for a in accepted {
            if let Some(resolution) = &a.resolution {
                let (after, _) = self.new_snapshot(room, None, &resolution.after_event);
                let now = super::state::ids_of(&resolution.current);
                let mut snapshots = vec![after.clone()];
                let current_id = if now == *resolution.after_event {
                    after.snapshot_id
                } else {
                    let (resolved, _) = self.new_snapshot(room, None, &now);
                    snapshots.push(resolved.clone());
                    resolved.snapshot_id
                };
                let before = super::state::ids_of(&inner.state);
                let current_state = now
                    .iter()
                    .filter(|(key, id)| before.get(*key) != Some(*id))
                    .map(|(key, id)| StateRow {
                        kind: key.0.to_string(),
                        state_key: key.1.clone(),
                        event_id: id.to_string(),
                        membership: resolution.current.get(key).and_then(|e| e.membership()),
                    })
                    .collect();
                self.remember_snapshot(after.snapshot_id, resolution.after_event.clone());
                self.remember_snapshot(current_id, Arc::new(now.clone()));
                plans.push(SnapshotPlan {
                    state_after: after.snapshot_id,
                    snapshots,
                    current_state: Some(current_state),
                    current: (current_id, 0),
                });
                full = Some(now);
                current = Some((current_id, 0));
                continue;
            }
            let mut snapshots = Vec::new();
            if let Some(key) = &a.state_key {
                match full.as_mut() {
                    Some(state) => {
                        state.insert(key.clone(), a.pdu.event_id.clone());
                    }
                    None => pending.push((key.clone(), a.pdu.event_id.clone())),
                }
            }
            let need_full = match current {
                None => true,
                Some((_, chain)) => a.state_key.is_some() && Self::chain_too_long(chain),
            };
            if need_full {
                let state = full.get_or_insert_with(|| {
                    let mut state = super::state::ids_of(&inner.state);
                    state.extend(pending.drain(..));
                    state
                });
                let (snapshot, _) = self.new_snapshot(room, None, state);
                current = Some((snapshot.snapshot_id, 0));
                snapshots.push(snapshot);
            } else if let (Some(key), Some(parent)) = (&a.state_key, current) {
                let delta = StateIds::from([(key.clone(), a.pdu.event_id.clone())]);
                let (snapshot, chain) = self.new_snapshot(room, Some(parent), &delta);
                current = Some((snapshot.snapshot_id, chain));
                snapshots.push(snapshot);
            }
            let Some(now) = current else {
                continue;
            };
            plans.push(SnapshotPlan {
                state_after: now.0,
                snapshots,
                current_state: None,
                current: now,
            });
        }
        plans
    }
}

/// What one event writes about state: its snapshot (and any new ones), and — after a state
/// resolution — the current-state rows that change.
struct SnapshotPlan {
    state_after: i64,
    snapshots: Vec<switchboard_store::NewSnapshot>,
    current_state: Option<Vec<StateRow>>,
    /// The room's current snapshot after the event, with its chain length.
    current: (i64, i64),
}

/// The largest depth the spec allows (canonical JSON integers end at 2^53 - 1).
const MAX_DEPTH: u64 = (1 << 53) - 1;

/// At most this many `prev_events` (Synapse's limit): the newest extremities; the others stay
/// extremities and are merged by a later event.
const MAX_PREV_EVENTS: usize = 10;

pub(super) fn prev_events_of(extremities: &[(OwnedEventId, u64)]) -> Vec<String> {
    let mut newest: Vec<&(OwnedEventId, u64)> = extremities.iter().collect();
    newest.sort_by_key(|e| std::cmp::Reverse(e.1));
    newest
        .into_iter()
        .take(MAX_PREV_EVENTS)
        .map(|(id, _)| id.to_string())
        .collect()
}

/// The forward extremities after `pdu`: the ones it names are extremities no more; it is one.
pub(super) fn advance(extremities: &mut Vec<(OwnedEventId, u64)>, pdu: &Pdu) {
    extremities.retain(|(id, _)| !pdu.prev_events.contains(id));
    extremities.push((pdu.event_id.clone(), u64::from(pdu.depth)));
}

/// `(event_id, rel_type)` of an event's `m.relates_to`, for `/relations`.
pub(super) fn relation(pdu: &Pdu) -> Option<(String, String)> {
    let content = pdu.content_value();
    let relates = content.get("m.relates_to")?;
    let event_id = relates.get("event_id")?.as_str()?.to_owned();
    let rel_type = relates
        .get("rel_type")
        .and_then(|r| r.as_str())
        .unwrap_or("m.in_reply_to")
        .to_owned();
    Some((event_id, rel_type))
}

/// Runs a write to completion in its own task, whatever happens to the request that asked for it.
pub(super) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::Internal(format!("event pipeline task failed: {e}")))?
}

/// The room version's authorisation rules against the current state.
pub(super) fn authorize(
    version: &RoomVersion,
    state: &StateView<'_>,
    pdu: &Pdu,
    auth: &[Arc<Pdu>],
) -> Result<()> {
    let rules = &version.rules.authorization;
    // Room version 12 names the create event by the room ID, not among the auth events.
    let create = state.get(&(StateEventType::RoomCreate, String::new())).cloned();
    state_res::check_state_independent_auth_rules(rules, pdu, |id| {
        auth.iter()
            .find(|e| e.event_id == id)
            .cloned()
            .or_else(|| create.clone().filter(|c| c.event_id == id))
    })
    .map_err(Error::Forbidden)?;
    state_res::check_state_dependent_auth_rules(rules, pdu, |kind, state_key| {
        state.get(&(kind.clone(), state_key.to_owned())).cloned()
    })
    .map_err(Error::Forbidden)
}

pub(super) fn json_error(e: JsonError) -> Error {
    match e {
        JsonError::PduTooLarge => Error::TooLarge(format!("event exceeds {MAX_PDU_BYTES} bytes")),
        other => Error::BadJson(other.to_string()),
    }
}
