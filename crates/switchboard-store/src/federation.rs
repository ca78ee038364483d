//! Tables of the Server-Server API: other servers' signing keys.

use sqlx::Row;

use crate::{NewEvent, Pools, Result, Store};

/// One signing key of another server, as last vouched for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredServerKey {
    pub key_id: String,
    /// Unpadded base64.
    pub verify_key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
}

impl Store {
    /// Every key known of `server_name`.
    pub async fn server_keys(&self, server_name: &str) -> Result<Vec<StoredServerKey>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT key_id, verify_key, valid_until_ts, expired_ts FROM server_keys WHERE server_name = $1",
            )
            .bind(server_name)
            .fetch_all(read)
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| StoredServerKey {
                    key_id: r.get(0),
                    verify_key: r.get(1),
                    valid_until_ts: r.get(2),
                    expired_ts: r.get(3),
                })
                .collect())
        })
    }

    /// Records a verified key response: its keys (a key's validity only ever grows, and a key
    /// once expired stays expired) and the response itself, for serving as a notary.
    pub async fn save_server_keys(
        &self,
        server_name: &str,
        keys: &[StoredServerKey],
        response: &str,
        valid_until_ts: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            for key in keys {
                sqlx::query(
                    "INSERT INTO server_keys (server_name, key_id, verify_key, valid_until_ts, expired_ts)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (server_name, key_id) DO UPDATE SET
                       verify_key = excluded.verify_key,
                       valid_until_ts = CASE WHEN excluded.valid_until_ts > server_keys.valid_until_ts
                                             THEN excluded.valid_until_ts ELSE server_keys.valid_until_ts END,
                       expired_ts = COALESCE(server_keys.expired_ts, excluded.expired_ts)",
                )
                .bind(server_name)
                .bind(&key.key_id)
                .bind(&key.verify_key)
                .bind(key.valid_until_ts)
                .bind(key.expired_ts)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO server_key_responses (server_name, response, valid_until_ts) VALUES ($1, $2, $3)
                 ON CONFLICT (server_name) DO UPDATE SET response = excluded.response,
                   valid_until_ts = excluded.valid_until_ts
                 WHERE excluded.valid_until_ts >= server_key_responses.valid_until_ts",
            )
            .bind(server_name)
            .bind(response)
            .bind(valid_until_ts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The newest key response of `server_name` and its `valid_until_ts`.
    pub async fn server_key_response(&self, server_name: &str) -> Result<Option<(String, i64)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT response, valid_until_ts FROM server_key_responses WHERE server_name = $1",
            )
            .bind(server_name)
            .fetch_optional(read)
            .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    // ---- outbound federation ------------------------------------------------------------------

    /// Every destination with its last sent stream position (`""` is the dispatcher's cursor).
    pub async fn federation_destinations(&self) -> Result<Vec<(String, i64)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query("SELECT destination, sent_pos FROM federation_destinations")
                .fetch_all(read)
                .await?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Adds a destination starting after `sent_pos`; an existing one keeps its position.
    pub async fn add_federation_destination(&self, destination: &str, sent_pos: i64) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO federation_destinations (destination, sent_pos) VALUES ($1, $2)
                 ON CONFLICT (destination) DO NOTHING",
            )
            .bind(destination)
            .bind(sent_pos)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// Records that everything up to `sent_pos` was sent (positions only move forward).
    pub async fn set_federation_sent(&self, destination: &str, sent_pos: i64) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "UPDATE federation_destinations SET sent_pos = $2 WHERE destination = $1 AND sent_pos < $2",
            )
            .bind(destination)
            .bind(sent_pos)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// A new transaction number for `destination`, never handed out before.
    pub async fn next_federation_txn(&self, destination: &str) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "UPDATE federation_destinations SET last_txn_id = last_txn_id + 1 WHERE destination = $1
                 RETURNING last_txn_id",
            )
            .bind(destination)
            .fetch_one(write)
            .await?;
            Ok(row.get(0))
        })
    }

    // ---- rooms joined over federation ---------------------------------------------------------

    /// Stores events of a known room outside its timeline (soft-failed events), like the
    /// outliers of [`Store::import_room`].
    pub async fn add_outliers(&self, room_id: &str, outliers: &[NewEvent]) -> Result<()> {
        // The room exists: its row is left as it is.
        self.import_room(room_id, "", "", 0, outliers, &[]).await
    }

    /// Two writers of negative positions must not take the same ones (SQLite has one writer
    /// anyway): a transaction-scoped lock on PostgreSQL.
    fn negative_positions_lock(&self) -> &'static str {
        match &self.pools {
            Pools::Postgres(_) => "SELECT pg_advisory_xact_lock(7011)",
            Pools::Sqlite { .. } => "SELECT 1",
        }
    }

    /// Stores history fetched from other servers (`events` oldest first) below everything
    /// stored: `/messages` pages through it, `/sync` never sees it. An event stored before (an
    /// outlier the join brought) stays as it is. Returns how many were new.
    pub async fn add_backfilled(&self, room_id: &str, events: &[NewEvent]) -> Result<usize> {
        let lock = self.negative_positions_lock();
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query(lock).execute(&mut *tx).await?;
            let lowest: i64 = sqlx::query("SELECT COALESCE(MIN(stream_pos), 0) FROM events")
                .fetch_one(&mut *tx)
                .await?
                .get(0);
            let lowest = lowest.min(0);
            let count = events.len() as i64;
            let mut added = 0;
            for (i, event) in events.iter().enumerate() {
                let inserted = sqlx::query(
                    "INSERT INTO events (stream_pos, event_id, room_id, sender, type, state_key, depth, pdu,
                                         relates_to, rel_type)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING",
                )
                .bind(lowest - count + i as i64)
                .bind(&event.event_id)
                .bind(room_id)
                .bind(&event.sender)
                .bind(&event.kind)
                .bind(event.state_key.as_deref())
                .bind(event.depth)
                .bind(&event.pdu)
                .bind(event.relates_to.as_ref().map(|r| r.0.as_str()))
                .bind(event.relates_to.as_ref().map(|r| r.1.as_str()))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    continue;
                }
                added += 1;
                for prev in &event.prev_events {
                    sqlx::query(
                        "INSERT INTO event_edges (room_id, event_id, prev_event_id) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(room_id)
                    .bind(&event.event_id)
                    .bind(prev)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    /// The oldest event of a room's timeline (outliers aside).
    pub async fn oldest_timeline_event(&self, room_id: &str) -> Result<Option<crate::EventRow>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM events WHERE room_id = $1 AND NOT outlier ORDER BY stream_pos LIMIT 1",
                crate::EVENT_COLUMNS
            )))
            .bind(room_id)
            .fetch_optional(read)
            .await?;
            row.map(|r| crate::rows::event_from_row(&r)).transpose()
        })
    }

    /// Stores a room joined through another server: its row, the state and auth chain that
    /// server gave — as outliers, with negative stream positions: before every timeline event,
    /// never announced, in no timeline — and its current state (`state`, event IDs among
    /// `outliers`). `outliers` come oldest first; an event stored before is left as it is.
    pub async fn import_room(
        &self,
        room_id: &str,
        version: &str,
        creator: &str,
        created_ts: i64,
        outliers: &[NewEvent],
        state: &[String],
    ) -> Result<()> {
        let lock = self.negative_positions_lock();
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query(lock).execute(&mut *tx).await?;
            let lowest: i64 = sqlx::query("SELECT COALESCE(MIN(stream_pos), 0) FROM events")
                .fetch_one(&mut *tx)
                .await?
                .get(0);
            let lowest = lowest.min(0);
            sqlx::query(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (room_id) DO NOTHING",
            )
            .bind(room_id)
            .bind(version)
            .bind(creator)
            .bind(created_ts)
            .execute(&mut *tx)
            .await?;
            let count = outliers.len() as i64;
            for (i, event) in outliers.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO events (stream_pos, event_id, room_id, sender, type, state_key, depth, pdu, outlier)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, TRUE) ON CONFLICT (event_id) DO NOTHING",
                )
                .bind(lowest - count + i as i64)
                .bind(&event.event_id)
                .bind(&event.room_id)
                .bind(&event.sender)
                .bind(&event.kind)
                .bind(event.state_key.as_deref())
                .bind(event.depth)
                .bind(&event.pdu)
                .execute(&mut *tx)
                .await?;
            }
            for event in outliers.iter().filter(|e| state.contains(&e.event_id)) {
                let Some(state_key) = &event.state_key else {
                    continue;
                };
                sqlx::query(
                    "INSERT INTO current_state (room_id, type, state_key, event_id, stream_pos, membership)
                     SELECT $1, $2, $3, $4, stream_pos, $5 FROM events WHERE event_id = $4
                     ON CONFLICT (room_id, type, state_key)
                     DO UPDATE SET event_id = excluded.event_id, stream_pos = excluded.stream_pos,
                                   membership = excluded.membership",
                )
                .bind(room_id)
                .bind(&event.kind)
                .bind(state_key)
                .bind(&event.event_id)
                .bind(event.membership.as_deref())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    // ---- state snapshots ----------------------------------------------------------------------

    /// The snapshot of the state right after an event, if one was recorded.
    pub async fn event_snapshot(&self, event_id: &str) -> Result<Option<i64>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT snapshot_id FROM event_state WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// One snapshot: `(parent, chain length, delta)`.
    pub async fn snapshot(&self, snapshot_id: i64) -> Result<Option<(Option<i64>, i64, String)>> {
        on_db!(self, |write, read| {
            let row =
                sqlx::query("SELECT parent_id, chain, delta FROM state_snapshots WHERE snapshot_id = $1")
                    .bind(snapshot_id)
                    .fetch_optional(read)
                    .await?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
    }

    /// The highest snapshot ID in use (0 if none).
    pub async fn max_snapshot_id(&self) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT COALESCE(MAX(snapshot_id), 0) FROM state_snapshots")
                .fetch_one(read)
                .await?;
            Ok(row.get(0))
        })
    }
}
