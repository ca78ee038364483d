//! The stored form of an event (a PDU) and its client-facing serialisation.

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UInt, UserId,
    events::TimelineEventType, room_version_rules::RoomVersionRules,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchboard_store::EventRow;

use crate::{Error, Result};

/// A room version this server can create and serve, with its rules.
#[derive(Clone, Debug)]
pub struct RoomVersion {
    pub id: RoomVersionId,
    pub rules: RoomVersionRules,
}

/// Versions this server creates rooms of (and upgrades to).
pub const STABLE_ROOM_VERSIONS: &[&str] = &["9", "10", "11"];

/// Versions this server takes part in when another server created the room: also 12, whose
/// room IDs are the hash of the create event (Synapse's default since 1.136).
pub const JOINABLE_ROOM_VERSIONS: &[&str] = &["9", "10", "11", "12"];

impl RoomVersion {
    /// A version this server creates rooms of.
    pub fn parse(version: &str) -> Result<Self> {
        if !STABLE_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(format!(
                "room version {version} is not supported; use one of {}",
                STABLE_ROOM_VERSIONS.join(", ")
            )));
        }
        Self::known(version)
    }

    /// A version this server can hold a room of, whoever created it.
    pub fn joinable(version: &str) -> Result<Self> {
        if !JOINABLE_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(format!(
                "room version {version} is not supported; this server takes part in {}",
                JOINABLE_ROOM_VERSIONS.join(", ")
            )));
        }
        Self::known(version)
    }

    fn known(version: &str) -> Result<Self> {
        let id =
            RoomVersionId::try_from(version).map_err(|e| Error::UnsupportedRoomVersion(e.to_string()))?;
        let rules = id.rules().ok_or_else(|| {
            Error::UnsupportedRoomVersion(format!("no rules known for room version {version}"))
        })?;
        Ok(Self { id, rules })
    }
}

/// The fields of a PDU the server reads; the full signed JSON is kept in `json`.
#[derive(Clone, Debug)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    /// The event carries no `room_id` (the create event of a version 12 room): `room_id` is
    /// derived from its ID, and the auth rules must see none.
    pub room_id_implied: bool,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// The type, parsed for comparisons. ruma maps some unstable names to their stable ones
    /// (`org.matrix.call.…` → `m.call.…`), so [`Pdu::event_type`] is what goes out.
    pub kind: TimelineEventType,
    /// The type exactly as the event has it.
    pub event_type: String,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: UInt,
    /// The signed PDU in canonical JSON, as hashed and stored.
    pub json: String,
    /// Position in the global stream; 0 until stored.
    pub stream_pos: i64,
    /// `unsigned` fields fixed when the event was stored (`prev_content`, `replaces_state`, …).
    pub unsigned: Option<Box<RawValue>>,
    /// `(device_id, txn_id)` of the request that sent it, echoed to that device only.
    pub txn: Option<(String, String)>,
}

#[derive(Deserialize)]
struct PduFields {
    /// Absent only from the create event of room version 12, whose ID names the room.
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: String,
    content: Box<RawValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    depth: UInt,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

#[derive(Deserialize)]
struct MembershipContent {
    membership: Option<String>,
}

impl Pdu {
    /// Reads the fields of a PDU from its JSON.
    pub fn from_json(event_id: OwnedEventId, json: String) -> Result<Self> {
        let fields: PduFields = serde_json::from_str(&json)
            .map_err(|e| Error::Internal(format!("malformed PDU {event_id}: {e}")))?;
        let kind = TimelineEventType::from(fields.kind.as_str());
        // Room version 11 moved `redacts` into the content; read either place.
        let redacts = match fields.redacts {
            Some(r) => Some(r),
            None if kind == TimelineEventType::RoomRedaction => {
                serde_json::from_str::<RedactsInContent>(fields.content.get())
                    .ok()
                    .and_then(|c| c.redacts)
            }
            None => None,
        };
        let (room_id, room_id_implied) = match fields.room_id {
            Some(room_id) => (room_id, false),
            None if kind == TimelineEventType::RoomCreate => {
                let derived = format!("!{}", event_id.as_str().trim_start_matches('$'));
                let room_id = OwnedRoomId::try_from(derived)
                    .map_err(|e| Error::Internal(format!("room ID of create event {event_id}: {e}")))?;
                (room_id, true)
            }
            None => return Err(Error::Internal(format!("PDU {event_id} has no room_id"))),
        };
        Ok(Self {
            room_id_implied,
            event_id,
            room_id,
            sender: fields.sender,
            origin_server_ts: fields.origin_server_ts,
            kind,
            event_type: fields.kind,
            content: fields.content,
            state_key: fields.state_key,
            prev_events: fields.prev_events,
            auth_events: fields.auth_events,
            redacts,
            depth: fields.depth,
            json,
            stream_pos: 0,
            unsigned: None,
            txn: None,
        })
    }

