//! The homeserver configuration: Synapse's `homeserver.yaml` key names, so an admin's existing
//! knowledge (and most of their file) carries over.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use switchboard_store::{DatabaseSettings, PostgresSettings};

/// A configuration that cannot be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Key {
        path: String,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Config {
    /// The domain part of every user ID and room alias on this server.
    pub server_name: String,
    #[serde(default)]
    pub public_baseurl: Option<String>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub database: Database,
    #[serde(default = "default_media_store")]
    pub media_store_path: PathBuf,
    #[serde(default)]
    pub signing_key_path: Option<PathBuf>,
    #[serde(default)]
    pub enable_registration: bool,
    #[serde(default)]
    pub enable_registration_without_verification: bool,
    #[serde(default)]
    pub registration_shared_secret: Option<String>,
    #[serde(default)]
    pub app_service_config_files: Vec<PathBuf>,
    /// Also send `?access_token=hs_token` to services (Synapse's insecure legacy option, for
    /// services older than spec v1.4).
    #[serde(default)]
    pub use_appservice_legacy_authorization: bool,
    #[serde(default = "default_room_version")]
    pub default_room_version: String,
    #[serde(default = "RateLimit::message_default")]
    pub rc_message: RateLimit,
    #[serde(default = "RateLimit::registration_default")]
    pub rc_registration: RateLimit,
    #[serde(default)]
    pub rc_login: LoginRateLimits,
    #[serde(default)]
    pub rc_joins: JoinRateLimits,
    #[serde(default)]
    pub rc_invites: InviteRateLimits,
    /// Redactions of others' events by room moderators; unset, they count under `rc_message`.
    #[serde(default)]
    pub rc_admin_redaction: Option<RateLimit>,
    /// `POST /_matrix/media/v1/create`.
    #[serde(default = "RateLimit::media_create_default")]
    pub rc_media_create: RateLimit,
    /// Accepted for Synapse's files; 3PID validation (email, phone) is not implemented.
    #[serde(default = "RateLimit::login_default")]
    pub rc_3pid_validation: RateLimit,
    /// Largest media upload, in bytes (Synapse's format: a number, or a string like `50M`).
    #[serde(default = "ByteSize::fifty_megabytes")]
    pub max_upload_size: ByteSize,
    /// Largest image (width × height) the server decodes to make a thumbnail (Synapse's key and
    /// default, `32M`); larger ones are `413 M_TOO_LARGE` without decoding a pixel.
    #[serde(default = "ByteSize::thirty_two_mega")]
    pub max_image_pixels: ByteSize,
    /// The only thumbnail sizes made (Synapse's key and default list): a request is answered with
    /// the nearest, so one image cannot fill the disk with sizes.
    #[serde(default = "default_thumbnail_sizes")]
    pub thumbnail_sizes: Vec<ThumbnailSize>,
    /// Largest request body accepted on the client API, in bytes (media uploads excepted).
    #[serde(default = "default_max_request_size")]
    pub max_request_size: usize,
    // ---- federation (Synapse's keys) -----------------------------------------------------
    /// PEM certificate chain for listeners with `tls: true`.
    #[serde(default)]
    pub tls_certificate_path: Option<PathBuf>,
    /// PEM private key for listeners with `tls: true`.
    #[serde(default)]
    pub tls_private_key_path: Option<PathBuf>,
    /// Serve `/.well-known/matrix/server`, delegating to `public_baseurl`'s host and port (443 if none).
    #[serde(default)]
    pub serve_server_wellknown: bool,
    /// Check the certificates of servers this one connects to.
    #[serde(default = "yes")]
    pub federation_verify_certificates: bool,
    /// PEM files of certificate authorities trusted for outbound federation, besides the system's.
    #[serde(default)]
    pub federation_custom_ca_list: Vec<PathBuf>,
    /// When set, the only servers federated with (both ways).
    #[serde(default)]
    pub federation_domain_whitelist: Option<Vec<String>>,
    /// Addresses no outbound request may reach (Synapse's default: private, loopback, link-local…).
    #[serde(default)]
    pub ip_range_blacklist: Option<Vec<String>>,
    /// Exceptions to the blacklist.
    #[serde(default)]
    pub ip_range_whitelist: Vec<String>,
    /// Synapse's older key: when present, the blacklist of federation requests (no whitelist).
    #[serde(default)]
    pub federation_ip_range_blacklist: Option<Vec<String>>,
    /// Notaries asked for other servers' keys before the servers themselves.
    #[serde(default = "default_trusted_key_servers")]
    pub trusted_key_servers: Vec<TrustedKeyServer>,
    #[serde(default)]
    pub suppress_key_server_warning: bool,
    /// Keys this server signed with before, still published so old signatures verify.
    #[serde(default)]
    pub old_signing_keys: BTreeMap<String, OldSigningKey>,
    /// How long other servers may cache this server's keys.
    #[serde(default = "DurationMs::one_day")]
    pub key_refresh_interval: DurationMs,
    /// Whether other servers may list this server's public rooms.
    #[serde(default)]
    pub allow_public_rooms_over_federation: bool,
    /// Whether presence is shared with other servers (sent to those sharing a room with the
    /// user, and taken from them). Synapse's key.
    #[serde(default = "default_true")]
    pub use_presence: bool,
    /// Whether other servers' media is fetched only for the authenticated media routes
    /// (`/_matrix/client/v1/media`), not the legacy unauthenticated ones. Synapse's key and default.
    #[serde(default = "default_true")]
    pub enable_authenticated_media: bool,
    /// How long cached media of other servers is kept after its last use (Synapse's
    /// `media_retention`); kept for ever without `remote_media_lifetime`.
    #[serde(default)]
    pub media_retention: MediaRetention,
    /// How much of other servers' media one user may have fetched in a burst, and how fast that
    /// allowance comes back (Synapse's keys and defaults, which it counts per IP address).
    #[serde(default = "ByteSize::five_hundred_megabytes")]
    pub remote_media_download_burst_count: ByteSize,
    #[serde(default = "ByteSize::eighty_seven_kilobytes")]
    pub remote_media_download_per_second: ByteSize,
    /// The file this config was loaded from, if any: hot reload reads it again.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// `media_retention`: only `remote_media_lifetime` is acted on (local media is kept).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediaRetention {
    #[serde(default)]
    pub remote_media_lifetime: Option<DurationMs>,
    /// Accepted for Synapse configs; local media is never deleted by age.
    #[serde(default)]
    pub local_media_lifetime: Option<DurationMs>,
}

