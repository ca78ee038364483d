//! `/sync`: what changed for a user since a token, waiting for news when there is none.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId, events::TimelineEventType};
use serde_json::{Map, Value, json};
use switchboard_store::Store;

mod sliding;
pub use sliding::{Extensions as SlidingExtensions, SlidingRequest};

use crate::{
    Error, Result, e2ee::E2ee, ephemeral::Ephemeral, filter::Filter, pdu::Pdu, push::Push, rooms::Rooms,
    stream::EventStream,
};

/// A position in the event stream, as handed to clients (`s42`). Used for `next_batch`,
/// `prev_batch` and `/messages` tokens alike: on a single server the stream order is also each
/// room's topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamToken(pub i64);

impl fmt::Display for StreamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

impl FromStr for StreamToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        // Later streams (typing, receipts, …) will append `_`-separated parts; the event position
        // stays first, so tokens issued now remain valid.
        let events = s.strip_prefix('s').and_then(|rest| rest.split('_').next());
        // Negative: history fetched from other servers, below the stream's first event.
        match events.and_then(|n| n.parse::<i64>().ok()) {
            Some(n) => Ok(Self(n)),
            None => Err(Error::InvalidParam(format!("invalid pagination token `{s}`"))),
        }
    }
}

/// A `/sync` position: the event stream's and the auxiliary stream's (account data), written
/// `s<events>_<aux>`. A bare `s<events>` (an older token, or a `/messages` one) means aux 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub events: i64,
    pub aux: i64,
}

impl fmt::Display for SyncToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}_{}", self.events, self.aux)
    }
}

impl FromStr for SyncToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let events = StreamToken::from_str(s)?.0;
        if events < 0 {
            return Err(Error::InvalidParam(format!("invalid sync token `{s}`")));
        }
        let aux = match s.split('_').nth(1) {
            Some(part) => part
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Error::InvalidParam(format!("invalid sync token `{s}`")))?,
            None => 0,
        };
        Ok(Self { events, aux })
    }
}

pub struct SyncRequest {
    pub user: OwnedUserId,
    pub device: String,
    pub since: Option<SyncToken>,
    pub timeout: Duration,
    pub full_state: bool,
    pub filter: Filter,
}

pub struct SyncService {
    rooms: Arc<Rooms>,
    store: Store,
    stream: Arc<EventStream>,
    ephemeral: Arc<Ephemeral>,
    e2ee: Arc<E2ee>,
    push: Arc<Push>,
    connections: sliding::Connections,
}

const DEFAULT_TIMELINE_LIMIT: u64 = 10;

impl SyncService {
    pub fn new(
        rooms: Arc<Rooms>,
        store: Store,
        stream: Arc<EventStream>,
        ephemeral: Arc<Ephemeral>,
        e2ee: Arc<E2ee>,
        push: Arc<Push>,
    ) -> Self {
        Self {
            rooms,
            store,
            stream,
            ephemeral,
            e2ee,
            push,
            connections: sliding::Connections::default(),
        }
    }