    pub fn from_row(row: EventRow) -> Result<Self> {
        let event_id = OwnedEventId::try_from(row.event_id.as_str())
            .map_err(|e| Error::Internal(format!("stored event ID {} is invalid: {e}", row.event_id)))?;
        let mut pdu = Self::from_json(event_id, row.pdu)?;
        pdu.stream_pos = row.stream_pos;
        pdu.unsigned = row.unsigned.and_then(|u| RawValue::from_string(u).ok());
        pdu.txn = row.txn_device.zip(row.txn_id);
        Ok(pdu)
    }

    /// `content.membership` of an `m.room.member` event.
    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        serde_json::from_str::<MembershipContent>(self.content.get())
            .ok()
            .and_then(|c| c.membership)
    }

    /// The PDU as servers exchange it: the signed JSON, unchanged.
    pub fn federation_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.json).unwrap_or_default()
    }

    pub fn content_value(&self) -> serde_json::Value {
        serde_json::from_str(self.content.get()).unwrap_or(serde_json::Value::Null)
    }

    /// The event in the client format of the Client-Server API. `viewer_device` gets its own
    /// `transaction_id` back, as the spec asks.
    pub fn to_client(&self, viewer: Option<(&UserId, &str)>) -> ClientEvent<'_> {
        let mut unsigned: serde_json::Map<String, serde_json::Value> = self
            .unsigned
            .as_ref()
            .and_then(|u| serde_json::from_str(u.get()).ok())
            .unwrap_or_default();
        let now = crate::util::now_ms();
        unsigned.insert(
            "age".to_owned(),
            now.saturating_sub(self.origin_server_ts.get().into()).into(),
        );
        if let (Some((user, device)), Some((txn_device, txn_id))) = (viewer, &self.txn)
            && user == self.sender
            && device == txn_device
        {
            unsigned.insert("transaction_id".to_owned(), txn_id.clone().into());
        }
        ClientEvent {
            content: &self.content,
            event_id: &self.event_id,
            origin_server_ts: self.origin_server_ts,
            room_id: &self.room_id,
            sender: &self.sender,
            kind: &self.event_type,
            state_key: self.state_key.as_deref(),
            redacts: self.redacts.as_ref(),
            unsigned,
        }
    }

    /// The stripped form used in `invite_state`.
    pub fn to_stripped(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.event_type,
            "state_key": self.state_key,
            "content": self.content,
            "sender": self.sender,
        })
    }
}

/// An event as the Client-Server API shows it.
#[derive(Serialize)]
pub struct ClientEvent<'a> {
    pub content: &'a RawValue,
    pub event_id: &'a OwnedEventId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub room_id: &'a OwnedRoomId,
    pub sender: &'a OwnedUserId,
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redacts: Option<&'a OwnedEventId>,
    pub unsigned: serde_json::Map<String, serde_json::Value>,
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        (!self.room_id_implied).then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        // Rejected events are never stored, so every Pdu we hold was accepted.
        false
    }
}
