//! `switchboard-irc`: bridges IRC networks into Matrix through any homeserver.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchboard_appservice::{Appservice, cli::GenerateRegistration, registration};
use switchboard_irc::{
    bridge::{Bridge, PREFIX},
    config::Config,
    store::Store,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The bridge config (YAML).
    #[arg(long, short, default_value = "irc-bridge.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Write a registration file claiming `@irc_*` users and `#irc_*` aliases, protocol `irc`.
    GenerateRegistration(GenerateRegistration),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("switchboard-irc: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(Command::GenerateRegistration(mut args)) = cli.command {
        if args.protocols.is_empty() {
            args.protocols.push("irc".to_owned());
        }
        let registration = args.run("irc", Some(PREFIX), Some(PREFIX))?;
        println!(
            "wrote {} (id `{}`); list it in the homeserver's app_service_config_files",
            args.output.display(),
            registration.id
        );
        return Ok(());
    }
    let config = Config::load(&cli.config)?;
    let (registration, _) = registration::load(&config.registration)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir.join("bridge.db"))
        .await
        .map_err(|e| format!("cannot open {}: {e}", config.data_dir.join("bridge.db").display()))?;
    let bridge = Bridge::new(config.clone(), store);
    let handle = bridge.handle();
    let mut builder = Appservice::builder(registration, &config.homeserver.url, &config.homeserver.domain)
        .txn_file(config.data_dir.join("txns"));
    if config.encryption {
        builder = builder.encryption(config.data_dir.join("crypto"));
    }
    let service = builder.build(bridge)?;
    handle.set_context(service.context());
    let restored = handle.restore().await?;
    tracing::info!(channels = restored, "restored bridged channels");
    service.run(config.listen).await?;
    Ok(())
}
