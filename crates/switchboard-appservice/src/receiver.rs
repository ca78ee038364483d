//! The homeserver → service API: transactions, user and alias queries, third-party lookups and
//! ping, on the current (`/_matrix/app/v1/…`) and the legacy unprefixed routes.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::{Context, CryptoUpdate, Handler, service::Shared, txns::TxnStore};

pub(crate) struct Receiver<H> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) handler: Arc<H>,
    pub(crate) txns: Arc<dyn TxnStore>,
    /// One transaction at a time: a retry that arrives while the first attempt is still being
    /// handled waits, then finds it done.
    pub(crate) txn_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Transactions carry up to 100 events of up to 64 KiB each, plus ephemeral data: far more than
/// axum's default body limit.
const MAX_TRANSACTION_BYTES: usize = 64 * 1024 * 1024;

fn error(status: StatusCode, errcode: &str, message: &str) -> Response {
    (status, Json(json!({"errcode": errcode, "error": message}))).into_response()
}

pub(crate) fn router<H: Handler>(receiver: Arc<Receiver<H>>) -> Router {
    let api = Router::new()
        .route(
            "/transactions/{txn_id}",
            put(transaction::<H>).layer(DefaultBodyLimit::max(MAX_TRANSACTION_BYTES)),
        )
        .route("/users/{user_id}", get(query_user::<H>))
        .route("/rooms/{alias}", get(query_alias::<H>))
        .route("/thirdparty/{kind}/{protocol}", get(thirdparty::<H>))
        .route("/thirdparty/{kind}", get(thirdparty_reverse::<H>))
        .route("/ping", post(ping));
    Router::new()
        .nest("/_matrix/app/v1", api.clone())
        // Homeservers from before the v1 prefix (and Synapse's legacy fallback) use these.
        .nest("/_matrix/app/unstable", api.clone())
        .merge(api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "Unrecognized request method",
            )
        })
        .layer(middleware::from_fn_with_state(
            receiver.clone(),
            authenticate::<H>,
        ))
        .with_state(receiver)
}

/// The homeserver proves itself with `hs_token`: `Authorization: Bearer`, or the legacy
/// `access_token` query parameter.
async fn authenticate<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = header.or(query.get("access_token").map(String::as_str));
    match token {
        None => error(
            StatusCode::UNAUTHORIZED,
            "M_UNAUTHORIZED",
            "Missing hs_token (Authorization: Bearer …)",
        ),
        Some(token) if !tokens_match(token, &receiver.shared.registration.hs_token) => {
            error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Invalid hs_token")
        }
        Some(_) => next.run(request).await,
    }
}

/// Compares in time independent of where the tokens differ, so response timing cannot reveal
/// the `hs_token` byte by byte (only its length, which the generator fixes anyway).
fn tokens_match(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Reads a key, or its unstable name as a fallback (older homeservers send only those).
fn with_fallback<'a>(body: &'a Value, key: &str, unstable: &str) -> Option<&'a Value> {
    body.get(key)
        .or_else(|| body.get(format!("{unstable}.{key}")))
        .filter(|v| !v.is_null())
}

async fn transaction<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Path(txn_id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "M_NOT_JSON", "The body is not JSON");
    };
    let span = tracing::info_span!("transaction", txn_id = %txn_id);
    // In its own task: a homeserver that gives up waiting (and closes the connection) must not
    // cancel a transaction half-handled; its retry then finds it done.
    let work = async move {
        let _one_at_a_time = receiver.txn_lock.clone().lock_owned().await;
        if receiver.txns.seen(&txn_id) {
            tracing::debug!("transaction seen before; acknowledged again");
            return Json(json!({})).into_response();
        }
        if let Err(e) = receiver.handle(&body).await {
            // Not acknowledged: the homeserver sends it again.
            tracing::error!(error = %e, "cannot handle the transaction");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &e);
        }
        let (txns, id) = (receiver.txns.clone(), txn_id.clone());
        match tokio::task::spawn_blocking(move || txns.record(&id)).await {
            Ok(Ok(())) => Json(json!({})).into_response(),
            Ok(Err(e)) => {
                // Not acknowledged: the homeserver sends it again.
                tracing::error!(error = %e, "cannot record the transaction");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "M_UNKNOWN",
                    "cannot record the transaction",
                )
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &e.to_string()),
        }
    }
    .instrument(span);
    match tokio::spawn(work).await {
        Ok(response) => response,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &e.to_string()),
    }
}

impl<H: Handler> Receiver<H> {
    fn context(&self) -> Context {
        Context {
            shared: self.shared.clone(),
        }
    }

