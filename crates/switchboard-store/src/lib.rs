//! Persistent storage for Switchboard.
//!
//! [`Store`] is the only place SQL lives. Its methods are named for what the homeserver does
//! (`append_event`, `current_state`, …), so the layers above never see a database. It runs on
//! SQLite (embedded default) or PostgreSQL. Every query is written once, with `$N` placeholders and
//! SQL both engines speak; `on_db!` runs it on whichever engine the store has. What differs is
//! kept to connecting (`open`), the twin migration folders (`migrate`) and where event-stream
//! positions come from ([`Store::reserve_stream_positions`]).

mod migrate;
mod open;
pub mod port;
mod rows;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use sqlx::{AssertSqlSafe, Row, postgres::PgPool, sqlite::SqlitePool};

pub use backup::{BackedUpKey, BackupVersion};
pub use edus::{OutboundEdu, QueuedEdu, RemoteDevice};
pub use federation::StoredServerKey;
pub use migrate::SCHEMA_VERSION;
pub use open::{DatabaseSettings, PostgresSettings};
pub use push::{PushAction, PusherRow, ReadPosition, UnreadCount};
pub use rows::{
    AsPosition, EventRow, NewEvent, NewSnapshot, NewUser, QueuedToDevice, StateRow, StoredTxn, UserRow,
};
pub use sliding::BUMP_EVENT_TYPES;

/// A storage failure. The homeserver maps all of these to `500 M_UNKNOWN`; the details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot open database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    /// The database answered but cannot be used as it is (wrong encoding, someone else's tables).
    #[error("database {database}: {reason}")]
    Unusable { database: String, reason: String },
    #[error(
        "database schema version {found} is newer than this binary supports ({supported}); \
         run a newer Switchboard"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A write that did not finish in time (a lock held elsewhere, a connection gone silent).
    #[error("the database did not finish a write within {0:?}")]
    TimedOut(std::time::Duration),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The database engine a [`Store`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pools: Pools,
}

#[derive(Clone, Debug)]
enum Pools {
    Sqlite {
        /// The one connection that writes. SQLite allows one writer at a time, and a second
        /// connection waiting for the lock sleeps in SQLite's busy handler (up to 100 ms a try);
        /// queueing writers here in async code instead keeps write latency flat under load.
        write: SqlitePool,
        /// Read-only connections; WAL lets them read while the writer commits.
        read: SqlitePool,
    },
    /// PostgreSQL handles concurrent writers itself: one pool serves reads and writes.
    Postgres(PgPool),
}

/// Runs `$body` once per engine, with `$write`/`$read` bound to that engine's pools and `ops`
/// to its transaction helpers. Every query is written once and type-checked against both
/// drivers; this macro and the migrations are the only places the engines differ.
macro_rules! on_db {
    ($store:expr, |$write:ident, $read:ident| $body:expr) => {
        match &$store.pools {
            Pools::Sqlite { write, read } => {
                #[allow(unused_imports)]
                use crate::sqlite_ops as ops;
                #[allow(unused_variables)]
                let ($write, $read) = (write, read);
                $body
            }
            Pools::Postgres(pool) => {
                #[allow(unused_imports)]
                use crate::postgres_ops as ops;
                #[allow(unused_variables)]
                let ($write, $read) = (pool, pool);
                $body
            }
        }
    };
}

/// Statements more than one method runs (inside their own transactions).
const UPSERT_DEVICE_KEYS: &str = "INSERT INTO device_keys (user_id, device_id, keys) VALUES ($1, $2, $3)
     ON CONFLICT (user_id, device_id) DO UPDATE SET keys = $3";
const UPSERT_CROSS_SIGNING_KEY: &str =
    "INSERT INTO cross_signing_keys (user_id, key_type, keys) VALUES ($1, $2, $3)
     ON CONFLICT (user_id, key_type) DO UPDATE SET keys = $3";
const RECORD_DEVICE_LIST_CHANGE: &str =
    "INSERT INTO device_list_changes (user_id, stream_pos, device_id) VALUES ($1, $2, $3)";

/// What belongs to a device and goes with it: its keys, queued messages and pushers (a new
/// device with the same ID must not inherit them, and a phone logged out is not woken any more).
const DEVICE_TABLES: [&str; 5] = [
    "device_keys",
    "one_time_keys",
    "fallback_keys",
    "to_device",
    "pushers",
];

const EVENT_COLUMNS: &str =
    "stream_pos, event_id, room_id, sender, type, state_key, pdu, unsigned, txn_device, txn_id, relay";

impl Store {
    /// Opens the database the settings name and applies migrations.
    pub async fn open(settings: &DatabaseSettings) -> Result<Self> {
        let pools = match settings {
            DatabaseSettings::Sqlite(path) => {
                let (write, read) = open::sqlite(path).await?;
                Pools::Sqlite { write, read }
            }
            DatabaseSettings::Postgres(pg) => Pools::Postgres(open::postgres(pg).await?),
        };
        Ok(Self { pools })
    }

