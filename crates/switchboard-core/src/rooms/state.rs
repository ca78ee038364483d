//! The state of a room after each event, kept as snapshots (a parent plus a delta, shared by
//! events that change no state), and state resolution (v2, ruma's) when histories fork: the
//! state before an event whose `prev_events` differ from this server's forward extremities is
//! the resolution of the states after each of them, and the room's current state after it is
//! the resolution of the states after all remaining extremities.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::Ordering},
};

use ruma::{OwnedEventId, events::StateEventType, room_version_rules::StateResolutionVersion, state_res};
use switchboard_store::NewSnapshot;

use super::{Rooms, StateMap};
use crate::{
    Error, Result,
    pdu::{Pdu, RoomVersion},
};

/// A room state as event IDs.
pub type StateIds = HashMap<(StateEventType, String), OwnedEventId>;

/// Past this many deltas in a row a full snapshot is written, so loading one stays cheap.
const MAX_CHAIN: i64 = 50;
/// Snapshots kept in memory.
const CACHE: usize = 2_000;

/// Snapshot IDs and the cache of loaded snapshots.
#[derive(Default)]
pub(super) struct Snapshots {
    pub(super) next: std::sync::atomic::AtomicI64,
    cache: Mutex<HashMap<i64, Arc<StateIds>>>,
}

fn key_text((kind, state_key): &(StateEventType, String)) -> String {
    format!("{kind}\u{1f}{state_key}")
}

fn parse_delta(delta: &str) -> Result<StateIds> {
    let map: HashMap<String, OwnedEventId> =
        serde_json::from_str(delta).map_err(|e| Error::Internal(format!("stored state snapshot: {e}")))?;
    Ok(map
        .into_iter()
        .filter_map(|(k, id)| {
            let (kind, state_key) = k.split_once('\u{1f}')?;
            Some(((StateEventType::from(kind), state_key.to_owned()), id))
        })
        .collect())
}

/// The IDs of a state of `Arc<Pdu>`s.
pub(super) fn ids_of(state: &StateMap) -> StateIds {
    state
        .iter()
        .map(|(k, e)| (k.clone(), e.event_id.clone()))
        .collect()
}

impl Rooms {
    /// Continues snapshot numbering after the highest stored, once per process (0: not yet).
    pub(super) async fn ensure_snapshot_ids(&self) -> Result<()> {
        if self.snapshots.next.load(Ordering::Acquire) == 0 {
            let max = self.store.max_snapshot_id().await?;
            let _ = self
                .snapshots
                .next
                .compare_exchange(0, max + 1, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(())
    }

    /// A new snapshot: `parent` plus `delta`, or — with no parent — a full state.
    pub(super) fn new_snapshot(
        &self,
        room_id: &ruma::RoomId,
        parent: Option<(i64, i64)>,
        delta: &StateIds,
    ) -> (NewSnapshot, i64) {
        let snapshot_id = self.snapshots.next.fetch_add(1, Ordering::AcqRel);
        let delta_json: HashMap<String, &OwnedEventId> =
            delta.iter().map(|(k, v)| (key_text(k), v)).collect();
        let chain = parent.map_or(0, |(_, chain)| chain + 1);
        (
            NewSnapshot {
                snapshot_id,
                room_id: room_id.to_string(),
                parent_id: parent.map(|(id, _)| id),
                chain,
                delta: serde_json::to_string(&delta_json).unwrap_or_else(|_| "{}".to_owned()),
            },
            chain,
        )
    }

    /// Whether a snapshot with this chain length should get a full successor.
    pub(super) fn chain_too_long(chain: i64) -> bool {
        chain >= MAX_CHAIN
    }

    /// Caches a snapshot the pipeline just wrote, so it need not be read back.
    pub(super) fn remember_snapshot(&self, snapshot_id: i64, state: Arc<StateIds>) {
        if let Ok(mut cache) = self.snapshots.cache.lock() {
            if cache.len() >= CACHE {
                cache.clear();
            }
            cache.insert(snapshot_id, state);
        }
    }

    /// A stored snapshot, whole.
    pub(super) async fn load_snapshot(&self, snapshot_id: i64) -> Result<Arc<StateIds>> {
        if let Some(state) = self
            .snapshots
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&snapshot_id).cloned())
        {
            return Ok(state);
        }
        // Deltas from the newest back; the first seen of each key wins.
        let mut layers = Vec::new();
        let mut next = Some(snapshot_id);
        let mut base: Option<Arc<StateIds>> = None;
        while let Some(id) = next {
            if id != snapshot_id
                && let Some(cached) = self.snapshots.cache.lock().ok().and_then(|c| c.get(&id).cloned())
            {
                base = Some(cached);
                break;
            }
            let (parent, _, delta) = self
                .store
                .snapshot(id)
                .await?
                .ok_or_else(|| Error::Internal(format!("state snapshot {id} is missing")))?;
            layers.push(parse_delta(&delta)?);
            next = parent;
        }
        let mut state = base.map(|b| (*b).clone()).unwrap_or_default();
        for layer in layers.into_iter().rev() {
            state.extend(layer);
        }
        let state = Arc::new(state);
        self.remember_snapshot(snapshot_id, state.clone());
        Ok(state)
    }

    /// The snapshot of the state after an event and its chain length, if recorded.
    pub(super) async fn snapshot_of(&self, event_id: &str) -> Result<Option<(i64, i64)>> {
        let Some(id) = self.store.event_snapshot(event_id).await? else {
            return Ok(None);
        };
        let chain = self.store.snapshot(id).await?.map_or(0, |(_, chain, _)| chain);
        Ok(Some((id, chain)))
    }

