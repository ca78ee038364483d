//! The homeserver's logic: accounts, rooms and their event pipeline, sync. No HTTP here; the
//! `switchboard-api` crate maps requests onto these services.

pub mod accounts;
pub mod config;
pub mod error;
pub mod filter;
pub mod keys;
pub mod pdu;
pub mod ratelimit;
pub mod rooms;
pub mod stream;
pub mod sync;
pub mod util;

use std::sync::Arc;

use ruma::OwnedServerName;
use switchboard_store::{Store, StoreError};

pub use error::{Error, Result};

use crate::{
    accounts::Accounts,
    config::Config,
    keys::{KeyError, SigningKey},
    ratelimit::RateLimiter,
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
    #[error("{0}")]
    Other(String),
}

/// Rate limiters for the actions Synapse limits.
pub struct Limits {
    pub message: RateLimiter,
    pub registration: RateLimiter,
    pub login_address: RateLimiter,
    pub login_account: RateLimiter,
    pub login_failed: RateLimiter,
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
        let store = Store::open_sqlite(&config.sqlite_path()).await?;
        let stream = Arc::new(EventStream::new(store.max_stream_pos().await?));
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            server_name.clone(),
            Arc::new(key),
            stream.clone(),
            config.default_room_version.clone(),
        ));
        let limits = Limits {
            message: RateLimiter::new(config.rc_message),
            registration: RateLimiter::new(config.rc_registration),
            login_address: RateLimiter::new(config.rc_login.address),
            login_account: RateLimiter::new(config.rc_login.account),
            login_failed: RateLimiter::new(config.rc_login.failed_attempts),
        };
        Ok(Self {
            accounts: Accounts::new(store.clone(), server_name.clone()),
            sync: SyncService::new(rooms.clone(), store.clone(), stream.clone()),
            config,
            server_name,
            store,
            rooms,
            stream,
            limits,
        })
    }
}
