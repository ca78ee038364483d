//! The global event stream: one writer task that gives events their positions and commits them,
//! the notifier that wakes `/sync` and application-service senders, and a window of recent events
//! kept in memory so readers of the stream's head do not go to the database.
//!
//! The writer commits every event waiting at that moment in one database transaction (group
//! commit), so the fsync is shared under load. On SQLite one group is in flight at a time and
//! positions are counted in memory (gap-free). On PostgreSQL several groups commit concurrently
//! with positions from a database sequence, so commits can finish out of order and a failed one
//! leaves a gap. Either way a position is announced only once every group with smaller positions
//! is committed (or failed) and its callers have updated their caches: readers never skip an
//! event that lands later below what they have seen.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
};

use switchboard_store::{Engine, NewEvent, Store};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::{Error, Result, pdu::Pdu};

/// Events per database transaction at most; more wait for the next one.
const MAX_GROUP: usize = 1024;
/// How many recent events stay in memory for stream readers.
const RECENT_EVENTS: usize = 5_000;

struct WriteJob {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Written, String>>,
}

/// Events stored at these positions (ascending, one per event). Call [`Written::published`] once
/// the caches hold them; the positions are announced when every job of the group did (or dropped
/// this).
pub struct Written {
    pub positions: Vec<i64>,
    done: oneshot::Sender<()>,
}

impl Written {
    pub fn published(self) {
        let _ = self.done.send(());
    }
}

pub struct EventStream {
    /// The auxiliary stream (account data; later receipts): writes are serialised under this
    /// lock, so a position is announced only after every lower one is stored.
    aux_last: tokio::sync::Mutex<i64>,
    aux_notify: watch::Sender<i64>,
    notify: Arc<watch::Sender<i64>>,
    closing: watch::Sender<bool>,
    jobs: mpsc::UnboundedSender<WriteJob>,
    recent: RwLock<BTreeMap<i64, Arc<Pdu>>>,
}

impl EventStream {
    /// Starts the writer after position `last` (the highest stored one); `last_aux` is the
    /// auxiliary stream's.
    pub fn start(store: Store, last: i64, last_aux: i64) -> Arc<Self> {
        let notify = Arc::new(watch::Sender::new(last));
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(store, rx, notify.clone(), last));
        Arc::new(Self {
            aux_last: tokio::sync::Mutex::new(last_aux),
            aux_notify: watch::Sender::new(last_aux),
            notify,
            closing: watch::Sender::new(false),
            jobs,
            recent: RwLock::new(BTreeMap::new()),
        })
    }

    /// Runs `write` with the next auxiliary position and announces it once `write` succeeded.
    pub async fn aux_write<F, Fut>(&self, write: F) -> Result<i64>
    where
        F: FnOnce(i64) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut last = self.aux_last.lock().await;
        // Typing and presence live in memory and are not stored, so positions must keep growing
        // across restarts without them: never below the clock (milliseconds).
        let pos = (*last + 1).max(crate::util::now_ms() as i64);
        write(pos).await?;
        *last = pos;
        self.aux_notify.send_replace(pos);
        Ok(pos)
    }

    /// Announces a change that is kept in memory only (typing, presence); returns its position.
    pub async fn aux_bump(&self) -> i64 {
        self.aux_write(|_| async { Ok(()) })
            .await
            .unwrap_or_else(|_| self.current_aux())
    }

    pub fn current_aux(&self) -> i64 {
        *self.aux_notify.borrow()
    }

    pub fn subscribe_aux(&self) -> watch::Receiver<i64> {
        self.aux_notify.subscribe()
    }

    /// Stores events (all or none), returning their first position.
    pub async fn write(&self, events: Vec<NewEvent>) -> Result<Written> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(WriteJob { events, reply })
            .map_err(|_| Error::internal("the event writer stopped"))?;
        answer
            .await
            .map_err(|_| Error::internal("the event writer stopped"))?
            .map_err(Error::Internal)
    }

    /// Keeps stored events in the in-memory window.
    pub fn remember(&self, events: &[Arc<Pdu>]) {
        if let Ok(mut recent) = self.recent.write() {
            for event in events {
                recent.insert(event.stream_pos, event.clone());
            }
            while recent.len() > RECENT_EVENTS {
                recent.pop_first();
            }
        }
    }

    /// Swaps an event in the window for a changed copy (after a redaction), if it is there.
    pub fn replace_recent(&self, event: Arc<Pdu>) {
        if let Ok(mut recent) = self.recent.write()
            && let Some(slot) = recent.get_mut(&event.stream_pos)
        {
            *slot = event;
        }
    }

    /// Events with `after < pos <= until` (at most `limit`), if the window holds all of them.
    pub fn recent_after(&self, after: i64, until: i64, limit: usize) -> Option<Vec<Arc<Pdu>>> {
        let recent = self.recent.read().ok()?;
        let mut out = Vec::new();
        let mut expected = after + 1;
        for (&pos, event) in recent.range(after + 1..=until).take(limit) {
            if pos != expected {
                return None;
            }
            out.push(event.clone());
            expected += 1;
        }
        let complete = expected > until || out.len() == limit;
        complete.then_some(out)
    }

    /// The events at these positions, if the window holds all of them.
    pub fn recent_at(&self, positions: &[i64]) -> Option<Vec<Arc<Pdu>>> {
        let recent = self.recent.read().ok()?;
        positions.iter().map(|pos| recent.get(pos).cloned()).collect()
    }

    /// Tells long-polling readers to answer now: the server is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once [`EventStream::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }

    /// Waits until `pos` is announced, so a client that got an answer about its event also
    /// finds it in `/sync` and `/messages` right after (read-your-writes).
    pub async fn announced(&self, pos: i64) {
        let mut rx = self.notify.subscribe();
        let _ = rx.wait_for(|current| *current >= pos).await;
    }

    /// The newest announced position.
    pub fn current(&self) -> i64 {
        *self.notify.borrow()
    }

    /// A receiver that changes whenever new events are announced.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.notify.subscribe()
    }
}

