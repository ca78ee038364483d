//! Rooms: the event pipeline, room creation, membership, aliases and history.
//!
//! Each room has one [`RoomHandle`] in memory holding its current state and forward extremity
//! behind an async lock. Every event — client-sent or server-made — goes through
//! [`Rooms::send`] (see `pipeline.rs`), which holds that lock from building the event until it is
//! stored, so `prev_events` are always right; rooms proceed in parallel.

mod aliases;
mod content;
mod create;
mod dag;
mod directory;
mod history;
mod membership;
mod pipeline;
mod redaction;
mod remote;
mod state;
mod txns;
mod upgrade;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, UserId,
    events::{StateEventType, TimelineEventType},
};
use switchboard_store::Store;
use tokio::sync::Mutex;

/// The content checks of interpreted state events, reachable for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub use content::check as check_state_content;
pub use create::CreateRoom;
pub use directory::{Listing, PublicRooms};
pub use history::{Context, Direction, MessagesPage, PageToken, Visibility};
pub use pipeline::EventDraft;
pub use remote::Received;

use crate::{
    Error, Result,
    appservice::interest::RoomAudience,
    keys::SigningKey,
    pdu::{Pdu, RoomVersion},
    stream::EventStream,
};

/// Current state, keyed by `(type, state_key)`.
pub type StateMap = HashMap<(StateEventType, String), Arc<Pdu>>;

pub struct RoomHandle {
    pub room_id: OwnedRoomId,
    pub version: RoomVersion,
    inner: Mutex<RoomInner>,
}

struct RoomInner {
    state: StateMap,
    /// The forward extremities (events nothing points at yet) and their depths. One while only
    /// this server writes; more when servers sent events concurrently. New local events name
    /// them all as `prev_events`, which merges the branches.
    extremities: Vec<(OwnedEventId, u64)>,
    /// The snapshot of the current state and its chain length, once known (a room stored before
    /// snapshots existed gets a full one with its next event).
    snapshot: Option<(i64, i64)>,
}

pub struct Rooms {
    store: Store,
    server_name: OwnedServerName,
    key: Arc<SigningKey>,
    stream: Arc<EventStream>,
    default_version: String,
    cache: StdMutex<HashMap<OwnedRoomId, Arc<RoomHandle>>>,
    /// Local joined members and aliases per room, for application-service interest.
    audiences: StdMutex<HashMap<OwnedRoomId, Arc<RoomAudience>>>,
    /// Bumped on every membership or alias change; an audience computed across a bump is not cached.
    audience_epoch: AtomicU64,
    txns: txns::TxnMemory,
    snapshots: state::Snapshots,
}

impl Rooms {
    pub fn new(
        store: Store,
        server_name: OwnedServerName,
        key: Arc<SigningKey>,
        stream: Arc<EventStream>,
        default_version: String,
    ) -> Self {
        Self {
            store,
            server_name,
            key,
            stream,
            default_version,
            cache: StdMutex::new(HashMap::new()),
            audiences: StdMutex::new(HashMap::new()),
            audience_epoch: AtomicU64::new(0),
            txns: txns::TxnMemory::default(),
            snapshots: state::Snapshots::default(),
        }
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.server_name
    }

    /// The in-memory handle of a room, loading it from the database on first use.
    pub async fn handle(&self, room_id: &RoomId) -> Result<Arc<RoomHandle>> {
        if let Some(handle) = self.cached(room_id) {
            return Ok(handle);
        }
        let version = self
            .store
            .room_version(room_id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("Unknown room {room_id}")))?;
        let version = RoomVersion::joinable(&version)?;
        let mut state = StateMap::new();
        for row in self.store.current_state(room_id.as_str()).await? {
            let pdu = Pdu::from_row(row)?;
            let key = (
                StateEventType::from(pdu.kind.to_string()),
                pdu.state_key.clone().unwrap_or_default(),
            );
            state.insert(key, Arc::new(pdu));
        }
        let extremities = self
            .store
            .room_extremities(room_id.as_str())
            .await?
            .into_iter()
            .map(|(id, depth)| {
                OwnedEventId::try_from(id.as_str())
                    .map(|id| (id, depth as u64))
                    .map_err(|e| Error::Internal(format!("stored event ID {id}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let handle = Arc::new(RoomHandle {
            room_id: room_id.to_owned(),
            version,
            inner: Mutex::new(RoomInner {
                state,
                snapshot: match extremities.as_slice() {
                    [(only, _)] => self.snapshot_of(only.as_str()).await?,
                    _ => None,
                },
                extremities,
            }),
        });
        // Another request may have loaded it meanwhile; keep the first so there is one lock per room.
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::internal("room cache poisoned"))?;
        Ok(cache.entry(room_id.to_owned()).or_insert(handle).clone())
    }

    /// Drops the in-memory handle, so the next use loads the room from the database again.
    pub(crate) fn forget_handle(&self, room_id: &RoomId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(room_id);
        }
    }

