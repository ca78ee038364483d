//! Application services, homeserver side: registrations, interest, durable transaction delivery
//! and user/alias queries.
//!
//! - `registration` parses and checks registration files.
//! - [`Registry`] is one loaded set of services, swapped atomically on reload.
//! - `interest` decides which events a service receives (Synapse's rules).
//! - `delivery` runs one sender task per service over the event stream.
//! - `query` asks services whether users and aliases exist (lazy creation).

pub mod crypto;
pub mod delivery;
pub mod dispatch;
pub mod http;
pub mod interest;
pub mod query;
pub use switchboard_appservice::registration;
pub mod thirdparty;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use reqwest::Method;
use ruma::{OwnedServerName, OwnedUserId, ServerName};
use switchboard_store::{NewUser, Store};

use crate::{Error, Result, util::now_ms};

pub use registration::{Namespace, Registration, RegistrationError};

/// One registered service, compiled for matching.
#[derive(Debug)]
pub struct AppService {
    pub registration: Registration,
    pub file: PathBuf,
    /// `@sender_localpart:server`, the service's own user.
    pub sender: OwnedUserId,
    pub users: Namespace,
    pub aliases: Namespace,
    pub rooms: Namespace,
}

impl AppService {
    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// The service may act as this user: its sender, or a user in its users namespace.
    pub fn owns_user(&self, user_id: &str) -> bool {
        user_id == self.sender.as_str() || self.users.matches(user_id)
    }

    /// Exclusive ownership: the sender, or the users namespace's exclusive part.
    pub fn owns_user_exclusively(&self, user_id: &str) -> bool {
        user_id == self.sender.as_str() || self.users.matches_exclusive(user_id)
    }
}

/// A loaded, validated set of registrations.
#[derive(Debug, Default)]
pub struct Registry {
    pub services: Vec<Arc<AppService>>,
    by_token: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
    /// Every service's namespaces compiled together, for matching an event against all
    /// services in one pass.
    senders: HashMap<String, Vec<usize>>,
    users: Combined,
    aliases: Combined,
    rooms: Combined,
}

/// Services by their index in the [`Registry`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSet(Vec<u64>);

impl ServiceSet {
    pub fn insert(&mut self, index: usize) {
        let word = index / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (index % 64);
    }