/// Groups committing at once on PostgreSQL (its WAL shares one flush between them).
const POSTGRES_GROUPS_IN_FLIGHT: usize = 4;

/// A group handed to the announcer in position order: `None` from `committed` if it failed.
struct Pending {
    last: i64,
    committed: oneshot::Receiver<Option<Vec<oneshot::Receiver<()>>>>,
}

async fn writer(
    store: Store,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    notify: Arc<watch::Sender<i64>>,
    last: i64,
) {
    let (announce, groups) = mpsc::unbounded_channel();
    tokio::spawn(announcer(groups, notify));
    let in_flight = match store.engine() {
        Engine::Sqlite => 1,
        Engine::Postgres => POSTGRES_GROUPS_IN_FLIGHT,
    };
    let slots = Arc::new(Semaphore::new(in_flight));
    // SQLite's in-memory counter; a failed group hands its positions out again.
    let next = Arc::new(AtomicI64::new(last + 1));
    while let Some(first) = jobs.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Jobs that arrived while waiting for a slot join this group.
        let mut group = vec![first];
        let mut count = group[0].events.len();
        while count < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let positions = match store.reserve_stream_positions(count as i64).await {
            Ok(Some(positions)) => positions,
            Ok(None) => {
                let start = next.fetch_add(count as i64, Ordering::SeqCst);
                (start..start + count as i64).collect()
            }
            Err(e) => {
                tracing::error!(error = %e, events = count, "reserving stream positions failed");
                for job in group {
                    let _ = job.reply.send(Err(format!("storing events failed: {e}")));
                }
                continue;
            }
        };
        let mut assigned = positions.iter().copied();
        let mut job_positions = Vec::with_capacity(group.len());
        for job in &mut group {
            let mut mine = Vec::with_capacity(job.events.len());
            for event in &mut job.events {
                event.stream_pos = assigned.next().unwrap_or_default();
                mine.push(event.stream_pos);
            }
            job_positions.push(mine);
        }
        let (committed, outcome) = oneshot::channel();
        let last = positions.last().copied().unwrap_or_default();
        if announce
            .send(Pending {
                last,
                committed: outcome,
            })
            .is_err()
        {
            return;
        }
        let store = store.clone();
        let next = next.clone();
        let start = positions.first().copied().unwrap_or_default();
        tokio::spawn(async move {
            let stored = commit_group(&store, &group).await;
            // On SQLite, when nothing of the group was stored its positions are handed out again.
            // (When part of it was, `next` already points past the group, whose last position is
            // announced: the failed jobs' positions stay a gap.)
            if store.engine() == Engine::Sqlite && stored.is_err() {
                next.store(
                    store.max_stream_pos().await.map_or(start, |max| max + 1),
                    Ordering::SeqCst,
                );
            }
            // The next group may commit while this one's callers update their caches.
            drop(slot);
            let outcomes = match stored {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    tracing::error!(error = %e, events = count, "storing events failed");
                    for job in group {
                        let _ = job.reply.send(Err(format!("storing events failed: {e}")));
                    }
                    let _ = committed.send(None);
                    return;
                }
            };
            let mut published = Vec::with_capacity(group.len());
            for ((job, positions), outcome) in group.into_iter().zip(job_positions).zip(outcomes) {
                if let Some(e) = outcome {
                    let _ = job.reply.send(Err(format!("storing events failed: {e}")));
                    continue;
                }
                let (done, wait) = oneshot::channel();
                if job.reply.send(Ok(Written { positions, done })).is_ok() {
                    published.push(wait);
                }
            }
            let _ = committed.send(Some(published));
        });
    }
}

