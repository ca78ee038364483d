//! End-to-end encryption for services (feature `e2ee`), on matrix-sdk-crypto (vodozemac).
//!
//! Each user the service speaks as in an encrypted room — the bot, or a virtual user — gets a
//! device of its own, created with MSC4190 (`PUT /devices/{id}` under the `as_token`, no login),
//! and an `OlmMachine` whose store lives in a directory per user ([`store::FileCryptoStore`]).
//! The machines learn everything from transactions: to-device messages (MSC4203), one-time-key
//! counts and device-list changes (MSC3202); nothing calls `/sync`. Their requests (key uploads,
//! queries and claims, to-device messages) are made with device masquerading. Incoming
//! `m.room.encrypted` events are decrypted before a handler sees them; what an intent sends into
//! an encrypted room is encrypted, the room key shared first with every device of the room's
//! members (invited ones too, unless the history is for joined members only).
//!
//! matrix-sdk-crypto speaks ruma 0.16 (`ruma_crypto` here); the rest of the SDK speaks the
//! workspace's ruma. Between the two, values travel as JSON.

mod store;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    TrustRequirement,
    types::requests::{AnyOutgoingRequest, OutgoingRequest, ToDeviceRequest},
};
use reqwest::Method;
use ruma_crypto::{
    OneTimeKeyAlgorithm, OwnedRoomId, OwnedUserId, UInt,
    api::{
        IncomingResponse,
        client::{
            keys::{claim_keys, get_keys, upload_keys, upload_signatures},
            message::send_message_event,
            sync::sync_events::DeviceLists,
            to_device::send_event_to_device,
        },
    },
    events::{
        AnyMessageLikeEventContent, AnyToDeviceEvent,
        room::{
            encryption::RoomEncryptionEventContent,
            history_visibility::{HistoryVisibility, RoomHistoryVisibilityEventContent},
        },
    },
    serde::Raw,
};
use serde_json::{Value, json};

use crate::{Client, Error, client::enc};

const UNTRUSTED: DecryptionSettings = DecryptionSettings {
    sender_device_trust_requirement: TrustRequirement::Untrusted,
};

/// One device of one of the service's users.
struct Device {
    olm: OlmMachine,
    device_id: String,
    /// One sequence of requests at a time per device: two concurrent key claims or shares would
    /// each start sessions of their own.
    busy: tokio::sync::Mutex<()>,
}

pub(crate) struct Crypto {
    dir: PathBuf,
    client: Client,
    /// Per user: the device once it is ready. One cell per user, so making one device (HTTP,
    /// files) holds up nobody else.
    devices: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Device>>>>>,
    /// Rooms known to be encrypted (or not): `m.room.encryption` cannot be removed.
    encrypted: Mutex<HashMap<String, bool>>,
    /// Events that could not be decrypted yet (their room key may come in a later transaction),
    /// also kept in `parked.json`: the transaction that brought them was acknowledged.
    parked: Mutex<Vec<Parked>>,
}

/// An event waiting for its room key.
#[derive(Clone, serde::Deserialize, serde::Serialize)]
struct Parked {
    since_ms: u64,
    event: Value,
}

