//! Integration tests: each starts the real binary on a loopback port.

mod harness;

mod accounts;
mod durability;
mod http;
mod rooms;
mod sync;
