//! Durable, ordered transaction delivery: one sender task per service.
//!
//! The queue is the event stream. Each service has a stored position up to which every event was
//! considered. A sender selects the next interesting events (at most 100 and ~1 MiB), stores the
//! transaction — next txn ID, covered position, the exact body — and only then sends it. On a 2xx
//! the transaction is deleted and the position advanced in one database transaction; on failure
//! the *stored* body is re-sent with the same txn ID after a backoff (2, 4 … 512 s with jitter), so a
//! retry is byte-identical, also after a crash. One slow or dead service never delays another.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use rand::Rng;
use reqwest::Method;
use serde_json::value::RawValue;
use switchboard_store::Store;
use tokio::sync::Notify;

use super::{
    AppService, Registry,
    http::{Family, Reply, ServiceHttp},
    interest::InterestCache,
};
use crate::{Result, pdu::Pdu, rooms::Rooms, stream::EventStream};

pub const MAX_EVENTS_PER_TXN: usize = 100;
const MAX_TXN_BYTES: usize = 1024 * 1024;
const SCAN_BATCH: i64 = 500;
const MAX_BACKOFF_STEP: u32 = 9; // 2^9 = 512 s, Synapse's cap

/// What operators see of a sender.
#[derive(Clone, Debug, Default)]
pub struct SenderStatus {
    pub up: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub next_retry_in: Option<Duration>,
    pub sent_transactions: u64,
    pub failed_attempts: u64,
    pub sent_events: u64,
}

/// The sender's view of its stored state, mirrored in memory (it is the only writer).
struct Cursor {
    /// Every event up to here was considered.
    last_pos: i64,
    /// `last_pos` as last written to the database; skips over uninteresting events are written
    /// at most once a second (after a crash they are merely considered again).
    stored_pos: i64,
    stored_at: Instant,
    pending: Option<Pending>,
}

struct Pending {
    txn_id: i64,
    last_pos: i64,
    count: i64,
    body: String,
}

/// What the next transaction holds, if anything.
enum Selection {
    /// Nothing for the service up to `upto`.
    Nothing {
        upto: i64,
    },
    Txn {
        upto: i64,
        count: i64,
        body: String,
    },
}

pub struct Sender {
    cursor: tokio::sync::Mutex<Option<Cursor>>,
    service: RwLock<Arc<AppService>>,
    kick: Notify,
    stop: tokio::sync::watch::Sender<bool>,
    interest: InterestCache,
    status: Mutex<(SenderStatus, Option<Instant>)>,
}

