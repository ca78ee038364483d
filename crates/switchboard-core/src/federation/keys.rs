//! Signing keys between servers: this server's key document (`/_matrix/key/v2/server`), other
//! servers' keys — fetched through the configured notaries, then from the server itself, verified,
//! stored and cached until their `valid_until_ts` — and the answers this server gives as a notary
//! (`/_matrix/key/v2/query`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName,
    api::federation::discovery::{get_remote_server_keys_batch, get_server_keys},
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet},
};
use switchboard_store::{Store, StoredServerKey};

use super::{FederationError, client::FederationClient};
use crate::{
    config::{Config, OldSigningKey, TrustedKeyServer},
    keys::SigningKey,
    util::now_ms,
};

/// A server whose keys could not be fetched is not asked again for this long.
const FETCH_BACKOFF: Duration = Duration::from_secs(10);

pub struct KeyRing {
    server_name: OwnedServerName,
    key: Arc<SigningKey>,
    old_keys: BTreeMap<String, OldSigningKey>,
    refresh: Duration,
    notaries: Vec<TrustedKeyServer>,
    store: Store,
    client: Arc<FederationClient>,
    /// Keys known per server, loaded from the store on first use.
    cache: Mutex<HashMap<OwnedServerName, Vec<StoredServerKey>>>,
    /// One fetch per server at a time; the time of its last failure.
    fetches: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

impl KeyRing {
    pub fn new(
        config: &Config,
        server_name: OwnedServerName,
        key: Arc<SigningKey>,
        store: Store,
        client: Arc<FederationClient>,
    ) -> Self {
        Self {
            server_name,
            key,
            old_keys: config.old_signing_keys.clone(),
            refresh: config.key_refresh_interval.as_duration(),
            notaries: config.trusted_key_servers.clone(),
            store,
            client,
            cache: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
        }
    }

    /// This server's key document, signed, valid for `key_refresh_interval`.
    pub fn own_keys(&self) -> CanonicalJsonObject {
        let key_id = format!("ed25519:{}", self.key.key_pair.version());
        let mut verify_keys = CanonicalJsonObject::new();
        verify_keys.insert(
            key_id,
            key_object(&STANDARD_NO_PAD.encode(self.key.key_pair.public_key()), None),
        );
        let old: CanonicalJsonObject = self
            .old_keys
            .iter()
            .map(|(id, old)| {
                (
                    id.clone(),
                    key_object(old.key.trim_end_matches('='), Some(old.expired_ts)),
                )
            })
            .collect();
        let valid_until = now_ms().saturating_add(self.refresh.as_millis() as u64);
        let mut document = CanonicalJsonObject::from([
            (
                "server_name".to_owned(),
                CanonicalJsonValue::String(self.server_name.to_string()),
            ),
            ("verify_keys".to_owned(), CanonicalJsonValue::Object(verify_keys)),
            ("old_verify_keys".to_owned(), CanonicalJsonValue::Object(old)),
            ("valid_until_ts".to_owned(), int(valid_until)),
        ]);
        self.sign(&mut document);
        document
    }

    fn sign(&self, object: &mut CanonicalJsonObject) {
        // Signing canonical JSON that has a `signatures` object of the right shape cannot fail.
        if let Err(e) = ruma::signatures::sign_json(self.server_name.as_str(), &self.key.key_pair, object) {
            tracing::error!(error = %e, "cannot sign a key document");
        }
    }

    /// The public key `key_id` of `server`, usable for a signature made at `valid_at` (ms):
    /// a current key vouched for until then, or an old key that expired after it.
    pub async fn key(
        &self,
        server: &ServerName,
        key_id: &str,
        valid_at: u64,
    ) -> Result<Base64, FederationError> {
        let mut keys = self.keys(server, &[key_id], valid_at).await?;
        keys.remove(key_id).ok_or_else(|| {
            FederationError::KeyNotFound(format!("{server} has no key {key_id} valid at {valid_at}"))
        })
    }

    /// The keys among `key_ids` of `server` usable at `valid_at`, fetching once when one is
    /// missing or out of date; what cannot be found is left out.
    pub async fn keys(
        &self,
        server: &ServerName,
        key_ids: &[&str],
        valid_at: u64,
    ) -> Result<PublicKeySet, FederationError> {
        if server == self.server_name {
            return Ok(self.own_key_set(key_ids));
        }
        let found = self.known(server, key_ids, valid_at).await?;
        if found.len() == key_ids.len() {
            return Ok(found);
        }
        let lock = {
            let mut fetches = self.fetches.lock().map_err(|_| poisoned())?;
            fetches.entry(server.to_owned()).or_default().clone()
        };
        let mut last_failure = lock.lock().await;
        // Another request may have fetched them meanwhile.
        let found = self.known(server, key_ids, valid_at).await?;
        if found.len() == key_ids.len() || last_failure.is_some_and(|t| t.elapsed() < FETCH_BACKOFF) {
            return Ok(found);
        }
        match self.fetch(server).await {
            Ok(()) => *last_failure = None,
            Err(e) => {
                tracing::warn!(%server, error = %e, "cannot fetch the server's signing keys");
                *last_failure = Some(Instant::now());
            }
        }
        self.known(server, key_ids, valid_at).await
    }