    pub fn contains(&self, index: usize) -> bool {
        self.0
            .get(index / 64)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    pub fn union(&mut self, other: &ServiceSet) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            *mine |= theirs;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// One namespace kind of every service in one `RegexSet`: matching an ID against all services
/// costs about what matching it against one does.
#[derive(Debug, Default)]
struct Combined {
    set: regex::RegexSet,
    /// The service each pattern of `set` belongs to.
    owners: Vec<usize>,
}

impl Combined {
    fn compile(
        services: &[Arc<AppService>],
        entries: impl Fn(&AppService) -> &[registration::NamespaceEntry],
    ) -> Result<Self, RegistrationError> {
        let mut patterns = Vec::new();
        let mut owners = Vec::new();
        for (index, service) in services.iter().enumerate() {
            for entry in entries(service) {
                patterns.push(registration::anchor(&entry.regex));
                owners.push(index);
            }
        }
        let set = regex::RegexSet::new(patterns).map_err(|e| RegistrationError::Field {
            file: "app_service_config_files".to_owned(),
            field: "namespaces".to_owned(),
            message: format!("the namespaces of all services together do not compile: {e}"),
        })?;
        Ok(Self { set, owners })
    }

    fn add_matches(&self, value: &str, into: &mut ServiceSet) {
        for pattern in self.set.matches(value).iter() {
            into.insert(self.owners[pattern]);
        }
    }
}

impl Registry {
    /// Loads every file, or fails naming the bad file and field: nothing half-loads.
    pub fn load(files: &[PathBuf], server_name: &ServerName) -> Result<Self, RegistrationError> {
        let mut registry = Registry::default();
        for path in files {
            let (registration, file) = registration::load(path)?;
            registry.add(registration, file, server_name)?;
        }
        let services = &registry.services;
        registry.users = Combined::compile(services, |s| &s.registration.namespaces.users)?;
        registry.aliases = Combined::compile(services, |s| &s.registration.namespaces.aliases)?;
        registry.rooms = Combined::compile(services, |s| &s.registration.namespaces.rooms)?;
        for (index, service) in services.iter().enumerate() {
            // Two registrations may share a sender; each owns it, as `owns_user` says.
            registry
                .senders
                .entry(service.sender.to_string())
                .or_default()
                .push(index);
        }
        Ok(registry)
    }

    /// Adds the services that own `user_id` (as sender or in their users namespace).
    pub fn add_user_owners(&self, user_id: &str, into: &mut ServiceSet) {
        for &index in self.senders.get(user_id).into_iter().flatten() {
            into.insert(index);
        }
        self.users.add_matches(user_id, into);
    }

    /// Adds the services whose aliases namespace matches `alias`.
    pub fn add_alias_matches(&self, alias: &str, into: &mut ServiceSet) {
        self.aliases.add_matches(alias, into);
    }

    /// Adds the services whose rooms namespace matches `room_id`.
    pub fn add_room_matches(&self, room_id: &str, into: &mut ServiceSet) {
        self.rooms.add_matches(room_id, into);
    }

    fn add(
        &mut self,
        registration: Registration,
        file: PathBuf,
        server_name: &ServerName,
    ) -> Result<(), RegistrationError> {
        let name = file.display().to_string();
        let duplicate = |index: usize, what: String| RegistrationError::Duplicate {
            first: self.services[index].file.display().to_string(),
            second: name.clone(),
            what,
        };
        if let Some(&index) = self.by_id.get(&registration.id) {
            return Err(duplicate(index, format!("id `{}`", registration.id)));
        }
        if let Some(&index) = self.by_token.get(&registration.as_token) {
            return Err(duplicate(index, "the same as_token".to_owned()));
        }
        let sender = OwnedUserId::try_from(format!("@{}:{server_name}", registration.sender_localpart))
            .map_err(|e| RegistrationError::Field {
                file: name.clone(),
                field: "sender_localpart".to_owned(),
                message: e.to_string(),
            })?;
        let namespaces = &registration.namespaces;
        let service = AppService {
            users: Namespace::compile(&namespaces.users, &name, "users")?,
            aliases: Namespace::compile(&namespaces.aliases, &name, "aliases")?,
            rooms: Namespace::compile(&namespaces.rooms, &name, "rooms")?,
            sender,
            file,
            registration,
        };
        for warning in registration::warnings(&service.registration) {
            tracing::warn!(file = %name, "{warning}");
        }
        let index = self.services.len();
        self.by_id.insert(service.registration.id.clone(), index);
        self.by_token.insert(service.registration.as_token.clone(), index);
        self.services.push(Arc::new(service));
        Ok(())
    }

    pub fn by_token(&self, token: &str) -> Option<&Arc<AppService>> {
        self.by_token.get(token).map(|&i| &self.services[i])
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<AppService>> {
        self.by_id.get(id).map(|&i| &self.services[i])
    }

    /// The service that claims this user ID exclusively (or as its sender), if any.
    pub fn exclusive_user_owner(&self, user_id: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| s.owns_user_exclusively(user_id))
    }

    /// The service that claims this alias exclusively, if any.
    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| s.aliases.matches_exclusive(alias))
    }

    /// Warnings about services claiming the same exclusive regex (overlap of arbitrary regexes is
    /// undecidable in practice; identical ones are the common copy-paste mistake).
    pub fn overlap_warnings(&self) -> Vec<String> {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        let mut warnings = Vec::new();
        for service in &self.services {
            let ns = &service.registration.namespaces;
            for entry in ns.users.iter().chain(&ns.aliases).filter(|e| e.exclusive) {
                if let Some(other) = seen.insert(&entry.regex, service.id()) {
                    warnings.push(format!(
                        "services `{other}` and `{}` both claim `{}` exclusively",
                        service.id(),
                        entry.regex
                    ));
                }
            }
        }
        warnings
    }
}

/// Why a reload was refused (the previous set stays loaded).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
}

/// The application-service subsystem of a running server.
pub struct AppServices {
    registry: RwLock<Arc<Registry>>,
    files: RwLock<Vec<PathBuf>>,
    /// The homeserver config whose `app_service_config_files` a reload reads anew.
    config_path: Option<PathBuf>,
    server_name: OwnedServerName,
    store: Store,
    pub delivery: Arc<delivery::Delivery>,
    queries: query::Queries,
}

