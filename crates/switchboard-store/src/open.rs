//! Connecting to either engine, with errors that name what could not be reached.

use std::{path::PathBuf, str::FromStr, time::Duration};

use sqlx::{
    Connection, Row,
    postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{Result, StoreError, migrate};

/// Which database to open.
#[derive(Clone, Debug)]
pub enum DatabaseSettings {
    /// The embedded default: one file.
    Sqlite(PathBuf),
    Postgres(PostgresSettings),
}

/// A PostgreSQL connection, as Synapse's `psycopg2` database `args` describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresSettings {
    /// A host name or address, or a directory holding the server's Unix socket.
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub dbname: String,
    /// Connections kept open at least (`cp_min`) and at most (`cp_max`).
    pub min_connections: u32,
    pub max_connections: u32,
    /// libpq's `sslmode` (`disable` … `verify-full`); `None` is libpq's default, `prefer`.
    pub ssl_mode: Option<String>,
    /// CA certificates (PEM) to verify the server with; the system's trust roots otherwise.
    pub ssl_root_cert: Option<PathBuf>,
}

impl PostgresSettings {
    /// `user@host:port/dbname`, for messages (never the password).
    pub fn describe(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("\"{}\" at {user}{}:{}", self.dbname, self.host, self.port)
    }

