//! The global event stream: one writer task that gives events their positions and commits them,
//! the notifier that wakes `/sync` and application-service senders, and a window of recent events
//! kept in memory so readers of the stream's head do not go to the database.
//!
//! The writer commits every event waiting at that moment in one database transaction (group
//! commit), so the fsync is shared under load. Positions are assigned in commit order, so the
//! stream is gap-free; a position is announced only after its room has updated its caches.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use switchboard_store::{NewEvent, Store};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Error, Result, pdu::Pdu};

/// Events per database transaction at most; more wait for the next one.
const MAX_GROUP: usize = 1024;
/// How many recent events stay in memory for stream readers.
const RECENT_EVENTS: usize = 5_000;

struct WriteJob {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Written, String>>,
}

/// Events stored at `first_pos..first_pos + n`. Call [`Written::published`] once the caches hold
/// them; the positions are announced when every job of the group did (or dropped this).
pub struct Written {
    pub first_pos: i64,
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

async fn writer(
    store: Store,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    notify: Arc<watch::Sender<i64>>,
    last: i64,
) {
    let (announce, groups) = mpsc::unbounded_channel();
    tokio::spawn(announcer(groups, notify));
    let mut next = last + 1;
    while let Some(first) = jobs.recv().await {
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
        let start = next;
        let mut firsts = Vec::with_capacity(group.len());
        for job in &mut group {
            firsts.push(next);
            for event in &mut job.events {
                event.stream_pos = next;
                next += 1;
            }
        }
        let rows: Vec<&NewEvent> = group.iter().flat_map(|job| job.events.iter()).collect();
        if let Err(e) = store.append_events(&rows).await {
            // Normally nothing of the group was stored and its positions are handed out again;
            // the database says for sure (a commit can fail after it landed).
            next = store.max_stream_pos().await.map_or(start, |max| max + 1);
            tracing::error!(error = %e, events = count, "storing events failed");
            for job in group {
                let _ = job.reply.send(Err(format!("storing events failed: {e}")));
            }
            continue;
        }
        let mut published = Vec::with_capacity(group.len());
        for (job, first_pos) in group.into_iter().zip(firsts) {
            let (done, wait) = oneshot::channel();
            if job.reply.send(Ok(Written { first_pos, done })).is_ok() {
                published.push(wait);
            }
        }
        // The next group is committed while this one's callers update their caches.
        if announce.send((next - 1, published)).is_err() {
            return;
        }
    }
}

/// Announces each committed group, in commit order, once all its callers have published it.
async fn announcer(
    mut groups: mpsc::UnboundedReceiver<(i64, Vec<oneshot::Receiver<()>>)>,
    notify: Arc<watch::Sender<i64>>,
) {
    while let Some((last, published)) = groups.recv().await {
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
        }
    }

    #[tokio::test]
    async fn concurrent_writes_get_gap_free_positions_announced_after_publishing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_sqlite(&dir.path().join("db")).await.expect("store");
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
            firsts.push(written.first_pos);
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
    async fn a_failed_group_reuses_its_positions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_sqlite(&dir.path().join("db")).await.expect("store");
        let stream = EventStream::start(store.clone(), 0, 0);
        stream
            .write(vec![event("$one")])
            .await
            .expect("first")
            .published();
        // The same event ID again violates a unique constraint: nothing is stored.
        assert!(stream.write(vec![event("$two"), event("$one")]).await.is_err());
        let written = stream.write(vec![event("$three")]).await.expect("third");
        assert_eq!(written.first_pos, 2, "no gap after the failure");
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
