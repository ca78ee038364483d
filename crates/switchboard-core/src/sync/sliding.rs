//! Simplified sliding sync (MSC4186), the sync Element X speaks. The client names lists of
//! rooms by ranges of a recency order (`bump_stamp`: the latest message-like event) and rooms it
//! subscribes to; the server answers with those rooms only — their timeline, the state the
//! client asked for (`required_state`, with `$LAZY`, `$ME` and wildcards), names, counts and
//! heroes — and the extensions (to-device, E2EE, account data, receipts, typing).
//!
//! Each connection (user, device, `conn_id`) keeps what it sent in memory: `pos` names a
//! snapshot of it, so the next request sends only what changed since, and a request repeating
//! an older `pos` (the client lost an answer) is answered again from that snapshot. A `pos` the
//! server does not know — expired, or from before a restart — is `M_UNKNOWN_POS`, and the client
//! starts over. Listing costs one query over the user's memberships; everything else is spent
//! on the rooms asked for.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId,
    api::client::sync::sync_events::v5::request::{List, ListFilters, RoomSubscription},
    directory::RoomTypeFilter,
    events::TimelineEventType,
};
use serde_json::{Map, Value, json};
use switchboard_store::Store;

use super::{StreamToken, SyncService, SyncToken, to_value};
use crate::{Error, Result, pdu::Pdu, push::Counts};

pub use ruma::api::client::sync::sync_events::v5::request::Extensions;

/// Rooms a list may cover at most per range, and ranges per list.
const MAX_RANGES: usize = 100;
/// Timeline events per room at most, whatever the client asks.
const MAX_TIMELINE: u64 = 100;
/// Snapshots kept per connection: the latest answer's and the one before (a retry).
const SNAPSHOTS: usize = 3;
/// A connection not used for this long is forgotten.
const CONNECTION_TTL: Duration = Duration::from_secs(30 * 60);

/// One of a user's rooms, as a list sorts and filters it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ListedRoom {
    room_id: String,
    membership: String,
    /// The stream position of the user's membership event.
    membership_pos: i64,
    /// The room's latest bump event.
    bump_pos: Option<i64>,
    /// The create event's JSON, read only when a filter asks for room types.
    create_pdu: Option<String>,
    /// Read only when a filter asks.
    encrypted: bool,
}

/// Where each room's latest bump event is: filled per room on first use (one index seek per
/// bump type), then kept up to date from the stream, so listing costs no scan of history.
#[derive(Default)]
struct BumpIndex {
    /// Every bump event up to here is in `rooms`.
    upto: i64,
    rooms: HashMap<String, Option<i64>>,
}

/// What an answer does with one room.
struct RoomPlan<'a> {
    room_id: OwnedRoomId,
    listed: &'a ListedRoom,
    config: &'a RoomConfig,
    counts: Counts,
    /// Sent whole.
    initial: bool,
    unread_changed: bool,
    is_dm: bool,
}

/// What part of a room's history an answer covers: after `since` (all of it when `None`) up
/// to `until`.
struct RoomSpan {
    since: Option<i64>,
    until: i64,
    /// Joined (its state is the current state), not just left.
    joined: bool,
    /// Its unread counts changed since the last answer (sent even without events).
    unread_changed: bool,
}

/// A sliding-sync request, parsed with ruma's v5 types.
pub struct SlidingRequest {
    pub user: OwnedUserId,
    pub device: String,
    pub pos: Option<String>,
    pub timeout: Duration,
    pub conn_id: Option<String>,
    pub txn_id: Option<String>,
    pub lists: BTreeMap<String, List>,
    /// Each list's `filters.spaces` (ruma's `ListFilters` predates it): only rooms that are
    /// children of these spaces.
    pub spaces: BTreeMap<String, Vec<OwnedRoomId>>,
    pub room_subscriptions: BTreeMap<OwnedRoomId, RoomSubscription>,
    pub extensions: Extensions,
}

/// What a room is sent with: the largest timeline and every state asked for by any list or
/// subscription that covers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RoomConfig {
    timeline_limit: u64,
    required_state: BTreeSet<(String, String)>,
}

impl RoomConfig {
    fn merge(&mut self, timeline_limit: u64, required: &[(ruma::events::StateEventType, String)]) {
        self.timeline_limit = self.timeline_limit.max(timeline_limit.min(MAX_TIMELINE));
        self.required_state
            .extend(required.iter().map(|(t, k)| (t.to_string(), k.clone())));
    }

