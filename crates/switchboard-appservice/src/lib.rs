//! # switchboard-appservice
//!
//! Write Matrix [application services] — bridges, bots, integrations — in Rust, against any
//! spec-compliant homeserver (Switchboard, Synapse, …).
//!
//! - [`registration`]: load, validate and generate registration files.
//! - [`Appservice`]: the HTTP server the homeserver pushes transactions to and asks about users
//!   and aliases (current and legacy routes, `hs_token` checked, repeated transactions not
//!   handled twice — also across restarts), calling your [`Handler`]. Events of one room are
//!   handled in order, rooms concurrently; a transaction is acknowledged once handled.
//! - [`Client`] and [`Intent`]: act through the Client-Server API as the bot or as any virtual user
//!   of the namespace, registering and joining them on demand.
//!
//! The original 2015 blog post's logging service, in full:
//!
//! ```no_run
//! use switchboard_appservice::{Appservice, Context, Handler, HandlerResult, registration};
//! use ruma::{OwnedRoomAliasId, events::AnyTimelineEvent};
//!
//! struct Logger;
//!
//! impl Handler for Logger {
//!     async fn event(&self, _ctx: Context, event: AnyTimelineEvent) -> HandlerResult {
//!         println!("{} {}: {:?}", event.room_id(), event.sender(), event.event_type());
//!         Ok(())
//!     }
//!
//!     async fn query_alias(&self, ctx: Context, alias: OwnedRoomAliasId) -> HandlerResult<bool> {
//!         let name = alias.alias().to_owned();
//!         ctx.bot().create_room(serde_json::json!({"room_alias_name": name})).await?;
//!         Ok(true)
//!     }
//! }
//!
//! # async fn run() -> Result<(), switchboard_appservice::Error> {
//! let (registration, _) = registration::load("logger.yaml".as_ref())?;
//! Appservice::builder(registration, "http://127.0.0.1:8008", "example.org")
//!     .build(Logger)?
//!     .run("127.0.0.1:9000".parse().expect("address"))
//!     .await
//! # }
//! ```
//!
//! [application services]: https://spec.matrix.org/latest/application-service-api/

pub mod registration;

#[cfg(feature = "runtime")]
pub mod cli;
#[cfg(feature = "runtime")]
mod client;
#[cfg(feature = "e2ee")]
mod crypto;
#[cfg(feature = "runtime")]
mod error;
#[cfg(feature = "runtime")]
mod handler;
#[cfg(feature = "runtime")]
mod receiver;
#[cfg(feature = "runtime")]
mod service;
#[cfg(feature = "runtime")]
pub mod txns;

#[cfg(feature = "runtime")]
pub use client::{Client, Intent};
#[cfg(feature = "runtime")]
pub use error::{Error, MatrixError};
#[cfg(feature = "runtime")]
pub use handler::{Context, CryptoUpdate, Handler, HandlerResult};
#[cfg(feature = "runtime")]
pub use service::{Appservice, AppserviceBuilder};
