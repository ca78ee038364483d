//! The Server-Server API's logic: outbound requests (`client`, with server discovery in
//! `resolve`), signing keys (`keys`), and the authentication of inbound requests.

pub mod client;
mod devices;
mod edus;
mod history;
mod intake;
mod invite;
mod join;
pub mod keys;
mod media;
pub mod outbox;
pub mod resolve;
pub mod sender;
mod template;

use std::sync::Arc;

use ruma::{OwnedServerName, api::federation::authentication::XMatrix};
use switchboard_store::{Store, StoreError};

use crate::{Error, config::Config, keys::SigningKey, util::now_ms};

pub use client::FederationClient;
pub use invite::STRIPPED;
pub use keys::KeyRing;

/// Why a request to another server failed.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("{0} is not in federation_domain_whitelist")]
    NotWhitelisted(String),
    #[error("{0} resolves to an address in ip_range_blacklist")]
    Blocked(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("{0}")]
    BadResponse(String),
    #[error("{0}")]
    KeyNotFound(String),
    /// The other server's own Matrix error.
    #[error("{message}")]
    Remote {
        status: u16,
        errcode: String,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<FederationError> for Error {
    fn from(e: FederationError) -> Self {
        match e {
            FederationError::NotWhitelisted(_) => Error::Forbidden(e.to_string()),
            FederationError::Remote {
                status,
                errcode,
                message,
            } => Error::Remote {
                status,
                errcode,
                message,
            },
            FederationError::Store(e) => Error::Store(e),
            FederationError::Internal(e) => Error::Internal(e),
            e => Error::BadGateway(e.to_string()),
        }
    }
}

/// Federation as the rest of the server sees it.
pub struct Federation {
    pub server_name: OwnedServerName,
    pub client: Arc<FederationClient>,
    pub keys: KeyRing,
    pub sender: sender::FederationSender,
    /// This server's signing key, for the events it signs for other servers' rooms.
    pub key: Arc<SigningKey>,
    /// Oldest events of rooms before which other servers had no more history to give.
    history_ends: std::sync::Mutex<std::collections::HashSet<ruma::OwnedEventId>>,
    /// Remote users whose device lists are being fetched in the background.
    resyncing: std::sync::Mutex<std::collections::HashSet<ruma::OwnedUserId>>,
}

impl Federation {
    /// Builds the client and key ring and resumes the outbound queues.
    pub async fn start(
        config: &Config,
        server_name: OwnedServerName,
        key: Arc<SigningKey>,
        store: Store,
        rooms: Arc<crate::rooms::Rooms>,
        stream: Arc<crate::stream::EventStream>,
        outbox: tokio::sync::mpsc::UnboundedReceiver<OwnedServerName>,
    ) -> Result<Self, crate::StartupError> {
        let client = Arc::new(
            FederationClient::new(config, server_name.clone(), key.clone())
                .map_err(crate::StartupError::Other)?,
        );
        let keys = KeyRing::new(
            config,
            server_name.clone(),
            key.clone(),
            store.clone(),
            client.clone(),
        );
        let sender = sender::FederationSender::start(
            store,
            rooms,
            stream,
            client.clone(),
            server_name.clone(),
            outbox,
        )
        .await
        .map_err(|e| crate::StartupError::Other(format!("cannot resume the federation queues: {e}")))?;
        Ok(Self {
            server_name,
            client,
            keys,
            sender,
            key,
            history_ends: Default::default(),
            resyncing: Default::default(),
        })
    }

    /// Authenticates an inbound request: its `X-Matrix` header names this server (or no
    /// destination, as older servers send), the origin may federate, and the signature over
    /// method, URI, origin, destination and body verifies with the origin's key. Returns the origin.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        method: &http::Method,
        uri: &http::Uri,
        body: &[u8],
    ) -> Result<OwnedServerName, Error> {
        let header =
            authorization.ok_or_else(|| Error::Unauthorized("Missing Authorization header".to_owned()))?;
        let x_matrix: XMatrix = header
            .parse()
            .map_err(|e| Error::Unauthorized(format!("Malformed X-Matrix Authorization header: {e}")))?;
        if let Some(destination) = &x_matrix.destination
            && *destination != self.server_name
        {
            return Err(Error::Unauthorized(format!(
                "The request is signed for {destination}, not for this server"
            )));
        }
        if !self.client.allowed(&x_matrix.origin) {
            return Err(Error::Forbidden(format!(
                "Federation denied with {}.",
                x_matrix.origin
            )));
        }
        if !body.is_empty() && serde_json::from_slice::<ruma::CanonicalJsonValue>(body).is_err() {
            return Err(Error::NotJson(
                "The request body is not canonical JSON".to_owned(),
            ));
        }
        let key_map = self
            .keys
            .key_map(&x_matrix.origin, &[x_matrix.key.as_str()], now_ms())
            .await
            .map_err(|e| match e {
                FederationError::Store(e) => Error::Store(e),
                e => Error::Unauthorized(format!(
                    "Cannot verify the signature: no key {} of {}: {e}",
                    x_matrix.key, x_matrix.origin
                )),
            })?;
        let mut request = http::Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        x_matrix
            .verify_http_request(&request, &self.server_name, &key_map)
            .map_err(|e| Error::Unauthorized(format!("Bad X-Matrix signature: {e}")))?;
        // It is up: whatever waits for it need not wait out a back-off.
        self.sender.wake(&x_matrix.origin);
        Ok(x_matrix.origin)
    }
}
