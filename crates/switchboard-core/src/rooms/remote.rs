//! Events from other servers. Each PDU is checked as the spec's "Checks performed on receipt of
//! a PDU" order them — format and size, signatures of the servers that must have signed (a
//! content hash mismatch keeps only the redacted form), authorisation against its own
//! `auth_events`, then against the room's state — and appended through the same `persist` as
//! local events. Also the resident side of the join handshake: `make_join` templates and
//! `send_join`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, ServerName, UserId,
    canonical_json::redact,
    events::{StateEventType, TimelineEventType},
    signatures::{
        PublicKeyMap, Verified, reference_hash, required_server_signatures_to_verify_event, verify_event,
    },
    state_res,
};
use serde_json::json;

use super::{
    Rooms,
    pipeline::{Accepted, StateView, advance, authorize, prev_events_of},
};
use crate::{
    Error, Result,
    federation::KeyRing,
    pdu::{Pdu, RoomVersion},
    util::now_ms,
};

/// What became of one received PDU.
#[derive(Debug)]
pub enum Received {
    Accepted(Arc<Pdu>),
    AlreadyKnown,
    /// Allowed by the state before it but not by the room's current state (a banned user's
    /// message from a server that had not seen the ban): kept outside the timeline.
    SoftFailed,
}

impl Received {
    /// The event stored, for callers that need one.
    fn stored(self) -> Result<Arc<Pdu>> {
        match self {
            Received::Accepted(pdu) => Ok(pdu),
            Received::AlreadyKnown => Err(Error::BadState("the event is stored already".to_owned())),
            Received::SoftFailed => Err(Error::Forbidden(
                "the room's current state does not allow the event".to_owned(),
            )),
        }
    }
}

/// Whether `pdu` names other predecessors than the room's forward extremities.
fn forks(extremities: &[(OwnedEventId, u64)], pdu: &Pdu) -> bool {
    if extremities.is_empty() {
        return false;
    }
    let named: HashSet<&OwnedEventId> = pdu.prev_events.iter().collect();
    let current: HashSet<&OwnedEventId> = extremities.iter().map(|(id, _)| id).collect();
    named != current
}

