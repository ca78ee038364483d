//! Client-Server API request bodies: `switchboard_api::parse_json` (what the `Body<T>` extractor
//! runs on every JSON body) into the body types the API uses, then the checks the homeserver
//! applies to them before any event is built.
//!
//! Properties: never a panic, hang or unbounded allocation; a refused body is `M_NOT_JSON` or
//! `M_BAD_JSON`; an accepted one holds no NUL; filters survive being stored and read back;
//! event type patterns match like a reference glob.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use switchboard_api::{error::ApiError, parse_json};
use switchboard_core::{
    Error,
    filter::{EventFilter, Filter},
    pdu::RoomVersion,
    rooms::{CreateRoom, check_state_content},
};

fuzz_target!(|data: &[u8]| {
    if let Some(value) = parsed::<Value>(data) {
        assert!(!has_nul(&value), "NUL accepted");
        if !data.iter().all(u8::is_ascii_whitespace) {
            let direct: Value = serde_json::from_slice(data).expect("parse_json accepted it");
            assert_eq!(value, direct);
        }
    }
    let _ = parsed::<Map<String, Value>>(data);
    if let Some(request) = parsed::<CreateRoom>(data) {
        create_room(&request);
    }
    if let Some(filter) = parsed::<Filter>(data) {
        filter_checks(&filter);
    }
});

fn parsed<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    match parse_json::<T>(data) {
        Ok(value) => Some(value),
        Err(ApiError(Error::NotJson(_) | Error::BadJson(_))) => None,
        Err(ApiError(other)) => panic!("a body is refused with {other:?}"),
    }
}

/// What `createRoom` checks before building events: the room version, then the content of every
/// state event it will send (the pipeline's content checks).
fn create_room(request: &CreateRoom) {
    let version = match request.room_version.as_deref() {
        Some(version) => match RoomVersion::parse(version) {
            Ok(version) => version,
            Err(_) => return,
        },
        None => RoomVersion::parse("11").expect("11 is supported"),
    };
    let rules = &version.rules.authorization;
    for state in &request.initial_state {
        let _ = check_state_content(&state.kind, &state.content, rules);
    }
    if let Some(levels) = &request.power_level_content_override {
        let _ = check_state_content("m.room.power_levels", &Value::Object(levels.clone()), rules);
    }
    if let Some(creation) = &request.creation_content {
        let _ = check_state_content("m.room.create", &Value::Object(creation.clone()), rules);
    }
    for kind in ["m.room.name", "m.room.topic"] {
        let content = serde_json::json!({ "name": request.name, "topic": request.topic });
        let _ = check_state_content(kind, &content, rules);
    }
}

fn filter_checks(filter: &Filter) {
    // `POST /filter` stores the filter as JSON; `GET /filter` and `/sync?filter=` read it back.
    let stored = serde_json::to_vec(filter).expect("a filter serialises");
    let read: Filter = parse_json(&stored).unwrap_or_else(|e| panic!("a stored filter does not read back: {e:?}"));
    assert_eq!(
        serde_json::to_value(filter).expect("serialises"),
        serde_json::to_value(&read).expect("serialises"),
        "filter round trip"
    );
    // Event type patterns (`*` wildcards) against the event types the input names in
    // `event_fields`, compared with a plain dynamic-programming glob.
    let kinds = filter.event_fields.as_deref().unwrap_or_default();
    let patterns = filter.room.timeline.events.types.as_deref().unwrap_or_default();
    for pattern in patterns.iter().take(8) {
        let one = EventFilter {
            types: Some(vec![pattern.clone()]),
            ..EventFilter::default()
        };
        for kind in kinds.iter().take(8) {
            assert_eq!(
                one.matches(kind, "@s:x"),
                glob(pattern.as_bytes(), kind.as_bytes()),
                "type pattern {pattern:?} against {kind:?}"
            );
        }
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // matches[j]: pattern[..i] matches text[..j].
    let mut matches = vec![false; text.len() + 1];
    matches[0] = true;
    for &p in pattern {
        let mut next = vec![false; text.len() + 1];
        if p == b'*' {
            let mut any = false;
            for j in 0..=text.len() {
                any |= matches[j];
                next[j] = any;
            }
        } else {
            for j in 1..=text.len() {
                next[j] = matches[j - 1] && text[j - 1] == p;
            }
        }
        matches = next;
    }
    matches[text.len()]
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
