//! The `switchboard` binary: run the homeserver, generate a config, register users offline.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use switchboard_core::{Homeserver, config::Config, keys, util::random_string};
use switchboard_store::{DatabaseSettings, PostgresSettings, Store, port};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

mod tls;

/// mimalloc returns freed memory to the OS: with glibc's malloc, the 19 MiB argon2 buffers of
/// password hashing stay resident after every login (RSS 170 MiB vs 21 MiB after the benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A Matrix homeserver built around application services"
)]
struct Cli {
    /// The homeserver config file (Synapse-style YAML).
    #[arg(short, long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write a ready-to-run config and a fresh signing key.
    GenerateConfig {
        #[arg(long)]
        server_name: String,
        /// Where the database, media and key live (and where the config is written).
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 8008)]
        port: u16,
        /// Overwrite an existing config file.
        #[arg(long)]
        force: bool,
        /// An application-service registration file to list in `app_service_config_files`
        /// (repeatable; relative paths are read from the config's directory).
        #[arg(long = "app-service")]
        app_services: Vec<PathBuf>,
        /// Let anyone register an account (`enable_registration: true`); closed by default,
        /// as in Synapse: accounts then come from `register-user` or shared-secret registration.
        #[arg(long)]
        open_registration: bool,
    },
    /// Inspect and steer application services on a running server (needs an admin's token).
    Appservice {
        #[command(subcommand)]
        action: AppserviceAction,
        /// The server's client URL; defaults to the first client listener of --config.
        #[arg(long, global = true)]
        homeserver: Option<String>,
        /// A server admin's access token.
        #[arg(long, global = true, env = "SWITCHBOARD_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Copy a SQLite database into a new, empty PostgreSQL database, then tell what to change
    /// in the config (like Synapse's synapse_port_db).
    PortDb {
        /// The SQLite database file (`database.args.database` of the config).
        #[arg(long)]
        sqlite: PathBuf,
        /// The PostgreSQL database: `postgresql://user[:password]@host[:port]/dbname`.
        #[arg(long)]
        postgres: String,
    },
    /// Create an account without the server running.
    RegisterUser {
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Subcommand)]
enum AppserviceAction {
    /// Every service: up/down, queue, errors.
    List,
    /// One service in detail.
    Show { id: String },
    /// Round trip to the service's /ping.
    Ping { id: String },
    /// Retry a failing service's transaction now instead of after its backoff.
    Retry { id: String },
    /// Re-read the registration files (as SIGHUP does).
    Reload,
}

/// `info`, without ruma's state-resolution chatter (two lines per event at `info`).
const DEFAULT_LOG_FILTER: &str = "info,ruma_state_res=warn";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    switchboard_core::tls::init();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Some(Command::GenerateConfig {
                server_name,
                data_dir,
                port,
                force,
                app_services,
                open_registration,
            }) => generate_config(
                &server_name,
                &data_dir,
                port,
                force,
                app_services,
                open_registration,
            ),
            Some(Command::RegisterUser {
                user,
                password,
                admin,
            }) => {
                let config = load_config(cli.config.as_deref())?;
                let hs = Homeserver::open(config).await?;
                let user_id = hs.accounts.create_user(&user, Some(&password), admin).await?;
                hs.store.close().await;
                println!("Registered {user_id}{}", if admin { " (admin)" } else { "" });
                Ok(())
            }
            Some(Command::PortDb { sqlite, postgres }) => port_db(&sqlite, &postgres).await,
            Some(Command::Appservice {
                action,
                homeserver,
                token,
            }) => appservice_command(action, homeserver, token, cli.config.as_deref()).await,
            None => serve(load_config(cli.config.as_deref())?).await,
        }
    })
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        bail!(
            "no config given: pass --config homeserver.yaml (create one with `switchboard generate-config`)"
        );
    };
    Ok(Config::load(path)?)
}

