//! Versioned schema migrations, applied in order at startup inside one transaction each.
//!
//! Both engines have the same numbered migrations (`migrations/sqlite`, `migrations/postgres`),
//! so one schema version means the same tables on either, which is what `port-db` relies on.

use sqlx::{AssertSqlSafe, Connection, Row, postgres::PgPool, sqlite::SqlitePool};

use crate::{Result, StoreError};

const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_core.sql"),
    include_str!("../migrations/sqlite/0002_appservices.sql"),
    include_str!("../migrations/sqlite/0003_account_data.sql"),
    include_str!("../migrations/sqlite/0004_receipts.sql"),
    include_str!("../migrations/sqlite/0005_appservice_ephemeral.sql"),
    include_str!("../migrations/sqlite/0006_room_directory.sql"),
    include_str!("../migrations/sqlite/0007_e2ee.sql"),
    include_str!("../migrations/sqlite/0008_media.sql"),
    include_str!("../migrations/sqlite/0009_relations.sql"),
    include_str!("../migrations/sqlite/0010_cross_signing.sql"),
    include_str!("../migrations/sqlite/0011_server_keys.sql"),
    include_str!("../migrations/sqlite/0012_federation_rooms.sql"),
    include_str!("../migrations/sqlite/0013_state_snapshots.sql"),
    include_str!("../migrations/sqlite/0014_backfill_and_relay.sql"),
    include_str!("../migrations/sqlite/0015_federation_edus_and_media.sql"),
    include_str!("../migrations/sqlite/0016_key_backup.sql"),
    include_str!("../migrations/sqlite/0017_push.sql"),
    include_str!("../migrations/sqlite/0018_sliding_sync.sql"),
    include_str!("../migrations/sqlite/0019_appservice_to_device.sql"),
];

const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_core.sql"),
    include_str!("../migrations/postgres/0002_appservices.sql"),
    include_str!("../migrations/postgres/0003_account_data.sql"),
    include_str!("../migrations/postgres/0004_receipts.sql"),
    include_str!("../migrations/postgres/0005_appservice_ephemeral.sql"),
    include_str!("../migrations/postgres/0006_room_directory.sql"),
    include_str!("../migrations/postgres/0007_e2ee.sql"),
    include_str!("../migrations/postgres/0008_media.sql"),
    include_str!("../migrations/postgres/0009_relations.sql"),
    include_str!("../migrations/postgres/0010_cross_signing.sql"),
    include_str!("../migrations/postgres/0011_server_keys.sql"),
    include_str!("../migrations/postgres/0012_federation_rooms.sql"),
    include_str!("../migrations/postgres/0013_state_snapshots.sql"),
    include_str!("../migrations/postgres/0014_backfill_and_relay.sql"),
    include_str!("../migrations/postgres/0015_federation_edus_and_media.sql"),
    include_str!("../migrations/postgres/0016_key_backup.sql"),
    include_str!("../migrations/postgres/0017_push.sql"),
    include_str!("../migrations/postgres/0018_sliding_sync.sql"),
    include_str!("../migrations/postgres/0019_appservice_to_device.sql"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = SQLITE_MIGRATIONS.len() as i64;

const _: () = assert!(SQLITE_MIGRATIONS.len() == POSTGRES_MIGRATIONS.len());

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)";
const READ_VERSION: &str = "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM schema_version";

fn check_version(current: i64) -> Result<()> {
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Runs the migrations after `current` on one engine, each in its own transaction.
macro_rules! apply {
    ($conn:expr, $migrations:expr, $current:expr) => {
        for (index, sql) in $migrations.iter().enumerate().skip($current as usize) {
            let version = index as i64 + 1;
            let mut tx = $conn.begin().await?;
            // Migration files hold several statements; both engines run them in one call.
            sqlx::raw_sql(AssertSqlSafe(*sql)).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM schema_version")
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied database migration");
        }
    };
}

pub(crate) async fn sqlite(pool: &SqlitePool) -> Result<()> {
    // Synapse's database has a `schema_version` table too (with more columns): not ours.
    let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('schema_version')")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !columns.is_empty() && columns != ["version"] {
        return Err(StoreError::Unusable {
            database: String::new(),
            reason: "has a schema_version table that is not Switchboard's (a Synapse database?)".to_owned(),
        });
    }
    sqlx::query(CREATE_VERSION_TABLE).execute(pool).await?;
    let current: i64 = sqlx::query(READ_VERSION).fetch_one(pool).await?.try_get(0)?;
    check_version(current)?;
    apply!(pool, SQLITE_MIGRATIONS, current);
    Ok(())
}

pub(crate) async fn postgres(pool: &PgPool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    // Two processes starting at once must not both migrate: a session lock serialises them.
    sqlx::query("SELECT pg_advisory_lock(7237005)")
        .execute(&mut *conn)
        .await?;
    let result = postgres_locked(&mut conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock(7237005)")
        .execute(&mut *conn)
        .await;
    result?;
    unlock?;
    Ok(())
}

async fn postgres_locked(conn: &mut sqlx::PgConnection) -> Result<()> {
    // Ours: the sequence migration 1 creates. Fresh: nothing but, at most, our own empty version
    // table (a first migration that failed). Anything else is someone else's database — Synapse
    // has a `schema_version` table too — and is never touched.
    let ours: bool = sqlx::query("SELECT to_regclass('events_stream_pos') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?
        .get(0);
    if !ours {
        let tables: Vec<String> = sqlx::query(
            "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = current_schema()",
        )
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let only_ours = tables.iter().all(|t| t == "schema_version")
            && (tables.is_empty() || {
                let columns: Vec<String> = sqlx::query(
                    "SELECT column_name::TEXT FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = 'schema_version'",
                )
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
                columns == ["version"]
            });
        if !only_ours {
            return Err(StoreError::Unusable {
                database: String::new(),
                reason: format!(
                    "holds {} tables but no Switchboard schema; use an empty database",
                    tables.len()
                ),
            });
        }
    }
    sqlx::query(CREATE_VERSION_TABLE).execute(&mut *conn).await?;
    let current: i64 = sqlx::query(READ_VERSION)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    check_version(current)?;
    apply!(conn, POSTGRES_MIGRATIONS, current);
    Ok(())
}