fn default_true() -> bool {
    true
}

/// One entry of `trusted_key_servers`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TrustedKeyServer {
    pub server_name: String,
    /// The notary's own keys (`ed25519:<id>` → base64); without them its answers are trusted
    /// on the strength of its TLS certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_keys: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_keys_insecurely: bool,
}

/// One entry of `old_signing_keys`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct OldSigningKey {
    /// The public key, unpadded base64.
    pub key: String,
    pub expired_ts: u64,
}

fn default_trusted_key_servers() -> Vec<TrustedKeyServer> {
    vec![TrustedKeyServer {
        server_name: "matrix.org".to_owned(),
        verify_keys: None,
        accept_keys_insecurely: false,
    }]
}

fn yes() -> bool {
    true
}

/// A duration written as Synapse writes it: milliseconds, or a number with `s`, `m`, `h`, `d`,
/// `w` or `y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct DurationMs(pub u64);

impl DurationMs {
    fn one_day() -> Self {
        Self(24 * 3600 * 1000)
    }

    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }

    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (number, unit) = match text.char_indices().last()? {
            (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
            _ => (text, ' '),
        };
        let factor: u64 = match unit {
            ' ' => 1,
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            'y' => 365 * 86_400_000,
            _ => return None,
        };
        number.trim().parse::<u64>().ok()?.checked_mul(factor).map(Self)
    }
}

impl From<DurationMs> for u64 {
    fn from(d: DurationMs) -> u64 {
        d.0
    }
}

