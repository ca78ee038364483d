//! Pushers: the devices to wake through a push gateway, and their delivery. Each HTTP pusher has
//! its own task that sends, in order, the user's notifying push actions after the pusher's
//! stored position (`sent_pos`) to the gateway's `/_matrix/push/v1/notify`, moving the position
//! only once the gateway answered. A gateway that fails is retried with backoff (1 s doubling to
//! an hour) from where it stopped, so it receives what it missed once it is back; a notification
//! that could not be delivered for a day is given up, as Synapse does. A pushkey the gateway
//! rejects removes the pusher.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{RoomId, UserId, events::StateEventType};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_store::{PushAction, PusherRow, Store};
use tokio::sync::Notify;

use crate::{
    Error, Result, config::Config, federation::client::IpFilter, pdu::Pdu, rooms::Rooms, stream::EventStream,
    util::now_ms,
};

/// The path every push gateway serves (the spec's Push Gateway API).
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Notifications sent per read of the queue.
const PAGE: i64 = 20;
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A notification the gateway has refused to take for this long is skipped.
const GIVE_UP_AFTER_MS: i64 = 24 * 3600 * 1000;
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(20);

/// `POST /pushers/set`'s body.
#[derive(Deserialize)]
pub struct SetPusher {
    pub pushkey: String,
    /// `None` (JSON `null`) deletes the pusher; absent is an error.
    #[serde(deserialize_with = "nullable")]
    pub kind: Option<String>,
    pub app_id: String,
    pub app_display_name: Option<String>,
    pub device_display_name: Option<String>,
    pub profile_tag: Option<String>,
    pub lang: Option<String>,
    #[serde(default)]
    pub data: Map<String, Value>,
    #[serde(default)]
    pub append: bool,
}

/// A field that must be present but may be `null` (serde reads an absent `Option` as `None`
/// unless the field has its own deserializer).
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

pub struct Pushers {
    store: Store,
    rooms: Arc<Rooms>,
    stream: Arc<EventStream>,
    http: reqwest::Client,
    filter: Arc<IpFilter>,
    /// Running delivery tasks by pusher ID, and each user's pushers.
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    tasks: HashMap<i64, Arc<Notify>>,
    by_user: HashMap<String, HashSet<i64>>,
}

impl Pushers {
    pub fn new(
        config: &Config,
        store: Store,
        rooms: Arc<Rooms>,
        stream: Arc<EventStream>,
    ) -> Result<Arc<Self>> {
        let filter = Arc::new(IpFilter::for_outbound(config));
        let http =
            crate::federation::client::filtered_http_client(filter.clone()).map_err(Error::Internal)?;
        Ok(Arc::new(Self {
            store,
            rooms,
            stream,
            http,
            filter,
            running: Mutex::new(Running::default()),
        }))
    }