    /// Opens (creating if needed) an embedded SQLite database and applies migrations.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        Self::open(&DatabaseSettings::Sqlite(path.to_owned())).await
    }

    pub fn engine(&self) -> Engine {
        match self.pools {
            Pools::Sqlite { .. } => Engine::Sqlite,
            Pools::Postgres(_) => Engine::Postgres,
        }
    }

    /// Closes all connections, waiting for running queries to finish.
    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { write, read } => {
                write.close().await;
                read.close().await;
            }
            Pools::Postgres(pool) => pool.close().await,
        }
    }

    /// Reserves `count` new event-stream positions, ascending. On PostgreSQL they come from a
    /// sequence, so concurrent writers (tasks now, processes later) never share one and a
    /// position is never handed out twice, even when its transaction fails. SQLite has one
    /// writer per file, which counts in memory instead (`None`).
    pub async fn reserve_stream_positions(&self, count: i64) -> Result<Option<Vec<i64>>> {
        match &self.pools {
            Pools::Sqlite { .. } => Ok(None),
            Pools::Postgres(pool) => {
                let rows = sqlx::query("SELECT nextval('events_stream_pos') FROM generate_series(1, $1)")
                    .bind(count)
                    .fetch_all(pool)
                    .await?;
                Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
            }
        }
    }

    // ---- accounts --------------------------------------------------------------------------

    /// Creates a user; returns `false` if the ID is taken.
    pub async fn create_user(&self, user: &NewUser<'_>) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query(
                "INSERT INTO users (user_id, password_hash, is_admin, appservice_id, created_ts)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(user.user_id)
            .bind(user.password_hash)
            .bind(user.is_admin)
            .bind(user.appservice_id)
            .bind(user.created_ts)
            .execute(write)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Sets or clears a user's server-admin flag; `false` if there is no such user.
    pub async fn set_admin(&self, user_id: &str, admin: bool) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query("UPDATE users SET is_admin = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(admin)
                .execute(write)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Marks a user deactivated and clears their profile; their devices go separately
    /// (`delete_all_devices`).
    pub async fn set_deactivated(&self, user_id: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "UPDATE users SET deactivated = TRUE, password_hash = NULL, displayname = NULL, avatar_url = NULL
                 WHERE user_id = $1",
            )
            .bind(user_id)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<UserRow>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT user_id, password_hash, is_admin, appservice_id, displayname, avatar_url, deactivated
                 FROM users WHERE user_id = $1",
            )
            .bind(user_id)
            .fetch_optional(read)
            .await?;
            row.map(|r| rows::user_from_row(&r)).transpose()
        })
    }

    /// Creates the device if it does not exist and attaches a new access token to it.
    pub async fn add_device_token(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &str,
        now: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query(
                "INSERT INTO devices (user_id, device_id, display_name, created_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET user_id = excluded.user_id",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(display_name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            // The no-op update above locks the device row on PostgreSQL, so two logins with one
            // device_id take turns here. A login with an existing device_id replaces that device's
            // old session, as in Synapse.
            sqlx::query("DELETE FROM access_tokens WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(user_id)
            .bind(device_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Looks up the `(user_id, device_id)` an access token belongs to.
    pub async fn session_by_token(&self, token_hash: &str) -> Result<Option<(String, String)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT user_id, device_id FROM access_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Logs out one device: its token and the device itself go.
    pub async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query("DELETE FROM access_tokens WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            for table in DEVICE_TABLES {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE user_id = $1 AND device_id = $2"
                )))
                .bind(user_id)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Logs out every device of a user; returns the token hashes that were removed.
    pub async fn delete_all_devices(&self, user_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let hashes = sqlx::query("DELETE FROM access_tokens WHERE user_id = $1 RETURNING token_hash")
                .bind(user_id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            sqlx::query("DELETE FROM devices WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            for table in DEVICE_TABLES {
                sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE user_id = $1")))
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(hashes)
        })
    }

    // ---- rooms and events ------------------------------------------------------------------

    pub async fn room_version(&self, room_id: &str) -> Result<Option<String>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT room_version FROM rooms WHERE room_id = $1")
                .bind(room_id)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Highest stream position in use (0 for an empty database).
    pub async fn max_stream_pos(&self) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT COALESCE(MAX(stream_pos), 0) FROM events")
                .fetch_one(read)
                .await?;
            Ok(row.get(0))
        })
    }

    /// Appends accepted events: the event rows, the room row (for a create event), the current
    /// state changes and the client's transaction ID, all in one database transaction, so a crash
    /// leaves either all of it or none.
    pub async fn append_events(&self, events: &[&NewEvent]) -> Result<()> {
        match &self.pools {
            Pools::Sqlite { write, .. } => {
                let mut tx = write.begin().await?;
                sqlite_ops::append_in(&mut tx, events).await?;
                tx.commit().await?;
                Ok(())
            }
            Pools::Postgres(pool) => {
                // Bounded: a lock an operator holds or a connection gone silent must not stall
                // every send forever. Past the deadline it is the lost-answer case: before the
                // transaction ID is known the commit was never sent; after, the server decides.
                let mut xid = None;
                let write = async {
                    let mut tx = pool.begin().await?;
                    postgres_ops::append_in(&mut tx, events).await?;
                    let id: String = sqlx::query("SELECT pg_current_xact_id()::TEXT")
                        .fetch_one(&mut *tx)
                        .await?
                        .get(0);
                    xid = Some(id);
                    tx.commit().await.map_err(StoreError::from)
                };
                let outcome = tokio::time::timeout(WRITE_TIMEOUT, write).await;
                match (outcome, xid) {
                    (Ok(Ok(())), _) => Ok(()),
                    (Ok(Err(e)), Some(xid)) => settle_commit(pool, &xid, e).await,
                    (Ok(Err(e)), None) => Err(e),
                    (Err(_), Some(xid)) => {
                        settle_commit(pool, &xid, StoreError::TimedOut(WRITE_TIMEOUT)).await
                    }
                    (Err(_), None) => {
                        tracing::error!(
                            "an event write waited over {WRITE_TIMEOUT:?} for the database; given up"
                        );
                        Err(StoreError::TimedOut(WRITE_TIMEOUT))
                    }
                }
            }
        }
    }

    /// The event a client transaction produced, if the transaction was seen before.
    pub async fn txn_event(
        &self,
        user_id: &str,
        device_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT event_id FROM event_txns
                 WHERE user_id = $1 AND device_id = $2 AND room_id = $3 AND event_type = $4 AND txn_id = $5",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(room_id)
            .bind(event_type)
            .bind(txn_id)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Whether any client transaction of the device is stored.
    pub async fn device_has_txns(&self, user_id: &str, device_id: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT 1 FROM event_txns WHERE user_id = $1 AND device_id = $2 LIMIT 1")
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(read)
                .await?;
            Ok(row.is_some())
        })
    }

    pub async fn event(&self, event_id: &str) -> Result<Option<EventRow>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"
            )))
            .bind(event_id)
            .fetch_optional(read)
            .await?;
            row.map(|r| rows::event_from_row(&r)).transpose()
        })
    }

    /// The forward extremities of a room (events no other event names in `prev_events`) with
    /// their depths.
    pub async fn room_extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT e.event_id, e.depth FROM events e WHERE e.room_id = $1 AND e.stream_pos > 0 AND NOT EXISTS
                   (SELECT 1 FROM event_edges x WHERE x.room_id = $1 AND x.prev_event_id = e.event_id)
                 ORDER BY e.stream_pos",
            )
            .bind(room_id)
            .fetch_all(read)
            .await?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Whether a stored event names `event_id` among its `prev_events` (it arrived late).
    pub async fn has_successors(&self, room_id: &str, event_id: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let row =
                sqlx::query("SELECT 1 FROM event_edges WHERE room_id = $1 AND prev_event_id = $2 LIMIT 1")
                    .bind(room_id)
                    .bind(event_id)
                    .fetch_optional(read)
                    .await?;
            Ok(row.is_some())
        })
    }

    /// The newest event of a room and its depth.
    pub async fn room_head(&self, room_id: &str) -> Result<Option<(String, i64)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT event_id, depth FROM events WHERE room_id = $1 ORDER BY stream_pos DESC LIMIT 1",
            )
            .bind(room_id)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Current state events of a room.
    pub async fn current_state(&self, room_id: &str) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {} FROM current_state c JOIN events e ON e.event_id = c.event_id
                 WHERE c.room_id = $1 ORDER BY e.stream_pos",
                prefixed_event_columns("e")
            )))
            .bind(room_id)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// State of a room as it was right after the event at `pos`: history is linear on a single
    /// server, so that is the last state event of each `(type, state_key)` at or before `pos`.
    pub async fn state_at(&self, room_id: &str, pos: i64) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {} FROM events e
                 JOIN (SELECT MAX(stream_pos) AS p FROM events
                       WHERE room_id = $1 AND state_key IS NOT NULL AND stream_pos <= $2
                       GROUP BY type, state_key) latest ON e.stream_pos = latest.p
                 ORDER BY e.stream_pos",
                prefixed_event_columns("e")
            )))
            .bind(room_id)
            .bind(pos)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// One state event as of stream position `pos`.
    pub async fn state_event_at(
        &self,
        room_id: &str,
        kind: &str,
        state_key: &str,
        pos: i64,
    ) -> Result<Option<EventRow>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE room_id = $1 AND type = $2 AND state_key = $3 AND stream_pos <= $4
                 ORDER BY stream_pos DESC LIMIT 1"
            )))
            .bind(room_id)
            .bind(kind)
            .bind(state_key)
            .bind(pos)
            .fetch_optional(read)
            .await?;
            row.map(|r| rows::event_from_row(&r)).transpose()
        })
    }

    /// Events of a room with `after < stream_pos <= until`, oldest first, at most `limit`
    /// (the newest ones when `newest` is set).
    pub async fn room_events(
        &self,
        room_id: &str,
        after: i64,
        until: i64,
        limit: i64,
        newest: bool,
    ) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let order = if newest { "DESC" } else { "ASC" };
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE room_id = $1 AND stream_pos > $2 AND stream_pos <= $3 AND NOT outlier
                 ORDER BY stream_pos {order} LIMIT $4"
            )))
            .bind(room_id)
            .bind(after)
            .bind(until)
            .bind(limit)
            .fetch_all(read)
            .await?;
            let mut events: Vec<EventRow> = rows.iter().map(rows::event_from_row).collect::<Result<_>>()?;
            if newest {
                events.reverse();
            }
            Ok(events)
        })
    }

    /// Events of a room in topological order — by `(depth, stream_pos)` — strictly after `from`
    /// (before it, `backward`) and strictly before `to` (after it), with `stream_pos <= until`,
    /// at most `limit`, in the order of the walk. Outliers aside.
    pub async fn room_events_topo(
        &self,
        room_id: &str,
        from: (i64, i64),
        to: (i64, i64),
        until: i64,
        limit: i64,
        backward: bool,
    ) -> Result<Vec<EventRow>> {
        let (walk, order) = if backward {
            (
                "(depth < $2 OR (depth = $2 AND stream_pos < $3)) AND (depth > $4 OR (depth = $4 AND stream_pos > $5))",
                "DESC",
            )
        } else {
            (
                "(depth > $2 OR (depth = $2 AND stream_pos > $3)) AND (depth < $4 OR (depth = $4 AND stream_pos < $5))",
                "ASC",
            )
        };
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE room_id = $1 AND {walk} AND stream_pos <= $6 AND NOT outlier
                 ORDER BY depth {order}, stream_pos {order} LIMIT $7"
            )))
            .bind(room_id)
            .bind(from.0)
            .bind(from.1)
            .bind(to.0)
            .bind(to.1)
            .bind(until)
            .bind(limit)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// The topological position `(depth, stream_pos)` standing for stream position `pos` in a
    /// room: the greatest depth among its events up to `pos`, with `pos`.
    pub async fn topological_position(&self, room_id: &str, pos: i64) -> Result<(i64, i64)> {
        on_db!(self, |write, read| {
            let depth: Option<i64> = sqlx::query(
                "SELECT MAX(depth) FROM events WHERE room_id = $1 AND stream_pos <= $2 AND NOT outlier",
            )
            .bind(room_id)
            .bind(pos)
            .fetch_one(read)
            .await?
            .get(0);
            Ok((depth.unwrap_or(i64::MIN), pos))
        })
    }

    /// The rooms a user has a current membership in, with that membership and its stream position.
    pub async fn user_memberships(&self, user_id: &str) -> Result<Vec<(String, String, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT room_id, membership, stream_pos FROM current_state
                 WHERE type = 'm.room.member' AND state_key = $1",
            )
            .bind(user_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    /// Membership events of the timelines with `after < stream_pos <= until`, in order:
    /// `(room_id, user_id, pdu)`.
    pub async fn membership_events_between(
        &self,
        after: i64,
        until: i64,
    ) -> Result<Vec<(String, String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT room_id, state_key, pdu FROM events
                 WHERE type = 'm.room.member' AND stream_pos > $1 AND stream_pos <= $2 AND outlier = FALSE
                 ORDER BY stream_pos",
            )
            .bind(after)
            .bind(until)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    /// The user's membership events in one room, oldest first: the windows of history they may see.
    pub async fn membership_history(&self, room_id: &str, user_id: &str) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE room_id = $1 AND type = 'm.room.member' AND state_key = $2 ORDER BY stream_pos"
            )))
            .bind(room_id)
            .bind(user_id)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// Events relating to `event_id` (optionally of one `rel_type` and event type) with
    /// `after < stream_pos <= until`, at most `limit`, newest first when `newest`.
    #[allow(clippy::too_many_arguments)]
    pub async fn relations(
        &self,
        room_id: &str,
        event_id: &str,
        rel_type: Option<&str>,
        kind: Option<&str>,
        after: i64,
        until: i64,
        limit: i64,
        newest: bool,
    ) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let order = if newest { "DESC" } else { "ASC" };
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE relates_to = $1 AND room_id = $2 AND ($3 IS NULL OR rel_type = $3) AND ($4 IS NULL OR type = $4)
                   AND stream_pos > $5 AND stream_pos <= $6
                 ORDER BY stream_pos {order} LIMIT $7"
            )))
            .bind(event_id)
            .bind(room_id)
            .bind(rel_type)
            .bind(kind)
            .bind(after)
            .bind(until)
            .bind(limit)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// Rooms that have any event with `after < stream_pos <= until`.
    pub async fn rooms_with_events(&self, after: i64, until: i64) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows =
                sqlx::query("SELECT DISTINCT room_id FROM events WHERE stream_pos > $1 AND stream_pos <= $2")
                    .bind(after)
                    .bind(until)
                    .fetch_all(read)
                    .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub async fn forget_room(&self, user_id: &str, room_id: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO forgotten_rooms (user_id, room_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(user_id)
            .bind(room_id)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    pub async fn forgotten_rooms(&self, user_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT room_id FROM forgotten_rooms WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(read)
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    // ---- application services --------------------------------------------------------------

    /// The delivery state of a service — how far along both streams it is, and its last txn ID —
    /// created at `start` (now, for a new service: it gets what happens from its registration
    /// on, not the server's whole history).
    pub async fn appservice_state(&self, as_id: &str, start: AsPosition) -> Result<(AsPosition, i64)> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO appservice_state (as_id, last_pos, last_aux) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(as_id)
            .bind(start.events)
            .bind(start.aux)
            .execute(write)
            .await?;
            let row =
                sqlx::query("SELECT last_pos, last_aux, last_txn_id FROM appservice_state WHERE as_id = $1")
                    .bind(as_id)
                    .fetch_one(write)
                    .await?;
            Ok((
                AsPosition {
                    events: row.get(0),
                    aux: row.get(1),
                },
                row.get(2),
            ))
        })
    }

    /// Records that everything up to `pos` was considered and none was for the service.
    /// Moves services' positions forward (never back), all in one transaction.
    pub async fn appservice_skip_to(&self, positions: &[(String, AsPosition)]) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            for (as_id, pos) in positions {
                ops::advance_in(&mut tx, as_id, *pos).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Stores a new in-flight transaction with the next txn ID, before its first send.
    pub async fn appservice_new_txn(
        &self,
        as_id: &str,
        upto: AsPosition,
        event_count: i64,
        body: &str,
    ) -> Result<i64> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let txn_id = ops::new_txn_in(&mut tx, as_id, upto, event_count, body).await?;
            tx.commit().await?;
            Ok(txn_id)
        })
    }

    /// The in-flight transaction of a service.
    pub async fn appservice_pending_txn(&self, as_id: &str) -> Result<Option<StoredTxn>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT txn_id, last_pos, last_aux, event_count, body FROM appservice_txns WHERE as_id = $1",
            )
            .bind(as_id)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| StoredTxn {
                txn_id: r.get(0),
                upto: AsPosition {
                    events: r.get(1),
                    aux: r.get(2),
                },
                event_count: r.get(3),
                body: r.get(4),
            }))
        })
    }

    /// Acknowledges a delivered transaction and, in the same database transaction (one fsync),
    /// records what comes next: `skip_to` a later position, or a new transaction to send.
    /// Returns the new transaction's ID.
    pub async fn appservice_ack_and_continue(
        &self,
        as_id: &str,
        acked_txn_id: i64,
        skip_to: Option<AsPosition>,
        next: Option<(AsPosition, i64, &str)>,
    ) -> Result<Option<i64>> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let row = sqlx::query(
                "DELETE FROM appservice_txns WHERE as_id = $1 AND txn_id = $2 RETURNING last_pos, last_aux",
            )
            .bind(as_id)
            .bind(acked_txn_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                ops::advance_in(
                    &mut tx,
                    as_id,
                    AsPosition {
                        events: row.get(0),
                        aux: row.get(1),
                    },
                )
                .await?;
            }
            if let Some(pos) = skip_to {
                ops::advance_in(&mut tx, as_id, pos).await?;
            }
            let mut new_txn = None;
            if let Some((upto, event_count, body)) = next {
                new_txn = Some(ops::new_txn_in(&mut tx, as_id, upto, event_count, body).await?);
            }
            tx.commit().await?;
            Ok(new_txn)
        })
    }

    /// Events with `after < stream_pos <= until`, oldest first, at most `limit`, across all rooms.
    /// The events at these stream positions, in stream order.
    pub async fn events_at(&self, positions: &[i64]) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let mut rows = Vec::with_capacity(positions.len());
            for chunk in positions.chunks(INSERT_CHUNK) {
                let mut select = sqlx::QueryBuilder::new(format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE stream_pos IN ("
                ));
                let mut list = select.separated(", ");
                for pos in chunk {
                    list.push_bind(*pos);
                }
                select.push(") ORDER BY stream_pos");
                for row in select.build().fetch_all(read).await? {
                    rows.push(rows::event_from_row(&row)?);
                }
            }
            Ok(rows)
        })
    }

    pub async fn events_after(&self, after: i64, until: i64, limit: i64) -> Result<Vec<EventRow>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_pos > $1 AND stream_pos <= $2
                 ORDER BY stream_pos LIMIT $3"
            )))
            .bind(after)
            .bind(until)
            .bind(limit)
            .fetch_all(read)
            .await?;
            rows.iter().map(rows::event_from_row).collect()
        })
    }

    /// Joined members of a room with the given server part (local members).
    pub async fn joined_members(&self, room_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT state_key FROM current_state WHERE room_id = $1 AND type = 'm.room.member' AND membership = 'join'",
            )
            .bind(room_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Whether the user has a device with this ID.
    pub async fn device_exists(&self, user_id: &str, device_id: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(read)
                .await?;
            Ok(row.is_some())
        })
    }

    /// Replaces a stored event's PDU with its redacted form and records what redacted it.
    pub async fn redact_event(&self, event_id: &str, redacted_pdu: &str, unsigned: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query("UPDATE events SET pdu = $2, unsigned = $3 WHERE event_id = $1")
                .bind(event_id)
                .bind(redacted_pdu)
                .bind(unsigned)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Publishes a room in the directory (under an application service's instance, or '').
    pub async fn publish_room(&self, room_id: &str, instance: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO room_directory (room_id, instance) VALUES ($1, $2)
                 ON CONFLICT (room_id) DO UPDATE SET instance = $2",
            )
            .bind(room_id)
            .bind(instance)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    pub async fn unpublish_room(&self, room_id: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query("DELETE FROM room_directory WHERE room_id = $1")
                .bind(room_id)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// The directory instance a room is published under, if it is published.
    pub async fn room_publication(&self, room_id: &str) -> Result<Option<String>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT instance FROM room_directory WHERE room_id = $1")
                .bind(room_id)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// `(room_id, instance)` of every published room.
    pub async fn published_rooms(&self) -> Result<Vec<(String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT room_id, instance FROM room_directory ORDER BY room_id")
                .fetch_all(read)
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    // ---- end-to-end encryption -----------------------------------------------------------------

    pub async fn set_device_keys(&self, user_id: &str, device_id: &str, keys: &str, pos: i64) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query(UPSERT_DEVICE_KEYS)
                .bind(user_id)
                .bind(device_id)
                .bind(keys)
                .execute(&mut *tx)
                .await?;
            sqlx::query(RECORD_DEVICE_LIST_CHANGE)
                .bind(user_id)
                .bind(pos)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// `(device_id, keys)` of a user's devices that uploaded keys (of a local user, only devices
    /// that still exist; of another server's user, the kept list).
    pub async fn device_keys(&self, user_id: &str) -> Result<Vec<(String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT k.device_id, k.keys FROM device_keys k WHERE k.user_id = $1
                 AND (EXISTS (SELECT 1 FROM devices d WHERE d.user_id = k.user_id AND d.device_id = k.device_id)
                      OR EXISTS (SELECT 1 FROM remote_device_lists r WHERE r.user_id = k.user_id))",
            )
            .bind(user_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    pub async fn add_one_time_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
        key_id: &str,
        key: &str,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(algorithm)
            .bind(key_id)
            .bind(key)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    pub async fn set_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
        key_id: &str,
        key: &str,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key, used) VALUES ($1, $2, $3, $4, $5, FALSE)
                 ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET key_id = $4, key = $5, used = FALSE",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(algorithm)
            .bind(key_id)
            .bind(key)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// Unclaimed one-time keys per algorithm.
    pub async fn one_time_key_counts(&self, user_id: &str, device_id: &str) -> Result<Vec<(String, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
            )
            .bind(user_id)
            .bind(device_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// The IDs of a device's unclaimed one-time keys (an upload repeating one adds nothing).
    pub async fn one_time_key_ids(&self, user_id: &str, device_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT key_id FROM one_time_keys WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .fetch_all(write)
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub async fn unused_fallback_algorithms(&self, user_id: &str, device_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND used = FALSE",
            )
            .bind(user_id)
            .bind(device_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Takes one one-time key (or, when none is left, the fallback key): `(key_id, key)`.
    pub async fn claim_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<(String, String)>> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let mut row = None;
            for _ in 0..CLAIM_ATTEMPTS {
                row = sqlx::query(
                    "DELETE FROM one_time_keys
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                       AND key_id = (SELECT key_id FROM one_time_keys
                                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                                     ORDER BY key_id LIMIT 1)
                     RETURNING key_id, key",
                )
                .bind(user_id)
                .bind(device_id)
                .bind(algorithm)
                .fetch_optional(&mut *tx)
                .await?;
                // On PostgreSQL a concurrent claim may have taken the key this one picked; if
                // keys are left, pick again rather than hand out the fallback key.
                let left = row.is_none()
                    && sqlx::query(
                        "SELECT 1 FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 LIMIT 1",
                    )
                    .bind(user_id)
                    .bind(device_id)
                    .bind(algorithm)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if !left {
                    break;
                }
            }
            let claimed = match row {
                Some(row) => Some((row.get(0), row.get(1))),
                None => sqlx::query(
                    "UPDATE fallback_keys SET used = TRUE WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                     RETURNING key_id, key",
                )
                .bind(user_id)
                .bind(device_id)
                .bind(algorithm)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| (row.get(0), row.get(1))),
            };
            tx.commit().await?;
            Ok(claimed)
        })
    }

    pub async fn set_cross_signing_key(&self, user_id: &str, key_type: &str, keys: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(UPSERT_CROSS_SIGNING_KEY)
                .bind(user_id)
                .bind(key_type)
                .bind(keys)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// `(key_type, keys)` of a user's cross-signing keys.
    pub async fn cross_signing_keys(&self, user_id: &str) -> Result<Vec<(String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT key_type, keys FROM cross_signing_keys WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(read)
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Replaces a device's uploaded keys (signatures added), without recording a change.
    pub async fn update_device_keys(&self, user_id: &str, device_id: &str, keys: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query("UPDATE device_keys SET keys = $3 WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .bind(keys)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Users whose device lists changed with `after < stream_pos <= until`.
    pub async fn device_list_changes(&self, after: i64, until: i64) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT DISTINCT user_id FROM device_list_changes WHERE stream_pos > $1 AND stream_pos <= $2",
            )
            .bind(after)
            .bind(until)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Records a change of `user_id`'s device list: of one device, or (`None`) of the user's
    /// cross-signing keys.
    pub async fn record_device_list_change(
        &self,
        user_id: &str,
        device_id: Option<&str>,
        pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(RECORD_DEVICE_LIST_CHANGE)
                .bind(user_id)
                .bind(pos)
                .bind(device_id)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Whether `sender`'s device already sent to-device transaction `txn_id`.
    pub async fn to_device_txn_seen(&self, sender: &str, device_id: &str, txn_id: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            Ok(sqlx::query(
                "SELECT 1 FROM to_device_txns WHERE sender = $1 AND device_id = $2 AND txn_id = $3",
            )
            .bind(sender)
            .bind(device_id)
            .bind(txn_id)
            .fetch_optional(write)
            .await?
            .is_some())
        })
    }

    /// Queues to-device messages `(user, device, type, content)` from `sender`, once per txn.
    /// Returns `false` (and stores nothing) for a repeated transaction.
    pub async fn queue_to_device(
        &self,
        sender: (&str, &str, &str),
        messages: &[(String, String, String, String)],
        pos: i64,
    ) -> Result<bool> {
        on_db!(self, |write, read| {
            let (sender_id, sender_device, txn_id) = sender;
            let mut tx = write.begin().await?;
            let fresh = sqlx::query(
                "INSERT INTO to_device_txns (sender, device_id, txn_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(sender_id)
            .bind(sender_device)
            .bind(txn_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if fresh {
                for (user, device, kind, content) in messages {
                    sqlx::query(
                        "INSERT INTO to_device (stream_pos, user_id, device_id, sender, type, content)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(pos)
                    .bind(user)
                    .bind(device)
                    .bind(sender_id)
                    .bind(kind)
                    .bind(content)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(fresh)
        })
    }

    /// To-device messages for a device with `stream_pos <= until`, oldest first:
    /// `(sender, type, content)`. Messages at or before `ack` were received and are deleted first.
    pub async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        ack: i64,
        until: i64,
    ) -> Result<Vec<(String, String, String)>> {
        on_db!(self, |write, read| {
            sqlx::query("DELETE FROM to_device WHERE user_id = $1 AND device_id = $2 AND stream_pos <= $3")
                .bind(user_id)
                .bind(device_id)
                .bind(ack)
                .execute(write)
                .await?;
            let rows = sqlx::query(
                "SELECT sender, type, content FROM to_device WHERE user_id = $1 AND device_id = $2 AND stream_pos <= $3
                 ORDER BY stream_pos",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(until)
            .fetch_all(write)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    /// To-device messages queued in `(after, until]` for any device, oldest first, at most about
    /// `limit`: what application services' senders pick their users' messages from. Returns the
    /// messages and the position they cover: a position is never split, so a message sent to many
    /// devices at once is read whole.
    pub async fn to_device_between(
        &self,
        after: i64,
        until: i64,
        limit: i64,
    ) -> Result<(Vec<QueuedToDevice>, i64)> {
        on_db!(self, |write, read| {
            let mut rows = sqlx::query(
                "SELECT stream_pos, user_id, device_id, sender, type, content FROM to_device
                 WHERE stream_pos > $1 AND stream_pos <= $2 ORDER BY stream_pos LIMIT $3",
            )
            .bind(after)
            .bind(until)
            .bind(limit)
            .fetch_all(read)
            .await?
            .iter()
            .map(rows::to_device_from_row)
            .collect::<Result<Vec<_>>>()?;
            if (rows.len() as i64) < limit {
                return Ok((rows, until));
            }
            let (first, last) = (rows[0].pos, rows[rows.len() - 1].pos);
            if first < last {
                // The last position may continue beyond the limit: leave it for the next read.
                rows.retain(|m| m.pos < last);
                return Ok((rows, last - 1));
            }
            // One position holds more than the limit: read all of it.
            let rows = sqlx::query(
                "SELECT stream_pos, user_id, device_id, sender, type, content FROM to_device
                 WHERE stream_pos = $1",
            )
            .bind(last)
            .fetch_all(read)
            .await?
            .iter()
            .map(rows::to_device_from_row)
            .collect::<Result<Vec<_>>>()?;
            Ok((rows, last))
        })
    }

    // ---- media ----------------------------------------------------------------------------------

    pub async fn create_media(&self, media_id: &str, uploader: &str, now: i64) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query("INSERT INTO media (media_id, uploader, created_ts) VALUES ($1, $2, $3)")
                .bind(media_id)
                .bind(uploader)
                .bind(now)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Marks media as uploaded; `false` if it already was (content never changes once set).
    pub async fn finish_media(
        &self,
        media_id: &str,
        content_type: Option<&str>,
        filename: Option<&str>,
        size: i64,
    ) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query(
                "UPDATE media SET content_type = $2, filename = $3, size = $4, uploaded = TRUE WHERE media_id = $1 AND uploaded = FALSE",
            )
            .bind(media_id)
            .bind(content_type)
            .bind(filename)
            .bind(size)
            .execute(write)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// `(uploader, content_type, filename, uploaded)` of a media ID.
    pub async fn media(
        &self,
        media_id: &str,
    ) -> Result<Option<(String, Option<String>, Option<String>, bool)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT uploader, content_type, filename, uploaded FROM media WHERE media_id = $1",
            )
            .bind(media_id)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
        })
    }

    // ---- profiles, devices, account data ------------------------------------------------------

    pub async fn set_profile(
        &self,
        user_id: &str,
        displayname: Option<Option<&str>>,
        avatar_url: Option<Option<&str>>,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            if let Some(name) = displayname {
                sqlx::query("UPDATE users SET displayname = $2 WHERE user_id = $1")
                    .bind(user_id)
                    .bind(name)
                    .execute(write)
                    .await?;
            }
            if let Some(url) = avatar_url {
                sqlx::query("UPDATE users SET avatar_url = $2 WHERE user_id = $1")
                    .bind(user_id)
                    .bind(url)
                    .execute(write)
                    .await?;
            }
            Ok(())
        })
    }

    /// `(device_id, display_name, created_ts)` of a user's devices.
    pub async fn devices(&self, user_id: &str) -> Result<Vec<(String, Option<String>, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT device_id, display_name, created_ts FROM devices WHERE user_id = $1 ORDER BY device_id",
            )
            .bind(user_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    /// Creates the device if missing and sets its display name if given.
    pub async fn upsert_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        now: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO devices (user_id, device_id, display_name, created_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET display_name = COALESCE($3, devices.display_name)",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(display_name)
            .bind(now)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// Highest position of the auxiliary stream in use.
    pub async fn max_aux_pos(&self) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT COALESCE(MAX(p), 0) FROM (
                   SELECT MAX(stream_pos) AS p FROM account_data
                   UNION ALL SELECT MAX(stream_pos) FROM receipts
                   UNION ALL SELECT MAX(stream_pos) FROM device_list_changes
                   UNION ALL SELECT MAX(stream_pos) FROM to_device) positions",
            )
            .fetch_one(read)
            .await?;
            Ok(row.get(0))
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn set_receipt(
        &self,
        room_id: &str,
        receipt_type: &str,
        user_id: &str,
        thread_id: &str,
        event_id: &str,
        ts: i64,
        pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, ts, stream_pos)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (room_id, receipt_type, user_id, thread_id)
                 DO UPDATE SET event_id = $5, ts = $6, stream_pos = $7",
            )
            .bind(room_id)
            .bind(receipt_type)
            .bind(user_id)
            .bind(thread_id)
            .bind(event_id)
            .bind(ts)
            .bind(pos)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// The receipts of these rooms, in the shape of [`Store::receipt_changes`].
    pub async fn room_receipts(
        &self,
        rooms: &[String],
    ) -> Result<Vec<(String, String, String, String, String, i64, i64)>> {
        let mut all = Vec::new();
        for chunk in rooms.chunks(500) {
            let placeholders = (1..=chunk.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT room_id, receipt_type, user_id, thread_id, event_id, ts, stream_pos FROM receipts
                 WHERE room_id IN ({placeholders}) ORDER BY stream_pos"
            );
            on_db!(self, |write, read| {
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for room in chunk {
                    query = query.bind(room);
                }
                for r in query.fetch_all(read).await? {
                    all.push((
                        r.try_get(0)?,
                        r.try_get(1)?,
                        r.try_get(2)?,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        r.try_get(5)?,
                        r.try_get(6)?,
                    ));
                }
            });
        }
        Ok(all)
    }

    /// Receipts changed with `after < stream_pos <= until`:
    /// `(room_id, receipt_type, user_id, thread_id, event_id, ts, stream_pos)`.
    pub async fn receipt_changes(
        &self,
        after: i64,
        until: i64,
    ) -> Result<Vec<(String, String, String, String, String, i64, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT room_id, receipt_type, user_id, thread_id, event_id, ts, stream_pos FROM receipts
                 WHERE stream_pos > $1 AND stream_pos <= $2 ORDER BY stream_pos",
            )
            .bind(after)
            .bind(until)
            .fetch_all(read)
            .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                    )
                })
                .collect())
        })
    }

    pub async fn set_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        kind: &str,
        content: &str,
        pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO account_data (user_id, room_id, type, content, stream_pos) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, room_id, type) DO UPDATE SET content = $4, stream_pos = $5",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(kind)
            .bind(content)
            .bind(pos)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    pub async fn account_data(&self, user_id: &str, room_id: &str, kind: &str) -> Result<Option<String>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND type = $3",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(kind)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// `(room_id, type, content)` changed with `after < stream_pos <= until` ('' room = global).
    pub async fn account_data_changes(
        &self,
        user_id: &str,
        after: i64,
        until: i64,
    ) -> Result<Vec<(String, String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT room_id, type, content FROM account_data
                 WHERE user_id = $1 AND stream_pos > $2 AND stream_pos <= $3 ORDER BY stream_pos",
            )
            .bind(user_id)
            .bind(after)
            .bind(until)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    // ---- aliases ---------------------------------------------------------------------------

    /// Creates an alias; returns `false` if it already exists.
    pub async fn create_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query(
                "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3)
                 ON CONFLICT (alias) DO NOTHING",
            )
            .bind(alias)
            .bind(room_id)
            .bind(creator)
            .execute(write)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// `(room_id, creator)` of an alias.
    pub async fn alias(&self, alias: &str) -> Result<Option<(String, String)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT room_id, creator FROM room_aliases WHERE alias = $1")
                .bind(alias)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    pub async fn delete_alias(&self, alias: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query("DELETE FROM room_aliases WHERE alias = $1")
                .bind(alias)
                .execute(write)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    pub async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
                .bind(room_id)
                .fetch_all(read)
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    // ---- filters ---------------------------------------------------------------------------

    /// Stores a sync filter and returns its new ID (per user, counting from 0).
    pub async fn create_filter(&self, user_id: &str, filter: &str) -> Result<i64> {
        on_db!(self, |write, read| {
            // Two concurrent creations may compute the same next ID (PostgreSQL); the loser
            // inserts nothing and tries the next one.
            loop {
                let row = sqlx::query(
                    "INSERT INTO filters (user_id, filter_id, filter)
                     VALUES ($1, (SELECT COALESCE(MAX(filter_id) + 1, 0) FROM filters WHERE user_id = $1), $2)
                     ON CONFLICT DO NOTHING
                     RETURNING filter_id",
                )
                .bind(user_id)
                .bind(filter)
                .fetch_optional(write)
                .await?;
                if let Some(row) = row {
                    return Ok(row.get(0));
                }
            }
        })
    }

    pub async fn filter(&self, user_id: &str, filter_id: i64) -> Result<Option<String>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT filter FROM filters WHERE user_id = $1 AND filter_id = $2")
                .bind(user_id)
                .bind(filter_id)
                .fetch_optional(write)
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }
}