    /// Whether a state event is asked for; `lazy` are the members `$LAZY` stands for.
    fn wants(&self, event: &Pdu, user: &str, lazy: &HashSet<&str>) -> bool {
        let key = event.state_key.as_deref().unwrap_or_default();
        self.required_state.iter().any(|(kind, wanted)| {
            (kind == "*" || *kind == event.event_type)
                && match wanted.as_str() {
                    "*" => true,
                    "$ME" => key == user,
                    "$LAZY" => event.kind == TimelineEventType::RoomMember && lazy.contains(key),
                    other => other == key,
                }
        })
    }
}

/// What a connection last sent of a room.
#[derive(Clone, Debug)]
struct SentRoom {
    config: RoomConfig,
    membership: String,
    unread: Counts,
}

/// What a connection had sent when it answered with a `pos`.
#[derive(Clone, Debug)]
struct Snapshot {
    token: SyncToken,
    rooms: HashMap<String, SentRoom>,
    list_counts: BTreeMap<String, usize>,
}

struct Connection {
    next: u64,
    snapshots: VecDeque<(u64, Snapshot)>,
    used: Instant,
}

type ConnectionKey = (OwnedUserId, String, String);

/// A user's memberships `(room, membership, position)` as read under a membership epoch.
type Memberships = (u64, Arc<Vec<(String, String, i64)>>);

/// Users whose memberships are kept at most; beyond, the cache starts again.
const MAX_CACHED_USERS: usize = 10_000;

/// Sliding-sync connections of this process, and what their lists are made of: the bump index
/// and users' memberships (read again only after a membership changed somewhere).
pub struct Connections {
    /// Marks this process's `pos` values: one from before a restart is unknown, never mistaken.
    nonce: String,
    map: Mutex<HashMap<ConnectionKey, Connection>>,
    bumps: Mutex<BumpIndex>,
    memberships: Mutex<HashMap<OwnedUserId, Memberships>>,
}

impl Default for Connections {
    fn default() -> Self {
        use rand::Rng as _;
        let nonce: String = rand::thread_rng()
            .sample_iter(rand::distributions::Alphanumeric)
            .take(8)
            .map(char::from)
            .collect();
        Self {
            nonce,
            map: Mutex::new(HashMap::new()),
            bumps: Mutex::new(BumpIndex::default()),
            memberships: Mutex::new(HashMap::new()),
        }
    }
}

impl Connections {
    /// The snapshot `pos` names; `None` for a new connection (which forgets the old one).
    fn base(&self, key: &ConnectionKey, pos: Option<&str>) -> Result<Option<Snapshot>> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| Error::internal("connections poisoned"))?;
        map.retain(|_, c| c.used.elapsed() < CONNECTION_TTL);
        let Some(pos) = pos else {
            map.remove(key);
            return Ok(None);
        };
        let unknown = || Error::UnknownPos(pos.to_owned());
        let (nonce, number) = pos.split_once('_').ok_or_else(unknown)?;
        let number: u64 = number.parse().map_err(|_| unknown())?;
        if nonce != self.nonce {
            return Err(unknown());
        }
        let connection = map.get_mut(key).ok_or_else(unknown)?;
        connection.used = Instant::now();
        connection
            .snapshots
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, s)| Some(s.clone()))
            .ok_or_else(unknown)
    }

    /// The latest bump event of each room up to `until`.
    async fn bumps(
        &self,
        store: &Store,
        rooms: &[String],
        until: i64,
    ) -> Result<HashMap<String, Option<i64>>> {
        let lock = || {
            self.bumps
                .lock()
                .map_err(|_| Error::internal("bump index poisoned"))
        };
        let upto = lock()?.upto;
        if until > upto {
            // What happened since the index last looked; a room's newest bump is its latest.
            let delta = store.bump_positions(upto, until).await?;
            let mut index = lock()?;
            for (room, pos) in delta {
                let entry = index.rooms.entry(room).or_insert(None);
                *entry = (*entry).max(Some(pos));
            }
            index.upto = index.upto.max(until);
        }
        let missing: Vec<String> = {
            let index = lock()?;
            rooms
                .iter()
                .filter(|r| !index.rooms.contains_key(*r))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let found = store.latest_bumps(&missing, until).await?;
            let mut index = lock()?;
            for (room, pos) in found {
                let entry = index.rooms.entry(room).or_insert(None);
                *entry = (*entry).max(pos);
            }
        }
        let index = lock()?;
        Ok(rooms
            .iter()
            .map(|r| (r.clone(), index.rooms.get(r).copied().flatten()))
            .collect())
    }

    /// Keeps a snapshot; returns its `pos`.
    fn keep(&self, key: ConnectionKey, snapshot: Snapshot) -> Result<String> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| Error::internal("connections poisoned"))?;
        let connection = map.entry(key).or_insert_with(|| Connection {
            next: 1,
            snapshots: VecDeque::new(),
            used: Instant::now(),
        });
        let number = connection.next;
        connection.next += 1;
        connection.used = Instant::now();
        connection.snapshots.push_back((number, snapshot));
        while connection.snapshots.len() > SNAPSHOTS {
            connection.snapshots.pop_front();
        }
        Ok(format!("{}_{number}", self.nonce))
    }
}

