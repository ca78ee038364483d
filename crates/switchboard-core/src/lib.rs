//! The homeserver's logic: accounts, rooms and their event pipeline, sync. No HTTP here; the
//! `switchboard-api` crate maps requests onto these services.

pub mod account_data;
pub mod accounts;
pub mod appservice;
pub mod backup;
pub mod config;
pub mod e2ee;
pub mod ephemeral;
pub mod error;
pub mod federation;
pub mod filter;
pub mod keys;
pub mod media;
pub mod pdu;
pub mod profile;
pub mod push;
pub mod ratelimit;
pub mod rooms;
pub mod shared_secret;
pub mod stream;
pub mod sync;
pub mod tls;
pub mod util;

use std::sync::Arc;

use ruma::OwnedServerName;
use switchboard_store::{Store, StoreError};

pub use error::{Error, Result};

use crate::{
    accounts::Accounts,
    appservice::{AppServices, delivery::Delivery},
    config::Config,
    keys::{KeyError, SigningKey},
    ratelimit::Limits,
    rooms::Rooms,
    stream::EventStream,
    sync::SyncService,
};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registration(#[from] appservice::RegistrationError),
    #[error("{0}")]
    Other(String),
}

/// All services of a running homeserver.
pub struct Homeserver {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub store: Store,
    pub accounts: Accounts,
    pub rooms: Arc<Rooms>,
    pub sync: SyncService,
    pub stream: Arc<EventStream>,
    pub limits: Limits,
    pub appservices: Arc<AppServices>,
    pub nonces: shared_secret::Nonces,
    pub account_data: Arc<account_data::AccountData>,
    pub push: Arc<push::Push>,
    pub ephemeral: Arc<ephemeral::Ephemeral>,
    pub e2ee: Arc<e2ee::E2ee>,
    pub backup: backup::KeyBackup,
    pub media: media::Media,
    pub federation: Arc<federation::Federation>,
}

impl Homeserver {
    /// Opens storage and the signing key (generating one if missing) and wires the services.
    pub async fn open(config: Config) -> Result<Self, StartupError> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())
            .map_err(|e| StartupError::Other(format!("server_name: {e}")))?;
        let key_path = config.signing_key_path();
        let (key, generated) = SigningKey::load_or_generate(&key_path)?;
        if generated {
            tracing::info!(path = %key_path.display(), "generated a new signing key");
        }
        let key = Arc::new(key);
        let store = Store::open(&config.database_settings()).await?;
        let stream = EventStream::start(
            store.clone(),
            store.max_stream_pos().await?,
            store.max_aux_pos().await?,
        );
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            server_name.clone(),
            key.clone(),
            stream.clone(),
            config.default_room_version.clone(),
        ));
        let limits = Limits::new(&config);
        let legacy_auth = config.use_appservice_legacy_authorization;
        let delivery = Arc::new(Delivery::new(
            store.clone(),
            rooms.clone(),
            stream.clone(),
            legacy_auth,
        ));
        let appservices = Arc::new(AppServices::new(
            store.clone(),
            server_name.clone(),
            delivery,
            legacy_auth,
            config.path.clone(),
        ));
        let (outbox, outbox_news) =
            federation::outbox::Outbox::new(store.clone(), rooms.clone(), server_name.clone());
        let ephemeral =
            ephemeral::Ephemeral::new(store.clone(), stream.clone(), outbox.clone(), config.use_presence);
        let e2ee = Arc::new(e2ee::E2ee::new(
            store.clone(),
            stream.clone(),
            outbox.clone(),
            appservices.clone(),
        ));
        appservices.delivery.set_ephemeral(ephemeral.clone());
        let count = appservices.load(&config.app_service_config_files).await?;
        if count > 0 {
            tracing::info!(count, "application services registered");
        }
        let federation = Arc::new(
            federation::Federation::start(
                &config,
                server_name.clone(),
                key,
                store.clone(),
                rooms.clone(),
                stream.clone(),
                outbox_news,
            )
            .await?,
        );
        let account_data = Arc::new(account_data::AccountData::new(store.clone(), stream.clone()));
        let push = push::Push::start(
            &config,
            store.clone(),
            rooms.clone(),
            stream.clone(),
            account_data.clone(),
            appservices.clone(),
        )
        .await
        .map_err(|e| StartupError::Other(format!("push: {e}")))?;
        Ok(Self {
            federation,
            sync: SyncService::new(
                rooms.clone(),
                store.clone(),
                stream.clone(),
                ephemeral.clone(),
                e2ee.clone(),
                push.clone(),
            ),
            push,
            e2ee,
            backup: backup::KeyBackup::new(store.clone()),
            media: media::Media::new(
                store.clone(),
                config.media_store_path.clone(),
                config.max_upload_size.0,
                config.max_image_pixels.0 as u64,
                config.thumbnail_sizes.clone(),
            ),
            ephemeral,
            account_data,
            nonces: Default::default(),
            appservices,
            accounts: Accounts::new(store.clone(), server_name.clone()),
            config,
            server_name,
            store,
            rooms,
            stream,
            limits,
        })
    }
}

