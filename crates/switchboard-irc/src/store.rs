//! What the bridge must remember across restarts: which room bridges which channel, and the nick
//! each Matrix user's puppet had. SQLite, one file in the data directory.

use std::{path::Path, str::FromStr};

use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions},
};

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

pub type Result<T> = std::result::Result<T, sqlx::Error>;

impl Store {
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        for statement in [
            "CREATE TABLE IF NOT EXISTS rooms (
                network TEXT NOT NULL, channel TEXT NOT NULL, room_id TEXT NOT NULL,
                PRIMARY KEY (network, channel))",
            "CREATE TABLE IF NOT EXISTS admin_rooms (room_id TEXT PRIMARY KEY, user_id TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS dms (
                room_id TEXT PRIMARY KEY, network TEXT NOT NULL, nick TEXT NOT NULL,
                user_id TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS puppets (
                user_id TEXT NOT NULL, network TEXT NOT NULL, nick TEXT NOT NULL,
                PRIMARY KEY (user_id, network))",
        ] {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// Every bridged channel: `(network, folded channel, room)`.
    pub async fn rooms(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query("SELECT network, channel, room_id FROM rooms")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    pub async fn add_room(&self, network: &str, channel: &str, room_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO rooms (network, channel, room_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(network)
        .bind(channel)
        .bind(room_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rooms where users give the bot commands: `(room, user)`.
    pub async fn admin_rooms(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT room_id, user_id FROM admin_rooms")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn add_admin_room(&self, room_id: &str, user_id: &str) -> Result<()> {
        sqlx::query("INSERT INTO admin_rooms (room_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(room_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Private chats: `(room, network, folded nick, Matrix user)`.
    pub async fn dms(&self) -> Result<Vec<(String, String, String, String)>> {
        let rows = sqlx::query("SELECT room_id, network, nick, user_id FROM dms")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub async fn add_dm(&self, room_id: &str, network: &str, nick: &str, user_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO dms (room_id, network, nick, user_id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(room_id)
        .bind(network)
        .bind(nick)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn remove_dm(&self, room_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM dms WHERE room_id = $1")
            .bind(room_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn puppet_nick(&self, user_id: &str, network: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT nick FROM puppets WHERE user_id = $1 AND network = $2")
            .bind(user_id)
            .bind(network)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn set_puppet_nick(&self, user_id: &str, network: &str, nick: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO puppets (user_id, network, nick) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, network) DO UPDATE SET nick = $3",
        )
        .bind(user_id)
        .bind(network)
        .bind(nick)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mappings_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.db");
        let store = Store::open(&path).await.expect("open");
        store.add_room("libera", "#rust", "!r:x").await.expect("add");
        store
            .add_room("libera", "#rust", "!other:x")
            .await
            .expect("idempotent");
        store
            .set_puppet_nick("@a:x", "libera", "alice")
            .await
            .expect("nick");
        store
            .set_puppet_nick("@a:x", "libera", "alice_")
            .await
            .expect("nick");
        store
            .add_dm("!dm:x", "libera", "carol", "@a:x")
            .await
            .expect("dm");
        drop(store);
        let store = Store::open(&path).await.expect("reopen");
        assert_eq!(
            store.rooms().await.expect("rooms"),
            [("libera".to_owned(), "#rust".to_owned(), "!r:x".to_owned())]
        );
        assert_eq!(
            store
                .puppet_nick("@a:x", "libera")
                .await
                .expect("nick")
                .as_deref(),
            Some("alice_")
        );
        assert_eq!(store.puppet_nick("@b:x", "libera").await.expect("nick"), None);
        assert_eq!(store.dms().await.expect("dms").len(), 1);
    }
}