    /// Answers at once if anything changed since the token (or for an initial sync), otherwise
    /// waits until something does or the timeout passes. New events wake the wait immediately.
    pub async fn sync(&self, request: &SyncRequest) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + request.timeout;
        let mut news = self.stream.subscribe();
        let mut aux_news = self.stream.subscribe_aux();
        loop {
            let current = *news.borrow_and_update();
            let current_aux = *aux_news.borrow_and_update();
            let (response, has_news) = self.compute(request, current, current_aux).await?;
            if has_news || request.since.is_none() || request.full_state {
                return Ok(response);
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, news.changed()) => match changed {
                    Ok(Ok(())) => continue,
                    _ => return Ok(response),
                },
                changed = tokio::time::timeout_at(deadline, aux_news.changed()) => match changed {
                    Ok(Ok(())) => continue,
                    _ => return Ok(response),
                },
                () = self.stream.closed() => return Ok(response),
            }
        }
    }

    async fn compute(&self, request: &SyncRequest, current: i64, current_aux: i64) -> Result<(Value, bool)> {
        let user: &UserId = &request.user;
        let since = request.since.map(|t| t.events.min(current));
        let since_aux = request.since.map_or(0, |t| t.aux.min(current_aux));
        let changed: Option<HashSet<String>> = match since {
            Some(since) if !request.full_state => Some(
                self.store
                    .rooms_with_events(since, current)
                    .await?
                    .into_iter()
                    .collect(),
            ),
            _ => None,
        };
        let forgotten: HashSet<String> = self
            .store
            .forgotten_rooms(user.as_str())
            .await?
            .into_iter()
            .collect();
        let room_filter = &request.filter.room;

        let (mut join, mut invite, mut leave) = (Map::new(), Map::new(), Map::new());
        for (room_id, membership, pos) in self.store.user_memberships(user.as_str()).await? {
            if pos > current {
                // Committed but not yet announced: the next sync reports it, in order.
                continue;
            }
            if !room_filter.room_allowed(&room_id) || changed.as_ref().is_some_and(|c| !c.contains(&room_id))
            {
                continue;
            }
            let room_id = OwnedRoomId::try_from(room_id).map_err(Error::internal)?;
            let newly = since.is_none_or(|s| pos > s);
            match membership.as_str() {
                "join" => {
                    let section = self
                        .room_section(request, &room_id, since.filter(|_| !newly), current)
                        .await?;
                    if let Some(section) = section {
                        join.insert(room_id.to_string(), section);
                    }
                }
                "invite" if newly => {
                    invite.insert(room_id.to_string(), self.invite_section(&room_id, user).await?);
                }
                "leave" | "ban" => {
                    let wanted = if since.is_some() {
                        newly
                    } else {
                        room_filter.include_leave
                    };
                    if wanted
                        && !forgotten.contains(room_id.as_str())
                        && let Some(section) = self.room_section(request, &room_id, since, pos).await?
                    {
                        leave.insert(room_id.to_string(), section);
                    }
                }
                _ => {}
            }
        }
        // Account data changed since the token: global at the top, per room in the room's section.
        let mut global_data = Vec::new();
        let joined: HashSet<String> = self
            .store
            .user_memberships(user.as_str())
            .await?
            .into_iter()
            // A join not yet announced is for the next sync, with its full state.
            .filter(|(_, m, pos)| m == "join" && *pos <= current)
            .map(|(r, _, _)| r)
            .collect();
        for (room, kind, content) in self
            .store
            .account_data_changes(user.as_str(), since_aux, current_aux)
            .await?
        {
            let event = json!({ "type": kind, "content": serde_json::from_str::<Value>(&content).unwrap_or_default() });
            if room.is_empty() {
                global_data.push(event);
            } else if joined.contains(&room) {
                let section = join
                    .entry(room.clone())
                    .or_insert_with(|| empty_room_section(current));
                if let Some(events) = section["account_data"]["events"].as_array_mut() {
                    events.push(event);
                }
            }
        }
        // Typing and receipts of joined rooms, presence of people sharing a room.
        let since_ephemeral = request.since.map(|_| since_aux);
        for room in &joined {
            let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else {
                continue;
            };
            if let Some(users) = self.ephemeral.typing_since(&room_id, since_ephemeral) {
                let event = json!({ "type": "m.typing", "content": { "user_ids": users } });
                push_ephemeral(&mut join, room, event, current);
            }
        }
        let own = user.as_str().to_owned();
        let receipts = self
            .ephemeral
            .receipts_since(since_aux, current_aux, |reader| reader == own)
            .await?;
        for (room, event) in receipts {
            if joined.contains(&room) {
                push_ephemeral(&mut join, &room, event, current);
            }
        }
        let mut presence = self.ephemeral.presence_since(since_aux, |_| true);
        if !presence.is_empty() {
            let peers = self.peers(user).await?;
            presence.retain(|event| {
                event["sender"]
                    .as_str()
                    .is_some_and(|sender| peers.contains(sender))
            });
        }
        // Unread counts of every joined room in the response (a receipt that resets them
        // brings its room in).
        let unread = self.push.unread(user, current).await?;
        let threaded = room_filter.timeline.unread_thread_notifications;
        for (room, section) in join.iter_mut() {
            let counts = unread.get(room).cloned().unwrap_or_default();
            if threaded {
                section["unread_notifications"] = counts.main.json();
                let threads: Map<String, Value> = counts
                    .threads
                    .iter()
                    .map(|(root, c)| (root.clone(), c.json()))
                    .collect();
                section["unread_thread_notifications"] = Value::Object(threads);
            } else {
                section["unread_notifications"] = counts.total().json();
            }
        }
        let (device_lists_changed, device_lists_left) = match request.since {
            Some(since) => {
                let now = SyncToken {
                    events: current,
                    aux: current_aux,
                };
                self.device_list_delta(user, since, now).await?
            }
            None => (Vec::new(), Vec::new()),
        };
        let to_device = self
            .e2ee
            .to_device_for(user, &request.device, since_aux, current_aux)
            .await?;
        let key_counts = self.e2ee.counts(user, &request.device).await?;
        let fallback_types = self.e2ee.unused_fallback_types(user, &request.device).await?;
        let has_news = !(join.is_empty()
            && invite.is_empty()
            && leave.is_empty()
            && global_data.is_empty()
            && presence.is_empty()
            && to_device.is_empty()
            && device_lists_changed.is_empty()
            && device_lists_left.is_empty());
        let response = json!({
            "next_batch": SyncToken { events: current, aux: current_aux }.to_string(),
            "rooms": { "join": join, "invite": invite, "leave": leave, "knock": {} },
            "account_data": { "events": global_data },
            "presence": { "events": presence },
            "to_device": { "events": to_device },
            "device_lists": { "changed": device_lists_changed, "left": device_lists_left },
            "device_one_time_keys_count": key_counts,
            "device_unused_fallback_key_types": fallback_types,
        });
        Ok((response, has_news))
    }

    /// The user and everyone joined to a room with them.
    async fn peers(&self, user: &UserId) -> Result<HashSet<String>> {
        let mut peers: HashSet<String> = HashSet::from([user.to_string()]);
        for room in self.rooms.joined_rooms(user).await? {
            peers.extend(self.store.joined_members(&room).await?);
        }
        Ok(peers)
    }

    /// Whose device lists a client must fetch again, and whose it may forget, between two
    /// tokens (`device_lists` in `/sync`, `/keys/changes`): `changed` holds the users sharing a
    /// room whose devices or cross-signing keys changed, and those who came to share one;
    /// `left` those who shared a room and no longer share any.
    pub async fn device_list_delta(
        &self,
        user: &UserId,
        from: SyncToken,
        to: SyncToken,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let device_changes = self.store.device_list_changes(from.aux, to.aux).await?;
        // Only memberships in rooms the user is in, or of the user: nobody comes to share a room
        // with them, or stops, anywhere else.
        let joined: HashSet<String> = self.rooms.joined_rooms(user).await?.into_iter().collect();
        let memberships: Vec<(String, String, String)> = self
            .store
            .membership_events_between(from.events, to.events)
            .await?
            .into_iter()
            .filter(|(room, member, _)| joined.contains(room) || member == user.as_str())
            .collect();
        if device_changes.is_empty() && memberships.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let peers = self.peers(user).await?;
        let mut changed: HashSet<String> = device_changes.into_iter().collect();
        let mut departed = HashSet::new();
        for (room, member, pdu) in memberships {
            let membership = serde_json::from_str::<Value>(&pdu)
                .ok()
                .and_then(|p| p["content"]["membership"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if member == user.as_str() {
                // Joining a room meets everyone in it; leaving parts from them.
                let members = self.store.joined_members(&room).await?;
                if membership == "join" {
                    changed.extend(members);
                } else {
                    departed.extend(members);
                }
            } else {
                match membership.as_str() {
                    "join" => {
                        changed.insert(member);
                    }
                    "leave" | "ban" => {
                        departed.insert(member);
                    }
                    _ => {}
                }
            }
        }
        changed.retain(|u| peers.contains(u) && u != user.as_str());
        let mut left: Vec<String> = departed
            .into_iter()
            .filter(|u| !peers.contains(u) && u != user.as_str())
            .collect();
        let mut changed: Vec<String> = changed.into_iter().collect();
        changed.sort();
        left.sort();
        Ok((changed, left))
    }

    /// Timeline and state of one room between `since` (exclusive; `None` = from the start, with
    /// full state) and `until`. `None` if there is nothing to say for an incremental sync.
    async fn room_section(
        &self,
        request: &SyncRequest,
        room_id: &RoomId,
        since: Option<i64>,
        until: i64,
    ) -> Result<Option<Value>> {
        let filter = &request.filter.room;
        let limit = filter
            .timeline
            .events
            .limit
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, 500) as i64;
        let after = since.unwrap_or(0);
        let mut rows = self
            .store
            .room_events(room_id.as_str(), after, until, limit + 1, true)
            .await?;
        let limited = rows.len() as i64 > limit;
        if limited {
            rows.remove(0);
        }
        if since.is_some() && rows.is_empty() && !request.full_state {
            return Ok(None);
        }
        let timeline: Vec<Pdu> = rows.into_iter().map(Pdu::from_row).collect::<Result<_>>()?;
        let start = timeline.first().map_or(until, |e| e.stream_pos - 1);

        // State up to the start of the timeline: all of it for a new room or a gap that the
        // client cannot fill, only what changed otherwise.
        let mut state: Vec<Arc<Pdu>> = match since {
            Some(since) if !request.full_state => {
                if limited {
                    let before: HashSet<_> = self
                        .rooms
                        .state_at(room_id, since)
                        .await?
                        .into_iter()
                        .map(|e| e.event_id.clone())
                        .collect();
                    self.rooms
                        .state_at(room_id, start)
                        .await?
                        .into_iter()
                        .filter(|e| !before.contains(&e.event_id))
                        .collect()
                } else {
                    Vec::new()
                }
            }
            _ => self.rooms.state_at(room_id, start).await?,
        };
        let visibility = self.rooms.visibility(room_id, &request.user).await?;
        let timeline: Vec<&Pdu> = timeline
            .iter()
            .filter(|e| filter.timeline.matches(e) && visibility.can_see(e))
            .collect();
        state.retain(|e| filter.state.matches(e));
        if filter.state.lazy_load_members {
            let mut wanted: HashSet<&str> = timeline.iter().map(|e| e.sender.as_str()).collect();
            wanted.insert(request.user.as_str());
            let in_timeline: HashSet<_> = timeline.iter().map(|e| &e.event_id).collect();
            state.retain(|e| {
                e.kind != TimelineEventType::RoomMember
                    || e.state_key.as_deref().is_some_and(|k| wanted.contains(k))
            });
            // Members whose event predates `since` are sent again so the client can render senders.
            let present: HashSet<String> = state.iter().filter_map(|e| e.state_key.clone()).collect();
            for sender in wanted {
                if present.contains(sender) {
                    continue;
                }
                // As of the timeline's start: state never runs ahead of the timeline.
                if let Some(row) = self
                    .store
                    .state_event_at(room_id.as_str(), "m.room.member", sender, start)
                    .await?
                {
                    let member = Pdu::from_row(row)?;
                    if !in_timeline.contains(&member.event_id) {
                        state.push(Arc::new(member));
                    }
                }
            }
        }

        let viewer = Some((&*request.user, request.device.as_str()));
        let events: Vec<Value> = timeline.iter().map(|e| to_value(e, viewer)).collect();
        let state: Vec<Value> = state.iter().map(|e| to_value(e, viewer)).collect();
        let summary = self.summary(room_id, &request.user).await?;
        Ok(Some(json!({
            "timeline": { "events": events, "limited": limited, "prev_batch": StreamToken(start).to_string() },
            "state": { "events": state },
            "ephemeral": { "events": [] },
            "account_data": { "events": [] },
            "summary": summary,
            "unread_notifications": { "highlight_count": 0, "notification_count": 0 },
        })))
    }

    async fn invite_section(&self, room_id: &RoomId, user: &UserId) -> Result<Value> {
        let own = self
            .rooms
            .state_event(room_id, &ruma::events::StateEventType::RoomMember, user.as_str())
            .await?;
        let mut events = if self.rooms.is_resident(room_id).await? {
            self.rooms.stripped_state(room_id).await?
        } else {
            // An invite from another server: the state its server sent along.
            own.as_ref()
                .and_then(|e| e.unsigned.as_ref())
                .and_then(|u| serde_json::from_str::<Value>(u.get()).ok())
                .and_then(|u| u.get("invite_room_state").and_then(|s| s.as_array().cloned()))
                .unwrap_or_default()
        };
        if let Some(own) = own {
            events.push(own.to_stripped());
        }
        Ok(json!({ "invite_state": { "events": events } }))
    }

    /// `summary` with member counts and heroes, which clients use to name unnamed rooms.
    async fn summary(&self, room_id: &RoomId, user: &UserId) -> Result<Value> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut heroes = Vec::new();
        for event in self.rooms.current_state(room_id).await? {
            if event.kind != TimelineEventType::RoomMember {
                continue;
            }
            let membership = event.membership().unwrap_or_default();
            *counts.entry(membership.clone()).or_default() += 1;
            if let Some(member) = &event.state_key
                && member != user.as_str()
                && (membership == "join" || membership == "invite")
                && heroes.len() < 5
            {
                heroes.push(member.clone());
            }
        }
        Ok(json!({
            "m.heroes": heroes,
            "m.joined_member_count": counts.get("join").copied().unwrap_or(0),
            "m.invited_member_count": counts.get("invite").copied().unwrap_or(0),
        }))
    }
}

