//! Plain row types passed across the storage interface.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{Result, StoreError};

pub struct NewUser<'a> {
    pub user_id: &'a str,
    pub password_hash: Option<&'a str>,
    pub is_admin: bool,
    pub appservice_id: Option<&'a str>,
    pub created_ts: i64,
}

#[derive(Clone, Debug)]
pub struct UserRow {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub appservice_id: Option<String>,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub deactivated: bool,
}

/// An accepted event ready to be appended to the stream. Owned, so it can travel to the writer
/// task that commits many events per database transaction.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// Assigned by the writer.
    pub stream_pos: i64,
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub depth: i64,
    pub origin_server_ts: i64,
    /// The signed PDU as canonical JSON (without `event_id`, as room versions ≥ 3 define it).
    pub pdu: String,
    /// Server-computed `unsigned` data fixed at write time (`prev_content`, `replaces_state`).
    pub unsigned: Option<String>,
    /// `(user_id, device_id, txn_id)` of the client request that produced the event.
    pub txn: Option<(String, String, String)>,
    /// `membership` of an `m.room.member` event, copied into current state.
    pub membership: Option<String>,
    /// Set on the `m.room.create` event: the room row is written in the same transaction.
    pub creates_room_version: Option<String>,
    /// `(event_id, rel_type)` of `content.m.relates_to`, for `/relations`.
    pub relates_to: Option<(String, String)>,
    /// The event's `prev_events`: edges of the room DAG.
    pub prev_events: Vec<String>,
    /// The snapshot of the state after the event.
    pub state_after: Option<i64>,
    /// New snapshots to write with the event.
    pub snapshots: Vec<NewSnapshot>,
    /// When set, the current state rows to write instead of the event's own key (a state
    /// resolution may change several keys, or keep the event out of the current state).
    pub current_state: Option<Vec<StateRow>>,
    /// Another server's member event taken through `send_join`/`send_leave`, which this server
    /// sends on to the room's other servers.
    pub relay: bool,
}

/// A state snapshot: its parent's state plus `delta`.
#[derive(Clone, Debug)]
pub struct NewSnapshot {
    pub snapshot_id: i64,
    pub room_id: String,
    pub parent_id: Option<i64>,
    pub chain: i64,
    /// JSON object "<type>\u{1f}<state_key>" → event ID.
    pub delta: String,
}

/// One current-state entry.
#[derive(Clone, Debug)]
pub struct StateRow {
    pub kind: String,
    pub state_key: String,
    pub event_id: String,
    pub membership: Option<String>,
}

#[derive(Clone, Debug)]
pub struct EventRow {
    pub stream_pos: i64,
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub pdu: String,
    pub unsigned: Option<String>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
    /// Another server's event this server sends on to the room's servers.
    pub relay: bool,
}

/// Decodes a row of [`EVENT_COLUMNS`](crate::EVENT_COLUMNS) from either engine.
pub(crate) fn event_from_row<'r, R>(r: &'r R) -> Result<EventRow>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    event_from_row_at(r, 0)
}

/// Decodes [`EVENT_COLUMNS`](crate::EVENT_COLUMNS) starting at column `at` (after other columns).
pub(crate) fn event_from_row_at<'r, R>(r: &'r R, at: usize) -> Result<EventRow>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(EventRow {
        stream_pos: r.try_get(at)?,
        event_id: r.try_get(at + 1)?,
        room_id: r.try_get(at + 2)?,
        sender: r.try_get(at + 3)?,
        kind: r.try_get(at + 4)?,
        state_key: r.try_get(at + 5)?,
        pdu: r.try_get(at + 6)?,
        unsigned: r.try_get(at + 7)?,
        txn_device: r.try_get(at + 8)?,
        txn_id: r.try_get(at + 9)?,
        relay: r.try_get(at + 10)?,
    })
}

pub(crate) fn user_from_row<'r, R>(r: &'r R) -> Result<UserRow>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let user_id: String = r.try_get(0)?;
    if user_id.is_empty() {
        return Err(StoreError::Corrupt("user row with empty user_id".into()));
    }
    Ok(UserRow {
        user_id,
        password_hash: r.try_get(1)?,
        is_admin: r.try_get(2)?,
        appservice_id: r.try_get(3)?,
        displayname: r.try_get(4)?,
        avatar_url: r.try_get(5)?,
        deactivated: r.try_get(6)?,
    })
}

/// How far along the event stream and the auxiliary stream an application service is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsPosition {
    pub events: i64,
    pub aux: i64,
}

/// A stored application-service transaction, sent (again) byte for byte.
#[derive(Clone, Debug)]
pub struct StoredTxn {
    pub txn_id: i64,
    pub upto: AsPosition,
    pub event_count: i64,
    pub body: String,
}

/// A to-device message waiting for a device, with its place in the auxiliary stream.
#[derive(Clone, Debug)]
pub struct QueuedToDevice {
    pub pos: i64,
    pub user_id: String,
    pub device_id: String,
    pub sender: String,
    pub kind: String,
    /// The content as the sender gave it (JSON text).
    pub content: String,
}

pub(crate) fn to_device_from_row<'r, R>(r: &'r R) -> Result<QueuedToDevice>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(QueuedToDevice {
        pos: r.try_get(0)?,
        user_id: r.try_get(1)?,
        device_id: r.try_get(2)?,
        sender: r.try_get(3)?,
        kind: r.try_get(4)?,
        content: r.try_get(5)?,
    })
}
