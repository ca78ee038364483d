//! Wiring: registration + receiver + client + handler, and the startup checks that tell an
//! operator what is wrong before the first event is missed.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use reqwest::Method;
use ruma::OwnedUserId;
use serde_json::json;

use crate::{
    Client, Error, Handler,
    receiver::{self, Receiver},
    registration::Registration,
    txns::{FileTxnStore, MemoryTxnStore, TxnStore},
};

/// What every handler call can reach.
pub(crate) struct Shared {
    pub(crate) registration: Registration,
    pub(crate) client: Client,
    pub(crate) bot: OwnedUserId,
    pub(crate) server_name: String,
    #[cfg(feature = "e2ee")]
    pub(crate) crypto: Option<Arc<crate::crypto::Crypto>>,
}

/// Builds an [`Appservice`].
pub struct AppserviceBuilder {
    registration: Registration,
    homeserver: String,
    server_name: String,
    txn_store: Option<Arc<dyn TxnStore>>,
    txn_path: Option<PathBuf>,
    startup_timeout: Duration,
    #[cfg(feature = "e2ee")]
    crypto_dir: Option<PathBuf>,
}

impl AppserviceBuilder {
    /// Reads and writes encrypted rooms (feature `e2ee`): the bot, and each virtual user that
    /// speaks in an encrypted room, gets a device of its own (MSC4190), whose keys and sessions
    /// are kept under `dir`. The registration needs `receive_ephemeral: true`,
    /// `org.matrix.msc3202: true` and `io.element.msc4190: true` (to-device messages, key counts
    /// and device lists come in transactions). Handlers see encrypted events decrypted; intents
    /// encrypt what they send into encrypted rooms.
    #[cfg(feature = "e2ee")]
    pub fn encryption(mut self, dir: impl Into<PathBuf>) -> Self {
        self.crypto_dir = Some(dir.into());
        self
    }

    /// Keeps the handled-transaction record in this file (default: in memory only, so a
    /// transaction re-sent after a restart of the service would be handled again).
    pub fn txn_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.txn_path = Some(path.into());
        self
    }

    /// Keeps the handled-transaction record in your own store.
    pub fn txn_store(mut self, store: Arc<dyn TxnStore>) -> Self {
        self.txn_store = Some(store);
        self
    }

    /// How long [`Appservice::run`] waits for the homeserver to answer (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    pub fn build<H: Handler>(self, handler: H) -> Result<Appservice<H>, Error> {
        let bot = OwnedUserId::try_from(format!(
            "@{}:{}",
            self.registration.sender_localpart, self.server_name
        ))
        .map_err(|e| Error::Setup(format!("sender_localpart or server name: {e}")))?;
        let txns: Arc<dyn TxnStore> = match (self.txn_store, self.txn_path) {
            (Some(store), _) => store,
            (None, Some(path)) => Arc::new(FileTxnStore::open(&path)?),
            (None, None) => Arc::new(MemoryTxnStore::default()),
        };
        let client = Client::new(&self.homeserver, &self.registration.as_token, &bot);
        #[cfg(feature = "e2ee")]
        let crypto = self.crypto_dir.map(|dir| {
            let crypto = Arc::new(crate::crypto::Crypto::new(dir, client.clone()));
            client.set_crypto(crypto.clone());
            crypto
        });
        let shared = Arc::new(Shared {
            client,
            registration: self.registration,
            bot,
            server_name: self.server_name,
            #[cfg(feature = "e2ee")]
            crypto,
        });
        Ok(Appservice {
            receiver: Arc::new(Receiver {
                shared,
                handler: Arc::new(handler),
                txns,
                txn_lock: Arc::new(tokio::sync::Mutex::new(())),
            }),
            startup_timeout: self.startup_timeout,
        })
    }
}

/// A running (or ready to run) application service.
pub struct Appservice<H> {
    receiver: Arc<Receiver<H>>,
    startup_timeout: Duration,
}

impl Appservice<()> {
    /// Starts building a service for this registration, talking to the homeserver at
    /// `homeserver` (its client API base URL) whose users are `@…:server_name`.
    pub fn builder(registration: Registration, homeserver: &str, server_name: &str) -> AppserviceBuilder {
        AppserviceBuilder {
            registration,
            homeserver: homeserver.to_owned(),
            server_name: server_name.to_owned(),
            txn_store: None,
            txn_path: None,
            startup_timeout: Duration::from_secs(60),
            #[cfg(feature = "e2ee")]
            crypto_dir: None,
        }
    }
}

/// `()` handles nothing; it lets [`Appservice::builder`] be called without naming a handler.
impl Handler for () {}

impl<H: Handler> Appservice<H> {
    /// The homeserver → service API as an axum router, to serve yourself or nest in your own.
    pub fn router(&self) -> axum::Router {
        receiver::router(self.receiver.clone())
    }

    /// A context like the one handlers get: the client, the bot and intents.
    pub fn context(&self) -> crate::Context {
        crate::Context {
            shared: self.receiver.shared.clone(),
        }
    }

