//! Acting through the Client-Server API with the service's `as_token`: as the bot, or as a
//! virtual user of the namespace (`?user_id=`), with a small cache so registering, joining and
//! profile calls are made once.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use reqwest::Method;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

use crate::{Error, MatrixError};

/// The service's HTTP client to the homeserver. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    homeserver: String,
    as_token: String,
    /// The service's own user, who invites virtual users into rooms they cannot join.
    bot: OwnedUserId,
    /// Makes transaction IDs unique across restarts of the service.
    txn_prefix: String,
    txn_counter: AtomicU64,
    cache: Mutex<Cache>,
    /// Set when the service encrypts (feature `e2ee`, [`crate::AppserviceBuilder::encryption`]).
    #[cfg(feature = "e2ee")]
    crypto: std::sync::OnceLock<Arc<crate::crypto::Crypto>>,
}

/// What is known to be true already, so it is not asked again.
#[derive(Default)]
struct Cache {
    registered: HashSet<OwnedUserId>,
    joined: HashSet<(OwnedRoomId, OwnedUserId)>,
    /// `(user, "displayname" | "avatar_url")` → value set.
    profile: HashMap<(OwnedUserId, &'static str), String>,
}

/// Percent-encodes a path segment.
pub(crate) fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Client {
    pub fn new(homeserver: &str, as_token: &str, bot: &UserId) -> Self {
        // reqwest needs a TLS provider installed before a client is built (https homeservers).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        Self {
            inner: Arc::new(ClientInner {
                http: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(60))
                    .build()
                    .unwrap_or_default(),
                homeserver: homeserver.trim_end_matches('/').to_owned(),
                as_token: as_token.to_owned(),
                bot: bot.to_owned(),
                txn_prefix: format!("sb{started}"),
                txn_counter: AtomicU64::new(0),
                cache: Mutex::new(Cache::default()),
                #[cfg(feature = "e2ee")]
                crypto: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn homeserver(&self) -> &str {
        &self.inner.homeserver
    }

    /// Acts as `user_id` (the bot or a user of the namespace).
    pub fn intent(&self, user_id: &UserId) -> Intent {
        Intent {
            client: self.clone(),
            user_id: user_id.to_owned(),
            timestamp: None,
        }
    }

    /// A Client-Server API call with the `as_token`; `as_user` masquerades. `path` starts with
    /// `/_matrix/`. A non-2xx answer is a [`MatrixError`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        as_user: Option<&UserId>,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let url = format!("{}{path}", self.inner.homeserver);
        let mut request = self
            .inner
            .http
            .request(method, &url)
            .bearer_auth(&self.inner.as_token);
        if let Some(user) = as_user {
            request = request.query(&[("user_id", user.as_str())]);
        }
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| Error::Unreachable {
            url: self.inner.homeserver.clone(),
            message: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let value: Value = if text.is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).map_err(|_| Error::Unreachable {
                url: url.clone(),
                message: format!("answered {status} with a body that is not JSON"),
            })?
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(MatrixError {
            status: status.as_u16(),
            errcode: value["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned(),
            error: value["error"].as_str().unwrap_or_default().to_owned(),
        }
        .into())
    }

    #[cfg(feature = "e2ee")]
    pub(crate) fn set_crypto(&self, crypto: Arc<crate::crypto::Crypto>) {
        let _ = self.inner.crypto.set(crypto);
    }

    #[cfg(feature = "e2ee")]
    pub(crate) fn crypto(&self) -> Option<&Arc<crate::crypto::Crypto>> {
        self.inner.crypto.get()
    }

    fn next_txn_id(&self) -> String {
        let n = self.inner.txn_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.inner.txn_prefix)
    }

    fn cached<T>(&self, f: impl FnOnce(&mut Cache) -> T) -> Option<T> {
        self.inner.cache.lock().ok().map(|mut cache| f(&mut cache))
    }
}

/// Acting as one user: the bot or a virtual user of the namespace. Each call makes sure the
/// user exists and has joined the room first, once.
#[derive(Clone)]
pub struct Intent {
    client: Client,
    user_id: OwnedUserId,
    timestamp: Option<MilliSecondsSinceUnixEpoch>,
}

impl Intent {
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// Sends with this `origin_server_ts` (the `ts` parameter; for bridged history).
    pub fn at(&self, timestamp: MilliSecondsSinceUnixEpoch) -> Intent {
        Intent {
            timestamp: Some(timestamp),
            ..self.clone()
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        self.client
            .request(method, path, Some(&self.user_id), query, body)
            .await
    }

    /// Registers the user (`m.login.application_service`) unless it was already; "already
    /// exists" counts as success.
    pub async fn ensure_registered(&self) -> Result<(), Error> {
        if self
            .client
            .cached(|c| c.registered.contains(&self.user_id))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let body = json!({
            "type": "m.login.application_service",
            "username": self.user_id.localpart(),
            "inhibit_login": true,
        });
        let query = [("kind", "user".to_owned())];
        match self
            .client
            .request(
                Method::POST,
                "/_matrix/client/v3/register",
                None,
                &query,
                Some(&body),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => {}
            Err(e) => return Err(e),
        }
        self.client.cached(|c| c.registered.insert(self.user_id.clone()));
        Ok(())
    }

    /// Joins the room unless already joined. If the room does not let the user in, the bot
    /// invites it first (the bot must be able to).
    pub async fn ensure_joined(&self, room_id: &RoomId) -> Result<(), Error> {
        let key = (room_id.to_owned(), self.user_id.clone());
        if self.client.cached(|c| c.joined.contains(&key)).unwrap_or(false) {
            return Ok(());
        }
        self.ensure_registered().await?;
        let path = format!("/_matrix/client/v3/join/{}", enc(room_id.as_str()));
        match self.call(Method::POST, &path, &[], Some(&json!({}))).await {
            Ok(_) => {}
            // The bot invites others in; it cannot invite itself.
            Err(e) if e.errcode() == Some("M_FORBIDDEN") && self.user_id != self.client.inner.bot => {
                let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id.as_str()));
                self.client
                    .request(
                        Method::POST,
                        &invite,
                        None,
                        &[],
                        Some(&json!({"user_id": self.user_id})),
                    )
                    .await?;
                self.call(Method::POST, &path, &[], Some(&json!({}))).await?;
            }
            Err(e) => return Err(e),
        }
        // In an encrypted room the user needs a device before anyone writes, or what they write
        // is shared with no device of the service's. (Remembered as joined only then: a retry
        // makes the device if this failed.)
        #[cfg(feature = "e2ee")]
        if let Some(crypto) = self.client.crypto()
            && crypto.is_encrypted(&self.user_id, room_id).await?
        {
            crypto.ensure_device(&self.user_id).await?;
        }
        self.client.cached(|c| c.joined.insert(key));
        Ok(())
    }

    /// Remembers that the user is in the room (e.g. it created it).
    fn joined(&self, room_id: &RoomId) {
        self.client
            .cached(|c| c.joined.insert((room_id.to_owned(), self.user_id.clone())));
    }

    async fn set_profile(&self, field: &'static str, value: &str) -> Result<(), Error> {
        let key = (self.user_id.clone(), field);
        if self
            .client
            .cached(|c| c.profile.get(&key).is_some_and(|v| v == value))
            .unwrap_or(false)
        {
            return Ok(());
        }
        self.ensure_registered().await?;
        let path = format!(
            "/_matrix/client/v3/profile/{}/{field}",
            enc(self.user_id.as_str())
        );
        self.call(Method::PUT, &path, &[], Some(&json!({ field: value })))
            .await?;
        self.client.cached(|c| c.profile.insert(key, value.to_owned()));
        Ok(())
    }

    /// Sets the display name (skipped when it is already this).
    pub async fn set_display_name(&self, name: &str) -> Result<(), Error> {
        self.set_profile("displayname", name).await
    }

    /// Sets the avatar (`mxc://` URI; skipped when it is already this).
    pub async fn set_avatar_url(&self, url: &str) -> Result<(), Error> {
        self.set_profile("avatar_url", url).await
    }

    fn ts_query(&self) -> Vec<(&'static str, String)> {
        self.timestamp
            .map(|ts| vec![("ts", ts.get().to_string())])
            .unwrap_or_default()
    }

    /// Sends a message event (joining first if needed); returns its event ID. With encryption
    /// on, an event for an encrypted room goes out as `m.room.encrypted` from this user's device.
    pub async fn send(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<OwnedEventId, Error> {
        self.ensure_joined(room_id).await?;
        #[cfg(feature = "e2ee")]
        if let Some(crypto) = self.client.crypto()
            && event_type != "m.room.encrypted"
            && crypto.is_encrypted(&self.user_id, room_id).await?
        {
            let encrypted = crypto
                .encrypt(&self.user_id, room_id, event_type, content)
                .await?;
            return self.send_as_is(room_id, "m.room.encrypted", &encrypted).await;
        }
        self.send_as_is(room_id, event_type, content).await
    }

    async fn send_as_is(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<OwnedEventId, Error> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            enc(room_id.as_str()),
            enc(event_type),
            self.client.next_txn_id()
        );
        let answer = self.call_joined(room_id, &path, content).await?;
        event_id(&answer)
    }

    /// A `PUT` that needs the user in the room. If the room refuses it, the user may have been
    /// kicked or have left behind the cache's back: join again and retry once.
    async fn call_joined(&self, room_id: &RoomId, path: &str, content: &Value) -> Result<Value, Error> {
        match self
            .call(Method::PUT, path, &self.ts_query(), Some(content))
            .await
        {
            Err(e) if e.errcode() == Some("M_FORBIDDEN") => {
                self.client
                    .cached(|c| c.joined.remove(&(room_id.to_owned(), self.user_id.clone())));
                self.ensure_joined(room_id).await?;
                self.call(Method::PUT, path, &self.ts_query(), Some(content))
                    .await
            }
            other => other,
        }
    }

    /// Sends an `m.room.message` with `msgtype: m.text`.
    pub async fn send_text(&self, room_id: &RoomId, body: &str) -> Result<OwnedEventId, Error> {
        self.send(
            room_id,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": body}),
        )
        .await
    }

    /// Sends a state event (joining first if needed); returns its event ID.
    pub async fn send_state(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> Result<OwnedEventId, Error> {
        self.ensure_joined(room_id).await?;
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            enc(room_id.as_str()),
            enc(event_type),
            enc(state_key)
        );
        let answer = self.call_joined(room_id, &path, content).await?;
        event_id(&answer)
    }

    /// Creates a room (the `/createRoom` body as the spec defines it) as this user.
    pub async fn create_room(&self, body: Value) -> Result<OwnedRoomId, Error> {
        self.ensure_registered().await?;
        // An encrypted room: the user's device exists before anyone is invited, so whoever
        // writes first shares their room key with it.
        #[cfg(feature = "e2ee")]
        if let Some(crypto) = self.client.crypto()
            && body["initial_state"]
                .as_array()
                .is_some_and(|state| state.iter().any(|e| e["type"] == "m.room.encryption"))
        {
            crypto.ensure_device(&self.user_id).await?;
        }
        let answer = self
            .call(Method::POST, "/_matrix/client/v3/createRoom", &[], Some(&body))
            .await?;
        let room_id = answer["room_id"]
            .as_str()
            .and_then(|r| OwnedRoomId::try_from(r).ok())
            .ok_or_else(|| Error::Unreachable {
                url: self.client.homeserver().to_owned(),
                message: "createRoom answered without a room_id".to_owned(),
            })?;
        self.joined(&room_id);
        Ok(room_id)
    }

    /// Leaves the room.
    pub async fn leave(&self, room_id: &RoomId) -> Result<(), Error> {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room_id.as_str()));
        self.call(Method::POST, &path, &[], Some(&json!({}))).await?;
        self.client
            .cached(|c| c.joined.remove(&(room_id.to_owned(), self.user_id.clone())));
        Ok(())
    }
}

fn event_id(answer: &Value) -> Result<OwnedEventId, Error> {
    answer["event_id"]
        .as_str()
        .and_then(|e| OwnedEventId::try_from(e).ok())
        .ok_or_else(|| Error::Unreachable {
            url: String::new(),
            message: "the homeserver answered without an event_id".to_owned(),
        })
}
