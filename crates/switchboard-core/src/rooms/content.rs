//! The content of state events the server interprets, checked before the auth rules: a malformed
//! one is the sender's mistake (`400 M_BAD_JSON`), not a lack of permission (`403`). The shapes
//! follow the spec's schemas and Synapse's `EventValidator`.

use ruma::{OwnedRoomAliasId, room_version_rules::AuthorizationRules};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Power levels the spec allows: a canonical-JSON integer.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

const MEMBERSHIPS: &[&str] = &["join", "invite", "leave", "ban", "knock"];
const HISTORY_VISIBILITIES: &[&str] = &["world_readable", "shared", "invited", "joined"];
const LEVEL_KEYS: &[&str] = &[
    "ban",
    "events_default",
    "invite",
    "kick",
    "redact",
    "state_default",
    "users_default",
];

/// Checks `content` of a state event of type `kind`; other types pass.
pub fn check(kind: &str, content: &Value, rules: &AuthorizationRules) -> Result<()> {
    let Some(content) = content.as_object() else {
        return Err(bad("event content must be a JSON object"));
    };
    match kind {
        "m.room.member" => {
            one_of(content, "membership", MEMBERSHIPS)?;
            optional_string(content, "displayname")?;
            optional_string(content, "avatar_url")?;
            optional_string(content, "reason")?;
            if content.get("is_direct").is_some_and(|v| !v.is_boolean()) {
                return Err(bad("`is_direct` must be a boolean"));
            }
        }
        "m.room.power_levels" => power_levels(content, rules)?,
        "m.room.join_rules" => {
            required_string(content, "join_rule")?;
            if let Some(allow) = content.get("allow")
                && !allow.as_array().is_some_and(|a| a.iter().all(Value::is_object))
            {
                return Err(bad("`allow` must be a list of objects"));
            }
        }
        "m.room.history_visibility" => one_of(content, "history_visibility", HISTORY_VISIBILITIES)?,
        "m.room.guest_access" => required_string(content, "guest_access")?,
        // Clients clear a name or topic with `{}`.
        "m.room.name" => optional_string(content, "name")?,
        "m.room.topic" => optional_string(content, "topic")?,
        "m.room.encryption" => required_string(content, "algorithm")?,
        "m.room.canonical_alias" => {
            if let Some(alias) = content.get("alias").filter(|v| !v.is_null()) {
                room_alias(alias, "alias")?;
            }
            if let Some(alt) = content.get("alt_aliases") {
                let list = alt
                    .as_array()
                    .ok_or_else(|| bad("`alt_aliases` must be a list of room aliases"))?;
                for alias in list {
                    room_alias(alias, "alt_aliases")?;
                }
            }
        }
        "m.room.server_acl" => {
            for key in ["allow", "deny"] {
                if let Some(list) = content.get(key)
                    && !list.as_array().is_some_and(|a| a.iter().all(Value::is_string))
                {
                    return Err(bad(&format!("`{key}` must be a list of strings")));
                }
            }
            if content.get("allow_ip_literals").is_some_and(|v| !v.is_boolean()) {
                return Err(bad("`allow_ip_literals` must be a boolean"));
            }
        }
        _ => {}
    }
    Ok(())
}

fn power_levels(content: &Map<String, Value>, rules: &AuthorizationRules) -> Result<()> {
    let level = |value: &Value, what: &str| -> Result<()> {
        let number = match value {
            Value::Number(n) => n.as_i64(),
            // Room versions before 10 also take integers in strings.
            Value::String(s) if !rules.integer_power_levels => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        match number {
            // Not `n.abs()`: it overflows for `i64::MIN` (a panic in debug builds).
            Some(n) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&n) => Ok(()),
            _ => Err(bad(&format!(
                "power level `{what}` must be an integer, not {value}"
            ))),
        }
    };
    for key in LEVEL_KEYS {
        if let Some(value) = content.get(*key) {
            level(value, key)?;
        }
    }
    for map in ["events", "users", "notifications"] {
        let Some(value) = content.get(map) else {
            continue;
        };
        let entries = value
            .as_object()
            .ok_or_else(|| bad(&format!("`{map}` must be an object")))?;
        for (key, value) in entries {
            if map == "users" {
                crate::util::parse_user_id(key).map_err(|e| bad(&format!("`users`: {e}")))?;
            }
            level(value, &format!("{map}.{key}"))?;
        }
    }
    Ok(())
}

fn bad(message: &str) -> Error {
    Error::BadJson(message.to_owned())
}