/// Commits a group in one transaction. If that fails and the group holds several jobs, each
/// job is tried on its own, so one bad event (a value the database refuses) fails its own
/// request only, not everyone else's that happened to share the transaction. `Ok` holds each
/// job's error, if it had one; `Err` means nothing was stored.
async fn commit_group(store: &Store, group: &[WriteJob]) -> Result<Vec<Option<String>>, String> {
    let rows: Vec<&NewEvent> = group.iter().flat_map(|job| job.events.iter()).collect();
    let Err(e) = store.append_events(&rows).await else {
        return Ok(vec![None; group.len()]);
    };
    if landed_anyway(store, &rows).await {
        return Ok(vec![None; group.len()]);
    }
    if group.len() == 1 {
        return Err(e.to_string());
    }
    tracing::warn!(error = %e, jobs = group.len(), "a group commit failed; storing its jobs one by one");
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        let rows: Vec<&NewEvent> = job.events.iter().collect();
        outcomes.push(match store.append_events(&rows).await {
            Ok(()) => None,
            Err(_) if landed_anyway(store, &rows).await => None,
            Err(e) => Some(e.to_string()),
        });
    }
    if outcomes.iter().all(Option::is_some) {
        return Err(e.to_string());
    }
    Ok(outcomes)
}

/// Whether a group whose commit reported an error is stored all the same: a commit can fail
/// after it landed (a connection lost while the answer was on its way). The group is all or
/// nothing, so its first event tells.
async fn landed_anyway(store: &Store, rows: &[&NewEvent]) -> bool {
    let Some(first) = rows.first() else {
        return false;
    };
    match store.event(&first.event_id).await {
        Ok(Some(stored)) if stored.stream_pos == first.stream_pos => {
            tracing::warn!(
                events = rows.len(),
                "a commit reported an error but is stored; carrying on"
            );
            true
        }
        _ => false,
    }
}

