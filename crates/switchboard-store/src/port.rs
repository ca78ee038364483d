//! Copying a SQLite database into an empty PostgreSQL one (`switchboard port-db`), in the spirit
//! of Synapse's `synapse_port_db`: every table row for row inside one snapshot of the source and
//! one transaction on the target, the event-stream sequence moved past the copied events, and
//! row counts compared at the end.

use sqlx::{AssertSqlSafe, Row, sqlite::SqliteRow};

use crate::{Pools, Result, Store, StoreError};

/// How a column is read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Bool,
}
use Kind::{Bool, Int, Text};

/// Every table of the schema with its columns. A test compares this with the migrated schema,
/// so a migration that adds a table or column without adding it here fails the build's tests.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "users",
        &[
            ("user_id", Text),
            ("password_hash", Text),
            ("is_admin", Bool),
            ("appservice_id", Text),
            ("displayname", Text),
            ("avatar_url", Text),
            ("deactivated", Bool),
            ("created_ts", Int),
        ],
    ),
    (
        "devices",
        &[
            ("user_id", Text),
            ("device_id", Text),
            ("display_name", Text),
            ("created_ts", Int),
        ],
    ),
    (
        "access_tokens",
        &[
            ("token_hash", Text),
            ("user_id", Text),
            ("device_id", Text),
            ("created_ts", Int),
        ],
    ),
    (
        "rooms",
        &[
            ("room_id", Text),
            ("room_version", Text),
            ("creator", Text),
            ("created_ts", Int),
        ],
    ),
    (
        "events",
        &[
            ("stream_pos", Int),
            ("event_id", Text),
            ("room_id", Text),
            ("sender", Text),
            ("type", Text),
            ("state_key", Text),
            ("depth", Int),
            ("pdu", Text),
            ("unsigned", Text),
            ("txn_device", Text),
            ("txn_id", Text),
            ("relates_to", Text),
            ("rel_type", Text),
            ("outlier", Bool),
            ("relay", Bool),
        ],
    ),
    (
        "current_state",
        &[
            ("room_id", Text),
            ("type", Text),
            ("state_key", Text),
            ("event_id", Text),
            ("stream_pos", Int),
            ("membership", Text),
        ],
    ),
    (
        "event_txns",
        &[
            ("user_id", Text),
            ("device_id", Text),
            ("room_id", Text),
            ("event_type", Text),
            ("txn_id", Text),
            ("event_id", Text),
        ],
    ),
    (
        "room_aliases",
        &[("alias", Text), ("room_id", Text), ("creator", Text)],
    ),
    (
        "filters",
        &[("user_id", Text), ("filter_id", Int), ("filter", Text)],
    ),
    ("forgotten_rooms", &[("user_id", Text), ("room_id", Text)]),
    (
        "appservice_state",
        &[
            ("as_id", Text),
            ("last_pos", Int),
            ("last_txn_id", Int),
            ("last_aux", Int),
        ],
    ),
    (
        "appservice_txns",
        &[
            ("as_id", Text),
            ("txn_id", Int),
            ("last_pos", Int),
            ("event_count", Int),
            ("body", Text),
            ("last_aux", Int),
        ],
    ),
    (
        "account_data",
        &[
            ("user_id", Text),
            ("room_id", Text),
            ("type", Text),
            ("content", Text),
            ("stream_pos", Int),
        ],
    ),
    (
        "receipts",
        &[
            ("room_id", Text),
            ("receipt_type", Text),
            ("user_id", Text),
            ("thread_id", Text),
            ("event_id", Text),
            ("ts", Int),
            ("stream_pos", Int),
        ],
    ),
    ("room_directory", &[("room_id", Text), ("instance", Text)]),
    (
        "device_keys",
        &[("user_id", Text), ("device_id", Text), ("keys", Text)],
    ),
    (
        "one_time_keys",
        &[
            ("user_id", Text),
            ("device_id", Text),
            ("algorithm", Text),
            ("key_id", Text),
            ("key", Text),
        ],
    ),
    (
        "fallback_keys",
        &[
            ("user_id", Text),
            ("device_id", Text),
            ("algorithm", Text),
            ("key_id", Text),
            ("key", Text),
            ("used", Bool),
        ],
    ),
    (
        "device_list_changes",
        &[("user_id", Text), ("stream_pos", Int), ("device_id", Text)],
    ),
    (
        "to_device",
        &[
            ("stream_pos", Int),
            ("user_id", Text),
            ("device_id", Text),
            ("sender", Text),
            ("type", Text),
            ("content", Text),
        ],
    ),
    (
        "to_device_txns",
        &[("sender", Text), ("device_id", Text), ("txn_id", Text)],
    ),
    (
        "media",
        &[
            ("media_id", Text),
            ("uploader", Text),
            ("content_type", Text),
            ("filename", Text),
            ("size", Int),
            ("created_ts", Int),
            ("uploaded", Bool),
        ],
    ),
    (
        "cross_signing_keys",
        &[("user_id", Text), ("key_type", Text), ("keys", Text)],
    ),
    (
        "server_keys",
        &[
            ("server_name", Text),
            ("key_id", Text),
            ("verify_key", Text),
            ("valid_until_ts", Int),
            ("expired_ts", Int),
        ],
    ),
    (
        "server_key_responses",
        &[("server_name", Text), ("response", Text), ("valid_until_ts", Int)],
    ),
    (
        "event_edges",
        &[("room_id", Text), ("event_id", Text), ("prev_event_id", Text)],
    ),
    (
        "federation_destinations",
        &[("destination", Text), ("sent_pos", Int), ("last_txn_id", Int)],
    ),
    (
        "state_snapshots",
        &[
            ("snapshot_id", Int),
            ("room_id", Text),
            ("parent_id", Int),
            ("chain", Int),
            ("delta", Text),
        ],
    ),
    ("event_state", &[("event_id", Text), ("snapshot_id", Int)]),
    (
        "federation_edus",
        &[
            ("id", Int),
            ("destination", Text),
            ("edu_type", Text),
            ("content", Text),
            ("replace_key", Text),
            ("created_ts", Int),
        ],
    ),
    (
        "remote_device_lists",
        &[("user_id", Text), ("stream_id", Int), ("stale", Bool)],
    ),
    (
        "cross_signing_signatures",
        &[
            ("signer", Text),
            ("user_id", Text),
            ("key_id", Text),
            ("signing_key_id", Text),
            ("signature", Text),
        ],
    ),
    (
        "remote_media",
        &[
            ("origin", Text),
            ("media_id", Text),
            ("variant", Text),
            ("content_type", Text),
            ("filename", Text),
            ("size", Int),
            ("created_ts", Int),
            ("last_access_ts", Int),
        ],
    ),
    (
        "room_key_backup_versions",
        &[
            ("user_id", Text),
            ("version", Int),
            ("algorithm", Text),
            ("auth_data", Text),
            ("etag", Int),
            ("deleted", Bool),
        ],
    ),
    (
        "room_key_backup_keys",
        &[
            ("user_id", Text),
            ("version", Int),
            ("room_id", Text),
            ("session_id", Text),
            ("first_message_index", Int),
            ("forwarded_count", Int),
            ("is_verified", Bool),
            ("session_data", Text),
        ],
    ),
    (
        "event_push_actions",
        &[
            ("user_id", Text),
            ("room_id", Text),
            ("stream_pos", Int),
            ("event_id", Text),
            ("thread_id", Text),
            ("notify", Bool),
            ("highlight", Bool),
            ("actions", Text),
        ],
    ),
    (
        "push_read_positions",
        &[
            ("user_id", Text),
            ("room_id", Text),
            ("thread_id", Text),
            ("stream_pos", Int),
        ],
    ),
    ("push_progress", &[("id", Int), ("evaluated_pos", Int)]),
    (
        "pushers",
        &[
            ("id", Int),
            ("user_id", Text),
            ("device_id", Text),
            ("kind", Text),
            ("app_id", Text),
            ("pushkey", Text),
            ("app_display_name", Text),
            ("device_display_name", Text),
            ("profile_tag", Text),
            ("lang", Text),
            ("data", Text),
            ("created_ts", Int),
            ("sent_pos", Int),
            ("failing_since", Int),
        ],
    ),
];

