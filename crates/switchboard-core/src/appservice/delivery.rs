//! Durable, ordered transaction delivery: one sender task per service.
//!
//! The queue is the event stream. Each service has a stored position up to which every event was
//! considered. A sender selects the next interesting events (at most 100 and ~1 MiB), stores the
//! transaction — next txn ID, covered position, the exact body — and only then sends it. On a 2xx
//! the transaction is deleted and the position advanced in one database transaction; on failure
//! the *stored* body is re-sent with the same txn ID after a backoff (2, 4 … 512 s with jitter), so a
//! retry is byte-identical, also after a crash. One slow or dead service never delays another.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use rand::Rng;
use reqwest::Method;
use serde_json::value::RawValue;
use switchboard_store::{AsPosition, Store, StoredTxn};
use tokio::sync::Notify;

use super::{
    AppService, Registry,
    crypto::DeviceLists,
    dispatch::{Dispatcher, Queue},
    http::{Family, Reply, ServiceHttp},
    interest::InterestCache,
};
use crate::{Result, ephemeral::Ephemeral, pdu::Pdu, rooms::Rooms, stream::EventStream};

pub const MAX_EVENTS_PER_TXN: usize = 100;
/// Ephemeral items and to-device messages per transaction (a position's items are not split).
const MAX_AUX_PER_TXN: usize = 100;
/// To-device messages read per transaction (for all users; the service's are picked out).
const TO_DEVICE_SCAN: i64 = 1000;
const MAX_TXN_BYTES: usize = 1024 * 1024;
const SCAN_BATCH: i64 = 500;
const MAX_BACKOFF_STEP: u32 = 9; // 2^9 = 512 s, Synapse's cap
/// How often an idle sender moves its position past events it was not interested in.
const IDLE_ADVANCE: Duration = Duration::from_secs(1);

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
    /// Everything up to here (both streams) was considered.
    at: AsPosition,
    pending: Option<StoredTxn>,
}

/// What the next transaction holds, if anything.
enum Selection {
    /// Nothing for the service up to `upto`.
    Nothing { upto: AsPosition },
    Txn {
        upto: AsPosition,
        count: i64,
        body: String,
    },
}

pub struct Sender {
    cursor: tokio::sync::Mutex<Option<Cursor>>,
    /// Interesting positions the dispatcher found for this service.
    pub(super) queue: Mutex<Queue>,
    service: RwLock<Arc<AppService>>,
    kick: Notify,
    /// The dispatcher queued events for the service. Only an idle sender listens: a failing one
    /// keeps its backoff however busy its rooms are.
    pub(super) news: Notify,
    stop: tokio::sync::watch::Sender<bool>,
    pub(super) interest: InterestCache,
    status: Mutex<(SenderStatus, Option<Instant>)>,
    /// The service's users whose one-time keys were claimed since its last transaction
    /// (MSC3202): their counts go out even when nothing else does.
    keys_claimed: Mutex<BTreeSet<String>>,
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

