//! Devices and keys across servers: local clients' key queries and claims for other servers'
//! users (answered from the kept device lists, or asked over federation), the device lists of
//! other servers' users kept fresh by their `m.device_list_update`s (fetched whole when one was
//! missed), and what other servers ask of this one's users.

use std::{collections::BTreeMap, time::Duration};

use ruma::{
    OwnedDeviceId, OwnedServerName, OwnedUserId, UserId,
    api::federation::{
        device::get_devices,
        keys::{claim_keys, get_keys},
    },
    serde::Raw,
};
use serde_json::{Map, Value, json};
use switchboard_store::RemoteDevice;

use crate::{Error, Homeserver, Result};

/// How long a key query or claim waits for another server.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// One EDU's parse failure: it is dropped with a log line, never failing the transaction.
type EduResult = std::result::Result<(), String>;

impl Homeserver {
    /// `POST /keys/query` for a local client: local users from the store, other servers' users
    /// from their kept device lists, or from their servers.
    pub async fn query_keys(&self, requester: &UserId, requested: &Map<String, Value>) -> Result<Value> {
        let (local, remote) = self.split_by_server(requested);
        let mut response = self.e2ee.query_for(Some(requester), &local).await?;
        let mut failures = Map::new();
        for (server, users) in remote {
            let mut ask = Map::new();
            let mut cached = Map::new();
            for (user, devices) in users {
                if self.kept_device_list(&user).await? {
                    cached.insert(user.to_string(), devices);
                } else {
                    ask.insert(user.to_string(), devices);
                }
            }
            merge(&mut response, self.e2ee.query_for(None, &cached).await?);
            if ask.is_empty() {
                continue;
            }
            match self.remote_keys(&server, &ask).await {
                Ok(answer) => merge(&mut response, answer),
                Err(e) => {
                    tracing::info!(%server, error = %e, "keys/query over federation failed");
                    failures.insert(server.to_string(), failure(&e));
                }
            }
        }
        response["failures"] = Value::Object(failures);
        Ok(response)
    }