impl AppServices {
    pub fn new(
        store: Store,
        server_name: OwnedServerName,
        delivery: Arc<delivery::Delivery>,
        legacy_auth: bool,
        config_path: Option<PathBuf>,
    ) -> Self {
        Self {
            registry: RwLock::new(Arc::new(Registry::default())),
            files: RwLock::new(Vec::new()),
            config_path,
            server_name,
            store,
            delivery,
            queries: query::Queries::new(Duration::from_secs(30), legacy_auth),
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Loads (or reloads) the registration files. A valid set replaces the old one atomically;
    /// an invalid set is refused and the old one kept.
    pub async fn load(&self, files: &[PathBuf]) -> std::result::Result<usize, RegistrationError> {
        let registry = Arc::new(Registry::load(files, &self.server_name)?);
        for warning in registry.overlap_warnings() {
            tracing::warn!("{warning}");
        }
        for service in &registry.services {
            // The sender exists from the start; a later /register for it is M_USER_IN_USE.
            let row = NewUser {
                user_id: service.sender.as_str(),
                password_hash: None,
                is_admin: false,
                appservice_id: Some(service.id()),
                created_ts: now_ms() as i64,
            };
            if let Err(e) = self.store.create_user(&row).await {
                tracing::error!(error = %e, "cannot create application service sender user");
            }
        }
        if let Err(e) = self.delivery.apply(&registry).await {
            tracing::error!(error = %e, "cannot start application service senders");
        }
        let count = registry.services.len();
        if let Ok(mut slot) = self.registry.write() {
            *slot = registry;
        }
        if let Ok(mut slot) = self.files.write() {
            *slot = files.to_vec();
        }
        Ok(count)
    }

    /// `SIGHUP`: reads the config's `app_service_config_files` anew — files added to the list
    /// are loaded, files removed from it unloaded — and every listed file again. Without a config
    /// file (tests, embedding), the files loaded last are re-read.
    pub async fn reload(&self) -> std::result::Result<usize, ReloadError> {
        let files = match &self.config_path {
            Some(path) => crate::config::Config::load(path)?.app_service_config_files,
            None => self.files.read().map(|f| f.clone()).unwrap_or_default(),
        };
        Ok(self.load(&files).await?)
    }

    /// The service an `as_token` belongs to. Any request with it shows the service is alive, so a
    /// sender waiting out a backoff retries at once.
    pub fn authenticate(&self, token: &str) -> Option<Arc<AppService>> {
        let service = self.registry().by_token(token).cloned()?;
        if let Some(sender) = self.delivery.sender(service.id())
            && !sender.status().up
        {
            sender.kick();
        }
        Some(service)
    }

    /// Asks the services whose alias namespace matches whether `alias` exists (they may create it).
    pub async fn query_alias(&self, alias: &str) -> Result<bool> {
        let services = self
            .registry()
            .services
            .iter()
            .filter(|s| s.aliases.matches(alias))
            .cloned()
            .collect();
        self.queries.exists(query::Kind::Alias, alias, services).await
    }

    /// Asks the services whose users namespace matches whether `user_id` exists.
    pub async fn query_user(&self, user_id: &str) -> Result<bool> {
        let services = self
            .registry()
            .services
            .iter()
            .filter(|s| s.users.matches(user_id))
            .cloned()
            .collect();
        self.queries.exists(query::Kind::User, user_id, services).await
    }

    /// What operators see of each service: registration facts and its sender's state.
    pub async fn report(&self, service: &AppService, current_pos: i64) -> Result<serde_json::Value> {
        let status = self
            .delivery
            .sender(service.id())
            .map(|s| s.status())
            .unwrap_or_default();
        let start = switchboard_store::AsPosition {
            events: current_pos,
            aux: 0,
        };
        let (at, last_txn_id) = self.store.appservice_state(service.id(), start).await?;
        let last_pos = at.events;
        let pending = self.store.appservice_pending_txn(service.id()).await?;
        // The oldest event the service has not acknowledged, if any.
        let oldest = self
            .store
            .events_after(last_pos, current_pos, 1)
            .await?
            .into_iter()
            .next();
        let oldest_age_ms = oldest
            .and_then(|row| crate::pdu::Pdu::from_row(row).ok())
            .map(|pdu| now_ms().saturating_sub(u64::from(pdu.origin_server_ts.get())));
        Ok(serde_json::json!({
            "id": service.id(),
            "file": service.file.display().to_string(),
            "url": service.registration.url,
            "sender": service.sender,
            "up": status.up,
            "consecutive_failures": status.consecutive_failures,
            "next_retry_in_ms": status.next_retry_in.map(|d| d.as_millis() as u64),
            "last_error": status.last_error,
            "sent_transactions": status.sent_transactions,
            "failed_attempts": status.failed_attempts,
            "sent_events": status.sent_events,
            "acknowledged_position": last_pos,
            "stream_position": current_pos,
            "undelivered_stream_events": (current_pos - last_pos).max(0),
            "oldest_undelivered_age_ms": oldest_age_ms,
            "last_txn_id": last_txn_id,
        "in_flight_txn": pending.map(|txn| serde_json::json!({ "txn_id": txn.txn_id, "events": txn.event_count })),

        }))
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: round trip to the service's `/ping`.
    pub async fn ping(&self, service: &AppService, transaction_id: Option<&str>) -> Result<Duration> {
        if service.registration.url.is_none() {
            return Err(Error::Ping {
                http_status: 400,
                errcode: "M_URL_NOT_SET",
                message: "The application service has no URL".to_owned(),
                status: None,
                body: None,
            });
        }
        let body = match transaction_id {
            Some(t) => serde_json::json!({ "transaction_id": t }),
            None => serde_json::json!({}),
        }
        .to_string();
        let started = Instant::now();
        let reply = self
            .delivery
            .http()
            .request(
                service,
                http::Family::Ping,
                Method::POST,
                "/ping",
                "/ping",
                Some(&body),
            )
            .await;
        let elapsed = started.elapsed();
        match reply {
            Some(r) if r.is_success() => {
                if let Some(sender) = self.delivery.sender(service.id()) {
                    sender.kick();
                }
                Ok(elapsed)
            }
            Some(http::Reply::Status { status, body, .. }) => Err(Error::Ping {
                http_status: 502,
                errcode: "M_BAD_STATUS",
                message: format!("The application service answered HTTP {status}"),
                status: Some(status.as_u16()),
                body: Some(body),
            }),
            Some(http::Reply::TimedOut) => Err(Error::Ping {
                http_status: 504,
                errcode: "M_CONNECTION_TIMEOUT",
                message: "The application service did not answer in time".to_owned(),
                status: None,
                body: None,
            }),
            Some(http::Reply::Unreachable(e)) => Err(Error::Ping {
                http_status: 502,
                errcode: "M_CONNECTION_FAILED",
                message: format!("Cannot connect to the application service: {e}"),
                status: None,
                body: None,
            }),
            None => Err(Error::internal("service URL vanished")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_file(dir: &std::path::Path, id: &str, users: &str, rooms: &str) -> PathBuf {
        let path = dir.join(format!("{id}.yaml"));
        let text = format!(
            "id: {id}\nurl: null\nas_token: as_{id}\nhs_token: hs_{id}\nsender_localpart: {id}_bot\n\
             namespaces:\n  users: [{{exclusive: true, regex: '{users}'}}]\n  aliases: []\n  \
             rooms: [{{exclusive: false, regex: '{rooms}'}}]\n"
        );
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn combined_namespaces_find_every_owner_in_one_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files: Vec<PathBuf> = (0..70)
            .map(|i| service_file(dir.path(), &format!("s{i}"), &format!("@s{i}_.*"), "!shared"))
            .collect();
        let server = ruma::server_name!("x");
        let registry = Registry::load(&files, server).expect("loads");

        let mut set = ServiceSet::default();
        registry.add_user_owners("@s65_alice:x", &mut set);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![65],
            "beyond the first word of bits"
        );
        registry.add_user_owners("@s3_bot:x", &mut set);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![3, 65],
            "a sender user is owned"
        );
        assert!(set.contains(3) && !set.contains(4));

        let mut rooms = ServiceSet::default();
        registry.add_room_matches("!shared:x", &mut rooms);
        assert_eq!(
            rooms.iter().count(),
            70,
            "anchored at the start only, like Synapse"
        );
        let mut other = ServiceSet::default();
        registry.add_room_matches("!other:x", &mut other);
        assert!(other.is_empty(), "a room no namespace matches");

        let mut none = ServiceSet::default();
        registry.add_user_owners("@nobody:x", &mut none);
        assert!(none.is_empty());
        none.union(&set);
        assert_eq!(none, set);
    }
}