    /// The users whose key counts are due (see [`Delivery::keys_claimed`]).
    fn claimed(&self) -> BTreeSet<String> {
        self.keys_claimed.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// A stored transaction carries the counts of these users (or the service stopped asking
    /// for counts): only claims made since keep them due.
    fn forget_claimed(&self, users: &BTreeSet<String>) {
        if let Ok(mut claimed) = self.keys_claimed.lock() {
            claimed.retain(|u| !users.contains(u));
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
    pub(super) store: Store,
    pub(super) rooms: Arc<Rooms>,
    stream: Arc<EventStream>,
    http: ServiceHttp,
    senders: Mutex<HashMap<String, Arc<Sender>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    ephemeral: std::sync::OnceLock<Arc<Ephemeral>>,
    dispatcher: Arc<Dispatcher>,
    skips: Arc<Skips>,
}

/// Positions senders moved to past events their services did not want. Written for all
/// services in one database transaction a second — not one fsync per service — since after a
/// crash those events are merely considered again.
#[derive(Default)]
struct Skips(Mutex<HashMap<String, AsPosition>>);

const SKIP_FLUSH: Duration = Duration::from_secs(1);

impl Skips {
    fn note(&self, id: &str, pos: AsPosition) {
        if let Ok(mut skips) = self.0.lock() {
            let entry = skips.entry(id.to_owned()).or_insert(pos);
            *entry = max(*entry, pos);
        }
    }

    async fn flush(&self, store: &Store) {
        let taken: Vec<(String, AsPosition)> = match self.0.lock() {
            Ok(mut skips) => skips.drain().collect(),
            Err(_) => return,
        };
        if taken.is_empty() {
            return;
        }
        if let Err(e) = store.appservice_skip_to(&taken).await {
            // Only progress over uninteresting events is lost; it is found again.
            tracing::warn!(error = %e, "storing application-service positions failed");
        }
    }

    async fn run(self: Arc<Self>, store: Store, stream: Arc<EventStream>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(SKIP_FLUSH) => self.flush(&store).await,
                () = stream.closed() => return,
            }
        }
    }
}

impl Delivery {
    pub fn new(store: Store, rooms: Arc<Rooms>, stream: Arc<EventStream>, legacy_auth: bool) -> Self {
        let skips = Arc::new(Skips::default());
        tokio::spawn(skips.clone().run(store.clone(), stream.clone()));
        Self {
            skips,
            dispatcher: Dispatcher::start(store.clone(), rooms.clone(), stream.clone()),
            store,
            rooms,
            stream,
            http: ServiceHttp::new(Duration::from_secs(60), legacy_auth),
            senders: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            ephemeral: std::sync::OnceLock::new(),
        }
    }

    /// Connects the ephemeral data (typing, receipts, presence) senders deliver.
    pub fn set_ephemeral(&self, ephemeral: Arc<Ephemeral>) {
        let _ = self.ephemeral.set(ephemeral);
    }

