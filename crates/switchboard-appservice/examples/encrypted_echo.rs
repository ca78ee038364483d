//! An echo service that also works in encrypted rooms and DMs: it joins the rooms it is invited
//! to and answers every message with `echo: <text>` — encrypted where the room is. The SDK
//! decrypts what the handler sees and encrypts what the bot sends (feature `e2ee`).
//!
//! ```sh
//! cargo run -p switchboard-appservice --features e2ee --example encrypted_echo -- \
//!     echo.yaml http://127.0.0.1:8008 example.org 127.0.0.1:9000 echo-crypto
//! ```
//!
//! The registration needs `receive_ephemeral: true`, `org.matrix.msc3202: true` and
//! `io.element.msc4190: true`.

use ruma::RoomId;
use serde_json::Value;
use switchboard_appservice::{Appservice, Context, Handler, HandlerResult, registration};

struct EncryptedEcho;

impl Handler for EncryptedEcho {
    async fn raw_event(&self, ctx: Context, event: Value) -> HandlerResult {
        let bot = ctx.bot();
        let room = <&RoomId>::try_from(event["room_id"].as_str().unwrap_or_default())?;
        let from_bot = event["sender"] == bot.user_id().as_str();
        match event["type"].as_str() {
            Some("m.room.member")
                if event["state_key"] == bot.user_id().as_str()
                    && event["content"]["membership"] == "invite" =>
            {
                bot.ensure_joined(room).await?;
            }
            Some("m.room.message") if !from_bot => {
                let text = event["content"]["body"].as_str().unwrap_or_default();
                bot.send_text(room, &format!("echo: {text}")).await?;
            }
            // Still encrypted: no device of the service holds its room key.
            Some("m.room.encrypted") if !from_bot => {
                tracing::warn!(event_id = %event["event_id"], "cannot decrypt a message");
            }
            _ => {}
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), switchboard_appservice::Error> {
    tracing_subscriber_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, homeserver, server_name, listen, crypto_dir] = args.as_slice() else {
        eprintln!(
            "usage: encrypted_echo <registration> <homeserver URL> <server name> <listen address> <crypto dir>"
        );
        std::process::exit(2);
    };
    let (registration, _) = registration::load(file.as_ref())?;
    std::fs::create_dir_all(crypto_dir).map_err(|source| switchboard_appservice::Error::Io {
        context: format!("cannot create {crypto_dir}"),
        source,
    })?;
    let listen = listen
        .parse()
        .map_err(|e| switchboard_appservice::Error::Setup(format!("listen address {listen}: {e}")))?;
    Appservice::builder(registration, homeserver, server_name)
        .txn_file(format!("{crypto_dir}/txns"))
        .encryption(crypto_dir)
        .build(EncryptedEcho)?
        .run(listen)
        .await
}

/// Logs to stderr (RUST_LOG, default `info`).
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