/// The room's place in recency order: its latest bump event, else the user's membership.
fn bump_stamp(room: &ListedRoom) -> i64 {
    match room.membership.as_str() {
        "join" => room.bump_pos.unwrap_or(room.membership_pos),
        _ => room.membership_pos,
    }
}

fn room_type(room: &ListedRoom) -> Option<String> {
    let pdu: Value = serde_json::from_str(room.create_pdu.as_deref()?).ok()?;
    pdu["content"]["type"].as_str().map(str::to_owned)
}

fn type_matches(filter: &RoomTypeFilter, kind: Option<&str>) -> bool {
    match filter {
        RoomTypeFilter::Default => kind.is_none(),
        other => kind.is_some_and(|k| Some(k) == other.as_str()),
    }
}

fn passes(filters: Option<&ListFilters>, room: &ListedRoom, direct: &HashSet<String>) -> bool {
    let Some(f) = filters else {
        return true;
    };
    let kind = room_type(room);
    f.is_dm.is_none_or(|dm| dm == direct.contains(&room.room_id))
        && f.is_encrypted.is_none_or(|e| e == room.encrypted)
        && f.is_invite.is_none_or(|i| i == (room.membership == "invite"))
        && (f.room_types.is_empty() || f.room_types.iter().any(|t| type_matches(t, kind.as_deref())))
        && !f.not_room_types.iter().any(|t| type_matches(t, kind.as_deref()))
}

/// The `(start, end)` ranges of a list, checked: in order, at most [`MAX_RANGES`].
fn ranges(name: &str, list: &List) -> Result<Vec<(usize, usize)>> {
    if list.ranges.len() > MAX_RANGES {
        return Err(Error::InvalidParam(format!(
            "list {name}: at most {MAX_RANGES} ranges"
        )));
    }
    list.ranges
        .iter()
        .map(|(start, end)| {
            let (start, end) = (u64::from(*start), u64::from(*end));
            if start > end {
                return Err(Error::InvalidParam(format!(
                    "list {name}: range [{start}, {end}] ends before it starts"
                )));
            }
            Ok((
                usize::try_from(start).unwrap_or(usize::MAX),
                usize::try_from(end).unwrap_or(usize::MAX),
            ))
        })
        .collect()
}

/// Extension `lists` must name lists of the request.
fn check_extension_lists(request: &SlidingRequest) -> Result<()> {
    let e = &request.extensions;
    for names in [&e.account_data.lists, &e.receipts.lists, &e.typing.lists]
        .into_iter()
        .flatten()
    {
        if let Some(unknown) = names.iter().find(|n| !request.lists.contains_key(*n)) {
            return Err(Error::InvalidParam(format!(
                "extension names the list {unknown}, which the request does not have"
            )));
        }
    }
    Ok(())
}

impl SyncService {
    /// Answers a sliding-sync request: at once for a new connection or when anything changed
    /// since `pos`, otherwise when something does or the timeout passes.
    pub async fn sliding_sync(&self, request: &SlidingRequest) -> Result<Value> {
        for (name, list) in &request.lists {
            ranges(name, list)?;
        }
        check_extension_lists(request)?;
        let key = (
            request.user.clone(),
            request.device.clone(),
            request.conn_id.clone().unwrap_or_default(),
        );
        let base = self.connections.base(&key, request.pos.as_deref())?;
        let deadline = tokio::time::Instant::now() + request.timeout;
        let mut news = self.stream.subscribe();
        let mut aux_news = self.stream.subscribe_aux();
        loop {
            let current = SyncToken {
                events: *news.borrow_and_update(),
                aux: *aux_news.borrow_and_update(),
            };
            let (mut response, has_news, snapshot) =
                self.sliding_compute(request, base.as_ref(), current).await?;
            let waited_enough = tokio::time::Instant::now() >= deadline || self.stream.is_closed();
            if has_news || base.is_none() || waited_enough {
                response["pos"] = json!(self.connections.keep(key, snapshot)?);
                if let Some(txn_id) = &request.txn_id {
                    response["txn_id"] = json!(txn_id);
                }
                return Ok(response);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = news.changed() => {}
                _ = aux_news.changed() => {}
                () = self.stream.closed() => {}
            }
        }
    }

