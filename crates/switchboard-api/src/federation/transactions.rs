//! Transactions other servers push (`/send/{txnId}`) and single events they fetch (`/event`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::put,
};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedRoomId};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_core::{Error, Homeserver, rooms::Received};

use super::{FedResult, Federated};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new().route("/_matrix/federation/v1/send/{txn_id}", put(send))
}

/// The spec's limits of one transaction.
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

#[derive(Deserialize)]
struct Transaction {
    origin: String,
    #[serde(default)]
    pdus: Vec<CanonicalJsonObject>,
    #[serde(default)]
    edus: Vec<Value>,
}

/// Takes the PDUs of a transaction one by one, in order. Each gets its own verdict; a bad one
/// does not spoil the rest, and a repeated transaction finds its events known.
async fn send(
    State(hs): State<Arc<Homeserver>>,
    Path(txn_id): Path<String>,
    request: Federated,
) -> FedResult<Json<Value>> {
    let txn: Transaction = request.json()?;
    if txn.origin != request.origin.as_str() {
        return Err(Error::Forbidden(format!(
            "the transaction claims to come from {}, but {} signed it",
            txn.origin, request.origin
        ))
        .into());
    }
    if txn.pdus.len() > MAX_PDUS || txn.edus.len() > MAX_EDUS {
        return Err(Error::TooLarge(format!(
            "a transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
        ))
        .into());
    }
    let mut results = Map::new();
    for pdu in txn.pdus {
        let Some(CanonicalJsonValue::String(room)) = pdu.get("room_id") else {
            tracing::info!(origin = %request.origin, %txn_id, "a PDU without room_id; dropped");
            continue;
        };
        let Ok(room) = OwnedRoomId::try_from(room.as_str()) else {
            continue;
        };
        let event_id = hs.rooms.pdu_event_id(&room, &pdu).await.ok();
        match hs.receive_pdu_from(&request.origin, &room, pdu).await {
            Ok(Received::Accepted(event)) => {
                results.insert(event.event_id.to_string(), json!({}));
            }
            Ok(Received::AlreadyKnown) => {}
            Err(Error::Store(e)) => return Err(Error::Store(e).into()),
            Err(e) => {
                tracing::info!(origin = %request.origin, %txn_id, %room, error = %e, "PDU refused");
                // Without a computable ID the refusal cannot be keyed; it is logged above.
                if let Some(id) = event_id {
                    results.insert(id.to_string(), json!({ "error": e.to_string() }));
                }
            }
        }
    }
    Ok(Json(json!({ "pdus": results })))
}
