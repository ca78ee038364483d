//! The homeserver's error type. Each variant corresponds to one Matrix `errcode`; the HTTP layer
//! maps them to status codes and bodies in one place (`switchboard_api::error`).

use switchboard_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotJson(String),
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    MissingParam(String),
    #[error("Missing access token")]
    MissingToken,
    #[error("Unknown access token")]
    UnknownToken,
    #[error("User ID already taken")]
    UserInUse,
    #[error("{0}")]
    InvalidUsername(String),
    #[error("Room alias already taken")]
    RoomInUse,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    UnsupportedRoomVersion(String),
    /// A remote server cannot join a room of this version; carries the room's version.
    #[error("Your homeserver does not support the features required to join this room (version {0})")]
    IncompatibleRoomVersion(String),
    #[error("Too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("{0}")]
    TooLarge(String),
    /// Another server's media is larger than this server takes (`max_upload_size`).
    #[error("{0}")]
    RemoteTooLarge(String),
    #[error("{0}")]
    Unrecognized(String),
    #[error("{0}")]
    BadState(String),
    #[error("This account has been deactivated")]
    UserDeactivated,
    #[error("Registration is disabled")]
    RegistrationDisabled,
    /// User-interactive auth: more stages needed. Carries the UIA session ID.
    #[error("user-interactive authentication required")]
    UiaRequired {
        session: String,
        flows: Vec<Vec<String>>,
        /// `(errcode, error)` when a stage was tried and failed.
        error: Option<(&'static str, String)>,
    },
    /// An application service did not answer a query in time.
    #[error("{0}")]
    ServiceTimeout(String),
    /// A user ID or alias reserved by an application service.
    #[error("{0}")]
    Exclusive(String),
    #[error("{0}")]
    UnknownDevice(String),
    #[error("This media already has content")]
    CannotOverwriteMedia,
    #[error("The media has not been uploaded yet")]
    NotYetUploaded,
    /// A ping of an application service failed; carries the spec's errcode.
    #[error("{message}")]
    Ping {
        http_status: u16,
        errcode: &'static str,
        message: String,
        status: Option<u16>,
        body: Option<String>,
    },
    /// A server-to-server request without a valid `X-Matrix` signature.
    #[error("{0}")]
    Unauthorized(String),
    /// Another server could not be reached, or answered nonsense.
    #[error("{0}")]
    BadGateway(String),
    /// A restricted room's join rules let the user in, but no member of this server may
    /// invite, so none can vouch for the join.
    #[error("{0}")]
    UnableToGrantJoin(String),
    /// Another server's own Matrix error, passed on.
    #[error("{message}")]
    Remote {
        status: u16,
        errcode: String,
        message: String,
    },
    /// A sliding-sync `pos` this server does not know (expired, or from before a restart).
    #[error("Unknown position: {0}")]
    UnknownPos(String),
    /// Keys uploaded to a backup version that is no longer the current one.
    #[error("Wrong backup version: the current version is {current_version}")]
    WrongRoomKeysVersion { current_version: String },
    /// A service that manages its devices itself (MSC4190) asked for a login.
    #[error("{0}")]
    AppserviceLoginUnsupported(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}