fn generate_config(
    server_name: &str,
    data_dir: &Path,
    port: u16,
    force: bool,
    app_services: Vec<PathBuf>,
    open_registration: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let config_path = data_dir.join("homeserver.yaml");
    if config_path.exists() && !force {
        bail!("{} exists; pass --force to overwrite it", config_path.display());
    }
    let mut config = Config::generated(server_name, &data_dir, port, random_string(32), open_registration);
    config.app_service_config_files = app_services;
    let key_path = config.signing_key_path();
    if !key_path.exists() {
        std::fs::write(&key_path, keys::generate_key_file_contents())
            .with_context(|| format!("cannot write {}", key_path.display()))?;
    }
    let yaml = serde_saphyr::to_string(&config)?;
    std::fs::write(
        &config_path,
        format!("# Switchboard homeserver config (Synapse key names).\n{yaml}"),
    )
    .with_context(|| format!("cannot write {}", config_path.display()))?;
    // Check that what we wrote loads, so a bad generator never hands out a broken file.
    Config::load(&config_path)?;
    println!("{}", config_path.display());
    Ok(())
}

async fn port_db(sqlite: &Path, postgres: &str) -> anyhow::Result<()> {
    if !sqlite.is_file() {
        bail!("{}: no such SQLite database", sqlite.display());
    }
    let settings = PostgresSettings::from_url(postgres).map_err(anyhow::Error::msg)?;
    eprintln!(
        "Copying {} into PostgreSQL {}.\nStop Switchboard first: what it writes after the copy begins stays in SQLite only.",
        sqlite.display(),
        settings.describe()
    );
    let source = Store::open_sqlite(sqlite).await?;
    let target = Store::open(&DatabaseSettings::Postgres(settings.clone())).await?;
    let report = port::sqlite_to_postgres(&source, &target).await;
    source.close().await;
    target.close().await;
    let report = report?;
    println!(
        "Copied {} rows; the row counts of both databases match:",
        report.total_rows()
    );
    for (table, rows) in &report.tables {
        println!("  {table:<20} {rows:>10}");
    }
    println!(
        "\nTo run on PostgreSQL, replace the `database` block of homeserver.yaml with\n\n{}\n\
         and start Switchboard. Media (media_store_path) and the signing key stay where they are;\n\
         keep {} as a backup until you are satisfied.",
        PostgresSettings {
            min_connections: 5,
            max_connections: 10,
            ..settings
        }
        .config_block(),
        sqlite.display()
    );
    Ok(())
}

async fn appservice_command(
    action: AppserviceAction,
    homeserver: Option<String>,
    token: Option<String>,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    let base = match homeserver {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let config = load_config(config)
                .context("pass --homeserver URL, or --config so the listener can be read from it")?;
            let listener = config
                .client_listeners()
                .next()
                .context("the config has no client listener")?;
            let host = listener
                .bind_addresses
                .first()
                .map_or("127.0.0.1", String::as_str);
            let host = if host == "0.0.0.0" || host == "::" {
                "127.0.0.1"
            } else {
                host
            };
            format!("http://{host}:{}", listener.port)
        }
    };
    let token = token.context("pass --token (or SWITCHBOARD_ADMIN_TOKEN): a server admin's access token")?;
    let admin = format!("{base}/_switchboard/admin/v1/appservices");
    let client = reqwest::Client::new();
    let request = match &action {
        AppserviceAction::List => client.get(&admin),
        AppserviceAction::Show { id } => client.get(format!("{admin}/{id}")),
        AppserviceAction::Ping { id } => client.post(format!("{admin}/{id}/ping")),
        AppserviceAction::Retry { id } => client.post(format!("{admin}/{id}/retry")),
        AppserviceAction::Reload => client.post(format!("{admin}/reload")),
    };
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{status}: {} {}",
            body["errcode"].as_str().unwrap_or(""),
            body["error"].as_str().unwrap_or("")
        );
    }
    match action {
        AppserviceAction::List => {
            println!(
                "{:<20} {:<5} {:>8} {:>10} {:>12}  last error",
                "id", "up", "failures", "undelivered", "oldest age s"
            );
            for s in body["appservices"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<5} {:>8} {:>10} {:>12}  {}",
                    s["id"].as_str().unwrap_or("?"),
                    s["up"].as_bool().unwrap_or(false),
                    s["consecutive_failures"],
                    s["undelivered_stream_events"],
                    s["oldest_undelivered_age_ms"]
                        .as_u64()
                        .map_or("-".to_owned(), |ms| (ms / 1000).to_string()),
                    s["last_error"].as_str().unwrap_or("-"),
                );
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&body)?),
    }
    Ok(())
}

