//! Push: what each member's push rules said about each event, how far they have read, unread
//! counts, and pushers with their place in the actions.

use sqlx::{AssertSqlSafe, ColumnIndex, Decode, Row, Type};

use crate::{EventRow, Pools, Result, Store, prefixed_event_columns, rows};

/// One event's push actions for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushAction {
    pub user_id: String,
    pub room_id: String,
    pub stream_pos: i64,
    pub event_id: String,
    /// `main` or the thread root's event ID.
    pub thread_id: String,
    pub notify: bool,
    pub highlight: bool,
    /// The actions as JSON text.
    pub actions: String,
}

/// A read position: `thread_id` '' means every thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPosition {
    pub user_id: String,
    pub room_id: String,
    pub thread_id: String,
    pub stream_pos: i64,
}

/// Unread notifications of one thread of one room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadCount {
    pub room_id: String,
    pub thread_id: String,
    pub notifications: i64,
    pub highlights: i64,
}

/// A stored pusher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusherRow {
    pub id: i64,
    pub user_id: String,
    pub device_id: String,
    pub kind: String,
    pub app_id: String,
    pub pushkey: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    /// JSON text.
    pub data: String,
    pub created_ts: i64,
    pub sent_pos: i64,
    pub failing_since: Option<i64>,
}

const PUSHER_COLUMNS: &str = "id, user_id, device_id, kind, app_id, pushkey, app_display_name,
     device_display_name, profile_tag, lang, data, created_ts, sent_pos, failing_since";

fn pusher_row<'r, R>(r: &'r R) -> Result<PusherRow>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(PusherRow {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        device_id: r.try_get(2)?,
        kind: r.try_get(3)?,
        app_id: r.try_get(4)?,
        pushkey: r.try_get(5)?,
        app_display_name: r.try_get(6)?,
        device_display_name: r.try_get(7)?,
        profile_tag: r.try_get(8)?,
        lang: r.try_get(9)?,
        data: r.try_get(10)?,
        created_ts: r.try_get(11)?,
        sent_pos: r.try_get(12)?,
        failing_since: r.try_get(13)?,
    })
}

const ACTION_COLUMNS: &str =
    "a.user_id, a.room_id, a.stream_pos, a.event_id, a.thread_id, a.notify, a.highlight, a.actions";

fn action_row<'r, R>(r: &'r R) -> Result<PushAction>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(PushAction {
        user_id: r.try_get(0)?,
        room_id: r.try_get(1)?,
        stream_pos: r.try_get(2)?,
        event_id: r.try_get(3)?,
        thread_id: r.try_get(4)?,
        notify: r.try_get(5)?,
        highlight: r.try_get(6)?,
        actions: r.try_get(7)?,
    })
}

/// Moves a read position forward only (receipts may arrive for older events).
const ADVANCE_READ_POSITION: &str =
    "INSERT INTO push_read_positions (user_id, room_id, thread_id, stream_pos) VALUES ($1, $2, $3, $4)
     ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET stream_pos =
         CASE WHEN push_read_positions.stream_pos > $4 THEN push_read_positions.stream_pos ELSE $4 END";

/// The position a push action of `a` counts from: the later of the room's read position for
/// every thread and for its own thread.
const READ_UP_TO: &str = "COALESCE((SELECT MAX(p.stream_pos) FROM push_read_positions p
      WHERE p.user_id = a.user_id AND p.room_id = a.room_id AND (p.thread_id = '' OR p.thread_id = a.thread_id)), 0)";

