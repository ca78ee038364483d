//! A crypto store that survives restarts: matrix-sdk-crypto's `MemoryStore` answers every
//! question, and what cannot be learnt again from the homeserver is also written to a directory
//! — the Olm account, Olm sessions, Megolm inbound sessions, the cross-signing identity, the
//! tracked users and custom values — one file per item, each written to a temporary file, synced
//! and renamed into place. Devices and identities are asked for again after a restart (tracked
//! users are marked outdated), outbound sessions are started anew.
//!
//! (matrix-sdk-sqlite would link a second SQLite library, which the workspace's sqlx forbids.)

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use matrix_sdk_common::cross_process_lock::CrossProcessLockGeneration;
use matrix_sdk_crypto::{
    Account, DeviceData, GossipRequest, SecretInfo, UserIdentityData,
    olm::{
        InboundGroupSession, OlmMessageHash, OutboundGroupSession, PickledAccount,
        PickledCrossSigningIdentity, PickledInboundGroupSession, PickledSession, PrivateCrossSigningIdentity,
        SenderDataType, Session,
    },
    store::{
        CryptoStore, CryptoStoreError, MemoryStore,
        types::{
            BackupKeys, Changes, DehydratedDeviceKey, PendingChanges, RoomKeyCounts, RoomKeyWithheldEntry,
            RoomPendingKeyBundleDetails, RoomSettings, StoredRoomKeyBundleData, TrackedUser,
        },
    },
    vodozemac::Curve25519PublicKey,
};
use ruma_crypto::{
    DeviceId, OwnedDeviceId, OwnedUserId, RoomId, TransactionId, UserId, events::secret::request::SecretName,
};
use serde::{Serialize, de::DeserializeOwned};
use zeroize::Zeroizing;

type Result<T, E = CryptoStoreError> = std::result::Result<T, E>;

#[derive(Debug)]
pub(crate) struct FileCryptoStore {
    inner: MemoryStore,
    dir: PathBuf,
}

/// `MemoryStore` never fails.
fn never(e: std::convert::Infallible) -> CryptoStoreError {
    match e {}
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> CryptoStoreError {
    CryptoStoreError::backend(e)
}

/// A file name for IDs of any length and characters (a hash: file names are limited to 255
/// bytes, room and session IDs are not).
pub(super) fn file_name(parts: &[&str]) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{digest}.json")
}

/// Creates a directory (and its parents) only its owner may read: it holds private keys.
pub(super) fn private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Writes `value` as JSON to `path` whole or not at all: a temporary file of its own (writers
/// of the same item may race), readable by its owner only, synced, renamed into place, and the
/// directory synced so the rename survives a crash.
pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    use std::{
        io::Write as _,
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let text = serde_json::to_vec(value).map_err(backend)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(backend)?;
        file.write_all(&text).map_err(backend)?;
        file.sync_all().map_err(backend)?;
    }
    std::fs::rename(&tmp, path).map_err(backend)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(backend)?;
    }
    Ok(())
}

pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(backend)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

/// Every JSON file of a directory, parsed; one that cannot be read is skipped with a warning
/// (losing one session beats losing the device).
fn read_all<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(backend)? {
        let path = entry.map_err(backend)?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match read_json(&path) {
            Ok(Some(item)) => out.push(item),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable crypto store file")
            }
        }
    }
    Ok(out)
}