/// One address a listener binds, and what it serves there.
struct Binding {
    address: SocketAddr,
    resources: switchboard_api::Resources,
    metrics: bool,
    tls: bool,
    x_forwarded: bool,
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let mut bindings = Vec::new();
    // Each listener serves what its resources say: the client API, federation, metrics.
    for listener in &config.listeners {
        let resources = switchboard_api::Resources {
            client: config.client_listeners().any(|l| std::ptr::eq(l, listener)),
            federation: config.federation_listeners().any(|l| std::ptr::eq(l, listener)),
        };
        let metrics = config.metrics_listeners().any(|l| std::ptr::eq(l, listener));
        if !resources.client && !resources.federation && !metrics {
            continue;
        }
        for address in &listener.bind_addresses {
            let ip = address
                .parse()
                .with_context(|| format!("listeners: bad bind address `{address}`"))?;
            bindings.push(Binding {
                address: SocketAddr::new(ip, listener.port),
                resources,
                metrics,
                tls: listener.tls,
                x_forwarded: listener.x_forwarded,
            });
        }
    }
    let tls = match (&config.tls_certificate_path, &config.tls_private_key_path) {
        (Some(cert), Some(key)) if bindings.iter().any(|b| b.tls) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let hs = Arc::new(Homeserver::open(config).await?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every port is bound before any serves: once one answers, all do (clients and tests may
    // take the first answer as "started").
    let mut bound = Vec::with_capacity(bindings.len());
    for binding in bindings {
        let listener = TcpListener::bind(binding.address)
            .await
            .with_context(|| format!("cannot listen on {}", binding.address))?;
        bound.push((binding, listener));
    }
    let mut servers = Vec::new();
    for (binding, listener) in bound {
        let Binding {
            address,
            resources,
            metrics,
            x_forwarded,
            ..
        } = binding;
        tracing::info!(
            %address,
            server_name = %hs.server_name,
            client = resources.client,
            federation = resources.federation,
            metrics,
            tls = binding.tls,
            "listening"
        );
        let mut app = if resources.client || resources.federation {
            switchboard_api::router_for(hs.clone(), resources, x_forwarded)
        } else {
            axum::Router::new()
        };
        if metrics {
            app = app.merge(switchboard_api::metrics_router(hs.clone()));
        }
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        servers.push(match (&tls, binding.tls) {
            (Some(config), true) => {
                use axum::serve::ListenerExt;
                // `tap_io` gives the listener axum's connect-info support (the peer's address).
                let listener = tls::TlsListener::new(listener, config.clone())?.tap_io(|_| {});
                tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await })
            }
            _ => {
                tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await })
            }
        });
    }
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(hs.clone()));
    tokio::spawn(hs.clone().expire_remote_media());
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    hs.stream.close();
    for server in servers {
        server.await??;
    }
    hs.appservices.delivery.shutdown().await;
    hs.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// `SIGHUP` re-reads the application service registrations: a valid set replaces the old one
/// at once; an invalid one is refused, logged, and the old set kept.
#[cfg(unix)]
async fn reload_on_sighup(hs: Arc<Homeserver>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match hs.appservices.reload().await {
            Ok(count) => tracing::info!(count, "reloaded application service registrations"),
            Err(e) => tracing::error!(error = %e, "registrations not reloaded; keeping the previous set"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
