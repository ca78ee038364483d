//! Outbound events: one queue per destination server, built like the application-service
//! sender. The queue is the event stream itself plus a stored position per destination, so
//! nothing is copied and nothing accepted is lost: a dispatcher follows the stream (its own
//! stored cursor), notes every destination of each event this server's users send, and wakes
//! that destination's task; the task sends what lies after its position in transactions of at
//! most 50 PDUs, and moves its position only when the destination has answered. A down
//! destination backs off (doubling to an hour) without holding up any other, and is retried at
//! once when it contacts this server. EDUs ride along: each transaction also carries up to 100
//! of what waits in the destination's outbox ([`super::outbox`]), deleted once answered.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedTransactionId, ServerName, UserId,
    api::federation::transactions::send_transaction_message, events::TimelineEventType,
};
use switchboard_store::Store;
use tokio::sync::Notify;

use super::client::FederationClient;
use crate::{Result, pdu::Pdu, rooms::Rooms, stream::EventStream};

/// The spec's limits of PDUs and EDUs per transaction.
const MAX_PDUS: usize = 50;
const MAX_EDUS: i64 = 100;
/// A typing notification older than this is not worth sending (receivers time typing out
/// after 30 to 60 s themselves).
const TYPING_STALE_MS: i64 = 30_000;
/// Events read from the stream at a time.
const SCAN: i64 = 500;
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A backlog longer than this (ten transactions) after an outage goes latest first. A shorter
/// one is sent in order: a peer fills a gap only so far (Synapse fetches 10 events and keeps
/// the one before them out of the timeline), and in order nothing is left to fill.
const LATEST_FIRST_BACKLOG: usize = 10 * MAX_PDUS;

/// The wait after `failures` failed attempts in a row: doubling from a second to 30 s, held
/// there for about five minutes (a restart or a short outage is over soon, and the peer may have
/// nothing to send that would wake the queue), then doubling again to an hour.
fn backoff(failures: u32) -> Duration {
    let seconds = match failures {
        0..=4 => 1u64 << failures,
        5..=14 => 30,
        n => 60u64.saturating_mul(1 << (n - 15).min(6)),
    };
    Duration::from_secs(seconds).min(MAX_BACKOFF)
}
/// The dispatcher's row among the destinations (no server is named "").
const DISPATCHER: &str = "";

pub struct FederationSender {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    rooms: Arc<Rooms>,
    stream: Arc<EventStream>,
    client: Arc<FederationClient>,
    server_name: OwnedServerName,
    queues: Mutex<HashMap<OwnedServerName, Arc<Signals>>>,
}

/// What wakes one destination's queue. Kept apart so new events never cut a back-off short
/// (that would retry a down server once per event); only the server itself calling does.
#[derive(Default)]
struct Signals {
    /// New events for the destination.
    news: Notify,
    /// The destination contacted this server: it is up.
    alive: Notify,
}

impl FederationSender {
    /// Resumes every destination's queue where it stopped and starts following the stream.
    pub async fn start(
        store: Store,
        rooms: Arc<Rooms>,
        stream: Arc<EventStream>,
        client: Arc<FederationClient>,
        server_name: OwnedServerName,
        mut outbox: tokio::sync::mpsc::UnboundedReceiver<OwnedServerName>,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            store: store.clone(),
            rooms,
            stream: stream.clone(),
            client,
            server_name,
            queues: Mutex::new(HashMap::new()),
        });
        let mut cursor = None;
        for (destination, _) in store.federation_destinations().await? {
            if destination == DISPATCHER {
                continue;
            }
            if let Ok(server) = OwnedServerName::try_from(destination.as_str()) {
                shared.clone().queue(&server);
            }
        }
        for (destination, pos) in store.federation_destinations().await? {
            if destination == DISPATCHER {
                cursor = Some(pos);
            }
        }
        let cursor = match cursor {
            Some(pos) => pos,
            None => {
                // First start: nothing before now was ever meant for another server.
                let now = stream.current();
                store.add_federation_destination(DISPATCHER, now).await?;
                now
            }
        };
        tokio::spawn(shared.clone().dispatch(cursor));
        let edus = shared.clone();
        tokio::spawn(async move {
            while let Some(destination) = outbox.recv().await {
                edus.clone().queue(&destination).news.notify_one();
            }
        });
        Ok(Self { shared })
    }

    /// `server` contacted this server: if its queue is waiting out a back-off, try now.
    pub fn wake(&self, server: &ServerName) {
        if let Some(notify) = self
            .shared
            .queues
            .lock()
            .ok()
            .and_then(|q| q.get(server).cloned())
        {
            notify.alive.notify_one();
        }
    }
}