impl FileCryptoStore {
    /// Opens (or creates) the store in `dir`, loading what an earlier run kept.
    pub(crate) async fn open(dir: &Path) -> Result<Self> {
        for sub in ["sessions", "inbound", "custom"] {
            private_dir(&dir.join(sub)).map_err(backend)?;
        }
        let store = Self {
            inner: MemoryStore::new(),
            dir: dir.to_owned(),
        };
        let Some(pickle) = read_json::<PickledAccount>(&dir.join("account.json"))? else {
            return Ok(store);
        };
        let account = Account::from_pickle(pickle).map_err(backend)?;
        let device_keys = account.device_keys();
        store
            .inner
            .save_pending_changes(PendingChanges {
                account: Some(account),
            })
            .await?;
        let mut changes = Changes::default();
        for pickle in read_all::<PickledSession>(&dir.join("sessions"))? {
            changes
                .sessions
                .push(Session::from_pickle(device_keys.clone(), pickle).map_err(backend)?);
        }
        for pickle in read_all::<PickledInboundGroupSession>(&dir.join("inbound"))? {
            changes
                .inbound_group_sessions
                .push(InboundGroupSession::from_pickle(pickle).map_err(backend)?);
        }
        if let Some(pickle) = read_json::<PickledCrossSigningIdentity>(&dir.join("identity.json"))? {
            changes.private_identity =
                Some(PrivateCrossSigningIdentity::from_pickle(pickle).map_err(backend)?);
        }
        store.inner.save_changes(changes).await.map_err(never)?;
        if let Some(tracked) = read_json::<Vec<(OwnedUserId, bool)>>(&dir.join("tracked_users.json"))? {
            // Outdated all: device lists may have changed while the service was down.
            let users: Vec<(&UserId, bool)> = tracked.iter().map(|(u, _)| (u.as_ref(), true)).collect();
            store.inner.save_tracked_users(&users).await.map_err(never)?;
        }
        for (key, value) in read_all::<(String, Vec<u8>)>(&dir.join("custom"))? {
            store.inner.set_custom_value(&key, value).await.map_err(never)?;
        }
        Ok(store)
    }

    async fn keep_sessions(&self, sessions: &[Session]) -> Result<()> {
        for session in sessions {
            let pickle = session.pickle().await;
            let name = file_name(&[&session.sender_key.to_base64(), session.session_id()]);
            write_json(&self.dir.join("sessions").join(name), &pickle)?;
        }
        Ok(())
    }

    async fn keep_inbound(&self, sessions: &[InboundGroupSession]) -> Result<()> {
        for session in sessions {
            let pickle = session.pickle().await;
            let name = file_name(&[session.room_id().as_str(), session.session_id()]);
            write_json(&self.dir.join("inbound").join(name), &pickle)?;
        }
        Ok(())
    }

    async fn keep_tracked_users(&self) -> Result<()> {
        let tracked: Vec<(OwnedUserId, bool)> = self
            .inner
            .load_tracked_users()
            .await?
            .into_iter()
            .map(|t| (t.user_id, t.dirty))
            .collect();
        write_json(&self.dir.join("tracked_users.json"), &tracked)
    }
}

#[async_trait]
impl CryptoStore for FileCryptoStore {
    type Error = CryptoStoreError;

    async fn load_account(&self) -> Result<Option<Account>> {
        self.inner.load_account().await.map_err(never)
    }

    async fn load_identity(&self) -> Result<Option<PrivateCrossSigningIdentity>> {
        self.inner.load_identity().await.map_err(never)
    }

    async fn save_changes(&self, changes: Changes) -> Result<()> {
        self.keep_sessions(&changes.sessions).await?;
        self.keep_inbound(&changes.inbound_group_sessions).await?;
        if let Some(identity) = &changes.private_identity {
            write_json(&self.dir.join("identity.json"), &identity.pickle().await)?;
        }
        self.inner.save_changes(changes).await.map_err(never)
    }

    async fn save_pending_changes(&self, changes: PendingChanges) -> Result<()> {
        if let Some(account) = &changes.account {
            write_json(&self.dir.join("account.json"), &account.pickle())?;
        }
        self.inner.save_pending_changes(changes).await.map_err(never)
    }

    async fn save_inbound_group_sessions(
        &self,
        sessions: Vec<InboundGroupSession>,
        backed_up_to_version: Option<&str>,
    ) -> Result<()> {
        self.keep_inbound(&sessions).await?;
        self.inner
            .save_inbound_group_sessions(sessions, backed_up_to_version)
            .await
            .map_err(never)
    }

    async fn get_sessions(&self, sender_key: &str) -> Result<Option<Vec<Session>>> {
        self.inner.get_sessions(sender_key).await.map_err(never)
    }

    async fn get_inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSession>> {
        self.inner
            .get_inbound_group_session(room_id, session_id)
            .await
            .map_err(never)
    }

    async fn get_inbound_group_sessions(&self) -> Result<Vec<InboundGroupSession>> {
        self.inner.get_inbound_group_sessions().await.map_err(never)
    }

    async fn get_inbound_group_sessions_by_room_id(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inner
            .get_inbound_group_sessions_by_room_id(room_id)
            .await
            .map_err(never)
    }