/// Announces groups in position order, each once it is committed and all its callers have
/// published it; a failed group is passed over without announcing anything.
async fn announcer(mut groups: mpsc::UnboundedReceiver<Pending>, notify: Arc<watch::Sender<i64>>) {
    while let Some(Pending { last, committed }) = groups.recv().await {
        let Ok(Some(published)) = committed.await else {
            continue;
        };
        for wait in published {
            let _ = wait.await;
        }
        notify.send_replace(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> NewEvent {
        NewEvent {
            relay: false,
            stream_pos: 0,
            event_id: id.to_owned(),
            room_id: "!r:x".to_owned(),
            sender: "@a:x".to_owned(),
            kind: "m.room.message".to_owned(),
            state_key: None,
            depth: 1,
            origin_server_ts: 0,
            pdu: "{}".to_owned(),
            unsigned: None,
            txn: None,
            membership: None,
            creates_room_version: None,
            relates_to: None,
            prev_events: Vec::new(),
            state_after: None,
            snapshots: Vec::new(),
            current_state: None,
        }
    }

    #[tokio::test]
    async fn concurrent_writes_get_gap_free_positions_announced_after_publishing() {
        let db = switchboard_store::testing::TestDatabase::create().await;
        let store = Store::open(&db.settings()).await.expect("store");
        let stream = EventStream::start(store.clone(), 0, 0);
        let mut rx = stream.subscribe();
        let writes: Vec<_> = (0..20)
            .map(|i| {
                let stream = stream.clone();
                tokio::spawn(async move {
                    stream
                        .write(vec![event(&format!("$a{i}")), event(&format!("$b{i}"))])
                        .await
                })
            })
            .collect();
        let mut firsts = Vec::new();
        for write in writes {
            let written = write.await.expect("task").expect("written");
            firsts.push(written.positions[0]);
            written.published();
        }
        firsts.sort();
        assert_eq!(
            firsts,
            (0..20).map(|i| 1 + 2 * i).collect::<Vec<i64>>(),
            "each job's events are consecutive"
        );
        rx.wait_for(|pos| *pos == 40).await.expect("announced");
        assert_eq!(store.max_stream_pos().await.expect("max"), 40);

        // A write whose caller never publishes is still announced once it gives up.
        let written = stream.write(vec![event("$late")]).await.expect("written");
        assert_eq!(stream.current(), 40, "not announced before publishing");
        drop(written);
        rx.wait_for(|pos| *pos == 41).await.expect("announced");
    }

    #[tokio::test]
    async fn a_failed_group_gives_up_its_positions() {
        let db = switchboard_store::testing::TestDatabase::create().await;
        let store = Store::open(&db.settings()).await.expect("store");
        let stream = EventStream::start(store.clone(), 0, 0);
        stream
            .write(vec![event("$one")])
            .await
            .expect("first")
            .published();
        // The same event ID again violates a unique constraint: nothing is stored.
        assert!(stream.write(vec![event("$two"), event("$one")]).await.is_err());
        let written = stream.write(vec![event("$three")]).await.expect("third");
        let expected = match store.engine() {
            // One writer per file: the positions are handed out again, no gap.
            Engine::Sqlite => 2,
            // The sequence never hands a position out twice: 2 and 3 stay a gap.
            Engine::Postgres => 4,
        };
        assert_eq!(written.positions, vec![expected]);
        written.published();
        let mut rx = stream.subscribe();
        rx.wait_for(|pos| *pos == expected)
            .await
            .expect("announced past the failure");
    }

    #[tokio::test]
    async fn one_bad_job_fails_alone_not_its_whole_group() {
        let db = switchboard_store::testing::TestDatabase::create().await;
        let store = Store::open(&db.settings()).await.expect("store");
        let mut one = event("$one");
        one.stream_pos = 1;
        store.append_events(&[&one]).await.expect("first");
        let job = |id: &str, pos: i64| {
            let mut e = event(id);
            e.stream_pos = pos;
            WriteJob {
                events: vec![e],
                reply: oneshot::channel().0,
            }
        };
        // `$one` again violates the unique event ID; `$good` shares its transaction.
        let group = [job("$good", 2), job("$one", 3), job("$fine", 4)];
        let outcomes = commit_group(&store, &group).await.expect("partly stored");
        assert!(outcomes[0].is_none() && outcomes[2].is_none(), "{outcomes:?}");
        assert!(outcomes[1].is_some(), "the duplicate fails");
        assert!(store.event("$good").await.expect("q").is_some());
        assert!(store.event("$fine").await.expect("q").is_some());
        // A group that fails as a whole reports it.
        let group = [job("$one", 5)];
        assert!(commit_group(&store, &group).await.is_err());
    }

    #[tokio::test]
    async fn positions_are_announced_only_when_every_smaller_one_is_settled() {
        let (groups, rx) = mpsc::unbounded_channel();
        let notify = Arc::new(watch::Sender::new(0));
        tokio::spawn(announcer(rx, notify.clone()));
        let mut commits = Vec::new();
        for last in [3, 6, 9] {
            let (commit, committed) = oneshot::channel();
            groups.send(Pending { last, committed }).expect("send");
            commits.push(commit);
        }
        let mut commits = commits.into_iter();
        let (first, second, third) = (
            commits.next().expect("1"),
            commits.next().expect("2"),
            commits.next().expect("3"),
        );
        // The later groups commit first (PostgreSQL, several in flight): nothing is announced.
        third.send(Some(Vec::new())).expect("third");
        let (publish, published) = oneshot::channel();
        second.send(Some(vec![published])).expect("second");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(*notify.borrow(), 0, "4..9 wait for 1..3");
        // The first group failed: its positions are passed over; the second waits for its caller.
        first.send(None).expect("first");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(*notify.borrow(), 0, "6 waits until its caller published it");
        publish.send(()).expect("publish");
        let mut rx = notify.subscribe();
        rx.wait_for(|pos| *pos == 9).await.expect("9 announced");
    }

    #[test]
    fn recent_window_answers_only_complete_ranges() {
        let (notify, _) = watch::channel(0);
        let (jobs, _rx) = mpsc::unbounded_channel();
        let stream = EventStream {
            aux_last: tokio::sync::Mutex::new(0),
            aux_notify: watch::Sender::new(0),
            notify: Arc::new(notify),
            closing: watch::Sender::new(false),
            jobs,
            recent: RwLock::new(BTreeMap::new()),
        };
        let pdu = |pos: i64| {
            let mut p = Pdu::from_json(
                ruma::OwnedEventId::try_from(format!("$e{pos}")).expect("id"),
                r#"{"room_id":"!r:x","sender":"@a:x","origin_server_ts":1,"type":"m.room.message","content":{},"depth":1}"#
                    .to_owned(),
            )
            .expect("pdu");
            p.stream_pos = pos;
            Arc::new(p)
        };
        stream.remember(&[pdu(5), pdu(6), pdu(8)]);
        assert_eq!(stream.recent_after(4, 6, 10).map(|v| v.len()), Some(2));
        assert!(stream.recent_after(4, 8, 10).is_none(), "7 is missing");
        assert!(
            stream.recent_after(2, 6, 10).is_none(),
            "3 and 4 are not in memory"
        );
        assert_eq!(
            stream.recent_after(4, 8, 2).map(|v| v.len()),
            Some(2),
            "a full page is complete"
        );
    }
}