    async fn sliding_compute(
        &self,
        request: &SlidingRequest,
        base: Option<&Snapshot>,
        current: SyncToken,
    ) -> Result<(Value, bool, Snapshot)> {
        let user = &request.user;
        let listed = self.listed_rooms(request, current.events).await?;
        let direct = self.direct_rooms(user).await?;
        let by_id: HashMap<&str, &ListedRoom> = listed.iter().map(|r| (r.room_id.as_str(), r)).collect();
        let mut candidates: Vec<&ListedRoom> = listed
            .iter()
            .filter(|r| {
                matches!(r.membership.as_str(), "join" | "invite" | "knock")
                    && r.membership_pos <= current.events
            })
            .collect();
        candidates.sort_by(|a, b| {
            bump_stamp(b)
                .cmp(&bump_stamp(a))
                .then_with(|| a.room_id.cmp(&b.room_id))
        });

        // The rooms each list's `spaces` filter lets through: the spaces' children.
        let mut in_spaces: HashMap<&str, HashSet<String>> = HashMap::new();
        for (name, spaces) in &request.spaces {
            let mut children = HashSet::new();
            for space in spaces {
                children.extend(self.space_children(space).await?);
            }
            in_spaces.insert(name.as_str(), children);
        }
        let mut selected: BTreeMap<String, RoomConfig> = BTreeMap::new();
        let mut lists = Map::new();
        let mut list_counts = BTreeMap::new();
        let mut in_lists: HashMap<&str, HashSet<String>> = HashMap::new();
        for (name, list) in &request.lists {
            let rooms: Vec<&&ListedRoom> = candidates
                .iter()
                .filter(|r| {
                    passes(list.filters.as_ref(), r, &direct)
                        && in_spaces
                            .get(name.as_str())
                            .is_none_or(|c| c.contains(&r.room_id))
                })
                .collect();
            lists.insert(name.clone(), json!({ "count": rooms.len() }));
            list_counts.insert(name.clone(), rooms.len());
            for (start, end) in ranges(name, list)? {
                for room in rooms
                    .iter()
                    .skip(start)
                    .take(end.saturating_sub(start).saturating_add(1))
                {
                    selected.entry(room.room_id.clone()).or_default().merge(
                        list.room_details.timeline_limit.into(),
                        &list.room_details.required_state,
                    );
                    in_lists
                        .entry(name.as_str())
                        .or_default()
                        .insert(room.room_id.clone());
                }
            }
        }
        for (room_id, subscription) in &request.room_subscriptions {
            // Only rooms the user is in or invited to (peeking is not supported).
            if by_id
                .get(room_id.as_str())
                .is_some_and(|r| matches!(r.membership.as_str(), "join" | "invite" | "knock"))
            {
                selected
                    .entry(room_id.to_string())
                    .or_default()
                    .merge(subscription.timeline_limit.into(), &subscription.required_state);
            }
        }
        // Rooms left since the last answer that it had sent: the leave is shown once.
        if let Some(base) = base {
            for (room_id, sent) in &base.rooms {
                if let Some(room) = by_id.get(room_id.as_str())
                    && matches!(room.membership.as_str(), "leave" | "ban")
                    && room.membership_pos > base.token.events
                    && room.membership_pos <= current.events
                {
                    selected
                        .entry(room_id.clone())
                        .or_insert_with(|| sent.config.clone());
                }
            }
        }

        let unread = self.push.unread(user, current.events).await?;
        let mut rooms = Map::new();
        let mut snapshot = Snapshot {
            token: current,
            rooms: HashMap::new(),
            list_counts,
        };
        // What each room needs is decided first; the rooms are then built side by side (their
        // reads go to the database's read connections in parallel).
        let mut plans = Vec::with_capacity(selected.len());
        for (room_id, config) in &selected {
            let Some(listed_room) = by_id.get(room_id.as_str()) else {
                continue;
            };
            let sent = base.and_then(|b| b.rooms.get(room_id));
            let counts = unread.get(room_id).map(|u| u.total()).unwrap_or_default();
            // New to the connection, asked for differently, or joined since it was an invite:
            // sent whole. A join that became a leave is an ordinary update (the leave event).
            let initial = sent.is_none_or(|s| {
                s.config != *config
                    || (s.membership != listed_room.membership
                        && (matches!(s.membership.as_str(), "invite" | "knock")
                            || matches!(listed_room.membership.as_str(), "invite" | "knock")))
            });
            plans.push(RoomPlan {
                room_id: OwnedRoomId::try_from(room_id.as_str()).map_err(Error::internal)?,
                listed: listed_room,
                config,
                counts,
                initial,
                unread_changed: sent.is_some_and(|s| s.unread != counts),
                is_dm: direct.contains(room_id),
            });
            snapshot.rooms.insert(
                room_id.clone(),
                SentRoom {
                    config: config.clone(),
                    membership: listed_room.membership.clone(),
                    unread: counts,
                },
            );
        }
        let since = base.map(|b| b.token.events);
        let sections = futures_util::future::try_join_all(
            plans
                .iter()
                .map(|plan| self.planned_room(request, plan, since, current.events)),
        )
        .await?;
        let mut initial_rooms = Vec::new();
        for (plan, section) in plans.iter().zip(sections) {
            if let Some(section) = section {
                if plan.initial {
                    initial_rooms.push(plan.room_id.to_string());
                }
                rooms.insert(plan.room_id.to_string(), section);
            }
        }

        let (extensions, extension_news) = self
            .sliding_extensions(request, base, current, &selected, &initial_rooms, &in_lists)
            .await?;
        let lists_changed = base.is_none_or(|b| b.list_counts != snapshot.list_counts);
        let has_news = !rooms.is_empty() || extension_news || lists_changed;
        let response = json!({ "lists": lists, "rooms": rooms, "extensions": extensions });
        Ok((response, has_news, snapshot))
    }