impl<'de> Deserialize<'de> for DurationMs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(ms) => Ok(Self(ms)),
            Raw::Text(text) => Self::parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration (milliseconds, or a number with s, m, h, d, w or y)"
                ))
            }),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Listener {
    pub port: u16,
    #[serde(default = "default_bind_addresses")]
    pub bind_addresses: Vec<String>,
    #[serde(default = "default_listener_type", rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub x_forwarded: bool,
    #[serde(default)]
    pub resources: Vec<ListenerResource>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ListenerResource {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub compress: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Database {
    /// `sqlite3` (embedded default) or `psycopg2` (PostgreSQL).
    pub name: String,
    #[serde(default)]
    pub args: BTreeMap<String, serde_json::Value>,
}

impl Default for Database {
    fn default() -> Self {
        let mut args = BTreeMap::new();
        args.insert("database".to_owned(), serde_json::Value::from("homeserver.db"));
        Self {
            name: "sqlite3".to_owned(),
            args,
        }
    }
}

impl Database {
    /// The PostgreSQL settings of a `psycopg2` block (`None` for SQLite), read from Synapse's
    /// `args`: `user`, `password`, `dbname` or `database`, `host`, `port`, `cp_min`, `cp_max`.
    /// Errors name the offending key.
    pub fn postgres(&self) -> Result<Option<PostgresSettings>, (String, String)> {
        if self.name != "psycopg2" {
            return Ok(None);
        }
        let key = |k: &str| format!("database.args.{k}");
        let text = |k: &str| -> Result<Option<String>, (String, String)> {
            match self.args.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(v)) => Ok(Some(v.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(_) => Err((key(k), "must be a string".to_owned())),
            }
        };
        let number = |k: &str, default: u64| -> Result<u64, (String, String)> {
            match self.args.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .ok_or_else(|| (key(k), "must be a whole number ≥ 0".to_owned())),
                // psycopg2 takes libpq's strings too: `port: "5432"`.
                Some(serde_json::Value::String(v)) => v
                    .parse()
                    .map_err(|_| (key(k), format!("`{v}` is not a whole number"))),
                Some(_) => Err((key(k), "must be a number".to_owned())),
            }
        };
        let dbname = match (text("dbname")?, text("database")?) {
            (Some(name), _) | (None, Some(name)) => name,
            (None, None) => {
                return Err((
                    key("dbname"),
                    "psycopg2 needs the database name in `dbname` (or `database`)".to_owned(),
                ));
            }
        };
        let port = number("port", 5432)?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| (key("port"), format!("{port} is not a TCP port")))?;
        let min_connections = number("cp_min", 5)?;
        let max_connections = number("cp_max", 10)?;
        if max_connections == 0 || min_connections > max_connections {
            return Err((
                key("cp_max"),
                format!("must be ≥ 1 and ≥ cp_min ({min_connections}), found {max_connections}"),
            ));
        }
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let ssl_mode = text("sslmode")?;
        if let Some(mode) = ssl_mode
            .as_deref()
            .filter(|m| !PostgresSettings::valid_ssl_mode(m))
        {
            return Err((
                key("sslmode"),
                format!("`{mode}` is not one of disable, allow, prefer, require, verify-ca, verify-full"),
            ));
        }
        Ok(Some(PostgresSettings {
            // Without a host libpq (and so psycopg2) uses the local socket.
            host: text("host")?.unwrap_or_else(|| {
                let socket = "/var/run/postgresql";
                if Path::new(socket).is_dir() {
                    socket.to_owned()
                } else {
                    "localhost".to_owned()
                }
            }),
            port,
            user: text("user")?,
            password: text("password")?,
            dbname,
            min_connections: clamp(min_connections),
            max_connections: clamp(max_connections),
            ssl_mode,
            ssl_root_cert: text("sslrootcert")?.map(PathBuf::from),
        }))
    }

    /// `args` of a `psycopg2` block that Switchboard does not use (psycopg2 passes any libpq
    /// keyword; Synapse adds `cp_reconnect`). Warned about, not refused, so Synapse's block works.
    pub fn ignored_postgres_args(&self) -> Vec<&str> {
        const USED: [&str; 10] = [
            "user",
            "password",
            "dbname",
            "database",
            "host",
            "port",
            "cp_min",
            "cp_max",
            "sslmode",
            "sslrootcert",
        ];
        if self.name != "psycopg2" {
            return Vec::new();
        }
        self.args
            .keys()
            .map(String::as_str)
            .filter(|k| !USED.contains(k))
            .collect()
    }
}

/// A token bucket as Synapse configures it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst_count: f64,
}

impl RateLimit {
    fn message_default() -> Self {
        Self {
            per_second: 0.2,
            burst_count: 10.0,
        }
    }
    fn registration_default() -> Self {
        Self {
            per_second: 0.17,
            burst_count: 3.0,
        }
    }
    fn login_default() -> Self {
        Self {
            per_second: 0.003,
            burst_count: 5.0,
        }
    }
    fn media_create_default() -> Self {
        Self::of(10.0, 50.0)
    }
    const fn of(per_second: f64, burst_count: f64) -> Self {
        Self {
            per_second,
            burst_count,
        }
    }
}

/// One entry of `thumbnail_sizes`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ThumbnailSize {
    pub width: u32,
    pub height: u32,
    pub method: ThumbnailMethod,
}

/// `crop` fills the box and cuts the overflow; `scale` fits inside it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ThumbnailMethod {
    Crop,
    Scale,
}

