//! Event filters (`POST /user/{userId}/filter`, `filter=` on `/sync` and `/messages`).

use serde::{Deserialize, Serialize};

use crate::pdu::Pdu;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Filter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_fields: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_format: Option<String>,
    pub presence: EventFilter,
    pub account_data: EventFilter,
    pub room: RoomFilter,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct EventFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_senders: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_types: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub senders: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RoomFilter {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_rooms: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    pub include_leave: bool,
    pub ephemeral: RoomEventFilter,
    pub state: RoomEventFilter,
    pub timeline: RoomEventFilter,
    pub account_data: RoomEventFilter,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RoomEventFilter {
    #[serde(flatten)]
    pub events: EventFilter,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_rooms: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains_url: Option<bool>,
    /// Thread counts apart (`unread_thread_notifications`) rather than in the room's.
    pub unread_thread_notifications: bool,
}

/// Matches an event type against a filter pattern; `*` matches any run of characters.
/// Greedy with one backtrack point: O(len(pattern) × len(kind)) at worst, never exponential.
fn type_matches(pattern: &str, kind: &str) -> bool {
    let (p, k) = (pattern.as_bytes(), kind.as_bytes());
    let (mut pi, mut ki) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && p[pi] == k[ki] {
            pi += 1;
            ki += 1;
        } else if let Some((star_pi, star_ki)) = star {
            pi = star_pi + 1;
            ki = star_ki + 1;
            star = Some((star_pi, star_ki + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl EventFilter {
    pub fn matches(&self, kind: &str, sender: &str) -> bool {
        if self.not_types.iter().any(|p| type_matches(p, kind))
            || self.not_senders.iter().any(|s| s == sender)
        {
            return false;
        }
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|p| type_matches(p, kind)))
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == sender))
    }
}

impl RoomEventFilter {
    pub fn matches(&self, pdu: &Pdu) -> bool {
        if !self.events.matches(&pdu.event_type, pdu.sender.as_str())
            || !self.room_allowed(pdu.room_id.as_str())
        {
            return false;
        }
        match self.contains_url {
            Some(want) => want == pdu.content_value().get("url").is_some(),
            None => true,
        }
    }

    pub fn room_allowed(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self.rooms.as_ref().is_none_or(|r| r.iter().any(|r| r == room_id))
    }
}

impl RoomFilter {
    pub fn room_allowed(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self.rooms.as_ref().is_none_or(|r| r.iter().any(|r| r == room_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns_match_star_across_any_characters() {
        assert!(type_matches("m.room.*", "m.room.message"));
        assert!(type_matches("*", "anything"));
        assert!(type_matches("m.*.member", "m.room.member"));
        assert!(!type_matches("m.room.*", "m.call.invite"));
        assert!(!type_matches("m.room.message", "m.room.messages"));
        assert!(type_matches("m.*.*", "m.room.member"));
        assert!(!type_matches("m.*.x", "m.room.member"));
        assert!(type_matches("**", ""));
    }

    #[test]
    fn adversarial_patterns_stay_fast() {
        let kind = "a".repeat(255);
        let started = std::time::Instant::now();
        assert!(!type_matches("*a*a*a*a*a*a*a*a*b", &kind));
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
    }

    #[test]
    fn event_filters_apply_types_then_not_types_and_not_senders() {
        let f: EventFilter = serde_json::from_value(serde_json::json!({
            "types": ["m.room.*"], "not_types": ["m.room.member"], "not_senders": ["@spam:x"]
        }))
        .expect("filter");
        assert!(f.matches("m.room.message", "@a:x"));
        assert!(!f.matches("m.room.member", "@a:x"));
        assert!(!f.matches("m.room.message", "@spam:x"));
        assert!(!f.matches("org.custom", "@a:x"));
    }

    #[test]
    fn room_event_filter_reads_flattened_fields() {
        let f: RoomEventFilter = serde_json::from_value(
            serde_json::json!({"limit": 3, "lazy_load_members": true, "senders": ["@a:x"]}),
        )
        .expect("filter");
        assert_eq!(f.events.limit, Some(3));
        assert!(f.lazy_load_members);
        assert!(f.events.matches("m.room.message", "@a:x"));
        assert!(!f.events.matches("m.room.message", "@b:x"));
    }
}
