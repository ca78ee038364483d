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

    pub async fn counts(&self, user: &UserId, device: &str) -> Result<Map<String, Value>> {
        Ok(self
            .store
            .one_time_key_counts(user.as_str(), device)
            .await?
            .into_iter()
            .map(|(algorithm, count)| (algorithm, json!(count)))
            .collect())
    }

    pub async fn unused_fallback_types(&self, user: &UserId, device: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .unused_fallback_algorithms(user.as_str(), device)
            .await?)
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