/// How long an event waits for its room key before the handler gets it still encrypted.
const PARK_FOR_MS: u64 = 10 * 60 * 1000;
/// At most this many events wait; beyond, the oldest go to the handler encrypted.
const MAX_PARKED: usize = 1000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn crypto_error(e: impl std::fmt::Display) -> Error {
    Error::Crypto(e.to_string())
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The query that masquerades as one device of a user (`?user_id=` is added by the client).
fn device_query(device: &str) -> [(&'static str, String); 2] {
    [
        ("device_id", device.to_owned()),
        ("org.matrix.msc3202.device_id", device.to_owned()),
    ]
}

/// A ruma 0.16 response from a JSON answer.
fn response<R: IncomingResponse>(answer: &Value) -> Result<R, Error> {
    let body = serde_json::to_vec(answer).map_err(crypto_error)?;
    let http = http::Response::builder()
        .status(200)
        .body(body)
        .map_err(crypto_error)?;
    R::try_from_http_response(http).map_err(crypto_error)
}

impl Crypto {
    pub(crate) fn new(dir: PathBuf, client: Client) -> Self {
        Self {
            dir,
            client,
            devices: Default::default(),
            encrypted: Default::default(),
            parked: Default::default(),
        }
    }

    /// Where a user's device lives: a directory named by a hash of the user ID (which may be
    /// longer than a file name), with the ID in `user_id`.
    fn user_dir(&self, user: &str) -> PathBuf {
        self.dir.join(store::file_name(&[user]).trim_end_matches(".json"))
    }

    /// The devices ready so far.
    fn loaded(&self) -> Vec<Arc<Device>> {
        self.devices
            .lock()
            .map(|d| d.values().filter_map(|cell| cell.get().cloned()).collect())
            .unwrap_or_default()
    }

    fn is_loaded(&self, user: &str) -> bool {
        self.devices
            .lock()
            .is_ok_and(|d| d.get(user).is_some_and(|cell| cell.initialized()))
    }

    /// The device of `user`, created (with its keys uploaded) on first use and loaded from disk
    /// after a restart.
    async fn device(&self, user: &ruma::UserId) -> Result<Arc<Device>, Error> {
        let cell = self
            .devices
            .lock()
            .map_err(|_| Error::Crypto("device table poisoned".to_owned()))?
            .entry(user.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.load_device(user)).await.cloned()
    }

    async fn load_device(&self, user: &ruma::UserId) -> Result<Arc<Device>, Error> {
        let dir = self.user_dir(user.as_str());
        store::private_dir(&dir).map_err(io_error(format!("cannot create {}", dir.display())))?;
        let id_file = dir.join("device_id");
        let device_id = match std::fs::read_to_string(&id_file) {
            Ok(id) => id.trim().to_owned(),
            Err(_) => {
                use rand::Rng as _;
                let suffix: String = rand::thread_rng()
                    .sample_iter(rand::distributions::Uniform::from(b'A'..=b'Z'))
                    .take(10)
                    .map(char::from)
                    .collect();
                format!("SB{suffix}")
            }
        };
        // MSC4190: the service makes its users' devices itself; repeating it is harmless (and
        // brings back a device someone deleted).
        let path = format!("/_matrix/client/v3/devices/{}", enc(&device_id));
        self.client
            .request(
                Method::PUT,
                &path,
                Some(user),
                &[],
                Some(&json!({"display_name": "Switchboard bridge"})),
            )
            .await?;
        std::fs::write(dir.join("user_id"), user.as_str())
            .and_then(|()| std::fs::write(&id_file, &device_id))
            .map_err(io_error(format!("cannot write {}", id_file.display())))?;
        let store = store::FileCryptoStore::open(&dir.join("store"))
            .await
            .map_err(crypto_error)?;
        let user_id = OwnedUserId::try_from(user.as_str()).map_err(crypto_error)?;
        let olm = OlmMachine::with_store(&user_id, device_id.as_str().into(), store, None)
            .await
            .map_err(crypto_error)?;
        let device = Arc::new(Device {
            olm,
            device_id,
            busy: tokio::sync::Mutex::new(()),
        });
        {
            let _busy = device.busy.lock().await;
            self.send_outgoing(user, &device).await?;
        }
        tracing::info!(user = %user, device = %device.device_id, "encryption device ready");
        Ok(device)
    }

    /// Makes sure `user` has a device (made and its keys uploaded if not).
    pub(crate) async fn ensure_device(&self, user: &ruma::UserId) -> Result<(), Error> {
        self.device(user).await.map(|_| ())
    }

    /// Makes sure the bot's device exists and its keys are on the server, and loads the devices
    /// an earlier run made, so every room key they hold decrypts from the first transaction on
    /// (one that fails to load is skipped: it is tried again when something is addressed to it).
    pub(crate) async fn start(&self, bot: &ruma::UserId) -> Result<(), Error> {
        self.device(bot).await?;
        if let Ok(Some(parked)) = store::read_json::<Vec<Parked>>(&self.dir.join("parked.json"))
            && let Ok(mut waiting) = self.parked.lock()
        {
            *waiting = parked;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let Ok(user) = std::fs::read_to_string(entry.path().join("user_id")) else {
                continue;
            };
            let Ok(user) = ruma::OwnedUserId::try_from(user.trim()) else {
                continue;
            };
            if let Err(e) = self.device(&user).await {
                tracing::warn!(user = %user, error = %e, "cannot load an encryption device");
            }
        }
        Ok(())
    }

    /// Sends whatever the machine wants sent (key uploads and queries, to-device messages, …)
    /// and tells it the answers.
    async fn send_outgoing(&self, user: &ruma::UserId, device: &Device) -> Result<(), Error> {
        for request in device.olm.outgoing_requests().await.map_err(crypto_error)? {
            self.send_request(user, device, &request).await?;
        }
        Ok(())
    }

    async fn send_request(
        &self,
        user: &ruma::UserId,
        device: &Device,
        request: &OutgoingRequest,
    ) -> Result<(), Error> {
        let query = device_query(&device.device_id);
        let call = |method: Method, path: String, body: Value| async move {
            self.client
                .request(method, &path, Some(user), &query, Some(&body))
                .await
        };
        let id = request.request_id();
        let olm = &device.olm;
        let marked = match request.request() {
            AnyOutgoingRequest::KeysUpload(r) => {
                // Absent, not null: Synapse refuses `"device_keys": null`.
                let mut body = json!({});
                if let Some(keys) = &r.device_keys {
                    body["device_keys"] = json!(keys);
                }
                if !r.one_time_keys.is_empty() {
                    body["one_time_keys"] = json!(r.one_time_keys);
                }
                if !r.fallback_keys.is_empty() {
                    body["fallback_keys"] = json!(r.fallback_keys);
                }
                let answer = call(Method::POST, "/_matrix/client/v3/keys/upload".into(), body).await?;
                let response: upload_keys::v3::Response = self::response(&answer)?;
                olm.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let body = json!({ "device_keys": r.device_keys });
                let answer = call(Method::POST, "/_matrix/client/v3/keys/query".into(), body).await?;
                let response: get_keys::v3::Response = self::response(&answer)?;
                olm.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let body = json!({ "one_time_keys": r.one_time_keys });
                let answer = call(Method::POST, "/_matrix/client/v3/keys/claim".into(), body).await?;
                let response: claim_keys::v3::Response = self::response(&answer)?;
                olm.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                let response = self.send_to_device(user, device, r).await?;
                olm.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::SignatureUpload(r) => {
                let body = serde_json::to_value(&r.signed_keys).map_err(crypto_error)?;
                let answer = call(
                    Method::POST,
                    "/_matrix/client/v3/keys/signatures/upload".into(),
                    body,
                )
                .await?;
                let response: upload_signatures::v3::Response = self::response(&answer)?;
                olm.mark_request_as_sent(id, &response).await
            }
            AnyOutgoingRequest::RoomMessage(r) => {
                use ruma_crypto::events::MessageLikeEventContent as _;
                let content: &AnyMessageLikeEventContent = &r.content;
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/{}/{}",
                    enc(r.room_id.as_str()),
                    enc(&content.event_type().to_string()),
                    enc(r.txn_id.as_str())
                );
                let body = serde_json::to_value(content).map_err(crypto_error)?;
                let answer = call(Method::PUT, path, body).await?;
                let response: send_message_event::v3::Response = self::response(&answer)?;
                olm.mark_request_as_sent(id, &response).await
            }
        };
        marked.map_err(crypto_error)
    }

    async fn send_to_device(
        &self,
        user: &ruma::UserId,
        device: &Device,
        request: &ToDeviceRequest,
    ) -> Result<send_event_to_device::v3::Response, Error> {
        let path = format!(
            "/_matrix/client/v3/sendToDevice/{}/{}",
            enc(&request.event_type.to_string()),
            enc(request.txn_id.as_str())
        );
        let body = json!({ "messages": request.messages });
        self.client
            .request(
                Method::PUT,
                &path,
                Some(user),
                &device_query(&device.device_id),
                Some(&body),
            )
            .await?;
        Ok(send_event_to_device::v3::Response::new())
    }

    /// Feeds a transaction's extensions to the machines: to-device messages to the device they
    /// name, device-list changes to every machine, key counts to each device's own. A device of a
    /// user not loaded yet is loaded when something is addressed to it. An error means the keys
    /// were not taken in: the transaction must not be acknowledged, so the homeserver sends it
    /// again.
    pub(crate) async fn receive(
        &self,
        to_device: &[Value],
        lists: &crate::CryptoUpdate,
    ) -> Result<(), Error> {
        let mut by_user: BTreeMap<String, Vec<Raw<AnyToDeviceEvent>>> = BTreeMap::new();
        for message in to_device {
            let Some(user) = message["to_user_id"].as_str() else {
                continue;
            };
            match serde_json::value::to_raw_value(message) {
                Ok(raw) => by_user
                    .entry(user.to_owned())
                    .or_default()
                    .push(Raw::from_json(raw)),
                Err(e) => tracing::warn!(error = %e, "unreadable to-device message"),
            }
        }
        let parse_users = |list: &[ruma::OwnedUserId]| -> Vec<OwnedUserId> {
            list.iter()
                .filter_map(|u| OwnedUserId::try_from(u.as_str()).ok())
                .collect()
        };
        let mut device_lists = DeviceLists::new();
        device_lists.changed = parse_users(&lists.device_lists_changed);
        device_lists.left = parse_users(&lists.device_lists_left);
        let lists_changed = !device_lists.changed.is_empty() || !device_lists.left.is_empty();
        let mut users: Vec<String> = self
            .devices
            .lock()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(counts) = lists.one_time_keys_count.as_object() {
            users.extend(counts.keys().cloned());
        }
        users.extend(by_user.keys().cloned());
        users.sort();
        users.dedup();
        for user in users {
            let Ok(user_id) = ruma::OwnedUserId::try_from(user.as_str()) else {
                continue;
            };
            let addressed = by_user.contains_key(&user);
            let counted = lists.one_time_keys_count.get(&user).is_some();
            if !addressed && !counted && !lists_changed {
                continue;
            }
            // Only users with a device of ours (loaded, or kept on disk): counts for devices of
            // other SDKs' making are not ours.
            if !self.is_loaded(&user) && !self.user_dir(&user).join("device_id").exists() {
                continue;
            }
            let device = match self.device(&user_id).await {
                Ok(device) => device,
                Err(e) if addressed => return Err(e),
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "cannot load an encryption device");
                    continue;
                }
            };
            let messages: Vec<Raw<AnyToDeviceEvent>> = by_user
                .remove(&user)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| {
                    m.get_field::<String>("to_device_id")
                        .ok()
                        .flatten()
                        .is_some_and(|d| d == device.device_id)
                })
                .collect();
            let own = &lists.one_time_keys_count[&user][&device.device_id];
            let mut counts: BTreeMap<OneTimeKeyAlgorithm, UInt> =
                serde_json::from_value(own.clone()).unwrap_or_default();
            if own.is_object() {
                // Synapse's shape for a device without keys is `{}`: the machine must read it as
                // zero to upload more.
                counts
                    .entry(OneTimeKeyAlgorithm::SignedCurve25519)
                    .or_insert(UInt::MIN);
            }
            let fallback: Option<Vec<OneTimeKeyAlgorithm>> =
                serde_json::from_value(lists.unused_fallback_key_types[&user][&device.device_id].clone())
                    .ok();
            let _busy = device.busy.lock().await;
            let changes = EncryptionSyncChanges {
                to_device_events: messages,
                changed_devices: &device_lists,
                one_time_keys_counts: &counts,
                unused_fallback_keys: fallback.as_deref(),
                next_batch_token: None,
            };
            device
                .olm
                .receive_sync_changes(changes, &UNTRUSTED)
                .await
                .map_err(crypto_error)?;
            // A failed request is made again with the next transaction (the machine keeps it).
            if let Err(e) = self.send_outgoing(&user_id, &device).await {
                tracing::warn!(user = %user, error = %e, "sending key requests failed");
            }
        }
        Ok(())
    }

    /// The decrypted form of an `m.room.encrypted` event, by the first of the service's devices
    /// that holds its room key; `None` if none does (yet).
    pub(crate) async fn decrypt(&self, event: &Value) -> Option<Value> {
        let room_id = OwnedRoomId::try_from(event["room_id"].as_str()?).ok()?;
        let raw = Raw::from_json(serde_json::value::to_raw_value(event).ok()?);
        for device in self.loaded() {
            if let Ok(decrypted) = device.olm.decrypt_room_event(&raw, &room_id, &UNTRUSTED).await {
                return serde_json::from_str(decrypted.event.json().get()).ok();
            }
        }
        None
    }

    /// Keeps an event that cannot be decrypted yet, to try again after later transactions.
    pub(crate) fn park(&self, event: Value) {
        tracing::debug!(event_id = %event["event_id"], "no room key yet; the event waits for it");
        if let Ok(mut parked) = self.parked.lock() {
            parked.push(Parked {
                since_ms: now_ms(),
                event,
            });
            self.keep_parked(&parked);
        }
    }

    /// The waiting events whose room key has come (decrypted), and those that waited too long
    /// (still encrypted, for the handler to see), in the order they arrived.
    pub(crate) async fn unpark(&self) -> Vec<Value> {
        let waiting = match self.parked.lock() {
            Ok(parked) if !parked.is_empty() => parked.clone(),
            _ => return Vec::new(),
        };
        let (mut ready, mut settled) = (Vec::new(), Vec::new());
        let now = now_ms();
        let overflow = waiting.len().saturating_sub(MAX_PARKED);
        for (i, item) in waiting.iter().enumerate() {
            if let Some(decrypted) = self.decrypt(&item.event).await {
                ready.push(decrypted);
            } else if i < overflow || now.saturating_sub(item.since_ms) > PARK_FOR_MS {
                tracing::warn!(event_id = %item.event["event_id"], "no room key came for an event; handed over encrypted");
                ready.push(item.event.clone());
            } else {
                continue;
            }
            settled.push(item.event["event_id"].clone());
        }
        if !settled.is_empty()
            && let Ok(mut parked) = self.parked.lock()
        {
            parked.retain(|p| !settled.contains(&p.event["event_id"]));
            self.keep_parked(&parked);
        }
        ready
    }

    fn keep_parked(&self, parked: &[Parked]) {
        if let Err(e) = store::write_json(&self.dir.join("parked.json"), &parked) {
            tracing::warn!(error = %e, "cannot keep the events waiting for room keys");
        }
    }

    /// Whether the room is encrypted (asked once per room, as `user`).
    pub(crate) async fn is_encrypted(&self, user: &ruma::UserId, room: &ruma::RoomId) -> Result<bool, Error> {
        if let Some(known) = self
            .encrypted
            .lock()
            .ok()
            .and_then(|e| e.get(room.as_str()).copied())
        {
            return Ok(known);
        }
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.encryption/",
            enc(room.as_str())
        );
        let encrypted = match self
            .client
            .request(Method::GET, &path, Some(user), &[], None)
            .await
        {
            Ok(content) => content.get("algorithm").is_some(),
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => false,
            Err(e) => return Err(e),
        };
        if let Ok(mut known) = self.encrypted.lock() {
            known.insert(room.to_string(), encrypted);
        }
        Ok(encrypted)
    }

    /// Notes that a room became encrypted (an `m.room.encryption` event was seen).
    pub(crate) fn room_encrypted(&self, room: &str) {
        if let Ok(mut known) = self.encrypted.lock() {
            known.insert(room.to_owned(), true);
        }
    }

    /// Encrypts `content` for the room as `user`'s device, sharing the room key with the devices
    /// of the room's members first (invited ones too, unless only joined members may read the
    /// history), with the room's rotation settings. Returns the `m.room.encrypted` content.
    pub(crate) async fn encrypt(
        &self,
        user: &ruma::UserId,
        room: &ruma::RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, Error> {
        let device = self.device(user).await?;
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room.as_str()));
        let state = self
            .client
            .request(Method::GET, &path, Some(user), &[], None)
            .await?;
        let Recipients { members, settings } = recipients(&state);
        let room_id = OwnedRoomId::try_from(room.as_str()).map_err(crypto_error)?;
        let _busy = device.busy.lock().await;
        let olm = &device.olm;
        olm.update_tracked_users(members.iter().map(AsRef::as_ref))
            .await
            .map_err(crypto_error)?;
        // Key queries for new members first, then Olm sessions where missing.
        self.send_outgoing(user, &device).await?;
        if let Some((id, claim)) = olm
            .get_missing_sessions(members.iter().map(AsRef::as_ref))
            .await
            .map_err(crypto_error)?
        {
            let body = json!({ "one_time_keys": claim.one_time_keys });
            let answer = self
                .client
                .request(
                    Method::POST,
                    "/_matrix/client/v3/keys/claim",
                    Some(user),
                    &device_query(&device.device_id),
                    Some(&body),
                )
                .await?;
            let response: claim_keys::v3::Response = self::response(&answer)?;
            olm.mark_request_as_sent(&id, &response)
                .await
                .map_err(crypto_error)?;
        }
        let shares = olm
            .share_room_key(&room_id, members.iter().map(AsRef::as_ref), settings)
            .await
            .map_err(crypto_error)?;
        for share in shares {
            let response = self.send_to_device(user, &device, &share).await?;
            olm.mark_request_as_sent(&share.txn_id, &response)
                .await
                .map_err(crypto_error)?;
        }
        let raw: Raw<AnyMessageLikeEventContent> =
            Raw::from_json(serde_json::value::to_raw_value(content).map_err(crypto_error)?);
        let encrypted = olm
            .encrypt_room_event_raw(&room_id, event_type, &raw)
            .await
            .map_err(crypto_error)?;
        serde_json::from_str(encrypted.content.json().get()).map_err(crypto_error)
    }
}