/// Rows read from SQLite per query.
const PAGE: i64 = 2_000;

/// Rows copied per table, as counted in both databases afterwards.
#[derive(Debug, Default)]
pub struct PortReport {
    pub tables: Vec<(&'static str, i64)>,
}

impl PortReport {
    pub fn total_rows(&self) -> i64 {
        self.tables.iter().map(|(_, n)| n).sum()
    }
}

enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

fn decode(row: &SqliteRow, columns: &[(&str, Kind)]) -> Result<Vec<Value>> {
    columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            Ok(match kind {
                Text => Value::Text(row.try_get(i)?),
                Int => Value::Int(row.try_get(i)?),
                Bool => Value::Bool(row.try_get(i)?),
            })
        })
        .collect()
}

/// Copies everything from `source` (SQLite) into `target` (PostgreSQL, freshly migrated and
/// empty) and checks the row counts. Nothing is written to the target unless all of it is.
pub async fn sqlite_to_postgres(source: &Store, target: &Store) -> Result<PortReport> {
    let (Pools::Sqlite { read, .. }, Pools::Postgres(pg)) = (&source.pools, &target.pools) else {
        return Err(StoreError::Unusable {
            database: "port-db".to_owned(),
            reason: "copies from SQLite to PostgreSQL only".to_owned(),
        });
    };
    // One read transaction: a consistent snapshot even while the homeserver keeps writing.
    let mut from = read.begin().await?;
    let mut to = pg.begin().await?;
    for (table, _) in TABLES {
        let present: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&mut *to)
            .await?
            .get(0);
        if present > 0 {
            return Err(StoreError::Unusable {
                database: "the PostgreSQL target".to_owned(),
                reason: format!("table {table} already has {present} rows; port into a new, empty database"),
            });
        }
    }
    let mut report = PortReport::default();
    for (table, columns) in TABLES {
        let names = columns.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ");
        // PostgreSQL takes at most 65,535 parameters per statement.
        let rows_per_insert = (60_000 / columns.len()).min(1_000);
        let mut after = 0i64;
        let mut copied = 0i64;
        loop {
            let page = sqlx::query(AssertSqlSafe(format!(
                "SELECT {names}, rowid FROM {table} WHERE rowid > $1 ORDER BY rowid LIMIT $2"
            )))
            .bind(after)
            .bind(PAGE)
            .fetch_all(&mut *from)
            .await?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.try_get(columns.len())?;
            let values = page
                .iter()
                .map(|row| decode(row, columns))
                .collect::<Result<Vec<_>>>()?;
            for chunk in values.chunks(rows_per_insert) {
                let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO {table} ({names}) "));
                insert.push_values(chunk.iter(), |mut row, values| {
                    for value in values {
                        match value {
                            Value::Text(v) => row.push_bind(v.clone()),
                            Value::Int(v) => row.push_bind(v.to_owned()),
                            Value::Bool(v) => row.push_bind(v.to_owned()),
                        };
                    }
                });
                insert.build().execute(&mut *to).await?;
            }
            copied += page.len() as i64;
        }
        report.tables.push((table, copied));
    }
    // New events continue after the copied ones.
    sqlx::query(
        "SELECT setval('events_stream_pos', (SELECT MAX(stream_pos) FROM events)) WHERE EXISTS (SELECT 1 FROM events)",
    )
    .execute(&mut *to)
    .await?;
    for table in ["federation_edus", "pushers"] {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))
             WHERE EXISTS (SELECT 1 FROM {table})"
        )))
        .execute(&mut *to)
        .await?;
    }
    for (table, copied) in &report.tables {
        let source_rows: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&mut *from)
            .await?
            .get(0);
        let target_rows: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&mut *to)
            .await?
            .get(0);
        if source_rows != *copied || target_rows != *copied {
            return Err(StoreError::Corrupt(format!(
                "{table}: {source_rows} rows in SQLite, {copied} copied, {target_rows} in PostgreSQL"
            )));
        }
    }
    to.commit().await?;
    from.rollback().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy list must name every table and column the migrations create.
    #[tokio::test]
    async fn port_covers_the_whole_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_sqlite(&dir.path().join("db")).await.expect("open");
        let Pools::Sqlite { read, .. } = &store.pools else {
            panic!("sqlite");
        };
        let tables: Vec<String> = sqlx::query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('schema_version')
             AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .fetch_all(read)
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
        let mut listed: Vec<String> = TABLES.iter().map(|(t, _)| (*t).to_owned()).collect();
        listed.sort();
        assert_eq!(listed, tables, "tables port-db copies");
        for (table, columns) in TABLES {
            let mut actual: Vec<String> = sqlx::query(AssertSqlSafe(format!(
                "SELECT name FROM pragma_table_info('{table}')"
            )))
            .fetch_all(read)
            .await
            .expect("columns")
            .iter()
            .map(|r| r.get(0))
            .collect();
            actual.sort();
            let mut listed: Vec<String> = columns.iter().map(|(c, _)| (*c).to_owned()).collect();
            listed.sort();
            assert_eq!(listed, actual, "columns of {table}");
        }
    }
}
