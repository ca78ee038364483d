//! Versioned schema migrations, applied in order at startup inside one transaction each.

use sqlx::{AssertSqlSafe, Row, SqlitePool};

use crate::{Result, StoreError};

/// Migrations in order; the schema version is the number applied.
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
];

pub(crate) async fn run(pool: &SqlitePool) -> Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(pool)
        .await?
        .get(0);
    let supported = SQLITE_MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (index, sql) in SQLITE_MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        let mut tx = pool.begin().await?;
        // The migration files hold several statements; SQLite runs them all in one call.
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
    Ok(())
}
