//! The IRC bridge (issue 6), built on `switchboard-appservice`. This first part holds the layers
//! the bridge stands on, each tested on its own:
//!
//! - [`proto`]: IRC lines (parse/print), CTCP `ACTION`, `rfc1459` case folding, splitting text to
//!   IRC's 512-byte lines;
//! - [`format`]: IRC formatting codes → Matrix HTML;
//! - [`conn`]: one IRC connection — TCP or TLS, registration with nick fallbacks, `PING`,
//!   rejoining after reconnects with backoff, flood control;
//! - [`names`]: reversible Matrix IDs for nicks (`@irc_<network>_<nick>`) and channels
//!   (`#irc_<network>_<#channel>`).
//!
//! [`bridge`] puts them together on the SDK: lazy channel rooms and IRC → Matrix messages;
//! [`config`] is the YAML config. Matrix → IRC puppets, private chats, mirrored membership and
//! durable mappings come next (see the README's feature table).

pub mod bridge;
pub mod config;
pub mod conn;
pub mod format;
pub mod names;
pub mod proto;
pub mod store;
