//! Accounts, devices and access tokens: registration, password login, logout.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use ruma::{OwnedServerName, OwnedUserId, UserId};
use serde_json::Value;
use switchboard_store::{NewUser, Store};

use crate::{
    Error, Result,
    appservice::AppService,
    util::{now_ms, random_string, sha256_hex},
};

/// Who an access token belongs to.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub is_admin: bool,
    /// Set when the request came with an application service's `as_token`.
    pub appservice: Option<Arc<AppService>>,
}

impl Session {
    /// Whether rate limits apply: never to a service's sender, nor to its users when the
    /// registration says `rate_limited: false`.
    pub fn rate_limited(&self) -> bool {
        match &self.appservice {
            Some(service) => self.user_id != service.sender && service.registration.rate_limited,
            None => true,
        }
    }

    /// The service acting owns this user exclusively (its sender, or its exclusive users
    /// namespace): only then may it skip the user-interactive auth a human would need.
    pub fn service_owns_user(&self) -> bool {
        self.appservice
            .as_ref()
            .is_some_and(|s| s.owns_user_exclusively(self.user_id.as_str()))
    }

    /// Device creation and deletion without user-interactive auth (MSC4190): for services that
    /// opted in with `io.element.msc4190: true`, on users they own exclusively — Synapse's gate.
    pub fn service_manages_devices(&self) -> bool {
        self.service_owns_user() && self.appservice.as_ref().is_some_and(|s| s.registration.msc4190)
    }
}

pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    /// The `auth` dict of user-interactive authentication.
    pub auth: Option<Value>,
}

pub struct LoggedIn {
    pub user_id: OwnedUserId,
    pub access_token: Option<String>,
    pub device_id: Option<String>,
}

pub struct Accounts {
    store: Store,
    server_name: OwnedServerName,
    /// Token hash → session; the database is the truth, this saves a query per request.
    sessions: RwLock<SessionCache>,
}

/// At most this many sessions are cached; a full cache starts over (it refills from the
/// database, one query per token).
const MAX_CACHED_SESSIONS: usize = 100_000;

#[derive(Default)]
struct SessionCache {
    by_token: HashMap<String, Session>,
    /// Bumped by every change that forgets sessions, under the write lock: a lookup that read
    /// the database before the change may not cache what it read after it.
    generation: u64,
}

const USERNAME_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789._=-/+";

impl Accounts {
    pub fn new(store: Store, server_name: OwnedServerName) -> Self {
        Self {
            store,
            server_name,
            sessions: RwLock::new(SessionCache::default()),
        }
    }

    /// Validates a requested localpart the way Synapse does and builds the user ID.
    pub fn user_id_for(&self, localpart: &str) -> Result<OwnedUserId> {
        if localpart.is_empty() {
            return Err(Error::InvalidUsername("User ID cannot be empty".to_owned()));
        }
        if localpart.starts_with('_') {
            return Err(Error::InvalidUsername("User ID may not begin with _".to_owned()));
        }
        if !localpart.chars().all(|c| USERNAME_CHARS.contains(c)) {
            return Err(Error::InvalidUsername(
                "User ID can only contain characters a-z, 0-9, or '=_-./+'".to_owned(),
            ));
        }
        let user_id = format!("@{localpart}:{}", self.server_name);
        if user_id.len() > 255 {
            return Err(Error::InvalidUsername(
                "User ID may not be longer than 255 characters".to_owned(),
            ));
        }
        OwnedUserId::try_from(user_id).map_err(|e| Error::InvalidUsername(e.to_string()))
    }

    /// Accepts a localpart or a full user ID of this server.
    pub fn parse_user(&self, user: &str) -> Result<OwnedUserId> {
        if user.starts_with('@') {
            let id = OwnedUserId::try_from(user).map_err(|e| Error::InvalidParam(e.to_string()))?;
            if id.server_name() != self.server_name {
                return Err(Error::InvalidParam(format!("{id} is not a user of this server")));
            }
            // Password logins are case-insensitive, as in Synapse; local IDs are stored lowercase.
            OwnedUserId::try_from(format!("@{}:{}", id.localpart().to_lowercase(), self.server_name))
                .map_err(|e| Error::InvalidParam(e.to_string()))
        } else {
            OwnedUserId::try_from(format!("@{}:{}", user.to_lowercase(), self.server_name))
                .map_err(|e| Error::InvalidParam(e.to_string()))
        }
    }

    /// `GET /register/available`.
    pub async fn username_available(&self, localpart: &str) -> Result<()> {
        let user_id = self.user_id_for(&localpart.to_lowercase())?;
        if self.store.user(user_id.as_str()).await?.is_some() {
            return Err(Error::UserInUse);
        }
        Ok(())
    }