    /// `keys` as the map ruma's verification functions take.
    pub async fn key_map(
        &self,
        server: &ServerName,
        key_ids: &[&str],
        valid_at: u64,
    ) -> Result<PublicKeyMap, FederationError> {
        let set = self.keys(server, key_ids, valid_at).await?;
        Ok(PublicKeyMap::from([(server.to_string(), set)]))
    }

    fn own_key_set(&self, key_ids: &[&str]) -> PublicKeySet {
        let current = format!("ed25519:{}", self.key.key_pair.version());
        let mut set = PublicKeySet::new();
        if key_ids.contains(&current.as_str()) {
            set.insert(current, Base64::new(self.key.key_pair.public_key().to_vec()));
        }
        for (id, old) in &self.old_keys {
            if key_ids.contains(&id.as_str())
                && let Some(bytes) = crate::config::decode_key(&old.key)
            {
                set.insert(id.clone(), Base64::new(bytes.to_vec()));
            }
        }
        set
    }

    async fn known(
        &self,
        server: &ServerName,
        key_ids: &[&str],
        valid_at: u64,
    ) -> Result<PublicKeySet, FederationError> {
        let cached = self.cache.lock().map_err(|_| poisoned())?.get(server).cloned();
        let keys = match cached {
            Some(keys) => keys,
            None => {
                let keys = self.store.server_keys(server.as_str()).await?;
                self.cache
                    .lock()
                    .map_err(|_| poisoned())?
                    .insert(server.to_owned(), keys.clone());
                keys
            }
        };
        let valid_at = valid_at as i64;
        Ok(keys
            .into_iter()
            .filter(|k| key_ids.contains(&k.key_id.as_str()))
            .filter(|k| match k.expired_ts {
                None => k.valid_until_ts >= valid_at,
                Some(expired) => expired >= valid_at,
            })
            .filter_map(|k| Some((k.key_id, Base64::parse(k.verify_key).ok()?)))
            .collect())
    }