    /// Reads `postgresql://user[:password]@host[:port]/dbname` (libpq's URL form).
    pub fn from_url(text: &str) -> std::result::Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("`{text}`: the URL must start with postgresql://"));
        }
        // libpq's URLs are percent-encoded, with `+` as itself (not a space, as in forms).
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let query = |key: &str| {
            url.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let dbname = url.path().trim_start_matches('/');
        if dbname.is_empty() {
            return Err(format!("`{text}` names no database (…/dbname at the end)"));
        }
        if let Some(mode) = query("sslmode").filter(|m| !Self::valid_ssl_mode(m)) {
            return Err(format!("`{text}`: unknown sslmode `{mode}`"));
        }
        Ok(Self {
            // `?host=/run/postgresql` names a socket directory, as libpq allows.
            host: query("host").unwrap_or_else(|| match url.host() {
                Some(url::Host::Ipv6(address)) => address.to_string(),
                Some(host) => decode(&host.to_string()),
                None => "localhost".to_owned(),
            }),
            port: url.port().unwrap_or(5432),
            user: (!url.username().is_empty()).then(|| decode(url.username())),
            password: url.password().map(decode),
            dbname: decode(dbname),
            min_connections: 1,
            max_connections: 4,
            ssl_mode: query("sslmode"),
            ssl_root_cert: query("sslrootcert").map(PathBuf::from),
        })
    }

    /// The `database:` block of a homeserver.yaml that opens this database.
    pub fn config_block(&self) -> String {
        let mut args = Vec::new();
        if let Some(user) = &self.user {
            args.push(format!("user: {}", yaml_string(user)));
        }
        if let Some(password) = &self.password {
            args.push(format!("password: {}", yaml_string(password)));
        }
        args.push(format!("dbname: {}", yaml_string(&self.dbname)));
        args.push(format!("host: {}", yaml_string(&self.host)));
        args.push(format!("port: {}", self.port));
        args.push(format!("cp_min: {}", self.min_connections));
        args.push(format!("cp_max: {}", self.max_connections));
        if let Some(mode) = &self.ssl_mode {
            args.push(format!("sslmode: {}", yaml_string(mode)));
        }
        if let Some(cert) = &self.ssl_root_cert {
            args.push(format!(
                "sslrootcert: {}",
                yaml_string(&cert.display().to_string())
            ));
        }
        format!(
            "database:\n  name: psycopg2\n  args:\n    {}\n",
            args.join("\n    ")
        )
    }

    pub(crate) fn connect_options(&self) -> PgConnectOptions {
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .database(&self.dbname)
            .application_name("switchboard");
        if let Some(user) = &self.user {
            options = options.username(user);
        }
        if let Some(password) = &self.password {
            options = options.password(password);
        }
        // Validated when the config was read.
        if let Some(mode) = self.ssl_mode.as_deref().and_then(|m| PgSslMode::from_str(m).ok()) {
            options = options.ssl_mode(mode);
        }
        if let Some(cert) = &self.ssl_root_cert {
            options = options.ssl_root_cert(cert);
        }
        options
    }

    /// Whether `mode` is one of libpq's `sslmode` values.
    pub fn valid_ssl_mode(mode: &str) -> bool {
        PgSslMode::from_str(mode).is_ok()
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn yaml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

pub(crate) async fn sqlite(path: &std::path::Path) -> Result<(SqlitePool, SqlitePool)> {
    if let Some(parent) = path.parent() {
        // A missing directory would otherwise surface as an opaque "unable to open" error.
        let _ = std::fs::create_dir_all(parent);
    }
    let open_error = |source| StoreError::Open {
        path: path.display().to_string(),
        source,
    };
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(open_error)?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: an acknowledged write survives power loss, not only a process crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    // A local file needs no liveness ping before each query (sqlx's default costs a round
    // trip to the connection's thread per acquire).
    let write = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .map_err(open_error)?;
    migrate::sqlite(&write).await.map_err(|e| match e {
        StoreError::Unusable { reason, .. } => StoreError::Unusable {
            database: path.display().to_string(),
            reason,
        },
        other => other,
    })?;
    let read = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(6)
        .connect_with(options.read_only(true))
        .await
        .map_err(open_error)?;
    Ok((write, read))
}

/// How long startup waits for PostgreSQL before giving up with an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn postgres(settings: &PostgresSettings) -> Result<PgPool> {
    let open_error = |source| StoreError::Open {
        path: format!("PostgreSQL {}", settings.describe()),
        source,
    };
    // One direct connection first: a pool reports an unreachable server only as a timeout,
    // while the connection's own error says what is wrong (refused, unknown host, bad password,
    // no such database).
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        PgConnection::connect_with(&settings.connect_options()),
    )
    .await
    {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(source)) => return Err(open_error(source)),
        Err(_) => return Err(open_error(sqlx::Error::PoolTimedOut)),
    }
    let pool = PgPoolOptions::new()
        .min_connections(settings.min_connections)
        .max_connections(settings.max_connections.max(1))
        // An unreachable host fails startup in seconds instead of hanging.
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(settings.connect_options())
        .await
        .map_err(open_error)?;
    let unusable = |reason: String| StoreError::Unusable {
        database: format!("PostgreSQL {}", settings.describe()),
        reason,
    };
    let encoding: String = sqlx::query("SHOW server_encoding").fetch_one(&pool).await?.get(0);
    if encoding != "UTF8" {
        return Err(unusable(format!(
            "the database encoding is {encoding}; create it with ENCODING 'UTF8' (Matrix text is Unicode)"
        )));
    }
    let collation: String =
        sqlx::query("SELECT datcollate FROM pg_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await?
            .get(0);
    // C.UTF-8 orders by code point, as C does.
    let bytewise = ["C", "POSIX", "C.UTF-8", "C.utf8"].contains(&collation.as_str());
    if !bytewise {
        // As Synapse warns: a locale collation orders text differently from SQLite and can change
        // with the C library. Here it only reorders a few text-sorted lists (aliases, devices,
        // the room directory), so it is a warning, not a refusal.
        tracing::warn!(
            %collation,
            "the PostgreSQL database does not use the C collation; LC_COLLATE='C' is recommended"
        );
    }
    migrate::postgres(&pool).await.map_err(|e| match e {
        StoreError::Unusable { reason, .. } => unusable(reason),
        other => other,
    })?;
    // A sequence behind the stored events (a data-only restore) would make every write collide.
    sqlx::query(
        "SELECT setval('events_stream_pos', GREATEST(MAX(stream_pos), (SELECT last_value FROM events_stream_pos)))
         FROM events HAVING COUNT(*) > 0",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}