    /// The state right after an event: its snapshot, or — for an event stored before snapshots
    /// existed, in a history that was linear then — the state at its stream position.
    pub(super) async fn state_after_event(&self, event_id: &str) -> Result<Option<Arc<StateIds>>> {
        if let Some(id) = self.store.event_snapshot(event_id).await? {
            return Ok(Some(self.load_snapshot(id).await?));
        }
        let Some(event) = self.event(event_id).await? else {
            return Ok(None);
        };
        if event.stream_pos <= 0 {
            return Ok(None);
        }
        let state = self.state_at(&event.room_id, event.stream_pos).await?;
        Ok(Some(Arc::new(ids_of(
            &state.into_iter().map(|e| (state_key_of(&e), e)).collect(),
        ))))
    }

    /// The events of a state, each loaded once (`known` first).
    pub(super) async fn pdus_of(&self, state: &StateIds, known: &[Arc<Pdu>]) -> Result<StateMap> {
        let mut map = StateMap::new();
        for (key, id) in state {
            let pdu = match known.iter().find(|e| e.event_id == *id) {
                Some(pdu) => pdu.clone(),
                None => Arc::new(
                    self.event(id.as_str())
                        .await?
                        .ok_or_else(|| Error::Internal(format!("state event {id} is not stored")))?,
                ),
            };
            map.insert(key.clone(), pdu);
        }
        Ok(map)
    }

    /// State resolution of `states` by the room version's algorithm. `extra`: events not
    /// stored yet that the states name.
    pub(super) async fn resolve(
        &self,
        version: &RoomVersion,
        states: &[Arc<StateIds>],
        extra: &[Arc<Pdu>],
    ) -> Result<StateIds> {
        let StateResolutionVersion::V2(v2) = &version.rules.state_res else {
            return Err(Error::Internal(
                "only state resolution v2 is supported".to_owned(),
            ));
        };
        let mut events: HashMap<OwnedEventId, Arc<Pdu>> =
            extra.iter().map(|e| (e.event_id.clone(), e.clone())).collect();
        let mut chains = Vec::with_capacity(states.len());
        for state in states {
            let mut chain: HashSet<OwnedEventId> = HashSet::new();
            let mut todo: Vec<OwnedEventId> = state.values().cloned().collect();
            let mut seen: HashSet<OwnedEventId> = HashSet::new();
            while let Some(id) = todo.pop() {
                if !seen.insert(id.clone()) {
                    continue;
                }
                let event = match events.get(&id) {
                    Some(e) => e.clone(),
                    None => match self.event(id.as_str()).await? {
                        Some(e) => {
                            let e = Arc::new(e);
                            events.insert(id.clone(), e.clone());
                            e
                        }
                        None => continue,
                    },
                };
                for auth in &event.auth_events {
                    chain.insert(auth.clone());
                    todo.push(auth.clone());
                }
            }
            chains.push(chain.into_iter().collect());
        }
        let fetch = |id: &ruma::EventId| events.get(id).cloned();
        let subgraph = |conflicted: &state_res::StateMap<Vec<OwnedEventId>>| {
            Some(conflicted_subgraph(conflicted, &events).into_iter().collect())
        };
        let maps: Vec<state_res::StateMap<OwnedEventId>> = states.iter().map(|s| (**s).clone()).collect();
        state_res::resolve(
            &version.rules.authorization,
            v2,
            maps.iter(),
            chains,
            fetch,
            subgraph,
        )
        .map_err(|e| Error::Internal(format!("state resolution failed: {e}")))
    }
}

/// The `(type, state_key)` of a state event.
pub(super) fn state_key_of(pdu: &Pdu) -> (StateEventType, String) {
    (
        StateEventType::from(pdu.event_type.as_str()),
        pdu.state_key.clone().unwrap_or_default(),
    )
}

/// Room version 12's conflicted state subgraph: the events that are, along `auth_events`, both
/// an ancestor of a conflicted event and a descendant of one.
fn conflicted_subgraph(
    conflicted: &state_res::StateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    let conflicted: HashSet<&OwnedEventId> = conflicted.values().flatten().collect();
    // Ancestors of the conflicted events.
    let mut ancestors: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = conflicted.iter().map(|id| (*id).clone()).collect();
    while let Some(id) = todo.pop() {
        if let Some(event) = events.get(&id) {
            for auth in &event.auth_events {
                if ancestors.insert(auth.clone()) {
                    todo.push(auth.clone());
                }
            }
        }
    }
    // Of those, the ones reaching a conflicted event along their own auth events.
    let mut memo: HashMap<OwnedEventId, bool> = HashMap::new();
    fn reaches(
        id: &OwnedEventId,
        conflicted: &HashSet<&OwnedEventId>,
        events: &HashMap<OwnedEventId, Arc<Pdu>>,
        memo: &mut HashMap<OwnedEventId, bool>,
        depth: usize,
    ) -> bool {
        if let Some(known) = memo.get(id) {
            return *known;
        }
        let found = depth < 10_000
            && events.get(id).is_some_and(|e| {
                e.auth_events
                    .iter()
                    .any(|a| conflicted.contains(a) || reaches(a, conflicted, events, memo, depth + 1))
            });
        memo.insert(id.clone(), found);
        found
    }
    let mut subgraph: HashSet<OwnedEventId> = conflicted.iter().map(|id| (*id).clone()).collect();
    for id in &ancestors {
        if reaches(id, &conflicted, events, &mut memo, 0) {
            subgraph.insert(id.clone());
        }
    }
    subgraph
}
