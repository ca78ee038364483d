//! The logging service of the 2015 blog post that introduced application services, on
//! Switchboard's SDK: every message in a room whose alias matches `#logged_*` becomes one JSON
//! line (room, sender, type, content); joining a `#logged_…` alias that does not exist yet
//! creates the room, so anyone can start a logged room by joining it.

use std::{io::Write, net::SocketAddr, path::PathBuf, sync::Mutex};

use clap::{Parser, Subcommand};
use ruma::OwnedRoomAliasId;
use serde_json::{Value, json};
use switchboard_appservice::{
    Appservice, Context, Handler, HandlerResult, cli::GenerateRegistration, registration,
};
use tracing_subscriber::EnvFilter;

/// The alias localparts this service logs (and creates rooms for).
const PREFIX: &str = "logged_";

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The registration file (make one with `generate-registration`).
    #[arg(long, short, default_value = "logger.yaml")]
    registration: PathBuf,
    /// The homeserver's client API.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    homeserver: String,
    /// The homeserver's server name.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Where the homeserver reaches this service (the registration's `url`).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Append the log lines to this file instead of standard output.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Remembers handled transactions, so a transaction sent again after a restart of this
    /// service is not logged twice.
    #[arg(long, default_value = "logger-txns")]
    txn_file: PathBuf,
    /// Log encrypted rooms too, decrypted: the bot gets a device whose keys are kept in this
    /// directory (the registration needs `generate-registration --encryption`).
    #[arg(long)]
    encryption_dir: Option<PathBuf>,
    /// With `--encryption-dir`: the logged rooms this service creates are encrypted.
    #[arg(long, requires = "encryption_dir")]
    encrypt_new_rooms: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Write a registration file for the homeserver (users of `#logged_*` aliases).
    GenerateRegistration(GenerateRegistration),
}

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    encrypt_new_rooms: bool,
}

impl Logger {
    fn write_line(&self, line: &serde_json::Value) -> HandlerResult {
        let mut out = self.out.lock().map_err(|_| "log output poisoned")?;
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }
}

impl Handler for Logger {
    // The exact JSON the homeserver sent (every key of the content, also ones ruma does not
    // know). The homeserver sends only events of rooms with a `#logged_*` alias (our namespace).
    async fn raw_event(&self, _ctx: Context, event: Value) -> HandlerResult {
        if event["type"] == "m.room.encrypted" {
            // Encrypted messages arrive decrypted with `--encryption-dir`; this one could not be.
            tracing::warn!(event_id = %event["event_id"], "not logged: cannot decrypt it");
            return Ok(());
        }
        if event["type"] != "m.room.message" {
            return Ok(());
        }
        self.write_line(&json!({
            "room_id": event["room_id"],
            "event_id": event["event_id"],
            "sender": event["sender"],
            "type": event["type"],
            "origin_server_ts": event["origin_server_ts"],
            "content": event["content"],
        }))
    }

    async fn query_alias(&self, ctx: Context, alias: OwnedRoomAliasId) -> HandlerResult<bool> {
        let localpart = alias.alias();
        if !localpart.starts_with(PREFIX) || alias.server_name().as_str() != ctx.server_name() {
            return Ok(false);
        }
        let mut create = json!({
            "room_alias_name": localpart,
            "name": localpart,
            "topic": "Every message here is logged.",
            "preset": "public_chat",
        });
        if self.encrypt_new_rooms {
            create["initial_state"] = json!([{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }]);
        }
        let created = ctx.bot().create_room(create).await;
        match created {
            Ok(room) => tracing::info!(%alias, %room, "created a logged room"),
            // Two people joined the new alias at once: the other query created it.
            Err(e) if e.errcode() == Some("M_ROOM_IN_USE") => {}
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("switchboard-logger: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(Command::GenerateRegistration(args)) = &cli.command {
        let registration = args.run("logger", None, Some(PREFIX))?;
        println!(
            "wrote {} (id `{}`); list it in the homeserver's app_service_config_files",
            args.output.display(),
            registration.id
        );
        return Ok(());
    }
    let (registration, _) = registration::load(&cli.registration)?;
    let out: Box<dyn Write + Send> = match &cli.log_file {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let logger = Logger {
        out: Mutex::new(out),
        encrypt_new_rooms: cli.encrypt_new_rooms,
    };
    let mut builder =
        Appservice::builder(registration, &cli.homeserver, &cli.server_name).txn_file(&cli.txn_file);
    if let Some(dir) = &cli.encryption_dir {
        builder = builder.encryption(dir);
    }
    builder.build(logger)?.run(cli.listen).await?;
    Ok(())
}