impl Shared {
    /// The queue of `server`, with its task started if it has none.
    fn queue(self: Arc<Self>, server: &ServerName) -> Arc<Signals> {
        let Ok(mut queues) = self.queues.lock() else {
            return Arc::new(Signals::default());
        };
        if let Some(signals) = queues.get(server) {
            return signals.clone();
        }
        let signals = Arc::new(Signals::default());
        queues.insert(server.to_owned(), signals.clone());
        drop(queues);
        tokio::spawn(self.clone().run_queue(server.to_owned(), signals.clone()));
        signals
    }

    /// Follows the stream and wakes the destinations of each local event.
    async fn dispatch(self: Arc<Self>, mut cursor: i64) {
        let mut news = self.stream.subscribe();
        loop {
            let now = self.stream.current();
            if now > cursor {
                match self.dispatch_round(cursor, now).await {
                    Ok(next) => cursor = next,
                    Err(e) => {
                        tracing::error!(error = %e, "federation dispatch failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            if news.changed().await.is_err() {
                return;
            }
        }
    }

    async fn dispatch_round(self: &Arc<Self>, after: i64, until: i64) -> Result<i64> {
        let rows = self.store.events_after(after, until, SCAN).await?;
        let last = rows.last().map_or(until, |r| r.stream_pos);
        let mut rooms = HashMap::new();
        for row in rows {
            let pos = row.stream_pos;
            let relay = row.relay;
            let pdu = Pdu::from_row(row)?;
            if !self.sends(&pdu, relay) {
                continue;
            }
            for destination in self.destinations(&pdu, &mut rooms).await? {
                // A destination with a running queue has its row; a new one is created just
                // before this event, so the queue starts with it (one write per new server, not
                // one per event).
                let known = self.queues.lock().is_ok_and(|q| q.contains_key(&destination));
                if !known {
                    self.store
                        .add_federation_destination(destination.as_str(), pos - 1)
                        .await?;
                }
                self.clone().queue(&destination).news.notify_one();
            }
        }
        self.store.set_federation_sent(DISPATCHER, last).await?;
        Ok(last)
    }

    /// Whether this server sends an event to other servers: its own users' events, and other
    /// servers' joins and leaves it took through `send_join`/`send_leave` (`relay`).
    fn sends(&self, pdu: &Pdu, relay: bool) -> bool {
        relay || pdu.sender.server_name() == self.server_name
    }

    /// The servers an event goes to: those with members in its room, and the server of a member
    /// whose membership it changes (a kicked user's server is no longer in the room); never
    /// this server or the sender's (which has it).
    async fn destinations(
        &self,
        pdu: &Pdu,
        rooms: &mut HashMap<ruma::OwnedRoomId, BTreeSet<OwnedServerName>>,
    ) -> Result<BTreeSet<OwnedServerName>> {
        if !rooms.contains_key(&pdu.room_id) {
            let servers = self.rooms.joined_servers(&pdu.room_id).await?;
            rooms.insert(pdu.room_id.clone(), servers);
        }
        let mut servers = rooms.get(&pdu.room_id).cloned().unwrap_or_default();
        if pdu.kind == TimelineEventType::RoomMember
            && let Some(user) = pdu.state_key.as_deref().and_then(|u| UserId::parse(u).ok())
        {
            servers.insert(user.server_name().to_owned());
        }
        servers.remove(&self.server_name);
        servers.remove(pdu.sender.server_name());
        Ok(servers)
    }

    /// One destination's queue: send what lies after its position, in order, until caught up.
    async fn run_queue(self: Arc<Self>, destination: OwnedServerName, wake: Arc<Signals>) {
        let mut failures: u32 = 0;
        // Set by a failed attempt: the next one starts with the latest events.
        let mut catching_up = false;
        // A batch being retried keeps its transaction ID, so the destination can tell a repeat.
        let mut pending: Option<Batch> = None;
        let mut sent = loop {
            match self.sent_pos(&destination).await {
                Ok(pos) => break pos,
                Err(e) => {
                    tracing::error!(%destination, error = %e, "federation queue cannot read its position");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            if pending.is_none() {
                match self.next_transaction(&destination, sent).await {
                    Ok(Next::Send(batch)) => pending = Some(batch),
                    Ok(Next::Skip(upto)) => {
                        // Nothing for it up to `upto`.
                        if let Err(e) = self.store.set_federation_sent(destination.as_str(), upto).await {
                            tracing::error!(%destination, error = %e, "cannot record the queue's position");
                        }
                        sent = upto;
                        continue;
                    }
                    Ok(Next::Wait) => {
                        wake.news.notified().await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(%destination, error = %e, "federation queue cannot read what to send");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some(batch) = &pending else {
                continue;
            };
            let upto = &batch.upto;
            if catching_up {
                // Back from a long outage: the latest event of each room goes first, so
                // conversations resume at once and the destination fetches the gaps before them
                // itself; the backlog follows in order (what it fetched meanwhile is answered
                // as known).
                catching_up = false;
                if *upto < self.stream.current() {
                    match self.send_latest(&destination, sent).await {
                        Ok(()) => {}
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            catching_up = true;
                            self.wait_out(&destination, &wake, failures, &e).await;
                            continue;
                        }
                    }
                }
            }
            match self
                .transmit(
                    &destination,
                    &batch.txn_id,
                    batch.pdus.clone(),
                    batch.edus.clone(),
                )
                .await
            {
                Ok(()) => {
                    if let Err(e) = self.store.set_federation_sent(destination.as_str(), *upto).await {
                        tracing::error!(%destination, error = %e, "cannot record the queue's position");
                    }
                    if let Err(e) = self
                        .store
                        .delete_federation_edus(destination.as_str(), &batch.edu_ids)
                        .await
                    {
                        // Sent again later; receivers drop repeats (to-device by message ID).
                        tracing::error!(%destination, error = %e, "cannot drop the EDUs sent");
                    }
                    sent = *upto;
                    pending = None;
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    catching_up = true;
                    self.wait_out(&destination, &wake, failures, &e).await;
                }
            }
        }
    }

    /// Waits out the back-off after `failures` failed attempts, or until the destination calls.
    async fn wait_out(&self, destination: &ServerName, wake: &Signals, failures: u32, error: &crate::Error) {
        let backoff = backoff(failures);
        tracing::warn!(%destination, %error, retry_in = ?backoff, "transaction not delivered");
        let _ = tokio::time::timeout(backoff, wake.alive.notified()).await;
    }

    /// Sends one transaction; the destination's verdicts on single events are only logged (a
    /// refused event is not sent again).
    async fn transmit(
        &self,
        destination: &ServerName,
        txn_id: &OwnedTransactionId,
        pdus: Vec<Box<serde_json::value::RawValue>>,
        edus: Vec<Box<serde_json::value::RawValue>>,
    ) -> Result<()> {
        let count = pdus.len();
        let mut request = send_transaction_message::v1::Request::new(
            txn_id.clone(),
            self.server_name.clone(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        request.pdus = pdus;
        request.edus = edus.into_iter().map(ruma::serde::Raw::from_json).collect();
        let response = self.client.send(destination, request).await?;
        for (event_id, result) in response.pdus {
            if let Err(error) = result {
                tracing::warn!(%destination, %event_id, %error, "the destination refused an event");
            }
        }
        tracing::debug!(%destination, %txn_id, count, "transaction sent");
        Ok(())
    }

    /// Sends the newest event of each room (at most 50 rooms) among what `destination` has not
    /// had since `sent`, when that is more than [`LATEST_FIRST_BACKLOG`] events.
    async fn send_latest(&self, destination: &ServerName, sent: i64) -> Result<()> {
        let now = self.stream.current();
        let mut backlog = 0;
        let mut latest: HashMap<ruma::OwnedRoomId, (i64, String)> = HashMap::new();
        let mut rooms = HashMap::new();
        let mut after = sent;
        while let Some((events, last)) = self.page_for(destination, after, now, &mut rooms).await? {
            backlog += events.len();
            for (pos, pdu) in events {
                latest.insert(pdu.room_id.clone(), (pos, pdu.json));
            }
            after = last;
        }
        if backlog <= LATEST_FIRST_BACKLOG {
            return Ok(());
        }
        let mut newest: Vec<(i64, String)> = latest.into_values().collect();
        newest.sort_unstable();
        let pdus = newest
            .into_iter()
            .rev()
            .take(MAX_PDUS)
            .rev()
            .map(|(_, json)| serde_json::value::RawValue::from_string(json).map_err(crate::Error::internal))
            .collect::<Result<Vec<_>>>()?;
        if pdus.is_empty() {
            return Ok(());
        }
        let n = self.store.next_federation_txn(destination.as_str()).await?;
        let count = pdus.len();
        self.transmit(
            destination,
            &OwnedTransactionId::from(format!("sb{n}")),
            pdus,
            Vec::new(),
        )
        .await?;
        tracing::info!(%destination, rooms = count, "back from an outage: the latest events sent first");
        Ok(())
    }

    /// What the queue does next: send a transaction of the PDUs after `sent` and the waiting
    /// EDUs, move past events none of which are for the destination, or wait.
    async fn next_transaction(&self, destination: &ServerName, sent: i64) -> Result<Next> {
        let (pdus, upto) = self
            .next_batch(destination, sent)
            .await?
            .unwrap_or((Vec::new(), sent));
        let (edus, edu_ids) = self.next_edus(destination).await?;
        if pdus.is_empty() && edus.is_empty() {
            // Only stale typing waited, if anything.
            self.store
                .delete_federation_edus(destination.as_str(), &edu_ids)
                .await?;
            return Ok(if upto > sent { Next::Skip(upto) } else { Next::Wait });
        }
        let n = self.store.next_federation_txn(destination.as_str()).await?;
        Ok(Next::Send(Batch {
            txn_id: OwnedTransactionId::from(format!("sb{n}")),
            pdus,
            upto,
            edus,
            edu_ids,
        }))
    }

    /// Up to 100 EDUs waiting for `destination`, oldest first, and the IDs of all taken. Typing
    /// notifications that waited too long are left out (but counted as sent).
    async fn next_edus(
        &self,
        destination: &ServerName,
    ) -> Result<(Vec<Box<serde_json::value::RawValue>>, Vec<i64>)> {
        let queued = self.store.federation_edus(destination.as_str(), MAX_EDUS).await?;
        let ids = queued.iter().map(|e| e.id).collect();
        let now = crate::util::now_ms() as i64;
        let mut edus = Vec::with_capacity(queued.len());
        for edu in queued {
            if edu.edu_type == "m.typing" && now - edu.created_ts > TYPING_STALE_MS {
                continue;
            }
            let json = format!(
                r#"{{"edu_type":{},"content":{}}}"#,
                serde_json::Value::from(edu.edu_type),
                edu.content
            );
            edus.push(serde_json::value::RawValue::from_string(json).map_err(crate::Error::internal)?);
        }
        Ok((edus, ids))
    }

    async fn sent_pos(&self, destination: &ServerName) -> Result<i64> {
        Ok(self
            .store
            .federation_destinations()
            .await?
            .into_iter()
            .find(|(d, _)| d == destination.as_str())
            .map_or(0, |(_, pos)| pos))
    }

    /// Up to 50 of this server's events for `destination` after `sent`, and the position they
    /// reach; `None` when there is nothing after `sent` at all.
    async fn next_batch(
        &self,
        destination: &ServerName,
        sent: i64,
    ) -> Result<Option<(Vec<Box<serde_json::value::RawValue>>, i64)>> {
        let now = self.stream.current();
        if now <= sent {
            return Ok(None);
        }
        let mut pdus = Vec::new();
        let mut upto = sent;
        let mut rooms = HashMap::new();
        'scan: while upto < now {
            let Some((events, last)) = self.page_for(destination, upto, now, &mut rooms).await? else {
                upto = now;
                break;
            };
            for (pos, pdu) in events {
                pdus.push(
                    serde_json::value::RawValue::from_string(pdu.json).map_err(crate::Error::internal)?,
                );
                if pdus.len() == MAX_PDUS {
                    upto = pos;
                    break 'scan;
                }
            }
            upto = last;
        }
        Ok(Some((pdus, upto)))
    }

    /// One page of the stream after `after` (up to `now`): the events in it this server sends
    /// to `destination` with their positions, and the page's last position; `None` past the end.
    async fn page_for(
        &self,
        destination: &ServerName,
        after: i64,
        now: i64,
        rooms: &mut HashMap<ruma::OwnedRoomId, BTreeSet<OwnedServerName>>,
    ) -> Result<Option<(Vec<(i64, Pdu)>, i64)>> {
        let rows = self.store.events_after(after, now, SCAN).await?;
        let Some(last) = rows.last().map(|r| r.stream_pos) else {
            return Ok(None);
        };
        let mut events = Vec::new();
        for row in rows {
            let (pos, relay) = (row.stream_pos, row.relay);
            let pdu = Pdu::from_row(row)?;
            if self.sends(&pdu, relay) && self.destinations(&pdu, rooms).await?.contains(destination) {
                events.push((pos, pdu));
            }
        }
        Ok(Some((events, last)))
    }
}

/// A transaction ready to send (and to send again, unchanged, until the destination answers).
struct Batch {
    txn_id: OwnedTransactionId,
    pdus: Vec<Box<serde_json::value::RawValue>>,
    /// The stream position the PDUs reach.
    upto: i64,
    edus: Vec<Box<serde_json::value::RawValue>>,
    /// The outbox IDs of the EDUs taken (stale typing too), deleted once the destination answered.
    edu_ids: Vec<i64>,
}

enum Next {
    Send(Batch),
    Skip(i64),
    Wait,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_short_for_a_few_minutes_then_grows_to_an_hour() {
        let waits: Vec<u64> = (1..=22).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(&waits[..5], &[2, 4, 8, 16, 30]);
        let first_five_minutes: u64 = waits[..14].iter().sum();
        assert!((250..=400).contains(&first_five_minutes), "{waits:?}");
        assert_eq!(waits[14], 60);
        assert_eq!(*waits.last().unwrap(), 3600, "{waits:?}");
    }
}