    /// `POST /register` with user-interactive auth (`m.login.dummy`).
    pub async fn register(&self, request: Registration) -> Result<LoggedIn> {
        let localpart = match &request.username {
            // Synapse lowercases the requested name rather than refusing capitals.
            Some(name) => name.to_lowercase(),
            None => random_string(12).to_lowercase(),
        };
        // Check the name before auth, so clients learn about a taken name at the first request.
        self.username_available(&localpart).await?;
        let stage = request
            .auth
            .as_ref()
            .and_then(|a| a.get("type"))
            .and_then(Value::as_str);
        match stage {
            Some("m.login.dummy") => {}
            other => {
                let session = request
                    .auth
                    .as_ref()
                    .and_then(|a| a.get("session"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| random_string(24));
                return Err(Error::UiaRequired {
                    session,
                    flows: vec![vec!["m.login.dummy".to_owned()]],
                    error: other.map(|t| ("M_UNRECOGNIZED", format!("Unsupported authentication stage {t}"))),
                });
            }
        }
        let password = request
            .password
            .ok_or_else(|| Error::MissingParam("Missing password".to_owned()))?;
        let user_id = self.create_user(&localpart, Some(&password), false).await?;
        if request.inhibit_login {
            return Ok(LoggedIn {
                user_id,
                access_token: None,
                device_id: None,
            });
        }
        let (token, device) = self
            .new_session(
                &user_id,
                request.device_id,
                request.initial_device_display_name.as_deref(),
            )
            .await?;
        Ok(LoggedIn {
            user_id,
            access_token: Some(token),
            device_id: Some(device),
        })
    }

    /// Creates an account (used by `/register` and the `register-user` command).
    pub async fn create_user(
        &self,
        localpart: &str,
        password: Option<&str>,
        admin: bool,
    ) -> Result<OwnedUserId> {
        let user_id = self.user_id_for(localpart)?;
        let hash = match password {
            Some(password) => Some(hash_password(password.to_owned()).await?),
            None => None,
        };
        let created = self
            .store
            .create_user(&NewUser {
                user_id: user_id.as_str(),
                password_hash: hash.as_deref(),
                is_admin: admin,
                appservice_id: None,
                created_ts: now_ms() as i64,
            })
            .await?;
        if !created {
            return Err(Error::UserInUse);
        }
        tracing::info!(%user_id, admin, "user registered");
        Ok(user_id)
    }

    /// `m.login.application_service` registration of a user in a service's namespace: no UIA, no
    /// password, and none of the localpart rules humans get (bridges rely on odd IDs).
    pub async fn register_for_service(
        &self,
        service: &AppService,
        user_id: &UserId,
        device_id: Option<String>,
        display_name: Option<&str>,
        inhibit_login: bool,
    ) -> Result<LoggedIn> {
        let owned = service
            .owns_user_exclusively(user_id.as_str())
            .then(|| service.id());
        let created = self
            .store
            .create_user(&NewUser {
                user_id: user_id.as_str(),
                password_hash: None,
                is_admin: false,
                appservice_id: owned,
                created_ts: now_ms() as i64,
            })
            .await?;
        if !created {
            return Err(Error::UserInUse);
        }
        tracing::info!(%user_id, service = service.id(), "application service registered a user");
        if inhibit_login {
            return Ok(LoggedIn {
                user_id: user_id.to_owned(),
                access_token: None,
                device_id: None,
            });
        }
        let (token, device) = self.new_session(user_id, device_id, display_name).await?;
        Ok(LoggedIn {
            user_id: user_id.to_owned(),
            access_token: Some(token),
            device_id: Some(device),
        })
    }

    /// `m.login.application_service` login of an existing user in the service's namespace.
    pub async fn login_for_service(
        &self,
        service: &AppService,
        user_id: &UserId,
        device_id: Option<String>,
        display_name: Option<&str>,
    ) -> Result<LoggedIn> {
        if !service.owns_user(user_id.as_str()) {
            return Err(Error::Exclusive(format!(
                "{user_id} is not in the application service's namespace"
            )));
        }
        if self.store.user(user_id.as_str()).await?.is_none() {
            return Err(Error::Forbidden(format!("{user_id} is not registered")));
        }
        let (token, device) = self.new_session(user_id, device_id, display_name).await?;
        Ok(LoggedIn {
            user_id: user_id.to_owned(),
            access_token: Some(token),
            device_id: Some(device),
        })
    }

    /// `m.login.password`. A wrong user and a wrong password give the same answer.
    pub async fn login_password(
        &self,
        user_id: &UserId,
        password: &str,
        device_id: Option<String>,
        display_name: Option<&str>,
    ) -> Result<LoggedIn> {
        let invalid = || Error::Forbidden("Invalid username or password".to_owned());
        let user = self.store.user(user_id.as_str()).await?;
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        // Unknown users and users without a password cost a hash check too, so timing does not
        // tell which accounts exist; deactivation is told only to who knows the password.
        if !verify_password(password.to_owned(), hash).await? {
            return Err(invalid());
        }
        if user.is_some_and(|u| u.deactivated) {
            return Err(Error::UserDeactivated);
        }
        let (token, device) = self.new_session(user_id, device_id, display_name).await?;
        Ok(LoggedIn {
            user_id: user_id.to_owned(),
            access_token: Some(token),
            device_id: Some(device),
        })
    }

    /// User-interactive auth with `m.login.password` for sensitive operations (deleting devices).
    /// Without a correct password the answer is the UIA challenge.
    pub async fn require_password(&self, user_id: &UserId, auth: Option<&Value>) -> Result<()> {
        let challenge = |error: Option<(&'static str, String)>| Error::UiaRequired {
            session: random_string(24),
            flows: vec![vec!["m.login.password".to_owned()]],
            error,
        };
        let Some(auth) = auth else {
            return Err(challenge(None));
        };
        if auth.get("type").and_then(Value::as_str) != Some("m.login.password") {
            return Err(challenge(Some((
                "M_UNRECOGNIZED",
                "Only m.login.password is supported".to_owned(),
            ))));
        }
        let password = auth
            .get("password")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let hash = self
            .store
            .user(user_id.as_str())
            .await?
            .and_then(|u| u.password_hash);
        let valid = verify_password(password, hash).await?;
        // A wrong password is a new challenge (401 with M_FORBIDDEN), so clients ask again.
        if valid {
            Ok(())
        } else {
            Err(challenge(Some(("M_FORBIDDEN", "Invalid password".to_owned()))))
        }
    }

    async fn new_session(
        &self,
        user_id: &UserId,
        device_id: Option<String>,
        display_name: Option<&str>,
    ) -> Result<(String, String)> {
        let device_id = device_id.unwrap_or_else(|| random_string(10).to_uppercase());
        let token = format!("sb_{}", random_string(40));
        let hash = sha256_hex(&token);
        self.store
            .add_device_token(user_id.as_str(), &device_id, display_name, &hash, now_ms() as i64)
            .await?;
        // Cached sessions of a device whose token this login replaced are gone.
        self.forget_sessions(|s| s.user_id == user_id && s.device_id == device_id);
        Ok((token, device_id))
    }

    /// Resolves an access token to its session.
    pub async fn authenticate(&self, token: &str) -> Result<Session> {
        let hash = sha256_hex(token);
        let generation = match self.sessions.read() {
            Ok(cache) => match cache.by_token.get(&hash) {
                Some(session) => return Ok(session.clone()),
                None => cache.generation,
            },
            Err(_) => return Err(Error::internal("session cache poisoned")),
        };
        let (user_id, device_id) = self
            .store
            .session_by_token(&hash)
            .await?
            .ok_or(Error::UnknownToken)?;
        let user = self.store.user(&user_id).await?.ok_or(Error::UnknownToken)?;
        if user.deactivated {
            return Err(Error::UnknownToken);
        }
        let session = Session {
            user_id: OwnedUserId::try_from(user_id).map_err(Error::internal)?,
            device_id,
            is_admin: user.is_admin,
            appservice: None,
        };
        if let Ok(mut cache) = self.sessions.write()
            && cache.generation == generation
        {
            if cache.by_token.len() >= MAX_CACHED_SESSIONS {
                cache.by_token.clear();
            }
            cache.by_token.insert(hash, session.clone());
        }
        Ok(session)
    }

    /// Forgets cached sessions matching `gone`. Called after the database changed, so a lookup
    /// from before the change cannot cache a stale session after it (the generation check).
    fn forget_sessions(&self, gone: impl Fn(&Session) -> bool) {
        let mut cache = match self.sessions.write() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        cache.generation += 1;
        cache.by_token.retain(|_, s| !gone(s));
    }

    pub async fn logout(&self, session: &Session) -> Result<()> {
        self.delete_device(&session.user_id, &session.device_id).await
    }

    /// Deletes a device and its sessions.
    pub async fn delete_device(&self, user_id: &UserId, device_id: &str) -> Result<()> {
        self.store.delete_device(user_id.as_str(), device_id).await?;
        self.forget_sessions(|s| s.user_id == user_id && s.device_id == device_id);
        Ok(())
    }

    /// Deletes every device of the user; returns their IDs.
    pub async fn logout_all(&self, user_id: &UserId) -> Result<Vec<String>> {
        let devices = self.store.delete_all_devices(user_id.as_str()).await?;
        self.forget_sessions(|s| s.user_id == user_id);
        Ok(devices)
    }

    /// Grants or revokes server admin; every session of the user sees it at once. `false` if
    /// there is no such user.
    pub async fn set_admin(&self, user_id: &UserId, admin: bool) -> Result<bool> {
        let found = self.store.set_admin(user_id.as_str(), admin).await?;
        self.forget_sessions(|s| s.user_id == user_id);
        Ok(found)
    }

    /// Deactivates an account for good: no login, every device and token gone at once, the
    /// profile cleared. The name stays taken. Returns the devices deleted. (Leaving rooms and
    /// announcing the devices gone are the caller's part.)
    pub async fn deactivate(&self, user_id: &UserId) -> Result<Vec<String>> {
        self.store.set_deactivated(user_id.as_str()).await?;
        self.logout_all(user_id).await
    }

    /// The display name a user's member events carry (their localpart until profiles exist).
    pub async fn displayname(&self, user_id: &UserId) -> Result<Option<String>> {
        Ok(self
            .store
            .user(user_id.as_str())
            .await?
            .map(|u| u.displayname.unwrap_or_else(|| user_id.localpart().to_owned())))
    }

    pub async fn is_admin(&self, user_id: &UserId) -> Result<bool> {
        Ok(self
            .store
            .user(user_id.as_str())
            .await?
            .is_some_and(|u| u.is_admin))
    }
}

/// Argon2id hashing runs on the blocking pool: it is deliberately slow.
async fn hash_password(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(Error::internal)
    })
    .await
    .map_err(Error::internal)?
}