    /// Whether this server holds the room's state (it has its create event), as opposed to
    /// knowing only an invite to it.
    pub async fn is_resident(&self, room_id: &RoomId) -> Result<bool> {
        match self.state_event(room_id, &StateEventType::RoomCreate, "").await {
            Ok(create) => Ok(create.is_some()),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The state an invitee sees of a room before joining (the spec's stripped state).
    pub async fn stripped_state(&self, room_id: &RoomId) -> Result<Vec<serde_json::Value>> {
        let handle = self.handle(room_id).await?;
        let inner = handle.inner.lock().await;
        Ok(pipeline::stripped_state(
            &pipeline::StateView::over(&inner.state),
            None,
        ))
    }

    fn cached(&self, room_id: &RoomId) -> Option<Arc<RoomHandle>> {
        self.cache.lock().ok()?.get(room_id).cloned()
    }

    fn insert_handle(&self, handle: Arc<RoomHandle>) -> Result<()> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::internal("room cache poisoned"))?;
        cache.insert(handle.room_id.clone(), handle);
        Ok(())
    }

    /// One current state event.
    pub async fn state_event(
        &self,
        room_id: &RoomId,
        kind: &StateEventType,
        state_key: &str,
    ) -> Result<Option<Arc<Pdu>>> {
        let handle = self.handle(room_id).await?;
        let inner = handle.inner.lock().await;
        Ok(inner.state.get(&(kind.clone(), state_key.to_owned())).cloned())
    }

    /// All current state events, oldest first.
    pub async fn current_state(&self, room_id: &RoomId) -> Result<Vec<Arc<Pdu>>> {
        let handle = self.handle(room_id).await?;
        let inner = handle.inner.lock().await;
        let mut events: Vec<_> = inner.state.values().cloned().collect();
        events.sort_by_key(|e| e.stream_pos);
        Ok(events)
    }

    /// A user's current membership in a room (`join`, `invite`, `leave`, `ban`, `knock`).
    pub async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<String>> {
        Ok(self
            .state_event(room_id, &StateEventType::RoomMember, user_id.as_str())
            .await?
            .and_then(|e| e.membership()))
    }

    /// Members with the given membership.
    pub async fn members_with(&self, room_id: &RoomId, membership: &str) -> Result<Vec<Arc<Pdu>>> {
        Ok(self
            .current_state(room_id)
            .await?
            .into_iter()
            .filter(|e| {
                e.kind == TimelineEventType::RoomMember && e.membership().as_deref() == Some(membership)
            })
            .collect())
    }

    /// Fails with `M_FORBIDDEN` unless the user is joined.
    pub async fn require_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        match self.membership(room_id, user_id).await? {
            Some(m) if m == "join" => Ok(()),
            _ => Err(Error::Forbidden(format!(
                "User {user_id} is not in room {room_id}"
            ))),
        }
    }

    /// Rooms the user is joined to.
    pub async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<String>> {
        Ok(self
            .store
            .user_memberships(user_id.as_str())
            .await?
            .into_iter()
            .filter(|(_, membership, _)| membership == "join")
            .map(|(room, _, _)| room)
            .collect())
    }

    /// The display name of a local user who must exist (`404 M_NOT_FOUND` otherwise, as Synapse
    /// answers an invite to an unknown user).
    pub async fn require_local_user(&self, user_id: &UserId) -> Result<Option<String>> {
        if user_id.server_name() != self.server_name {
            return Err(Error::Forbidden(format!(
                "{user_id} is not a user of this server; federation is not supported"
            )));
        }
        let user = self
            .store
            .user(user_id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("Unknown user {user_id}")))?;
        Ok(Some(
            user.displayname.unwrap_or_else(|| user_id.localpart().to_owned()),
        ))
    }

    /// Who and what makes a room interesting to application services: local joined members and
    /// local aliases. Cached until they change.
    pub async fn audience(&self, room_id: &RoomId) -> Result<Arc<RoomAudience>> {
        if let Some(audience) = self.audiences.lock().ok().and_then(|a| a.get(room_id).cloned()) {
            return Ok(audience);
        }
        let epoch = self.audience_epoch.load(Ordering::Acquire);
        let suffix = format!(":{}", self.server_name);
        let local_joined = self
            .store
            .joined_members(room_id.as_str())
            .await?
            .into_iter()
            .filter(|u| u.ends_with(&suffix))
            .collect();
        let aliases = self.store.room_aliases(room_id.as_str()).await?;
        let audience = Arc::new(RoomAudience {
            local_joined,
            aliases,
        });
        // The epoch is compared under the lock `audience_changed` bumps it under: checked outside,
        // a change could bump it and remove the entry between the check and the insert, and this
        // audience from before the change would stay cached until the room's next change.
        if let Ok(mut audiences) = self.audiences.lock()
            && self.audience_epoch.load(Ordering::Acquire) == epoch
        {
            audiences.insert(room_id.to_owned(), audience.clone());
        }
        Ok(audience)
    }

    /// Changes whenever any membership (or alias) changes, before the change is announced: what
    /// was read of memberships under one value stays true while it holds.
    pub fn membership_epoch(&self) -> u64 {
        self.audience_epoch.load(Ordering::Acquire)
    }

    /// Called once a change of the room's local members or aliases is stored, so that a reader of
    /// the database sees it (for events: before they are announced).
    pub(crate) fn audience_changed(&self, room_id: &RoomId) {
        // Held across the bump and the removal (also when poisoned), so `audience` sees both or
        // neither.
        let audiences = self.audiences.lock();
        self.audience_epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut audiences) = audiences {
            audiences.remove(room_id);
        }
    }

    /// A stored event by ID.
    pub async fn event(&self, event_id: &str) -> Result<Option<Pdu>> {
        self.store.event(event_id).await?.map(Pdu::from_row).transpose()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests;
