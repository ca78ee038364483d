//! What sliding sync needs to list a user's rooms without loading them: membership, the latest
//! event that moves a room up the list, its type and whether it is encrypted, in one query.

use sqlx::Row;

use crate::{Pools, Result, Store};

/// Event types that move a room up a sliding-sync list (Synapse's defaults): what a person
/// would call activity, not receipts, reactions or state changes.
pub const BUMP_EVENT_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];

/// One of a user's rooms, as sliding sync lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedRoom {
    pub room_id: String,
    pub membership: String,
    /// The stream position of the user's membership event.
    pub membership_pos: i64,
    /// The stream position of the room's latest bump event up to the asked position.
    pub bump_pos: Option<i64>,
    /// The create event's JSON (for `content.type`), when the room has one here.
    pub create_pdu: Option<String>,
    pub encrypted: bool,
}

impl Store {
    /// Every room the user has a membership in, with what sorting and filtering need.
    pub async fn listed_rooms(&self, user_id: &str, until: i64) -> Result<Vec<ListedRoom>> {
        let types = BUMP_EVENT_TYPES
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT m.room_id, m.membership, m.stream_pos,
                 (SELECT MAX(e.stream_pos) FROM events e WHERE e.room_id = m.room_id AND e.type IN ({types})
                    AND e.stream_pos > 0 AND e.stream_pos <= $2 AND NOT e.outlier),
                 (SELECT c.pdu FROM current_state s JOIN events c ON c.event_id = s.event_id
                    WHERE s.room_id = m.room_id AND s.type = 'm.room.create' AND s.state_key = ''),
                 EXISTS (SELECT 1 FROM current_state s
                    WHERE s.room_id = m.room_id AND s.type = 'm.room.encryption' AND s.state_key = '')
             FROM current_state m WHERE m.type = 'm.room.member' AND m.state_key = $1"
        );
        on_db!(self, |write, read| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(user_id)
                .bind(until)
                .fetch_all(read)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListedRoom {
                        room_id: r.try_get(0)?,
                        membership: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                        membership_pos: r.try_get(2)?,
                        bump_pos: r.try_get(3)?,
                        create_pdu: r.try_get(4)?,
                        encrypted: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }
}