impl Store {
    /// Where the push-rule evaluator stopped; `None` before it ever ran.
    pub async fn push_progress(&self) -> Result<Option<i64>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT evaluated_pos FROM push_progress WHERE id = 1")
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Stores the push actions of evaluated events and the read positions their senders' own
    /// messages imply, and moves the evaluator to `evaluated_pos`, in one transaction.
    pub async fn record_push_actions(
        &self,
        actions: &[PushAction],
        read: &[ReadPosition],
        evaluated_pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read_pool| {
            let mut tx = write.begin().await?;
            for a in actions {
                sqlx::query(
                    "INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, thread_id, notify, highlight, actions)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (user_id, stream_pos) DO NOTHING",
                )
                .bind(&a.user_id)
                .bind(&a.room_id)
                .bind(a.stream_pos)
                .bind(&a.event_id)
                .bind(&a.thread_id)
                .bind(a.notify)
                .bind(a.highlight)
                .bind(&a.actions)
                .execute(&mut *tx)
                .await?;
            }
            for r in read {
                sqlx::query(ADVANCE_READ_POSITION)
                    .bind(&r.user_id)
                    .bind(&r.room_id)
                    .bind(&r.thread_id)
                    .bind(r.stream_pos)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO push_progress (id, evaluated_pos) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET evaluated_pos = $1",
            )
            .bind(evaluated_pos)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn advance_read_position(&self, position: &ReadPosition) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(ADVANCE_READ_POSITION)
                .bind(&position.user_id)
                .bind(&position.room_id)
                .bind(&position.thread_id)
                .bind(position.stream_pos)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Unread notification and highlight counts per room and thread, for the rooms that have
    /// any (evaluated up to `until`).
    pub async fn unread_counts(&self, user_id: &str, until: i64) -> Result<Vec<UnreadCount>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT a.room_id, a.thread_id,
                        SUM(CASE WHEN a.notify THEN 1 ELSE 0 END), SUM(CASE WHEN a.highlight THEN 1 ELSE 0 END)
                 FROM event_push_actions a
                 WHERE a.user_id = $1 AND a.stream_pos <= $2 AND a.stream_pos > {READ_UP_TO}
                 GROUP BY a.room_id, a.thread_id"
            )))
            .bind(user_id)
            .bind(until)
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(UnreadCount {
                        room_id: r.try_get(0)?,
                        thread_id: r.try_get(1)?,
                        notifications: r.try_get(2)?,
                        highlights: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    /// `/notifications`: the user's push actions before `before` (newest first), with their
    /// events and whether they were read.
    pub async fn notifications(
        &self,
        user_id: &str,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> Result<Vec<(PushAction, EventRow, bool)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {ACTION_COLUMNS}, a.stream_pos <= {READ_UP_TO}, {}
                 FROM event_push_actions a JOIN events e ON e.stream_pos = a.stream_pos
                 WHERE a.user_id = $1 AND a.stream_pos < $2 AND ($3 = FALSE OR a.highlight)
                 ORDER BY a.stream_pos DESC LIMIT $4",
                prefixed_event_columns("e")
            )))
            .bind(user_id)
            .bind(before)
            .bind(only_highlight)
            .bind(limit)
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| {
                    let action = action_row(r)?;
                    let is_read: bool = r.try_get(8)?;
                    let event = rows::event_from_row_at(r, 9)?;
                    Ok((action, event, is_read))
                })
                .collect()
        })
    }

    /// Notifying actions of a user after `after`, oldest first (what a pusher sends next).
    pub async fn pending_pushes(
        &self,
        user_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(PushAction, EventRow)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {ACTION_COLUMNS}, {}
                 FROM event_push_actions a JOIN events e ON e.stream_pos = a.stream_pos
                 WHERE a.user_id = $1 AND a.stream_pos > $2 AND a.notify
                 ORDER BY a.stream_pos LIMIT $3",
                prefixed_event_columns("e")
            )))
            .bind(user_id)
            .bind(after)
            .bind(limit)
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| Ok((action_row(r)?, rows::event_from_row_at(r, 8)?)))
                .collect()
        })
    }

    // ---- pushers ------------------------------------------------------------------------------

    /// Adds or replaces the user's pusher for `(app_id, pushkey)`. Unless `append`, the same
    /// pushkey of the same app is removed from every other user (it is one device). A replaced
    /// pusher keeps its place in the actions. Returns the pusher.
    pub async fn set_pusher(&self, pusher: &PusherRow, append: bool) -> Result<PusherRow> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            if !append {
                sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
                    .bind(&pusher.app_id)
                    .bind(&pusher.pushkey)
                    .bind(&pusher.user_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO pushers (user_id, device_id, kind, app_id, pushkey, app_display_name,
                     device_display_name, profile_tag, lang, data, created_ts, sent_pos)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET device_id = $2, kind = $3,
                     app_display_name = $6, device_display_name = $7, profile_tag = $8, lang = $9,
                     data = $10, failing_since = NULL
                 RETURNING {PUSHER_COLUMNS}"
            )))
            .bind(&pusher.user_id)
            .bind(&pusher.device_id)
            .bind(&pusher.kind)
            .bind(&pusher.app_id)
            .bind(&pusher.pushkey)
            .bind(&pusher.app_display_name)
            .bind(&pusher.device_display_name)
            .bind(&pusher.profile_tag)
            .bind(&pusher.lang)
            .bind(&pusher.data)
            .bind(pusher.created_ts)
            .bind(pusher.sent_pos)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            pusher_row(&row)
        })
    }

    /// Deletes pushers by `(app_id, pushkey)`, of one user or (`user_id` None) of everyone.
    /// Returns their IDs.
    pub async fn delete_pushers(
        &self,
        user_id: Option<&str>,
        app_id: &str,
        pushkey: &str,
    ) -> Result<Vec<i64>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND ($3 = '' OR user_id = $3) RETURNING id",
            )
            .bind(app_id)
            .bind(pushkey)
            .bind(user_id.unwrap_or(""))
            .fetch_all(write)
            .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Pushers of a user, or (`user_id` None) all of them.
    pub async fn pushers(&self, user_id: Option<&str>) -> Result<Vec<PusherRow>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {PUSHER_COLUMNS} FROM pushers WHERE $1 = '' OR user_id = $1 ORDER BY id"
            )))
            .bind(user_id.unwrap_or(""))
            .fetch_all(read)
            .await?;
            rows.iter().map(pusher_row).collect()
        })
    }

    pub async fn pusher(&self, id: i64) -> Result<Option<PusherRow>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {PUSHER_COLUMNS} FROM pushers WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(read)
            .await?;
            row.as_ref().map(pusher_row).transpose()
        })
    }

    /// Records a pusher's progress: what it sent, and since when its gateway fails (`None`: it
    /// answers). `false` if the pusher is gone.
    pub async fn pusher_progress(&self, id: i64, sent_pos: i64, failing_since: Option<i64>) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query("UPDATE pushers SET sent_pos = $2, failing_since = $3 WHERE id = $1")
                .bind(id)
                .bind(sent_pos)
                .bind(failing_since)
                .execute(write)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Rooms in which the user has unread notifications (a pusher's badge).
    pub async fn rooms_with_unread(&self, user_id: &str) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT COUNT(DISTINCT a.room_id) FROM event_push_actions a
                 WHERE a.user_id = $1 AND a.notify AND a.stream_pos > {READ_UP_TO}"
            )))
            .bind(user_id)
            .fetch_one(read)
            .await?;
            Ok(row.get(0))
        })
    }
}
