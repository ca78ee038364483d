//! Ephemeral data: typing notifications (in memory, expiring), read receipts (stored) and
//! presence (in memory). Every change takes a position on the auxiliary stream, which wakes
//! `/sync` and is how clients and application services learn what changed since their token.
//! What this server's users do goes to the other servers concerned through the outbox; what
//! other servers' users do arrives through the same calls (`crate::federation::edus`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Map, Value, json};
use switchboard_store::Store;

use crate::{
    Error, Result,
    federation::outbox::{Edu, Outbox},
    stream::EventStream,
    util::now_ms,
};

/// Typing lasts at most this long without a refresh, whatever the client asks.
const MAX_TYPING: Duration = Duration::from_secs(120);

#[derive(Default)]
struct RoomTyping {
    users: HashMap<OwnedUserId, Instant>,
    /// Auxiliary position of the last change.
    pos: i64,
}

#[derive(Clone, Debug)]
pub struct Presence {
    pub presence: String,
    pub status_msg: Option<String>,
    pub last_active_ms: u64,
    pub pos: i64,
}

impl Presence {
    /// The `m.presence` content as of `now` (no `status_msg` when there is none: clients
    /// validate it as a string).
    pub fn content(&self, now: u64) -> Value {
        let mut content = json!({
            "presence": self.presence,
            "last_active_ago": now.saturating_sub(self.last_active_ms),
            "currently_active": self.presence == "online",
        });
        if let Some(status) = &self.status_msg {
            content["status_msg"] = json!(status);
        }
        content
    }
}

pub struct Ephemeral {
    store: Store,
    stream: Arc<EventStream>,
    outbox: Arc<Outbox>,
    /// `use_presence`: whether presence crosses servers.
    federate_presence: bool,
    typing: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
    presence: Mutex<HashMap<OwnedUserId, Presence>>,
}

pub const RECEIPT_TYPES: &[&str] = &["m.read", "m.read.private"];

