//! End-to-end encryption plumbing, stored for real: device keys, one-time and fallback keys
//! (claimed atomically), device-list changes and to-device messages. The server never sees
//! plaintext; it only keeps and hands over what clients upload. Changes of local users' devices
//! go to the servers sharing a room with them, to-device messages for other servers' users to
//! those servers, both through the outbox; `crate::federation::devices` is the other side.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use ruma::UserId;
use serde_json::{Map, Value, json};
use switchboard_store::Store;

use crate::{
    Error, Result,
    appservice::AppServices,
    federation::outbox::{Edu, Outbox},
    stream::EventStream,
};

pub struct E2ee {
    store: Store,
    stream: Arc<EventStream>,
    outbox: Arc<Outbox>,
    /// Told when keys of services' users are claimed (their counts go out in transactions).
    appservices: Arc<AppServices>,
}

impl E2ee {
    pub fn new(
        store: Store,
        stream: Arc<EventStream>,
        outbox: Arc<Outbox>,
        appservices: Arc<AppServices>,
    ) -> Self {
        Self {
            store,
            stream,
            outbox,
            appservices,
        }
    }

    /// `POST /keys/upload`: returns the device's unclaimed one-time key counts. Everything is
    /// checked before anything is stored.
    pub async fn upload(
        &self,
        user: &UserId,
        device: &str,
        device_keys: Option<&Value>,
        one_time_keys: Option<&Map<String, Value>>,
        fallback_keys: Option<&Map<String, Value>>,
    ) -> Result<Map<String, Value>> {
        if let Some(keys) = device_keys
            && (keys.get("user_id").and_then(Value::as_str) != Some(user.as_str())
                || keys.get("device_id").and_then(Value::as_str) != Some(device))
        {
            return Err(Error::BadJson(
                "device_keys must name this user and device".to_owned(),
            ));
        }
        let one_time_keys = key_algorithms(one_time_keys)?;
        let fallback_keys = key_algorithms(fallback_keys)?;
        if !one_time_keys.is_empty() {
            let held: std::collections::HashMap<String, i64> = self
                .store
                .one_time_key_counts(user.as_str(), device)
                .await?
                .into_iter()
                .collect();
            // Keys held already are not counted twice: a client repeating an upload whose
            // answer it lost must get through.
            let known: HashSet<String> = self
                .store
                .one_time_key_ids(user.as_str(), device)
                .await?
                .into_iter()
                .collect();
            let mut adding: std::collections::HashMap<&str, i64> = Default::default();
            for (algorithm, id, _) in &one_time_keys {
                if !known.contains(*id) {
                    *adding.entry(algorithm).or_default() += 1;
                }
            }
            for (algorithm, count) in adding {
                let total = held.get(algorithm).copied().unwrap_or(0) + count;
                if total > MAX_ONE_TIME_KEYS_PER_ALGORITHM {
                    return Err(Error::TooLarge(format!(
                        "Uploading {count} more {algorithm} one-time keys would leave the device holding {total}, over the limit of {MAX_ONE_TIME_KEYS_PER_ALGORITHM}"
                    )));
                }
            }
        }
        if let Some(keys) = device_keys {
            let text = keys.to_string();
            let pos = self
                .stream
                .aux_write(|pos| async move {
                    Ok(self
                        .store
                        .set_device_keys(user.as_str(), device, &text, pos)
                        .await?)
                })
                .await?;
            self.announce(user, Some(device), pos).await?;
        }
        for (algorithm, id, key) in one_time_keys {
            self.store
                .add_one_time_key(user.as_str(), device, algorithm, id, &key.to_string())
                .await?;
        }
        for (algorithm, id, key) in fallback_keys {
            self.store
                .set_fallback_key(user.as_str(), device, algorithm, id, &key.to_string())
                .await?;
        }
        self.counts(user, device).await
    }

    /// Unclaimed one-time keys per algorithm; `signed_curve25519` is always present (0 when
    /// none are left), since SDKs only replenish keys when they see the count.
    pub async fn counts(&self, user: &UserId, device: &str) -> Result<Map<String, Value>> {
        let mut counts: Map<String, Value> = Map::from_iter([("signed_curve25519".to_owned(), json!(0))]);
        for (algorithm, count) in self.store.one_time_key_counts(user.as_str(), device).await? {
            counts.insert(algorithm, json!(count));
        }
        Ok(counts)
    }

