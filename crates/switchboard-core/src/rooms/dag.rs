//! Walks of a room's event graph for other servers: `/backfill` (back from some events along
//! `prev_events`), `/get_missing_events` (between what a server has and what it got), the state
//! before an event (`/state`, `/state_ids`) and auth chains (`/event_auth`, `send_join`).

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use ruma::{OwnedEventId, RoomId};

use super::Rooms;
use crate::{Error, Result, pdu::Pdu};

/// The most events one walk returns.
const MAX_WALK: usize = 100;

impl Rooms {
    /// Up to `limit` events of `room_id` from `from` backwards (the `from` events included),
    /// breadth-first along `prev_events`, newest first.
    pub async fn backfill(
        &self,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Arc<Pdu>>> {
        let mut events = self
            .walk_back(room_id, from.iter().cloned().collect(), HashSet::new(), limit, 0)
            .await?;
        events.reverse();
        Ok(events)
    }

    /// The events between `earliest` (which the asker has) and `latest` (which it got), walking
    /// back from `latest` along `prev_events`: neither end included, at most `limit`, none below
    /// `min_depth`; oldest first.
    pub async fn missing_events(
        &self,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<Arc<Pdu>>> {
        let mut start = VecDeque::new();
        for id in latest {
            if let Some(event) = self.event(id.as_str()).await? {
                start.extend(event.prev_events.iter().cloned());
            }
        }
        let seen = earliest.iter().chain(latest).cloned().collect();
        self.walk_back(room_id, start, seen, limit, min_depth).await
    }

    /// Breadth-first along `prev_events` from `queue`, skipping `seen`, events of other rooms
    /// and below `min_depth`; at most `limit` (and [`MAX_WALK`]), oldest first.
    async fn walk_back(
        &self,
        room_id: &RoomId,
        mut queue: VecDeque<OwnedEventId>,
        mut seen: HashSet<OwnedEventId>,
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<Arc<Pdu>>> {
        let limit = limit.min(MAX_WALK);
        let mut events = Vec::new();
        while let Some(id) = queue.pop_front() {
            if events.len() >= limit {
                break;
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(event) = self.event(id.as_str()).await? else {
                continue;
            };
            if event.room_id != room_id || u64::from(event.depth) < min_depth {
                continue;
            }
            queue.extend(event.prev_events.iter().cloned());
            events.push(Arc::new(event));
        }
        events.sort_by_key(|e| u64::from(e.depth));
        Ok(events)
    }

    /// The room's state right before `event_id` (the event itself not counted).
    pub async fn state_before(&self, room_id: &RoomId, event_id: &str) -> Result<Vec<Arc<Pdu>>> {
        let event = self
            .event(event_id)
            .await?
            .filter(|e| e.room_id == room_id)
            .ok_or_else(|| Error::NotFound(format!("Unknown event {event_id} in {room_id}")))?;
        // Outliers (the state a join brought, at negative positions) have no timeline before
        // them; their own auth events are what this server can vouch for.
        if event.stream_pos <= 0 {
            return self.auth_chain(std::iter::once(&Arc::new(event))).await;
        }
        self.state_at(room_id, event.stream_pos - 1).await
    }

    /// Every event the given events' `auth_events` reach, recursively, oldest first.
    pub async fn auth_chain<'a>(&self, events: impl Iterator<Item = &'a Arc<Pdu>>) -> Result<Vec<Arc<Pdu>>> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut todo: Vec<OwnedEventId> = events.flat_map(|e| e.auth_events.iter().cloned()).collect();
        let mut chain = Vec::new();
        while let Some(id) = todo.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(event) = self.event(id.as_str()).await? else {
                tracing::warn!(event_id = %id, "auth chain: event not stored");
                continue;
            };
            todo.extend(event.auth_events.iter().filter(|a| !seen.contains(*a)).cloned());
            chain.push(Arc::new(event));
        }
        chain.sort_by_key(|e| u64::from(e.depth));
        Ok(chain)
    }

    /// The current forward extremities of a room.
    pub async fn extremities(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>> {
        let handle = self.handle(room_id).await?;
        let inner = handle.inner.lock().await;
        Ok(inner.extremities.iter().map(|(id, _)| id.clone()).collect())
    }
}
