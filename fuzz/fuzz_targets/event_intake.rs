//! Canonical-JSON event intake, without a database: the input is both
//!
//! - a client's event as the pipeline receives it (`type`, `state_key`, `content`, `redacts`,
//!   `sender`, `ts`, `room_version` in one JSON object, read by `parse_json`), taken through the
//!   steps of `rooms/pipeline.rs`'s `build` and `authorize` against a small room (create, two
//!   members, power levels, join rules) of room version 9, 10 or 11: the content checks,
//!   `auth_types_for_event`, canonical JSON, hash and sign, the size limit, `check_pdu_format`,
//!   the reference hash as event ID, `Pdu::from_json`, the auth rules; and
//! - a stored PDU (`Pdu::from_json`, what `Pdu::from_row` reads back from the database) turned
//!   into the client and stripped formats.
//!
//! Properties: never a panic, hang or unbounded allocation; what the server built and signed reads
//! back as a `Pdu` with its own canonical JSON, verifies with the server's key and has the event
//! ID its reference hash gives.

#![no_main]

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, LazyLock},
};

use libfuzzer_sys::fuzz_target;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedUserId, UserId,
    events::{StateEventType, TimelineEventType},
    serde::Base64,
    signatures::{PublicKeyMap, hash_and_sign_event, reference_hash, verify_event},
    state_res::{self, Event as _},
};
use serde_json::{Value, json};
use switchboard_core::{
    keys::SigningKey,
    pdu::{Pdu, RoomVersion},
    rooms::check_state_content,
    util::parse_user_id,
};

const SERVER: &str = "example.org";
const ROOM: &str = "!fuzz:example.org";
const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
/// `rooms/pipeline.rs`'s `MAX_PDU_BYTES`.
const MAX_PDU_BYTES: usize = 65_536;

static KEY: LazyLock<SigningKey> = LazyLock::new(|| {
    SigningKey::parse("ed25519 a_fuzz nCbqpn2A/dtpWuJb4Ckv/DJkxNPx4u6AzE81ebxwIu8\n", "fuzz").expect("key")
});

static PUBLIC_KEYS: LazyLock<PublicKeyMap> = LazyLock::new(|| {
    let key = &KEY.key_pair;
    let set = BTreeMap::from([(
        format!("ed25519:{}", key.version()),
        Base64::new(key.public_key().to_vec()),
    )]);
    BTreeMap::from([(SERVER.to_owned(), set)])
});

type State = HashMap<(StateEventType, String), Arc<Pdu>>;

struct Room {
    version: RoomVersion,
    state: State,
    head: (OwnedEventId, u64),
}

/// One room per supported version, built through the same steps as the fuzzed events.
static ROOMS: LazyLock<Vec<Room>> = LazyLock::new(|| {
    ["9", "10", "11"]
        .into_iter()
        .map(|v| {
            let version = RoomVersion::parse(v).expect("supported");
            let alice = user(ALICE);
            let bob = user(BOB);
            let initial = [
                (&alice, "m.room.create", json!({"creator": ALICE, "room_version": v})),
                (&alice, "m.room.member", json!({"membership": "join", "displayname": "Alice"})),
                (
                    &alice,
                    "m.room.power_levels",
                    json!({
                        "users": {ALICE: 100, BOB: 50},
                        "users_default": 0, "events_default": 0, "state_default": 50,
                        "ban": 50, "kick": 50, "redact": 50, "invite": 0,
                        "events": {"m.room.name": 50, "m.room.power_levels": 100},
                    }),
                ),
                (&alice, "m.room.join_rules", json!({"join_rule": "public"})),
                (&alice, "m.room.history_visibility", json!({"history_visibility": "shared"})),
                (&bob, "m.room.member", json!({"membership": "join"})),
            ];
            let mut state = State::new();
            let mut head: Option<(OwnedEventId, u64)> = None;
            for (sender, kind, content) in initial {
                let state_key = match kind {
                    "m.room.member" => sender.to_string(),
                    _ => String::new(),
                };
                let draft = Draft {
                    kind: kind.to_owned(),
                    state_key: Some(state_key.clone()),
                    content,
                    redacts: None,
                    timestamp: 1_700_000_000_000,
                };
                let (pdu, auth) = build(&version, &state, head.as_ref(), sender, draft).expect("setup builds");
                authorize(&version, &state, &pdu, &auth).expect("setup is authorised");
                head = Some((pdu.event_id.clone(), u64::from(pdu.depth)));
                state.insert((StateEventType::from(kind), state_key), Arc::new(pdu));
            }
            Room {
                version,
                state,
                head: head.expect("events"),
            }
        })
        .collect()
});