    async fn get_inbound_group_sessions_for_device_batch(
        &self,
        curve_key: Curve25519PublicKey,
        sender_data_type: SenderDataType,
        after_session_id: Option<String>,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inner
            .get_inbound_group_sessions_for_device_batch(curve_key, sender_data_type, after_session_id, limit)
            .await
            .map_err(never)
    }

    async fn inbound_group_session_counts(&self, backup_version: Option<&str>) -> Result<RoomKeyCounts> {
        self.inner
            .inbound_group_session_counts(backup_version)
            .await
            .map_err(never)
    }

    async fn inbound_group_sessions_for_backup(
        &self,
        backup_version: &str,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inner
            .inbound_group_sessions_for_backup(backup_version, limit)
            .await
            .map_err(never)
    }

    async fn mark_inbound_group_sessions_as_backed_up(
        &self,
        backup_version: &str,
        room_and_session_ids: &[(&RoomId, &str)],
    ) -> Result<()> {
        self.inner
            .mark_inbound_group_sessions_as_backed_up(backup_version, room_and_session_ids)
            .await
            .map_err(never)
    }

    async fn reset_backup_state(&self) -> Result<()> {
        self.inner.reset_backup_state().await.map_err(never)
    }

    async fn load_backup_keys(&self) -> Result<BackupKeys> {
        self.inner.load_backup_keys().await.map_err(never)
    }

    async fn load_dehydrated_device_pickle_key(&self) -> Result<Option<DehydratedDeviceKey>> {
        self.inner
            .load_dehydrated_device_pickle_key()
            .await
            .map_err(never)
    }

    async fn delete_dehydrated_device_pickle_key(&self) -> Result<()> {
        self.inner
            .delete_dehydrated_device_pickle_key()
            .await
            .map_err(never)
    }

    async fn get_outbound_group_session(&self, room_id: &RoomId) -> Result<Option<OutboundGroupSession>> {
        self.inner
            .get_outbound_group_session(room_id)
            .await
            .map_err(never)
    }

    async fn load_tracked_users(&self) -> Result<Vec<TrackedUser>> {
        self.inner.load_tracked_users().await.map_err(never)
    }

    async fn save_tracked_users(&self, users: &[(&UserId, bool)]) -> Result<()> {
        self.inner.save_tracked_users(users).await.map_err(never)?;
        self.keep_tracked_users().await
    }

    async fn get_device(&self, user_id: &UserId, device_id: &DeviceId) -> Result<Option<DeviceData>> {
        self.inner.get_device(user_id, device_id).await.map_err(never)
    }

    async fn get_user_devices(&self, user_id: &UserId) -> Result<HashMap<OwnedDeviceId, DeviceData>> {
        self.inner.get_user_devices(user_id).await.map_err(never)
    }

    async fn get_own_device(&self) -> Result<DeviceData> {
        self.inner.get_own_device().await.map_err(never)
    }

    async fn get_user_identity(&self, user_id: &UserId) -> Result<Option<UserIdentityData>> {
        self.inner.get_user_identity(user_id).await.map_err(never)
    }

    async fn is_message_known(&self, message_hash: &OlmMessageHash) -> Result<bool> {
        self.inner.is_message_known(message_hash).await.map_err(never)
    }

    async fn get_outgoing_secret_requests(
        &self,
        request_id: &TransactionId,
    ) -> Result<Option<GossipRequest>> {
        self.inner
            .get_outgoing_secret_requests(request_id)
            .await
            .map_err(never)
    }

    async fn get_secret_request_by_info(&self, secret_info: &SecretInfo) -> Result<Option<GossipRequest>> {
        self.inner
            .get_secret_request_by_info(secret_info)
            .await
            .map_err(never)
    }

    async fn get_unsent_secret_requests(&self) -> Result<Vec<GossipRequest>> {
        self.inner.get_unsent_secret_requests().await.map_err(never)
    }

    async fn delete_outgoing_secret_requests(&self, request_id: &TransactionId) -> Result<()> {
        self.inner
            .delete_outgoing_secret_requests(request_id)
            .await
            .map_err(never)
    }

    async fn get_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<Vec<Zeroizing<String>>> {
        self.inner
            .get_secrets_from_inbox(secret_name)
            .await
            .map_err(never)
    }

    async fn delete_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<()> {
        self.inner
            .delete_secrets_from_inbox(secret_name)
            .await
            .map_err(never)
    }

