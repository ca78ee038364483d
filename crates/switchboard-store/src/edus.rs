//! Tables of what crosses servers outside rooms: EDUs waiting for their destination, the
//! device lists of other servers' users this server keeps, and their media it cached.

use sqlx::Row;

use crate::{Pools, Result, Store};

/// An EDU for another server, to wait in the outbox until the destination answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundEdu {
    pub destination: String,
    pub edu_type: String,
    /// The EDU's `content`, as JSON text.
    pub content: String,
    /// A waiting EDU with the same destination and key is replaced.
    pub replace_key: Option<String>,
}

/// An EDU in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEdu {
    pub id: i64,
    pub edu_type: String,
    pub content: String,
    pub created_ts: i64,
}

/// One device of another server's user, as its server announced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDevice {
    pub device_id: String,
    /// Its keys as JSON text; `None` for a device without keys (or deleted, in an update).
    pub keys: Option<String>,
}

impl Store {
    // ---- the outbox ---------------------------------------------------------------------------

    /// Puts EDUs in the outbox, in one transaction. A destination new to this server starts its
    /// queue where the dispatcher is, so no event still to dispatch is skipped for it.
    pub async fn queue_federation_edus(&self, edus: &[OutboundEdu], now: i64) -> Result<()> {
        if edus.is_empty() {
            return Ok(());
        }
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            for edu in edus {
                sqlx::query(
                    "INSERT INTO federation_destinations (destination, sent_pos)
                     SELECT $1, sent_pos FROM federation_destinations WHERE destination = ''
                     ON CONFLICT (destination) DO NOTHING",
                )
                .bind(&edu.destination)
                .execute(&mut *tx)
                .await?;
                if let Some(key) = &edu.replace_key {
                    sqlx::query("DELETE FROM federation_edus WHERE destination = $1 AND replace_key = $2")
                        .bind(&edu.destination)
                        .bind(key)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO federation_edus (destination, edu_type, content, replace_key, created_ts)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&edu.destination)
                .bind(&edu.edu_type)
                .bind(&edu.content)
                .bind(&edu.replace_key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The oldest `limit` EDUs waiting for `destination`.
    pub async fn federation_edus(&self, destination: &str, limit: i64) -> Result<Vec<QueuedEdu>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT id, edu_type, content, created_ts FROM federation_edus WHERE destination = $1
                 ORDER BY id LIMIT $2",
            )
            .bind(destination)
            .bind(limit)
            .fetch_all(write)
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| QueuedEdu {
                    id: r.get(0),
                    edu_type: r.get(1),
                    content: r.get(2),
                    created_ts: r.get(3),
                })
                .collect())
        })
    }

    /// Drops the EDUs `ids` of `destination` (it has them). By ID, never by range: on
    /// PostgreSQL a lower ID may commit after a higher one was read and sent.
    pub async fn delete_federation_edus(&self, destination: &str, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            for id in ids {
                sqlx::query("DELETE FROM federation_edus WHERE destination = $1 AND id = $2")
                    .bind(destination)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    // ---- device lists -------------------------------------------------------------------------

    /// The position of the latest change to one of `user_id`'s devices before `before`: the
    /// `prev_id` of the next `m.device_list_update`, the `stream_id` of the list.
    pub async fn previous_device_list_change(&self, user_id: &str, before: i64) -> Result<Option<i64>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "SELECT MAX(stream_pos) FROM device_list_changes
                 WHERE user_id = $1 AND stream_pos < $2 AND device_id IS NOT NULL",
            )
            .bind(user_id)
            .bind(before)
            .fetch_one(read)
            .await?;
            Ok(row.get(0))
        })
    }

    /// `(stream_id, stale)` of another server's user whose device list this server keeps.
    pub async fn remote_device_list(&self, user_id: &str) -> Result<Option<(i64, bool)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query("SELECT stream_id, stale FROM remote_device_lists WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(read)
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Marks a kept device list as missing an update: it is fetched again before it is used.
    pub async fn mark_remote_device_list_stale(&self, user_id: &str) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query("UPDATE remote_device_lists SET stale = TRUE WHERE user_id = $1")
                .bind(user_id)
                .execute(write)
                .await?;
            Ok(())
        })
    }

    /// Applies one device-list update of another server's user: the device's keys replaced (or
    /// the device gone), the list's stream ID moved on, a change recorded at `pos`.
    pub async fn apply_remote_device_update(
        &self,
        user_id: &str,
        device: &RemoteDevice,
        stream_id: i64,
        pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            match &device.keys {
                Some(keys) => {
                    sqlx::query(crate::UPSERT_DEVICE_KEYS)
                        .bind(user_id)
                        .bind(&device.device_id)
                        .bind(keys)
                        .execute(&mut *tx)
                        .await?;
                }
                None => {
                    sqlx::query("DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2")
                        .bind(user_id)
                        .bind(&device.device_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            sqlx::query(
                "INSERT INTO remote_device_lists (user_id, stream_id, stale) VALUES ($1, $2, FALSE)
                 ON CONFLICT (user_id) DO UPDATE SET stream_id = $2",
            )
            .bind(user_id)
            .bind(stream_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(crate::RECORD_DEVICE_LIST_CHANGE)
                .bind(user_id)
                .bind(pos)
                .bind(&device.device_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Replaces the whole kept device list of another server's user (after fetching it): its
    /// devices' keys, its public cross-signing keys `(key_type, keys)`, its stream ID; records a
    /// change at `pos`.
    pub async fn replace_remote_device_list(
        &self,
        user_id: &str,
        devices: &[RemoteDevice],
        cross_signing: &[(&str, String)],
        stream_id: i64,
        pos: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            sqlx::query("DELETE FROM device_keys WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            for device in devices {
                if let Some(keys) = &device.keys {
                    sqlx::query("INSERT INTO device_keys (user_id, device_id, keys) VALUES ($1, $2, $3)")
                        .bind(user_id)
                        .bind(&device.device_id)
                        .bind(keys)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            for (key_type, keys) in cross_signing {
                sqlx::query(crate::UPSERT_CROSS_SIGNING_KEY)
                    .bind(user_id)
                    .bind(key_type)
                    .bind(keys)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO remote_device_lists (user_id, stream_id, stale) VALUES ($1, $2, FALSE)
                 ON CONFLICT (user_id) DO UPDATE SET stream_id = $2, stale = FALSE",
            )
            .bind(user_id)
            .bind(stream_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO device_list_changes (user_id, stream_pos) VALUES ($1, $2)")
                .bind(user_id)
                .bind(pos)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    // ---- other servers' media -----------------------------------------------------------------

    /// A cached piece of remote media: `(content_type, filename, size)`, its access time moved to
    /// `now`.
    pub async fn remote_media(
        &self,
        origin: &str,
        media_id: &str,
        variant: &str,
        now: i64,
    ) -> Result<Option<(String, Option<String>, i64)>> {
        on_db!(self, |write, read| {
            let row = sqlx::query(
                "UPDATE remote_media SET last_access_ts = $4
                 WHERE origin = $1 AND media_id = $2 AND variant = $3
                 RETURNING content_type, filename, size",
            )
            .bind(origin)
            .bind(media_id)
            .bind(variant)
            .bind(now)
            .fetch_optional(write)
            .await?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
    }

    /// Records remote media just cached (a concurrent fetch of the same may have recorded it).
    #[allow(clippy::too_many_arguments)]
    pub async fn add_remote_media(
        &self,
        origin: &str,
        media_id: &str,
        variant: &str,
        content_type: &str,
        filename: Option<&str>,
        size: i64,
        now: i64,
    ) -> Result<()> {
        on_db!(self, |write, read| {
            sqlx::query(
                "INSERT INTO remote_media
                   (origin, media_id, variant, content_type, filename, size, created_ts, last_access_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                 ON CONFLICT (origin, media_id, variant) DO NOTHING",
            )
            .bind(origin)
            .bind(media_id)
            .bind(variant)
            .bind(content_type)
            .bind(filename)
            .bind(size)
            .bind(now)
            .execute(write)
            .await?;
            Ok(())
        })
    }

    /// Forgets cached remote media not used since `before`: `(origin, media_id, variant)` of
    /// each, for their files to be deleted.
    pub async fn purge_remote_media(&self, before: i64) -> Result<Vec<(String, String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "DELETE FROM remote_media WHERE last_access_ts < $1 RETURNING origin, media_id, variant",
            )
            .bind(before)
            .fetch_all(write)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    // ---- signatures on other users' keys ------------------------------------------------------

    /// Keeps `signer`'s signatures `(signing key ID, signature)` on `user_id`'s key `key_id`.
    pub async fn add_cross_signing_signatures(
        &self,
        signer: &str,
        user_id: &str,
        key_id: &str,
        signatures: &[(String, String)],
    ) -> Result<()> {
        on_db!(self, |write, read| {
            let mut tx = write.begin().await?;
            for (signing_key_id, signature) in signatures {
                sqlx::query(
                    "INSERT INTO cross_signing_signatures (signer, user_id, key_id, signing_key_id, signature)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (signer, user_id, key_id, signing_key_id) DO UPDATE SET signature = $5",
                )
                .bind(signer)
                .bind(user_id)
                .bind(key_id)
                .bind(signing_key_id)
                .bind(signature)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// `signer`'s signatures on `user_id`'s keys: `(key_id, signing_key_id, signature)`.
    pub async fn cross_signing_signatures(
        &self,
        signer: &str,
        user_id: &str,
    ) -> Result<Vec<(String, String, String)>> {
        on_db!(self, |write, read| {
            let rows = sqlx::query(
                "SELECT key_id, signing_key_id, signature FROM cross_signing_signatures
                 WHERE signer = $1 AND user_id = $2",
            )
            .bind(signer)
            .bind(user_id)
            .fetch_all(read)
            .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }
}