    /// Stops every sender before storage closes. A transaction in flight is abandoned safely: it
    /// is stored, and is sent again (same txn ID, same bytes) after the restart.
    pub async fn shutdown(&self) {
        if let Ok(senders) = self.senders.lock() {
            for sender in senders.values() {
                sender.stop.send_replace(true);
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
        self.skips.flush(&self.store).await;
    }

    /// Starts, updates or stops senders so they match the registry. Kept services continue from
    /// their stored position with their new URL and tokens; new ones start at the current stream
    /// position; removed ones stop (their position is kept for a later return).
    pub async fn apply(self: &Arc<Self>, registry: &Arc<Registry>) -> Result<()> {
        let now = self.now();
        let mut wanted = HashMap::new();
        for service in &registry.services {
            self.store.appservice_state(service.id(), now).await?;
            wanted.insert(service.id().to_owned(), service.clone());
        }
        let mut senders = self
            .senders
            .lock()
            .map_err(|_| crate::Error::internal("senders poisoned"))?;
        senders.retain(|id, sender| {
            let keep = wanted.contains_key(id);
            if !keep {
                sender.stop.send_replace(true);
                tracing::info!(service = %id, "application service removed; sender stopped");
            }
            keep
        });
        for (id, service) in wanted {
            if let Some(sender) = senders.get(&id) {
                if let Ok(mut slot) = sender.service.write() {
                    *slot = service;
                }
                // Namespaces may have changed: room-level answers are recomputed.
                sender.interest.clear();
                sender.kick();
                continue;
            }
            let sender = Arc::new(Sender {
                cursor: tokio::sync::Mutex::new(None),
                // Until the dispatcher takes it on, the sender scans the stream itself.
                queue: Mutex::new(Queue {
                    from: i64::MAX,
                    positions: Default::default(),
                }),
                service: RwLock::new(service),
                kick: Notify::new(),
                news: Notify::new(),
                stop: tokio::sync::watch::Sender::new(false),
                interest: InterestCache::default(),
                status: Mutex::new((
                    SenderStatus {
                        up: true,
                        ..Default::default()
                    },
                    None,
                )),
                keys_claimed: Mutex::new(BTreeSet::new()),
            });
            senders.insert(id, sender.clone());
            let task = tokio::spawn(self.clone().run(sender));
            if let Ok(mut tasks) = self.tasks.lock() {
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        }
        let in_order = registry
            .services
            .iter()
            .map(|service| senders.get(service.id()).cloned())
            .collect();
        self.dispatcher.set_targets(registry.clone(), in_order);
        Ok(())
    }

    /// One-time keys of these local users were claimed: services that encrypt (MSC3202) and own
    /// one of them get its new counts in a transaction soon, with or without other traffic, so
    /// they upload more before the device runs dry.
    pub fn keys_claimed(&self, users: &BTreeSet<String>) {
        let Ok(senders) = self.senders.lock() else {
            return;
        };
        for sender in senders.values() {
            let service = sender.service();
            if !service.registration.msc3202 {
                continue;
            }
            let owned: Vec<&String> = users.iter().filter(|u| service.owns_user(u)).collect();
            if owned.is_empty() {
                continue;
            }
            if let Ok(mut claimed) = sender.keys_claimed.lock() {
                claimed.extend(owned.into_iter().cloned());
            }
            sender.news.notify_one();
        }
    }

    pub fn sender(&self, id: &str) -> Option<Arc<Sender>> {
        self.senders.lock().ok()?.get(id).cloned()
    }

    pub fn http(&self) -> &ServiceHttp {
        &self.http
    }

    async fn run(self: Arc<Self>, sender: Arc<Sender>) {
        let mut aux_news = self.stream.subscribe_aux();
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
                    // Reload the cursor from the database: it is the truth after a failed step.
                    *sender.cursor.lock().await = None;
                    Step::Wait(Duration::from_secs(1))
                }
            };
            match step {
                Step::Progress => continue,
                Step::Idle => {
                    // New events wake the sender only if it wants them (the dispatcher tells
                    // it); otherwise it moves past them now and then.
                    tokio::select! {
                        () = tokio::time::sleep(IDLE_ADVANCE) => {}
                        () = sender.news.notified() => {}
                        _ = aux_news.changed(), if wants_aux(&sender.service()) => {}
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
            let (at, _) = self.store.appservice_state(id, self.now()).await?;
            let pending = self.store.appservice_pending_txn(id).await?;
            *guard = Some(Cursor { at, pending });
        }
        let Some(cursor) = guard.as_mut() else {
            return Ok(Step::Idle);
        };

        if let Some(pending) = &cursor.pending {
            if let Some(wait) = self.push(sender, &service, pending).await? {
                return Ok(Step::Wait(wait));
            }
            // Delivered: acknowledge it and store the next transaction in one database commit.
            // The cursor changes only after the commit: if anything fails before, the stored
            // transaction stays pending in memory as it is in the database.
            let (acked, at) = (pending.txn_id, max(cursor.at, pending.upto));
            let claimed = sender.claimed();
            let selection = self.select(sender, &service, at).await?;
            let (skip, next) = match &selection {
                Selection::Nothing { upto } => (Some(*upto), None),
                Selection::Txn { upto, count, body } => (None, Some((*upto, *count, body.as_str()))),
            };
            let new_id = self
                .store
                .appservice_ack_and_continue(id, acked, skip, next)
                .await?;
            sender.forget_claimed(&claimed);
            cursor.pending = None;
            cursor.at = at;
            self.advance(cursor, selection, new_id);
            return Ok(Step::Progress);
        }

        let now = self.now();
        let claimed = sender.claimed();
        if cursor.at.events >= now.events
            && (!wants_aux(&service) || cursor.at.aux >= now.aux)
            && claimed.is_empty()
        {
            return Ok(Step::Idle);
        }
        let selection = self.select(sender, &service, cursor.at).await?;
        match &selection {
            Selection::Nothing { upto } => {
                self.skips.note(id, *upto);
                self.advance(cursor, selection, None);
            }
            Selection::Txn { upto, count, body } => {
                let txn_id = self.store.appservice_new_txn(id, *upto, *count, body).await?;
                tracing::debug!(service = id, txn_id, events = count, "transaction stored");
                self.advance(cursor, selection, Some(txn_id));
            }
        }
        sender.forget_claimed(&claimed);
        Ok(Step::Progress)
    }

    /// The current head of both streams (of the events, as far as they were dispatched).
    fn now(&self) -> AsPosition {
        AsPosition {
            events: self.dispatcher.dispatched(),
            aux: self.stream.current_aux(),
        }
    }

    fn advance(&self, cursor: &mut Cursor, selection: Selection, txn_id: Option<i64>) {
        match selection {
            Selection::Nothing { upto } => cursor.at = max(cursor.at, upto),
            Selection::Txn { upto, count, body } => {
                if let Some(txn_id) = txn_id {
                    cursor.pending = Some(StoredTxn {
                        txn_id,
                        upto,
                        event_count: count,
                        body,
                    });
                }
            }
        }
    }

    /// Picks the next transaction after `after`: interesting events (at most 100 and ~1 MiB, in
    /// stream order) and, for services that asked for them, ephemeral data (at most 100).
    async fn select(&self, sender: &Sender, service: &AppService, after: AsPosition) -> Result<Selection> {
        let now = self.now();
        let mut upto = after;
        let mut selected = Selected::default();
        if after.events < now.events {
            match take_queued(sender, after.events, now.events)? {
                Queued::Positions { positions, more } => {
                    self.select_queued(positions, more, now.events, &mut upto, &mut selected)
                        .await?;
                }
                Queued::Before(from) => {
                    let until = now.events.min(from);
                    self.select_scanned(sender, service, after.events, until, &mut upto, &mut selected)
                        .await?;
                }
            }
        }
        let (mut ephemeral, mut to_device) = (Vec::new(), Vec::new());
        if after.aux < now.aux {
            upto.aux = now.aux;
            if wants_ephemeral(service) {
                let (items, covered) = self.aux_items(sender, service, after.aux, now.aux).await?;
                upto.aux = covered;
                for (_, item) in items {
                    match item {
                        AuxItem::Ephemeral(item) => ephemeral.push(item),
                        AuxItem::ToDevice(item) => to_device.push(item),
                    }
                }
            }
        }
        // Forgotten only once the transaction is stored (`Sender::forget_claimed`): a failure
        // before that leaves them to the next attempt.
        let claimed = if service.registration.msc3202 {
            sender.claimed()
        } else {
            BTreeSet::new()
        };
        let device_lists = if service.registration.msc3202 {
            self.device_list_summary(sender, service, after.aux, upto.aux, &selected.pdus)
                .await?
        } else {
            DeviceLists::default()
        };
        if (selected.json.is_empty()
            && ephemeral.is_empty()
            && to_device.is_empty()
            && device_lists.is_empty()
            && claimed.is_empty())
            || service.registration.url.is_none()
        {
            // Nothing for this service (or it takes no traffic).
            return Ok(Selection::Nothing { upto });
        }
        let count = selected.json.len() as i64;
        let mut body = serde_json::json!({ "events": selected.json });
        if service.registration.msc3202 {
            // As in Synapse: the recipients of to-device messages may have used keys too.
            let mut users = claimed;
            users.extend(
                to_device
                    .iter()
                    .filter_map(|m| m["to_user_id"].as_str().map(str::to_owned)),
            );
            self.add_msc3202_keys(
                service,
                &selected.pdus,
                &ephemeral,
                users,
                device_lists,
                &mut body,
            )
            .await?;
        }
        if !ephemeral.is_empty() {
            if service.registration.push_ephemeral_unstable {
                // Services built on older SDKs read only the unstable key (MSC2409).
                body["de.sorunome.msc2409.ephemeral"] = serde_json::json!(ephemeral);
            }
            body["ephemeral"] = serde_json::json!(ephemeral);
        }
        if !to_device.is_empty() {
            // MSC4203 kept MSC2409's unstable key, which is what Synapse sends and SDKs read.
            body["de.sorunome.msc2409.to_device"] = serde_json::json!(to_device);
        }
        Ok(Selection::Txn {
            upto,
            count,
            body: body.to_string(),
        })
    }

    /// The auxiliary stream's items for a transaction, in order: ephemeral data and to-device
    /// messages for the service's users in `(after, until]`, at most [`MAX_AUX_PER_TXN`], and
    /// the position they cover. A position is never split between two transactions.
    async fn aux_items(
        &self,
        sender: &Sender,
        service: &AppService,
        after: i64,
        until: i64,
    ) -> Result<(Vec<(i64, AuxItem)>, i64)> {
        let (messages, mut covered) = self.store.to_device_between(after, until, TO_DEVICE_SCAN).await?;
        let mut items: Vec<(i64, AuxItem)> = self
            .ephemeral_for(sender, service, after, covered)
            .await?
            .into_iter()
            .map(|(pos, item)| (pos, AuxItem::Ephemeral(item)))
            .collect();
        for message in messages {
            if !service.owns_user(&message.user_id) {
                continue;
            }
            let content: Box<RawValue> = match RawValue::from_string(message.content) {
                Ok(content) => content,
                Err(e) => {
                    tracing::warn!(error = %e, "stored to-device message is not JSON; skipped");
                    continue;
                }
            };
            let item = serde_json::json!({
                "type": message.kind,
                "sender": message.sender,
                "content": content,
                "to_user_id": message.user_id,
                "to_device_id": message.device_id,
            });
            items.push((message.pos, AuxItem::ToDevice(item)));
        }
        items.sort_by_key(|(pos, _)| *pos);
        if let Some((cut, _)) = items.get(MAX_AUX_PER_TXN) {
            let cut = *cut;
            if items[0].0 < cut {
                // The rest goes in the next transaction: cover only what is included.
                items.retain(|(pos, _)| *pos < cut);
                covered = cut - 1;
            } else {
                items.retain(|(pos, _)| *pos <= cut);
                covered = cut;
            }
        }
        Ok((items, covered))
    }

    /// Events the dispatcher queued for the service in `(after, until]`.
    async fn select_queued(
        &self,
        positions: Vec<i64>,
        more: bool,
        until: i64,
        upto: &mut AsPosition,
        selected: &mut Selected,
    ) -> Result<()> {
        let events = match self.stream.recent_at(&positions) {
            Some(events) => events,
            None => self
                .store
                .events_at(&positions)
                .await?
                .into_iter()
                .map(|row| Pdu::from_row(row).map(Arc::new))
                .collect::<Result<_>>()?,
        };
        let mut bytes = 0;
        for pdu in &events {
            if !add_event(selected, &mut bytes, pdu)? {
                // Full: the rest goes in the next transaction.
                return Ok(());
            }
            upto.events = pdu.stream_pos;
        }
        if !more {
            upto.events = until;
        }
        Ok(())
    }

    /// Scans `(after, until]` for events the service is interested in: what precedes the
    /// dispatcher's queue (after a restart, or a long outage).
    async fn select_scanned(
        &self,
        sender: &Sender,
        service: &AppService,
        after: i64,
        until: i64,
        upto: &mut AsPosition,
        selected: &mut Selected,
    ) -> Result<()> {
        // The head of the stream is in memory; catch-up after downtime reads the database.
        let events = match self.stream.recent_after(after, until, SCAN_BATCH as usize) {
            Some(events) => events,
            None => self
                .store
                .events_after(after, until, SCAN_BATCH)
                .await?
                .into_iter()
                .map(|row| Pdu::from_row(row).map(Arc::new))
                .collect::<Result<_>>()?,
        };
        let mut bytes = 0;
        for pdu in events {
            if sender.interest.is_interested(service, &self.rooms, &pdu).await?
                && !add_event(selected, &mut bytes, &pdu)?
            {
                break;
            }
            upto.events = pdu.stream_pos;
        }
        Ok(())
    }

    /// Typing and receipts of rooms the service is interested in (private receipts only of its
    /// own users) and presence of its users, changed in `(after, until]`, each with its position.
    async fn ephemeral_for(
        &self,
        sender: &Sender,
        service: &AppService,
        after: i64,
        until: i64,
    ) -> Result<Vec<(i64, serde_json::Value)>> {
        let Some(ephemeral) = self.ephemeral.get() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (room, pos) in ephemeral.typing_rooms_since(after) {
            if pos <= until
                && sender
                    .interest
                    .is_interested_in_room(service, &self.rooms, &room)
                    .await?
                && let Some(users) = ephemeral.typing_since(&room, Some(after))
            {
                let item = serde_json::json!({ "type": "m.typing", "room_id": room, "content": { "user_ids": users } });
                out.push((pos, item));
            }
        }
        for (room, pos, mut event) in ephemeral
            .receipt_events(after, until, |reader| service.owns_user(reader))
            .await?
        {
            let Ok(room_id) = ruma::OwnedRoomId::try_from(room.as_str()) else {
                continue;
            };
            if sender
                .interest
                .is_interested_in_room(service, &self.rooms, &room_id)
                .await?
            {
                event["room_id"] = serde_json::json!(room);
                out.push((pos, event));
            }
        }
        // Presence of the service's users, and of anyone in a room the service is interested in
        // (Synapse's `is_interested_in_presence`).
        for (pos, item) in ephemeral.presence_items(after, until, |_| true) {
            let Some(user) = item["sender"]
                .as_str()
                .and_then(|u| <&ruma::UserId>::try_from(u).ok())
            else {
                continue;
            };
            let wanted = self.shares_interest(sender, service, user).await?;
            if wanted {
                out.push((pos, item));
            }
        }
        Ok(out)
    }

    /// Sends a stored transaction. `None` when it was delivered; otherwise how long to wait.
    async fn push(&self, sender: &Sender, service: &AppService, txn: &StoredTxn) -> Result<Option<Duration>> {
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
                status.sent_events += txn.event_count as u64;
                *retry_at = None;
            });
            tracing::debug!(
                service = service.id(),
                txn_id = txn.txn_id,
                count = txn.event_count,
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

/// What a sender's queue holds for `(after, until]`.
enum Queued {
    /// The interesting positions (at most a transaction's worth; `more` if there are others).
    Positions { positions: Vec<i64>, more: bool },
    /// The queue starts later, at this position: what comes before must be scanned.
    Before(i64),
}

/// Reads the queue under one lock, so the dispatcher cannot clear it (overflow, reload) between
/// deciding to use it and taking from it.
fn take_queued(sender: &Sender, after: i64, until: i64) -> Result<Queued> {
    let mut queue = sender
        .queue
        .lock()
        .map_err(|_| crate::Error::internal("queue poisoned"))?;
    if after < queue.from {
        return Ok(Queued::Before(queue.from));
    }
    while queue.positions.front().is_some_and(|p| *p <= after) {
        queue.positions.pop_front();
    }
    let due = queue.positions.iter().take_while(|p| **p <= until).count();
    let take = due.min(MAX_EVENTS_PER_TXN);
    Ok(Queued::Positions {
        positions: queue.positions.iter().take(take).copied().collect(),
        more: due > take,
    })
}

/// An item of the auxiliary stream a transaction carries.
enum AuxItem {
    Ephemeral(serde_json::Value),
    ToDevice(serde_json::Value),
}

/// The events of the next transaction, and their client format.
#[derive(Default)]
struct Selected {
    pdus: Vec<Arc<Pdu>>,
    json: Vec<Box<RawValue>>,
}

/// Adds an event to a transaction unless it is full (100 events, ~1 MiB); `false` if it was.
fn add_event(selected: &mut Selected, bytes: &mut usize, pdu: &Arc<Pdu>) -> Result<bool> {
    let json = serde_json::value::to_raw_value(&pdu.to_client(None)).map_err(crate::Error::internal)?;
    if selected.json.len() == MAX_EVENTS_PER_TXN
        || (!selected.json.is_empty() && *bytes + json.get().len() > MAX_TXN_BYTES)
    {
        return Ok(false);
    }
    *bytes += json.get().len();
    selected.json.push(json);
    selected.pdus.push(pdu.clone());
    Ok(true)
}

fn max(a: AsPosition, b: AsPosition) -> AsPosition {
    AsPosition {
        events: a.events.max(b.events),
        aux: a.aux.max(b.aux),
    }
}

fn wants_ephemeral(service: &AppService) -> bool {
    service.registration.receive_ephemeral || service.registration.push_ephemeral_unstable
}

/// The service reads the auxiliary stream: ephemeral data, or device-list changes (MSC3202).
fn wants_aux(service: &AppService) -> bool {
    wants_ephemeral(service) || service.registration.msc3202
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
