//! One task reads each new event once, matches it against every service in one pass (the
//! registry's combined namespaces and a per-room cache of interested services), and queues its
//! position at the senders of the services that want it, waking only those. The cost per event
//! stays flat as services are added, and a service with nothing to receive is not woken.
//!
//! Senders still scan the stream themselves for what precedes the dispatcher (after a restart or
//! while they were down longer than their queue reaches); see `Delivery::select`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use ruma::{OwnedRoomId, events::TimelineEventType};
use switchboard_store::Store;

use super::{Registry, ServiceSet, delivery::Sender, interest::RoomAudience};
use crate::{Result, pdu::Pdu, rooms::Rooms, stream::EventStream};

/// Events read from the stream per round.
const BATCH: usize = 1_000;
/// Positions queued per service at most (a service down for long); beyond, its sender scans the
/// stream from its stored position instead.
const MAX_QUEUED: usize = 100_000;

/// Positions of events a service is interested in, in stream order, filled by the dispatcher.
#[derive(Default)]
pub struct Queue {
    /// The queue holds every interesting position after this one (up to what was dispatched).
    pub from: i64,
    pub positions: VecDeque<i64>,
}

struct Targets {
    registry: Arc<Registry>,
    /// Senders by registry index (`None` while a service is being replaced).
    senders: Vec<Option<Arc<Sender>>>,
    /// Room-level interest, valid while the room's audience and the registry are the same.
    rooms: HashMap<OwnedRoomId, (Arc<RoomAudience>, ServiceSet)>,
}

pub struct Dispatcher {
    targets: Mutex<Targets>,
    /// Every event up to here was dispatched.
    dispatched: AtomicI64,
}

impl Dispatcher {
    /// Starts dispatching the events after the stream's current head.
    pub fn start(store: Store, rooms: Arc<Rooms>, stream: Arc<EventStream>) -> Arc<Self> {
        let dispatcher = Arc::new(Self {
            targets: Mutex::new(Targets {
                registry: Arc::new(Registry::default()),
                senders: Vec::new(),
                rooms: HashMap::new(),
            }),
            dispatched: AtomicI64::new(stream.current()),
        });
        tokio::spawn(dispatcher.clone().run(store, rooms, stream));
        dispatcher
    }

    /// Everything up to this position was dispatched.
    pub fn dispatched(&self) -> i64 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Dispatches to these senders from now on (by registry index). Every queue starts afresh
    /// here: what was queued under the previous registrations' namespaces is scanned again by
    /// the senders under the new ones.
    pub fn set_targets(&self, registry: Arc<Registry>, senders: Vec<Option<Arc<Sender>>>) {
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        let dispatched = self.dispatched();
        for sender in senders.iter().flatten() {
            if let Ok(mut queue) = sender.queue.lock() {
                *queue = Queue {
                    from: dispatched,
                    positions: VecDeque::new(),
                };
            }
        }
        targets.registry = registry;
        targets.senders = senders;
        targets.rooms.clear();
    }

    async fn run(self: Arc<Self>, store: Store, rooms: Arc<Rooms>, stream: Arc<EventStream>) {
        let mut news = stream.subscribe();
        loop {
            let now = stream.current();
            let after = self.dispatched();
            if now > after {
                match self.round(&store, &rooms, &stream, after, now).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "dispatching events to application services failed");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = news.changed() => {}
                () = stream.closed() => return,
            }
        }
    }

    async fn round(
        &self,
        store: &Store,
        rooms: &Rooms,
        stream: &EventStream,
        after: i64,
        now: i64,
    ) -> Result<()> {
        let events = match stream.recent_after(after, now, BATCH) {
            Some(events) => events,
            None => store
                .events_after(after, now, BATCH as i64)
                .await?
                .into_iter()
                .map(|row| Pdu::from_row(row).map(Arc::new))
                .collect::<Result<_>>()?,
        };
        let Some(last) = events.last().map(|e| e.stream_pos) else {
            return Ok(());
        };
        // Audiences may need the database: fetched before the targets are locked.
        let mut audiences = HashMap::new();
        for event in &events {
            if !audiences.contains_key(&event.room_id) {
                audiences.insert(event.room_id.clone(), rooms.audience(&event.room_id).await?);
            }
        }
        let mut woken = ServiceSet::default();
        {
            let Ok(mut targets) = self.targets.lock() else {
                return Ok(());
            };
            for event in &events {
                let interested = targets.interested(event, &audiences[&event.room_id]);
                for index in interested.iter() {
                    if let Some(Some(sender)) = targets.senders.get(index)
                        && let Ok(mut queue) = sender.queue.lock()
                    {
                        if queue.positions.len() >= MAX_QUEUED {
                            queue.positions.clear();
                            queue.from = event.stream_pos - 1;
                        }
                        queue.positions.push_back(event.stream_pos);
                    }
                }
                woken.union(&interested);
            }
            self.dispatched.store(last, Ordering::Release);
            for index in woken.iter() {
                if let Some(Some(sender)) = targets.senders.get(index) {
                    sender.news.notify_one();
                }
            }
        }
        Ok(())
    }
}

impl Targets {
    /// Synapse's rules (`is_interested_in_event`) for every service at once: the sender, or a
    /// member event's target, is owned by the service; or the room is interesting to it.
    fn interested(&mut self, event: &Pdu, audience: &Arc<RoomAudience>) -> ServiceSet {
        let mut set = self.room_interest(&event.room_id, audience);
        self.registry.add_user_owners(event.sender.as_str(), &mut set);
        if event.kind == TimelineEventType::RoomMember
            && let Some(target) = &event.state_key
        {
            self.registry.add_user_owners(target, &mut set);
        }
        set
    }

    /// The room ID, a local alias or a local joined member is in the service's namespaces.
    fn room_interest(&mut self, room_id: &OwnedRoomId, audience: &Arc<RoomAudience>) -> ServiceSet {
        if let Some((cached, set)) = self.rooms.get(room_id)
            && Arc::ptr_eq(cached, audience)
        {
            return set.clone();
        }
        let mut set = ServiceSet::default();
        self.registry.add_room_matches(room_id.as_str(), &mut set);
        for alias in &audience.aliases {
            self.registry.add_alias_matches(alias, &mut set);
        }
        for member in &audience.local_joined {
            self.registry.add_user_owners(member, &mut set);
        }
        self.rooms
            .insert(room_id.clone(), (audience.clone(), set.clone()));
        set
    }
}
