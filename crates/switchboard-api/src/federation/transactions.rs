//! Transactions other servers push (`/send/{txnId}`): their PDUs and EDUs.

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
use tokio::task::JoinSet;

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

/// Takes the PDUs of a transaction: each room's in order, in one write, the rooms side by
/// side. Each PDU gets its own verdict; a bad one does not spoil the rest, and a repeated
/// transaction finds its events known. A storage failure fails the transaction, so the
/// sender sends it again.
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
    let mut rooms: Vec<(OwnedRoomId, Vec<CanonicalJsonObject>)> = Vec::new();
    for pdu in txn.pdus {
        let room = match pdu.get("room_id") {
            Some(CanonicalJsonValue::String(room)) => OwnedRoomId::try_from(room.as_str()).ok(),
            _ => None,
        };
        let Some(room) = room else {
            tracing::info!(origin = %request.origin, %txn_id, "a PDU without a valid room_id; dropped");
            continue;
        };
        match rooms.iter_mut().find(|(r, _)| *r == room) {
            Some((_, pdus)) => pdus.push(pdu),
            None => rooms.push((room, vec![pdu])),
        }
    }
    let mut tasks = JoinSet::new();
    for (room, pdus) in rooms {
        let (hs, origin) = (hs.clone(), request.origin.clone());
        tasks.spawn(async move {
            let mut ids = Vec::with_capacity(pdus.len());
            for pdu in &pdus {
                ids.push(hs.rooms.pdu_event_id(&room, pdu).await.ok());
            }
            let verdicts = hs.receive_pdus_from(&origin, &room, pdus).await;
            (room, ids, verdicts)
        });
    }
    let mut results = Map::new();
    while let Some(done) = tasks.join_next().await {
        let (room, ids, verdicts) = done.map_err(|e| Error::Internal(format!("a room's PDUs: {e}")))?;
        let verdicts = match verdicts {
            Ok(verdicts) => verdicts,
            Err(e @ (Error::Store(_) | Error::Internal(_))) => return Err(e.into()),
            // The whole room refused (unknown, or its ACL denies the origin).
            Err(e) => {
                let message = e.to_string();
                ids.iter()
                    .map(|_| Err(Error::Forbidden(message.clone())))
                    .collect()
            }
        };
        for (id, verdict) in ids.into_iter().zip(verdicts) {
            match verdict {
                Ok(Received::Accepted(_) | Received::SoftFailed) | Ok(Received::AlreadyKnown) => {
                    if let Some(id) = id {
                        results.insert(id.to_string(), json!({}));
                    }
                }
                Err(e @ (Error::Store(_) | Error::Internal(_))) => return Err(e.into()),
                Err(e) => {
                    tracing::info!(origin = %request.origin, %txn_id, %room, error = %e, "PDU refused");
                    // Without a computable ID the refusal cannot be keyed; it is logged above.
                    if let Some(id) = id {
                        results.insert(id.to_string(), json!({ "error": e.to_string() }));
                    }
                }
            }
        }
    }
    // After the PDUs: a receipt may name an event of the same transaction.
    hs.receive_edus(&request.origin, &txn.edus).await?;
    Ok(Json(json!({ "pdus": results })))
}
