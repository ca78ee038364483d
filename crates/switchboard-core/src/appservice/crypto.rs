//! MSC3202 for services that encrypt (registration flag `org.matrix.msc3202: true`): each
//! transaction carries what `/sync` would tell their users' devices — device-list changes of
//! users they share rooms with, and one-time-key counts and unused fallback key types of their
//! own users' devices — so a bridge needs no `/sync` loop per user. Keys as Synapse sends them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ruma::UserId;
use serde_json::{Value, json};

use super::{AppService, delivery::Delivery, delivery::Sender};
use crate::{Result, pdu::Pdu};

/// `device_lists` of a transaction.
#[derive(Debug, Default)]
pub struct DeviceLists {
    pub changed: BTreeSet<String>,
    pub left: BTreeSet<String>,
}

impl DeviceLists {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }
}

impl Delivery {
    /// Users the service shares an interesting room with (or owns) whose devices changed in
    /// `(after, until]` of the auxiliary stream, or who joined such a room in `events`
    /// (`changed`); members who left one of its rooms and now share none (`left`).
    pub(super) async fn device_list_summary(
        &self,
        sender: &Sender,
        service: &AppService,
        after: i64,
        until: i64,
        events: &[Arc<Pdu>],
    ) -> Result<DeviceLists> {
        let mut lists = DeviceLists::default();
        let changes = if after < until {
            self.store.device_list_changes(after, until).await?
        } else {
            Vec::new()
        };
        for user in changes {
            if let Ok(user_id) = <&UserId>::try_from(user.as_str())
                && self.shares_interest(sender, service, user_id).await?
            {
                lists.changed.insert(user);
            }
        }
        for event in events {
            let (Some(membership), Some(target)) = (event.membership(), event.state_key.as_deref()) else {
                continue;
            };
            if service.owns_user(target) {
                continue;
            }
            let Ok(target_id) = <&UserId>::try_from(target) else {
                continue;
            };
            match membership.as_str() {
                "join" => {
                    lists.left.remove(target);
                    lists.changed.insert(target.to_owned());
                }
                "leave" | "ban" if !self.shares_interest(sender, service, target_id).await? => {
                    lists.changed.remove(target);
                    lists.left.insert(target.to_owned());
                }
                _ => {}
            }
        }
        Ok(lists)
    }

    /// The service owns the user, or the user is joined to a room the service is interested in
    /// (Synapse's `is_interested_in_presence`, also MSC3202's rule for device lists).
    pub(super) async fn shares_interest(
        &self,
        sender: &Sender,
        service: &AppService,
        user: &UserId,
    ) -> Result<bool> {
        if service.owns_user(user.as_str()) {
            return Ok(true);
        }
        for room in self.rooms.joined_rooms(user).await? {
            let Ok(room_id) = ruma::OwnedRoomId::try_from(room) else {
                continue;
            };
            if sender
                .interest
                .is_interested_in_room(service, &self.rooms, &room_id)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the MSC3202 keys to a transaction body. Key counts cover the service's sender, its
    /// users joined to the rooms the transaction mentions (as in Synapse) and `users` (those
    /// whose keys were claimed, or who receive to-device messages).
    pub(super) async fn add_msc3202_keys(
        &self,
        service: &AppService,
        events: &[Arc<Pdu>],
        ephemeral: &[Value],
        mut users: BTreeSet<String>,
        device_lists: DeviceLists,
        body: &mut Value,
    ) -> Result<()> {
        if !device_lists.is_empty() {
            body["org.matrix.msc3202.device_lists"] = json!({
                "changed": device_lists.changed,
                "left": device_lists.left,
            });
        }
        let mut rooms: BTreeSet<String> = events.iter().map(|e| e.room_id.to_string()).collect();
        rooms.extend(
            ephemeral
                .iter()
                .filter_map(|e| e["room_id"].as_str().map(str::to_owned)),
        );
        users.insert(service.sender.to_string());
        for room in rooms {
            let Ok(room_id) = ruma::OwnedRoomId::try_from(room) else {
                continue;
            };
            let audience = self.rooms.audience(&room_id).await?;
            users.extend(
                audience
                    .local_joined
                    .iter()
                    .filter(|u| service.owns_user(u))
                    .cloned(),
            );
        }
        let mut counts = BTreeMap::new();
        let mut fallback = BTreeMap::new();
        for user in users {
            let mut user_counts = BTreeMap::new();
            let mut user_fallback = BTreeMap::new();
            for (device, _, _) in self.store.devices(&user).await? {
                // Synapse's shape: a device without keys has an empty map (SDKs read a missing
                // count as zero).
                let device_counts: BTreeMap<String, i64> = self
                    .store
                    .one_time_key_counts(&user, &device)
                    .await?
                    .into_iter()
                    .collect();
                let unused = self.store.unused_fallback_algorithms(&user, &device).await?;
                user_counts.insert(device.clone(), device_counts);
                user_fallback.insert(device, unused);
            }
            if !user_counts.is_empty() {
                counts.insert(user.clone(), user_counts);
                fallback.insert(user, user_fallback);
            }
        }
        if !counts.is_empty() {
            // Synapse sends both spellings; mautrix reads the first, older services the second.
            body["org.matrix.msc3202.device_one_time_keys_count"] = json!(counts);
            body["org.matrix.msc3202.device_one_time_key_counts"] = json!(counts);
            body["org.matrix.msc3202.device_unused_fallback_key_types"] = json!(fallback);
        }
        Ok(())
    }
}