fn user(id: &str) -> OwnedUserId {
    parse_user_id(id).expect("valid user ID")
}

struct Draft {
    kind: String,
    state_key: Option<String>,
    content: Value,
    redacts: Option<OwnedEventId>,
    timestamp: u64,
}

fuzz_target!(|data: &[u8]| {
    stored_pdu(data);
    let Ok(Value::Object(request)) = switchboard_api::parse_json::<Value>(data) else {
        return;
    };
    let Some(kind) = request.get("type").and_then(Value::as_str) else {
        return;
    };
    let state_key = match request.get("state_key") {
        None => None,
        Some(Value::String(key)) => Some(key.clone()),
        Some(_) => return,
    };
    let redacts = match request.get("redacts").and_then(Value::as_str) {
        Some(id) => match OwnedEventId::try_from(id) {
            Ok(id) => Some(id),
            Err(_) => return,
        },
        None => None,
    };
    let sender = match request.get("sender").and_then(Value::as_str) {
        Some(id) => match parse_user_id(id) {
            Ok(id) => id,
            Err(_) => return,
        },
        None => user(ALICE),
    };
    let room = match request.get("room_version").and_then(Value::as_str) {
        Some("9") => &ROOMS[0],
        Some("10") => &ROOMS[1],
        _ => &ROOMS[2],
    };
    let draft = Draft {
        kind: kind.to_owned(),
        state_key,
        content: request.get("content").cloned().unwrap_or_else(|| json!({})),
        redacts,
        timestamp: request
            .get("ts")
            .and_then(Value::as_u64)
            .unwrap_or(1_700_000_000_000),
    };
    let Ok((pdu, auth)) = build(&room.version, &room.state, Some(&room.head), &sender, draft) else {
        return;
    };
    built_pdu(room, &sender, &pdu);
    let _ = authorize(&room.version, &room.state, &pdu, &auth);
});