fn default_thumbnail_sizes() -> Vec<ThumbnailSize> {
    use ThumbnailMethod::{Crop, Scale};
    [
        (32, 32, Crop),
        (96, 96, Crop),
        (320, 240, Scale),
        (640, 480, Scale),
        (800, 600, Scale),
    ]
    .into_iter()
    .map(|(width, height, method)| ThumbnailSize {
        width,
        height,
        method,
    })
    .collect()
}

/// `rc_joins`: joins by local users (`local`), and through other servers (`remote`, which
/// applies once federation exists).
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct JoinRateLimits {
    #[serde(default = "JoinRateLimits::local_default")]
    pub local: RateLimit,
    #[serde(default = "JoinRateLimits::remote_default")]
    pub remote: RateLimit,
}

impl JoinRateLimits {
    fn local_default() -> RateLimit {
        RateLimit::of(0.1, 10.0)
    }
    fn remote_default() -> RateLimit {
        RateLimit::of(0.01, 10.0)
    }
}

impl Default for JoinRateLimits {
    fn default() -> Self {
        Self {
            local: Self::local_default(),
            remote: Self::remote_default(),
        }
    }
}

/// `rc_invites`: into one room, to one user, and by one user.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct InviteRateLimits {
    #[serde(default = "InviteRateLimits::per_room_default")]
    pub per_room: RateLimit,
    #[serde(default = "InviteRateLimits::per_user_default")]
    pub per_user: RateLimit,
    #[serde(default = "InviteRateLimits::per_room_default")]
    pub per_issuer: RateLimit,
}

impl InviteRateLimits {
    fn per_room_default() -> RateLimit {
        RateLimit::of(0.3, 10.0)
    }
    fn per_user_default() -> RateLimit {
        RateLimit::of(0.003, 5.0)
    }
}

