//! What sliding sync reads to list a user's rooms without loading them: where each room's
//! latest "bump" event is, and a state event of every room of a user (for filters).

use sqlx::{AssertSqlSafe, Row};

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

fn bump_types() -> String {
    BUMP_EVENT_TYPES
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Each room's latest bump event with `after < stream_pos <= until` (timeline events only).
    pub async fn bump_positions(&self, after: i64, until: i64) -> Result<Vec<(String, i64)>> {
        let types = bump_types();
        let sql = format!(
            "SELECT room_id, MAX(stream_pos) FROM events
             WHERE stream_pos > $1 AND stream_pos <= $2 AND type IN ({types}) AND NOT outlier
             GROUP BY room_id"
        );
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(after.max(0))
                .bind(until)
                .fetch_all(read)
                .await?;
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
        })
    }

    /// The latest bump event up to `until` of each of these rooms (`None`: it has none).
    pub async fn latest_bumps(&self, rooms: &[String], until: i64) -> Result<Vec<(String, Option<i64>)>> {
        let types = bump_types();
        let mut found = Vec::with_capacity(rooms.len());
        for chunk in rooms.chunks(500) {
            let placeholders = (0..chunk.len())
                .map(|i| format!("(${})", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "WITH wanted (room_id) AS (VALUES {placeholders})
                 SELECT w.room_id, (SELECT MAX(e.stream_pos) FROM events e
                     WHERE e.room_id = w.room_id AND e.type IN ({types})
                     AND e.stream_pos > 0 AND e.stream_pos <= $1 AND NOT e.outlier)
                 FROM wanted w"
            );
            on_db!(self, |write, read| {
                let mut query = sqlx::query(AssertSqlSafe(sql)).bind(until);
                for room in chunk {
                    query = query.bind(room);
                }
                for r in query.fetch_all(read).await? {
                    found.push((r.try_get(0)?, r.try_get(1)?));
                }
            });
        }
        Ok(found)
    }

    /// The current `kind` state event (empty state key) of every room the user has a membership
    /// in that has one: `(room_id, pdu)`.
    pub async fn state_of_user_rooms(&self, user_id: &str, kind: &str) -> Result<Vec<(String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT m.room_id, e.pdu FROM current_state m
                 JOIN current_state s ON s.room_id = m.room_id AND s.type = $2 AND s.state_key = ''
                 JOIN events e ON e.event_id = s.event_id
                 WHERE m.type = 'm.room.member' AND m.state_key = $1",
            )
            .bind(user_id)
            .bind(kind)
            .fetch_all(read)
            .await?;
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
        })
    }
}
