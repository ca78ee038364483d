//! Account data (global and per room) and push rules, which are global account data
//! (`m.push_rules`) with the spec's server-default rule set underneath the user's changes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedUserId, RoomId, UserId, push::Ruleset};
use serde_json::{Value, json};
use switchboard_store::Store;

use crate::{Error, Result, stream::EventStream};

pub struct AccountData {
    store: Store,
    stream: Arc<EventStream>,
    /// Users' push rules as the push-rule evaluator reads them for every event; dropped when
    /// they change.
    rules: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
}

/// Rule sets cached at most; beyond, the cache starts again (they are read from one row).
const MAX_CACHED_RULES: usize = 10_000;

pub const PUSH_RULES: &str = "m.push_rules";

impl AccountData {
    pub fn new(store: Store, stream: Arc<EventStream>) -> Self {
        Self {
            store,
            stream,
            rules: Mutex::new(HashMap::new()),
        }
    }

    pub async fn set(&self, user: &UserId, room: Option<&RoomId>, kind: &str, content: &Value) -> Result<()> {
        if !content.is_object() {
            return Err(Error::BadJson("Account data must be a JSON object".to_owned()));
        }
        let text = content.to_string();
        let room = room.map_or("", |r| r.as_str());
        self.stream
            .aux_write(|pos| async move {
                Ok(self
                    .store
                    .set_account_data(user.as_str(), room, kind, &text, pos)
                    .await?)
            })
            .await?;
        if kind == PUSH_RULES
            && room.is_empty()
            && let Ok(mut rules) = self.rules.lock()
        {
            rules.remove(user);
        }
        Ok(())
    }

    pub async fn get(&self, user: &UserId, room: Option<&RoomId>, kind: &str) -> Result<Option<Value>> {
        let room = room.map_or("", |r| r.as_str());
        if kind == PUSH_RULES && room.is_empty() {
            return Ok(Some(json!({ "global": self.push_rules(user).await? })));
        }
        let text = self.store.account_data(user.as_str(), room, kind).await?;
        text.map(|t| serde_json::from_str(&t).map_err(Error::internal))
            .transpose()
    }

    /// The user's push rules: the server defaults until they change something.
    pub async fn push_rules(&self, user: &UserId) -> Result<Ruleset> {
        let stored = self.store.account_data(user.as_str(), "", PUSH_RULES).await?;
        let parsed = stored
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| serde_json::from_value::<Ruleset>(v["global"].clone()).ok());
        Ok(parsed.unwrap_or_else(|| Ruleset::server_default(user)))
    }

    /// The user's push rules, cached (for evaluating every event).
    pub async fn cached_push_rules(&self, user: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.rules.lock().ok().and_then(|r| r.get(user).cloned()) {
            return Ok(rules);
        }
        let rules = Arc::new(self.push_rules(user).await?);
        if let Ok(mut cache) = self.rules.lock() {
            if cache.len() >= MAX_CACHED_RULES {
                cache.clear();
            }
            cache.insert(user.to_owned(), rules.clone());
        }
        Ok(rules)
    }

    pub async fn set_push_rules(&self, user: &UserId, rules: &Ruleset) -> Result<()> {
        let content = json!({ "global": rules });
        self.set(user, None, PUSH_RULES, &content).await
    }
}