    /// A planned room's section, or `None` when nothing is to be sent of it.
    async fn planned_room(
        &self,
        request: &SlidingRequest,
        plan: &RoomPlan<'_>,
        since: Option<i64>,
        current: i64,
    ) -> Result<Option<Value>> {
        let room = &plan.room_id;
        let listed = plan.listed;
        if matches!(listed.membership.as_str(), "invite" | "knock") {
            if !plan.initial {
                return Ok(None);
            }
            let mut section =
                json!({ "initial": true, "is_dm": plan.is_dm, "bump_stamp": bump_stamp(listed) });
            section["invite_state"] =
                self.invite_section(room, &request.user).await?["invite_state"]["events"].take();
            // An invite to another server's room: its stripped state is all there is.
            if self.rooms.is_resident(room).await? {
                self.room_summary(room, &request.user, &mut section).await?;
            }
            return Ok(Some(section));
        }
        let joined = listed.membership == "join";
        let span = RoomSpan {
            since: if plan.initial { None } else { since },
            until: if joined {
                current
            } else {
                listed.membership_pos.min(current)
            },
            joined,
            unread_changed: plan.unread_changed,
        };
        Ok(self
            .sliding_room(request, room, plan.config, span)
            .await?
            .map(|mut section| {
                section["bump_stamp"] = json!(bump_stamp(listed));
                section["is_dm"] = json!(plan.is_dm);
                section["notification_count"] = json!(plan.counts.notifications);
                section["highlight_count"] = json!(plan.counts.highlights);
                section
            }))
    }

    /// The user's memberships, from the cache while no membership changed since it was read.
    async fn memberships(&self, user: &ruma::UserId) -> Result<Arc<Vec<(String, String, i64)>>> {
        let epoch = self.rooms.membership_epoch();
        let cache = &self.connections.memberships;
        if let Some((seen, list)) = cache.lock().ok().and_then(|c| c.get(user).cloned())
            && seen == epoch
        {
            return Ok(list);
        }
        let list = Arc::new(self.store.user_memberships(user.as_str()).await?);
        if let Ok(mut cache) = cache.lock() {
            if cache.len() >= MAX_CACHED_USERS {
                cache.clear();
            }
            cache.insert(user.to_owned(), (epoch, list.clone()));
        }
        Ok(list)
    }

    /// The user's rooms with what sorting needs, and what the request's filters need.
    async fn listed_rooms(&self, request: &SlidingRequest, until: i64) -> Result<Vec<ListedRoom>> {
        let user = request.user.as_str();
        let memberships = self.memberships(&request.user).await?;
        let ids: Vec<String> = memberships.iter().map(|(room, _, _)| room.clone()).collect();
        let bumps = self.connections.bumps(&self.store, &ids, until).await?;
        let filters = || request.lists.values().filter_map(|l| l.filters.as_ref());
        let creates: HashMap<String, String> =
            if filters().any(|f| !f.room_types.is_empty() || !f.not_room_types.is_empty()) {
                self.store
                    .state_of_user_rooms(user, "m.room.create")
                    .await?
                    .into_iter()
                    .collect()
            } else {
                HashMap::new()
            };
        let encrypted: HashSet<String> = if filters().any(|f| f.is_encrypted.is_some()) {
            self.store
                .state_of_user_rooms(user, "m.room.encryption")
                .await?
                .into_iter()
                .map(|(room, _)| room)
                .collect()
        } else {
            HashSet::new()
        };
        Ok(memberships
            .iter()
            .map(|(room_id, membership, membership_pos)| ListedRoom {
                bump_pos: bumps.get(room_id).copied().flatten(),
                create_pdu: creates.get(room_id).cloned(),
                encrypted: encrypted.contains(room_id),
                room_id: room_id.clone(),
                membership: membership.clone(),
                membership_pos: *membership_pos,
            })
            .collect())
    }