/// Who gets a room's key, and how often it changes.
struct Recipients {
    members: Vec<OwnedUserId>,
    settings: EncryptionSettings,
}

/// Reads the room's state (`GET /rooms/{id}/state`) as Element does: joined members, and invited
/// ones when they may read what was said before they joined (a chat a bridge opens and writes in
/// before its invitee accepts); the rotation periods of `m.room.encryption`.
fn recipients(state: &Value) -> Recipients {
    let events = state.as_array().map(Vec::as_slice).unwrap_or_default();
    let content = |kind: &str| {
        events
            .iter()
            .find(|e| e["type"] == kind && e["state_key"] == "")
            .map(|e| e["content"].clone())
    };
    let visibility = content("m.room.history_visibility")
        .and_then(|c| serde_json::from_value::<RoomHistoryVisibilityEventContent>(c).ok())
        .map_or(HistoryVisibility::Shared, |c| c.history_visibility);
    let settings = content("m.room.encryption")
        .and_then(|c| serde_json::from_value::<RoomEncryptionEventContent>(c).ok())
        .map_or_else(EncryptionSettings::default, |c| {
            EncryptionSettings::new(c, visibility.clone(), CollectStrategy::default())
        });
    let invited_read = visibility != HistoryVisibility::Joined;
    let members = events
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter(|e| match e["content"]["membership"].as_str() {
            Some("join") => true,
            Some("invite") => invited_read,
            _ => false,
        })
        .filter_map(|e| e["state_key"].as_str())
        .filter_map(|u| OwnedUserId::try_from(u).ok())
        .collect();
    Recipients { members, settings }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, membership: &str) -> Value {
        json!({"type": "m.room.member", "state_key": user, "content": {"membership": membership}})
    }

    fn users(recipients: &Recipients) -> Vec<&str> {
        recipients.members.iter().map(|u| u.as_str()).collect()
    }

    #[test]
    fn invited_members_get_the_key_unless_history_is_for_joined_members() {
        let mut state = vec![
            member("@bot:hs", "join"),
            member("@alice:hs", "invite"),
            member("@bob:hs", "leave"),
            member("@carol:hs", "ban"),
            member("@dave:hs", "knock"),
            json!({"type": "m.room.encryption", "state_key": "",
                   "content": {"algorithm": "m.megolm.v1.aes-sha2",
                               "rotation_period_ms": 3_600_000, "rotation_period_msgs": 10}}),
        ];
        let shared = recipients(&Value::Array(state.clone()));
        assert_eq!(users(&shared), ["@bot:hs", "@alice:hs"]);
        assert_eq!(shared.settings.history_visibility, HistoryVisibility::Shared);
        assert_eq!(shared.settings.rotation_period_msgs, 10);
        assert_eq!(shared.settings.rotation_period.as_millis(), 3_600_000);

        state.push(json!({"type": "m.room.history_visibility", "state_key": "",
                          "content": {"history_visibility": "joined"}}));
        let joined = recipients(&Value::Array(state));
        assert_eq!(users(&joined), ["@bot:hs"]);
        assert_eq!(joined.settings.history_visibility, HistoryVisibility::Joined);
    }

    #[test]
    fn odd_state_falls_back_to_defaults() {
        let state = json!([
            {"type": "m.room.member", "state_key": "not a user id", "content": {"membership": "join"}},
            {"type": "m.room.encryption", "state_key": "", "content": {"rotation_period_msgs": "many"}},
            {"type": "m.room.history_visibility", "state_key": "x", "content": {"history_visibility": "joined"}},
        ]);
        let odd = recipients(&state);
        assert!(odd.members.is_empty());
        let defaults = EncryptionSettings::default();
        assert_eq!(odd.settings.rotation_period_msgs, defaults.rotation_period_msgs);
        assert_eq!(odd.settings.history_visibility, HistoryVisibility::Shared);
        assert!(recipients(&json!({"errcode": "M_FORBIDDEN"})).members.is_empty());
    }
}
