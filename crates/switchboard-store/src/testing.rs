//! Databases for tests: SQLite in a temporary directory by default, or, with
//! `SWITCHBOARD_TEST_DATABASE=postgres`, a fresh PostgreSQL database per use, dropped afterwards.
//! `SWITCHBOARD_TEST_POSTGRES` (default `postgresql://postgres@127.0.0.1:5432/postgres`) is the
//! maintenance connection that creates and drops them.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{AssertSqlSafe, Connection, PgConnection, postgres::PgConnectOptions};

use crate::{DatabaseSettings, PostgresSettings};

/// Whether the tests run on PostgreSQL.
pub fn postgres_selected() -> bool {
    std::env::var("SWITCHBOARD_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

fn admin_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A PostgreSQL database made for one test, dropped with this value.
pub struct TestPostgres {
    pub settings: PostgresSettings,
}

impl TestPostgres {
    /// Creates an empty database (UTF-8, C collation, as an operator should).
    pub async fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!(
            "sbtest_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let url = admin_url();
        let options: PgConnectOptions = url
            .parse()
            .unwrap_or_else(|e| panic!("SWITCHBOARD_TEST_POSTGRES {url}: {e}"));
        let mut admin = PgConnection::connect_with(&options)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} for the tests: {e}"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )))
        .execute(&mut admin)
        .await
        .expect("create test database");
        let _ = admin.close().await;
        Self {
            settings: PostgresSettings {
                host: options.get_host().to_owned(),
                port: options.get_port(),
                user: Some(options.get_username().to_owned()),
                password: None,
                dbname: name,
                min_connections: 1,
                max_connections: 10,
                // Loopback: TLS would only slow the tests (sqlx reads the system's trust roots
                // for every connection); `durability::postgres_sslmode_is_honoured` covers it.
                ssl_mode: Some("disable".to_owned()),
                ssl_root_cert: None,
            },
        }
    }

    /// The `database:` block of a homeserver.yaml for this database.
    pub fn config_block(&self) -> String {
        self.settings.config_block()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let name = self.settings.dbname.clone();
        // Drop may run inside a runtime that must not block: a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// A database for one test on the selected engine; keep it alive as long as the store.
pub enum TestDatabase {
    Sqlite(tempfile::TempDir),
    Postgres(TestPostgres),
}

impl TestDatabase {
    pub async fn create() -> Self {
        if postgres_selected() {
            Self::Postgres(TestPostgres::create().await)
        } else {
            Self::Sqlite(tempfile::tempdir().expect("tempdir"))
        }
    }

    pub fn settings(&self) -> DatabaseSettings {
        match self {
            Self::Sqlite(dir) => DatabaseSettings::Sqlite(dir.path().join("db.sqlite")),
            Self::Postgres(pg) => DatabaseSettings::Postgres(pg.settings.clone()),
        }
    }
}