    pub async fn unused_fallback_types(&self, user: &UserId, device: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .unused_fallback_algorithms(user.as_str(), device)
            .await?)
    }

    /// Whether the user already has a master key (a replacement needs user-interactive auth).
    pub async fn has_cross_signing(&self, user: &UserId) -> Result<bool> {
        Ok(self
            .store
            .cross_signing_keys(user.as_str())
            .await?
            .iter()
            .any(|(kind, _)| kind == "master"))
    }

    /// `POST /keys/device_signing/upload`.
    pub async fn upload_cross_signing(&self, user: &UserId, keys: &[(&str, &Value)]) -> Result<()> {
        for (kind, key) in keys {
            if key.get("user_id").and_then(Value::as_str) != Some(user.as_str()) {
                return Err(Error::InvalidParam(format!("{kind} must belong to {user}")));
            }
            self.store
                .set_cross_signing_key(user.as_str(), kind, &key.to_string())
                .await?;
        }
        self.device_list_changed(user, None).await
    }

    /// `POST /keys/signatures/upload`: merges signatures into device keys or cross-signing keys.
    /// Returns the failures map.
    pub async fn upload_signatures(&self, signer: &UserId, signed: &Map<String, Value>) -> Result<Value> {
        let mut failures = Map::new();
        let mut changed = HashSet::new();
        for (user, objects) in signed {
            for (key_id, object) in objects.as_object().into_iter().flatten() {
                let Some(signatures) = object.get("signatures").and_then(Value::as_object) else {
                    continue;
                };
                let Some(from_signer) = signatures.get(signer.as_str()).and_then(Value::as_object) else {
                    continue;
                };
                // One signs one's own devices and keys (the signatures go into them), and other
                // users' master keys only (kept apart, for the signer's eyes).
                let merged = if user == signer.as_str() {
                    self.add_signatures(signer.as_str(), user, key_id, from_signer)
                        .await?
                } else if self.is_master_key(user, key_id).await? {
                    let signatures: Vec<(String, String)> = from_signer
                        .iter()
                        .filter_map(|(id, sig)| sig.as_str().map(|sig| (id.clone(), sig.to_owned())))
                        .collect();
                    self.store
                        .add_cross_signing_signatures(signer.as_str(), user, key_id, &signatures)
                        .await?;
                    Some(None)
                } else {
                    None
                };
                if let Some(which) = merged {
                    changed.insert((user.clone(), which));
                } else if let Some(entry) = failures
                    .entry(user.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                {
                    entry.insert(
                        key_id.clone(),
                        json!({ "errcode": "M_NOT_FOUND", "error": "Unknown key" }),
                    );
                }
            }
        }
        // Only an actual change makes peers re-query keys.
        for (user, device) in changed {
            if let Ok(user_id) = <&UserId>::try_from(user.as_str()) {
                self.device_list_changed(user_id, device.as_deref()).await?;
            }
        }
        Ok(json!({ "failures": failures }))
    }

    async fn is_master_key(&self, user: &str, key_id: &str) -> Result<bool> {
        let suffix = format!(":{key_id}");
        Ok(self
            .store
            .cross_signing_keys(user)
            .await?
            .iter()
            .any(|(kind, keys)| {
                kind == "master"
                    && serde_json::from_str::<Value>(keys)
                        .ok()
                        .and_then(|v| {
                            v["keys"]
                                .as_object()
                                .map(|k| k.keys().any(|id| id.ends_with(&suffix)))
                        })
                        .unwrap_or(false)
            }))
    }

    /// Adds `new` (signing key ID → signature) by `signer` to the device or cross-signing key
    /// `key_id` of `user`: `Some(Some(device))` or `Some(None)` for a cross-signing key; `None`
    /// if there is no such key.
    async fn add_signatures(
        &self,
        signer: &str,
        user: &str,
        key_id: &str,
        new: &Map<String, Value>,
    ) -> Result<Option<Option<String>>> {
        let merge = |mut keys: Value| {
            // Indexing a missing entry mutably creates it, so absent `signatures` are fine.
            let slot = &mut keys["signatures"][signer];
            for (id, signature) in new {
                slot[id.as_str()] = signature.clone();
            }
            keys
        };
        for (device, keys) in self.store.device_keys(user).await? {
            if device == key_id {
                let merged = merge(serde_json::from_str(&keys).unwrap_or_default());
                self.store
                    .update_device_keys(user, &device, &merged.to_string())
                    .await?;
                return Ok(Some(Some(device)));
            }
        }
        for (kind, keys) in self.store.cross_signing_keys(user).await? {
            let value: Value = serde_json::from_str(&keys).unwrap_or_default();
            let suffix = format!(":{key_id}");
            if value["keys"]
                .as_object()
                .is_some_and(|k| k.keys().any(|id| id.ends_with(&suffix)))
            {
                self.store
                    .set_cross_signing_key(user, &kind, &merge(value).to_string())
                    .await?;
                return Ok(Some(None));
            }
        }
        Ok(None)
    }

    /// `POST /keys/query`: device keys of the requested users (all devices for an empty list),
    /// plus their public cross-signing keys (`user_signing` only the requester's own; none for
    /// another server, `None`).
    pub async fn query_for(
        &self,
        requester: Option<&UserId>,
        requested: &Map<String, Value>,
    ) -> Result<Value> {
        let mut response = self.query(requested).await?;
        for user in requested.keys() {
            for (kind, keys) in self.store.cross_signing_keys(user).await? {
                let field = match kind.as_str() {
                    "master" => "master_keys",
                    "self_signing" => "self_signing_keys",
                    "user_signing" if requester.is_some_and(|r| r.as_str() == user) => "user_signing_keys",
                    _ => continue,
                };
                let mut key: Value = serde_json::from_str(&keys).unwrap_or(Value::Null);
                if kind == "master"
                    && let Some(requester) = requester.filter(|r| r.as_str() != user)
                {
                    self.add_own_signatures(requester, user, &mut key).await?;
                }
                response[field][user] = key;
            }
        }
        Ok(response)
    }

    /// Adds to another user's master key the signatures `requester` made on it.
    async fn add_own_signatures(&self, requester: &UserId, user: &str, key: &mut Value) -> Result<()> {
        for (key_id, signing_key_id, signature) in self
            .store
            .cross_signing_signatures(requester.as_str(), user)
            .await?
        {
            let names_it = key["keys"]
                .as_object()
                .is_some_and(|k| k.keys().any(|id| id.ends_with(&format!(":{key_id}"))));
            if names_it {
                key["signatures"][requester.as_str()][signing_key_id.as_str()] = json!(signature);
            }
        }
        Ok(())
    }

    /// `POST /keys/query`: device keys of the requested users (all devices for an empty list).
    pub async fn query(&self, requested: &Map<String, Value>) -> Result<Value> {
        let mut device_keys = Map::new();
        for (user, devices) in requested {
            let wanted: Vec<&str> = devices
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut found = Map::new();
            for (device, keys) in self.store.device_keys(user).await? {
                if wanted.is_empty() || wanted.contains(&device.as_str()) {
                    found.insert(device, serde_json::from_str(&keys).unwrap_or(Value::Null));
                }
            }
            device_keys.insert(user.clone(), Value::Object(found));
        }
        Ok(json!({ "device_keys": device_keys, "failures": {} }))
    }

    /// `POST /keys/claim`: one key per requested device and algorithm.
    pub async fn claim(&self, requested: &Map<String, Value>) -> Result<Value> {
        let mut claimed = Map::new();
        let mut drained = BTreeSet::new();
        for (user, devices) in requested {
            let mut per_device = Map::new();
            for (device, algorithm) in devices.as_object().into_iter().flatten() {
                let Some(algorithm) = algorithm.as_str() else {
                    continue;
                };
                if let Some((key_id, key)) = self.store.claim_key(user, device, algorithm).await? {
                    let key: Value = serde_json::from_str(&key).unwrap_or(Value::Null);
                    per_device.insert(device.clone(), json!({ key_id: key }));
                    drained.insert(user.clone());
                }
            }
            claimed.insert(user.clone(), Value::Object(per_device));
        }
        if !drained.is_empty() {
            self.appservices.delivery.keys_claimed(&drained);
        }
        Ok(json!({ "one_time_keys": claimed, "failures": {} }))
    }

    /// A device appeared, changed or went away (or, `None`, the user's cross-signing keys
    /// changed): everyone sharing a room must re-query.
    pub async fn device_list_changed(&self, user: &UserId, device: Option<&str>) -> Result<()> {
        let pos = self
            .stream
            .aux_write(|pos| async move {
                Ok(self
                    .store
                    .record_device_list_change(user.as_str(), device, pos)
                    .await?)
            })
            .await?;
        self.announce(user, device, pos).await
    }

    /// Tells the servers sharing a room with a local user of a change at `pos`: an
    /// `m.device_list_update` naming the user's previous change (`prev_id`), so a server that
    /// missed one fetches the whole list; or an `m.signing_key_update`.
    async fn announce(&self, user: &UserId, device: Option<&str>, pos: i64) -> Result<()> {
        if !self.outbox.is_local(user) {
            return Ok(());
        }
        let edu = match device {
            Some(device) => {
                let prev = self.store.previous_device_list_change(user.as_str(), pos).await?;
                let mut content = json!({
                    "user_id": user,
                    "device_id": device,
                    "stream_id": pos,
                    "prev_id": prev.into_iter().collect::<Vec<_>>(),
                });
                match self
                    .store
                    .devices(user.as_str())
                    .await?
                    .into_iter()
                    .find(|(id, _, _)| id == device)
                {
                    Some((_, name, _)) => {
                        if let Some(name) = name {
                            content["device_display_name"] = json!(name);
                        }
                        if let Some((_, keys)) = self
                            .store
                            .device_keys(user.as_str())
                            .await?
                            .into_iter()
                            .find(|(id, _)| id == device)
                        {
                            content["keys"] = serde_json::from_str(&keys).unwrap_or(Value::Null);
                        }
                    }
                    None => content["deleted"] = json!(true),
                }
                Edu {
                    edu_type: "m.device_list_update",
                    content,
                    replace_key: None,
                }
            }
            None => {
                let mut content = json!({ "user_id": user });
                for (kind, keys) in self.store.cross_signing_keys(user.as_str()).await? {
                    let field = match kind.as_str() {
                        "master" => "master_key",
                        "self_signing" => "self_signing_key",
                        _ => continue,
                    };
                    content[field] = serde_json::from_str(&keys).unwrap_or(Value::Null);
                }
                Edu {
                    edu_type: "m.signing_key_update",
                    content,
                    replace_key: Some(format!("signing {user}")),
                }
            }
        };
        self.outbox.to_peers_of(user, edu).await
    }

    /// Users among `peers` whose device lists changed in `(after, until]`.
    pub async fn changed_users(
        &self,
        after: i64,
        until: i64,
        peers: &HashSet<String>,
    ) -> Result<Vec<String>> {
        Ok(self
            .store
            .device_list_changes(after, until)
            .await?
            .into_iter()
            .filter(|u| peers.contains(u))
            .collect())
    }

    /// `PUT /sendToDevice/{type}/{txnId}`: `messages` maps users to devices (or `*`) to content.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &str,
        txn_id: &str,
        kind: &str,
        messages: &Map<String, Value>,
    ) -> Result<()> {
        if self
            .store
            .to_device_txn_seen(sender.as_str(), sender_device, txn_id)
            .await?
        {
            return Ok(());
        }
        // Other servers' users first: a crash before the local part is stored makes the client
        // send again, and the outbox replaces the repeat (same message ID) instead of adding it.
        let message_id = message_id(sender, sender_device, txn_id);
        let mut remote: std::collections::BTreeMap<ruma::OwnedServerName, Map<String, Value>> =
            Default::default();
        for (user, devices) in messages {
            if let Ok(user_id) = <&UserId>::try_from(user.as_str())
                && !self.outbox.is_local(user_id)
            {
                remote
                    .entry(user_id.server_name().to_owned())
                    .or_default()
                    .insert(user.clone(), devices.clone());
            }
        }
        for (server, messages) in remote {
            let edu = Edu {
                edu_type: "m.direct_to_device",
                content: json!({
                    "sender": sender,
                    "type": kind,
                    "message_id": message_id,
                    "messages": messages,
                }),
                replace_key: Some(format!("to-device {message_id}")),
            };
            self.outbox.to_servers([server].into(), edu).await?;
        }
        let queued = self.local_deliveries(kind, messages).await?;
        self.stream
            .aux_write(|pos| async move {
                self.store
                    .queue_to_device((sender.as_str(), sender_device, txn_id), &queued, pos)
                    .await?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// An `m.direct_to_device` EDU from another server's user: delivered to the local devices
    /// it names (every device for `*`), once per message ID; unknown users and devices are
    /// skipped.
    pub async fn receive_to_device(
        &self,
        sender: &UserId,
        message_id: &str,
        kind: &str,
        messages: &Map<String, Value>,
        server_name: &ruma::ServerName,
    ) -> Result<()> {
        let mut queued = Vec::new();
        for (user, device, kind, content) in self.local_deliveries(kind, messages).await? {
            if UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server_name) {
                queued.push((user, device, kind, content));
            }
        }
        // Remote senders have no device here: "" keeps their message IDs apart from clients' txns.
        let queued = &queued;
        self.stream
            .aux_write(|pos| async move {
                self.store
                    .queue_to_device((sender.as_str(), "", message_id), queued, pos)
                    .await?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// `(user, device, type, content)` for each local device `messages` names (`*`: all the
    /// user's devices). Devices that do not exist are skipped, as in Synapse: the sender may
    /// have an outdated list, and nothing should wait for a device that will never sync.
    async fn local_deliveries(
        &self,
        kind: &str,
        messages: &Map<String, Value>,
    ) -> Result<Vec<(String, String, String, String)>> {
        let mut queued = Vec::new();
        for (user, devices) in messages {
            let Some(devices) = devices.as_object() else {
                continue;
            };
            if UserId::parse(user.as_str()).is_ok_and(|u| !self.outbox.is_local(&u)) {
                continue;
            }
            let existing: Vec<String> = self
                .store
                .devices(user)
                .await?
                .into_iter()
                .map(|(id, _, _)| id)
                .collect();
            for (device, content) in devices {
                let targets = existing.iter().filter(|id| device == "*" || *id == device);
                for target in targets {
                    queued.push((user.clone(), target.clone(), kind.to_owned(), content.to_string()));
                }
            }
        }
        Ok(queued)
    }

    /// Messages waiting for a device up to `until`; those up to `ack` (the client's previous
    /// sync token) were delivered and are dropped.
    pub async fn to_device_for(
        &self,
        user: &UserId,
        device: &str,
        ack: i64,
        until: i64,
    ) -> Result<Vec<Value>> {
        Ok(self
            .store
            .to_device_messages(user.as_str(), device, ack, until)
            .await?
            .into_iter()
            .map(|(sender, kind, content)| {
                json!({ "sender": sender, "type": kind, "content": serde_json::from_str::<Value>(&content).unwrap_or_default() })
            })
            .collect())
    }
}

/// One-time keys a device may hold per algorithm (Synapse's limit): a client that uploads
/// regardless of the counts it is told is stopped, not silently trimmed.
const MAX_ONE_TIME_KEYS_PER_ALGORITHM: i64 = 500;

/// `(algorithm, key ID, key)` of uploaded keys named `<algorithm>:<id>`.
fn key_algorithms(keys: Option<&Map<String, Value>>) -> Result<Vec<(&str, &str, &Value)>> {
    keys.into_iter()
        .flatten()
        .map(|(id, key)| {
            let (algorithm, _) = id
                .split_once(':')
                .ok_or_else(|| Error::BadJson(format!("bad key ID `{id}`")))?;
            Ok((algorithm, id.as_str(), key))
        })
        .collect()
}

/// The federation message ID of a client's to-device send: the same for a repeated request, so
/// the receiving server can drop a repeat.
fn message_id(sender: &UserId, device: &str, txn_id: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{sender}\u{0}{device}\u{0}{txn_id}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18])
}