    /// Serves on `listen`, then checks the homeserver: waits until it answers, registers the
    /// bot (already registered is fine), and pings it through the homeserver when it supports
    /// that (Matrix v1.7), failing with the likely cause. Runs until Ctrl-C or `SIGTERM`.
    pub async fn run(self, listen: SocketAddr) -> Result<(), Error> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Io {
                context: format!("cannot listen on {listen}"),
                source,
            })?;
        tracing::info!(%listen, "application service listening");
        let server = tokio::spawn(
            axum::serve(listener, self.router())
                .with_graceful_shutdown(shutdown_signal())
                .into_future(),
        );
        if let Err(e) = self.start().await {
            server.abort();
            return Err(e);
        }
        tracing::info!(bot = %self.receiver.shared.bot, "application service ready");
        server
            .await
            .map_err(|e| Error::Setup(format!("server task failed: {e}")))?
            .map_err(|source| Error::Io {
                context: "serving".to_owned(),
                source,
            })
    }

    /// The startup checks of [`Appservice::run`], for services that serve the router
    /// themselves (call it once the router is reachable).
    pub async fn start(&self) -> Result<(), Error> {
        let shared = &self.receiver.shared;
        let versions = self.wait_for_homeserver().await?;
        match self.context().bot().ensure_registered().await {
            Err(Error::Matrix(e)) if e.errcode == "M_UNKNOWN_TOKEN" => {
                return Err(Error::Setup(ping_failure(&shared.registration, &e)));
            }
            other => other?,
        }
        #[cfg(feature = "e2ee")]
        if let Some(crypto) = &shared.crypto {
            let r = &shared.registration;
            if !(r.receive_ephemeral || r.push_ephemeral_unstable) || !r.msc3202 || !r.msc4190 {
                return Err(Error::Setup(format!(
                    "encryption needs `receive_ephemeral: true`, `org.matrix.msc3202: true` and \
                     `io.element.msc4190: true` in the registration (id `{}`): without them the \
                     homeserver sends no keys and makes no devices",
                    r.id
                )));
            }
            crypto.start(&shared.bot).await?;
        }
        let supports_ping = versions["versions"].as_array().is_some_and(|list| {
            list.iter().filter_map(|v| v.as_str()).any(|v| {
                v.strip_prefix("v1.")
                    .and_then(|minor| minor.parse::<u32>().ok())
                    .is_some_and(|minor| minor >= 7)
            })
        });
        if !supports_ping {
            return Ok(());
        }
        let path = format!(
            "/_matrix/client/v1/appservice/{}/ping",
            crate::client::enc(&shared.registration.id)
        );
        let body = json!({"transaction_id": format!("startup-{}", std::process::id())});
        match shared
            .client
            .request(Method::POST, &path, None, &[], Some(&body))
            .await
        {
            Ok(answer) => {
                tracing::info!(duration_ms = %answer["duration_ms"], "homeserver reached the service");
                Ok(())
            }
            Err(Error::Matrix(e)) => Err(Error::Setup(ping_failure(&shared.registration, &e))),
            Err(e) => Err(e),
        }
    }

    async fn wait_for_homeserver(&self) -> Result<serde_json::Value, Error> {
        let client = &self.receiver.shared.client;
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            match client
                .request(Method::GET, "/_matrix/client/versions", None, &[], None)
                .await
            {
                Ok(versions) => return Ok(versions),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Setup(format!(
                        "the homeserver at {} did not answer within {:?}: {e}",
                        client.homeserver(),
                        self.startup_timeout
                    )));
                }
                Err(e) => {
                    tracing::info!(error = %e, "waiting for the homeserver");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// What a failed ping most likely means, in words an operator can act on.
fn ping_failure(registration: &Registration, e: &crate::MatrixError) -> String {
    let url = registration.url.as_deref().unwrap_or("(none)");
    match e.errcode.as_str() {
        "M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN" => format!(
            "the homeserver does not accept the as_token: is the registration (id `{}`) listed in \
             its app_service_config_files, and was it reloaded? ({e})",
            registration.id
        ),
        "M_FORBIDDEN" => format!(
            "the homeserver refused the ping for id `{}`: the as_token belongs to another \
             registration ({e})",
            registration.id
        ),
        "M_URL_NOT_SET" => "the registration has `url: null`: the homeserver sends nothing".to_owned(),
        "M_CONNECTION_FAILED" | "M_CONNECTION_TIMEOUT" => format!(
            "the homeserver cannot reach the service at {url} (the registration's `url`): check \
             the address and that the service listens there ({e})"
        ),
        "M_BAD_STATUS" if e.error.contains("403") || e.error.contains("401") => format!(
            "the homeserver reached the service but its hs_token was refused: the homeserver \
             and the service read different registration files ({e})"
        ),
        _ => format!("pinging the service through the homeserver failed: {e}"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
