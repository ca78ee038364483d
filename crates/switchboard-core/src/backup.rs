//! Server-side key backup (`/room_keys`): versions, and the encrypted session keys clients
//! store in them. The server never sees a key: `session_data` and `auth_data` are opaque; it
//! only decides which of two copies of a session's key to keep.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_store::{BackedUpKey, BackupVersion, Store};

use crate::{Error, Result};

pub struct KeyBackup {
    store: Store,
}

/// One session's key as clients send it (`KeyBackupData`).
#[derive(Deserialize)]
pub struct KeyBackupData {
    first_message_index: u32,
    forwarded_count: u32,
    is_verified: bool,
    session_data: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct RoomKeyBackup {
    sessions: BTreeMap<String, KeyBackupData>,
}

impl RoomKeyBackup {
    pub fn single(session_id: String, data: KeyBackupData) -> Self {
        Self {
            sessions: BTreeMap::from([(session_id, data)]),
        }
    }
}

/// Which keys a request is about: all of a version's, a room's, or one session's.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    All,
    Room(&'a str),
    Session(&'a str, &'a str),
}

impl Scope<'_> {
    fn parts(&self) -> (&str, &str) {
        match *self {
            Scope::All => ("", ""),
            Scope::Room(room) => (room, ""),
            Scope::Session(room, session) => (room, session),
        }
    }
}

/// The spec's rule for a session backed up twice: the new copy wins when it is verified and the
/// old is not; with equal verification, when it starts at an earlier message; then, when it was
/// forwarded fewer times.
pub fn replaces(old: &BackedUpKey, new: &BackedUpKey) -> bool {
    let rank = |k: &BackedUpKey| (!k.is_verified, k.first_message_index, k.forwarded_count);
    rank(new) < rank(old)
}

/// A path's version: versions are this server's decimal numbers; anything else names none.
fn parse_version(raw: &str) -> Result<i64> {
    raw.parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| Error::NotFound(format!("Unknown backup version {raw}")))
}

fn version_json(v: &BackupVersion) -> Result<Value> {
    let auth_data: Value = serde_json::from_str(&v.auth_data).map_err(Error::internal)?;
    Ok(json!({
        "algorithm": v.algorithm,
        "auth_data": auth_data,
        "count": v.count,
        "etag": v.etag.to_string(),
        "version": v.version.to_string(),
    }))
}

fn key_json(k: &BackedUpKey) -> Result<Value> {
    let session_data: Value = serde_json::from_str(&k.session_data).map_err(Error::internal)?;
    Ok(json!({
        "first_message_index": k.first_message_index,
        "forwarded_count": k.forwarded_count,
        "is_verified": k.is_verified,
        "session_data": session_data,
    }))
}

fn counts_json((count, etag): (i64, i64)) -> Value {
    json!({ "count": count, "etag": etag.to_string() })
}

/// A version's `algorithm` and `auth_data`, as creating or updating one takes them.
#[derive(Deserialize)]
pub struct VersionBody {
    pub algorithm: String,
    pub auth_data: Map<String, Value>,
    #[serde(default)]
    pub version: Option<String>,
}

impl KeyBackup {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn create_version(&self, user: &str, body: &VersionBody) -> Result<String> {
        let auth_data = Value::Object(body.auth_data.clone()).to_string();
        let version = self
            .store
            .create_backup_version(user, &body.algorithm, &auth_data)
            .await?;
        Ok(version.to_string())
    }

    /// The version named, or the latest one.
    pub async fn version(&self, user: &str, version: Option<&str>) -> Result<Value> {
        let found = match version {
            Some(raw) => Some(self.existing(user, raw).await?),
            None => self.store.backup_version(user, None).await?,
        };
        version_json(&found.ok_or_else(|| Error::NotFound("No current backup version".to_owned()))?)
    }

    pub async fn update_version(&self, user: &str, raw: &str, body: &VersionBody) -> Result<()> {
        if body.version.as_deref().is_some_and(|v| v != raw) {
            return Err(Error::InvalidParam(
                "The version in the body does not match the one in the path".to_owned(),
            ));
        }
        let existing = self.existing(user, raw).await?;
        if existing.algorithm != body.algorithm {
            return Err(Error::InvalidParam(
                "A backup version's algorithm cannot be changed".to_owned(),
            ));
        }
        let auth_data = Value::Object(body.auth_data.clone()).to_string();
        if !self
            .store
            .update_backup_version(user, existing.version, &auth_data)
            .await?
        {
            return Err(Error::NotFound(format!("Unknown backup version {raw}")));
        }
        Ok(())
    }