    /// Asks the notaries, then the server itself; stops at the first good answer.
    async fn fetch(&self, server: &ServerName) -> Result<(), FederationError> {
        let mut last_error = None;
        for notary in &self.notaries {
            let Ok(notary_name) = ServerName::parse(&notary.server_name) else {
                continue;
            };
            if notary_name == server || notary_name == self.server_name {
                continue;
            }
            let request = get_remote_server_keys_batch::v2::Request::new(BTreeMap::from([(
                server.to_owned(),
                BTreeMap::new(),
            )]));
            match self.client.send(&notary_name, request).await {
                Ok(response) => {
                    let mut any = false;
                    for raw in response.server_keys {
                        match self.accept(server, raw.json().get(), Some(notary)).await {
                            Ok(()) => any = true,
                            Err(e) => last_error = Some(e),
                        }
                    }
                    if any {
                        return Ok(());
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        match self
            .client
            .send(server, get_server_keys::v2::Request::new())
            .await
        {
            Ok(response) => self.accept(server, response.server_key.json().get(), None).await,
            Err(e) => Err(last_error.map_or(e, |notary| {
                FederationError::KeyNotFound(format!("{notary}; and directly"))
            })),
        }
    }

    /// Verifies one key response (self-signed by `server`; with a notary's `verify_keys`, signed
    /// by the notary too) and records its keys.
    async fn accept(
        &self,
        server: &ServerName,
        json: &str,
        notary: Option<&TrustedKeyServer>,
    ) -> Result<(), FederationError> {
        let bad = |why: String| FederationError::BadResponse(format!("keys of {server}: {why}"));
        let object: CanonicalJsonObject = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        if value["server_name"].as_str() != Some(server.as_str()) {
            return Err(bad(format!("the response is for {}", value["server_name"])));
        }
        let valid_until = value["valid_until_ts"]
            .as_i64()
            .ok_or_else(|| bad("no valid_until_ts".to_owned()))?;
        let mut keys = Vec::new();
        let mut current = PublicKeySet::new();
        for (key_id, key) in value["verify_keys"].as_object().into_iter().flatten() {
            let key = key["key"]
                .as_str()
                .ok_or_else(|| bad(format!("{key_id} has no key")))?;
            let decoded = Base64::parse(key).map_err(|_| bad(format!("{key_id} is not base64")))?;
            current.insert(key_id.clone(), decoded);
            keys.push(StoredServerKey {
                key_id: key_id.clone(),
                verify_key: key.to_owned(),
                valid_until_ts: valid_until,
                expired_ts: None,
            });
        }
        for (key_id, old) in value["old_verify_keys"].as_object().into_iter().flatten() {
            let (Some(key), Some(expired)) = (old["key"].as_str(), old["expired_ts"].as_i64()) else {
                return Err(bad(format!("old key {key_id} lacks key or expired_ts")));
            };
            keys.push(StoredServerKey {
                key_id: key_id.clone(),
                verify_key: key.to_owned(),
                valid_until_ts: expired,
                expired_ts: Some(expired),
            });
        }
        if current.is_empty() {
            return Err(bad("no verify_keys".to_owned()));
        }
        // Signed by the server with one of the keys it lists.
        let mut entities = PublicKeyMap::from([(server.to_string(), current)]);
        verify_signatures_of(&object, &entities).map_err(|e| bad(format!("bad self-signature: {e}")))?;
        if let Some(notary) = notary
            && let Some(verify_keys) = &notary.verify_keys
        {
            let set: PublicKeySet = verify_keys
                .iter()
                .filter_map(|(id, key)| {
                    Some((id.clone(), Base64::new(crate::config::decode_key(key)?.to_vec())))
                })
                .collect();
            entities = PublicKeyMap::from([(notary.server_name.clone(), set)]);
            verify_signatures_of(&object, &entities)
                .map_err(|e| bad(format!("bad notary signature: {e}")))?;
        }
        self.store
            .save_server_keys(server.as_str(), &keys, json, valid_until)
            .await?;
        let stored = self.store.server_keys(server.as_str()).await?;
        self.cache
            .lock()
            .map_err(|_| poisoned())?
            .insert(server.to_owned(), stored);
        Ok(())
    }

    /// The notary answer for `server`: its newest key response valid until
    /// `minimum_valid_until_ts` (fetched from it when the stored one is older), signed by this
    /// server too. `None` when nothing is known.
    pub async fn notary_answer(
        &self,
        server: &ServerName,
        minimum_valid_until_ts: u64,
    ) -> Result<Option<CanonicalJsonObject>, FederationError> {
        if server == self.server_name {
            return Ok(Some(self.own_keys()));
        }
        let stored = self.store.server_key_response(server.as_str()).await?;
        let fresh = stored
            .as_ref()
            .is_some_and(|(_, until)| *until >= minimum_valid_until_ts as i64 && *until > now_ms() as i64);
        let stored = if fresh {
            stored
        } else {
            match self
                .client
                .send(server, get_server_keys::v2::Request::new())
                .await
            {
                Ok(response) => match self.accept(server, response.server_key.json().get(), None).await {
                    Ok(()) => Some((response.server_key.json().get().to_owned(), 0)),
                    Err(e) => {
                        tracing::info!(%server, error = %e, "notary: the server's keys do not verify");
                        stored
                    }
                },
                // What we have is better than nothing: the asker checks valid_until_ts itself.
                Err(_) => stored,
            }
        };
        let Some((json, _)) = stored else {
            return Ok(None);
        };
        let mut object: CanonicalJsonObject = serde_json::from_str(&json)
            .map_err(|e| FederationError::Internal(format!("stored key response: {e}")))?;
        self.sign(&mut object);
        Ok(Some(object))
    }
}

/// Checks the signatures of exactly the entities in `keys` (a notary's signature beside the
/// origin's is no reason to fail, nor is the origin's beside the notary's).
fn verify_signatures_of(
    object: &CanonicalJsonObject,
    keys: &PublicKeyMap,
) -> Result<(), ruma::signatures::VerificationError> {
    let mut object = object.clone();
    if let Some(CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") {
        signatures.retain(|entity, _| keys.contains_key(entity));
    }
    ruma::signatures::verify_json(keys, &object)
}

fn key_object(key: &str, expired_ts: Option<u64>) -> CanonicalJsonValue {
    let mut object =
        CanonicalJsonObject::from([("key".to_owned(), CanonicalJsonValue::String(key.to_owned()))]);
    if let Some(ts) = expired_ts {
        object.insert("expired_ts".to_owned(), int(ts));
    }
    CanonicalJsonValue::Object(object)
}

fn int(value: u64) -> CanonicalJsonValue {
    CanonicalJsonValue::Integer(ruma::Int::try_from(value).unwrap_or(ruma::Int::MAX))
}

fn poisoned() -> FederationError {
    FederationError::Internal("a key cache lock was poisoned".to_owned())
}