impl Default for InviteRateLimits {
    fn default() -> Self {
        Self {
            per_room: Self::per_room_default(),
            per_user: Self::per_user_default(),
            per_issuer: Self::per_room_default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LoginRateLimits {
    #[serde(default = "RateLimit::login_default")]
    pub address: RateLimit,
    #[serde(default = "RateLimit::login_default")]
    pub account: RateLimit,
    #[serde(default = "RateLimit::registration_default")]
    pub failed_attempts: RateLimit,
}

impl Default for LoginRateLimits {
    fn default() -> Self {
        Self {
            address: RateLimit::login_default(),
            account: RateLimit::login_default(),
            failed_attempts: RateLimit::registration_default(),
        }
    }
}

impl Listener {
    pub fn serves(&self, resource: &str) -> bool {
        self.resources
            .iter()
            .any(|r| r.names.iter().any(|n| n == resource))
    }
}

/// An IP address or CIDR range as Synapse's `ip_range_*` lists take them.
pub fn parse_ip_range(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// A 32-byte ed25519 public key in (unpadded or padded) base64.
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(text.trim()).ok()?.try_into().ok()
}

/// A size in bytes, written as a number or as Synapse writes it (`512K`, `50M`, `1G`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct ByteSize(pub usize);

impl ByteSize {
    fn fifty_megabytes() -> Self {
        Self(50 * 1024 * 1024)
    }
    fn thirty_two_mega() -> Self {
        Self(32 * 1024 * 1024)
    }
    fn five_hundred_megabytes() -> Self {
        Self(500 * 1024 * 1024)
    }
    fn eighty_seven_kilobytes() -> Self {
        Self(87 * 1024)
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> u64 {
        size.0 as u64
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let parse = |text: &str| -> Option<usize> {
            let text = text.trim();
            let (digits, unit) =
                text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
            let n: usize = digits.parse().ok()?;
            let factor = match unit.trim().to_ascii_uppercase().as_str() {
                "" | "B" => 1,
                "K" | "KB" => 1024,
                "M" | "MB" => 1024 * 1024,
                "G" | "GB" => 1024 * 1024 * 1024,
                _ => return None,
            };
            n.checked_mul(factor)
        };
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Self(n as usize)),
            Raw::Text(text) => parse(&text)
                .map(Self)
                .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a size like 50M"))),
        }
    }
}

fn default_media_store() -> PathBuf {
    PathBuf::from("media_store")
}
fn default_room_version() -> String {
    "11".to_owned()
}
fn default_bind_addresses() -> Vec<String> {
    vec!["127.0.0.1".to_owned()]
}
fn default_listener_type() -> String {
    "http".to_owned()
}
fn default_max_request_size() -> usize {
    1024 * 1024
}

/// Top-level keys Synapse knows that Switchboard accepts without using; they are not worth a warning
/// each start, since admins copy whole Synapse files.
const QUIET_SYNAPSE_KEYS: &[&str] = &[
    "pid_file",
    "log_config",
    "report_stats",
    "macaroon_secret_key",
    "form_secret",
    "trusted_key_servers",
    "suppress_key_server_warning",
];

impl Config {
    /// Loads a config file. Relative paths in it are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, &path.display().to_string(), base)?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    /// Parses config text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        if !value.is_object() {
            return Err(ConfigError::Yaml {
                path: origin.to_owned(),
                message: "the top level must be a mapping of keys".to_owned(),
            });
        }
        let mut unknown = Vec::new();
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(value, &mut record);
        let mut config: Config =
            serde_path_to_error::deserialize(ignoring).map_err(|e| ConfigError::Key {
                path: origin.to_owned(),
                key: key_path(e.path()),
                message: e.inner().to_string(),
            })?;
        for key in unknown {
            if !QUIET_SYNAPSE_KEYS.contains(&key.as_str()) {
                tracing::warn!(file = origin, key, "ignoring unknown config key");
            }
        }
        config.validate(origin)?;
        config.resolve_paths(base);
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Key {
            path: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        if ruma::ServerName::parse(&self.server_name).is_err() {
            return Err(bad(
                "server_name",
                format!("`{}` is not a valid server name", self.server_name),
            ));
        }
        match self.database.name.as_str() {
            "sqlite3" => {
                if !matches!(
                    self.database.args.get("database"),
                    Some(serde_json::Value::String(_)) | None
                ) {
                    return Err(bad("database.args.database", "must be a file path".to_owned()));
                }
            }
            "psycopg2" => {
                self.database
                    .postgres()
                    .map_err(|(key, message)| bad(&key, message))?;
                for key in self.database.ignored_postgres_args() {
                    tracing::warn!(
                        file = origin,
                        key,
                        "database.args: not used by Switchboard, ignored"
                    );
                }
            }
            other => {
                return Err(bad(
                    "database.name",
                    format!("unknown database `{other}`; use sqlite3 or psycopg2 (PostgreSQL)"),
                ));
            }
        }
        if self.enable_registration && !self.enable_registration_without_verification {
            return Err(bad(
                "enable_registration_without_verification",
                "enable_registration needs it set to true: no email or captcha verification is available"
                    .to_owned(),
            ));
        }
        if self.client_listeners().next().is_none() {
            return Err(bad(
                "listeners",
                "no `http` listener serves the `client` resource, so nothing could reach the server"
                    .to_owned(),
            ));
        }
        self.validate_federation(&bad)?;
        if let Err(e) = crate::pdu::RoomVersion::parse(&self.default_room_version) {
            return Err(bad("default_room_version", e.to_string()));
        }
        let limits = [
            ("rc_message", Some(self.rc_message)),
            ("rc_registration", Some(self.rc_registration)),
            ("rc_login.address", Some(self.rc_login.address)),
            ("rc_login.account", Some(self.rc_login.account)),
            ("rc_login.failed_attempts", Some(self.rc_login.failed_attempts)),
            ("rc_joins.local", Some(self.rc_joins.local)),
            ("rc_joins.remote", Some(self.rc_joins.remote)),
            ("rc_invites.per_room", Some(self.rc_invites.per_room)),
            ("rc_invites.per_user", Some(self.rc_invites.per_user)),
            ("rc_invites.per_issuer", Some(self.rc_invites.per_issuer)),
            ("rc_admin_redaction", self.rc_admin_redaction),
            ("rc_media_create", Some(self.rc_media_create)),
            ("rc_3pid_validation", Some(self.rc_3pid_validation)),
        ];
        for (key, limit) in limits.into_iter().filter_map(|(k, l)| Some((k, l?))) {
            if limit.per_second < 0.0 || limit.burst_count < 1.0 {
                return Err(bad(key, "per_second must be ≥ 0 and burst_count ≥ 1".to_owned()));
            }
        }
        if self.thumbnail_sizes.is_empty()
            || self
                .thumbnail_sizes
                .iter()
                .any(|t| t.width == 0 || t.height == 0 || t.width > 10_000 || t.height > 10_000)
        {
            return Err(bad(
                "thumbnail_sizes",
                "list at least one size, each side 1 to 10000 pixels".to_owned(),
            ));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        self.media_store_path = resolve(&self.media_store_path);
        let key = self
            .signing_key_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.signing.key", self.server_name)));
        self.signing_key_path = Some(resolve(&key));
        self.app_service_config_files = self.app_service_config_files.iter().map(|p| resolve(p)).collect();
        self.federation_custom_ca_list = self
            .federation_custom_ca_list
            .iter()
            .map(|p| resolve(p))
            .collect();
        for path in [&mut self.tls_certificate_path, &mut self.tls_private_key_path]
            .into_iter()
            .flatten()
        {
            *path = resolve(path);
        }
        // For PostgreSQL `database` is a database name, not a path.
        if self.database.name == "sqlite3"
            && let Some(serde_json::Value::String(db)) = self.database.args.get("database")
            && db != ":memory:"
        {
            let resolved = resolve(Path::new(db)).display().to_string();
            self.database.args.insert("database".to_owned(), resolved.into());
        }
    }

    /// Listeners that serve the Server-Server API (and the key API beside it).
    pub fn federation_listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners
            .iter()
            .filter(|l| l.kind == "http" && l.serves("federation"))
    }

    fn validate_federation(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if self.listeners.iter().any(|l| l.tls) {
            for (key, path) in [
                ("tls_certificate_path", &self.tls_certificate_path),
                ("tls_private_key_path", &self.tls_private_key_path),
            ] {
                match path {
                    None => {
                        return Err(bad(
                            key,
                            "a listener has `tls: true`, so this file is needed".to_owned(),
                        ));
                    }
                    Some(p) if !p.is_file() => {
                        return Err(bad(key, format!("{} is not a readable file", p.display())));
                    }
                    Some(_) => {}
                }
            }
        }
        for (i, ca) in self.federation_custom_ca_list.iter().enumerate() {
            if !ca.is_file() {
                return Err(bad(
                    &format!("federation_custom_ca_list[{i}]"),
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        let lists = [
            ("ip_range_blacklist", self.ip_range_blacklist.as_deref()),
            ("ip_range_whitelist", Some(self.ip_range_whitelist.as_slice())),
            (
                "federation_ip_range_blacklist",
                self.federation_ip_range_blacklist.as_deref(),
            ),
        ];
        for (key, list) in lists.into_iter().filter_map(|(k, l)| Some((k, l?))) {
            for (i, range) in list.iter().enumerate() {
                if parse_ip_range(range).is_none() {
                    return Err(bad(
                        &format!("{key}[{i}]"),
                        format!("`{range}` is not an IP address or CIDR range"),
                    ));
                }
            }
        }
        for (i, server) in self.trusted_key_servers.iter().enumerate() {
            if ruma::ServerName::parse(&server.server_name).is_err() {
                return Err(bad(
                    &format!("trusted_key_servers[{i}].server_name"),
                    format!("`{}` is not a server name", server.server_name),
                ));
            }
            for (key_id, key) in server.verify_keys.iter().flatten() {
                if !key_id.starts_with("ed25519:") || decode_key(key).is_none() {
                    return Err(bad(
                        &format!("trusted_key_servers[{i}].verify_keys"),
                        format!("`{key_id}: {key}` is not an ed25519 key ID and a base64 key"),
                    ));
                }
            }
            if server.verify_keys.is_none()
                && !self.federation_verify_certificates
                && !server.accept_keys_insecurely
            {
                return Err(bad(
                    &format!("trusted_key_servers[{i}]"),
                    "without verify_keys, this notary's answers are only as good as its certificate, which \
                     federation_verify_certificates: false does not check; give verify_keys or set \
                     accept_keys_insecurely: true"
                        .to_owned(),
                ));
            }
        }
        for (key_id, old) in &self.old_signing_keys {
            if !key_id.starts_with("ed25519:") || decode_key(&old.key).is_none() {
                return Err(bad(
                    &format!("old_signing_keys.{key_id}"),
                    "expected `ed25519:<id>: {key: <base64>, expired_ts: <ms>}`".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Listeners that serve the Client-Server API.
    pub fn client_listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners
            .iter()
            .filter(|l| l.kind == "http" && l.resources.iter().any(|r| r.names.iter().any(|n| n == "client")))
    }

    /// Listeners that serve Prometheus metrics: Synapse's `type: metrics`, or an `http` listener
    /// with the `metrics` resource.
    pub fn metrics_listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners.iter().filter(|l| {
            l.kind == "metrics"
                || (l.kind == "http" && l.resources.iter().any(|r| r.names.iter().any(|n| n == "metrics")))
        })
    }

    /// The database to open (validated at load).
    pub fn database_settings(&self) -> DatabaseSettings {
        match self.database.postgres() {
            Ok(Some(pg)) => DatabaseSettings::Postgres(pg),
            _ => DatabaseSettings::Sqlite(self.sqlite_path()),
        }
    }

    /// Path of the SQLite database file.
    pub fn sqlite_path(&self) -> PathBuf {
        match self.database.args.get("database") {
            Some(serde_json::Value::String(p)) => PathBuf::from(p),
            _ => PathBuf::from("homeserver.db"),
        }
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("signing.key"))
    }

    /// A ready-to-run config for `generate-config`, rooted at `data_dir`. Registration is closed
    /// (Synapse's default) unless `open_registration`.
    pub fn generated(
        server_name: &str,
        data_dir: &Path,
        port: u16,
        shared_secret: String,
        open_registration: bool,
    ) -> Self {
        Self {
            server_name: server_name.to_owned(),
            public_baseurl: None,
            listeners: vec![Listener {
                port,
                bind_addresses: default_bind_addresses(),
                kind: default_listener_type(),
                tls: false,
                x_forwarded: false,
                resources: vec![ListenerResource {
                    names: vec!["client".to_owned()],
                    compress: false,
                }],
            }],
            database: Database {
                name: "sqlite3".to_owned(),
                args: BTreeMap::from([(
                    "database".to_owned(),
                    data_dir.join("homeserver.db").display().to_string().into(),
                )]),
            },
            media_store_path: data_dir.join("media"),
            signing_key_path: Some(data_dir.join("signing.key")),
            enable_registration: open_registration,
            enable_registration_without_verification: open_registration,
            registration_shared_secret: Some(shared_secret),
            app_service_config_files: Vec::new(),
            use_appservice_legacy_authorization: false,
            default_room_version: default_room_version(),
            rc_message: RateLimit::message_default(),
            rc_registration: RateLimit::registration_default(),
            rc_login: LoginRateLimits::default(),
            rc_joins: JoinRateLimits::default(),
            rc_invites: InviteRateLimits::default(),
            rc_admin_redaction: None,
            rc_media_create: RateLimit::media_create_default(),
            rc_3pid_validation: RateLimit::login_default(),
            max_request_size: default_max_request_size(),
            max_upload_size: ByteSize::fifty_megabytes(),
            max_image_pixels: ByteSize::thirty_two_mega(),
            thumbnail_sizes: default_thumbnail_sizes(),
            tls_certificate_path: None,
            tls_private_key_path: None,
            serve_server_wellknown: false,
            federation_verify_certificates: true,
            federation_custom_ca_list: Vec::new(),
            federation_domain_whitelist: None,
            ip_range_blacklist: None,
            ip_range_whitelist: Vec::new(),
            federation_ip_range_blacklist: None,
            trusted_key_servers: default_trusted_key_servers(),
            suppress_key_server_warning: false,
            old_signing_keys: BTreeMap::new(),
            key_refresh_interval: DurationMs::one_day(),
            allow_public_rooms_over_federation: false,
            use_presence: true,
            enable_authenticated_media: true,
            media_retention: MediaRetention::default(),
            remote_media_download_burst_count: ByteSize::five_hundred_megabytes(),
            remote_media_download_per_second: ByteSize::eighty_seven_kilobytes(),
            path: None,
        }
    }
}

fn key_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." {
        "(top level)".to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
server_name: localhost
listeners:
  - port: 8008
    bind_addresses: ['127.0.0.1']
    type: http
    resources: [{names: [client]}]
database: {name: sqlite3, args: {database: data/homeserver.db}}
media_store_path: data/media
signing_key_path: data/signing.key
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: "s3cret"
app_service_config_files: []
some_future_key: 1
"#;

    #[test]
    fn nested_unknown_keys_are_ignored() {
        let text = SAMPLE.replace(
            "type: http",
            "type: http\n    tag: main\n    request_id_header: X-Id",
        );
        assert!(Config::parse(&text, "hs.yaml", Path::new(".")).is_ok());
    }

    #[test]
    fn parses_synapse_style_config() {
        let c = Config::parse(SAMPLE, "hs.yaml", Path::new("/etc/sb")).expect("valid");
        assert_eq!(c.server_name, "localhost");
        assert_eq!(c.sqlite_path(), PathBuf::from("/etc/sb/data/homeserver.db"));
        assert_eq!(c.signing_key_path(), PathBuf::from("/etc/sb/data/signing.key"));
        assert_eq!(c.client_listeners().count(), 1);
        assert_eq!(
            c.rc_message,
            RateLimit {
                per_second: 0.2,
                burst_count: 10.0
            }
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = SAMPLE.replace("port: 8008", "port: eighty");
        let err = Config::parse(&text, "hs.yaml", Path::new(".")).expect_err("invalid");
        let msg = err.to_string();
        assert!(
            msg.contains("hs.yaml") && msg.contains("listeners[0].port"),
            "{msg}"
        );
    }

    #[test]
    fn missing_required_key_names_it() {
        let text = SAMPLE.replace("server_name: localhost", "");
        let msg = Config::parse(&text, "hs.yaml", Path::new("."))
            .expect_err("invalid")
            .to_string();
        assert!(msg.contains("server_name"), "{msg}");
    }

    #[test]
    fn reads_synapses_postgres_block() {
        let block = "database:\n  name: psycopg2\n  args:\n    user: synapse_user\n    password: secretpassword\n    \
                     database: synapse\n    host: db.internal\n    port: \"5433\"\n    cp_min: 2\n    cp_max: 20\n    \
                     sslmode: verify-full\n    sslrootcert: /etc/ssl/db-ca.pem\n    cp_reconnect: true\n";
        let text = SAMPLE.replace(
            "database: {name: sqlite3, args: {database: data/homeserver.db}}",
            block,
        );
        assert_ne!(text, SAMPLE);
        let config = Config::parse(&text, "hs.yaml", Path::new("/etc/sb")).expect("parses");
        let DatabaseSettings::Postgres(pg) = config.database_settings() else {
            panic!("not PostgreSQL");
        };
        assert_eq!(
            pg,
            PostgresSettings {
                host: "db.internal".into(),
                port: 5433,
                user: Some("synapse_user".into()),
                password: Some("secretpassword".into()),
                // A database name, not a path relative to the config.
                dbname: "synapse".into(),
                min_connections: 2,
                max_connections: 20,
                ssl_mode: Some("verify-full".into()),
                ssl_root_cert: Some("/etc/ssl/db-ca.pem".into()),
            }
        );
        let defaults = SAMPLE.replace(
            "database: {name: sqlite3, args: {database: data/homeserver.db}}",
            "database: {name: psycopg2, args: {dbname: sb}}",
        );
        let DatabaseSettings::Postgres(pg) = Config::parse(&defaults, "hs.yaml", Path::new("."))
            .expect("parses")
            .database_settings()
        else {
            panic!("not PostgreSQL");
        };
        assert!(
            pg.host == "/var/run/postgresql" || pg.host == "localhost",
            "the local socket when there is one, as libpq: {}",
            pg.host
        );
        assert_eq!((pg.port, pg.max_connections), (5432, 10));
        for (args, key) in [
            ("{user: x}", "database.args.dbname"),
            ("{dbname: sb, port: seventy}", "database.args.port"),
            ("{dbname: sb, port: 70000}", "database.args.port"),
            ("{dbname: sb, cp_min: 5, cp_max: 2}", "database.args.cp_max"),
            ("{dbname: [sb]}", "database.args.dbname"),
            ("{dbname: sb, sslmode: sometimes}", "database.args.sslmode"),
        ] {
            let text = SAMPLE.replace(
                "database: {name: sqlite3, args: {database: data/homeserver.db}}",
                &format!("database: {{name: psycopg2, args: {args}}}"),
            );
            let msg = Config::parse(&text, "hs.yaml", Path::new("."))
                .expect_err(args)
                .to_string();
            assert!(msg.contains(key) && msg.contains("hs.yaml"), "{args}: {msg}");
        }
    }

    #[test]
    fn generated_config_round_trips() {
        let c = Config::generated("example.org", Path::new("/srv/sb"), 8008, "x".into(), false);
        let text = serde_saphyr::to_string(&c).expect("yaml");
        let back = Config::parse(&text, "gen.yaml", Path::new("/")).expect("parses");
        assert_eq!(back.server_name, "example.org");
        assert!(!back.enable_registration, "closed unless asked, as in Synapse");
        let open = Config::generated("example.org", Path::new("/srv/sb"), 8008, "x".into(), true);
        let text = serde_saphyr::to_string(&open).expect("yaml");
        let back = Config::parse(&text, "gen.yaml", Path::new("/")).expect("parses");
        assert!(back.enable_registration && back.enable_registration_without_verification);
        assert_eq!(back.sqlite_path(), PathBuf::from("/srv/sb/homeserver.db"));
    }
}