    /// Hands everything in a transaction to the handler: each room's events in order, rooms
    /// concurrently; then ephemeral data, to-device messages and key updates.
    async fn handle(&self, body: &Value) -> Result<(), String> {
        #[cfg_attr(not(feature = "e2ee"), allow(unused_mut))]
        let mut events = body["events"].as_array().cloned().unwrap_or_default();
        #[cfg(feature = "e2ee")]
        if let Some(crypto) = &self.shared.crypto {
            // Keys first: a room key sent before a message comes in the same transaction or an
            // earlier one. Keys that could not be taken in fail the transaction (it comes again).
            let to_device = with_fallback(body, "to_device", "de.sorunome.msc2409")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let update = crypto_update(body).unwrap_or_default();
            crypto
                .receive(&to_device, &update)
                .await
                .map_err(|e| format!("taking in the transaction's keys: {e}"))?;
            // Earlier events whose keys came since go first; an event without its key yet waits.
            let mut readable = crypto.unpark().await;
            for event in events {
                match event["type"].as_str() {
                    Some("m.room.encryption") => {
                        if let Some(room) = event["room_id"].as_str() {
                            crypto.room_encrypted(room);
                        }
                        readable.push(event);
                    }
                    Some("m.room.encrypted") => match crypto.decrypt(&event).await {
                        Some(decrypted) => readable.push(decrypted),
                        None => crypto.park(event),
                    },
                    _ => readable.push(event),
                }
            }
            events = readable;
        }
        let mut rooms: Vec<(Option<OwnedRoomId>, Vec<Value>)> = Vec::new();
        for event in events {
            let room = event["room_id"]
                .as_str()
                .and_then(|r| OwnedRoomId::try_from(r).ok());
            match rooms.iter_mut().find(|(r, _)| *r == room) {
                Some((_, list)) => list.push(event),
                None => rooms.push((room, vec![event])),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, events) in rooms {
            let (handler, ctx) = (self.handler.clone(), self.context());
            tasks.spawn(
                async move {
                    for event in events {
                        let id = event["event_id"].as_str().unwrap_or("?").to_owned();
                        // Each event in its own task: a panicking handler loses only that event,
                        // not the rest of the room's.
                        let (handler, ctx) = (handler.clone(), ctx.clone());
                        match tokio::spawn(async move { handler.raw_event(ctx, event).await }).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(event_id = %id, error = %e, "handling an event failed");
                            }
                            Err(e) => {
                                tracing::error!(event_id = %id, error = %e, "an event handler panicked")
                            }
                        }
                    }
                }
                .in_current_span(),
            );
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "an event handler panicked");
            }
        }
        let ctx = self.context();
        let list = |key: &str| {
            with_fallback(body, key, "de.sorunome.msc2409")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        for item in list("ephemeral") {
            if let Err(e) = self.handler.ephemeral(ctx.clone(), item).await {
                tracing::warn!(error = %e, "handling ephemeral data failed");
            }
        }
        for message in list("to_device") {
            if let Err(e) = self.handler.to_device(ctx.clone(), message).await {
                tracing::warn!(error = %e, "handling a to-device message failed");
            }
        }
        if let Some(update) = crypto_update(body)
            && let Err(e) = self.handler.crypto(ctx, update).await
        {
            tracing::warn!(error = %e, "handling key updates failed");
        }
        Ok(())
    }
}

/// MSC3202's keys, stable names first.
fn crypto_update(body: &Value) -> Option<CryptoUpdate> {
    const UNSTABLE: &str = "org.matrix.msc3202";
    let lists = with_fallback(body, "device_lists", UNSTABLE);
    let counts = with_fallback(body, "device_one_time_keys_count", UNSTABLE);
    let fallback = with_fallback(body, "device_unused_fallback_key_types", UNSTABLE);
    if lists.is_none() && counts.is_none() && fallback.is_none() {
        return None;
    }
    let users = |key: &str| -> Vec<OwnedUserId> {
        lists
            .and_then(|l| l[key].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().and_then(|u| OwnedUserId::try_from(u).ok()))
                    .collect()
            })
            .unwrap_or_default()
    };
    Some(CryptoUpdate {
        device_lists_changed: users("changed"),
        device_lists_left: users("left"),
        one_time_keys_count: counts.cloned().unwrap_or_else(|| json!({})),
        unused_fallback_key_types: fallback.cloned().unwrap_or_else(|| json!({})),
    })
}

async fn query_user<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Path(user_id): Path<String>,
) -> Response {
    let Ok(user_id) = OwnedUserId::try_from(user_id.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "Not a user ID");
    };
    answer_query(receiver.handler.query_user(receiver.context(), user_id).await)
}

async fn query_alias<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Path(alias): Path<String>,
) -> Response {
    let Ok(alias) = OwnedRoomAliasId::try_from(alias.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "Not a room alias");
    };
    answer_query(receiver.handler.query_alias(receiver.context(), alias).await)
}

fn answer_query(found: crate::HandlerResult<bool>) -> Response {
    match found {
        Ok(true) => Json(json!({})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Not found"),
        Err(e) => {
            tracing::warn!(error = %e, "query handler failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &e.to_string())
        }
    }
}

async fn thirdparty<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Path((kind, protocol)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if !matches!(kind.as_str(), "protocol" | "location" | "user") {
        return error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request");
    }
    let query: Vec<_> = query.into_iter().filter(|(k, _)| k != "access_token").collect();
    answer_thirdparty(
        receiver
            .handler
            .thirdparty(receiver.context(), &kind, &protocol, query)
            .await,
    )
}

/// `/thirdparty/location?alias=` and `/thirdparty/user?userid=`: reverse lookups.
async fn thirdparty_reverse<H: Handler>(
    State(receiver): State<Arc<Receiver<H>>>,
    Path(kind): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if !matches!(kind.as_str(), "location" | "user") {
        return error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request");
    }
    let query: Vec<_> = query.into_iter().filter(|(k, _)| k != "access_token").collect();
    answer_thirdparty(
        receiver
            .handler
            .thirdparty(receiver.context(), &kind, "", query)
            .await,
    )
}

fn answer_thirdparty(found: crate::HandlerResult<Option<Value>>) -> Response {
    match found {
        Ok(Some(value)) => Json(value).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Not found"),
        Err(e) => {
            tracing::warn!(error = %e, "third-party handler failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &e.to_string())
        }
    }
}

async fn ping() -> Json<Value> {
    Json(json!({}))
}

#[cfg(test)]
mod tests {
    use super::tokens_match;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("hs_secret", "hs_secret"));
        assert!(!tokens_match("hs_secreT", "hs_secret"));
        assert!(!tokens_match("hs_secret", "hs_secret_longer"));
        assert!(!tokens_match("", "hs_secret"));
    }
}
