//! Server-side key backup (`room_keys`): backup versions and the encrypted session keys in them.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{Pools, Result, Store};

/// A backup version's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupVersion {
    pub version: i64,
    pub algorithm: String,
    /// JSON text.
    pub auth_data: String,
    pub etag: i64,
    pub count: i64,
}

/// One session's key in a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackedUpKey {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    /// JSON text (the encrypted session).
    pub session_data: String,
}

const VERSION_COLUMNS: &str = "v.version, v.algorithm, v.auth_data, v.etag,
     (SELECT COUNT(*) FROM room_key_backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version)";

/// Decodes a row of [`VERSION_COLUMNS`] from either engine.
fn version_row<'r, R>(r: &'r R) -> Result<BackupVersion>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(BackupVersion {
        version: r.try_get(0)?,
        algorithm: r.try_get(1)?,
        auth_data: r.try_get(2)?,
        etag: r.try_get(3)?,
        count: r.try_get(4)?,
    })
}

/// Decodes a row of [`KEY_SELECT`] from either engine.
fn key_row<'r, R>(r: &'r R) -> Result<BackedUpKey>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(BackedUpKey {
        room_id: r.try_get(0)?,
        session_id: r.try_get(1)?,
        first_message_index: r.try_get(2)?,
        forwarded_count: r.try_get(3)?,
        is_verified: r.try_get(4)?,
        session_data: r.try_get(5)?,
    })
}

/// The keys of `(room, session)` selected by optional filters; `$1` user, `$2` version.
const KEY_SELECT: &str =
    "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data
     FROM room_key_backup_keys WHERE user_id = $1 AND version = $2
     AND ($3 = '' OR room_id = $3) AND ($4 = '' OR session_id = $4)
     ORDER BY room_id, session_id";

const BUMP_ETAG: &str =
    "UPDATE room_key_backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2";

fn version_by_id() -> String {
    format!(
        "SELECT {VERSION_COLUMNS} FROM room_key_backup_versions v WHERE v.user_id = $1 AND v.version = $2"
    )
}

impl Store {
    /// Creates the user's next backup version (numbers are never reused) and returns it.
    pub async fn create_backup_version(
        &self,
        user_id: &str,
        algorithm: &str,
        auth_data: &str,
    ) -> Result<i64> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "INSERT INTO room_key_backup_versions (user_id, version, algorithm, auth_data)
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3 FROM room_key_backup_versions WHERE user_id = $1
                 RETURNING version",
            )
            .bind(user_id)
            .bind(algorithm)
            .bind(auth_data)
            .fetch_one(write)
            .await?;
            Ok(row.get(0))
        })
    }

    /// A version that was not deleted; `None` asks for the latest.
    pub async fn backup_version(&self, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VERSION_COLUMNS} FROM room_key_backup_versions v
                 WHERE v.user_id = $1 AND NOT v.deleted AND ($2 < 0 OR v.version = $2)
                 ORDER BY v.version DESC LIMIT 1"
            )))
            .bind(user_id)
            .bind(version.unwrap_or(-1))
            .fetch_optional(read)
            .await?;
            row.as_ref().map(version_row).transpose()
        })
    }

    /// Replaces a version's `auth_data`; `false` if there is no such (undeleted) version.
    pub async fn update_backup_version(&self, user_id: &str, version: i64, auth_data: &str) -> Result<bool> {
        on_db!(self, |write, read| {
            let done = sqlx::query(
                "UPDATE room_key_backup_versions SET auth_data = $3
                 WHERE user_id = $1 AND version = $2 AND NOT deleted",
            )
            .bind(user_id)
            .bind(version)
            .bind(auth_data)
            .execute(write)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Marks a version deleted and drops its keys; `false` if there was no such version.
    pub async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let done = sqlx::query(
                "UPDATE room_key_backup_versions SET deleted = TRUE
                 WHERE user_id = $1 AND version = $2 AND NOT deleted",
            )
            .bind(user_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM room_key_backup_keys WHERE user_id = $1 AND version = $2")
                .bind(user_id)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Keys of a version, all or of one room (`room_id` non-empty) or one session.
    pub async fn backed_up_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: &str,
        session_id: &str,
    ) -> Result<Vec<BackedUpKey>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(KEY_SELECT)
                .bind(user_id)
                .bind(version)
                .bind(room_id)
                .bind(session_id)
                .fetch_all(read)
                .await?;
            rows.iter().map(key_row).collect()
        })
    }

    /// Stores keys in a version, each only where `replaces(existing, new)` says the new one is
    /// better, in one transaction; bumps the version's etag if anything changed. Returns
    /// `(count, etag)` afterwards.
    pub async fn put_backed_up_keys(
        &self,
        user_id: &str,
        version: i64,
        keys: &[BackedUpKey],
        replaces: impl Fn(&BackedUpKey, &BackedUpKey) -> bool,
    ) -> Result<(i64, i64)> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let mut changed = false;
            for key in keys {
                let existing = sqlx::query(KEY_SELECT)
                    .bind(user_id)
                    .bind(version)
                    .bind(&key.room_id)
                    .bind(&key.session_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(old) = existing.as_ref().map(key_row).transpose()?
                    && !replaces(&old, key)
                {
                    continue;
                }
                sqlx::query(
                    "INSERT INTO room_key_backup_keys (user_id, version, room_id, session_id,
                         first_message_index, forwarded_count, is_verified, session_data)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET
                         first_message_index = $5, forwarded_count = $6, is_verified = $7, session_data = $8",
                )
                .bind(user_id)
                .bind(version)
                .bind(&key.room_id)
                .bind(&key.session_id)
                .bind(key.first_message_index)
                .bind(key.forwarded_count)
                .bind(key.is_verified)
                .bind(&key.session_data)
                .execute(&mut *tx)
                .await?;
                changed = true;
            }
            if changed {
                sqlx::query(BUMP_ETAG)
                    .bind(user_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(version_by_id()))
                .bind(user_id)
                .bind(version)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            let v = version_row(&row)?;
            Ok((v.count, v.etag))
        })
    }

    /// Deletes keys of a version (all, a room's, or one session). Returns `(count, etag)` afterwards.
    pub async fn delete_backed_up_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: &str,
        session_id: &str,
    ) -> Result<(i64, i64)> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            let done = sqlx::query(
                "DELETE FROM room_key_backup_keys WHERE user_id = $1 AND version = $2
                 AND ($3 = '' OR room_id = $3) AND ($4 = '' OR session_id = $4)",
            )
            .bind(user_id)
            .bind(version)
            .bind(room_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() > 0 {
                sqlx::query(BUMP_ETAG)
                    .bind(user_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(version_by_id()))
                .bind(user_id)
                .bind(version)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            let v = version_row(&row)?;
            Ok((v.count, v.etag))
        })
    }
}