    /// A joined (or just left) room's section: everything for an initial one (`since` None),
    /// what happened after `since` otherwise — `None` when nothing did.
    async fn sliding_room(
        &self,
        request: &SlidingRequest,
        room_id: &RoomId,
        config: &RoomConfig,
        span: RoomSpan,
    ) -> Result<Option<Value>> {
        let RoomSpan {
            since,
            until,
            joined,
            unread_changed,
        } = span;
        let limit = config.timeline_limit as i64;
        let mut rows = self
            .store
            .room_events(room_id.as_str(), since.unwrap_or(0), until, limit + 1, true)
            .await?;
        let limited = rows.len() as i64 > limit;
        if limited {
            rows.remove(0);
        }
        let state_changes: Vec<std::sync::Arc<Pdu>> = match since {
            Some(since) => self
                .rooms
                .current_state(room_id)
                .await?
                .into_iter()
                .filter(|e| e.stream_pos > since && e.stream_pos <= until)
                .collect(),
            None => Vec::new(),
        };
        if since.is_some() && rows.is_empty() && state_changes.is_empty() && !unread_changed {
            return Ok(None);
        }
        let mut timeline: Vec<Pdu> = rows.into_iter().map(Pdu::from_row).collect::<Result<_>>()?;
        // A member of a room whose history is shared sees all of it: no membership history is
        // read for it.
        if !(joined && self.history_shared(room_id).await?) {
            let visibility = self.rooms.visibility(room_id, &request.user).await?;
            timeline.retain(|e| visibility.can_see(e));
        }
        let start = timeline.first().map_or(until, |e| e.stream_pos - 1);
        let mut lazy: HashSet<&str> = timeline.iter().map(|e| e.sender.as_str()).collect();
        lazy.insert(request.user.as_str());
        let in_timeline: HashSet<_> = timeline.iter().map(|e| e.event_id.clone()).collect();
        let state = match since {
            // A joined room's state is the current state, in memory.
            None if joined => self.rooms.current_state(room_id).await?,
            None => self.rooms.state_at(room_id, until).await?,
            Some(_) => state_changes,
        };
        let user = request.user.as_str();
        let viewer = Some((&*request.user, request.device.as_str()));
        let required_state: Vec<Value> = state
            .iter()
            .filter(|e| {
                config.wants(e, user, &lazy) && !(since.is_some() && in_timeline.contains(&e.event_id))
            })
            .map(|e| to_value(e, viewer))
            .collect();
        let events: Vec<Value> = timeline.iter().map(|e| to_value(e, viewer)).collect();
        let mut section = json!({
            "timeline": events,
            "required_state": required_state,
            "prev_batch": StreamToken(start).to_string(),
            "limited": limited,
            "num_live": if since.is_some() { timeline.len() } else { 0 },
        });
        if since.is_none() {
            section["initial"] = json!(true);
        }
        self.room_summary(room_id, &request.user, &mut section).await?;
        Ok(Some(section))
    }

    /// The rooms a space names as children (`m.space.child` with a non-empty `via`).
    async fn space_children(&self, space: &RoomId) -> Result<Vec<String>> {
        if !self.rooms.is_resident(space).await? {
            return Ok(Vec::new());
        }
        Ok(self
            .rooms
            .current_state(space)
            .await?
            .iter()
            .filter(|e| e.event_type == "m.space.child")
            .filter(|e| {
                e.content_value()["via"]
                    .as_array()
                    .is_some_and(|via| !via.is_empty())
            })
            .filter_map(|e| e.state_key.clone())
            .collect())
    }

    /// Whether the room's history is `shared` or `world_readable` (what every member sees whole).
    async fn history_shared(&self, room_id: &RoomId) -> Result<bool> {
        let setting = self
            .rooms
            .state_event(room_id, &ruma::events::StateEventType::RoomHistoryVisibility, "")
            .await?;
        let value = setting.map(|e| {
            e.content_value()["history_visibility"]
                .as_str()
                .map(str::to_owned)
        });
        Ok(matches!(
            value.flatten().as_deref(),
            None | Some("shared" | "world_readable")
        ))
    }

