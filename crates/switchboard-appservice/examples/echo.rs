//! The README's example: answers every message and creates rooms for aliases asked about.
//! `cargo run -p switchboard-appservice --example echo` (needs `echo.yaml` and a homeserver).

use ruma::{OwnedRoomAliasId, events::AnyTimelineEvent};
use switchboard_appservice::{Appservice, Context, Handler, HandlerResult, registration};

struct Echo;

impl Handler for Echo {
    async fn event(&self, ctx: Context, event: AnyTimelineEvent) -> HandlerResult {
        if event.sender() != ctx.bot().user_id() {
            ctx.bot().send_text(event.room_id(), "heard you").await?;
        }
        Ok(())
    }

    async fn query_alias(&self, ctx: Context, alias: OwnedRoomAliasId) -> HandlerResult<bool> {
        ctx.bot()
            .create_room(serde_json::json!({"room_alias_name": alias.alias()}))
            .await?;
        Ok(true)
    }
}

#[tokio::main]
async fn main() -> Result<(), switchboard_appservice::Error> {
    let (registration, _) = registration::load("echo.yaml".as_ref())?;
    Appservice::builder(registration, "http://127.0.0.1:8008", "example.org")
        .txn_file("echo-txns")
        .build(Echo)?
        .run("127.0.0.1:9000".parse().expect("address"))
        .await
}