impl Ephemeral {
    pub fn new(
        store: Store,
        stream: Arc<EventStream>,
        outbox: Arc<Outbox>,
        federate_presence: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            stream,
            outbox,
            federate_presence,
            typing: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
        })
    }

    /// Starts or stops `user` typing in `room`; typing expires after `timeout` by itself.
    pub async fn set_typing(self: &Arc<Self>, room: &RoomId, user: &UserId, typing: bool, timeout: Duration) {
        let timeout = timeout.min(MAX_TYPING);
        let changed = {
            let Ok(mut rooms) = self.typing.lock() else { return };
            let entry = rooms.entry(room.to_owned()).or_default();
            if typing {
                entry
                    .users
                    .insert(user.to_owned(), Instant::now() + timeout)
                    .is_none()
            } else {
                entry.users.remove(user).is_some()
            }
        };
        if changed {
            self.bump_typing(room).await;
        }
        // A refresh goes out too: the other servers time typing out by themselves.
        self.send_typing(room, user, typing).await;
        if typing {
            let this = self.clone();
            let (room, user) = (room.to_owned(), user.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                this.expire(&room, &user).await;
            });
        }
    }

    async fn expire(&self, room: &RoomId, user: &UserId) {
        let expired = self.typing.lock().ok().is_some_and(|mut rooms| {
            let Some(entry) = rooms.get_mut(room) else {
                return false;
            };
            let due = entry
                .users
                .get(user)
                .is_some_and(|until| *until <= Instant::now());
            if due {
                entry.users.remove(user);
            }
            due
        });
        if expired {
            self.bump_typing(room).await;
            self.send_typing(room, user, false).await;
        }
    }

    /// Tells the room's other servers that a local user started or stopped typing.
    async fn send_typing(&self, room: &RoomId, user: &UserId, typing: bool) {
        if !self.outbox.is_local(user) {
            return;
        }
        let edu = Edu {
            edu_type: "m.typing",
            content: json!({ "room_id": room, "user_id": user, "typing": typing }),
            replace_key: Some(format!("typing {room} {user}")),
        };
        if let Err(e) = self.outbox.to_room(room, edu).await {
            tracing::warn!(%room, %user, error = %e, "typing not queued for other servers");
        }
    }

    /// Takes a new auxiliary position for the room's typing set; the position is recorded before
    /// it is announced, so a woken reader sees it.
    async fn bump_typing(&self, room: &RoomId) {
        let _ = self
            .stream
            .aux_write(|pos| async move {
                if let Ok(mut rooms) = self.typing.lock() {
                    let entry = rooms.entry(room.to_owned()).or_default();
                    entry.pos = entry.pos.max(pos);
                }
                Ok(())
            })
            .await;
    }

    /// The typing users of a room, if that changed after `since` (aux position).
    pub fn typing_since(&self, room: &RoomId, since: Option<i64>) -> Option<Vec<OwnedUserId>> {
        let rooms = self.typing.lock().ok()?;
        let entry = rooms.get(room)?;
        if since.is_some_and(|s| entry.pos <= s) {
            return None;
        }
        let now = Instant::now();
        Some(
            entry
                .users
                .iter()
                .filter(|(_, until)| **until > now)
                .map(|(u, _)| u.clone())
                .collect(),
        )
    }

    /// Rooms whose typing changed after `since`, with the position of the change.
    pub fn typing_rooms_since(&self, since: i64) -> Vec<(OwnedRoomId, i64)> {
        self.typing
            .lock()
            .map(|rooms| {
                rooms
                    .iter()
                    .filter(|(_, t)| t.pos > since)
                    .map(|(r, t)| (r.clone(), t.pos))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn set_receipt(
        &self,
        room: &RoomId,
        kind: &str,
        user: &UserId,
        event_id: &str,
        thread: Option<&str>,
    ) -> Result<()> {
        if !RECEIPT_TYPES.contains(&kind) {
            return Err(Error::InvalidParam(format!("unknown receipt type `{kind}`")));
        }
        let ts = now_ms() as i64;
        let thread_id = thread.unwrap_or("");
        if self.outbox.is_local(user) {
            crate::push::receipt_read(&self.store, user, room.as_str(), thread, event_id).await?;
        }
        self.stream
            .aux_write(|pos| async move {
                Ok(self
                    .store
                    .set_receipt(room.as_str(), kind, user.as_str(), thread_id, event_id, ts, pos)
                    .await?)
            })
            .await?;
        // Private receipts never leave the server.
        if kind == "m.read" && self.outbox.is_local(user) {
            let mut data = json!({ "ts": ts });
            if let Some(thread) = thread {
                data["thread_id"] = json!(thread);
            }
            let content = json!({
                room.as_str(): { "m.read": { user.as_str(): { "data": data, "event_ids": [event_id] } } }
            });
            let edu = Edu {
                edu_type: "m.receipt",
                content,
                replace_key: Some(format!("receipt {room} {user} {thread_id}")),
            };
            self.outbox.to_room(room, edu).await?;
        }
        Ok(())
    }

    /// `m.receipt` content per room for receipts changed in `(after, until]`, as `viewer` may see
    /// them (private receipts only their own, or — for services — their namespace's).
    pub async fn receipts_since(
        &self,
        after: i64,
        until: i64,
        may_see_private: impl Fn(&str) -> bool,
    ) -> Result<HashMap<String, Value>> {
        let rows = self.store.receipt_changes(after, until).await?;
        Ok(receipt_events_by_room(rows, may_see_private))
    }

    /// Every stored receipt of these rooms (the latest of each user), as `receipts_since` shapes
    /// them: what a client starting on a room needs, read without scanning other rooms.
    pub async fn receipts_of_rooms(
        &self,
        rooms: &[String],
        may_see_private: impl Fn(&str) -> bool,
    ) -> Result<HashMap<String, Value>> {
        let rows = self.store.room_receipts(rooms).await?;
        Ok(receipt_events_by_room(rows, may_see_private))
    }

    /// One `m.receipt` event per receipt changed in `(after, until]`, with its position and room —
    /// what application services get, in stream order.
    pub async fn receipt_events(
        &self,
        after: i64,
        until: i64,
        may_see_private: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, i64, Value)>> {
        let mut out = Vec::new();
        for (room, kind, user, thread, event_id, ts, pos) in self.store.receipt_changes(after, until).await? {
            if kind == "m.read.private" && !may_see_private(&user) {
                continue;
            }
            let mut receipt = json!({ "ts": ts });
            if !thread.is_empty() {
                receipt["thread_id"] = json!(thread);
            }
            let content = json!({ event_id: { kind: { user: receipt } } });
            out.push((room, pos, json!({ "type": "m.receipt", "content": content })));
        }
        Ok(out)
    }

    /// Sets a user's presence; `last_active_ago` is how long ago they were last active (other
    /// servers say; a local user is active now).
    pub async fn set_presence(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<String>,
        last_active_ago: u64,
    ) -> Result<()> {
        if !["online", "offline", "unavailable"].contains(&presence) {
            return Err(Error::InvalidParam(format!("unknown presence `{presence}`")));
        }
        let owned = (user.to_owned(), presence.to_owned(), status_msg.clone());
        self.stream
            .aux_write(|pos| async move {
                let (user, presence, status_msg) = owned;
                if let Ok(mut all) = self.presence.lock() {
                    all.insert(
                        user,
                        Presence {
                            presence,
                            status_msg,
                            last_active_ms: now_ms().saturating_sub(last_active_ago),
                            pos,
                        },
                    );
                }
                Ok(())
            })
            .await?;
        // Only to servers sharing a room with the user (Synapse's rule too).
        if self.federate_presence && self.outbox.is_local(user) {
            let mut state = json!({
                "user_id": user,
                "presence": presence,
                "last_active_ago": last_active_ago,
                "currently_active": presence == "online",
            });
            if let Some(status) = status_msg {
                state["status_msg"] = json!(status);
            }
            let edu = Edu {
                edu_type: "m.presence",
                content: json!({ "push": [state] }),
                replace_key: Some(format!("presence {user}")),
            };
            self.outbox.to_peers_of(user, edu).await?;
        }
        Ok(())
    }

    /// Whether presence crosses servers (`use_presence`).
    pub fn federates_presence(&self) -> bool {
        self.federate_presence
    }

    pub fn presence(&self, user: &UserId) -> Option<Presence> {
        self.presence.lock().ok()?.get(user).cloned()
    }

    /// `m.presence` events of the given users that changed after `since`.
    pub fn presence_since(&self, since: i64, users: impl Fn(&UserId) -> bool) -> Vec<Value> {
        self.presence_items(since, i64::MAX, users)
            .into_iter()
            .map(|(_, event)| event)
            .collect()
    }

    /// `m.presence` events changed in `(after, until]`, with their positions.
    pub fn presence_items(
        &self,
        after: i64,
        until: i64,
        users: impl Fn(&UserId) -> bool,
    ) -> Vec<(i64, Value)> {
        let Ok(all) = self.presence.lock() else {
            return Vec::new();
        };
        let now = now_ms();
        all.iter()
            .filter(|(user, p)| p.pos > after && p.pos <= until && users(user))
            .map(|(user, p)| {
                let event = json!({
                    "type": "m.presence",
                    "sender": user,
                    "content": p.content(now),
                });
                (p.pos, event)
            })
            .collect()
    }
}

type ReceiptRow = (String, String, String, String, String, i64, i64);

/// One `m.receipt` event per room from stored receipt rows, leaving out others' private ones.
fn receipt_events_by_room(
    rows: Vec<ReceiptRow>,
    may_see_private: impl Fn(&str) -> bool,
) -> HashMap<String, Value> {
    let mut rooms: HashMap<String, Map<String, Value>> = HashMap::new();
    for (room, kind, user, thread, event_id, ts, _) in rows {
        if kind == "m.read.private" && !may_see_private(&user) {
            continue;
        }
        let mut receipt = json!({ "ts": ts });
        if !thread.is_empty() {
            receipt["thread_id"] = json!(thread);
        }
        let content = rooms.entry(room).or_default();
        let by_event = content.entry(event_id).or_insert_with(|| json!({}));
        by_event[kind.as_str()][user.as_str()] = receipt;
    }
    rooms
        .into_iter()
        .map(|(room, content)| (room, json!({ "type": "m.receipt", "content": content })))
        .collect()
}