    pub async fn delete_version(&self, user: &str, raw: &str) -> Result<()> {
        if !self
            .store
            .delete_backup_version(user, parse_version(raw)?)
            .await?
        {
            return Err(Error::NotFound(format!("Unknown backup version {raw}")));
        }
        Ok(())
    }

    async fn existing(&self, user: &str, raw: &str) -> Result<BackupVersion> {
        self.store
            .backup_version(user, Some(parse_version(raw)?))
            .await?
            .ok_or_else(|| Error::NotFound(format!("Unknown backup version {raw}")))
    }

    /// Keys may be added only to the current version: a client still writing to an old one
    /// learns which is current (`M_WRONG_ROOM_KEYS_VERSION`).
    pub async fn put_keys(
        &self,
        user: &str,
        raw: &str,
        rooms: BTreeMap<String, RoomKeyBackup>,
    ) -> Result<Value> {
        let current = self
            .store
            .backup_version(user, None)
            .await?
            .ok_or_else(|| Error::NotFound(format!("Unknown backup version {raw}")))?;
        if current.version.to_string() != raw {
            self.existing(user, raw).await?;
            return Err(Error::WrongRoomKeysVersion {
                current_version: current.version.to_string(),
            });
        }
        let mut keys = Vec::new();
        for (room_id, room) in rooms {
            for (session_id, data) in room.sessions {
                keys.push(BackedUpKey {
                    room_id: room_id.clone(),
                    session_id,
                    first_message_index: data.first_message_index.into(),
                    forwarded_count: data.forwarded_count.into(),
                    is_verified: data.is_verified,
                    session_data: Value::Object(data.session_data).to_string(),
                });
            }
        }
        let counts = self
            .store
            .put_backed_up_keys(user, current.version, &keys, replaces)
            .await?;
        Ok(counts_json(counts))
    }

    /// The keys asked for, shaped as the scope's route answers: `{rooms}`, `{sessions}` or one
    /// `KeyBackupData`.
    pub async fn keys(&self, user: &str, raw: &str, scope: Scope<'_>) -> Result<Value> {
        let version = self.existing(user, raw).await?.version;
        let (room, session) = scope.parts();
        let keys = self.store.backed_up_keys(user, version, room, session).await?;
        let mut rooms: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        for key in &keys {
            rooms
                .entry(&key.room_id)
                .or_default()
                .insert(key.session_id.clone(), key_json(key)?);
        }
        Ok(match scope {
            Scope::All => {
                let rooms: Map<String, Value> = rooms
                    .into_iter()
                    .map(|(room, sessions)| (room.to_owned(), json!({ "sessions": sessions })))
                    .collect();
                json!({ "rooms": rooms })
            }
            Scope::Room(room) => json!({ "sessions": rooms.remove(room).unwrap_or_default() }),
            Scope::Session(..) => match keys.first() {
                Some(key) => key_json(key)?,
                None => return Err(Error::NotFound("No room key found for this session".to_owned())),
            },
        })
    }

    pub async fn delete_keys(&self, user: &str, raw: &str, scope: Scope<'_>) -> Result<Value> {
        let version = self.existing(user, raw).await?.version;
        let (room, session) = scope.parts();
        let counts = self
            .store
            .delete_backed_up_keys(user, version, room, session)
            .await?;
        Ok(counts_json(counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(is_verified: bool, first_message_index: i64, forwarded_count: i64) -> BackedUpKey {
        BackedUpKey {
            room_id: "!r:x".into(),
            session_id: "s".into(),
            first_message_index,
            forwarded_count,
            is_verified,
            session_data: "{}".into(),
        }
    }

    #[test]
    fn verified_beats_unverified_whatever_the_index() {
        assert!(replaces(&key(false, 0, 0), &key(true, 10, 5)));
        assert!(!replaces(&key(true, 10, 5), &key(false, 0, 0)));
    }

    #[test]
    fn then_the_earlier_first_message_then_fewer_forwards() {
        assert!(replaces(&key(true, 5, 0), &key(true, 4, 9)));
        assert!(!replaces(&key(true, 4, 9), &key(true, 5, 0)));
        assert!(replaces(&key(false, 4, 2), &key(false, 4, 1)));
        assert!(
            !replaces(&key(false, 4, 1), &key(false, 4, 1)),
            "an equal key changes nothing"
        );
    }

    #[test]
    fn versions_are_positive_numbers() {
        assert!(parse_version("3").is_ok());
        for bad in ["0", "-1", "abc", ""] {
            assert!(matches!(parse_version(bad), Err(Error::NotFound(_))), "{bad}");
        }
    }
}
