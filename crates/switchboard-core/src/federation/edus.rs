//! EDUs other servers push in their transactions: typing, receipts, presence, device-list and
//! cross-signing updates, to-device messages. Each is checked to come from the server of the user
//! it speaks for; one that does not parse or may not be taken is logged and dropped (the spec
//! gives EDUs no verdict), while a storage failure fails the transaction so it comes again.

use std::time::Duration;

use ruma::{OwnedServerName, RoomId, UserId};
use serde_json::Value;

use crate::{Homeserver, Result};

/// How long a remote user's typing lasts without a refresh (Synapse's federation timeout).
const REMOTE_TYPING: Duration = Duration::from_secs(60);

impl Homeserver {
    /// Takes the EDUs of one transaction from `origin`, in order.
    pub async fn receive_edus(
        self: &std::sync::Arc<Self>,
        origin: &OwnedServerName,
        edus: &[Value],
    ) -> Result<()> {
        for edu in edus {
            let kind = edu["edu_type"].as_str().unwrap_or_default();
            let content = &edu["content"];
            let verdict = match kind {
                "m.typing" => self.receive_typing(origin, content).await?,
                "m.receipt" => self.receive_receipts(origin, content).await?,
                "m.presence" => self.receive_presence(origin, content).await?,
                "m.device_list_update" => self.receive_device_list_update(origin, content).await?,
                "m.signing_key_update" => self.receive_signing_key_update(origin, content).await?,
                "m.direct_to_device" => self.receive_to_device(origin, content).await?,
                _ => {
                    tracing::debug!(%origin, edu_type = kind, "EDU of a type this server does not take");
                    Ok(())
                }
            };
            if let Err(why) = verdict {
                tracing::info!(%origin, edu_type = kind, %why, "EDU dropped");
            }
        }
        Ok(())
    }

    /// The user an EDU speaks for, if `origin` may speak for them.
    pub(super) fn sender_of(
        origin: &OwnedServerName,
        user: &Value,
    ) -> std::result::Result<ruma::OwnedUserId, String> {
        let user = user
            .as_str()
            .and_then(|u| UserId::parse(u).ok())
            .ok_or_else(|| "no valid user ID".to_owned())?;
        if user.server_name() != origin {
            return Err(format!("{origin} cannot speak for {user}"));
        }
        Ok(user)
    }

    /// Whether `user` is joined to `room` (as this server sees it).
    async fn is_joined(&self, room: &RoomId, user: &UserId) -> Result<bool> {
        Ok(self.rooms.membership(room, user).await?.as_deref() == Some("join"))
    }

    async fn receive_typing(&self, origin: &OwnedServerName, content: &Value) -> Result<Result<(), String>> {
        let user = match Self::sender_of(origin, &content["user_id"]) {
            Ok(user) => user,
            Err(why) => return Ok(Err(why)),
        };
        let Some(room) = content["room_id"]
            .as_str()
            .and_then(|r| <&RoomId>::try_from(r).ok())
        else {
            return Ok(Err("no valid room_id".to_owned()));
        };
        if !self.is_joined(room, &user).await? {
            return Ok(Err(format!("{user} is not in {room}")));
        }
        let typing = content["typing"].as_bool().unwrap_or(false);
        self.ephemeral
            .set_typing(room, &user, typing, REMOTE_TYPING)
            .await;
        Ok(Ok(()))
    }

    /// `{room: {"m.read": {user: {event_ids, data: {ts, thread_id}}}}}`; other receipt types
    /// (private ones never cross servers) are ignored.
    async fn receive_receipts(
        &self,
        origin: &OwnedServerName,
        content: &Value,
    ) -> Result<Result<(), String>> {
        let mut problems = Vec::new();
        for (room, kinds) in content.as_object().into_iter().flatten() {
            let Ok(room) = <&RoomId>::try_from(room.as_str()) else {
                problems.push(format!("bad room ID {room}"));
                continue;
            };
            for (user, receipt) in kinds["m.read"].as_object().into_iter().flatten() {
                let user = match Self::sender_of(origin, &Value::from(user.as_str())) {
                    Ok(user) => user,
                    Err(why) => {
                        problems.push(why);
                        continue;
                    }
                };
                let Some(event_id) = receipt["event_ids"]
                    .as_array()
                    .and_then(|ids| ids.last())
                    .and_then(Value::as_str)
                else {
                    problems.push(format!("a receipt of {user} without event_ids"));
                    continue;
                };
                if !self.is_joined(room, &user).await? {
                    problems.push(format!("{user} is not in {room}"));
                    continue;
                }
                let thread = receipt["data"]["thread_id"].as_str();
                if let Err(e) = self
                    .ephemeral
                    .set_receipt(room, "m.read", &user, event_id, thread)
                    .await
                {
                    refused(&mut problems, e)?;
                }
            }
        }
        Ok(outcome(problems))
    }

    /// `{push: [{user_id, presence, status_msg, last_active_ago, currently_active}]}`, taken
    /// only when `use_presence` is on.
    async fn receive_presence(
        &self,
        origin: &OwnedServerName,
        content: &Value,
    ) -> Result<Result<(), String>> {
        if !self.ephemeral.federates_presence() {
            return Ok(Ok(()));
        }
        let mut problems = Vec::new();
        for update in content["push"].as_array().into_iter().flatten() {
            let user = match Self::sender_of(origin, &update["user_id"]) {
                Ok(user) => user,
                Err(why) => {
                    problems.push(why);
                    continue;
                }
            };
            let presence = update["presence"].as_str().unwrap_or_default();
            let status = update["status_msg"].as_str().map(str::to_owned);
            let ago = update["last_active_ago"].as_u64().unwrap_or(0);
            if let Err(e) = self.ephemeral.set_presence(&user, presence, status, ago).await {
                refused(&mut problems, e)?;
            }
        }
        Ok(outcome(problems))
    }

    /// `{sender, type, message_id, messages: {user: {device or "*": content}}}` for this
    /// server's users; taken once per sender and message ID.
    async fn receive_to_device(
        &self,
        origin: &OwnedServerName,
        content: &Value,
    ) -> Result<Result<(), String>> {
        let sender = match Self::sender_of(origin, &content["sender"]) {
            Ok(user) => user,
            Err(why) => return Ok(Err(why)),
        };
        let (Some(kind), Some(message_id), Some(messages)) = (
            content["type"].as_str(),
            content["message_id"].as_str(),
            content["messages"].as_object(),
        ) else {
            return Ok(Err("no type, message_id or messages".to_owned()));
        };
        self.e2ee
            .receive_to_device(&sender, message_id, kind, messages, &self.server_name)
            .await?;
        Ok(Ok(()))
    }
}

/// Notes why one item of an EDU was refused; a storage failure fails the whole transaction.
fn refused(problems: &mut Vec<String>, e: crate::Error) -> Result<()> {
    match e {
        crate::Error::Store(_) | crate::Error::Internal(_) => Err(e),
        e => {
            problems.push(e.to_string());
            Ok(())
        }
    }
}

fn outcome(problems: Vec<String>) -> std::result::Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