/// Checks a password against a stored hash. Without one (unknown user, no password) it is
/// checked against a hash of a random password made with the same parameters, and fails: the
/// answer takes as long as a wrong password's.
async fn verify_password(password: String, hash: Option<String>) -> Result<bool> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let real = hash.is_some();
        let hash = match hash {
            Some(hash) => hash,
            None => DUMMY
                .get_or_init(|| {
                    let salt = SaltString::generate(&mut OsRng);
                    Argon2::default()
                        .hash_password(random_string(32).as_bytes(), &salt)
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                })
                .clone(),
        };
        let parsed = PasswordHash::new(&hash).map_err(Error::internal)?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(real && matches)
    })
    .await
    .map_err(Error::internal)?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accounts() -> (switchboard_store::testing::TestDatabase, Accounts) {
        let dir = switchboard_store::testing::TestDatabase::create().await;
        let store = Store::open(&dir.settings()).await.expect("store");
        (
            dir,
            Accounts::new(store, "example.org".try_into().expect("server name")),
        )
    }

    #[tokio::test]
    async fn usernames_outside_the_lowercase_grammar_or_with_a_leading_underscore_are_invalid() {
        let (_dir, accounts) = accounts().await;
        assert!(accounts.user_id_for("alice.b-c=d/e+f_").is_ok());
        for bad in ["", "_bot", "Alice", "a b", "a:b", "ü"] {
            assert!(
                matches!(accounts.user_id_for(bad), Err(Error::InvalidUsername(_))),
                "{bad:?}"
            );
        }
        assert!(accounts.user_id_for(&"a".repeat(250)).is_err());
    }

    #[tokio::test]
    async fn registration_needs_uia_and_logout_ends_only_that_session() {
        let (_dir, accounts) = accounts().await;
        let request = |auth: Option<Value>| Registration {
            username: Some("alice".into()),
            password: Some("pw".into()),
            device_id: None,
            initial_device_display_name: None,
            inhibit_login: false,
            auth,
        };
        assert!(matches!(
            accounts.register(request(None)).await,
            Err(Error::UiaRequired { .. })
        ));
        let done = accounts
            .register(request(Some(serde_json::json!({"type": "m.login.dummy"}))))
            .await
            .expect("registered");
        let token = done.access_token.expect("token");
        assert_eq!(
            accounts.authenticate(&token).await.expect("session").user_id,
            done.user_id
        );
        assert!(matches!(
            accounts.register(request(None)).await,
            Err(Error::UserInUse)
        ));

        assert!(matches!(
            accounts.login_password(&done.user_id, "wrong", None, None).await,
            Err(Error::Forbidden(_))
        ));
        let again = accounts
            .login_password(&done.user_id, "pw", Some("DEV".into()), None)
            .await
            .expect("login");
        let session = accounts
            .authenticate(again.access_token.as_deref().expect("token"))
            .await
            .expect("session");
        assert_eq!(session.device_id, "DEV");
        accounts.logout(&session).await.expect("logout");
        assert!(matches!(
            accounts
                .authenticate(again.access_token.as_deref().expect("t"))
                .await,
            Err(Error::UnknownToken)
        ));
        assert!(
            accounts.authenticate(&token).await.is_ok(),
            "other devices stay logged in"
        );
    }
}
