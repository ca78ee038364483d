//! Integration tests: each starts the real binary on a loopback port.

#[allow(dead_code)] // `rss_kib` is for the benchmark, which shares the harness
mod harness;

mod accounts;
mod durability;
mod http;
mod rooms;
mod sync;
