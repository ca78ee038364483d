//! Push notifications: push rules evaluated on the server for every event and local member
//! (`evaluate`), unread notification and highlight counts for `/sync`, `/notifications`, and
//! pushers that wake phones through a push gateway (`pushers`).

mod evaluate;
pub mod pushers;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use ruma::UserId;
use serde_json::{Value, json};
use switchboard_store::{ReadPosition, Store};
use tokio::sync::watch;

use crate::{
    Error, Result, account_data::AccountData, appservice::AppServices, config::Config, pdu::Pdu,
    rooms::Rooms, stream::EventStream,
};
pub use pushers::Pushers;

/// How long a `/sync` waits for the evaluator to reach the events it returns, so their counts
/// are in the same response.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

pub struct Push {
    store: Store,
    evaluated: watch::Receiver<i64>,
    pub pushers: Arc<Pushers>,
}

/// Unread notifications and highlights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub notifications: i64,
    pub highlights: i64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.notifications += other.notifications;
        self.highlights += other.highlights;
    }

    pub fn json(&self) -> Value {
        json!({ "notification_count": self.notifications, "highlight_count": self.highlights })
    }
}

/// A room's unread counts: the main timeline's and each thread's.
#[derive(Clone, Debug, Default)]
pub struct RoomUnread {
    pub main: Counts,
    pub threads: BTreeMap<String, Counts>,
}

impl RoomUnread {
    /// All threads together, for clients that do not ask for thread counts.
    pub fn total(&self) -> Counts {
        let mut total = self.main;
        for counts in self.threads.values() {
            total.add(*counts);
        }
        total
    }
}

impl Push {
    pub async fn start(
        config: &Config,
        store: Store,
        rooms: Arc<Rooms>,
        stream: Arc<EventStream>,
        account_data: Arc<AccountData>,
        appservices: Arc<AppServices>,
    ) -> Result<Arc<Self>> {
        let pushers = Pushers::new(config, store.clone(), rooms.clone(), stream.clone())?;
        pushers.start().await?;
        let (evaluated_tx, evaluated) = watch::channel(-1);
        let evaluator = evaluate::Evaluator {
            store: store.clone(),
            rooms,
            stream,
            account_data,
            appservices,
            pushers: pushers.clone(),
            evaluated: evaluated_tx,
        };
        tokio::spawn(evaluator.run());
        Ok(Arc::new(Self {
            store,
            evaluated,
            pushers,
        }))
    }

    /// Waits (a little) until the evaluator has read the events up to `pos`.
    pub async fn caught_up(&self, pos: i64) {
        let mut evaluated = self.evaluated.clone();
        let reached = tokio::time::timeout(CATCH_UP_WAIT, evaluated.wait_for(|e| *e >= pos)).await;
        if reached.is_err() {
            tracing::debug!(pos, "push-rule evaluation lags; counts may be behind");
        }
    }

    /// Unread counts of the user's rooms that have any, once evaluation reached `until`.
    pub async fn unread(&self, user: &UserId, until: i64) -> Result<HashMap<String, RoomUnread>> {
        self.caught_up(until).await;
        let mut rooms: HashMap<String, RoomUnread> = HashMap::new();
        for row in self.store.unread_counts(user.as_str(), until).await? {
            let counts = Counts {
                notifications: row.notifications,
                highlights: row.highlights,
            };
            let room = rooms.entry(row.room_id).or_default();
            if row.thread_id == "main" {
                room.main = counts;
            } else {
                room.threads.insert(row.thread_id, counts);
            }
        }
        Ok(rooms)
    }

    /// `GET /notifications`: newest first, `from` a previous page's `next_token`.
    pub async fn notifications(
        &self,
        user: &UserId,
        from: Option<&str>,
        limit: Option<u64>,
        only: Option<&str>,
    ) -> Result<Value> {
        let before = match from {
            Some(token) => token
                .parse::<i64>()
                .map_err(|_| Error::InvalidParam(format!("invalid from token {token}")))?,
            None => i64::MAX,
        };
        let limit = limit.unwrap_or(50).clamp(1, 1000) as i64;
        let only_highlight = only.is_some_and(|o| o.contains("highlight"));
        let rows = self
            .store
            .notifications(user.as_str(), before, limit, only_highlight)
            .await?;
        let next_token = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|(a, _, _)| a.stream_pos.to_string()))
            .flatten();
        let mut notifications = Vec::with_capacity(rows.len());
        for (action, event, read) in rows {
            let event = Pdu::from_row(event)?;
            let actions: Value = serde_json::from_str(&action.actions).map_err(Error::internal)?;
            notifications.push(json!({
                "actions": actions,
                "event": crate::sync::to_value(&event, None),
                "read": read,
                "room_id": action.room_id,
                "ts": event.origin_server_ts,
            }));
        }
        let mut body = json!({ "notifications": notifications });
        if let Some(token) = next_token {
            body["next_token"] = json!(token);
        }
        Ok(body)
    }
}

/// A read receipt of a local user: their counts start after the event, in its thread (`None`:
/// every thread). Written before the receipt is announced, so a `/sync` woken by the receipt
/// already sees the counts it resets.
pub async fn receipt_read(
    store: &Store,
    user: &UserId,
    room: &str,
    thread: Option<&str>,
    event_id: &str,
) -> Result<()> {
    if let Some(event) = store.event(event_id).await? {
        store
            .advance_read_position(&ReadPosition {
                user_id: user.to_string(),
                room_id: room.to_owned(),
                thread_id: thread.unwrap_or("").to_owned(),
                stream_pos: event.stream_pos,
            })
            .await?;
    }
    Ok(())
}