impl Sender {
    pub fn service(&self) -> Arc<AppService> {
        self.service
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Retry now: the service is evidently back (it pinged, or made a request).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn status(&self) -> SenderStatus {
        match self.status.lock() {
            Ok(guard) => {
                let (mut status, retry_at) = guard.clone();
                status.next_retry_in = retry_at.map(|at| at.saturating_duration_since(Instant::now()));
                status
            }
            Err(_) => SenderStatus::default(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut SenderStatus, &mut Option<Instant>)) {
        if let Ok(mut guard) = self.status.lock() {
            let (status, retry_at) = &mut *guard;
            f(status, retry_at);
        }
    }
}

enum Step {
    /// Something happened; look again at once.
    Progress,
    /// Nothing to send until new events arrive.
    Idle,
    /// Sending failed; wait this long (or for a kick).
    Wait(Duration),
}

/// Shared by all senders.
pub struct Delivery {
    store: Store,
    rooms: Arc<Rooms>,
    stream: Arc<EventStream>,
    http: ServiceHttp,
    senders: Mutex<HashMap<String, Arc<Sender>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Delivery {
    pub fn new(store: Store, rooms: Arc<Rooms>, stream: Arc<EventStream>, legacy_auth: bool) -> Self {
        Self {
            store,
            rooms,
            stream,
            http: ServiceHttp::new(Duration::from_secs(60), legacy_auth),
            senders: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Stops every sender before storage closes. A transaction in flight is abandoned safely: it
    /// is stored, and is sent again (same txn ID, same bytes) after the restart.
    pub async fn shutdown(&self) {
        if let Ok(senders) = self.senders.lock() {
            for sender in senders.values() {
                let _ = sender.stop.send(true);
            }
        }
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(3), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Starts, updates or stops senders so they match the registry. Kept services continue from
    /// their stored position with their new URL and tokens; new ones start at the current stream
    /// position; removed ones stop (their position is kept for a later return).
    pub async fn apply(self: &Arc<Self>, registry: &Registry) -> Result<()> {
        let current = self.stream.current();
        let mut wanted = HashMap::new();
        for service in &registry.services {
            self.store.appservice_state(service.id(), current).await?;
            wanted.insert(service.id().to_owned(), service.clone());
        }
        let mut senders = self
            .senders
            .lock()
            .map_err(|_| crate::Error::internal("senders poisoned"))?;
        senders.retain(|id, sender| {
            let keep = wanted.contains_key(id);
            if !keep {
                let _ = sender.stop.send(true);
                tracing::info!(service = %id, "application service removed; sender stopped");
            }
            keep
        });
        for (id, service) in wanted {
            if let Some(sender) = senders.get(&id) {
                if let Ok(mut slot) = sender.service.write() {
                    *slot = service;
                }
                sender.kick();
                continue;
            }
            let sender = Arc::new(Sender {
                cursor: tokio::sync::Mutex::new(None),
                service: RwLock::new(service),
                kick: Notify::new(),
                stop: tokio::sync::watch::Sender::new(false),
                interest: InterestCache::default(),
                status: Mutex::new((
                    SenderStatus {
                        up: true,
                        ..Default::default()
                    },
                    None,
                )),
            });
            senders.insert(id, sender.clone());
            let task = tokio::spawn(self.clone().run(sender));
            if let Ok(mut tasks) = self.tasks.lock() {
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        }
        Ok(())
    }

    pub fn sender(&self, id: &str) -> Option<Arc<Sender>> {
        self.senders.lock().ok()?.get(id).cloned()
    }

    pub fn http(&self) -> &ServiceHttp {
        &self.http
    }

    async fn run(self: Arc<Self>, sender: Arc<Sender>) {
        let mut news = self.stream.subscribe();
        let mut stop = sender.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let step = tokio::select! {
                step = self.step(&sender) => step,
                _ = stop.changed() => return,
            };
            let step = match step {
                Ok(step) => step,
                Err(e) => {
                    tracing::error!(service = sender.service().id(), error = %e, "application service sender failed");
                    Step::Wait(Duration::from_secs(1))
                }
            };
            match step {
                Step::Progress => continue,
                Step::Idle => {
                    tokio::select! {
                        _ = news.changed() => {}
                        () = sender.kick.notified() => {}
                        _ = stop.changed() => {}
                        () = self.stream.closed() => return,
                    }
                }
                Step::Wait(delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = sender.kick.notified() => {}
                        _ = stop.changed() => {}
                        () = self.stream.closed() => return,
                    }
                }
            }
        }
    }

    async fn step(&self, sender: &Sender) -> Result<Step> {
        let service = sender.service();
        let id = service.id();
        let mut guard = sender.cursor.lock().await;
        if guard.is_none() {
            let (last_pos, _) = self.store.appservice_state(id, self.stream.current()).await?;
            let pending =
                self.store
                    .appservice_pending_txn(id)
                    .await?
                    .map(|(txn_id, last_pos, count, body)| Pending {
                        txn_id,
                        last_pos,
                        count,
                        body,
                    });
            *guard = Some(Cursor {
                last_pos,
                stored_pos: last_pos,
                stored_at: Instant::now(),
                pending,
            });
        }
        let Some(cursor) = guard.as_mut() else {
            return Ok(Step::Idle);
        };

        if let Some(pending) = &cursor.pending {
            if let Some(wait) = self.push(sender, &service, pending).await? {
                return Ok(Step::Wait(wait));
            }
            // Delivered: acknowledge it and store the next transaction in one database commit.
            let (acked, covered) = (pending.txn_id, pending.last_pos);
            cursor.pending = None;
            cursor.last_pos = cursor.last_pos.max(covered);
            let selection = self.select(sender, &service, cursor.last_pos).await?;
            let (skip, next) = match &selection {
                Selection::Nothing { upto } => (Some(*upto), None),
                Selection::Txn { upto, count, body } => (None, Some((*upto, *count, body.as_str()))),
            };
            let new_id = self
                .store
                .appservice_ack_and_continue(id, acked, skip, next)
                .await?;
            cursor.stored_pos = cursor.last_pos;
            self.advance(cursor, selection, new_id, true);
            return Ok(Step::Progress);
        }

        if cursor.last_pos >= self.stream.current() {
            return Ok(Step::Idle);
        }
        let selection = self.select(sender, &service, cursor.last_pos).await?;
        match &selection {
            Selection::Nothing { upto } => {
                if cursor.stored_at.elapsed() >= Duration::from_secs(1) {
                    self.store.appservice_skip_to(id, *upto).await?;
                    cursor.stored_pos = *upto;
                    cursor.stored_at = Instant::now();
                }
                self.advance(cursor, selection, None, false);
            }
            Selection::Txn { upto, count, body } => {
                let txn_id = self.store.appservice_new_txn(id, *upto, *count, body).await?;
                tracing::debug!(service = id, txn_id, events = count, upto, "transaction stored");
                self.advance(cursor, selection, Some(txn_id), true);
            }
        }
        Ok(Step::Progress)
    }

    fn advance(&self, cursor: &mut Cursor, selection: Selection, txn_id: Option<i64>, stored: bool) {
        match selection {
            Selection::Nothing { upto } => {
                cursor.last_pos = cursor.last_pos.max(upto);
                if stored {
                    cursor.stored_pos = cursor.last_pos;
                }
            }
            Selection::Txn { upto, count, body } => {
                if let Some(txn_id) = txn_id {
                    cursor.pending = Some(Pending {
                        txn_id,
                        last_pos: upto,
                        count,
                        body,
                    });
                }
            }
        }
    }

    /// Picks the next transaction's events after `after`: interesting ones, at most 100 and
    /// ~1 MiB, in stream order.
    async fn select(&self, sender: &Sender, service: &AppService, after: i64) -> Result<Selection> {
        let current = self.stream.current();
        if after >= current {
            return Ok(Selection::Nothing { upto: after });
        }
        // The head of the stream is in memory; catch-up after downtime reads the database.
        let events = match self.stream.recent_after(after, current, SCAN_BATCH as usize) {
            Some(events) => events,
            None => self
                .store
                .events_after(after, current, SCAN_BATCH)
                .await?
                .into_iter()
                .map(|row| Pdu::from_row(row).map(Arc::new))
                .collect::<Result<_>>()?,
        };
        let mut upto = after;
        let mut selected: Vec<Box<RawValue>> = Vec::new();
        let mut bytes = 0;
        for pdu in events {
            if sender.interest.is_interested(service, &self.rooms, &pdu).await? {
                let json =
                    serde_json::value::to_raw_value(&pdu.to_client(None)).map_err(crate::Error::internal)?;
                if selected.len() == MAX_EVENTS_PER_TXN
                    || (!selected.is_empty() && bytes + json.get().len() > MAX_TXN_BYTES)
                {
                    break;
                }
                bytes += json.get().len();
                selected.push(json);
            }
            upto = pdu.stream_pos;
        }
        if selected.is_empty() || service.registration.url.is_none() {
            // Nothing for this service (or it takes no traffic).
            return Ok(Selection::Nothing { upto });
        }
        let count = selected.len() as i64;
        Ok(Selection::Txn {
            upto,
            count,
            body: serde_json::json!({ "events": selected }).to_string(),
        })
    }

    /// Sends a stored transaction. `None` when it was delivered; otherwise how long to wait.
    async fn push(&self, sender: &Sender, service: &AppService, txn: &Pending) -> Result<Option<Duration>> {
        let started = Instant::now();
        let path = format!("/transactions/{}", txn.txn_id);
        let Some(reply) = self
            .http
            .request(
                service,
                Family::Transactions,
                Method::PUT,
                &path,
                &path,
                Some(&txn.body),
            )
            .await
        else {
            // The URL was removed by a reload: the transaction counts as delivered.
            return Ok(None);
        };
        if reply.is_success() {
            sender.update(|status, retry_at| {
                if !status.up {
                    tracing::info!(service = service.id(), "application service is back up");
                }
                status.up = true;
                status.consecutive_failures = 0;
                status.sent_transactions += 1;
                status.sent_events += txn.count as u64;
                *retry_at = None;
            });
            tracing::debug!(
                service = service.id(),
                txn_id = txn.txn_id,
                count = txn.count,
                took_ms = started.elapsed().as_millis() as u64,
                "transaction delivered"
            );
            return Ok(None);
        }
        // 429 means busy, not down: wait as asked, without escalating the backoff.
        if let Reply::Status {
            status, retry_after, ..
        } = &reply
            && status.as_u16() == 429
        {
            let wait = retry_after.unwrap_or(Duration::from_secs(5));
            sender.update(|_, retry_at| *retry_at = Some(Instant::now() + wait));
            return Ok(Some(wait));
        }
        let mut wait = Duration::ZERO;
        sender.update(|status, retry_at| {
            status.up = false;
            status.consecutive_failures += 1;
            status.failed_attempts += 1;
            status.last_error = Some(reply.describe());
            wait = backoff(status.consecutive_failures);
            *retry_at = Some(Instant::now() + wait);
        });
        tracing::warn!(
            service = service.id(),
            txn_id = txn.txn_id,
            error = %reply.describe(),
            retry_in_s = wait.as_secs_f32(),
            "transaction failed; will retry"
        );
        Ok(Some(wait))
    }
}

/// 2, 4, 8 … 512 s after 1, 2, 3 … consecutive failures, ±10 % so services coming back are not hit
/// by every server at once.
pub fn backoff(failures: u32) -> Duration {
    let base = 2f64.powi(failures.clamp(1, MAX_BACKOFF_STEP) as i32);
    let jitter = rand::thread_rng().gen_range(0.9..1.1);
    Duration::from_secs_f64(base * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let secs: Vec<f64> = (1..=11).map(|n| backoff(n).as_secs_f64()).collect();
        let expected = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 512.0, 512.0];
        for (got, want) in secs.iter().zip(expected) {
            assert!((got / want - 1.0).abs() <= 0.1 + 1e-9, "{got} vs {want}");
        }
    }
}
