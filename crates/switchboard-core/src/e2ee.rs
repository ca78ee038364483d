//! End-to-end encryption plumbing, stored for real: device keys, one-time and fallback keys
//! (claimed atomically), device-list changes and to-device messages. The server never sees
//! plaintext; it only keeps and hands over what clients upload.

use std::{collections::HashSet, sync::Arc};

use ruma::UserId;
use serde_json::{Map, Value, json};
use switchboard_store::Store;

use crate::{Error, Result, stream::EventStream};

pub struct E2ee {
    store: Store,
    stream: Arc<EventStream>,
}

impl E2ee {
    pub fn new(store: Store, stream: Arc<EventStream>) -> Self {
        Self { store, stream }
    }

    /// `POST /keys/upload`: returns the device's unclaimed one-time key counts.
    pub async fn upload(
        &self,
        user: &UserId,
        device: &str,
        device_keys: Option<&Value>,
        one_time_keys: Option<&Map<String, Value>>,
        fallback_keys: Option<&Map<String, Value>>,
    ) -> Result<Map<String, Value>> {
        if let Some(keys) = device_keys {
            if keys.get("user_id").and_then(Value::as_str) != Some(user.as_str())
                || keys.get("device_id").and_then(Value::as_str) != Some(device)
            {
                return Err(Error::BadJson(
                    "device_keys must name this user and device".to_owned(),
                ));
            }
            let text = keys.to_string();
            self.stream
                .aux_write(|pos| async move {
                    Ok(self
                        .store
                        .set_device_keys(user.as_str(), device, &text, pos)
                        .await?)
                })
                .await?;
        }
        for (id, key) in one_time_keys.into_iter().flatten() {
            let (algorithm, _) = id
                .split_once(':')
                .ok_or_else(|| Error::BadJson(format!("bad key ID `{id}`")))?;
            self.store
                .add_one_time_key(user.as_str(), device, algorithm, id, &key.to_string())
                .await?;
        }
        for (id, key) in fallback_keys.into_iter().flatten() {
            let (algorithm, _) = id
                .split_once(':')
                .ok_or_else(|| Error::BadJson(format!("bad key ID `{id}`")))?;
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
        self.device_list_changed(user).await
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
                // One signs one's own devices and keys, and other users' master keys only.
                let allowed = user == signer.as_str() || self.is_master_key(user, key_id).await?;
                let merged = if allowed {
                    self.add_signatures(signer.as_str(), user, key_id, from_signer)
                        .await?
                } else {
                    None
                };
                if merged.is_some() {
                    changed.insert(user.clone());
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
        for user in changed {
            if let Ok(user_id) = <&UserId>::try_from(user.as_str()) {
                self.device_list_changed(user_id).await?;
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
    /// `key_id` of `user`. `None` if there is no such key.
    async fn add_signatures(
        &self,
        signer: &str,
        user: &str,
        key_id: &str,
        new: &Map<String, Value>,
    ) -> Result<Option<()>> {
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
                return Ok(Some(()));
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
                return Ok(Some(()));
            }
        }
        Ok(None)
    }

    /// `POST /keys/query`: device keys of the requested users (all devices for an empty list),
    /// plus their public cross-signing keys (`user_signing` only the requester's own).
    pub async fn query_for(&self, requester: &UserId, requested: &Map<String, Value>) -> Result<Value> {
        let mut response = self.query(requested).await?;
        for user in requested.keys() {
            for (kind, keys) in self.store.cross_signing_keys(user).await? {
                let field = match kind.as_str() {
                    "master" => "master_keys",
                    "self_signing" => "self_signing_keys",
                    "user_signing" if user == requester.as_str() => "user_signing_keys",
                    _ => continue,
                };
                response[field][user] = serde_json::from_str(&keys).unwrap_or(Value::Null);
            }
        }
        Ok(response)
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
        for (user, devices) in requested {
            let mut per_device = Map::new();
            for (device, algorithm) in devices.as_object().into_iter().flatten() {
                let Some(algorithm) = algorithm.as_str() else {
                    continue;
                };
                if let Some((key_id, key)) = self.store.claim_key(user, device, algorithm).await? {
                    let key: Value = serde_json::from_str(&key).unwrap_or(Value::Null);
                    per_device.insert(device.clone(), json!({ key_id: key }));
                }
            }
            claimed.insert(user.clone(), Value::Object(per_device));
        }
        Ok(json!({ "one_time_keys": claimed, "failures": {} }))
    }

    /// A device appeared or went away: everyone sharing a room must re-query.
    pub async fn device_list_changed(&self, user: &UserId) -> Result<()> {
        self.stream
            .aux_write(
                |pos| async move { Ok(self.store.record_device_list_change(user.as_str(), pos).await?) },
            )
            .await?;
        Ok(())
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
        let mut queued = Vec::new();
        for (user, devices) in messages {
            let Some(devices) = devices.as_object() else {
                continue;
            };
            for (device, content) in devices {
                let targets: Vec<String> = if device == "*" {
                    self.store
                        .devices(user)
                        .await?
                        .into_iter()
                        .map(|(id, _, _)| id)
                        .collect()
                } else {
                    vec![device.clone()]
                };
                for target in targets {
                    queued.push((user.clone(), target, kind.to_owned(), content.to_string()));
                }
            }
        }
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