/// `Pipeline::build`, step for step, on a fixed state instead of a room handle.
fn build(
    version: &RoomVersion,
    state: &State,
    head: Option<&(OwnedEventId, u64)>,
    sender: &UserId,
    draft: Draft,
) -> Result<(Pdu, Vec<Arc<Pdu>>), String> {
    let rules = &version.rules;
    let mut content = draft.content;
    if !content.is_object() {
        return Err("event content must be a JSON object".to_owned());
    }
    if draft.state_key.is_some() {
        check_state_content(&draft.kind, &content, &rules.authorization).map_err(|e| e.to_string())?;
    }
    let kind = TimelineEventType::from(draft.kind.as_str());
    let content_raw = serde_json::value::to_raw_value(&content).map_err(|e| e.to_string())?;
    let auth_types = state_res::auth_types_for_event(
        &kind,
        sender,
        draft.state_key.as_deref(),
        &content_raw,
        &rules.authorization,
    )?;
    let auth: Vec<Arc<Pdu>> = auth_types
        .into_iter()
        .filter_map(|key| state.get(&key).cloned())
        .collect();
    let (prev_events, depth) = match head {
        Some((id, depth)) => (vec![id.to_string()], depth + 1),
        None => (Vec::new(), 1),
    };
    let mut object = json!({
        "auth_events": auth.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>(),
        "depth": depth,
        "origin_server_ts": draft.timestamp,
        "prev_events": prev_events,
        "room_id": ROOM,
        "sender": sender,
        "type": draft.kind,
    });
    if let Some(redacts) = draft.redacts {
        if rules.redaction.content_field_redacts {
            content["redacts"] = json!(redacts);
        } else {
            object["redacts"] = json!(redacts);
        }
    }
    object["content"] = content;
    if let Some(state_key) = &draft.state_key {
        object["state_key"] = json!(state_key);
    }
    let CanonicalJsonValue::Object(mut object) =
        CanonicalJsonValue::try_from(object).map_err(|e| format!("event is not canonical JSON: {e}"))?
    else {
        panic!("event did not serialise to an object");
    };
    hash_and_sign_event(SERVER, &KEY.key_pair, &mut object, &rules.redaction).map_err(|e| e.to_string())?;
    let json = serde_json::to_string(&object).expect("canonical JSON serialises");
    if json.len() > MAX_PDU_BYTES {
        return Err("too large".to_owned());
    }
    state_res::check_pdu_format(&object, &rules.event_format)?;
    let hash = reference_hash(&object, rules).map_err(|e| e.to_string())?;
    let event_id = OwnedEventId::try_from(format!("${hash}")).expect("a reference hash is an event ID");
    // The server built this event itself: failing to read it back would be a 500 on every send.
    let pdu = Pdu::from_json(event_id, json).unwrap_or_else(|e| panic!("a built event does not read back: {e}"));
    Ok((pdu, auth))
}

/// `pipeline.rs`'s `authorize`.
fn authorize(version: &RoomVersion, state: &State, pdu: &Pdu, auth: &[Arc<Pdu>]) -> Result<(), String> {
    let rules = &version.rules.authorization;
    state_res::check_state_independent_auth_rules(rules, pdu, |id| {
        auth.iter().find(|e| e.event_id == id).cloned()
    })?;
    state_res::check_state_dependent_auth_rules(rules, pdu, |kind, state_key| {
        state.get(&(kind.clone(), state_key.to_owned())).cloned()
    })
}

/// What holds for every event the server built and signed.
fn built_pdu(room: &Room, sender: &UserId, pdu: &Pdu) {
    let object: CanonicalJsonObject = serde_json::from_str(&pdu.json).expect("stored JSON is canonical JSON");
    assert_eq!(
        serde_json::to_string(&object).expect("serialises"),
        pdu.json,
        "stored JSON is in canonical form"
    );
    let hash = reference_hash(&object, &room.version.rules).expect("hashes again");
    assert_eq!(pdu.event_id.as_str(), format!("${hash}"), "event ID is the reference hash");
    if sender.server_name() == SERVER {
        verify_event(&PUBLIC_KEYS, &object, &room.version.rules).expect("own signature verifies");
    }
    client_views(pdu);
}

/// A PDU read back from the database, as `Pdu::from_row` does.
fn stored_pdu(data: &[u8]) {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    // The server stores only JSON it serialised itself from `serde_json::Value`s: never a lone
    // surrogate (`\ud800`), which `RawValue` would carry through unchecked.
    if serde_json::from_str::<Value>(json).is_err() {
        return;
    }
    let event_id = OwnedEventId::try_from("$fuzz").expect("event ID");
    if let Ok(pdu) = Pdu::from_json(event_id, json.to_owned()) {
        client_views(&pdu);
    }
}

fn client_views(pdu: &Pdu) {
    let alice = user(ALICE);
    let client = serde_json::to_string(&pdu.to_client(Some((&alice, "DEVICE")))).expect("client format serialises");
    let _: Value = serde_json::from_str(&client).expect("client format is JSON");
    let _ = serde_json::to_string(&pdu.to_stripped()).expect("stripped format serialises");
    let _ = pdu.membership();
    let _ = pdu.content_value();
    let _ = (pdu.event_type(), pdu.state_key(), pdu.redacts(), pdu.prev_events().count());
}