fn required_string(content: &Map<String, Value>, key: &str) -> Result<()> {
    match content.get(key) {
        Some(Value::String(_)) => Ok(()),
        Some(other) => Err(bad(&format!("`{key}` must be a string, not {other}"))),
        None => Err(bad(&format!("`{key}` is missing"))),
    }
}

fn optional_string(content: &Map<String, Value>, key: &str) -> Result<()> {
    match content.get(key) {
        None | Some(Value::String(_)) | Some(Value::Null) => Ok(()),
        Some(other) => Err(bad(&format!("`{key}` must be a string, not {other}"))),
    }
}

fn one_of(content: &Map<String, Value>, key: &str, allowed: &[&str]) -> Result<()> {
    required_string(content, key)?;
    match content.get(key).and_then(Value::as_str) {
        Some(value) if allowed.contains(&value) => Ok(()),
        other => Err(bad(&format!(
            "`{key}` must be one of {}, not {}",
            allowed.join(", "),
            other.unwrap_or_default()
        ))),
    }
}

fn room_alias(value: &Value, key: &str) -> Result<()> {
    let text = value
        .as_str()
        .ok_or_else(|| bad(&format!("`{key}` must hold room aliases, not {value}")))?;
    OwnedRoomAliasId::try_from(text)
        .map(|_| ())
        .map_err(|e| bad(&format!("`{key}`: invalid room alias {text}: {e}")))
}

#[cfg(test)]
mod tests {
    use ruma::room_version_rules::RoomVersionRules;
    use serde_json::json;

    use super::*;

    fn checked(kind: &str, content: Value, rules: &RoomVersionRules) -> Result<()> {
        check(kind, &content, &rules.authorization)
    }

    #[test]
    fn malformed_interpreted_content_is_bad_json() {
        let v11 = RoomVersionRules::V11;
        let bad_ones = [
            ("m.room.power_levels", json!({"ban": "50"})),
            ("m.room.power_levels", json!({"users": {"@a:x": 1.5}})),
            ("m.room.power_levels", json!({"users": {"not a user": 100}})),
            ("m.room.power_levels", json!({"events": []})),
            ("m.room.power_levels", json!({"kick": 9_007_199_254_740_992_i64})),
            ("m.room.power_levels", json!({"users": {"@a:x": i64::MIN}})),
            ("m.room.member", json!({"membership": 1})),
            ("m.room.member", json!({})),
            ("m.room.member", json!({"membership": "dance"})),
            ("m.room.member", json!({"membership": "join", "displayname": 5})),
            ("m.room.join_rules", json!({"join_rule": ["public"]})),
            (
                "m.room.join_rules",
                json!({"join_rule": "restricted", "allow": "x"}),
            ),
            (
                "m.room.history_visibility",
                json!({"history_visibility": "everyone"}),
            ),
            ("m.room.name", json!({"name": 7})),
            ("m.room.canonical_alias", json!({"alias": "nope"})),
            ("m.room.canonical_alias", json!({"alt_aliases": "#a:x"})),
            ("m.room.server_acl", json!({"allow": [1]})),
        ];
        for (kind, content) in bad_ones {
            let result = checked(kind, content.clone(), &v11);
            assert!(
                matches!(result, Err(Error::BadJson(_))),
                "{kind} {content}: {result:?}"
            );
        }
        let good_ones = [
            (
                "m.room.power_levels",
                json!({"ban": 50, "users": {"@a:x": 100}, "events": {"m.room.name": 50}}),
            ),
            (
                "m.room.member",
                json!({"membership": "join", "displayname": null}),
            ),
            ("m.room.join_rules", json!({"join_rule": "public"})),
            (
                "m.room.canonical_alias",
                json!({"alias": null, "alt_aliases": ["#a:x"]}),
            ),
            ("m.room.message", json!({"body": 5})),
            ("com.example.custom", json!({"membership": 5})),
        ];
        for (kind, content) in good_ones {
            assert!(checked(kind, content.clone(), &v11).is_ok(), "{kind} {content}");
        }
        assert!(
            checked("m.room.power_levels", json!({"ban": "50"}), &RoomVersionRules::V9).is_ok(),
            "room version 9 still takes levels in strings"
        );
        assert!(
            checked(
                "m.room.power_levels",
                json!({"ban": "-9223372036854775808"}),
                &RoomVersionRules::V9
            )
            .is_err(),
            "nor the smallest i64 in a string"
        );
    }
}