fn push_ephemeral(join: &mut Map<String, Value>, room: &str, event: Value, current: i64) {
    let section = join
        .entry(room.to_owned())
        .or_insert_with(|| empty_room_section(current));
    if let Some(events) = section["ephemeral"]["events"].as_array_mut() {
        events.push(event);
    }
}

/// A joined room's section with nothing in it but what is added later (account data, ephemeral).
fn empty_room_section(current: i64) -> Value {
    json!({
        "timeline": { "events": [], "limited": false, "prev_batch": StreamToken(current).to_string() },
        "state": { "events": [] },
        "ephemeral": { "events": [] },
        "account_data": { "events": [] },
        "unread_notifications": { "highlight_count": 0, "notification_count": 0 },
    })
}

pub fn to_value(event: &Pdu, viewer: Option<(&UserId, &str)>) -> Value {
    serde_json::to_value(event.to_client(viewer)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tokens_round_trip_and_ignore_future_suffixes() {
        let token: StreamToken = "s42".parse().expect("valid");
        assert_eq!(token, StreamToken(42));
        assert_eq!(token.to_string(), "s42");
        assert_eq!(
            "s7_1_2".parse::<StreamToken>().expect("future form"),
            StreamToken(7)
        );
    }

    #[test]
    fn sync_tokens_carry_both_streams() {
        let token: SyncToken = "s12_5".parse().expect("valid");
        assert_eq!(token, SyncToken { events: 12, aux: 5 });
        assert_eq!(token.to_string(), "s12_5");
        assert_eq!(
            "s12".parse::<SyncToken>().expect("old form"),
            SyncToken { events: 12, aux: 0 }
        );
        assert!("s12_x".parse::<SyncToken>().is_err());
    }

    #[test]
    fn bad_tokens_are_invalid_param() {
        for bad in ["", "42", "s", "sx", "t1-2"] {
            assert!(
                matches!(bad.parse::<StreamToken>(), Err(Error::InvalidParam(_))),
                "{bad}"
            );
        }
        // Negative positions are backfilled history: a place in `/messages`, never in `/sync`.
        assert_eq!("s-1".parse::<StreamToken>().expect("history"), StreamToken(-1));
        assert!(matches!(
            "s-1_0".parse::<SyncToken>(),
            Err(Error::InvalidParam(_))
        ));
    }
}