    /// Name, avatar, member counts and — for a room without a name — heroes.
    async fn room_summary(&self, room_id: &RoomId, user: &ruma::UserId, section: &mut Value) -> Result<()> {
        let (mut joined, mut invited) = (0usize, 0usize);
        let (mut name, mut avatar) = (None, None);
        let mut heroes = Vec::new();
        for event in self.rooms.current_state(room_id).await? {
            let content = || event.content_value();
            match event.event_type.as_str() {
                "m.room.name" => {
                    name = content()["name"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                }
                "m.room.avatar" => avatar = content()["url"].as_str().map(str::to_owned),
                "m.room.member" => {
                    let membership = event.membership().unwrap_or_default();
                    match membership.as_str() {
                        "join" => joined += 1,
                        "invite" => invited += 1,
                        _ => continue,
                    }
                    if let Some(member) = &event.state_key
                        && member != user.as_str()
                        && heroes.len() < 5
                    {
                        let c = content();
                        let mut hero = json!({ "user_id": member });
                        if let Some(n) = c["displayname"].as_str() {
                            hero["displayname"] = json!(n);
                        }
                        if let Some(a) = c["avatar_url"].as_str() {
                            hero["avatar_url"] = json!(a);
                        }
                        heroes.push(hero);
                    }
                }
                _ => {}
            }
        }
        section["joined_count"] = json!(joined);
        section["invited_count"] = json!(invited);
        match name {
            Some(name) => section["name"] = json!(name),
            None => section["heroes"] = json!(heroes),
        }
        if let Some(avatar) = avatar {
            section["avatar"] = json!(avatar);
        }
        Ok(())
    }

    /// Rooms `m.direct` names as direct chats.
    async fn direct_rooms(&self, user: &ruma::UserId) -> Result<HashSet<String>> {
        let Some(text) = self.store.account_data(user.as_str(), "", "m.direct").await? else {
            return Ok(HashSet::new());
        };
        let direct: Value = serde_json::from_str(&text).unwrap_or_default();
        Ok(direct
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect())
    }

    async fn sliding_extensions(
        &self,
        request: &SlidingRequest,
        base: Option<&Snapshot>,
        current: SyncToken,
        selected: &BTreeMap<String, RoomConfig>,
        initial_rooms: &[String],
        in_lists: &HashMap<&str, HashSet<String>>,
    ) -> Result<(Map<String, Value>, bool)> {
        let user = &request.user;
        let e = &request.extensions;
        let since = base.map(|b| b.token);
        let mut out = Map::new();
        let mut news = false;
        // Rooms an extension covers: those of the lists it names (all by default) and the
        // subscriptions.
        let covered = |lists: &Option<Vec<String>>| -> HashSet<String> {
            let mut rooms: HashSet<String> = match lists {
                Some(names) => names
                    .iter()
                    .filter_map(|n| in_lists.get(n.as_str()))
                    .flatten()
                    .cloned()
                    .collect(),
                None => selected.keys().cloned().collect(),
            };
            rooms.extend(request.room_subscriptions.keys().map(|r| r.to_string()));
            rooms.retain(|r| selected.contains_key(r));
            rooms
        };

        if e.to_device.enabled == Some(true) {
            let ack = match &e.to_device.since {
                Some(token) => token
                    .parse::<i64>()
                    .map_err(|_| Error::InvalidParam(format!("invalid to_device since {token}")))?,
                None => 0,
            };
            let mut events = self
                .e2ee
                .to_device_for(user, &request.device, ack, current.aux)
                .await?;
            if let Some(limit) = e.to_device.limit {
                events.truncate(u64::from(limit) as usize);
            }
            news |= !events.is_empty();
            out.insert(
                "to_device".to_owned(),
                json!({ "next_batch": current.aux.to_string(), "events": events }),
            );
        }
        if e.e2ee.enabled == Some(true) {
            let (changed, left) = match since {
                Some(since) => self.device_list_delta(user, since, current).await?,
                None => (Vec::new(), Vec::new()),
            };
            let counts = self.e2ee.counts(user, &request.device).await?;
            let fallback = self.e2ee.unused_fallback_types(user, &request.device).await?;
            let mut e2ee = json!({
                "device_one_time_keys_count": counts,
                "device_unused_fallback_key_types": fallback,
            });
            // Counts alone are not news (they are in every answer).
            if !changed.is_empty() || !left.is_empty() {
                news = true;
                e2ee["device_lists"] = json!({ "changed": changed, "left": left });
            }
            out.insert("e2ee".to_owned(), e2ee);
        }
        if e.account_data.enabled == Some(true) {
            let rooms_covered = covered(&e.account_data.lists);
            let after = since.map_or(0, |s| s.aux);
            let store = &self.store;
            let mut global = Vec::new();
            let mut by_room: Map<String, Value> = Map::new();
            let mut add = |room: String, kind: String, content: String| {
                let event = json!({ "type": kind, "content": serde_json::from_str::<Value>(&content).unwrap_or_default() });
                if room.is_empty() {
                    global.push(event);
                } else if let Some(events) = by_room.entry(room).or_insert_with(|| json!([])).as_array_mut() {
                    events.push(event);
                }
            };
            // What changed since the last answer, of covered rooms that are not new to it…
            for (room, kind, content) in store
                .account_data_changes(user.as_str(), after, current.aux)
                .await?
            {
                let fresh = since.is_some() && initial_rooms.contains(&room);
                if room.is_empty() || (rooms_covered.contains(&room) && !fresh) {
                    add(room, kind, content);
                }
            }
            // …and everything of the rooms that are.
            if since.is_some() && initial_rooms.iter().any(|r| rooms_covered.contains(r)) {
                for (room, kind, content) in store.account_data_changes(user.as_str(), 0, current.aux).await?
                {
                    if initial_rooms.contains(&room) && rooms_covered.contains(&room) {
                        add(room, kind, content);
                    }
                }
            }
            if !global.is_empty() || !by_room.is_empty() {
                news = true;
                out.insert(
                    "account_data".to_owned(),
                    json!({ "global": global, "rooms": by_room }),
                );
            }
        }
        if e.receipts.enabled == Some(true) {
            let rooms_covered = covered(&e.receipts.lists);
            let own = user.as_str().to_owned();
            let fresh: Vec<String> = initial_rooms
                .iter()
                .filter(|r| rooms_covered.contains(*r))
                .cloned()
                .collect();
            let mut receipts = self
                .ephemeral
                .receipts_of_rooms(&fresh, |reader| reader == own)
                .await?;
            if let Some(since) = since {
                for (room, event) in self
                    .ephemeral
                    .receipts_since(since.aux, current.aux, |reader| reader == own)
                    .await?
                {
                    if rooms_covered.contains(&room) && !receipts.contains_key(&room) {
                        receipts.insert(room, event);
                    }
                }
            }
            if !receipts.is_empty() {
                news = true;
                out.insert("receipts".to_owned(), json!({ "rooms": receipts }));
            }
        }
        if e.typing.enabled == Some(true) {
            let mut typing = Map::new();
            for room in covered(&e.typing.lists) {
                let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else {
                    continue;
                };
                let after = if initial_rooms.contains(&room) {
                    None
                } else {
                    since.map(|s| s.aux)
                };
                if let Some(users) = self.ephemeral.typing_since(&room_id, after)
                    && (after.is_some() || !users.is_empty())
                {
                    typing.insert(
                        room,
                        json!({ "type": "m.typing", "content": { "user_ids": users } }),
                    );
                }
            }
            if !typing.is_empty() {
                news = true;
                out.insert("typing".to_owned(), json!({ "rooms": typing }));
            }
        }
        Ok((out, news))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, membership: &str, membership_pos: i64, bump_pos: Option<i64>) -> ListedRoom {
        ListedRoom {
            room_id: id.to_owned(),
            membership: membership.to_owned(),
            membership_pos,
            bump_pos,
            create_pdu: None,
            encrypted: false,
        }
    }

    #[test]
    fn joined_rooms_rank_by_their_latest_message_invites_by_the_invite() {
        assert_eq!(bump_stamp(&room("!a:x", "join", 5, Some(40))), 40);
        assert_eq!(bump_stamp(&room("!a:x", "join", 5, None)), 5);
        assert_eq!(bump_stamp(&room("!a:x", "invite", 7, Some(40))), 7);
    }

    #[test]
    fn ranges_in_order_only() {
        let mut list = List::default();
        list.ranges = vec![(0u32.into(), 19u32.into())];
        assert_eq!(ranges("all", &list).expect("ok"), [(0, 19)]);
        list.ranges = vec![(5u32.into(), 1u32.into())];
        assert!(matches!(ranges("all", &list), Err(Error::InvalidParam(_))));
        list.ranges = vec![(0u32.into(), 1u32.into()); MAX_RANGES + 1];
        assert!(matches!(ranges("all", &list), Err(Error::InvalidParam(_))));
    }

    #[test]
    fn filters_combine_with_and() {
        let mut space = room("!s:x", "join", 1, None);
        space.create_pdu = Some(r#"{"content":{"type":"m.space"}}"#.to_owned());
        let mut encrypted_dm = room("!d:x", "join", 1, None);
        encrypted_dm.encrypted = true;
        let direct: HashSet<String> = ["!d:x".to_owned()].into();
        let mut f = ListFilters::default();
        f.not_room_types = vec![RoomTypeFilter::Space];
        assert!(!passes(Some(&f), &space, &direct));
        assert!(passes(Some(&f), &encrypted_dm, &direct));
        f.is_dm = Some(true);
        f.is_encrypted = Some(true);
        assert!(passes(Some(&f), &encrypted_dm, &direct));
        f.is_encrypted = Some(false);
        assert!(!passes(Some(&f), &encrypted_dm, &direct));
        let mut only_spaces = ListFilters::default();
        only_spaces.room_types = vec![RoomTypeFilter::Space];
        assert!(passes(Some(&only_spaces), &space, &direct));
        assert!(!passes(Some(&only_spaces), &encrypted_dm, &direct));
    }
}