    async fn get_withheld_info(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<RoomKeyWithheldEntry>> {
        self.inner
            .get_withheld_info(room_id, session_id)
            .await
            .map_err(never)
    }

    async fn get_withheld_sessions_by_room_id(&self, room_id: &RoomId) -> Result<Vec<RoomKeyWithheldEntry>> {
        self.inner
            .get_withheld_sessions_by_room_id(room_id)
            .await
            .map_err(never)
    }

    async fn get_room_settings(&self, room_id: &RoomId) -> Result<Option<RoomSettings>> {
        self.inner.get_room_settings(room_id).await.map_err(never)
    }

    async fn get_received_room_key_bundle_data(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<StoredRoomKeyBundleData>> {
        self.inner
            .get_received_room_key_bundle_data(room_id, user_id)
            .await
            .map_err(never)
    }

    async fn has_downloaded_all_room_keys(&self, room_id: &RoomId) -> Result<bool> {
        self.inner
            .has_downloaded_all_room_keys(room_id)
            .await
            .map_err(never)
    }

    async fn get_pending_key_bundle_details_for_room(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<RoomPendingKeyBundleDetails>> {
        self.inner
            .get_pending_key_bundle_details_for_room(room_id)
            .await
            .map_err(never)
    }

    async fn get_all_rooms_pending_key_bundles(&self) -> Result<Vec<RoomPendingKeyBundleDetails>> {
        self.inner
            .get_all_rooms_pending_key_bundles()
            .await
            .map_err(never)
    }

    async fn get_custom_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get_custom_value(key).await.map_err(never)
    }

    async fn set_custom_value(&self, key: &str, value: Vec<u8>) -> Result<()> {
        write_json(&self.dir.join("custom").join(file_name(&[key])), &(key, &value))?;
        self.inner.set_custom_value(key, value).await.map_err(never)
    }

    async fn remove_custom_value(&self, key: &str) -> Result<()> {
        match std::fs::remove_file(self.dir.join("custom").join(file_name(&[key]))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(backend(e)),
            _ => {}
        }
        self.inner.remove_custom_value(key).await.map_err(never)
    }

    async fn try_take_leased_lock(
        &self,
        lease_duration_ms: u32,
        key: &str,
        holder: &str,
    ) -> Result<Option<CrossProcessLockGeneration>> {
        self.inner
            .try_take_leased_lock(lease_duration_ms, key, holder)
            .await
            .map_err(never)
    }

    async fn next_batch_token(&self) -> Result<Option<String>> {
        self.inner.next_batch_token().await.map_err(never)
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await.map_err(never)
    }

    async fn reopen(&self) -> Result<()> {
        self.inner.reopen().await.map_err(never)
    }

    async fn get_size(&self) -> Result<Option<usize>> {
        self.inner.get_size().await.map_err(never)
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk_crypto::OlmMachine;
    use ruma_crypto::{device_id, user_id};

    use super::FileCryptoStore;

    #[tokio::test]
    async fn a_device_keeps_its_identity_and_tracked_users_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (user, device) = (user_id!("@bot:example.org"), device_id!("SBDEVICE"));
        let alice = user_id!("@alice:example.org");
        let keys = {
            let store = FileCryptoStore::open(dir.path()).await.expect("open");
            let machine = OlmMachine::with_store(user, device, store, None)
                .await
                .expect("machine");
            machine.update_tracked_users([alice]).await.expect("track");
            machine.identity_keys()
        };
        let store = FileCryptoStore::open(dir.path()).await.expect("reopen");
        let machine = OlmMachine::with_store(user, device, store, None)
            .await
            .expect("the same account");
        let again = machine.identity_keys();
        assert_eq!(
            (again.ed25519.to_base64(), again.curve25519.to_base64()),
            (keys.ed25519.to_base64(), keys.curve25519.to_base64()),
            "the same identity keys"
        );
        assert!(
            machine.tracked_users().await.expect("tracked").contains(alice),
            "tracked users are kept"
        );
        // Another device's account in the same directory is refused, not mixed up.
        let store = FileCryptoStore::open(dir.path()).await.expect("reopen");
        assert!(
            OlmMachine::with_store(user, device_id!("OTHER"), store, None)
                .await
                .is_err()
        );
    }
}
