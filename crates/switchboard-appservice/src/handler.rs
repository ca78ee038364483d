//! What a service implements: one method per kind of thing the homeserver pushes or asks.

use std::{future::Future, sync::Arc};

use ruma::{OwnedRoomAliasId, OwnedUserId, UserId, events::AnyTimelineEvent, serde::Raw};
use serde_json::Value;

use crate::{Client, Intent, service::Shared};

/// What a handler returns; any error is logged with the event it came from.
pub type HandlerResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Device-list changes and key counts of an encrypting service (MSC3202), as the homeserver
/// sent them (stable keys, or the `org.matrix.msc3202.` ones).
#[derive(Clone, Debug, Default)]
pub struct CryptoUpdate {
    pub device_lists_changed: Vec<OwnedUserId>,
    pub device_lists_left: Vec<OwnedUserId>,
    /// `{user_id: {device_id: {algorithm: count}}}`.
    pub one_time_keys_count: Value,
    /// `{user_id: {device_id: [algorithm]}}`.
    pub unused_fallback_key_types: Value,
}

/// Given to every handler call: the service's client, its bot and its virtual users.
#[derive(Clone)]
pub struct Context {
    pub(crate) shared: Arc<Shared>,
}

impl Context {
    /// The client acting with the service's `as_token`.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// The service's own user (`sender_localpart`).
    pub fn bot(&self) -> Intent {
        self.shared.client.intent(&self.shared.bot)
    }

    /// Acts as a virtual user of the service's namespace.
    pub fn intent(&self, user_id: &UserId) -> Intent {
        self.shared.client.intent(user_id)
    }

    /// The homeserver's name (the part after `:` in IDs).
    pub fn server_name(&self) -> &str {
        &self.shared.server_name
    }
}

/// A service's behaviour. Every method has a default that does nothing (or answers "not
/// found"), so a service implements only what it needs.
///
/// Events of one room arrive in order — the next one only after the previous call returned —
/// while different rooms are handled concurrently. A transaction is acknowledged once all its
/// calls returned, so after a crash the homeserver sends it again.
pub trait Handler: Send + Sync + 'static {
    /// A room event from a transaction, as the homeserver sent it. The default parses it and
    /// calls [`Handler::event`]; override it to see the exact JSON (every key, also of events
    /// ruma cannot parse). An error is logged and the transaction still acknowledged: a handler
    /// that must not lose an event keeps it somewhere durable before returning.
    fn raw_event(&self, ctx: Context, event: Value) -> impl Future<Output = HandlerResult> + Send {
        async move {
            let parsed = serde_json::value::to_raw_value(&event)
                .map(Raw::<AnyTimelineEvent>::from_json)
                .map_err(|e| e.to_string())
                .and_then(|raw| raw.deserialize().map_err(|e| e.to_string()));
            match parsed {
                Ok(event) => self.event(ctx, event).await,
                Err(e) => Err(format!("the event does not parse: {e}").into()),
            }
        }
    }

    /// A room event from a transaction.
    fn event(&self, ctx: Context, event: AnyTimelineEvent) -> impl Future<Output = HandlerResult> + Send {
        let _ = (ctx, event);
        async { Ok(()) }
    }

    /// Ephemeral data (typing, receipts, presence) for services with `receive_ephemeral`.
    fn ephemeral(&self, ctx: Context, event: Value) -> impl Future<Output = HandlerResult> + Send {
        let _ = (ctx, event);
        async { Ok(()) }
    }

    /// A to-device message to one of the service's users (MSC2409).
    fn to_device(&self, ctx: Context, message: Value) -> impl Future<Output = HandlerResult> + Send {
        let _ = (ctx, message);
        async { Ok(()) }
    }

    /// Device lists and key counts, for services that encrypt (MSC3202).
    fn crypto(&self, ctx: Context, update: CryptoUpdate) -> impl Future<Output = HandlerResult> + Send {
        let _ = (ctx, update);
        async { Ok(()) }
    }

    /// `GET /users/{userId}`: does this user of the namespace exist? Create it and answer `true`
    /// to let the homeserver go on; `false` is "not found".
    fn query_user(
        &self,
        ctx: Context,
        user_id: OwnedUserId,
    ) -> impl Future<Output = HandlerResult<bool>> + Send {
        let _ = (ctx, user_id);
        async { Ok(false) }
    }

    /// `GET /rooms/{alias}`: does this alias of the namespace exist? Create the room with that
    /// alias and answer `true`, and the user's join goes through.
    fn query_alias(
        &self,
        ctx: Context,
        alias: OwnedRoomAliasId,
    ) -> impl Future<Output = HandlerResult<bool>> + Send {
        let _ = (ctx, alias);
        async { Ok(false) }
    }

    /// Third-party lookups (`/thirdparty/protocol|location|user`): `kind` is `protocol`,
    /// `location` or `user`; the answer is the JSON the spec gives for it, `None` for not found.
    fn thirdparty(
        &self,
        ctx: Context,
        kind: &str,
        protocol: &str,
        query: Vec<(String, String)>,
    ) -> impl Future<Output = HandlerResult<Option<Value>>> + Send {
        let _ = (ctx, kind, protocol, query);
        async { Ok(None) }
    }
}