/// How long an event write may take on PostgreSQL before it is given up (and settled).
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a PostgreSQL commit whose answer was lost is waited for.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A commit whose answer was lost (the connection dropped) may still land: the server decides,
/// perhaps after an fsync or a synchronous replica. Asks it until the transaction is settled, so
/// the caller never gives up positions that turn out stored.
async fn settle_commit(pool: &PgPool, xid: &str, error: StoreError) -> Result<()> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let status: Option<String> = sqlx::query("SELECT pg_xact_status($1::xid8)::TEXT")
            .bind(xid)
            .fetch_one(pool)
            .await
            .ok()
            .and_then(|r| r.try_get(0).ok());
        match status.as_deref() {
            Some("committed") => {
                tracing::warn!(%error, "a commit reported an error but landed; carrying on");
                return Ok(());
            }
            Some("aborted") => return Err(error),
            _ if tokio::time::Instant::now() >= deadline => {
                tracing::error!(%error, xid, "the outcome of a commit is still unknown; treating it as failed");
                return Err(error);
            }
            // In progress, or the server is not reachable yet.
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Tries of a one-time-key claim that lost its key to a concurrent claim.
const CLAIM_ATTEMPTS: usize = 64;

/// Rows per multi-row `INSERT`: one statement per table for a whole group keeps the per-statement
/// overhead (a round trip to the connection's thread) out of the hot path, and stays far below
/// both engines' bound-parameter limits.
const INSERT_CHUNK: usize = 256;

/// Helpers that run inside a caller's transaction, once per engine (see `on_db!`).
macro_rules! transaction_ops {
    ($module:ident, $db:ty) => {
        pub(crate) mod $module {
            use sqlx::Row;

            use crate::{AsPosition, INSERT_CHUNK, NewEvent, Result};

            /// Stores a group of events in stream order: rooms they create, the events, current state,
            /// client transaction IDs.
            pub(crate) async fn append_in(tx: &mut sqlx::Transaction<'_, $db>, events: &[&NewEvent]) -> Result<()> {
                for event in events {
                    if let Some(version) = &event.creates_room_version {
                        sqlx::query(
                            "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(event.room_id.as_str())
                        .bind(version.as_str())
                        .bind(event.sender.as_str())
                        .bind(event.origin_server_ts)
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                for chunk in events.chunks(INSERT_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO events (stream_pos, event_id, room_id, sender, type, state_key, depth, pdu,
                                             unsigned, txn_device, txn_id, relates_to, rel_type, relay) ",
                    );
                    insert.push_values(chunk, |mut row, event| {
                        row.push_bind(event.stream_pos)
                            .push_bind(event.event_id.as_str())
                            .push_bind(event.room_id.as_str())
                            .push_bind(event.sender.as_str())
                            .push_bind(event.kind.as_str())
                            .push_bind(event.state_key.as_deref())
                            .push_bind(event.depth)
                            .push_bind(event.pdu.as_str())
                            .push_bind(event.unsigned.as_deref())
                            .push_bind(event.txn.as_ref().map(|t| t.1.as_str()))
                            .push_bind(event.txn.as_ref().map(|t| t.2.as_str()))
                            .push_bind(event.relates_to.as_ref().map(|r| r.0.as_str()))
                            .push_bind(event.relates_to.as_ref().map(|r| r.1.as_str()))
                            .push_bind(event.relay);
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                for event in events {
                    for snapshot in &event.snapshots {
                        sqlx::query(
                            "INSERT INTO state_snapshots (snapshot_id, room_id, parent_id, chain, delta)
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(snapshot.snapshot_id)
                        .bind(snapshot.room_id.as_str())
                        .bind(snapshot.parent_id)
                        .bind(snapshot.chain)
                        .bind(snapshot.delta.as_str())
                        .execute(&mut **tx)
                        .await?;
                    }
                    if let Some(snapshot_id) = event.state_after {
                        sqlx::query("INSERT INTO event_state (event_id, snapshot_id) VALUES ($1, $2)")
                            .bind(event.event_id.as_str())
                            .bind(snapshot_id)
                            .execute(&mut **tx)
                            .await?;
                    }
                    // A state resolution's outcome: the rows it names, whatever the event's own key.
                    let Some(rows) = &event.current_state else {
                        continue;
                    };
                    for row in rows {
                        sqlx::query(
                            "INSERT INTO current_state (room_id, type, state_key, event_id, stream_pos, membership)
                                 SELECT $1, $2, $3, $4, stream_pos, $5 FROM events WHERE event_id = $4
                                 ON CONFLICT (room_id, type, state_key)
                                 DO UPDATE SET event_id = excluded.event_id, stream_pos = excluded.stream_pos,
                                               membership = excluded.membership",
                        )
                        .bind(event.room_id.as_str())
                        .bind(row.kind.as_str())
                        .bind(row.state_key.as_str())
                        .bind(row.event_id.as_str())
                        .bind(row.membership.as_deref())
                        .execute(&mut **tx)
                        .await?;
                        if row.membership.is_some() {
                            sqlx::query("DELETE FROM forgotten_rooms WHERE user_id = $1 AND room_id = $2")
                                .bind(row.state_key.as_str())
                                .bind(event.room_id.as_str())
                                .execute(&mut **tx)
                                .await?;
                        }
                    }
                }
                // In order: a later event of the group replaces an earlier one's state.
                for event in events.iter().filter(|e| e.current_state.is_none()) {
                    let Some(state_key) = &event.state_key else {
                        continue;
                    };
                    sqlx::query(
                        "INSERT INTO current_state (room_id, type, state_key, event_id, stream_pos, membership)
                             VALUES ($1, $2, $3, $4, $5, $6)
                             ON CONFLICT (room_id, type, state_key)
                             DO UPDATE SET event_id = $4, stream_pos = $5, membership = $6",
                    )
                    .bind(event.room_id.as_str())
                    .bind(event.kind.as_str())
                    .bind(state_key.as_str())
                    .bind(event.event_id.as_str())
                    .bind(event.stream_pos)
                    .bind(event.membership.as_deref())
                    .execute(&mut **tx)
                    .await?;
                    if event.membership.is_some() {
                        sqlx::query("DELETE FROM forgotten_rooms WHERE user_id = $1 AND room_id = $2")
                            .bind(state_key.as_str())
                            .bind(event.room_id.as_str())
                            .execute(&mut **tx)
                            .await?;
                    }
                }
                let edges: Vec<_> = events
                    .iter()
                    .flat_map(|e| e.prev_events.iter().map(move |prev| (*e, prev)))
                    .collect();
                for chunk in edges.chunks(INSERT_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::new("INSERT INTO event_edges (room_id, event_id, prev_event_id) ");
                    insert.push_values(chunk, |mut row, (event, prev)| {
                        row.push_bind(event.room_id.as_str())
                            .push_bind(event.event_id.as_str())
                            .push_bind(prev.as_str());
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    insert.build().execute(&mut **tx).await?;
                }
                let with_txn: Vec<_> = events
                    .iter()
                    .filter_map(|e| e.txn.as_ref().map(|t| (e, t)))
                    .collect();
                for chunk in with_txn.chunks(INSERT_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO event_txns (user_id, device_id, room_id, event_type, txn_id, event_id) ",
                    );
                    insert.push_values(chunk, |mut row, (event, (user_id, device_id, txn_id))| {
                        row.push_bind(user_id.as_str())
                            .push_bind(device_id.as_str())
                            .push_bind(event.room_id.as_str())
                            .push_bind(event.kind.as_str())
                            .push_bind(txn_id.as_str())
                            .push_bind(event.event_id.as_str());
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                Ok(())
            }

            pub(crate) async fn advance_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                as_id: &str,
                pos: AsPosition,
            ) -> Result<()> {
                sqlx::query(
                    "UPDATE appservice_state
                     SET last_pos = CASE WHEN last_pos < $2 THEN $2 ELSE last_pos END,
                         last_aux = CASE WHEN last_aux < $3 THEN $3 ELSE last_aux END
                     WHERE as_id = $1",
                )
                .bind(as_id)
                .bind(pos.events)
                .bind(pos.aux)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            pub(crate) async fn new_txn_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                as_id: &str,
                upto: AsPosition,
                event_count: i64,
                body: &str,
            ) -> Result<i64> {
                let txn_id: i64 = sqlx::query(
                    "UPDATE appservice_state SET last_txn_id = last_txn_id + 1 WHERE as_id = $1 RETURNING last_txn_id",
                )
                .bind(as_id)
                .fetch_one(&mut **tx)
                .await?
                .get(0);
                sqlx::query(
                    "INSERT INTO appservice_txns (as_id, txn_id, last_pos, last_aux, event_count, body)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(as_id)
                .bind(txn_id)
                .bind(upto.events)
                .bind(upto.aux)
                .bind(event_count)
                .bind(body)
                .execute(&mut **tx)
                .await?;
                Ok(txn_id)
            }
        }
    };
}
transaction_ops!(sqlite_ops, sqlx::Sqlite);
transaction_ops!(postgres_ops, sqlx::Postgres);

fn prefixed_event_columns(prefix: &str) -> String {
    EVENT_COLUMNS
        .split(", ")
        .map(|c| format!("{prefix}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// After the macros, which they use.
mod backup;
mod edus;
mod federation;
mod push;
mod sliding;

#[cfg(test)]
mod tests;