    /// Starts a delivery task for every stored pusher.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        for pusher in self.store.pushers(None).await? {
            self.spawn(&pusher);
        }
        Ok(())
    }

    /// New notifying actions for these users: their pushers look.
    pub fn wake(&self, users: &HashSet<String>) {
        let Ok(running) = self.running.lock() else {
            return;
        };
        for user in users {
            for id in running.by_user.get(user).into_iter().flatten() {
                if let Some(notify) = running.tasks.get(id) {
                    notify.notify_one();
                }
            }
        }
    }

    pub async fn list(&self, user: &UserId) -> Result<Value> {
        let pushers: Vec<Value> = self
            .store
            .pushers(Some(user.as_str()))
            .await?
            .iter()
            .map(|p| {
                let data: Value = serde_json::from_str(&p.data).unwrap_or_else(|_| json!({}));
                json!({
                    "pushkey": p.pushkey,
                    "kind": p.kind,
                    "app_id": p.app_id,
                    "app_display_name": p.app_display_name,
                    "device_display_name": p.device_display_name,
                    "profile_tag": p.profile_tag,
                    "lang": p.lang,
                    "data": data,
                })
            })
            .collect();
        Ok(json!({ "pushers": pushers }))
    }

    /// `POST /pushers/set`: adds, replaces or (kind `null`) deletes a pusher.
    pub async fn set(self: &Arc<Self>, user: &UserId, device_id: &str, body: SetPusher) -> Result<()> {
        let Some(kind) = body.kind else {
            self.store
                .delete_pushers(Some(user.as_str()), &body.app_id, &body.pushkey)
                .await?;
            return Ok(());
        };
        if body.pushkey.len() > 512 {
            return Err(Error::InvalidParam("pushkey is longer than 512 bytes".to_owned()));
        }
        if body.app_id.len() > 64 {
            return Err(Error::InvalidParam(
                "app_id is longer than 64 characters".to_owned(),
            ));
        }
        let required = |field: Option<String>, name: &str| {
            field.ok_or_else(|| Error::MissingParam(format!("Missing {name}")))
        };
        let app_display_name = required(body.app_display_name, "app_display_name")?;
        let device_display_name = required(body.device_display_name, "device_display_name")?;
        let lang = required(body.lang, "lang")?;
        if let Some(format) = body.data.get("format")
            && format != "event_id_only"
        {
            return Err(Error::InvalidParam(
                "data.format must be event_id_only or absent".to_owned(),
            ));
        }
        match kind.as_str() {
            "http" => self.check_url(&body.data).await?,
            "email" => {
                return Err(Error::InvalidParam(
                    "This server does not send email notifications".to_owned(),
                ));
            }
            other => return Err(Error::InvalidParam(format!("Unknown pusher kind {other}"))),
        }
        let row = PusherRow {
            id: 0,
            user_id: user.to_string(),
            device_id: device_id.to_owned(),
            kind,
            app_id: body.app_id,
            pushkey: body.pushkey,
            app_display_name,
            device_display_name,
            profile_tag: body.profile_tag,
            lang,
            data: Value::Object(body.data).to_string(),
            created_ts: now_ms() as i64,
            // What happened before the pusher existed is not pushed.
            sent_pos: self.stream.current(),
            failing_since: None,
        };
        let stored = self.store.set_pusher(&row, body.append).await?;
        self.spawn(&stored);
        Ok(())
    }

    /// An HTTP pusher's `data.url`: an `http(s)` URL of the gateway's notify path, on an
    /// address outbound requests may reach (`ip_range_blacklist` / `ip_range_whitelist`).
    async fn check_url(&self, data: &Map<String, Value>) -> Result<()> {
        let raw = data
            .get("url")
            .ok_or_else(|| Error::MissingParam("An HTTP pusher needs data.url".to_owned()))?
            .as_str()
            .ok_or_else(|| Error::InvalidParam("data.url must be a string".to_owned()))?;
        let url =
            reqwest::Url::parse(raw).map_err(|e| Error::InvalidParam(format!("data.url {raw}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidParam(format!(
                "data.url {raw} is not an http(s) URL"
            )));
        }
        if url.path() != NOTIFY_PATH {
            return Err(Error::InvalidParam(format!(
                "data.url must have the path {NOTIFY_PATH}"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| Error::InvalidParam(format!("data.url {raw} has no host")))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let addresses: Vec<IpAddr> = match IpFilter::literal_ip(&url) {
            Some(ip) => vec![ip],
            // A name that does not resolve now may later; the connection is filtered anyway.
            None => tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host, port)))
                .await
                .ok()
                .and_then(|found| found.ok())
                .map(|found| found.map(|a| a.ip()).collect())
                .unwrap_or_default(),
        };
        if !addresses.is_empty() && !addresses.iter().any(|ip| self.filter.allows(*ip)) {
            return Err(Error::InvalidParam(format!(
                "data.url {raw} is on an address this server does not push to (ip_range_blacklist)"
            )));
        }
        Ok(())
    }

    fn spawn(self: &Arc<Self>, pusher: &PusherRow) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        running
            .by_user
            .entry(pusher.user_id.clone())
            .or_default()
            .insert(pusher.id);
        if let Some(notify) = running.tasks.get(&pusher.id) {
            notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        running.tasks.insert(pusher.id, notify.clone());
        tokio::spawn(self.clone().deliver(pusher.id, notify));
    }

    fn forget(&self, id: i64) {
        if let Ok(mut running) = self.running.lock() {
            running.tasks.remove(&id);
            for ids in running.by_user.values_mut() {
                ids.remove(&id);
            }
            running.by_user.retain(|_, ids| !ids.is_empty());
        }
    }

    /// One pusher's delivery task; ends when the pusher is deleted or the server stops.
    async fn deliver(self: Arc<Self>, id: i64, news: Arc<Notify>) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match self.deliver_some(id).await {
                Ok(Some(true)) => {
                    backoff = INITIAL_BACKOFF;
                    continue;
                }
                Ok(Some(false)) => {}
                Ok(None) => {
                    self.forget(id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(pusher = id, error = %e, "push gateway failed; retrying in {backoff:?}");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.stream.closed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            tokio::select! {
                () = news.notified() => {}
                () = self.stream.closed() => return,
            }
        }
    }

    /// Sends what waits for the pusher. `Some(true)`: sent some (look again), `Some(false)`:
    /// nothing waits, `None`: the pusher is gone.
    async fn deliver_some(&self, id: i64) -> Result<Option<bool>> {
        let Some(pusher) = self.store.pusher(id).await? else {
            return Ok(None);
        };
        let pending = self
            .store
            .pending_pushes(&pusher.user_id, pusher.sent_pos, PAGE)
            .await?;
        if pending.is_empty() {
            return Ok(Some(false));
        }
        for (action, event) in pending {
            let event = Pdu::from_row(event)?;
            let body = self.notification(&pusher, &action, &event).await?;
            match self.post(&pusher, &body).await {
                Ok(rejected) => {
                    if rejected.contains(&pusher.pushkey) {
                        tracing::info!(
                            pusher = id,
                            app_id = pusher.app_id,
                            "the push gateway rejected the pushkey; pusher removed"
                        );
                        self.store
                            .delete_pushers(Some(&pusher.user_id), &pusher.app_id, &pusher.pushkey)
                            .await?;
                        return Ok(None);
                    }
                    if !self.store.pusher_progress(id, action.stream_pos, None).await? {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    let now = now_ms() as i64;
                    let since = pusher.failing_since.unwrap_or(now);
                    // Given up: the gateway was down for a day; this one is skipped.
                    let skip = now - since > GIVE_UP_AFTER_MS;
                    let sent = if skip { action.stream_pos } else { pusher.sent_pos };
                    self.store
                        .pusher_progress(id, sent, Some(if skip { now } else { since }))
                        .await?;
                    return Err(e);
                }
            }
        }
        Ok(Some(true))
    }

    /// POSTs a notification; returns the pushkeys the gateway rejected.
    async fn post(&self, pusher: &PusherRow, body: &Value) -> Result<Vec<String>> {
        let data: Value = serde_json::from_str(&pusher.data).map_err(Error::internal)?;
        let url = data["url"]
            .as_str()
            .ok_or_else(|| Error::internal("pusher without a url"))?;
        if let Some(ip) = reqwest::Url::parse(url)
            .ok()
            .as_ref()
            .and_then(IpFilter::literal_ip)
            && !self.filter.allows(ip)
        {
            return Err(Error::Forbidden(format!("{url} is in ip_range_blacklist")));
        }
        let response = self
            .http
            .post(url)
            .json(body)
            .timeout(GATEWAY_TIMEOUT)
            .send()
            .await
            .map_err(|e| Error::BadGateway(format!("push gateway {url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::BadGateway(format!("push gateway {url} answered {status}")));
        }
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            rejected: Vec<String>,
        }
        let answer: Answer = response
            .json()
            .await
            .map_err(|e| Error::BadGateway(format!("push gateway {url}: {e}")))?;
        Ok(answer.rejected)
    }

    /// The Push Gateway API's notification for one event.
    async fn notification(&self, pusher: &PusherRow, action: &PushAction, event: &Pdu) -> Result<Value> {
        let mut data: Map<String, Value> = serde_json::from_str(&pusher.data).map_err(Error::internal)?;
        data.remove("url");
        let actions: Vec<Value> = serde_json::from_str(&action.actions).unwrap_or_default();
        let tweaks: Map<String, Value> = actions
            .iter()
            .filter_map(|a| {
                let name = a["set_tweak"].as_str()?;
                // `highlight` without a value means true.
                Some((
                    name.to_owned(),
                    a.get("value").cloned().unwrap_or(Value::Bool(true)),
                ))
            })
            .collect();
        let high = event.event_type == "m.room.encrypted"
            || tweaks.get("highlight").is_some_and(|v| v == true)
            || tweaks.contains_key("sound");
        let unread = self.store.rooms_with_unread(&pusher.user_id).await?;
        let event_id_only = data.get("format").and_then(Value::as_str) == Some("event_id_only");
        let device = json!({
            "app_id": pusher.app_id,
            "pushkey": pusher.pushkey,
            "pushkey_ts": pusher.created_ts / 1000,
            "data": data,
            "tweaks": tweaks,
        });
        let mut notification = json!({
            "event_id": event.event_id,
            "room_id": event.room_id,
            "counts": { "unread": unread },
            "devices": [device],
            "prio": if high { "high" } else { "low" },
        });
        if !event_id_only {
            notification["type"] = json!(event.event_type);
            notification["sender"] = json!(event.sender);
            notification["content"] = event.content_value();
            if let Some(name) = self.display_name(&event.room_id, event.sender.as_str()).await? {
                notification["sender_display_name"] = json!(name);
            }
            if let Some(name) = self.room_name(&event.room_id).await? {
                notification["room_name"] = json!(name);
            }
            if event.kind == ruma::events::TimelineEventType::RoomMember {
                notification["membership"] = json!(event.membership());
                notification["user_is_target"] =
                    json!(event.state_key.as_deref() == Some(pusher.user_id.as_str()));
            }
        }
        Ok(json!({ "notification": notification }))
    }

    async fn display_name(&self, room_id: &RoomId, user: &str) -> Result<Option<String>> {
        let member = self
            .rooms
            .state_event(room_id, &StateEventType::RoomMember, user)
            .await?;
        Ok(member.and_then(|m| m.content_value()["displayname"].as_str().map(str::to_owned)))
    }

    async fn room_name(&self, room_id: &RoomId) -> Result<Option<String>> {
        let name = self
            .rooms
            .state_event(room_id, &StateEventType::RoomName, "")
            .await?;
        Ok(name
            .and_then(|n| n.content_value()["name"].as_str().map(str::to_owned))
            .filter(|n| !n.is_empty()))
    }
}