/// What a caller wants to do with an alias, for [`Homeserver::alias_rights`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasAction {
    Create,
    Delete,
}

impl Homeserver {
    /// The one rule for who may create or delete `alias`, on every path that does (the directory,
    /// `createRoom`, room upgrades). A service may manage only aliases in its own namespace, and
    /// needs no membership or creator check there. Aliases in a service's exclusive namespace are
    /// that service's: nobody else may create one, and only server admins may delete one.
    /// Returns whether the caller is privileged (server admin or owning service).
    pub fn alias_rights(
        &self,
        session: &accounts::Session,
        alias: &str,
        action: AliasAction,
    ) -> Result<bool> {
        if let Some(service) = &session.appservice {
            if !service.aliases.matches(alias) {
                return Err(Error::Exclusive(
                    "This application service has not reserved this kind of alias".to_owned(),
                ));
            }
            return Ok(true);
        }
        let reserved = self.appservices.registry().exclusive_alias_owner(alias).is_some();
        if reserved && (action == AliasAction::Create || !session.is_admin) {
            return Err(Error::Exclusive(format!(
                "The alias {alias} is reserved by an application service"
            )));
        }
        Ok(session.is_admin)
    }

    /// Resolves an alias to its room and servers likely to be in it: a remote alias by asking
    /// its server, a local one as [`Self::resolve_alias`] does.
    pub async fn lookup_alias(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<(ruma::OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() != self.server_name {
            let request =
                ruma::api::federation::query::get_room_information::v1::Request::new(alias.to_owned());
            let response = self.federation.client.send(alias.server_name(), request).await?;
            return Ok((response.room_id, response.servers));
        }
        let room_id = self.resolve_alias(alias).await?;
        Ok((room_id, vec![self.server_name.clone()]))
    }

    /// Resolves a local alias; if it is unknown, the services whose alias namespace matches are
    /// asked, and may create it on the spot.
    pub async fn resolve_alias(&self, alias: &ruma::RoomAliasId) -> Result<ruma::OwnedRoomId> {
        match self.rooms.resolve_alias(alias).await {
            Err(Error::NotFound(message)) if alias.server_name() == self.server_name => {
                if self.appservices.query_alias(alias.as_str()).await? {
                    return self.rooms.resolve_alias(alias).await;
                }
                Err(Error::NotFound(message))
            }
            other => other,
        }
    }

    /// User-interactive password auth for sensitive operations, under the same failed-attempts
    /// limit as logins, so it cannot serve as a password-guessing oracle.
    pub async fn require_password(
        &self,
        user: &ruma::UserId,
        auth: Option<&serde_json::Value>,
    ) -> Result<()> {
        self.limits.login_failed.peek(user.as_str())?;
        let result = self.accounts.require_password(user, auth).await;
        if matches!(
            &result,
            Err(Error::UiaRequired {
                error: Some(("M_FORBIDDEN", _)),
                ..
            })
        ) {
            let _ = self.limits.login_failed.check(user.as_str());
        }
        result
    }

    /// Deactivates an account (`/account/deactivate`): every token dead at once, the profile
    /// cleared, and the user leaves every room they are in or invited to, as in Synapse.
    pub async fn deactivate(&self, user: &ruma::UserId) -> Result<()> {
        let devices = self.accounts.deactivate(user).await?;
        // Before leaving: the servers sharing a room must learn the devices are gone.
        for device in &devices {
            self.e2ee.device_list_changed(user, Some(device)).await?;
        }
        for (room, membership, _) in self.store.user_memberships(user.as_str()).await? {
            if !matches!(membership.as_str(), "join" | "invite" | "knock") {
                continue;
            }
            let Ok(room_id) = ruma::OwnedRoomId::try_from(room) else {
                continue;
            };
            if let Err(e) = self
                .rooms
                .leave(&room_id, user, Some("Account deactivated"))
                .await
            {
                tracing::warn!(%room_id, %user, error = %e, "a deactivated user could not leave a room");
            }
        }
        tracing::info!(%user, "account deactivated");
        Ok(())
    }

    /// Whether two users are both joined to some room.
    pub async fn share_a_room(&self, a: &ruma::UserId, b: &ruma::UserId) -> Result<bool> {
        let theirs: std::collections::HashSet<String> =
            self.rooms.joined_rooms(b).await?.into_iter().collect();
        Ok(self
            .rooms
            .joined_rooms(a)
            .await?
            .iter()
            .any(|room| theirs.contains(room)))
    }

    /// Makes sure a local user exists, asking the services whose namespace covers it (they may
    /// register it on the spot). Unknown users are `404 M_NOT_FOUND`.
    pub async fn ensure_user(&self, user_id: &ruma::UserId) -> Result<()> {
        if user_id.server_name() != self.server_name || self.store.user(user_id.as_str()).await?.is_some() {
            return Ok(());
        }
        if self.appservices.query_user(user_id.as_str()).await?
            && self.store.user(user_id.as_str()).await?.is_some()
        {
            return Ok(());
        }
        Err(Error::NotFound(format!("Unknown user {user_id}")))
    }
}