    /// `POST /keys/claim` for a local client: one-time keys of other servers' devices are
    /// claimed from their servers.
    pub async fn claim_keys(&self, requested: &Map<String, Value>) -> Result<Value> {
        let (local, remote) = self.split_by_server(requested);
        let mut response = self.e2ee.claim(&local).await?;
        let mut failures = Map::new();
        for (server, users) in remote {
            let claims: Map<String, Value> = users.into_iter().map(|(u, d)| (u.to_string(), d)).collect();
            let answer = async {
                let claims: claim_keys::v1::OneTimeKeyClaims = serde_json::from_value(Value::Object(claims))
                    .map_err(|e| Error::BadJson(format!("one_time_keys: {e}")))?;
                let request = claim_keys::v1::Request::new(claims);
                let answer =
                    tokio::time::timeout(REMOTE_TIMEOUT, self.federation.client.send(&server, request))
                        .await
                        .map_err(|_| Error::BadGateway(format!("{server} did not answer in time")))??;
                serde_json::to_value(answer.one_time_keys).map_err(Error::internal)
            };
            match answer.await {
                Ok(keys) => {
                    // Only what the server may answer for: its users' devices that were asked for.
                    for (user, devices) in keys.as_object().into_iter().flatten() {
                        let Some(asked) = requested.get(user).and_then(Value::as_object) else {
                            continue;
                        };
                        if UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server) {
                            let devices: Map<String, Value> = devices
                                .as_object()
                                .into_iter()
                                .flatten()
                                .filter(|(device, _)| asked.contains_key(*device))
                                .map(|(d, k)| (d.clone(), k.clone()))
                                .collect();
                            response["one_time_keys"][user] = Value::Object(devices);
                        }
                    }
                }
                Err(Error::BadJson(e)) => return Err(Error::BadJson(e)),
                Err(e) => {
                    tracing::info!(%server, error = %e, "keys/claim over federation failed");
                    failures.insert(server.to_string(), failure(&e));
                }
            }
        }
        response["failures"] = Value::Object(failures);
        Ok(response)
    }

    /// Splits a `{user: …}` request into this server's users and the others, by server.
    /// Entries that are not user IDs are dropped.
    #[allow(clippy::type_complexity)]
    fn split_by_server(
        &self,
        requested: &Map<String, Value>,
    ) -> (
        Map<String, Value>,
        BTreeMap<OwnedServerName, Vec<(OwnedUserId, Value)>>,
    ) {
        let mut local = Map::new();
        let mut remote: BTreeMap<OwnedServerName, Vec<(OwnedUserId, Value)>> = BTreeMap::new();
        for (user, value) in requested {
            let Ok(user_id) = UserId::parse(user.as_str()) else {
                continue;
            };
            if user_id.server_name() == self.server_name {
                local.insert(user.clone(), value.clone());
            } else {
                remote
                    .entry(user_id.server_name().to_owned())
                    .or_default()
                    .push((user_id, value.clone()));
            }
        }
        (local, remote)
    }

    /// Whether this server has a usable copy of `user`'s device list: kept and fresh while a
    /// local user shares a room with them, or fetched now (and kept from now on); never for users
    /// no local user shares a room with, whose servers send no updates here.
    async fn kept_device_list(&self, user: &UserId) -> Result<bool> {
        let kept = self.store.remote_device_list(user.as_str()).await?;
        if !self.shares_room_with_local_user(user).await? {
            // Their server sends no updates here any more: the copy ages from now on.
            if matches!(kept, Some((_, false))) {
                self.store.mark_remote_device_list_stale(user.as_str()).await?;
            }
            return Ok(false);
        }
        if matches!(kept, Some((_, false))) {
            return Ok(true);
        }
        match self.resync_device_list(user).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::info!(%user, error = %e, "cannot fetch a device list");
                Ok(false)
            }
        }
    }

    async fn shares_room_with_local_user(&self, user: &UserId) -> Result<bool> {
        for room in self.rooms.joined_rooms(user).await? {
            let members = self.store.joined_members(&room).await?;
            if members
                .iter()
                .filter_map(|m| UserId::parse(m.as_str()).ok())
                .any(|m| m.server_name() == self.server_name)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Asks `server` for the keys of its users (`POST /user/keys/query`).
    async fn remote_keys(&self, server: &OwnedServerName, users: &Map<String, Value>) -> Result<Value> {
        let wanted: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>> =
            serde_json::from_value(Value::Object(users.clone()))
                .map_err(|e| Error::BadJson(format!("device_keys: {e}")))?;
        let request = get_keys::v1::Request::new(wanted);
        let answer = tokio::time::timeout(REMOTE_TIMEOUT, self.federation.client.send(server, request))
            .await
            .map_err(|_| Error::BadGateway(format!("{server} did not answer in time")))??;
        // Only what the server may speak for: its own users, whose keys name them.
        let own = |user: &UserId| user.server_name() == server;
        let mut out = json!({ "device_keys": {}, "master_keys": {}, "self_signing_keys": {} });
        for (user, devices) in answer.device_keys.iter().filter(|(u, _)| own(u)) {
            let mut found = Map::new();
            for (device, keys) in devices {
                let keys = raw_json(keys)?;
                if keys["user_id"] == user.as_str() && keys["device_id"] == device.as_str() {
                    found.insert(device.to_string(), keys);
                }
            }
            out["device_keys"][user.as_str()] = Value::Object(found);
        }
        for (field, keys) in [
            ("master_keys", &answer.master_keys),
            ("self_signing_keys", &answer.self_signing_keys),
        ] {
            for (user, key) in keys.iter().filter(|(u, _)| own(u)) {
                let key = raw_json(key)?;
                if key["user_id"] == user.as_str() {
                    out[field][user.as_str()] = key;
                }
            }
        }
        Ok(out)
    }

    /// Fetches `user`'s whole device list from their server and keeps it.
    pub async fn resync_device_list(&self, user: &UserId) -> Result<()> {
        let server = user.server_name();
        let request = get_devices::v1::Request::new(user.to_owned());
        let answer = tokio::time::timeout(REMOTE_TIMEOUT, self.federation.client.send(server, request))
            .await
            .map_err(|_| Error::BadGateway(format!("{server} did not answer in time")))??;
        if answer.user_id != user {
            return Err(Error::BadGateway(format!(
                "{server} answered with the devices of {}",
                answer.user_id
            )));
        }
        let mut devices = Vec::new();
        for device in &answer.devices {
            let mut keys = raw_json(&device.keys)?;
            if keys["user_id"] != user.as_str() || keys["device_id"] != device.device_id.as_str() {
                continue;
            }
            if let Some(name) = &device.device_display_name {
                keys["unsigned"]["device_display_name"] = json!(name);
            }
            devices.push(RemoteDevice {
                device_id: device.device_id.to_string(),
                keys: Some(keys.to_string()),
            });
        }
        let mut cross_signing = Vec::new();
        for (kind, key) in [
            ("master", &answer.master_key),
            ("self_signing", &answer.self_signing_key),
        ] {
            if let Some(key) = key {
                let key = raw_json(key)?;
                if key["user_id"] == user.as_str() {
                    cross_signing.push((kind, key.to_string()));
                }
            }
        }
        let stream_id = i64::try_from(u64::from(answer.stream_id)).unwrap_or(i64::MAX);
        let (devices, cross_signing) = (&devices, &cross_signing);
        self.stream
            .aux_write(|pos| async move {
                Ok(self
                    .store
                    .replace_remote_device_list(user.as_str(), devices, cross_signing, stream_id, pos)
                    .await?)
            })
            .await?;
        tracing::debug!(%user, devices = devices.len(), stream_id, "device list fetched");
        Ok(())
    }

    /// An `m.device_list_update` from `origin`: applied when it follows the last one this server
    /// has (its `prev_id`), otherwise the whole list is fetched again. Lists of users no local
    /// user shares a room with are not kept.
    pub(crate) async fn receive_device_list_update(
        self: &std::sync::Arc<Self>,
        origin: &OwnedServerName,
        content: &Value,
    ) -> Result<EduResult> {
        let user = match Self::sender_of(origin, &content["user_id"]) {
            Ok(user) => user,
            Err(why) => return Ok(Err(why)),
        };
        let (Some(device_id), Some(stream_id)) =
            (content["device_id"].as_str(), content["stream_id"].as_i64())
        else {
            return Ok(Err("no device_id or stream_id".to_owned()));
        };
        let prev_ids: Vec<i64> = content["prev_id"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64)
            .collect();
        if !self.shares_room_with_local_user(&user).await? {
            return Ok(Ok(()));
        }
        let follows = match self.store.remote_device_list(user.as_str()).await? {
            Some((kept, false)) if stream_id <= kept => return Ok(Ok(())),
            // An update naming no predecessor may follow one this server never got (Synapse
            // sends `[]` when it no longer knows what it last sent).
            Some((kept, false)) => !prev_ids.is_empty() && prev_ids.iter().all(|p| *p == kept),
            _ => false,
        };
        if !follows {
            // A missed update, or a first one: the list as the server has it now, fetched in the
            // background so the transaction is answered at once; until then the kept list is
            // stale and a key query fetches it itself.
            self.store.mark_remote_device_list_stale(user.as_str()).await?;
            self.resync_in_background(user);
            return Ok(Ok(()));
        }
        let keys = if content["deleted"].as_bool() == Some(true) {
            None
        } else {
            let mut keys = content["keys"].clone();
            if !keys.is_object() || keys["user_id"] != user.as_str() || keys["device_id"] != device_id {
                return Ok(Err(format!(
                    "keys of {user}'s device {device_id} that do not name it"
                )));
            }
            if let Some(name) = content["device_display_name"].as_str() {
                keys["unsigned"]["device_display_name"] = json!(name);
            }
            Some(keys.to_string())
        };
        let device = RemoteDevice {
            device_id: device_id.to_owned(),
            keys,
        };
        let device = &device;
        let user_ref: &UserId = &user;
        self.stream
            .aux_write(|pos| async move {
                Ok(self
                    .store
                    .apply_remote_device_update(user_ref.as_str(), device, stream_id, pos)
                    .await?)
            })
            .await?;
        Ok(Ok(()))
    }

    /// Fetches `user`'s device list in a task of its own, one at a time per user; if that
    /// fails, local clients are told the list changed, so their next query tries again.
    fn resync_in_background(self: &std::sync::Arc<Self>, user: ruma::OwnedUserId) {
        let Ok(mut busy) = self.federation.resyncing.lock() else {
            return;
        };
        if !busy.insert(user.clone()) {
            return;
        }
        drop(busy);
        let hs = self.clone();
        tokio::spawn(async move {
            if let Err(e) = hs.resync_device_list(&user).await {
                tracing::info!(%user, error = %e, "a gap in a device list, not fetched");
                if let Err(e) = hs.e2ee.device_list_changed(&user, None).await {
                    tracing::warn!(%user, error = %e, "cannot record a device-list change");
                }
            }
            if let Ok(mut busy) = hs.federation.resyncing.lock() {
                busy.remove(&user);
            }
        });
    }

    /// An `m.signing_key_update` from `origin`: the user's new public cross-signing keys, when
    /// this server keeps their device list.
    pub(crate) async fn receive_signing_key_update(
        &self,
        origin: &OwnedServerName,
        content: &Value,
    ) -> Result<EduResult> {
        let user = match Self::sender_of(origin, &content["user_id"]) {
            Ok(user) => user,
            Err(why) => return Ok(Err(why)),
        };
        if self.store.remote_device_list(user.as_str()).await?.is_none() {
            return Ok(Ok(()));
        }
        for (field, kind) in [("master_key", "master"), ("self_signing_key", "self_signing")] {
            let key = &content[field];
            if key.is_object() {
                if key["user_id"] != user.as_str() {
                    return Ok(Err(format!("a {field} that does not name {user}")));
                }
                self.store
                    .set_cross_signing_key(user.as_str(), kind, &key.to_string())
                    .await?;
            }
        }
        self.e2ee.device_list_changed(&user, None).await?;
        Ok(Ok(()))
    }

    /// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's devices with their
    /// keys, the list's stream ID (what `prev_id`s name), the public cross-signing keys.
    pub async fn devices_for_federation(&self, user: &UserId) -> Result<Value> {
        if user.server_name() != self.server_name {
            return Err(Error::InvalidParam(format!(
                "{user} is not a user of this server"
            )));
        }
        let stream_id = self
            .store
            .previous_device_list_change(user.as_str(), i64::MAX)
            .await?
            .unwrap_or(0);
        let keys: BTreeMap<String, String> =
            self.store.device_keys(user.as_str()).await?.into_iter().collect();
        let mut devices = Vec::new();
        for (device_id, name, _) in self.store.devices(user.as_str()).await? {
            let Some(keys) = keys.get(&device_id) else {
                continue;
            };
            let mut device = json!({
                "device_id": device_id,
                "keys": serde_json::from_str::<Value>(keys).unwrap_or(Value::Null),
            });
            if let Some(name) = name {
                device["device_display_name"] = json!(name);
            }
            devices.push(device);
        }
        let mut body = json!({ "user_id": user, "stream_id": stream_id, "devices": devices });
        for (kind, keys) in self.store.cross_signing_keys(user.as_str()).await? {
            let field = match kind.as_str() {
                "master" => "master_key",
                "self_signing" => "self_signing_key",
                _ => continue,
            };
            body[field] = serde_json::from_str(&keys).unwrap_or(Value::Null);
        }
        Ok(body)
    }

    /// `POST /_matrix/federation/v1/user/keys/query`: keys of this server's users only.
    pub async fn query_keys_for_federation(&self, requested: &Map<String, Value>) -> Result<Value> {
        let (local, _) = self.split_by_server(requested);
        let mut answer = self.e2ee.query_for(None, &local).await?;
        if let Some(answer) = answer.as_object_mut() {
            answer.remove("failures");
        }
        Ok(answer)
    }

    /// `POST /_matrix/federation/v1/user/keys/claim`: one-time keys of this server's devices.
    pub async fn claim_keys_for_federation(&self, requested: &Map<String, Value>) -> Result<Value> {
        let (local, _) = self.split_by_server(requested);
        let mut answer = self.e2ee.claim(&local).await?;
        if let Some(answer) = answer.as_object_mut() {
            answer.remove("failures");
        }
        Ok(answer)
    }
}

/// A server's entry in `failures`: why it could not be asked.
fn failure(e: &Error) -> Value {
    json!({ "errcode": "M_UNKNOWN", "error": e.to_string() })
}

/// Merges one key-query answer into another, user by user.
fn merge(into: &mut Value, from: Value) {
    for field in [
        "device_keys",
        "master_keys",
        "self_signing_keys",
        "user_signing_keys",
    ] {
        for (user, keys) in from[field].as_object().into_iter().flatten() {
            into[field][user.as_str()] = keys.clone();
        }
    }
}

fn raw_json<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get())
        .map_err(|e| Error::BadGateway(format!("a key that is not JSON: {e}")))
}