impl Rooms {
    /// The checks of a PDU that need no room state: the ID from its reference hash, format and
    /// size, and the signatures of every server that must have signed it, with keys valid when
    /// it was sent. A content hash mismatch keeps the redacted form (the spec's rule).
    pub async fn verify_pdu(
        &self,
        version: &RoomVersion,
        mut object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        // Not part of what was signed; this server computes its own.
        object.remove("unsigned");
        object.remove("event_id");
        let rules = &version.rules;
        state_res::check_pdu_format(&object, &rules.event_format).map_err(Error::BadJson)?;
        let servers = required_server_signatures_to_verify_event(&object, &rules.signatures)
            .map_err(|e| Error::BadJson(format!("cannot tell who must have signed the event: {e}")))?;
        let ts = match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
            _ => return Err(Error::BadJson("origin_server_ts is not an integer".to_owned())),
        };
        let mut key_map = PublicKeyMap::new();
        for server in servers {
            let key_ids: Vec<String> = match object.get("signatures") {
                Some(CanonicalJsonValue::Object(signatures)) => match signatures.get(server.as_str()) {
                    Some(CanonicalJsonValue::Object(by_key)) => by_key.keys().cloned().collect(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            let ids: Vec<&str> = key_ids.iter().map(String::as_str).collect();
            let set = keys
                .keys(&server, &ids, ts)
                .await
                .map_err(|e| Error::Forbidden(format!("no usable key of {server} for the event: {e}")))?;
            key_map.insert(server.to_string(), set);
        }
        let verified = verify_event(&key_map, &object, rules)
            .map_err(|e| Error::Forbidden(format!("bad event signature: {e}")))?;
        let hash = reference_hash(&object, rules).map_err(super::pipeline::json_error)?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
        if verified == Verified::Signatures {
            tracing::info!(%event_id, "content hash mismatch: keeping the redacted event");
            object = redact(object, &rules.redaction, None).map_err(|e| Error::BadJson(e.to_string()))?;
        }
        Ok((event_id, object))
    }

    /// The ID a PDU has in its room's version (its reference hash), checks aside.
    pub async fn pdu_event_id(&self, room_id: &RoomId, object: &CanonicalJsonObject) -> Result<OwnedEventId> {
        let handle = self.handle(room_id).await?;
        let mut object = object.clone();
        object.remove("unsigned");
        object.remove("event_id");
        let hash = reference_hash(&object, &handle.version.rules).map_err(super::pipeline::json_error)?;
        OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)
    }

    /// Checks a PDU another server sent and appends it to its room.
    pub async fn receive_pdu(
        self: &Arc<Self>,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<Received> {
        self.receive_one(room_id, object, keys, false).await
    }

    /// [`Rooms::receive_pdu`] for a member event another server hands this one to put into
    /// the room (`send_join`, `send_leave`): once accepted, this server sends it on to the
    /// room's other servers.
    async fn receive_relayed(
        self: &Arc<Self>,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<Received> {
        self.receive_one(room_id, object, keys, true).await
    }

    async fn receive_one(
        self: &Arc<Self>,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        keys: &KeyRing,
        relay: bool,
    ) -> Result<Received> {
        self.receive_pdus_with(room_id, vec![object], keys, relay)
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::internal("no verdict")))
    }

    /// Checks PDUs another server sent for one room and appends those that pass, in order and
    /// in one write (one commit for a transaction's worth of a room), each judged against the
    /// state the ones before it leave. Events failing the auth rules are refused and not
    /// stored. One verdict per PDU; `Err` when the room is unknown or storing failed.
    pub async fn receive_pdus(
        self: &Arc<Self>,
        room_id: &RoomId,
        objects: Vec<CanonicalJsonObject>,
        keys: &KeyRing,
    ) -> Result<Vec<Result<Received>>> {
        self.receive_pdus_with(room_id, objects, keys, false).await
    }

    /// [`Rooms::receive_pdus`]; with `relay`, the accepted events are sent on to the room's
    /// other servers (a join or leave this server took through `send_join`/`send_leave`).
    async fn receive_pdus_with(
        self: &Arc<Self>,
        room_id: &RoomId,
        objects: Vec<CanonicalJsonObject>,
        keys: &KeyRing,
        relay: bool,
    ) -> Result<Vec<Result<Received>>> {
        let handle = self.handle(room_id).await?;
        let mut verdicts: Vec<Option<Result<Received>>> = Vec::with_capacity(objects.len());
        let mut candidates = Vec::new();
        for object in objects {
            match self.received_pdu(&handle, object, keys).await {
                Ok(Some(pdu)) => {
                    candidates.push((verdicts.len(), pdu));
                    verdicts.push(None);
                }
                Ok(None) => verdicts.push(Some(Ok(Received::AlreadyKnown))),
                Err(e) => verdicts.push(Some(Err(e))),
            }
        }
        if !candidates.is_empty() {
            let this = self.clone();
            let outcomes = super::pipeline::detached(async move {
                let mut inner = handle.inner.lock().await;
                this.accept_received(&handle, &mut inner, candidates, relay).await
            })
            .await?;
            for (i, outcome) in outcomes {
                verdicts[i] = Some(outcome);
            }
        }
        Ok(verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Err(Error::internal("no verdict"))))
            .collect())
    }

    /// The checks of a received PDU that need no lock: signatures, hashes, its room. `None`
    /// when the event is stored already.
    async fn received_pdu(
        &self,
        handle: &super::RoomHandle,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<Option<Pdu>> {
        let (event_id, object) = self.verify_pdu(&handle.version, object, keys).await?;
        if self.event(event_id.as_str()).await?.is_some() {
            return Ok(None);
        }
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        let pdu = Pdu::from_json(event_id, json).map_err(|e| Error::BadJson(e.to_string()))?;
        if pdu.room_id != handle.room_id {
            return Err(Error::BadJson(format!(
                "the event is for {}, not {}",
                pdu.room_id, handle.room_id
            )));
        }
        Ok(Some(pdu))
    }

    /// Authorises verified PDUs under the room lock. Those continuing the room's history
    /// are gathered and stored together; one that forks it is resolved on its own (after
    /// the gathered ones are stored). `(index, verdict)` per PDU; `Err` if storing failed.
    async fn accept_received(
        &self,
        handle: &super::RoomHandle,
        inner: &mut super::RoomInner,
        candidates: Vec<(usize, Pdu)>,
        relay: bool,
    ) -> Result<Vec<(usize, Result<Received>)>> {
        let mut outcomes = Vec::with_capacity(candidates.len());
        let mut pending: Vec<(usize, Accepted)> = Vec::new();
        let mut overlay = super::StateMap::new();
        let mut extremities = inner.extremities.clone();
        let mut batch: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        for (i, pdu) in candidates {
            // Stored by another request while this one was checking, or twice in the batch?
            if batch.contains_key(&pdu.event_id) || self.event(pdu.event_id.as_str()).await?.is_some() {
                outcomes.push((i, Ok(Received::AlreadyKnown)));
                continue;
            }
            let auth = match self.auth_events_of(&pdu, &batch).await {
                Ok(auth) => auth,
                Err(e) => {
                    outcomes.push((i, Err(e)));
                    continue;
                }
            };
            if forks(&extremities, &pdu) {
                self.store_gathered(handle, inner, &mut pending, &mut outcomes)
                    .await?;
                overlay.clear();
                let outcome = self.accept_fork(handle, inner, pdu, &auth, relay).await;
                if let Err(Error::Store(_)) = outcome {
                    return outcome.map(|_| Vec::new());
                }
                extremities = inner.extremities.clone();
                outcomes.push((i, outcome));
                continue;
            }
            let view = StateView::layered(&inner.state, std::mem::take(&mut overlay));
            let accepted = authorize(&handle.version, &view, &pdu, &auth).map(|()| Accepted::new(pdu, &view));
            overlay = view.into_overlay();
            let mut accepted = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    outcomes.push((i, Err(e)));
                    continue;
                }
            };
            accepted.relay = relay;
            advance(&mut extremities, &accepted.pdu);
            let stored = Arc::new(accepted.pdu.clone());
            if let Some(key) = &accepted.state_key {
                overlay.insert(key.clone(), stored.clone());
            }
            batch.insert(stored.event_id.clone(), stored);
            pending.push((i, accepted));
        }
        self.store_gathered(handle, inner, &mut pending, &mut outcomes)
            .await?;
        Ok(outcomes)
    }

    /// Stores the events [`Rooms::accept_received`] gathered, in one write.
    async fn store_gathered(
        &self,
        handle: &super::RoomHandle,
        inner: &mut super::RoomInner,
        pending: &mut Vec<(usize, Accepted)>,
        outcomes: &mut Vec<(usize, Result<Received>)>,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let (indices, accepted): (Vec<usize>, Vec<Accepted>) = pending.drain(..).unzip();
        let stored = self.persist(handle, inner, accepted, None).await?;
        outcomes.extend(
            indices
                .into_iter()
                .zip(stored.into_iter().map(|pdu| Ok(Received::Accepted(pdu)))),
        );
        Ok(())
    }

    /// A PDU whose predecessors are not this server's extremities: authorised against the
    /// state before it (the resolution of its predecessors' states), then against the room's
    /// current state. Failing the latter soft-fails it: it is kept (other servers' events
    /// may name it) but outside the timeline and the room's state, and nothing points at it.
    async fn accept_fork(
        &self,
        handle: &super::RoomHandle,
        inner: &mut super::RoomInner,
        pdu: Pdu,
        auth: &[Arc<Pdu>],
        relay: bool,
    ) -> Result<Received> {
        let (state_before, resolution) = self.fork_state(handle, inner, &pdu).await?;
        let view = StateView::over(&state_before);
        authorize(&handle.version, &view, &pdu, auth)?;
        if let Err(e) = authorize(&handle.version, &StateView::over(&inner.state), &pdu, auth) {
            tracing::info!(room_id = %handle.room_id, event_id = %pdu.event_id, error = %e, "soft-failed: the room's current state does not allow the event");
            self.store
                .add_outliers(handle.room_id.as_str(), &[outlier_row(&pdu)])
                .await?;
            return Ok(Received::SoftFailed);
        }
        let mut accepted = Accepted::new(pdu, &view);
        accepted.resolution = Some(resolution);
        accepted.relay = relay;
        accepted.late = self
            .store
            .has_successors(handle.room_id.as_str(), accepted.pdu.event_id.as_str())
            .await?;
        let mut stored = self.persist(handle, inner, vec![accepted], None).await?;
        let pdu = stored.pop().ok_or_else(|| Error::internal("nothing stored"))?;
        Ok(Received::Accepted(pdu))
    }

    /// Appends an event checked elsewhere, under the room lock: against the room's state by the
    /// auth rules (`auth`: its auth events), or — `None` — on the word of the signatures
    /// alone, for an invite to a room this server is not in.
    pub(super) async fn append_checked(
        self: &Arc<Self>,
        handle: Arc<super::RoomHandle>,
        pdu: Pdu,
        auth: Option<Vec<Arc<Pdu>>>,
        unsigned: Option<String>,
    ) -> Result<Received> {
        let this = self.clone();
        super::pipeline::detached(async move {
            let mut inner = handle.inner.lock().await;
            if this.event(pdu.event_id.as_str()).await?.is_some() {
                return Ok(Received::AlreadyKnown);
            }
            if let Some(auth) = &auth
                && forks(&inner.extremities, &pdu)
            {
                return this.accept_fork(&handle, &mut inner, pdu, auth, false).await;
            }
            let view = StateView::over(&inner.state);
            if let Some(auth) = &auth {
                authorize(&handle.version, &view, &pdu, auth)?;
            }
            let mut accepted = Accepted::new(pdu, &view);
            if unsigned.is_some() {
                accepted.unsigned = unsigned;
            }
            let mut stored = this.persist(&handle, &mut inner, vec![accepted], None).await?;
            let pdu = stored.pop().ok_or_else(|| Error::internal("nothing stored"))?;
            Ok(Received::Accepted(pdu))
        })
        .await
    }

    /// Appends an event this server signed whose other signatures came back from another
    /// server (an invite the invitee's server signed): checked as a received PDU, then appended.
    pub async fn append_countersigned(
        self: &Arc<Self>,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<Arc<Pdu>> {
        self.receive_pdu(room_id, object, keys).await?.stored()
    }

    /// Stores an event of a room this server is not in, on the word of its signatures (checked
    /// by the caller): an invite of a local user, or that user's leave of such an invite. The
    /// room is created as a stub (its version only) if unknown.
    pub async fn store_outside_event(
        self: &Arc<Self>,
        version: &RoomVersion,
        object: CanonicalJsonObject,
        event_id: OwnedEventId,
        unsigned: Option<String>,
    ) -> Result<Arc<Pdu>> {
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        let pdu = Pdu::from_json(event_id, json).map_err(|e| Error::BadJson(e.to_string()))?;
        if self.handle(&pdu.room_id).await.is_err() {
            self.store
                .import_room(
                    pdu.room_id.as_str(),
                    version.id.as_str(),
                    pdu.sender.as_str(),
                    i64::from(pdu.origin_server_ts.get()),
                    &[],
                    &[],
                )
                .await?;
        }
        let handle = self.handle(&pdu.room_id).await?;
        self.append_checked(handle, pdu, None, unsigned).await?.stored()
    }

    /// The resident side of `send_leave`: the leaving user's own signed leave, checked and appended.
    pub async fn send_leave(
        self: &Arc<Self>,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &str,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<()> {
        let pdu = self
            .own_membership_pdu(origin, room_id, event_id, &object, "leave", keys)
            .await?;
        if self.event(pdu.event_id.as_str()).await?.is_none() {
            self.receive_relayed(room_id, object, keys).await?;
        }
        Ok(())
    }

    /// Checks a membership event a server sends for its own user (`send_join`, `send_leave`):
    /// its ID, signatures, kind, and that the user belongs to `origin`.
    async fn own_membership_pdu(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &str,
        object: &CanonicalJsonObject,
        membership: &str,
        keys: &KeyRing,
    ) -> Result<Pdu> {
        let handle = self.handle(room_id).await?;
        let (computed, checked) = self.verify_pdu(&handle.version, object.clone(), keys).await?;
        if computed.as_str() != event_id {
            return Err(Error::BadJson(format!(
                "the event's ID is {computed}, not {event_id}"
            )));
        }
        let json = serde_json::to_string(&checked).map_err(Error::internal)?;
        let pdu = Pdu::from_json(computed, json).map_err(|e| Error::BadJson(e.to_string()))?;
        if pdu.kind != TimelineEventType::RoomMember
            || pdu.membership().as_deref() != Some(membership)
            || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
        {
            return Err(Error::BadJson(format!(
                "expected the user's own {membership} event"
            )));
        }
        if pdu.sender.server_name() != origin || pdu.room_id != room_id {
            return Err(Error::Forbidden(format!(
                "{origin} cannot send a {membership} for {}",
                pdu.sender
            )));
        }
        Ok(pdu)
    }

    /// The state before an event that forks the room (the resolution of the states after its
    /// `prev_events`) and the room's state after it (resolved with the forward extremities it
    /// does not name). Predecessors this server lacks are passed over; with none known, the
    /// current state stands in.
    async fn fork_state(
        &self,
        handle: &super::RoomHandle,
        inner: &super::RoomInner,
        pdu: &Pdu,
    ) -> Result<(super::StateMap, super::pipeline::Resolution)> {
        let version = &handle.version;
        let current = Arc::new(super::state::ids_of(&inner.state));
        let mut befores = Vec::new();
        for prev in &pdu.prev_events {
            if let Some(state) = self.state_after_event(prev.as_str()).await? {
                befores.push(state);
            }
        }
        let before = match befores.len() {
            0 => current.clone(),
            1 => befores.remove(0),
            _ => Arc::new(self.resolve(version, &befores, &[]).await?),
        };
        let this = Arc::new(pdu.clone());
        let known: Vec<Arc<Pdu>> = inner.state.values().cloned().chain([this.clone()]).collect();
        let state_before = self.pdus_of(&before, &known).await?;
        let mut after = (*before).clone();
        if let Some(state_key) = &pdu.state_key {
            after.insert(
                (
                    ruma::events::StateEventType::from(pdu.event_type.as_str()),
                    state_key.clone(),
                ),
                pdu.event_id.clone(),
            );
        }
        let after = Arc::new(after);
        let mut states = vec![after.clone()];
        for (other, _) in inner
            .extremities
            .iter()
            .filter(|(id, _)| !pdu.prev_events.contains(id))
        {
            if let Some(state) = self.state_after_event(other.as_str()).await? {
                states.push(state);
            }
        }
        let now = if states.len() == 1 {
            (*after).clone()
        } else {
            self.resolve(version, &states, &[this]).await?
        };
        if now != *current {
            tracing::info!(room_id = %handle.room_id, event_id = %pdu.event_id, "state resolved after a fork");
        }
        let current = self.pdus_of(&now, &known).await?;
        Ok((
            state_before,
            super::pipeline::Resolution {
                after_event: after,
                current,
            },
        ))
    }

    /// The events an event names as `auth_events` (stored, or among `pending`): all must be
    /// known and in its room.
    async fn auth_events_of(
        &self,
        pdu: &Pdu,
        pending: &HashMap<OwnedEventId, Arc<Pdu>>,
    ) -> Result<Vec<Arc<Pdu>>> {
        let mut auth = Vec::with_capacity(pdu.auth_events.len());
        for id in &pdu.auth_events {
            if let Some(event) = pending.get(id) {
                auth.push(event.clone());
                continue;
            }
            let event = self
                .event(id.as_str())
                .await?
                .ok_or_else(|| Error::Forbidden(format!("unknown auth event {id}")))?;
            if event.room_id != pdu.room_id {
                return Err(Error::Forbidden(format!("auth event {id} is from another room")));
            }
            auth.push(Arc::new(event));
        }
        Ok(auth)
    }

    /// A join event template for `user_id` (of the asking server), if the room's rules let them
    /// join: `(room version, template)`.
    pub async fn make_join(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        supported: &[String],
    ) -> Result<(String, serde_json::Value)> {
        self.make_membership(room_id, user_id, "join", Some(supported))
            .await
    }

    /// A leave template for `user_id` of the asking server (to refuse an invite, or leave a
    /// room it is not resident in): `(room version, template)`.
    pub async fn make_leave(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<(String, serde_json::Value)> {
        self.make_membership(room_id, user_id, "leave", None).await
    }

    /// A membership template for a remote user, checked against the auth rules on a stand-in,
    /// so a refusal comes now rather than when the signed event arrives.
    async fn make_membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
        supported: Option<&[String]>,
    ) -> Result<(String, serde_json::Value)> {
        let handle = self.handle(room_id).await?;
        let version = handle.version.id.to_string();
        if let Some(supported) = supported
            && !supported.contains(&version)
        {
            return Err(Error::IncompatibleRoomVersion(version));
        }
        let mut content = json!({ "membership": membership });
        if membership == "join"
            && let Some(voucher) = self.join_authoriser(room_id, user_id).await?
        {
            content["join_authorised_via_users_server"] = json!(voucher);
        }
        let inner = handle.inner.lock().await;
        let rules = &handle.version.rules;
        let content_raw = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
        let auth_types = state_res::auth_types_for_event(
            &TimelineEventType::RoomMember,
            user_id,
            Some(user_id.as_str()),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::BadJson)?;
        let auth: Vec<Arc<Pdu>> = auth_types
            .into_iter()
            .filter_map(|key| inner.state.get(&key).cloned())
            .collect();
        let depth = inner.extremities.iter().map(|(_, d)| d + 1).max().unwrap_or(1);
        let template = json!({
            "type": "m.room.member",
            "state_key": user_id,
            "sender": user_id,
            "room_id": room_id,
            "origin_server_ts": now_ms(),
            "content": content,
            "depth": depth,
            "prev_events": prev_events_of(&inner.extremities),
            "auth_events": auth.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>(),
        });
        let probe = Pdu::from_json(
            OwnedEventId::try_from("$probe").map_err(Error::internal)?,
            template.to_string(),
        )?;
        authorize(&handle.version, &StateView::over(&inner.state), &probe, &auth)?;
        Ok((version, template))
    }

    /// For a join of a `restricted` (or `knock_restricted`) room by a user neither invited nor
    /// joined: once the user is found joined to a room the join rules allow, a member of this
    /// server who may invite, to vouch for the join (`join_authorised_via_users_server`).
    /// `None` when no voucher is needed.
    async fn join_authoriser(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<ruma::OwnedUserId>> {
        let Some(rules) = self
            .state_event(room_id, &StateEventType::RoomJoinRules, "")
            .await?
        else {
            return Ok(None);
        };
        let content = rules.content_value();
        if !matches!(
            content["join_rule"].as_str(),
            Some("restricted" | "knock_restricted")
        ) || matches!(
            self.membership(room_id, user_id).await?.as_deref(),
            Some("invite" | "join")
        ) {
            return Ok(None);
        }
        let mut allowed = false;
        for rule in content["allow"].as_array().into_iter().flatten() {
            let Some(other) = rule["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()) else {
                continue;
            };
            if rule["type"] == "m.room_membership"
                && matches!(self.membership(&other, user_id).await, Ok(Some(m)) if m == "join")
            {
                allowed = true;
                break;
            }
        }
        if !allowed {
            return Err(Error::Forbidden(format!(
                "{user_id} is in none of the rooms whose members may join {room_id}"
            )));
        }
        for member in self.members_with(room_id, "join").await? {
            let Some(local) = member.state_key.as_deref().and_then(|u| UserId::parse(u).ok()) else {
                continue;
            };
            if local.server_name() == self.server_name && self.has_power(room_id, &local, "invite", 0).await?
            {
                return Ok(Some(local));
            }
        }
        Err(Error::UnableToGrantJoin(format!(
            "no member of this server may invite to {room_id}"
        )))
    }

    /// Adds this server's signature to a restricted join naming a member of this server as its
    /// voucher (the spec requires the vouching server's signature), over the redacted event as
    /// every signature is — after checking again that the join rules let the user in, since
    /// the auth rules check the voucher's power, not the conditions.
    async fn countersign_join(
        &self,
        room_id: &RoomId,
        version: &RoomVersion,
        mut object: CanonicalJsonObject,
    ) -> Result<CanonicalJsonObject> {
        let voucher = match object.get("content") {
            Some(CanonicalJsonValue::Object(content)) => {
                match content.get("join_authorised_via_users_server") {
                    Some(CanonicalJsonValue::String(user)) => UserId::parse(user.as_str()).ok(),
                    _ => None,
                }
            }
            _ => None,
        };
        if voucher.is_none_or(|user| user.server_name() != self.server_name) {
            return Ok(object);
        }
        let sender = match object.get("sender") {
            Some(CanonicalJsonValue::String(sender)) => {
                UserId::parse(sender.as_str()).map_err(|e| Error::BadJson(format!("bad sender: {e}")))?
            }
            _ => return Err(Error::BadJson("the join has no sender".to_owned())),
        };
        self.join_authoriser(room_id, &sender).await?;
        let mut redacted = redact(object.clone(), &version.rules.redaction, None)
            .map_err(|e| Error::BadJson(e.to_string()))?;
        ruma::signatures::sign_json(self.server_name.as_str(), &self.key.key_pair, &mut redacted)
            .map_err(|e| Error::Internal(format!("cannot sign the join: {e}")))?;
        let ours = match redacted.get("signatures") {
            Some(CanonicalJsonValue::Object(all)) => all.get(self.server_name.as_str()).cloned(),
            _ => None,
        }
        .ok_or_else(|| Error::internal("the join's signature is missing"))?;
        match object.get_mut("signatures") {
            Some(CanonicalJsonValue::Object(all)) => {
                all.insert(self.server_name.to_string(), ours);
            }
            _ => return Err(Error::BadJson("the join has no signatures".to_owned())),
        }
        Ok(object)
    }

    /// The resident side of `send_join`: checks the signed join of `origin`'s user, appends it,
    /// and returns the state before it and the auth chain of that state (PDU JSON).
    pub async fn send_join(
        self: &Arc<Self>,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &str,
        object: CanonicalJsonObject,
        keys: &KeyRing,
    ) -> Result<(Vec<Arc<Pdu>>, Vec<Arc<Pdu>>, Arc<Pdu>)> {
        let version = self.handle(room_id).await?.version.clone();
        let object = self.countersign_join(room_id, &version, object).await?;
        let pdu = self
            .own_membership_pdu(origin, room_id, event_id, &object, "join", keys)
            .await?;
        let state_before = self.current_state(room_id).await?;
        let joined = match self.receive_relayed(room_id, object, keys).await? {
            Received::AlreadyKnown => Arc::new(
                self.event(pdu.event_id.as_str())
                    .await?
                    .ok_or_else(|| Error::internal("known join vanished"))?,
            ),
            other => other.stored()?,
        };
        let chain = self.auth_chain(state_before.iter().chain([&joined])).await?;
        Ok((state_before, chain, joined))
    }

    /// Takes the answer of a resident server to this server's `send_join`: checks every event of
    /// the room's state and auth chain (signatures, hashes, each against its own auth events),
    /// stores them as the room's history before the join, then appends `join` (signed here).
    pub async fn import_joined_room(
        self: &Arc<Self>,
        room_id: &RoomId,
        version: RoomVersion,
        join: CanonicalJsonObject,
        state: Vec<Box<serde_json::value::RawValue>>,
        auth_chain: Vec<Box<serde_json::value::RawValue>>,
        keys: &KeyRing,
    ) -> Result<Arc<Pdu>> {
        let mut events: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut state_ids = Vec::new();
        for (is_state, raw) in auth_chain
            .iter()
            .map(|r| (false, r))
            .chain(state.iter().map(|r| (true, r)))
        {
            let object: CanonicalJsonObject = serde_json::from_str(raw.get())
                .map_err(|e| Error::BadGateway(format!("send_join: bad event: {e}")))?;
            let (event_id, object) = match self.verify_pdu(&version, object, keys).await {
                Ok(checked) => checked,
                Err(e) => {
                    tracing::warn!(%room_id, error = %e, "send_join: an event of the room's state does not verify; left out");
                    continue;
                }
            };
            let json = serde_json::to_string(&object).map_err(Error::internal)?;
            let pdu = Pdu::from_json(event_id.clone(), json).map_err(|e| Error::BadGateway(e.to_string()))?;
            if pdu.room_id != room_id {
                return Err(Error::BadGateway(format!(
                    "send_join: {event_id} is from another room"
                )));
            }
            if is_state && pdu.state_key.is_some() {
                state_ids.push(event_id.to_string());
            }
            events.insert(event_id, Arc::new(pdu));
        }
        // Oldest first, and each event checked against its own auth events.
        let mut ordered: Vec<Arc<Pdu>> = events.values().cloned().collect();
        ordered.sort_by_key(|e| (u64::from(e.depth), e.origin_server_ts));
        let create_event: Option<Arc<Pdu>> = ordered
            .iter()
            .find(|e| e.kind == TimelineEventType::RoomCreate && e.state_key.as_deref() == Some(""))
            .cloned();
        let mut accepted: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        for event in &ordered {
            let auth: Vec<Arc<Pdu>> = event
                .auth_events
                .iter()
                .filter_map(|id| accepted.get(id).cloned())
                .collect();
            let verdict = check_on_auth_events(&version, event, &auth, create_event.as_ref());
            match verdict {
                Ok(()) => {
                    accepted.insert(event.event_id.clone(), event.clone());
                }
                Err(e) => {
                    tracing::warn!(%room_id, event_id = %event.event_id, error = %e, "send_join: an event fails the auth rules; left out")
                }
            }
        }
        let create = ordered
            .iter()
            .find(|e| e.kind == TimelineEventType::RoomCreate && e.state_key.as_deref() == Some(""))
            .filter(|e| accepted.contains_key(&e.event_id))
            .ok_or_else(|| {
                Error::BadGateway("send_join: the room's state has no valid create event".to_owned())
            })?
            .clone();
        let outliers: Vec<switchboard_store::NewEvent> = ordered
            .iter()
            .filter(|e| accepted.contains_key(&e.event_id))
            // State last, so each key's newest position is its current state.
            .filter(|e| !state_ids.contains(&e.event_id.to_string()))
            .chain(ordered.iter().filter(|e| {
                accepted.contains_key(&e.event_id) && state_ids.contains(&e.event_id.to_string())
            }))
            .map(|e| outlier_row(e))
            .collect();
        let state_ids: Vec<String> = state_ids
            .into_iter()
            .filter(|id| outliers.iter().any(|o| o.event_id == *id))
            .collect();
        self.store
            .import_room(
                room_id.as_str(),
                version.id.as_str(),
                create.sender.as_str(),
                i64::from(create.origin_server_ts.get()),
                &outliers,
                &state_ids,
            )
            .await?;
        // The join, through the pipeline like any event from another server, but signed here.
        let (join_id, join) = {
            let hash = reference_hash(&join, &version.rules).map_err(super::pipeline::json_error)?;
            (
                OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?,
                join,
            )
        };
        let json = serde_json::to_string(&join).map_err(Error::internal)?;
        let pdu = Pdu::from_json(join_id, json)?;
        let auth = self.auth_events_of(&pdu, &HashMap::new()).await?;
        // A stub from an invite may be cached; the room is whole now.
        self.forget_handle(room_id);
        let handle = self.handle(room_id).await?;
        self.append_checked(handle, pdu, Some(auth), None).await?.stored()
    }

    /// History before the oldest event this server holds of a room, as another server's
    /// `/backfill` answered: each event verified (signatures, hashes) and checked against its
    /// own auth events, then stored below everything else (`Store::add_backfilled`). Returns
    /// how many were new.
    pub async fn take_backfill(
        &self,
        room_id: &RoomId,
        pdus: Vec<Box<serde_json::value::RawValue>>,
        keys: &KeyRing,
    ) -> Result<usize> {
        let handle = self.handle(room_id).await?;
        let mut events = Vec::new();
        for raw in pdus {
            let Ok(object) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else {
                continue;
            };
            let (event_id, object) = match self.verify_pdu(&handle.version, object, keys).await {
                Ok(checked) => checked,
                Err(e) => {
                    tracing::info!(%room_id, error = %e, "a backfilled event does not verify; left out");
                    continue;
                }
            };
            if self.event(event_id.as_str()).await?.is_some() {
                continue;
            }
            let json = serde_json::to_string(&object).map_err(Error::internal)?;
            match Pdu::from_json(event_id, json) {
                Ok(pdu) if pdu.room_id == room_id => events.push(Arc::new(pdu)),
                _ => continue,
            }
        }
        events.sort_by_key(|e| (u64::from(e.depth), e.origin_server_ts));
        let create = self.state_event(room_id, &StateEventType::RoomCreate, "").await?;
        let mut batch: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut rows = Vec::with_capacity(events.len());
        for event in events {
            let checked = match self.auth_events_of(&event, &batch).await {
                Ok(auth) => check_on_auth_events(&handle.version, &event, &auth, create.as_ref())
                    .map_err(Error::Forbidden),
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                tracing::info!(%room_id, event_id = %event.event_id, error = %e, "a backfilled event fails the auth rules; left out");
                continue;
            }
            let mut row = outlier_row(&event);
            row.prev_events = event.prev_events.iter().map(ToString::to_string).collect();
            row.relates_to = super::pipeline::relation(&event);
            rows.push(row);
            batch.insert(event.event_id.clone(), event);
        }
        Ok(self.store.add_backfilled(room_id.as_str(), &rows).await?)
    }

    /// The oldest event of a room's timeline, and whether history this server lacks lies
    /// before it: a predecessor it does not hold, or holds only outside the timeline (the
    /// state a join brought), other than the create event.
    pub async fn history_gap(&self, room_id: &RoomId) -> Result<Option<Pdu>> {
        let Some(row) = self.store.oldest_timeline_event(room_id.as_str()).await? else {
            return Ok(None);
        };
        let oldest = Pdu::from_row(row)?;
        for prev in &oldest.prev_events {
            match self.event(prev.as_str()).await? {
                Some(e) if e.kind == TimelineEventType::RoomCreate => {}
                _ => return Ok(Some(oldest)),
            }
        }
        Ok(None)
    }

    /// The servers with joined members in a room (this one included if it has any).
    pub async fn joined_servers(&self, room_id: &RoomId) -> Result<BTreeSet<ruma::OwnedServerName>> {
        Ok(self
            .members_with(room_id, "join")
            .await?
            .iter()
            .filter_map(|e| e.state_key.as_deref())
            .filter_map(|user| UserId::parse(user).ok())
            .map(|user| user.server_name().to_owned())
            .collect())
    }
}

/// An event of a joined room's past, stored outside the timeline.
fn outlier_row(pdu: &Pdu) -> switchboard_store::NewEvent {
    switchboard_store::NewEvent {
        relay: false,
        stream_pos: 0,
        event_id: pdu.event_id.to_string(),
        room_id: pdu.room_id.to_string(),
        sender: pdu.sender.to_string(),
        kind: pdu.event_type.clone(),
        state_key: pdu.state_key.clone(),
        depth: i64::from(pdu.depth),
        origin_server_ts: i64::from(pdu.origin_server_ts.get()),
        pdu: pdu.json.clone(),
        unsigned: None,
        txn: None,
        membership: pdu.membership(),
        creates_room_version: None,
        relates_to: None,
        prev_events: Vec::new(),
        state_after: None,
        snapshots: Vec::new(),
        current_state: None,
    }
}

/// An event checked against its own auth events alone (it has no place in this server's view
/// of the room's state): the state-independent rules, then the state-dependent ones over its
/// auth events and the create event (which version 12 names by the room ID).
fn check_on_auth_events(
    version: &RoomVersion,
    event: &Pdu,
    auth: &[Arc<Pdu>],
    create: Option<&Arc<Pdu>>,
) -> std::result::Result<(), String> {
    let rules = &version.rules.authorization;
    let known = || auth.iter().chain(create);
    state_res::check_state_independent_auth_rules(rules, event, |id| {
        known().find(|e| e.event_id == id).cloned()
    })?;
    state_res::check_state_dependent_auth_rules(rules, event, |kind, key| {
        known()
            .find(|e| e.kind.to_string() == kind.to_string() && e.state_key.as_deref() == Some(key))
            .cloned()
    })
}
